//! The multi-head projections every attention variant shares: query, key, value and
//! output linears, head splitting (with GQA/MQA) and merging. Variants differ only in the
//! core they run between [`MultiHeadProjection::split`] and [`MultiHeadProjection::merge`].

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{ensure, reference_attention, AttentionError, KeyPattern, Window};

/// Configuration of [`MultiHeadProjection`].
#[derive(Config, Debug)]
pub struct MultiHeadProjectionConfig {
    /// Model width (input and output features).
    pub d_model: usize,
    /// Query heads; must divide `d_model`.
    pub n_heads: usize,
    /// Key/value heads for grouped-query (or multi-query, with 1) attention; must divide
    /// `n_heads`. Default: `None`, as many as `n_heads`.
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Whether the query, key, value and output linears have a bias. Default: `true`.
    #[config(default = true)]
    pub bias: bool,
}

impl MultiHeadProjectionConfig {
    /// Checks the sizes; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)
    }

    /// Builds the projections.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> MultiHeadProjection {
        ensure(self.validate());
        let n_kv_heads = self.n_kv_heads.unwrap_or(self.n_heads);
        let head_dim = self.d_model / self.n_heads;
        let linear = |out: usize| {
            LinearConfig::new(self.d_model, out)
                .with_bias(self.bias)
                .init(device)
        };
        MultiHeadProjection {
            query: linear(self.d_model),
            key: linear(n_kv_heads * head_dim),
            value: linear(n_kv_heads * head_dim),
            output: linear(self.d_model),
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_kv_heads,
            head_dim,
        }
    }
}

/// Checks `d_model`, `n_heads` and `n_kv_heads` together.
pub fn validate_heads(
    d_model: usize,
    n_heads: usize,
    n_kv_heads: Option<usize>,
) -> Result<(), AttentionError> {
    if d_model == 0 {
        return Err(AttentionError::ZeroSize { what: "d_model" });
    }
    if n_heads == 0 {
        return Err(AttentionError::ZeroSize { what: "n_heads" });
    }
    if !d_model.is_multiple_of(n_heads) {
        return Err(AttentionError::ModelDimNotDivisible { d_model, n_heads });
    }
    if let Some(kv) = n_kv_heads {
        if kv == 0 || !n_heads.is_multiple_of(kv) {
            return Err(AttentionError::HeadsNotDivisible {
                heads: n_heads,
                kv_heads: kv,
            });
        }
    }
    Ok(())
}

/// Query, key, value and output projections with head splitting.
#[derive(Module, Debug)]
pub struct MultiHeadProjection {
    /// `d_model -> n_heads * head_dim`.
    pub query: Linear,
    /// `d_model -> n_kv_heads * head_dim`.
    pub key: Linear,
    /// `d_model -> n_kv_heads * head_dim`.
    pub value: Linear,
    /// `n_heads * head_dim -> d_model`.
    pub output: Linear,
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Query, key and value heads: `[batch, heads, seq, head_dim]`, keys and values with
/// `n_kv_heads` heads.
pub struct Heads {
    /// Query heads.
    pub q: Tensor<4>,
    /// Key heads.
    pub k: Tensor<4>,
    /// Value heads.
    pub v: Tensor<4>,
}

impl MultiHeadProjection {
    /// Panics with the values when `x` is not `[batch, seq, d_model]`.
    pub fn check_input(&self, what: &'static str, x: &Tensor<3>) {
        let dims = x.dims();
        if dims[2] != self.d_model {
            ensure(Err(AttentionError::Shape {
                what,
                expected: format!("[batch, seq, {}] (d_model)", self.d_model),
                got: dims.to_vec(),
            }));
        }
    }

    /// The decoding paths' check, before they change a cache: `x` is `[batch, new,
    /// d_model]` with at least one sequence and one new token, or an error naming its shape.
    pub fn check_tokens(&self, x: &Tensor<3>) -> Result<(), AttentionError> {
        let [batch, new, d_model] = x.dims();
        if batch == 0 || new == 0 || d_model != self.d_model {
            return Err(AttentionError::Shape {
                what: "decoding input",
                expected: format!(
                    "[batch, new, {}] (d_model) with at least one sequence and one new token",
                    self.d_model
                ),
                got: x.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// Projects `query` (`[batch, seq_q, d_model]`) and `key`/`value`
    /// (`[batch, seq_k, d_model]`) and splits them into heads.
    pub fn split(&self, query: Tensor<3>, key: Tensor<3>, value: Tensor<3>) -> Heads {
        self.check_input("query input", &query);
        self.check_input("key input", &key);
        self.check_input("value input", &value);
        let [bq, _, _] = query.dims();
        let [bk, seq_k, _] = key.dims();
        let [bv, seq_v, _] = value.dims();
        if bq != bk || bk != bv || seq_k != seq_v {
            ensure(Err(AttentionError::Invalid(format!(
                "query, key and value inputs disagree: query {:?}, key {:?}, value {:?} \
                 (batch must match, key and value lengths must match)",
                query.dims(),
                key.dims(),
                value.dims()
            ))));
        }
        Heads {
            q: self.heads(self.query.forward(query), self.n_heads),
            k: self.heads(self.key.forward(key), self.n_kv_heads),
            v: self.heads(self.value.forward(value), self.n_kv_heads),
        }
    }

    /// [`split`](Self::split) for self-attention.
    pub fn split_self(&self, x: Tensor<3>) -> Heads {
        self.split(x.clone(), x.clone(), x)
    }

    fn heads(&self, x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [batch, seq, _] = x.dims();
        x.reshape([batch, seq, heads, self.head_dim])
            .swap_dims(1, 2)
    }

    /// Merges `[batch, n_heads, seq, head_dim]` back to `[batch, seq, d_model]` and applies
    /// the output projection.
    pub fn merge(&self, heads: Tensor<4>) -> Tensor<3> {
        let [batch, n_heads, seq, head_dim] = heads.dims();
        let x = heads
            .swap_dims(1, 2)
            .reshape([batch, seq, n_heads * head_dim]);
        self.output.forward(x)
    }

    /// Plain materialised exact softmax attention with these weights: the baseline that
    /// approximate variants are measured against. `causal` hides future keys.
    pub fn exact(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        self.exact_cross(x.clone(), x.clone(), x, None, causal)
    }

    /// [`exact`](Self::exact) with separate inputs and a `[batch, seq_k]` key padding mask.
    pub fn exact_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
        causal: bool,
    ) -> Tensor<3> {
        let h = self.split(query, key, value);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let pattern = KeyPattern::band(Window::FULL, causal);
        let (out, _) = reference_attention(h.q, h.k, h.v, &pattern, scale, key_padding, None);
        self.merge(out)
    }
}
