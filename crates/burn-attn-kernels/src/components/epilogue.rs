//! Epilogues of the matrix-unit kernels: accumulator rows staged through shared memory and
//! written to global memory with vector stores, and the forward's normalised output rows
//! with their log-sum-exp.

use cubecl::prelude::*;

use super::fragments::{acc_get, MmaVecAcc};

/// Stores a plane's block of results from shared memory to `out`: `rows` rows from
/// `smem[s_at..]` (row stride `s_stride`) to rows `row0..` of `out` (from `o_base`, row
/// stride `o_row_stride`, unit column stride), columns `0..cols`, skipping rows past
/// `n_rows`. Consecutive lanes take consecutive `N`-value chunks of a row, one store each
/// (16 bytes at N = 8 in 16-bit types); `N` must divide `cols` and `o_row_stride`, so no
/// chunk straddles a row end and every chunk starts at a multiple of `N`. The caller
/// synchronises the plane after writing the block.
///
/// (The fragments' own layout would take one 2-byte store per value at scattered rows:
/// that epilogue held 12% of the forward's stall samples at n = 1024 on the H200.)
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_plane_rows<F: Float, N: Size>(
    smem: &[F],
    s_at: usize,
    #[comptime] s_stride: usize,
    out: &mut Tensor<Vector<F, N>>,
    o_base: usize,
    o_row_stride: usize,
    row0: usize,
    n_rows: usize,
    cols: usize,
    lane: usize,
    #[comptime] rows: usize,
    #[comptime] cols_pad: usize,
) {
    let vs = N::value().comptime();
    let chunks = comptime!(cols_pad / vs);
    // rows * chunks is a multiple of 32: rows a multiple of 16, chunks even (cols_pad a
    // multiple of 16 with N <= 8 in 16-bit types, of 8 with N <= 4 in f32). The N scalar
    // shared loads of a chunk compile to one 16-byte load (SASS of the forward: 16 LDS and
    // 16 STG per lane at d = 128).
    #[unroll]
    for i in 0..comptime!(rows * chunks / 32) {
        let idx = i * 32 + lane;
        let r = idx / chunks;
        let col = (idx % chunks) * vs;
        let row = row0 + r;
        if row < n_rows && col < cols {
            let at = s_at + r * s_stride + col;
            let mut vector = Vector::empty();
            #[unroll]
            for n in 0..vs {
                vector.insert_dynamic(n, smem[at + n]);
            }
            out[(o_base + row * o_row_stride + col) / vs] = vector;
        }
    }
}

/// The matrix-unit forwards' epilogue (`flash_mma_kernel`, with either of its products): each
/// row's sum over its group's four lanes, the normalised output rows and the log-sum-exp
/// (`neg_inf` for rows that saw no key, whose output is 0). Where an output row fits in a
/// Q row of shared memory (`value_dim_pad <= dim_pad`), each plane writes its rows over
/// its own Q rows (which only it reads) and stores them `N` values per lane and
/// instruction along rows ([`store_plane_rows`]); otherwise one value at a time (`N` = 1,
/// the launchers' choice). Arguments as in the kernels: `w0` the plane's first row,
/// `q_stride` the Q rows' shared-memory stride, `c_vs` the accumulator vector size.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_output_rows<F: Float, N: Size>(
    o_acc: &Array<Vector<f32, MmaVecAcc>>,
    m_row: &Array<f32>,
    l_row: &Array<f32>,
    q_smem: &mut [F],
    out: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    b: usize,
    h: usize,
    w0: usize,
    warp: usize,
    lane: usize,
    seq_q: usize,
    value_dim: usize,
    neg_inf: f32,
    #[comptime] m_tiles: usize,
    #[comptime] q_stride: usize,
    #[comptime] c_vs: usize,
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] async_copy: bool,
) {
    let g = lane / 4;
    let t = lane % 4;
    let plane_q = comptime!(16 * m_tiles);
    let halves = comptime!(2 * m_tiles);
    let v_tiles = comptime!(value_dim_pad / 8);
    // The strides are read once (the compiler cannot keep them across stores to the
    // output, which might alias the buffer holding them, and reloaded them per element).
    let o_base = b * out.stride(0) + h * out.stride(1);
    let o_row_stride = out.stride(2);
    let lse_base = b * lse.stride(0) + h * lse.stride(1);
    let lse_row_stride = lse.stride(2);
    // Staged where an output row fits in a Q row: the fragments' own layout would take
    // one 2-byte store per value at scattered rows, which held 12% of the stall samples
    // at n = 1024.
    let staged = comptime!(value_dim_pad <= dim_pad);
    if comptime!(staged && !async_copy) {
        // With synchronous staging and no key tile, other planes' Q writes may still be
        // landing in this plane's rows. (Asynchronous staging copies Q only with a key
        // tile, and every tile ends with a cube barrier after its copies were waited for.)
        sync_cube();
    }
    #[unroll]
    for hf in 0..halves {
        let mut l = l_row[hf];
        l += plane_shuffle_xor(l, 1);
        l += plane_shuffle_xor(l, 2);
        let row = w0 + g + 8 * hf;
        // `l` is 0 exactly where the row saw no key (output 0, lse -inf); a NaN in what
        // the row sees makes `l`, the output row and the lse NaN.
        let dead = l == f32::new(0.0);
        let mut inv = f32::new(0.0);
        if !dead {
            inv = f32::new(1.0) / l;
        }
        // Row 8 hf + g of the plane (row tile hf / 2, accumulator elements 2 (hf % 2) + e).
        let s_row = (warp * plane_q + 8 * hf + g) * q_stride;
        #[unroll]
        for vt in 0..v_tiles {
            #[unroll]
            for e in 0..2usize {
                let col = vt * 8 + 2 * t + e;
                let tile = (hf / 2) * v_tiles + vt;
                let o = F::cast_from(acc_get(o_acc, tile, (hf % 2) * 2 + e, c_vs) * inv);
                if comptime!(staged) {
                    q_smem[s_row + col] = o;
                } else if row < seq_q && col < value_dim {
                    // N = 1 here (the launchers' choice).
                    out[o_base + row * o_row_stride + col] = Vector::new(o);
                }
            }
        }
        if row < seq_q && t == 0 {
            let lse_idx = lse_base + row * lse_row_stride;
            if dead {
                lse[lse_idx] = neg_inf;
            } else {
                lse[lse_idx] = m_row[hf] + f32::ln(l);
            }
        }
    }
    if comptime!(staged) {
        sync_plane();
        store_plane_rows::<F, N>(
            &*q_smem,
            warp * plane_q * q_stride,
            q_stride,
            out,
            o_base,
            o_row_stride,
            w0,
            seq_q,
            value_dim,
            lane,
            plane_q,
            value_dim_pad,
        );
    }
}

/// Writes a plane's 16-row accumulator block (`tiles` tiles of 8 columns), times `scale`,
/// into shared memory rows `at..` (row stride `stride`) in the input dtype, for
/// [`store_plane_rows`]: lane (`g`, `t`) holds rows `g` and `g + 8`, columns `8 tile + 2 t`
/// and the next.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn acc_rows_to_smem<F: Float>(
    acc: &Array<Vector<f32, MmaVecAcc>>,
    scale: f32,
    smem: &mut [F],
    at: usize,
    #[comptime] stride: usize,
    g: usize,
    t: usize,
    #[comptime] tiles: usize,
    #[comptime] c_vs: usize,
) {
    #[unroll]
    for hf in 0..2usize {
        let row = at + (g + 8 * hf) * stride;
        #[unroll]
        for tile in 0..tiles {
            #[unroll]
            for e in 0..2usize {
                let x = acc_get(acc, tile, hf * 2 + e, c_vs) * scale;
                smem[row + tile * 8 + 2 * t + e] = F::cast_from(x);
            }
        }
    }
}
