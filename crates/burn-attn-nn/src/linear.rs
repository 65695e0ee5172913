//! Linear attention: `phi(Q) (phi(K)^T V)` normalised, O(n) time and memory.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{ensure, linear_attention_with, AttentionError, LinearOptions};

use crate::flash::projection_config;
use crate::projection::{validate_heads, MultiHeadProjection};

pub use burn_attn_core::FeatureMap;

/// Configuration of [`LinearAttention`].
#[derive(Config, Debug)]
pub struct LinearAttentionConfig {
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
}

/// Checks the shared parameters of the linear variants.
pub(crate) fn validate_linear(
    d_model: usize,
    n_heads: usize,
    n_kv_heads: Option<usize>,
    eps: f64,
) -> Result<(), AttentionError> {
    validate_heads(d_model, n_heads, n_kv_heads)?;
    burn_attn_core::check_linear_eps(eps)?;
    Ok(())
}

impl LinearAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_linear(self.d_model, self.n_heads, self.n_kv_heads, self.eps)
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> LinearAttention {
        ensure(self.validate());
        LinearAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            feature_map: self.feature_map,
            eps: self.eps,
        }
    }
}

/// Non-causal linear attention. An approximation of softmax attention: it replaces
/// `exp(q . k)` by `phi(q) . phi(k)`, which makes the cost linear in the length.
#[derive(Module, Debug)]
pub struct LinearAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// The feature map.
    #[module(skip)]
    pub feature_map: FeatureMap,
    /// Normaliser epsilon.
    pub eps: f64,
}

impl LinearAttention {
    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_cross(x.clone(), x.clone(), x, None)
    }

    /// Attention of `query` over `key`/`value` with an optional `[batch, seq_k]` key
    /// padding mask (`true` = padding).
    pub fn forward_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let h = self.projection.split(query, key, value);
        let options = LinearOptions::new()
            .with_eps(self.eps)
            .with_feature_map(self.feature_map);
        let out = linear_attention_with(h.q, h.k, h.v, key_padding, &options);
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

    /// The seed's formula with a materialised `phi(Q) phi(K)^T`.
    fn quadratic(
        module: &LinearAttention,
        q: Tensor<3>,
        kv: Tensor<3>,
        keep: Option<Tensor<4>>,
    ) -> Tensor<3> {
        let h = module.projection().split(q, kv.clone(), kv);
        let heads = h.q.dims()[1];
        let phi_q = module.feature_map.apply(h.q);
        let phi_k = burn_attn_core::repeat_kv(module.feature_map.apply(h.k), heads);
        let v = burn_attn_core::repeat_kv(h.v, heads);
        let mut a = phi_q.matmul(phi_k.swap_dims(2, 3));
        if let Some(keep) = keep {
            a = a * keep;
        }
        let den = a.clone().sum_dim(3);
        module.projection().merge(a.matmul(v) / (den + module.eps))
    }

    #[test]
    fn equals_quadratic_form_for_every_feature_map() {
        for map in [
            FeatureMap::EluPlusOne,
            FeatureMap::Relu,
            FeatureMap::Softplus,
        ] {
            for (seq_q, seq_k, kv) in [(1, 1, None), (17, 17, Some(2)), (13, 40, None)] {
                let module = LinearAttentionConfig::new(32, 4)
                    .with_feature_map(map)
                    .with_n_kv_heads(kv)
                    .init(&cpu());
                let q = randn([2, seq_q, 32], &cpu());
                let kvx = randn([2, seq_k, 32], &cpu());
                let got = module.forward_cross(q.clone(), kvx.clone(), kvx.clone(), None);
                assert_finite(got.clone());
                assert_close(got, quadratic(&module, q, kvx, None), 1e-4);
            }
        }
    }

    #[test]
    fn padding_removes_keys() {
        let module = LinearAttentionConfig::new(16, 2).init(&cpu());
        let q = randn([1, 5, 16], &cpu());
        let kv = randn([1, 9, 16], &cpu());
        let pad = Tensor::<1, Int>::arange(0..9, &cpu())
            .reshape([1, 9])
            .greater_equal_elem(6);
        let keep = pad.clone().bool_not().float().reshape([1, 1, 1, 9]);
        let got = module.forward_cross(q.clone(), kv.clone(), kv.clone(), Some(pad));
        assert_close(got, quadratic(&module, q, kv, Some(keep)), 1e-4);
    }

    #[test]
    fn trains_and_round_trips() {
        let config = LinearAttentionConfig::new(16, 2);
        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        let json =
            serde_json::to_string(&config.clone().with_feature_map(FeatureMap::Relu)).unwrap();
        let back: LinearAttentionConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.feature_map, FeatureMap::Relu);
    }
}
