//! The portable FlashAttention backward kernels (v2): no matrix units, no atomics,
//! register tiles.
//!
//! FlashAttention-2's scheme, recomputing the probabilities `P = exp(scale * q . k - lse)`
//! tile by tile from the forward's saved row log-sum-exp, with every product a register-tile
//! product of two shared-memory operands ([`tile_product`], as the forward kernel):
//! - [`flash_unit_backward_dq_kernel`], query-major: a cube of `block_q` query rows keeps
//!   its Q and dO rows in shared memory, computes `D_i = rowsum(dO_i * O_i)` (written out
//!   for the second kernel) and walks the key tiles of its rows' band: per tile `dP = dO
//!   V^T` (V staged first), then `S = Q K^T` (K staged into the buffer V used), `dS = P
//!   (dP - D)` through shared memory, and `dQ += dS K` into each unit's register tile.
//! - [`flash_unit_backward_dkdv_kernel`], key-major: a cube of `block_k` keys of one kv head
//!   keeps its K and V rows in shared memory and walks, for every query head that shares
//!   the kv head (GQA/MQA, summed inside the kernel so no two cubes write the same
//!   gradient row), the query tiles whose band can contain one of its keys: per tile `S^T
//!   = K Q^T` and `dP^T = V dO^T`, then `P^T` and `dS^T` through shared memory, `dV += P^T
//!   dO` and `dK += dS^T Q`.
//!
//! Each unit owns its output elements and sums them in a fixed order: two runs give the same
//! bits. Band arithmetic is `i32` as in the forward kernel (`flash_unit.rs`): key `j` is
//! visible to query `i` iff `i + offset - left <= j <= i + offset + right` and
//! `0 <= j < seq_k`, `offset = seq_k - seq_q`, unbounded sides encoded by the launch as
//! `seq_q + seq_k`. Rows whose lse is `-inf` (no visible key) contribute nothing; a NaN lse
//! makes its row's gradients NaN.

use cubecl::prelude::*;

use crate::components::band::BandBounds;
use crate::components::register_tile::tile_product;
use crate::components::schedule::CubeHead;
use crate::components::softmax::{has_probabilities, NEG_BIG};
use crate::components::staging::stage_rows;

/// Query-major backward: `D = rowsum(dO * O)` and `dQ`.
///
/// Launch with `CubeDim::new_1d(row_threads * col_threads)` and `CubeCount::Static(ceil(seq_q
/// / block_q), batch * heads, 1)`; `row_threads` divides `block_q`, `col_threads` divides
/// `block_k`. `dq` is `[b, h, seq_q, head_dim]` in the input dtype, `delta` is `[b, h,
/// seq_q]` in f32 (read by [`flash_unit_backward_dkdv_kernel`]).
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_backward_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    scale: f32,
    left: i32,
    right: i32,
    heavy_first: u32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let rq = comptime!(block_q / row_threads);
    let rk = comptime!(block_k / col_threads);
    let rd = comptime!(dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let q_stride = comptime!(block_q + 1);
    let k_stride = comptime!(block_k + 1);

    let cube = CubeHead::query_major(q, k, heavy_first);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;

    let r0 = cube.block * block_q;
    // The band of this unit's first row (its a-th row is a * row_threads further).
    let lo0 = (r0 + ty) as i32 + offset - left;
    let hi0 = (r0 + ty) as i32 + offset + right;
    // Keys any row of the cube can see (its one plane is the whole cube).
    let bounds = BandBounds::new(r0, r0, seq_q, seq_k, offset, left, right, block_q, block_q);

    let mut q_t = Shared::<[F]>::new_slice(comptime!(dim * q_stride));
    let mut do_t = Shared::<[F]>::new_slice(comptime!(value_dim * q_stride));
    // V (transposed) and then K (transposed) of the current key tile.
    let mut kv = Shared::<[F]>::new_slice(comptime!(usize::max(dim, value_dim) * k_stride));
    let mut ds_tile = Shared::<[f32]>::new_slice(comptime!(block_q * k_stride));
    let mut lse_tile = Shared::<[f32]>::new_slice(block_q);
    let mut d_tile = Shared::<[f32]>::new_slice(block_q);

    let q_base = b * q.stride(0) + h * q.stride(1);
    let do_base = b * d_out.stride(0) + h * d_out.stride(1);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);
    stage_rows::<F>(q, &mut q_t, q_base, r0, seq_q, dim, block_q, units, true);
    stage_rows::<F>(
        d_out, &mut do_t, do_base, r0, seq_q, value_dim, block_q, units, true,
    );
    // D and lse per row (rows past seq_q: 0 and NEG_BIG, so they get no probabilities).
    let mut idx = UNIT_POS_X as usize;
    while idx < block_q {
        let row = r0 + idx;
        let mut d_i = f32::new(0.0);
        let mut lse_i = f32::new(NEG_BIG);
        if row < seq_q {
            let o_at = b * out.stride(0) + h * out.stride(1) + row * out.stride(2);
            let g_at = do_base + row * d_out.stride(2);
            for c in 0..value_dim {
                d_i += f32::cast_from(d_out[g_at + c * d_out.stride(3)])
                    * f32::cast_from(out[o_at + c * out.stride(3)]);
            }
            lse_i = lse[b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2)];
            let at = b * delta.stride(0) + h * delta.stride(1) + row * delta.stride(2);
            delta[at] = d_i;
        }
        d_tile[idx] = d_i;
        lse_tile[idx] = lse_i;
        idx += units;
    }

    let mut s = Array::<f32>::new(comptime!(rq * rk));
    let mut dp = Array::<f32>::new(comptime!(rq * rk));
    let mut dq_acc = Array::<f32>::new(comptime!(rq * rd));
    #[unroll]
    for i in 0..comptime!(rq * rd) {
        dq_acc[i] = f32::new(0.0);
    }

    let mut t0 = bounds.start;
    while t0 < bounds.end {
        let start = usize::cast_from(t0);
        // dP = dO V^T over the value dim.
        stage_rows::<F>(
            v, &mut kv, v_base, start, seq_k, value_dim, block_k, units, true,
        );
        sync_cube();
        tile_product::<F, F>(
            &mut dp,
            &do_t,
            &kv,
            ty,
            tx,
            value_dim,
            q_stride,
            1usize,
            k_stride,
            1usize,
            rq,
            row_threads,
            rk,
            col_threads,
            block_k,
            true,
        );
        sync_cube();
        // S = Q K^T over the head dim; K stays for dQ.
        stage_rows::<F>(k, &mut kv, k_base, start, seq_k, dim, block_k, units, true);
        sync_cube();
        tile_product::<F, F>(
            &mut s,
            &q_t,
            &kv,
            ty,
            tx,
            dim,
            q_stride,
            1usize,
            k_stride,
            1usize,
            rq,
            row_threads,
            rk,
            col_threads,
            block_k,
            true,
        );
        // dS = P (dP - D), zero outside the band, past seq_k and on rows without keys.
        #[unroll]
        for a in 0..rq {
            let r = ty + a * row_threads;
            let shift = (a * row_threads) as i32;
            let lse_i = lse_tile[r];
            let d_i = d_tile[r];
            #[unroll]
            for c in 0..rk {
                let key = tx + c * col_threads;
                let j = t0 + key as i32;
                let mut ds = f32::new(0.0);
                if j >= lo0 + shift
                    && j <= hi0 + shift
                    && j < seq_k as i32
                    && has_probabilities(lse_i)
                {
                    let p = f32::exp(s[a * rk + c] * scale - lse_i);
                    ds = p * (dp[a * rk + c] - d_i);
                }
                ds_tile[r * k_stride + key] = ds;
            }
        }
        sync_cube();
        // dQ += dS K: K as [key][d] read from its transposed tile.
        tile_product::<f32, F>(
            &mut dq_acc,
            &ds_tile,
            &kv,
            ty,
            tx,
            block_k,
            1usize,
            k_stride,
            1usize,
            k_stride,
            rq,
            row_threads,
            rd,
            col_threads,
            dim,
            false,
        );
        sync_cube();
        t0 += block_k as i32;
    }

    #[unroll]
    for a in 0..rq {
        let row = r0 + ty + a * row_threads;
        if row < seq_q {
            let dq_at = b * dq.stride(0) + h * dq.stride(1) + row * dq.stride(2);
            #[unroll]
            for e in 0..rd {
                let c = tx + e * col_threads;
                if c < dim {
                    let at = dq_at + c * dq.stride(3);
                    dq[at] = F::cast_from(dq_acc[a * rd + e] * scale);
                }
            }
        }
    }
}

/// Key-major backward: `dK` and `dV`, summed over the query heads of each kv head.
///
/// Launch with `CubeDim::new_1d(row_threads * col_threads)` and `CubeCount::Static(ceil(seq_k
/// / block_k), batch * kv_heads, 1)`, after [`flash_unit_backward_dq_kernel`] has written
/// `delta`; `row_threads` divides `block_k` (the cube's keys), `col_threads` divides
/// `block_q` (the query rows staged per tile). `dk` is `[b, kv_heads, seq_k, head_dim]` and
/// `dv` `[b, kv_heads, seq_k, value_dim]` in the input dtype.
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_backward_dkdv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    left: i32,
    right: i32,
    heavy_first: u32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_k: usize,
    #[comptime] block_q: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let rk = comptime!(block_k / row_threads);
    let rq = comptime!(block_q / col_threads);
    let rd = comptime!(dim.div_ceil(col_threads));
    let rv = comptime!(value_dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let k_stride = comptime!(block_k + 1);
    let q_stride = comptime!(block_q + 1);

    let cube = CubeHead::key_major(q, k, heavy_first);
    let (b, kvh, group) = (cube.batch, cube.kv_head, cube.group);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;

    let c0 = cube.block * block_k;
    // Query i sees this unit's first key j = c0 + ty iff i_lo0 <= i <= i_hi0 (its a-th key
    // is a * row_threads further, and so is its range).
    let i_lo0 = (c0 + ty) as i32 - offset - right;
    let i_hi0 = (c0 + ty) as i32 - offset + left;
    // Query rows that can see any key of the cube (the band transposed).
    let bounds = BandBounds::new(c0, c0, seq_k, seq_q, -offset, right, left, block_k, block_k);

    let mut k_t = Shared::<[F]>::new_slice(comptime!(dim * k_stride));
    let mut v_t = Shared::<[F]>::new_slice(comptime!(value_dim * k_stride));
    let mut q_t = Shared::<[F]>::new_slice(comptime!(dim * q_stride));
    let mut do_t = Shared::<[F]>::new_slice(comptime!(value_dim * q_stride));
    let mut p_tile = Shared::<[f32]>::new_slice(comptime!(block_k * q_stride));
    let mut ds_tile = Shared::<[f32]>::new_slice(comptime!(block_k * q_stride));
    let mut lse_tile = Shared::<[f32]>::new_slice(block_q);
    let mut d_tile = Shared::<[f32]>::new_slice(block_q);

    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);
    stage_rows::<F>(k, &mut k_t, k_base, c0, seq_k, dim, block_k, units, true);
    stage_rows::<F>(
        v, &mut v_t, v_base, c0, seq_k, value_dim, block_k, units, true,
    );

    let mut st = Array::<f32>::new(comptime!(rk * rq));
    let mut dpt = Array::<f32>::new(comptime!(rk * rq));
    let mut dk_acc = Array::<f32>::new(comptime!(rk * rd));
    let mut dv_acc = Array::<f32>::new(comptime!(rk * rv));
    #[unroll]
    for i in 0..comptime!(rk * rd) {
        dk_acc[i] = f32::new(0.0);
    }
    #[unroll]
    for i in 0..comptime!(rk * rv) {
        dv_acc[i] = f32::new(0.0);
    }

    // The query heads of this kv head, in a fixed order.
    for g in 0..group {
        let h = kvh * group + g;
        let q_base = b * q.stride(0) + h * q.stride(1);
        let do_base = b * d_out.stride(0) + h * d_out.stride(1);
        let lse_base = b * lse.stride(0) + h * lse.stride(1);
        let delta_base = b * delta.stride(0) + h * delta.stride(1);
        let mut t0 = bounds.start;
        while t0 < bounds.end {
            let start = usize::cast_from(t0);
            stage_rows::<F>(q, &mut q_t, q_base, start, seq_q, dim, block_q, units, true);
            stage_rows::<F>(
                d_out, &mut do_t, do_base, start, seq_q, value_dim, block_q, units, true,
            );
            let mut idx = UNIT_POS_X as usize;
            while idx < block_q {
                let i = start + idx;
                let mut lse_i = f32::new(NEG_BIG);
                let mut d_i = f32::new(0.0);
                if i < seq_q {
                    lse_i = lse[lse_base + i * lse.stride(2)];
                    d_i = delta[delta_base + i * delta.stride(2)];
                }
                lse_tile[idx] = lse_i;
                d_tile[idx] = d_i;
                idx += units;
            }
            sync_cube();

            // S^T = K Q^T and dP^T = V dO^T: keys ty + a * row_threads, query rows
            // tx + c * col_threads of the tile.
            tile_product::<F, F>(
                &mut st,
                &k_t,
                &q_t,
                ty,
                tx,
                dim,
                k_stride,
                1usize,
                q_stride,
                1usize,
                rk,
                row_threads,
                rq,
                col_threads,
                block_q,
                true,
            );
            tile_product::<F, F>(
                &mut dpt,
                &v_t,
                &do_t,
                ty,
                tx,
                value_dim,
                k_stride,
                1usize,
                q_stride,
                1usize,
                rk,
                row_threads,
                rq,
                col_threads,
                block_q,
                true,
            );
            // P^T and dS^T = P^T (dP^T - D), zero outside the band, past seq_q and the
            // cube's keys, and on rows without keys.
            #[unroll]
            for a in 0..rk {
                let key = ty + a * row_threads;
                let shift = (a * row_threads) as i32;
                let key_ok = c0 + key < seq_k;
                #[unroll]
                for c in 0..rq {
                    let qi = tx + c * col_threads;
                    let i = t0 + qi as i32;
                    let lse_i = lse_tile[qi];
                    let mut p = f32::new(0.0);
                    let mut ds = f32::new(0.0);
                    if key_ok
                        && i >= i_lo0 + shift
                        && i <= i_hi0 + shift
                        && i < bounds.end
                        && has_probabilities(lse_i)
                    {
                        p = f32::exp(st[a * rq + c] * scale - lse_i);
                        ds = p * (dpt[a * rq + c] - d_tile[qi]);
                    }
                    p_tile[key * q_stride + qi] = p;
                    ds_tile[key * q_stride + qi] = ds;
                }
            }
            sync_cube();
            // dV += P^T dO and dK += dS^T Q: dO and Q as [row][col] read from their
            // transposed tiles.
            tile_product::<f32, F>(
                &mut dv_acc,
                &p_tile,
                &do_t,
                ty,
                tx,
                block_q,
                1usize,
                q_stride,
                1usize,
                q_stride,
                rk,
                row_threads,
                rv,
                col_threads,
                value_dim,
                false,
            );
            tile_product::<f32, F>(
                &mut dk_acc,
                &ds_tile,
                &q_t,
                ty,
                tx,
                block_q,
                1usize,
                q_stride,
                1usize,
                q_stride,
                rk,
                row_threads,
                rd,
                col_threads,
                dim,
                false,
            );
            sync_cube();
            t0 += block_q as i32;
        }
    }

    #[unroll]
    for a in 0..rk {
        let key = c0 + ty + a * row_threads;
        if key < seq_k {
            let dk_at = b * dk.stride(0) + kvh * dk.stride(1) + key * dk.stride(2);
            let dv_at = b * dv.stride(0) + kvh * dv.stride(1) + key * dv.stride(2);
            #[unroll]
            for e in 0..rd {
                let c = tx + e * col_threads;
                if c < dim {
                    let at = dk_at + c * dk.stride(3);
                    dk[at] = F::cast_from(dk_acc[a * rd + e] * scale);
                }
            }
            #[unroll]
            for e in 0..rv {
                let c = tx + e * col_threads;
                if c < value_dim {
                    let at = dv_at + c * dv.stride(3);
                    dv[at] = F::cast_from(dv_acc[a * rv + e]);
                }
            }
        }
    }
}
