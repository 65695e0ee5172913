//! The portable FlashAttention backward kernels (v2): no matrix units, no atomics,
//! register tiles.
//!
//! FlashAttention-2's scheme, recomputing the probabilities `P = exp(scale * q . k - lse)`
//! tile by tile from the forward's saved row log-sum-exp, with every product a register-tile
//! product of two shared-memory operands ([`tile_product`], as the forward kernel):
//! - [`flash_unit_backward_dq_kernel()`], query-major: a cube of `block_q` query rows keeps
//!   its Q and dO rows in shared memory, computes `D_i = rowsum(dO_i * O_i)` (written out
//!   for the second kernel) and walks the key tiles of its rows' band: per tile `dP = dO
//!   V^T` (V staged first), then `S = Q K^T` (K staged into the buffer V used), `dS = P
//!   (dP - D)` through shared memory, and `dQ += dS K` into each unit's register tile.
//! - [`flash_unit_backward_dkdv_kernel()`], key-major: a cube of `block_k` keys of one kv head
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
use crate::components::schedule::CubeHead;
use crate::components::staging::stage_rows;
use crate::components::unit_backward::{
    dkdv_query_tile, dq_key_tile, stage_row_stats, write_dkdv, write_dq,
};

/// Query-major backward: `D = rowsum(dO * O)` and `dQ`.
///
/// Launch with `CubeDim::new_1d(row_threads * col_threads)` and `CubeCount::Static(ceil(seq_q
/// / block_q), batch * heads, 1)`; `row_threads` divides `block_q`, `col_threads` divides
/// `block_k`. `dq` is `[b, h, seq_q, head_dim]` in the input dtype, `delta` is `[b, h,
/// seq_q]` in f32 (read by [`flash_unit_backward_dkdv_kernel()`]).
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
    stage_row_stats::<F>(
        out,
        d_out,
        lse,
        delta,
        &mut d_tile,
        &mut lse_tile,
        b,
        h,
        r0,
        seq_q,
        do_base,
        value_dim,
        block_q,
        units,
    );

    let mut s = Array::<f32>::new(comptime!(rq * rk));
    let mut dp = Array::<f32>::new(comptime!(rq * rk));
    let mut dq_acc = Array::<f32>::new(comptime!(rq * rd));
    #[unroll]
    for i in 0..comptime!(rq * rd) {
        dq_acc[i] = f32::new(0.0);
    }
    // The block-sparse calls' rule flags and score terms.
    let no_hide = Array::<u32>::new(1usize);
    let no_terms = Array::<f32>::new(1usize);
    let mut no_grad = Array::<f32>::new(1usize);

    let mut t0 = bounds.start;
    while t0 < bounds.end {
        dq_key_tile::<F>(
            k,
            v,
            &q_t,
            &do_t,
            &mut kv,
            &mut ds_tile,
            &lse_tile,
            &d_tile,
            &mut s,
            &mut dp,
            &mut dq_acc,
            &no_hide,
            &no_terms,
            &no_terms,
            &mut no_grad,
            k_base,
            v_base,
            t0,
            false,
            lo0,
            hi0,
            seq_k,
            scale,
            1.0f32,
            dim,
            value_dim,
            block_q,
            block_k,
            row_threads,
            col_threads,
            false,
            false,
            false,
            1.0f32,
            false,
        );
        t0 += block_k as i32;
    }

    write_dq::<F>(
        dq,
        &dq_acc,
        b,
        h,
        r0,
        seq_q,
        scale,
        dim,
        rq,
        row_threads,
        col_threads,
    );
}

/// Key-major backward: `dK` and `dV`, summed over the query heads of each kv head.
///
/// Launch with `CubeDim::new_1d(row_threads * col_threads)` and `CubeCount::Static(ceil(seq_k
/// / block_k), batch * kv_heads, 1)`, after [`flash_unit_backward_dq_kernel()`] has written
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

    // The block-sparse calls' rule flags and score terms.
    let no_hide = Array::<u32>::new(1usize);
    let no_terms = Array::<f32>::new(1usize);
    let mut no_grad = Array::<f32>::new(1usize);
    // The query heads of this kv head, in a fixed order.
    for g in 0..group {
        let h = kvh * group + g;
        let mut t0 = bounds.start;
        while t0 < bounds.end {
            dkdv_query_tile::<F>(
                q,
                d_out,
                lse,
                delta,
                &k_t,
                &v_t,
                &mut q_t,
                &mut do_t,
                &mut p_tile,
                &mut ds_tile,
                &mut lse_tile,
                &mut d_tile,
                &mut st,
                &mut dpt,
                &mut dk_acc,
                &mut dv_acc,
                &no_hide,
                &no_terms,
                &mut no_grad,
                b,
                h,
                c0,
                t0,
                false,
                i_lo0,
                i_hi0,
                bounds.end,
                seq_q,
                seq_k,
                scale,
                1.0f32,
                dim,
                value_dim,
                block_k,
                block_q,
                row_threads,
                col_threads,
                false,
                false,
                false,
                1.0f32,
                false,
            );
            t0 += block_q as i32;
        }
    }

    write_dkdv::<F>(
        dk,
        dv,
        &dk_acc,
        &dv_acc,
        b,
        kvh,
        c0,
        seq_k,
        scale,
        dim,
        value_dim,
        rk,
        row_threads,
        col_threads,
    );
}
