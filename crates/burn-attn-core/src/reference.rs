//! The plain materialised attention: the definition every other implementation is tested
//! against. It builds the whole `seq_q x seq_k` score matrix, so it is O(n^2) in memory
//! and meant for tests, error measurement and small inputs.

use burn::tensor::{Bool, Tensor};

use crate::error::OrPanic;
use crate::pattern::KeyPattern;
use crate::shape::{repeat_kv, AttentionShape};
use crate::tiled::smallest_normal;

/// Materialised attention over `pattern`, with an optional `[batch, seq_k]` key padding
/// mask (`true` = hidden) and an optional additive bias broadcastable to
/// `[batch, heads, seq_q, seq_k]`. Returns the output and the row log-sum-exp; rows that
/// see no key give 0 and `-inf`.
pub fn reference_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    scale: f64,
    key_padding: Option<Tensor<2, Bool>>,
    bias: Option<Tensor<4>>,
) -> (Tensor<4>, Tensor<3>) {
    let shape = AttentionShape::of(&q, &k, &v).or_panic();
    let AttentionShape {
        batch,
        heads,
        seq_q,
        seq_k,
        ..
    } = shape;
    let device = q.device();
    let k = repeat_kv(k, heads);
    let v = repeat_kv(v, heads);
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    if let Some(bias) = bias {
        scores = scores + bias.expand([batch, heads, seq_q, seq_k]);
    }
    if seq_q > 0 && seq_k > 0 {
        let mut hidden = pattern
            .tile_mask(0..seq_q, 0..seq_k, seq_q, seq_k, &device)
            .bool_not()
            .reshape([1, 1, seq_q, seq_k])
            .expand([batch, heads, seq_q, seq_k]);
        if let Some(pad) = key_padding {
            hidden = hidden.bool_or(
                pad.reshape([batch, 1, 1, seq_k])
                    .expand([batch, heads, seq_q, seq_k]),
            );
        }
        scores = scores.mask_fill(hidden, f32::NEG_INFINITY);
    }
    let max = scores.clone().max_dim(3);
    let max = max
        .clone()
        .mask_fill(max.equal_elem(f32::NEG_INFINITY), 0.0);
    let weights = (scores - max.clone()).exp();
    let sum = weights.clone().sum_dim(3);
    let probs = weights / sum.clone().clamp_min(smallest_normal(sum.dtype()));
    let out = probs.matmul(v);
    let lse = (max + sum.log()).squeeze_dim(3);
    (out, lse)
}
