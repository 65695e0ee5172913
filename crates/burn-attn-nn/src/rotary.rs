//! Rotary position embeddings (RoFormer) on the projected queries and keys, through
//! burn-nn's `RotaryEncoding`: each pair of a head's features is rotated by an angle
//! proportional to the token's position, so `q_i . k_j` depends on `i - j` only.
//! Positions are bottom-right aligned as the attention's bands are (the last query sits at
//! the last key's position), so decoding continues at the cache's next position and packed
//! documents see the same relative positions as alone.

use burn::nn::RotaryEncodingConfig;
use burn::tensor::Tensor;
use burn_attn_core::AttentionError;

use crate::projection::Heads;

/// Checks a rotary base: finite and positive, on an even head dim (features rotate in
/// pairs).
pub(crate) fn validate_rotary(theta: Option<f32>, head_dim: usize) -> Result<(), AttentionError> {
    match theta {
        Some(theta) if !(theta.is_finite() && theta > 0.0) => Err(AttentionError::Invalid(
            format!("rotary_theta must be finite and positive, got {theta}"),
        )),
        Some(_) if !head_dim.is_multiple_of(2) => Err(AttentionError::Invalid(format!(
            "rotary embeddings rotate feature pairs: head dim {head_dim} must be even"
        ))),
        _ => Ok(()),
    }
}

/// `x` (`[batch, heads, seq, head_dim]`) rotated as positions `start..start + seq` with
/// base `theta`, in `x`'s dtype.
pub(crate) fn rotate(x: Tensor<4>, start: usize, theta: f32) -> Tensor<4> {
    let [_, _, seq, dim] = x.dims();
    // A table of this call's positions only (`shift` moves its first row to `start`), so a
    // decoding step at position p costs O(seq * dim), not O(p * dim).
    let mut rope = RotaryEncodingConfig::new(seq.max(1), dim)
        .with_theta(theta)
        .init(&x.device());
    if start > 0 {
        rope.shift(start);
    }
    // burn-nn's tables take the device's default float type.
    let dtype = x.dtype();
    rope.apply(x.cast(rope.freq_complex.dtype()), 0).cast(dtype)
}

/// A call's heads with rotary embeddings (where `theta` is set): queries and keys
/// bottom-right aligned, the keys' positions from `start`.
pub(crate) fn rotate_heads(heads: Heads, theta: Option<f32>, start: usize) -> Heads {
    let Some(theta) = theta else { return heads };
    let (seq_q, seq_k) = (heads.q.dims()[2], heads.k.dims()[2]);
    let q_start = (start + seq_k).saturating_sub(seq_q);
    let k_start = start + seq_q.saturating_sub(seq_k);
    Heads {
        q: rotate(heads.q, q_start, theta),
        k: rotate(heads.k, k_start, theta),
        v: heads.v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::cpu;
    use burn::tensor::Distribution;

    /// Rotating from a late position with a table of the call's positions only equals
    /// burn-nn's table of every position up to them, bit for bit.
    #[test]
    fn a_late_start_equals_the_whole_table() {
        let x = Tensor::<4>::random([2, 3, 5, 8], Distribution::Normal(0.0, 1.0), &cpu());
        for start in [0, 3, 7, 1000] {
            let whole = RotaryEncodingConfig::new(start + 5, 8)
                .with_theta(100.0)
                .init(&cpu())
                .apply(x.clone(), start);
            let got = rotate(x.clone(), start, 100.0);
            let differ = whole.not_equal(got).int().sum().into_scalar::<i64>();
            assert_eq!(differ, 0, "start {start}: {differ} elements differ");
        }
    }
}
