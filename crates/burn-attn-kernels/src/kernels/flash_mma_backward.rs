//! The matrix-unit FlashAttention backward kernels (CUDA `mma.sync.m16n8k16`, f16/bf16).
//!
//! FlashAttention-2's split into two kernels, as in the portable backward
//! (`flash_unit_backward`), with every product on the matrix units and the probabilities
//! `P = exp(scale * S - lse)` recomputed tile by tile from the forward's row log-sum-exp:
//! - [`flash_mma_backward_dq_kernel`], query-major: each plane owns 16 query rows, computes
//!   their `D = rowsum(dO * O)` (written out for the second kernel), and per key tile
//!   `S = Q K^T`, `dP = dO V^T`, `dS = P * (dP - D)` and `dQ += dS K`.
//! - [`flash_mma_backward_dkdv_kernel`], key-major: each plane owns 16 key rows of one kv
//!   head and, for every query head sharing that kv head (GQA/MQA summed inside the kernel)
//!   and every query tile whose band reaches the cube's keys, computes the transposed
//!   products `S^T = K Q^T`, `dP^T = V dO^T`, `dS^T = P^T * (dP^T - D)`, `dV += P^T dO` and
//!   `dK += dS^T Q`.
//!
//! Fragments come from shared memory with `ldmatrix` exactly as in the forward
//! (`flash_mma`): tiles are `[row][d]` with rows padded by 16 bytes; `A B^T` products take
//! both operands' rows non-transposed (like the forward's `Q K^T`); `A B` products take `A`
//! straight from accumulator registers (two `n8` accumulator tiles are the `A` fragment of
//! one `k16` chunk, like the forward's `P`) and `B` with `ldmatrix.trans` (like the
//! forward's `V`), so `P` and `dS` never leave registers. The accumulator element `e` of
//! lane `l` sits at row `l / 4 + 8 * (e / 2)` and column `2 * (l % 4) + e % 2` of its
//! `16 x 8` tile: rows are the plane's own rows (queries in the dQ kernel, keys in the
//! dK/dV kernel), columns the streamed tile's (keys, respectively queries), so the dK/dV
//! kernel reads the lse and `D` of a column from shared memory.
//!
//! Every gradient row is accumulated in f32 registers by one plane, each element written
//! by one lane, in a fixed order: no atomics, two runs give the same bits. The dK/dV kernel
//! keeps both gradients' accumulators (`dim_pad / 2 + value_dim_pad / 2` f32 per lane), so
//! the plan takes head and value dims up to 128 only (larger ones run the portable
//! kernels).
//!
//! Staging (each kernel's comptime `async_copy`) is the forward's pipeline
//! (`components::pipeline`): 16-byte `cp.async` copies into two buffers of the streamed
//! tiles (K and V in the dQ kernel, Q and dO in the dK/dV kernel), one barrier per buffer,
//! the next tile's copies in flight while the current one is computed; the cube's own tiles
//! (Q and dO, respectively K and V) are copied once, with the first streamed tile. The dK/dV
//! kernel's f32 lse and `D` of the streamed tile are double-buffered too (loaded a step
//! ahead, stored with plain stores). It needs contiguous 16-byte aligned rows and head/value
//! dims that are multiples of 8 (the plan checks). Without it: plain loads into one
//! buffer, two cube barriers per tile.
//!
//! Band arithmetic is `components::band`'s (the dK/dV kernel's transposed). Rows that see no key (lse
//! `-inf`) and padding rows take [`DEAD_LSE`] as their lse, so their probabilities, and with
//! them their gradient contributions, are exactly 0.

use cubecl::cmma::MatrixIdent;
use cubecl::prelude::*;

use crate::components::band::BandBounds;
use crate::components::exp::{softmax_exp, MMA_PTX};
use crate::components::fragments::{acc_get, acc_set, MmaVecAcc, PlaneMma};
use crate::components::mma_backward::{dq_row_stats, issue_query_tile, write_plane_gradient};
use crate::components::pipeline::{acquire_pair, stage_pair, BufferBarriers};
use crate::components::schedule::CubeHead;
use crate::components::softmax::{live_lse, DEAD_LSE};
use crate::components::staging::{
    stage_row_stats, stage_rows_async, stage_rows_sync, zero_pad_columns, HeadRows, StageTile,
};

/// Matrix-unit backward, query-major: `D = rowsum(dO * O)` and `dQ`.
///
/// Launch with `CubeDim::new_2d(32, warps)` and `CubeCount::Static(ceil(seq_q / (16 *
/// row_tiles * warps)), batch * heads, 1)`: each plane owns `16 * row_tiles` query rows
/// (`row_tiles` 1 or 2; two share each K and V fragment between their products). `dim_pad`
/// and `value_dim_pad` are the head and value dims rounded up to 16; `block_k` (keys per
/// staged tile) is a multiple of 16. `dq` is `[b, h,
/// seq_q, head_dim]` in the input dtype, `delta` `[b, h, seq_q]` in f32 (read by
/// [`flash_mma_backward_dkdv_kernel()`]); tensors as for `flash_unit_backward_dq_kernel`.
///
/// `async_copy` stages with `cp.async` (as `flash_mma_kernel`): Q and dO once, with the
/// first key tile, and K and V into two buffers, the next key tile's copies in flight while
/// the current one is computed (one cube barrier per key tile instead of two); the copies of
/// Q, dO and the first tile overlap the computation of `D`. It needs contiguous rows of Q,
/// K, V and dO, head and value dims that are multiples of 8 and 16-byte aligned rows (the
/// plan checks); otherwise the kernel stages with plain loads into one buffer.
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result. Exponentials through
/// PTX's `ex2.approx` (`components::exp`): CUDA only, as the plans launch it.
#[cube(
    launch_unchecked,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_backward_dq_kernel<F: Float, NQ: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<Vector<F, NQ>>,
    delta: &mut Tensor<f32>,
    scale: f32,
    left: i32,
    right: i32,
    heavy_first: u32,
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] warps: usize,
    #[comptime] row_tiles: usize,
    #[comptime] block_k: usize,
    #[comptime] async_copy: bool,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let mut mma = PlaneMma::<F>::new();
    let c_vs = mma.def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = mma.def.vectors_per_lane(MatrixIdent::Accumulator);

    // The cube's query rows, this plane's `16 * row_tiles`, and the keys they see.
    let cube = CubeHead::query_major(q, k, heavy_first);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let (dim, value_dim) = (q.shape(3), v.shape(3));
    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let g = lane / 4;
    let t = lane % 4;
    let plane_q = comptime!(16 * row_tiles);
    let block_q = comptime!(plane_q * warps);
    let r0 = cube.block * block_q;
    let w0 = r0 + warp * plane_q;
    let bounds = BandBounds::new(r0, w0, seq_q, seq_k, offset, left, right, block_q, plane_q);
    // This lane's first row (accumulator elements 0, 1 of row tile 0; elements 2, 3 are 8
    // rows down, row tile `rt` 16 * rt rows down).
    let row_a = (w0 + g) as i32;

    // Shared memory (16-byte aligned for `ldmatrix` and `cp.async`): the cube's Q and dO
    // tiles, staged once, and one or two K and V buffers.
    let buffers = comptime!(if async_copy { 2usize } else { 1usize });
    // Rows padded by 8 values (16 bytes).
    let tiles = comptime!(StageTile::head_and_value(
        block_q,
        dim_pad,
        value_dim_pad,
        32 * warps,
        8
    ));
    let (q_tile, do_tile) = comptime!(tiles);
    let (k_tile, v_tile) = comptime!((q_tile.with_rows(block_k), do_tile.with_rows(block_k)));
    let d_stride = comptime!(q_tile.stride);
    let v_stride = comptime!(do_tile.stride);
    let k_tiles = comptime!(block_k / 8);
    let dq_tiles = comptime!(dim_pad / 8);
    let mut q_smem = Shared::<[F]>::new_aligned_slice(comptime!(q_tile.len()), 16usize);
    let mut do_smem = Shared::<[F]>::new_aligned_slice(comptime!(do_tile.len()), 16usize);
    let mut k_smem = Shared::<[F]>::new_aligned_slice(comptime!(buffers * k_tile.len()), 16usize);
    let mut v_smem = Shared::<[F]>::new_aligned_slice(comptime!(buffers * v_tile.len()), 16usize);
    let tid = warp * 32 + lane;
    let q_at = HeadRows::new(q, b, h, seq_q, dim);
    let do_at = HeadRows::new(d_out, b, h, seq_q, value_dim);
    let k_at = HeadRows::new(k, b, kvh, seq_k, dim);
    let v_at = HeadRows::new(v, b, kvh, seq_k, value_dim);
    if comptime!(async_copy) {
        zero_pad_columns::<F>(&mut q_smem, dim, tid, q_tile, 1usize);
        zero_pad_columns::<F>(&mut do_smem, value_dim, tid, do_tile, 1usize);
        zero_pad_columns::<F>(&mut k_smem, dim, tid, k_tile, buffers);
        zero_pad_columns::<F>(&mut v_smem, value_dim, tid, v_tile, buffers);
    }
    // Their initialisation synchronises the cube (publishing the zeroed columns).
    let barriers = BufferBarriers::new();

    let bk_i = block_k as i32;
    let mut t0 = bounds.start - (bounds.start % bk_i);
    let mut stage = 0usize;
    if comptime!(async_copy) {
        // Q, dO and the first key tile, committed together on buffer 0 (uniform: the key
        // range is the cube's), in flight while `D` is computed.
        if t0 < bounds.end {
            stage_rows_async::<F>(q, q_at, r0, &mut q_smem, 0usize, tid, q_tile);
            stage_rows_async::<F>(d_out, do_at, r0, &mut do_smem, 0usize, tid, do_tile);
            stage_pair::<F>(
                k,
                k_at,
                &mut k_smem,
                v,
                v_at,
                &mut v_smem,
                usize::cast_from(t0),
                0usize,
                tid,
                k_tile,
                v_tile,
                true,
            );
            barriers.commit(0usize);
        }
    }

    // D and the lse of the lane's two rows (g and g + 8) of each row tile, from global
    // memory: row half `2 * rt + hf`.
    let mut d_row = Array::<f32>::new(comptime!(2 * row_tiles));
    let mut lse_row = Array::<f32>::new(comptime!(2 * row_tiles));
    #[unroll]
    for rt in 0..row_tiles {
        let mut d_pair = Array::<f32>::new(2usize);
        let mut lse_pair = Array::<f32>::new(2usize);
        dq_row_stats::<F>(
            out,
            d_out,
            lse,
            delta,
            do_at,
            &mut d_pair,
            &mut lse_pair,
            b,
            h,
            w0 + 16 * rt,
            g,
            t,
            seq_q,
            value_dim,
        );
        #[unroll]
        for hf in 0..2usize {
            d_row[2 * rt + hf] = d_pair[hf];
            lse_row[2 * rt + hf] = lse_pair[hf];
        }
    }
    if comptime!(!async_copy) {
        // Published by the first key tile's barrier.
        stage_rows_sync::<F>(q, q_at, r0, &mut q_smem, 0usize, tid, q_tile);
        stage_rows_sync::<F>(d_out, do_at, r0, &mut do_smem, 0usize, tid, do_tile);
    }

    // Row tile `rt`'s accumulator tiles from tile `rt * dq_tiles` (dQ), `rt * k_tiles`
    // (scores).
    let mut dq_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(row_tiles * dq_tiles * c_vecs));
    #[unroll]
    for i in 0..comptime!(row_tiles * dq_tiles * c_vecs) {
        dq_acc[i] = Vector::new(f32::new(0.0));
    }
    // S, then P, then dS (one set of registers); dP.
    let score_vecs = comptime!(row_tiles * k_tiles * c_vecs);
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(score_vecs);
    let mut dp_acc = Array::<Vector<f32, MmaVecAcc>>::new(score_vecs);

    while t0 < bounds.end {
        let next = t0 + bk_i;
        acquire_pair::<F>(
            k,
            k_at,
            &mut k_smem,
            v,
            v_at,
            &mut v_smem,
            &barriers,
            usize::cast_from(t0),
            usize::cast_from(next),
            next < bounds.end,
            stage,
            tid,
            k_tile,
            v_tile,
            async_copy,
        );
        let k_buf = stage * comptime!(k_tile.len());
        let v_buf = stage * comptime!(v_tile.len());

        let tile_hi = t0 + bk_i - 1;
        if bounds.plane_sees(t0, tile_hi) {
            // S = Q K^T, dP = dO V^T, each K and V fragment serving every row tile.
            #[unroll]
            for i in 0..score_vecs {
                s_acc[i] = Vector::new(f32::new(0.0));
                dp_acc[i] = Vector::new(f32::new(0.0));
            }
            mma.smem_product(
                lane,
                &q_smem,
                warp * plane_q * d_stride,
                &k_smem,
                k_buf,
                &mut s_acc,
                d_stride,
                false,
                d_stride,
                false,
                dim_pad / 16,
                row_tiles,
                k_tiles,
            );
            mma.smem_product(
                lane,
                &do_smem,
                warp * plane_q * v_stride,
                &v_smem,
                v_buf,
                &mut dp_acc,
                v_stride,
                false,
                v_stride,
                false,
                value_dim_pad / 16,
                row_tiles,
                k_tiles,
            );

            // dS = P (dP - D), with P = 0 outside the band and past seq_k (padding keys
            // are zero rows, but exp(-lse) alone may overflow).
            let unmasked = bounds.tile_unmasked(t0, tile_hi, seq_k);
            #[unroll]
            for rt in 0..row_tiles {
                #[unroll]
                for kt in 0..k_tiles {
                    #[unroll]
                    for e in 0..4usize {
                        let at = rt * k_tiles + kt;
                        let half = 2 * rt + e / 2;
                        let mut p = softmax_exp(
                            acc_get(&s_acc, at, e, c_vs) * scale - lse_row[half],
                            MMA_PTX,
                        );
                        if !unmasked {
                            let row = row_a + (16 * rt + 8 * (e / 2)) as i32;
                            let j = t0 + (kt * 8 + 2 * t + e % 2) as i32;
                            if j < row + offset - left
                                || j > row + offset + right
                                || j >= seq_k as i32
                            {
                                p = f32::new(0.0);
                            }
                        }
                        let ds = p * (acc_get(&dp_acc, at, e, c_vs) - d_row[half]);
                        acc_set(&mut s_acc, at, e, c_vs, ds);
                    }
                }
            }

            // dQ += dS K (K [key][d] is B = [k][n] as stored), each K fragment serving
            // every row tile.
            mma.acc_b_rows(
                lane,
                &s_acc,
                &k_smem,
                k_buf,
                &mut dq_acc,
                d_stride,
                block_k / 16,
                dq_tiles,
                row_tiles,
            );
        }
        // Every plane is done with this K/V buffer before it is staged again.
        sync_cube();
        t0 = next;
        if comptime!(async_copy) {
            stage = 1 - stage;
        }
    }

    // dQ: the plane's rows over its own rows of Q in shared memory (16-row slice
    // `warp * row_tiles + rt` for row tile `rt`). With synchronous staging and no key tile,
    // other planes' Q writes may still be landing in those rows.
    sync_cube();
    #[unroll]
    for rt in 0..row_tiles {
        let mut part = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(dq_tiles * c_vecs));
        #[unroll]
        for i in 0..comptime!(dq_tiles * c_vecs) {
            part[i] = dq_acc[rt * comptime!(dq_tiles * c_vecs) + i];
        }
        write_plane_gradient::<F, NQ>(
            &part,
            scale,
            &mut q_smem,
            dq,
            b,
            h,
            w0 + 16 * rt,
            warp * row_tiles + rt,
            lane,
            seq_q,
            dim,
            d_stride,
            dq_tiles,
            c_vs,
            dim_pad,
        );
    }
}

/// Matrix-unit backward, key-major: `dK` and `dV`, summed over the query heads of each kv
/// head.
///
/// Launch with `CubeDim::new_2d(32, warps)` and `CubeCount::Static(ceil(seq_k / (16 *
/// warps)), batch * kv_heads, 1)`, after [`flash_mma_backward_dq_kernel()`] has written
/// `delta`. `dim_pad`, `value_dim_pad` as there; `block_q` (query rows per staged tile) is
/// a multiple of 16, at most `32 * warps`. `dk` is `[b, kv_heads, seq_k, head_dim]` and
/// `dv` `[b, kv_heads, seq_k, value_dim]` in the input dtype.
///
/// The cube walks one sequence of steps, query tile by query tile of each query head of the
/// group in turn. `async_copy` stages with `cp.async` (as `flash_mma_kernel`): K and V once,
/// with the first step's tiles, and Q and dO into two buffers, the next step's copies issued
/// while the current step is computed (its lse and `D` loaded then too, and stored at the
/// end of the step into the other of two small f32 buffers), across the boundary between
/// query heads too, so the pipeline never drains (one cube barrier per step instead of
/// two). It needs contiguous
/// rows of Q, K, V and dO, head and value dims that are multiples of 8 and 16-byte aligned
/// rows (the plan checks); otherwise the kernel stages with plain loads into one buffer.
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result. Exponentials through
/// PTX's `ex2.approx` (`components::exp`): CUDA only, as the plans launch it.
#[cube(
    launch_unchecked,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_backward_dkdv_kernel<F: Float, NK: Size, NV: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<Vector<F, NK>>,
    dv: &mut Tensor<Vector<F, NV>>,
    scale: f32,
    left: i32,
    right: i32,
    heavy_first: u32,
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] warps: usize,
    #[comptime] block_q: usize,
    #[comptime] async_copy: bool,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let mut mma = PlaneMma::<F>::new();
    let c_vs = mma.def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = mma.def.vectors_per_lane(MatrixIdent::Accumulator);

    // The cube's key rows of one kv head, this plane's 16, and the queries that see them
    // (the band transposed).
    let cube = CubeHead::key_major(q, k, heavy_first);
    let (b, kvh, h_first, group) = (cube.batch, cube.kv_head, cube.head, cube.group);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let (dim, value_dim) = (q.shape(3), v.shape(3));
    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let g = lane / 4;
    let t = lane % 4;
    let block_kv = comptime!(16 * warps);
    let c0 = cube.block * block_kv;
    let w0 = c0 + warp * 16;
    let bounds = BandBounds::new(
        c0, w0, seq_k, seq_q, -offset, right, left, block_kv, 16usize,
    );
    let key_a = (w0 + g) as i32;

    // The steps: every query tile that sees the cube's keys, of each query head of the
    // group in turn.
    comptime!(assert!(
        block_q <= 32 * warps,
        "block_q: one query row of lse and D per unit"
    ));
    let bq_i = block_q as i32;
    let q_first = usize::cast_from(bounds.start);
    let mut tiles = 0usize;
    if bounds.end > bounds.start {
        tiles = usize::cast_from((bounds.end - bounds.start + bq_i - 1) / bq_i);
    }
    let steps = tiles * group;

    // Shared memory (16-byte aligned for `ldmatrix` and `cp.async`): the cube's K and V
    // tiles, staged once, and one or two Q, dO, lse and D buffers.
    let buffers = comptime!(if async_copy { 2usize } else { 1usize });
    let threads = comptime!(32 * warps);
    let tiles_kv = comptime!(StageTile::head_and_value(
        block_kv,
        dim_pad,
        value_dim_pad,
        threads,
        8
    ));
    let (k_tile, v_tile) = comptime!(tiles_kv);
    let (q_tile, do_tile) = comptime!((k_tile.with_rows(block_q), v_tile.with_rows(block_q)));
    let d_stride = comptime!(k_tile.stride);
    let v_stride = comptime!(v_tile.stride);
    let q_tiles = comptime!(block_q / 8);
    let dk_tiles = comptime!(dim_pad / 8);
    let dv_tiles = comptime!(value_dim_pad / 8);
    let mut k_smem = Shared::<[F]>::new_aligned_slice(comptime!(k_tile.len()), 16usize);
    let mut v_smem = Shared::<[F]>::new_aligned_slice(comptime!(v_tile.len()), 16usize);
    let mut q_smem = Shared::<[F]>::new_aligned_slice(comptime!(buffers * q_tile.len()), 16usize);
    let mut do_smem = Shared::<[F]>::new_aligned_slice(comptime!(buffers * do_tile.len()), 16usize);
    let mut lse_tile = Shared::<[f32]>::new_slice(comptime!(buffers * block_q));
    let mut delta_tile = Shared::<[f32]>::new_slice(comptime!(buffers * block_q));
    let tid = warp * 32 + lane;
    let k_at = HeadRows::new(k, b, kvh, seq_k, dim);
    let v_at = HeadRows::new(v, b, kvh, seq_k, value_dim);
    if comptime!(async_copy) {
        zero_pad_columns::<F>(&mut k_smem, dim, tid, k_tile, 1usize);
        zero_pad_columns::<F>(&mut v_smem, value_dim, tid, v_tile, 1usize);
        zero_pad_columns::<F>(&mut q_smem, dim, tid, q_tile, buffers);
        zero_pad_columns::<F>(&mut do_smem, value_dim, tid, do_tile, buffers);
        if steps > 0 {
            // The first step's lse and D into buffer 0, with plain stores: published, with
            // the zeroed columns, by the barriers' initialisation below (it synchronises
            // the cube).
            stage_row_stats(
                lse,
                delta,
                &mut lse_tile,
                &mut delta_tile,
                b * lse.stride(0) + h_first * lse.stride(1),
                b * delta.stride(0) + h_first * delta.stride(1),
                q_first,
                seq_q,
                0usize,
                tid,
                block_q,
                threads,
            );
        }
    }
    let barriers = BufferBarriers::new();
    // K and V (once), with the first step's Q and dO on buffer 0 where asynchronous.
    if comptime!(async_copy) {
        if steps > 0 {
            stage_pair::<F>(
                k,
                k_at,
                &mut k_smem,
                v,
                v_at,
                &mut v_smem,
                c0,
                0usize,
                tid,
                k_tile,
                v_tile,
                true,
            );
            stage_pair::<F>(
                q,
                HeadRows::new(q, b, h_first, seq_q, dim),
                &mut q_smem,
                d_out,
                HeadRows::new(d_out, b, h_first, seq_q, value_dim),
                &mut do_smem,
                q_first,
                0usize,
                tid,
                q_tile,
                do_tile,
                true,
            );
            barriers.commit(0usize);
        }
    } else {
        stage_pair::<F>(
            k,
            k_at,
            &mut k_smem,
            v,
            v_at,
            &mut v_smem,
            c0,
            0usize,
            tid,
            k_tile,
            v_tile,
            false,
        );
    }

    let mut dk_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(dk_tiles * c_vecs));
    #[unroll]
    for i in 0..comptime!(dk_tiles * c_vecs) {
        dk_acc[i] = Vector::new(f32::new(0.0));
    }
    let mut dv_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(dv_tiles * c_vecs));
    #[unroll]
    for i in 0..comptime!(dv_tiles * c_vecs) {
        dv_acc[i] = Vector::new(f32::new(0.0));
    }
    // S^T then P^T; dP^T then dS^T.
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(q_tiles * c_vecs));
    let mut dp_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(q_tiles * c_vecs));

    let mut stage = 0usize;
    let mut step = 0usize;
    while step < steps {
        let h = h_first + step / tiles;
        let t0u = q_first + (step % tiles) * block_q;
        let t0 = t0u as i32;
        // This unit's row of the next step's lse (as stored by the forward) and D
        // (asynchronous staging only): a padding row's unless loaded below.
        let mut next_lse = f32::new(DEAD_LSE);
        let mut next_delta = f32::new(0.0);
        if comptime!(async_copy) {
            // Issue the next step (the next query tile, or the first tile of the next query
            // head) into the other buffer, then wait for this one. `next < steps` is uniform
            // over the cube, so every unit commits, and arrives, on the same barriers.
            let next = step + 1;
            if next < steps {
                let hn = h_first + next / tiles;
                let tn = q_first + (next % tiles) * block_q;
                // Its lse and D are stored into the other buffer at the end of this step
                // (see there; `live_lse` is applied there too, so that nothing waits for
                // the loads before then).
                let stats = issue_query_tile::<F>(
                    q,
                    d_out,
                    lse,
                    delta,
                    &mut q_smem,
                    &mut do_smem,
                    &barriers,
                    b,
                    hn,
                    tn,
                    1 - stage,
                    tid,
                    seq_q,
                    dim,
                    value_dim,
                    q_tile,
                    do_tile,
                    block_q,
                );
                next_lse = stats.lse;
                next_delta = stats.delta;
            }
            barriers.wait(stage);
        } else {
            stage_pair::<F>(
                q,
                HeadRows::new(q, b, h, seq_q, dim),
                &mut q_smem,
                d_out,
                HeadRows::new(d_out, b, h, seq_q, value_dim),
                &mut do_smem,
                t0u,
                0usize,
                tid,
                q_tile,
                do_tile,
                false,
            );
            stage_row_stats(
                lse,
                delta,
                &mut lse_tile,
                &mut delta_tile,
                b * lse.stride(0) + h * lse.stride(1),
                b * delta.stride(0) + h * delta.stride(1),
                t0u,
                seq_q,
                0usize,
                tid,
                block_q,
                threads,
            );
            sync_cube();
        }
        let q_buf = stage * comptime!(q_tile.len());
        let do_buf = stage * comptime!(do_tile.len());
        let st_at = stage * block_q;

        let tile_hi = t0 + bq_i - 1;
        if bounds.plane_sees(t0, tile_hi) {
            // S^T = K Q^T, dP^T = V dO^T.
            mma.a_bt(
                lane,
                &k_smem,
                warp * 16 * d_stride,
                &q_smem,
                q_buf,
                &mut s_acc,
                d_stride,
                d_stride,
                dim_pad / 16,
                q_tiles,
            );
            mma.a_bt(
                lane,
                &v_smem,
                warp * 16 * v_stride,
                &do_smem,
                do_buf,
                &mut dp_acc,
                v_stride,
                v_stride,
                value_dim_pad / 16,
                q_tiles,
            );

            // P^T and dS^T = P^T (dP^T - D); the lse and D are the column's (query's).
            // `unmasked`: every (query, key) pair of the tile is visible, so no
            // per-element test.
            // (`bounds.tile_unmasked` written out: its stored bounds would stay live
            // across the loop, and this kernel is at the register limit.)
            let unmasked = bounds.plane_full
                && tile_hi < seq_q as i32
                && tile_hi + offset - left <= w0 as i32
                && w0 as i32 + 15 <= t0 + offset + right;
            #[unroll]
            for qt in 0..q_tiles {
                #[unroll]
                for e in 0..4usize {
                    let qc = qt * 8 + 2 * t + e % 2;
                    let mut p = softmax_exp(
                        acc_get(&s_acc, qt, e, c_vs) * scale - lse_tile[st_at + qc],
                        MMA_PTX,
                    );
                    if !unmasked {
                        let key = key_a + (8 * (e / 2)) as i32;
                        let i = t0 + qc as i32;
                        if key < i + offset - left
                            || key > i + offset + right
                            || key >= seq_k as i32
                            || i >= seq_q as i32
                        {
                            p = f32::new(0.0);
                        }
                    }
                    let ds = p * (acc_get(&dp_acc, qt, e, c_vs) - delta_tile[st_at + qc]);
                    acc_set(&mut s_acc, qt, e, c_vs, p);
                    acc_set(&mut dp_acc, qt, e, c_vs, ds);
                }
            }

            // dV += P^T dO, dK += dS^T Q (dO and Q [query][d] are B = [k][n] as stored).
            mma.acc_b(
                lane,
                &s_acc,
                &do_smem,
                do_buf,
                &mut dv_acc,
                v_stride,
                block_q / 16,
                dv_tiles,
            );
            mma.acc_b(
                lane,
                &dp_acc,
                &q_smem,
                q_buf,
                &mut dk_acc,
                d_stride,
                block_q / 16,
                dk_tiles,
            );
        }
        if comptime!(async_copy) {
            // The next step's lse and D into the other buffer, with plain stores (not
            // tracked by the barriers). Safe in both directions: that buffer was last read
            // in the previous iteration, before that iteration's closing `sync_cube()`,
            // which every unit has passed to get here, so no unit still reads it; and it is
            // next read in the next iteration, after the `sync_cube()` just below, which no
            // unit passes before every unit has made these stores, and which makes the
            // cube's shared-memory stores before it visible to every unit after it.
            if step + 1 < steps && tid < block_q {
                let other = 1 - stage;
                lse_tile[other * block_q + tid] = live_lse(next_lse);
                delta_tile[other * block_q + tid] = next_delta;
            }
        }
        // Every plane is done with this Q/dO (and lse/D) buffer before it is staged again.
        sync_cube();
        step += 1;
        if comptime!(async_copy) {
            stage = 1 - stage;
        }
    }

    // dK and dV: the plane's key rows over its own rows of K and V in shared memory. With
    // synchronous staging and no step, other planes' K/V writes may still be landing.
    sync_cube();
    write_plane_gradient::<F, NK>(
        &dk_acc,
        scale,
        &mut k_smem,
        dk,
        b,
        kvh,
        w0,
        warp,
        lane,
        seq_k,
        dim,
        d_stride,
        dk_tiles,
        c_vs,
        dim_pad,
    );
    write_plane_gradient::<F, NV>(
        &dv_acc,
        f32::new(1.0),
        &mut v_smem,
        dv,
        b,
        kvh,
        w0,
        warp,
        lane,
        seq_k,
        value_dim,
        v_stride,
        dv_tiles,
        c_vs,
        value_dim_pad,
    );
}
