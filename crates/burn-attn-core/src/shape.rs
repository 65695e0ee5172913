//! Shape checks and the sizes of one attention call.

use burn::tensor::Tensor;

use crate::error::AttentionError;

/// The sizes of one attention call, read from `q: [batch, heads, seq_q, head_dim]`,
/// `k: [batch, kv_heads, seq_k, head_dim]` and `v: [batch, kv_heads, seq_k, value_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Query length.
    pub seq_q: usize,
    /// Key/value length.
    pub seq_k: usize,
    /// Query/key head dimension.
    pub head_dim: usize,
    /// Value head dimension.
    pub value_dim: usize,
}

impl AttentionShape {
    /// Reads and checks the sizes of `q`, `k`, `v`.
    pub fn of(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Result<Self, AttentionError> {
        Self::from_dims(q.dims(), k.dims(), v.dims())
    }

    /// Checks raw dimensions.
    pub fn from_dims(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<Self, AttentionError> {
        let [batch, heads, seq_q, head_dim] = q;
        let [kb, kv_heads, seq_k, kd] = k;
        if head_dim == 0 {
            return Err(AttentionError::ZeroSize { what: "head_dim" });
        }
        if kb != batch || kd != head_dim {
            return Err(AttentionError::Shape {
                what: "key",
                expected: format!(
                    "[{batch}, kv_heads, seq_k, {head_dim}] (batch and head_dim of the query {q:?})"
                ),
                got: k.to_vec(),
            });
        }
        if v[0] != batch || v[1] != kv_heads || v[2] != seq_k {
            return Err(AttentionError::Shape {
                what: "value",
                expected: format!("[{batch}, {kv_heads}, {seq_k}, value_dim] (as the key {k:?})"),
                got: v.to_vec(),
            });
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(AttentionError::HeadsNotDivisible { heads, kv_heads });
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            head_dim,
            value_dim: v[3],
        })
    }

    /// How many query heads share one key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Expands key/value heads to the query heads (GQA/MQA): query head `h` reads kv head
/// `h / (heads / kv_heads)`.
pub fn repeat_kv(x: Tensor<4>, heads: usize) -> Tensor<4> {
    let [b, kv_heads, n, d] = x.dims();
    if kv_heads == heads {
        return x;
    }
    let group = heads / kv_heads;
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv_heads, group, n, d])
        .reshape([b, heads, n, d])
}
