//! The product step of the portable kernels: a unit's register tile of a product of two
//! shared-memory operands, no matrix units.
//!
//! A cube of `row_threads x col_threads` units splits a `rows x cols` product so that unit
//! `(ty, tx)` owns rows `ty + a * row_threads` and columns `tx + c * col_threads`: the units
//! of a warp then read one or two distinct operand rows (broadcast) and consecutive operand
//! columns (distinct banks), and every value a unit loads feeds several multiply-adds.

use cubecl::prelude::*;

/// `acc[a * cols + c] += sum over kk < depth of A(row a, kk) * B(kk, column c)` (with
/// `fresh`, `=`: the tile is zeroed first) for one
/// unit's register tile, with row `a` = `row0 + a * row_step`, column `c` = `col0 + c *
/// col_step`, `A(r, kk) = a_mem[kk * a_k + r * a_r]` and `B(kk, n) = b_mem[kk * b_k + n *
/// b_c]` (so either operand may be stored transposed). Columns at or past `col_limit`
/// read 0 (the caller must not store them). The loop over `kk` runs; the loops over the
/// tile are unrolled, so `acc` is indexed by constants only.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_product<FA: Float, FB: Float>(
    acc: &mut Array<f32>,
    a_mem: &[FA],
    b_mem: &[FB],
    row0: usize,
    col0: usize,
    #[comptime] depth: usize,
    #[comptime] a_k: usize,
    #[comptime] a_r: usize,
    #[comptime] b_k: usize,
    #[comptime] b_c: usize,
    #[comptime] rows: usize,
    #[comptime] row_step: usize,
    #[comptime] cols: usize,
    #[comptime] col_step: usize,
    #[comptime] col_limit: usize,
    #[comptime] fresh: bool,
) {
    if fresh {
        #[unroll]
        for i in 0..comptime!(rows * cols) {
            acc[i] = f32::new(0.0);
        }
    }
    let mut a_frag = Array::<f32>::new(rows);
    let mut b_frag = Array::<f32>::new(cols);
    let a_first = row0 * a_r;
    let b_first = col0 * b_c;
    for kk in 0..depth {
        let a_at = kk * a_k + a_first;
        let b_at = kk * b_k + b_first;
        #[unroll]
        for a in 0..rows {
            a_frag[a] = f32::cast_from(a_mem[a_at + a * comptime!(row_step * a_r)]);
        }
        #[unroll]
        for c in 0..cols {
            if comptime!(cols * col_step <= col_limit) {
                b_frag[c] = f32::cast_from(b_mem[b_at + c * comptime!(col_step * b_c)]);
            } else {
                let mut x = f32::new(0.0);
                if col0 + c * col_step < col_limit {
                    x = f32::cast_from(b_mem[b_at + c * comptime!(col_step * b_c)]);
                }
                b_frag[c] = x;
            }
        }
        #[unroll]
        for a in 0..rows {
            #[unroll]
            for c in 0..cols {
                acc[a * cols + c] += a_frag[a] * b_frag[c];
            }
        }
    }
}
