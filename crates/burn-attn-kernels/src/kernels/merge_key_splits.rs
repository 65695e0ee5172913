//! Merges the partial rows of a forward split over its keys (`flash_unit` with key splits):
//! each split's rows are normalised over its own keys, with their log-sum-exp, so the whole
//! row is their average weighted by `exp(lse_split - lse)`, and its lse the log-sum-exp of
//! theirs. A split that saw no key of a row (lse `-inf`) weighs 0; a row no split saw is 0
//! with lse `-inf`; a NaN in any split's lse makes the row NaN.

use cubecl::prelude::*;

/// Merges `parts` (`[splits * batch, heads, seq_q, value_dim]`, contiguous, split-major)
/// and `part_lse` (`[splits * batch, heads, seq_q]`) into `out` (`[batch, heads, seq_q,
/// value_dim]`, contiguous) and `lse`. Launch one unit per element of `out` (1-d, any cube
/// size). `neg_inf` must be `f32::NEG_INFINITY` (WGSL has no infinite literal).
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // the NaN test
pub fn merge_key_splits_kernel<F: Float>(
    parts: &Tensor<F>,
    part_lse: &Tensor<f32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    splits: u32,
    neg_inf: f32,
    #[define(F)] _dtype: ElemType,
) {
    let rows = lse.len();
    let cols = out.shape(3);
    let at = ABSOLUTE_POS;
    if at >= rows * cols {
        terminate!();
    }
    let (row, col) = (at / cols, at % cols);
    let mut most = neg_inf;
    let mut nan = false;
    // A NaN lse, kept to write (WGSL has no NaN literal).
    let mut a_nan = f32::new(0.0);
    for s in 0..splits as usize {
        let l = part_lse[s * rows + row];
        // NaN compares false: every other value, -inf included, is >= -inf.
        if !(l >= neg_inf) {
            nan = true;
            a_nan = l;
        }
        most = f32::max(most, l);
    }
    let mut value = f32::new(0.0);
    let mut row_lse = neg_inf;
    if nan {
        value = a_nan;
        row_lse = a_nan;
    } else if most > neg_inf {
        let mut weight = f32::new(0.0);
        let mut sum = f32::new(0.0);
        for s in 0..splits as usize {
            let w = f32::exp(part_lse[s * rows + row] - most);
            weight += w;
            sum += w * f32::cast_from(parts[(s * rows + row) * cols + col]);
        }
        value = sum / weight;
        row_lse = most + f32::ln(weight);
    }
    out[at] = F::cast_from(value);
    if col == 0 {
        lse[row] = row_lse;
    }
}
