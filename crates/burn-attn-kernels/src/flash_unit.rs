//! The portable FlashAttention forward kernel: no matrix units, one unit per query row.
//!
//! One cube handles `block_q` query rows of one (batch, head). It walks the key tiles of
//! the rows' band only (tiles outside it are never loaded), stages each `block_k x
//! head_dim` tile of K and V in shared memory (in the input dtype, to fit more keys),
//! and each unit keeps its query row, its output accumulator and its online-softmax state
//! in f32 registers/local memory. Tiles wholly inside the band of every row of the cube
//! take a path without the per-element mask.
//!
//! All band arithmetic is in `i32`: key `j` is visible to query `i` iff
//! `i + offset - left <= j <= i + offset + right` and `0 <= j < seq_k`, with
//! `offset = seq_k - seq_q` and unbounded sides encoded by the launcher as `seq_q + seq_k`.

use cubecl::prelude::*;

/// A finite stand-in for `-inf` as the running maximum: keeps every `exp` argument finite
/// (WGSL rejects infinite literals, and `-inf - -inf` would be NaN).
pub(crate) const NEG_BIG: f32 = -3.0e38;

/// Scores, softmax and `P V` for one staged key tile of `tile_len` keys starting at key
/// `t0`, for the query row `row`. With `masked`, keys outside the row's band get weight 0;
/// without it every key of the tile is known to be visible.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_step<F: Float>(
    q_row: &Array<f32>,
    acc: &mut Array<f32>,
    scores: &mut Array<f32>,
    k_tile: &SharedMemory<F>,
    v_tile: &SharedMemory<F>,
    state: &mut Array<f32>,
    t0: i32,
    tile_len: i32,
    lo: i32,
    hi: i32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_k: usize,
    #[comptime] masked: bool,
) {
    let mut m_tile = f32::new(NEG_BIG);
    for jj in 0..block_k {
        let mut dot = f32::new(0.0);
        let base = jj * dim;
        for d in 0..dim {
            dot += q_row[d] * f32::cast_from(k_tile[base + d]);
        }
        let mut s = dot;
        if masked {
            let j = t0 + jj as i32;
            if j < lo || j > hi || jj as i32 >= tile_len {
                s = f32::new(NEG_BIG);
            }
        }
        scores[jj] = s;
        m_tile = f32::max(m_tile, s);
    }

    let m_old = state[0];
    let m_new = f32::max(m_old, m_tile);
    // exp(NEG_BIG - finite) underflows to 0: the first visible key resets the sums.
    let alpha = f32::exp(m_old - m_new);
    let mut l = state[1] * alpha;
    for d in 0..value_dim {
        acc[d] = acc[d] * alpha;
    }
    for jj in 0..block_k {
        let s = scores[jj];
        let mut p = f32::exp(s - m_new);
        if masked {
            // Masked keys hold NEG_BIG; when the row has seen nothing yet m_new is NEG_BIG
            // too and exp would give 1, so zero them explicitly.
            if s <= f32::new(NEG_BIG) {
                p = f32::new(0.0);
            }
        }
        l += p;
        let base = jj * value_dim;
        for d in 0..value_dim {
            acc[d] += p * f32::cast_from(v_tile[base + d]);
        }
    }
    state[0] = m_new;
    state[1] = l;
}

/// Cooperatively stages rows `t0 .. t0 + rows` of one head of `src` (`[b, h, n, d]`, any
/// strides) into `tile` as a dense `rows x dim` block; rows past `n` are zeros. `units` is
/// the number of units of the cube (shared with the backward kernels).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows<F: Float>(
    src: &Tensor<F>,
    tile: &mut SharedMemory<F>,
    base: usize,
    t0: usize,
    n: usize,
    #[comptime] dim: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
) {
    let stride_n = src.stride(2);
    let stride_d = src.stride(3);
    let mut idx = UNIT_POS_X as usize;
    while idx < rows * dim {
        let r = idx / dim;
        let c = idx % dim;
        let j = t0 + r;
        let mut val = F::new(0.0);
        if j < n {
            val = src[base + j * stride_n + c * stride_d];
        }
        tile[idx] = val;
        idx += units;
    }
}

/// FlashAttention forward without matrix units.
///
/// Launch with `CubeDim::new_1d(block_q)` and `CubeCount::Static(ceil(seq_q / block_q),
/// batch * heads, 1)`. `out` is `[b, h, seq_q, value_dim]` in the input dtype, `lse` is
/// `[b, h, seq_q]` in f32. `neg_inf` must be `f32::NEG_INFINITY` (passed at run time because
/// WGSL has no infinite literal).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    left: i32,
    right: i32,
    neg_inf: f32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[define(F)] _dtype: StorageType,
) {
    let heads = q.shape(1);
    let seq_q = q.shape(2);
    let kv_heads = k.shape(1);
    let seq_k = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let kvh = h / (heads / kv_heads);

    let r0 = CUBE_POS_X as usize * block_q;
    let row = r0 + UNIT_POS_X as usize;
    let row_ok = row < seq_q;
    let r_last = min(r0 + block_q, seq_q) - 1;
    let offset = seq_k as i32 - seq_q as i32;

    // The row's band, and the union of the band over the cube's rows (contiguous, since
    // both edges grow with the row).
    let lo = row as i32 + offset - left;
    let hi = row as i32 + offset + right;
    let k_start = max(r0 as i32 + offset - left, 0);
    let k_end = min(r_last as i32 + offset + right + 1, seq_k as i32);
    // Every key of [full_lo, full_hi] is visible to every row of the cube.
    let full_lo = r_last as i32 + offset - left;
    let full_hi = r0 as i32 + offset + right;
    let block_full = r0 + block_q <= seq_q;

    let mut q_row = Array::<f32>::new(dim);
    let mut acc = Array::<f32>::new(value_dim);
    let mut scores = Array::<f32>::new(block_k);
    let mut state = Array::<f32>::new(2usize);
    let q_base = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    for d in 0..dim {
        let mut x = f32::new(0.0);
        if row_ok {
            x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
        }
        q_row[d] = x;
    }
    for d in 0..value_dim {
        acc[d] = f32::new(0.0);
    }
    state[0] = f32::new(NEG_BIG);
    state[1] = f32::new(0.0);

    let mut k_tile = SharedMemory::<F>::new(block_k * dim);
    let mut v_tile = SharedMemory::<F>::new(block_k * value_dim);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);

    let mut t0 = k_start;
    while t0 < k_end {
        stage_rows::<F>(
            k,
            &mut k_tile,
            k_base,
            usize::cast_from(t0),
            seq_k,
            dim,
            block_k,
            block_q,
        );
        stage_rows::<F>(
            v,
            &mut v_tile,
            v_base,
            usize::cast_from(t0),
            seq_k,
            value_dim,
            block_k,
            block_q,
        );
        sync_cube();
        let tile_len = min(k_end - t0, block_k as i32);
        let tile_full = block_full
            && tile_len == block_k as i32
            && t0 >= full_lo
            && t0 + block_k as i32 - 1 <= full_hi;
        if tile_full {
            tile_step::<F>(
                &q_row,
                &mut acc,
                &mut scores,
                &k_tile,
                &v_tile,
                &mut state,
                t0,
                tile_len,
                lo,
                hi,
                dim,
                value_dim,
                block_k,
                false,
            );
        } else {
            tile_step::<F>(
                &q_row,
                &mut acc,
                &mut scores,
                &k_tile,
                &v_tile,
                &mut state,
                t0,
                tile_len,
                lo,
                hi,
                dim,
                value_dim,
                block_k,
                true,
            );
        }
        sync_cube();
        t0 += block_k as i32;
    }

    if row_ok {
        let l = state[1];
        let o_base = b * out.stride(0) + h * out.stride(1) + row * out.stride(2);
        let lse_idx = b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2);
        if l > f32::new(0.0) {
            let inv = f32::new(1.0) / l;
            for d in 0..value_dim {
                out[o_base + d * out.stride(3)] = F::cast_from(acc[d] * inv);
            }
            lse[lse_idx] = state[0] + f32::ln(l);
        } else {
            for d in 0..value_dim {
                out[o_base + d * out.stride(3)] = F::new(0.0);
            }
            lse[lse_idx] = neg_inf;
        }
    }
}
