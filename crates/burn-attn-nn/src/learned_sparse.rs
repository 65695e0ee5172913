//! Learned sparsity: a trained gate chooses, per head, the keys every query attends to.

use core::ops::Range;

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{
    ensure, repeat_kv, tiled_attention, AttentionError, KeyPattern, TileBias, TiledSpec,
};

use crate::flash::{projection_config, validate_dropout};
use crate::projection::{validate_heads, MultiHeadProjection};

/// Configuration of [`LearnedSparseAttention`].
#[derive(Config, Debug)]
pub struct LearnedSparseAttentionConfig {
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
    /// Fraction of keys kept per head: each query attends to the top `ceil(ratio * n)`
    /// keys by gate score (at least 1). In `(0, 1]`. Default: `0.1`, as the seed.
    #[config(default = 0.1)]
    pub ratio: f64,
}

impl LearnedSparseAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(AttentionError::OutOfUnitRange {
                what: "ratio",
                value: self.ratio,
            });
        }
        Ok(())
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> LearnedSparseAttention {
        ensure(self.validate());
        LearnedSparseAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            gate: LinearConfig::new(self.d_model, self.n_heads).init(device),
            ratio: self.ratio,
            dropout: self.dropout,
        }
    }
}

/// Attention over the keys a trained gate selects.
///
/// The gate scores every key per head; each query attends to the top `ceil(ratio * n)`
/// keys, and `log_sigmoid(score)` is added to those keys' logits so the gate is trained by
/// the loss. Keys are selected (never query rows), so no row is ever left empty: no NaN.
/// Cost O(n * ratio * n). Not causal: the selection looks at every key.
#[derive(Module, Debug)]
pub struct LearnedSparseAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// Key scores per head: `d_model -> n_heads`.
    pub gate: Linear,
    /// Fraction of keys kept.
    pub ratio: f64,
    /// Dropout on probabilities while training.
    pub dropout: f64,
}

/// The gate's log-sigmoid bias on the selected keys, `[batch, heads, 1, selected]`.
struct SelectedKeyBias(Tensor<4>);

impl TileBias for SelectedKeyBias {
    fn bias(&self, _rows: Range<usize>, cols: Range<usize>) -> Tensor<4> {
        let [b, h, _, _] = self.0.dims();
        self.0.clone().slice([0..b, 0..h, 0..1, cols])
    }
}

impl LearnedSparseAttention {
    /// How many keys are kept out of `seq_k`.
    pub fn selected(&self, seq_k: usize) -> usize {
        ((self.ratio * seq_k as f64).ceil() as usize).clamp(1, seq_k.max(1))
    }

    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_cross(x.clone(), x.clone(), x, None)
    }

    /// Attention of `query` over the selected keys of `key`/`value`, with an optional
    /// `[batch, seq_k]` key padding mask (`true` = padding; padding is selected last and
    /// always hidden).
    pub fn forward_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let gate_scores = self.gate.forward(key.clone()).swap_dims(1, 2); // [b, heads, seq_k]
        let h = self.projection.split(query, key, value);
        let [batch, heads, _, head_dim] = h.q.dims();
        let seq_k = h.k.dims()[2];
        let value_dim = h.v.dims()[3];
        let n_sel = self.selected(seq_k);

        let padding = key_padding.map(|pad| {
            ensure(if pad.dims() == [batch, seq_k] {
                Ok(())
            } else {
                Err(AttentionError::Shape {
                    what: "key padding mask",
                    expected: format!("[{batch}, {seq_k}] (batch, seq_k)"),
                    got: pad.dims().to_vec(),
                })
            });
            pad.reshape([batch, 1, seq_k]).expand([batch, heads, seq_k])
        });
        // Only the indices come from the top-k, so padding can rank last with -inf.
        let ranking = match &padding {
            Some(pad) => gate_scores
                .clone()
                .mask_fill(pad.clone(), f32::NEG_INFINITY),
            None => gate_scores.clone(),
        };
        // A full sort rather than top-k: Burn's top-k requires k < n, and ratio 1 keeps all.
        let (_, idx) = ranking.detach().sort_descending_with_indices(2);
        let idx = idx.slice([0..batch, 0..heads, 0..n_sel]); // [b, heads, n_sel]

        let gather_rows = |x: Tensor<4>, width: usize| {
            let idx = idx
                .clone()
                .reshape([batch, heads, n_sel, 1])
                .expand([batch, heads, n_sel, width]);
            repeat_kv(x, heads).gather(2, idx)
        };
        let k_sel = gather_rows(h.k, head_dim);
        let v_sel = gather_rows(h.v, value_dim);
        let mut bias = log_sigmoid(gate_scores.gather(2, idx.clone()));
        if let Some(pad) = padding {
            let hidden = pad.float().gather(2, idx).greater_elem(0.5);
            bias = bias.mask_fill(hidden, f32::NEG_INFINITY);
        }
        let bias = SelectedKeyBias(bias.reshape([batch, heads, 1, n_sel]));

        let pattern = KeyPattern::default();
        let mut spec = TiledSpec::new(&pattern, 1.0 / (head_dim as f64).sqrt());
        spec.bias = Some(&bias);
        spec.dropout = self.dropout;
        let (out, _) = tiled_attention(h.q, k_sel, v_sel, &spec);
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
    use burn::tensor::Int;
    use burn_attn_core::reference_attention;

    /// The same selection written the plain way: a dense mask over all keys that keeps the
    /// top-k per head, with the gate bias added to every logit.
    fn dense_reference(module: &LearnedSparseAttention, x: Tensor<3>) -> Tensor<3> {
        let scores = module.gate.forward(x.clone()).swap_dims(1, 2); // [b, h, n]
        let [b, heads, n] = scores.dims();
        let k = module.selected(n);
        let threshold = scores
            .clone()
            .sort_descending(2)
            .slice([0..b, 0..heads, k - 1..k]);
        let hidden = scores.clone().lower(threshold.expand([b, heads, n]));
        let bias = log_sigmoid(scores)
            .mask_fill(hidden, f32::NEG_INFINITY)
            .reshape([b, heads, 1, n]);
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
    fn equals_dense_top_k_reference() {
        for (ratio, seq, kv) in [
            (0.1, 97, None),
            (0.5, 17, Some(2)),
            (1.0, 9, None),
            (0.01, 1, None),
        ] {
            let module = LearnedSparseAttentionConfig::new(32, 4)
                .with_ratio(ratio)
                .with_n_kv_heads(kv)
                .init(&cpu());
            let x = randn([2, seq, 32], &cpu());
            let got = module.forward(x.clone());
            assert_finite(got.clone());
            assert_close(got, dense_reference(&module, x), 2e-5);
        }
    }

    #[test]
    fn padding_is_never_attended() {
        let module = LearnedSparseAttentionConfig::new(16, 2)
            .with_ratio(1.0)
            .init(&cpu());
        let q = randn([1, 5, 16], &cpu());
        let kv = randn([1, 10, 16], &cpu());
        let pad = Tensor::<1, Int>::arange(0..10, &cpu())
            .reshape([1, 10])
            .greater_equal_elem(6);
        let got = module.forward_cross(q.clone(), kv.clone(), kv.clone(), Some(pad));
        // With ratio 1 and padding hidden, changing the padded keys changes nothing.
        let kv2 = Tensor::cat(
            vec![kv.clone().slice([0..1, 0..6]), randn([1, 4, 16], &cpu())],
            1,
        );
        let pad = Tensor::<1, Int>::arange(0..10, &cpu())
            .reshape([1, 10])
            .greater_equal_elem(6);
        let again = module.forward_cross(q, kv2.clone(), kv2, Some(pad));
        assert_close(got, again, 1e-5);
    }

    #[test]
    fn gate_receives_gradient_and_loss_falls() {
        let config = LearnedSparseAttentionConfig::new(16, 2).with_ratio(0.3);
        let module = config.init(&cpu_ad());
        let x = randn([2, 12, 16], &cpu_ad());
        let grads = module.forward(x).powi_scalar(2).sum().backward();
        let g = module
            .gate
            .weight
            .grad(&grads)
            .expect("gate has a gradient");
        let norm: f32 = g.abs().sum().into_scalar();
        assert!(norm > 0.0, "gate gradient is zero");

        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
    }

    #[test]
    fn round_trips_and_rejects_bad_ratio() {
        let config = LearnedSparseAttentionConfig::new(16, 2);
        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        for bad in [0.0, 1.5, -0.1] {
            let err = config
                .clone()
                .with_ratio(bad)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&bad.to_string()), "{err}");
        }
    }
}
