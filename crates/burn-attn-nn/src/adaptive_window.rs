//! Adaptive sliding window: each token predicts its own window size, and a soft edge makes
//! that prediction trainable.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{
    ensure, masked_attention, AttentionError, AttentionMasks, AttentionOptions, BlockMaskCache,
    KeyPattern, SoftEdge, Window,
};

use crate::dropout::{validate_dropout, AttentionDropout};
use crate::flash::projection_config;
use crate::projection::{validate_heads, MultiHeadProjection};

/// Configuration of [`AdaptiveSlidingWindowAttention`].
#[derive(Config, Debug)]
pub struct AdaptiveSlidingWindowAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads; must divide `d_model`.
    pub n_heads: usize,
    /// Key/value heads (GQA/MQA). Default: `None` (= `n_heads`).
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Whether the linears have a bias. Default: `true`.
    #[config(default = true)]
    pub bias: bool,
    /// Dropout on the attention probabilities while training. Default: `0.0`.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Smallest window a token can predict (at least 1). Default: `64`, as the seed.
    #[config(default = 64)]
    pub min_window: usize,
    /// Largest window a token can predict. Default: `512`, as the seed.
    #[config(default = 512)]
    pub max_window: usize,
    /// Width, in keys, of the soft edge: the weight of a key falls linearly from 1 to 0
    /// over `ramp` keys centred on the predicted edge. Must be positive. Default: `16`.
    #[config(default = 16.0)]
    pub ramp: f64,
    /// Look only backwards (the window is then the `w` most recent keys). Default: `false`
    /// (symmetric, `w / 2` on each side as the seed).
    #[config(default = false)]
    pub causal: bool,
}

impl AdaptiveSlidingWindowAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        if self.min_window == 0 {
            return Err(AttentionError::ZeroSize { what: "min_window" });
        }
        if self.min_window > self.max_window {
            return Err(AttentionError::MinAboveMax {
                what: "adaptive window",
                min: self.min_window,
                max: self.max_window,
            });
        }
        if !(self.ramp.is_finite() && self.ramp > 0.0) {
            return Err(AttentionError::Invalid(format!(
                "ramp must be finite and positive, got {}",
                self.ramp
            )));
        }
        Ok(())
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> AdaptiveSlidingWindowAttention {
        ensure(self.validate());
        AdaptiveSlidingWindowAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            predictor: LinearConfig::new(self.d_model, 1)
                .with_bias(self.bias)
                .init(device),
            min_window: self.min_window,
            max_window: self.max_window,
            ramp: self.ramp,
            causal: self.causal,
            dropout: AttentionDropout::new(self.dropout),
            block_masks: BlockMaskCache::new(),
        }
    }
}

/// Sliding-window self-attention whose window each token predicts:
/// `w_i = min + sigmoid(predictor(x_i)) * (max - min)`.
///
/// A key at distance `d` from token `i` gets weight `clamp((reach_i - d) / ramp + 1/2, 0, 1)`
/// on its softmax term (`reach = w / 2` symmetric, `w - 1` causal), so the loss moves the
/// edge and trains the predictor. The token's own key always has positive weight: no row
/// is ever empty. Cost O(n * (max_window + ramp)): only that band is visited.
#[derive(Module, Debug)]
pub struct AdaptiveSlidingWindowAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// Window predictor: `d_model -> 1`.
    pub predictor: Linear,
    /// Smallest window.
    pub min_window: usize,
    /// Largest window.
    pub max_window: usize,
    /// Soft edge width.
    pub ramp: f64,
    /// Causal flag.
    pub causal: bool,
    /// Dropout on probabilities while training.
    pub dropout: AttentionDropout,
    /// The band's block-sparse plan of the last call's length, reused by the next calls of
    /// the same length on the GPU kernels (clones of the module share it).
    #[module(skip)]
    pub block_masks: BlockMaskCache,
}

impl AdaptiveSlidingWindowAttention {
    /// The predicted window size of every token, `[batch, seq]`, in `[min, max]`.
    pub fn window_sizes(&self, x: Tensor<3>) -> Tensor<2> {
        let span = (self.max_window - self.min_window) as f64;
        sigmoid(self.predictor.forward(x)).squeeze_dim::<2>(2) * span + self.min_window as f64
    }

    /// The outer band visited: the largest reach plus half the ramp.
    pub fn band(&self) -> Window {
        let extent = (self.reach_of(self.max_window as f64) + self.ramp / 2.0).ceil() as usize;
        Window::new(Some(extent), Some(if self.causal { 0 } else { extent }))
    }

    fn reach_of(&self, window: f64) -> f64 {
        if self.causal {
            window - 1.0
        } else {
            window / 2.0
        }
    }

    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    ///
    /// The soft edge is a score term of [`masked_attention`]: on CubeCL devices the
    /// block-sparse kernels evaluate it per element in the band and return the reach's
    /// gradient from their backward; on the CPU the tiled path adds it per tile.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_padded(x, None)
    }

    /// [`forward`](Self::forward) with an optional `[batch, seq]` key padding mask (`true`
    /// = padding, hidden from every query; a row that sees no key gives 0).
    ///
    /// # Panics
    /// When the mask's shape does not match `x` (naming both).
    pub fn forward_padded(&self, x: Tensor<3>, key_padding: Option<Tensor<2, Bool>>) -> Tensor<3> {
        self.projection.check_input("input", &x);
        let sizes = self.window_sizes(x.clone());
        let [batch, seq] = sizes.dims();
        let reach = if self.causal {
            sizes - 1.0
        } else {
            sizes / 2.0
        };
        let masks = AttentionMasks {
            soft_edge: Some(SoftEdge {
                reach: reach.reshape([batch, 1, seq]),
                ramp: self.ramp,
            }),
            key_padding,
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        };
        let h = self.projection.split_self(x);
        let pattern = KeyPattern::band(self.band(), self.causal);
        let options = AttentionOptions::new().with_block_mask_cache(self.block_masks.clone());
        let out = masked_attention(h.q, h.k, h.v, &pattern, &options, &masks);
        self.projection.merge(out)
    }

    /// The shared projections (for exact baselines with the same weights).
    pub fn projection(&self) -> &MultiHeadProjection {
        &self.projection
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn padding_hides_keys() {
        let module = AdaptiveSlidingWindowAttentionConfig::new(16, 2)
            .with_min_window(2)
            .with_max_window(8)
            .with_ramp(2.0)
            .init(&cpu());
        assert_padding_hides_keys(|x, pad| module.forward_padded(x, Some(pad)), [2, 15, 16], 4);
    }
    use burn::tensor::TensorData;
    use burn_attn_core::reference_attention;

    /// The same weights computed per element on the host, applied to a dense reference.
    fn host_reference(module: &AdaptiveSlidingWindowAttention, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let sizes: Vec<f32> = module
            .window_sizes(x.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let mut bias = Vec::with_capacity(batch * seq * seq);
        for b in 0..batch {
            for i in 0..seq {
                let w = sizes[b * seq + i] as f64;
                let reach = module.reach_of(w);
                for j in 0..seq {
                    let visible = !module.causal || j <= i;
                    let d = (i as f64 - j as f64).abs();
                    let g = ((reach - d) / module.ramp + 0.5).clamp(0.0, 1.0);
                    bias.push(if visible && g > 0.0 {
                        g.ln() as f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [batch, 1, seq, seq]), &cpu());
        let h = module.projection().split_self(x);
        let scale = 1.0 / (h.q.dims()[3] as f64).sqrt();
        let (out, _) = reference_attention(
            h.q,
            h.k,
            h.v,
            &KeyPattern::default(),
            scale,
            None,
            Some(bias),
        );
        module.projection().merge(out)
    }

    #[test]
    fn equals_host_computed_soft_window() {
        for causal in [false, true] {
            let module = AdaptiveSlidingWindowAttentionConfig::new(32, 4)
                .with_min_window(2)
                .with_max_window(24)
                .with_ramp(3.0)
                .with_causal(causal)
                .init(&cpu());
            for seq in [1, 17, 97] {
                let x = randn([2, seq, 32], &cpu());
                let got = module.forward(x.clone());
                assert_finite(got.clone());
                assert_close(got, host_reference(&module, x), 2e-5);
            }
        }
    }

    #[test]
    fn predictor_receives_gradient_and_loss_falls() {
        let config = AdaptiveSlidingWindowAttentionConfig::new(16, 2)
            .with_min_window(2)
            .with_max_window(10)
            .with_ramp(2.0);
        let module = config.init(&cpu_ad());
        let x = randn([2, 16, 16], &cpu_ad());
        let grads = module.forward(x).powi_scalar(2).sum().backward();
        let g = module
            .predictor
            .weight
            .grad(&grads)
            .expect("predictor has a gradient");
        let norm: f32 = g.abs().sum().into_scalar();
        assert!(norm > 0.0, "window predictor gradient is zero");

        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
    }

    #[test]
    fn round_trips_and_rejects_bad_windows() {
        let config = AdaptiveSlidingWindowAttentionConfig::new(16, 2)
            .with_max_window(16)
            .with_min_window(4);
        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);

        let err = config
            .clone()
            .with_min_window(32)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("(32)") && err.contains("(16)"), "{err}");
        let err = config
            .clone()
            .with_min_window(0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_window"), "{err}");
        let err = config.with_ramp(0.0).validate().unwrap_err().to_string();
        assert!(err.contains("ramp"), "{err}");
    }

    #[test]
    fn bias_false_leaves_every_linear_without_a_bias() {
        for bias in [true, false] {
            let module = AdaptiveSlidingWindowAttentionConfig::new(16, 2)
                .with_bias(bias)
                .init(&cpu());
            let p = &module.projection;
            for (name, linear) in [
                ("predictor", &module.predictor),
                ("query", &p.query),
                ("output", &p.output),
            ] {
                assert_eq!(linear.bias.is_some(), bias, "{name} with bias = {bias}");
            }
        }
    }
}
