//! The portable backward over a block-sparse plan: `flash_unit_backward`'s steps
//! (`components::unit_backward`) on the blocks a plan's lists name, with the element rules
//! on partially visible ones. The dQ kernel walks each query block's key blocks; the dK/dV
//! kernel walks each key block's query blocks (the transposed lists), for every query head
//! of its kv head, so no two cubes write one gradient row and no atomics are needed. Lists
//! are on blocks of `q_tiles_per_block x k_tiles_per_block` of a kernel's tiles, as in
//! `flash_unit_sparse`. With dropout, every tile regenerates the forward's dropout flags
//! from the seed. Score terms get their gradients where their positions live: the soft
//! edge's reach (per query row) from the dQ kernel, the key bias (per key) from the dK/dV
//! kernel, one write per (batch, query head, position).

use cubecl::prelude::*;

use crate::components::element_rules::{ElementRules, RuleSet};
use crate::components::key_blocks::KeyBlockList;
use crate::components::schedule::CubeHead;
use crate::components::staging::stage_rows;
use crate::components::unit_backward::{
    dkdv_query_tile, dq_key_tile, stage_row_stats, write_dkdv, write_dq, write_term_grad,
};

/// Query-major sparse backward: `D = rowsum(dO * O)` and `dQ`.
///
/// Launch as `flash_unit_backward_dq_kernel` (natural cube order), with the lists of
/// `flash_unit_sparse_kernel` (its query block of `q_tiles_per_block` of this kernel's
/// `block_q` rows, key blocks of `k_tiles_per_block` of its `block_k` keys) and the same
/// rules; with `rules.soft_edge` it writes the reach's gradient `d_reach` (f32 `[batch,
/// heads, seq_q]`; a placeholder otherwise).
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_sparse_backward_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    partial_count: &Tensor<i32>,
    partial_index: &Tensor<i32>,
    full_count: &Tensor<i32>,
    full_index: &Tensor<i32>,
    layout: &Tensor<i32>,
    padding: &Tensor<i32>,
    doc_q: &Tensor<i32>,
    doc_k: &Tensor<i32>,
    dense: &Tensor<i32>,
    seed: &Tensor<i32>,
    key_bias: &Tensor<f32>,
    reach: &Tensor<f32>,
    slopes: &Tensor<f32>,
    d_reach: &mut Tensor<f32>,
    element_rules: ElementRules,
    q_tiles_per_block: u32,
    k_tiles_per_block: u32,
    scale: f32,
    #[comptime] rules: RuleSet,
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

    let cube = CubeHead::query_major(q, k, 0u32);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k) = (cube.seq_q, cube.seq_k);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    let r0 = cube.block * block_q;
    let list = KeyBlockList::new(
        partial_count,
        partial_index,
        full_count,
        full_index,
        b,
        h,
        cube.block / q_tiles_per_block as usize,
    );

    let mut q_t = Shared::<[F]>::new_slice(comptime!(dim * q_stride));
    let mut do_t = Shared::<[F]>::new_slice(comptime!(value_dim * q_stride));
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
    let mut hide = Array::<u32>::new(comptime!(rq * rk));
    let terms = comptime!(rules.has_terms());
    let mut bias = Array::<f32>::new(comptime!(if terms { rq * rk } else { 1 }));
    let mut slope = Array::<f32>::new(comptime!(if terms { rq * rk } else { 1 }));
    let mut row_grad = Array::<f32>::new(rq);
    #[unroll]
    for i in 0..comptime!(rq * rd) {
        dq_acc[i] = f32::new(0.0);
    }
    #[unroll]
    for a in 0..rq {
        row_grad[a] = f32::new(0.0);
    }
    // The step's band admits every key: the rules carry the band.
    let lo0 = -(comptime!(block_q as i32));
    let hi0 = seq_k as i32;

    for e in 0..list.len {
        let kb = list.block(e, partial_index, full_index);
        for sub in 0..k_tiles_per_block {
            let t0 = (kb * k_tiles_per_block + sub) * comptime!(block_k as u32);
            let masked = e < list.partial || comptime!(rules.dropout || terms);
            if (t0 as usize) < seq_k {
                if masked {
                    element_rules.hide_tile(
                        &mut hide,
                        &mut bias,
                        &mut slope,
                        b,
                        h,
                        r0 + ty,
                        t0 as usize + tx,
                        seq_q,
                        seq_k,
                        layout,
                        padding,
                        doc_q,
                        doc_k,
                        dense,
                        seed,
                        key_bias,
                        reach,
                        slopes,
                        rules,
                        rq,
                        row_threads,
                        rk,
                        col_threads,
                        false,
                    );
                }
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
                    &hide,
                    &bias,
                    &slope,
                    &mut row_grad,
                    k_base,
                    v_base,
                    t0 as i32,
                    masked,
                    lo0,
                    hi0,
                    seq_k,
                    scale,
                    element_rules.keep_scale,
                    dim,
                    value_dim,
                    block_q,
                    block_k,
                    row_threads,
                    col_threads,
                    true,
                    terms,
                    comptime!(rules.soft_edge),
                    element_rules.softcap,
                    comptime!(rules.softcap),
                );
            }
        }
    }

    // The dS tile is free now: it holds the rows' partial sums.
    if comptime!(rules.soft_edge) {
        write_term_grad(
            d_reach,
            &row_grad,
            &mut ds_tile,
            b,
            h,
            r0,
            seq_q,
            rq,
            row_threads,
            col_threads,
        );
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

/// Key-major sparse backward: `dK` and `dV`, summed over the query heads of each kv head.
///
/// Launch as `flash_unit_backward_dkdv_kernel` (natural cube order), after
/// [`flash_unit_sparse_backward_dq_kernel()`] has written `delta`, with the transposed lists
/// (`[batch or 1, heads or 1, k_blocks]` counts, `[.., k_blocks, q_blocks]` query blocks)
/// on blocks of `q_tiles_per_block` of this kernel's `block_q` query rows by
/// `k_tiles_per_block` of its `block_k` keys; with `rules.key_bias` it writes the bias's
/// gradient `d_key_bias` (f32 `[batch, heads, seq_k]`, per query head; a placeholder
/// otherwise).
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_sparse_backward_dkdv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    t_partial_count: &Tensor<i32>,
    t_partial_index: &Tensor<i32>,
    t_full_count: &Tensor<i32>,
    t_full_index: &Tensor<i32>,
    layout: &Tensor<i32>,
    padding: &Tensor<i32>,
    doc_q: &Tensor<i32>,
    doc_k: &Tensor<i32>,
    dense: &Tensor<i32>,
    seed: &Tensor<i32>,
    key_bias: &Tensor<f32>,
    reach: &Tensor<f32>,
    slopes: &Tensor<f32>,
    d_key_bias: &mut Tensor<f32>,
    element_rules: ElementRules,
    q_tiles_per_block: u32,
    k_tiles_per_block: u32,
    scale: f32,
    #[comptime] rules: RuleSet,
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

    let cube = CubeHead::key_major(q, k, 0u32);
    let (b, kvh, group) = (cube.batch, cube.kv_head, cube.group);
    let (seq_q, seq_k) = (cube.seq_q, cube.seq_k);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    let c0 = cube.block * block_k;
    let key_block = cube.block / k_tiles_per_block as usize;

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
    let mut hide = Array::<u32>::new(comptime!(rk * rq));
    let terms = comptime!(rules.has_terms());
    let mut bias = Array::<f32>::new(comptime!(if terms { rk * rq } else { 1 }));
    let mut slope = Array::<f32>::new(comptime!(if terms { rk * rq } else { 1 }));
    let mut key_grad = Array::<f32>::new(rk);
    #[unroll]
    for i in 0..comptime!(rk * rd) {
        dk_acc[i] = f32::new(0.0);
    }
    #[unroll]
    for i in 0..comptime!(rk * rv) {
        dv_acc[i] = f32::new(0.0);
    }
    // The step's band admits every query row: the rules carry the band.
    let i_lo0 = -(comptime!(block_k as i32));
    let i_hi0 = seq_q as i32;

    // The query heads of this kv head, in a fixed order.
    for g in 0..group {
        let h = kvh * group + g;
        #[unroll]
        for a in 0..rk {
            key_grad[a] = f32::new(0.0);
        }
        let list = KeyBlockList::new(
            t_partial_count,
            t_partial_index,
            t_full_count,
            t_full_index,
            b,
            h,
            key_block,
        );
        for e in 0..list.len {
            let qb = list.block(e, t_partial_index, t_full_index);
            for sub in 0..q_tiles_per_block {
                let t0 = (qb * q_tiles_per_block + sub) * comptime!(block_q as u32);
                let masked = e < list.partial || comptime!(rules.dropout || terms);
                if (t0 as usize) < seq_q {
                    if masked {
                        element_rules.hide_tile(
                            &mut hide,
                            &mut bias,
                            &mut slope,
                            b,
                            h,
                            t0 as usize + tx,
                            c0 + ty,
                            seq_q,
                            seq_k,
                            layout,
                            padding,
                            doc_q,
                            doc_k,
                            dense,
                            seed,
                            key_bias,
                            reach,
                            slopes,
                            rules,
                            rk,
                            row_threads,
                            rq,
                            col_threads,
                            true,
                        );
                    }
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
                        &hide,
                        &bias,
                        &mut key_grad,
                        b,
                        h,
                        c0,
                        t0 as i32,
                        masked,
                        i_lo0,
                        i_hi0,
                        seq_q as i32,
                        seq_q,
                        seq_k,
                        scale,
                        element_rules.keep_scale,
                        dim,
                        value_dim,
                        block_k,
                        block_q,
                        row_threads,
                        col_threads,
                        true,
                        terms,
                        comptime!(rules.key_bias),
                        element_rules.softcap,
                        comptime!(rules.softcap),
                    );
                }
            }
        }
        // The dS tile is free between query heads: it holds the keys' partial sums.
        if comptime!(rules.key_bias) {
            write_term_grad(
                d_key_bias,
                &key_grad,
                &mut ds_tile,
                b,
                h,
                c0,
                seq_k,
                rk,
                row_threads,
                col_threads,
            );
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
