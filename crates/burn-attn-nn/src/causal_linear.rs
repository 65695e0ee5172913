//! Causal linear attention: chunk-parallel training pass and a streaming step API.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use burn_attn_core::{
    causal_linear_attention_with, ensure, AttentionError, LinearAttentionState, LinearOptions,
};

use crate::flash::projection_config;
use crate::linear::{validate_linear, FeatureMap};
use crate::projection::MultiHeadProjection;

/// Configuration of [`CausalLinearAttention`].
#[derive(Config, Debug)]
pub struct CausalLinearAttentionConfig {
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
    /// The feature map. Default: `elu + 1`.
    #[config(default = "FeatureMap::EluPlusOne")]
    pub feature_map: FeatureMap,
    /// Added to the normaliser. Default: `1e-6`, as the seed.
    #[config(default = 1e-6)]
    pub eps: f64,
    /// Tokens per chunk of the chunk-parallel pass: larger chunks do more quadratic work
    /// inside a chunk, smaller ones more state updates. Default: `64`.
    #[config(default = 64)]
    pub chunk_size: usize,
}

impl CausalLinearAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_linear(self.d_model, self.n_heads, self.n_kv_heads, self.eps)?;
        if self.chunk_size == 0 {
            return Err(AttentionError::ZeroSize { what: "chunk_size" });
        }
        Ok(())
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> CausalLinearAttention {
        ensure(self.validate());
        CausalLinearAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            feature_map: self.feature_map,
            eps: self.eps,
            chunk_size: self.chunk_size,
        }
    }
}

/// Causal linear attention for autoregressive models. `forward` processes a whole
/// sequence chunk-parallel; [`step`](Self::step) and
/// [`forward_with_state`](Self::forward_with_state) continue a stream from a
/// [`LinearAttentionState`] and give the same outputs as the full pass.
#[derive(Module, Debug)]
pub struct CausalLinearAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// The feature map.
    #[module(skip)]
    pub feature_map: FeatureMap,
    /// Normaliser epsilon.
    pub eps: f64,
    /// Tokens per chunk.
    pub chunk_size: usize,
}

impl CausalLinearAttention {
    /// Causal self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_state(x, None).0
    }

    /// The state before the first token of a stream of `batch` sequences.
    pub fn init_state(&self, batch: usize, device: &Device) -> LinearAttentionState {
        let p = &self.projection;
        LinearAttentionState::zeros(batch, p.n_heads, p.head_dim, p.head_dim, device)
    }

    /// Continues a stream: `x` is the next `[batch, seq, d_model]` tokens, `state` what came
    /// before (`None`: the start). Returns the outputs and the state after `x`.
    pub fn forward_with_state(
        &self,
        x: Tensor<3>,
        state: Option<LinearAttentionState>,
    ) -> (Tensor<3>, LinearAttentionState) {
        let h = self.projection.split_self(x);
        let options = LinearOptions::new()
            .with_eps(self.eps)
            .with_chunk(self.chunk_size)
            .with_feature_map(self.feature_map);
        let (out, state) = causal_linear_attention_with(h.q, h.k, h.v, state, &options);
        (self.projection.merge(out), state)
    }

    /// One recurrent step: `x_t` is `[batch, d_model]`; returns `[batch, d_model]` and the
    /// updated state.
    pub fn step(
        &self,
        state: LinearAttentionState,
        x_t: Tensor<2>,
    ) -> (Tensor<2>, LinearAttentionState) {
        let (out, state) = self.forward_with_state(x_t.unsqueeze_dim(1), Some(state));
        (out.squeeze_dim(1), state)
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
    fn streaming_steps_equal_the_full_pass() {
        for (seq, chunk, kv) in [(1, 64, None), (17, 4, Some(1)), (97, 16, None)] {
            let module = CausalLinearAttentionConfig::new(32, 4)
                .with_chunk_size(chunk)
                .with_n_kv_heads(kv)
                .init(&cpu());
            let x = randn([2, seq, 32], &cpu());
            let full = module.forward(x.clone());
            assert_finite(full.clone());
            let mut state = module.init_state(2, &cpu());
            let mut outs = Vec::new();
            for t in 0..seq {
                let x_t = x.clone().slice([0..2, t..t + 1]).squeeze_dim(1);
                let (o, s) = module.step(state, x_t);
                outs.push(o.unsqueeze_dim(1));
                state = s;
            }
            assert_close(Tensor::cat(outs, 1), full.clone(), 1e-4);

            // Two halves through forward_with_state equal the full pass too.
            if seq > 2 {
                let half = seq / 2;
                let (a, s) = module.forward_with_state(x.clone().slice([0..2, 0..half]), None);
                let (b, _) = module.forward_with_state(x.slice([0..2, half..seq]), Some(s));
                assert_close(Tensor::cat(vec![a, b], 1), full, 1e-4);
            }
        }
    }

    #[test]
    fn chunk_size_does_not_change_the_result() {
        let config = CausalLinearAttentionConfig::new(16, 2);
        let a = config.init(&cpu());
        let x = randn([1, 37, 16], &cpu());
        let want = a.forward(x.clone());
        // Cloned after the first forward: parameters are initialised lazily.
        let mut b = a.clone();
        b.chunk_size = 5;
        assert_close(b.forward(x), want, 1e-4);
    }

    #[test]
    fn trains_round_trips_and_rejects_zero_chunk() {
        let config = CausalLinearAttentionConfig::new(16, 2).with_chunk_size(4);
        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        let err = config
            .with_chunk_size(0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunk_size must be at least 1, got 0"),
            "{err}"
        );
    }
}
