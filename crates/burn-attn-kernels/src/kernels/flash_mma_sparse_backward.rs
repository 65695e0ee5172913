//! The matrix-unit backward over a block-sparse plan (CUDA `mma.sync.m16n8k16`, f16/bf16):
//! `flash_mma_backward`'s two kernels, products and staging on the blocks a plan's lists
//! name (`components::key_blocks`), with the element rules (`components::element_rules`)
//! evaluated per accumulator element on partially visible blocks, and on every block where
//! the call has dropout or score terms. The dQ kernel walks each query block's key blocks;
//! the dK/dV kernel walks each key block's query blocks (the transposed lists), for every
//! query head of its kv head, so no two cubes write one gradient row and no atomics are
//! needed. A list's block is `q_tiles_per_block x k_tiles_per_block` of a kernel's tiles
//! (16 rows per plane, `block_k` keys or `block_q` query rows per streamed tile).
//!
//! Per element, as the portable sparse backward (`components::unit_backward`): the logit
//! `x` is the scaled score (through the softcap) plus the score terms; `P = exp(x - lse)`
//! is 0 where hidden; `dS = P (keep * dP - D)` with `keep` the dropout factor (0 or `1 /
//! (1 - p)`), and `keep * P` enters `dV`. The score terms' gradients are the sums of `dS`
//! where their positions live: per query row times the soft edge's slope (the reach's, in
//! the dQ kernel), per key (the key bias's, in the dK/dV kernel), each summed by one plane
//! over its group's four lanes in a fixed order.
//!
//! Staging is asynchronous only (`cp.async` into two buffers of the streamed tiles; the
//! plan takes the call only where it can stage so): the next tile's copies are in flight
//! while the current one is computed. The dK/dV kernel's pipeline restarts at each query
//! head of its group (one exposed tile per head).

use cubecl::cmma::MatrixIdent;
use cubecl::prelude::*;

use crate::components::element_rules::{ElementRules, RuleSet};
use crate::components::exp::{softmax_exp, MMA_PTX};
use crate::components::fragments::{acc_get, acc_set, MmaVecAcc, PlaneMma};
use crate::components::key_blocks::KeyBlockList;
use crate::components::mma_backward::{
    dq_row_stats, issue_query_tile, write_plane_gradient, write_row_sums,
};
use crate::components::pipeline::{acquire_pair, stage_pair, BufferBarriers};
use crate::components::schedule::CubeHead;
use crate::components::softmax::{live_lse, DEAD_LSE};
use crate::components::staging::{stage_rows_async, zero_pad_columns, HeadRows, StageTile};

/// One element's logit and the factors of its gradients.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone))]
struct SparseLogit {
    /// The logit (scaled score through the softcap, plus the score terms).
    x: f32,
    /// The softcap's derivative at the scaled score (1 without one).
    d_cap: f32,
    /// The dropout factor of its probability (0 where dropped, else 1 or `1 / (1 - p)`).
    keep: f32,
    /// The soft edge's derivative of the logit by the query's reach.
    slope: f32,
    /// Hidden: no probability.
    hidden: bool,
}

/// The logit of query `i`, key `j` (query head `h` of batch `b`) from its raw score: past
/// the sequence ends hidden; on a `masked` step the rules' flags and terms.
#[cube]
#[allow(clippy::too_many_arguments)]
fn sparse_logit(
    rules_at: &ElementRules,
    score: f32,
    scale: f32,
    masked: bool,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
    seq_q: usize,
    seq_k: usize,
    layout: &Tensor<i32>,
    padding: &Tensor<i32>,
    doc_q: &Tensor<i32>,
    doc_k: &Tensor<i32>,
    dense: &Tensor<i32>,
    seed: &Tensor<i32>,
    key_bias: &Tensor<f32>,
    reach: &Tensor<f32>,
    slopes: &Tensor<f32>,
    #[comptime] rules: RuleSet,
) -> SparseLogit {
    let mut e = SparseLogit {
        x: score * scale,
        d_cap: f32::new(1.0),
        keep: f32::new(1.0),
        slope: f32::new(0.0),
        hidden: i >= seq_q || j >= seq_k,
    };
    if comptime!(rules.softcap) {
        let th = f32::tanh(e.x / rules_at.softcap);
        e.x = rules_at.softcap * th;
        e.d_cap = f32::new(1.0) - th * th;
    }
    if masked && !e.hidden {
        let verdict = rules_at.element(
            b, h, i, j, seq_q, seq_k, layout, padding, doc_q, doc_k, dense, seed, key_bias, reach,
            slopes, rules,
        );
        e.hidden = verdict.hidden;
        e.x += verdict.bias;
        e.slope = verdict.slope;
        if comptime!(rules.dropout) {
            e.keep = select(verdict.dropped, f32::new(0.0), rules_at.keep_scale);
        }
    }
    e
}

/// Matrix-unit sparse backward, query-major: `D = rowsum(dO * O)` and `dQ`.
///
/// Launch as `flash_mma_backward_dq_kernel` (natural cube order, asynchronous staging), with
/// the lists and rules of `flash_mma_sparse_kernel` (a list's query block is
/// `q_tiles_per_block` cubes, its key block `k_tiles_per_block` tiles of `block_k` keys);
/// with `rules.soft_edge` it writes the reach's gradient `d_reach` (f32 `[batch, heads,
/// seq_q]`; a placeholder otherwise).
#[cube(
    launch_unchecked,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_sparse_backward_dq_kernel<F: Float, NQ: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<Vector<F, NQ>>,
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
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] warps: usize,
    #[comptime] block_k: usize,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let mut mma = PlaneMma::<F>::new();
    let c_vs = mma.def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = mma.def.vectors_per_lane(MatrixIdent::Accumulator);

    let cube = CubeHead::query_major(q, k, 0u32);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k) = (cube.seq_q, cube.seq_k);
    let (dim, value_dim) = (q.shape(3), v.shape(3));
    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let g = lane / 4;
    let t = lane % 4;
    let block_q = comptime!(16 * warps);
    let r0 = cube.block * block_q;
    let w0 = r0 + warp * 16;

    // Shared memory as `flash_mma_backward_dq_kernel`'s, double-buffered K and V.
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
    let mut k_smem = Shared::<[F]>::new_aligned_slice(comptime!(2 * k_tile.len()), 16usize);
    let mut v_smem = Shared::<[F]>::new_aligned_slice(comptime!(2 * v_tile.len()), 16usize);
    let tid = warp * 32 + lane;
    let q_at = HeadRows::new(q, b, h, seq_q, dim);
    let do_at = HeadRows::new(d_out, b, h, seq_q, value_dim);
    let k_at = HeadRows::new(k, b, kvh, seq_k, dim);
    let v_at = HeadRows::new(v, b, kvh, seq_k, value_dim);
    zero_pad_columns::<F>(&mut q_smem, dim, tid, q_tile, 1usize);
    zero_pad_columns::<F>(&mut do_smem, value_dim, tid, do_tile, 1usize);
    zero_pad_columns::<F>(&mut k_smem, dim, tid, k_tile, 2usize);
    zero_pad_columns::<F>(&mut v_smem, value_dim, tid, v_tile, 2usize);
    // Their initialisation synchronises the cube (publishing the zeroed columns).
    let barriers = BufferBarriers::new();

    let list = KeyBlockList::new(
        partial_count,
        partial_index,
        full_count,
        full_index,
        b,
        h,
        cube.block / q_tiles_per_block as usize,
    );
    let steps = list.len * k_tiles_per_block;
    // Q, dO and the first key tile, committed together on buffer 0, in flight while `D` is
    // computed.
    if steps > 0 {
        stage_rows_async::<F>(q, q_at, r0, &mut q_smem, 0usize, tid, q_tile);
        stage_rows_async::<F>(d_out, do_at, r0, &mut do_smem, 0usize, tid, do_tile);
        let first = list.tile_start(0u32, partial_index, full_index, k_tiles_per_block, block_k);
        stage_pair::<F>(
            k,
            k_at,
            &mut k_smem,
            v,
            v_at,
            &mut v_smem,
            usize::cast_from(first),
            0usize,
            tid,
            k_tile,
            v_tile,
            true,
        );
        barriers.commit(0usize);
    }
    let mut d_row = Array::<f32>::new(2usize);
    let mut lse_row = Array::<f32>::new(2usize);
    dq_row_stats::<F>(
        out,
        d_out,
        lse,
        delta,
        do_at,
        &mut d_row,
        &mut lse_row,
        b,
        h,
        w0,
        g,
        t,
        seq_q,
        value_dim,
    );

    let mut dq_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(dq_tiles * c_vecs));
    #[unroll]
    for i in 0..comptime!(dq_tiles * c_vecs) {
        dq_acc[i] = Vector::new(f32::new(0.0));
    }
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(k_tiles * c_vecs));
    let mut dp_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(k_tiles * c_vecs));
    // The reach's gradient, per row half (soft edge only).
    let mut row_grad = Array::<f32>::new(2usize);
    row_grad[0] = f32::new(0.0);
    row_grad[1] = f32::new(0.0);
    let always_masked = comptime!(rules.dropout || rules.has_terms());

    let mut stage = 0usize;
    for s in 0..steps {
        let t0 = list.tile_start(s, partial_index, full_index, k_tiles_per_block, block_k);
        let has_next = s + 1 < steps;
        let mut next = 0i32;
        if has_next {
            next = list.tile_start(s + 1, partial_index, full_index, k_tiles_per_block, block_k);
        }
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
            has_next,
            stage,
            tid,
            k_tile,
            v_tile,
            true,
        );
        let k_buf = stage * comptime!(k_tile.len());
        let v_buf = stage * comptime!(v_tile.len());
        let masked = s / k_tiles_per_block < list.partial || always_masked;
        if t0 < seq_k as i32 && w0 < seq_q {
            // S = Q K^T, dP = dO V^T.
            mma.a_bt(
                lane,
                &q_smem,
                warp * 16 * d_stride,
                &k_smem,
                k_buf,
                &mut s_acc,
                d_stride,
                d_stride,
                dim_pad / 16,
                k_tiles,
            );
            mma.a_bt(
                lane,
                &do_smem,
                warp * 16 * v_stride,
                &v_smem,
                v_buf,
                &mut dp_acc,
                v_stride,
                v_stride,
                value_dim_pad / 16,
                k_tiles,
            );
            #[unroll]
            for kt in 0..k_tiles {
                #[unroll]
                for e in 0..4usize {
                    let i = w0 + g + 8 * (e / 2);
                    let j = t0 as usize + kt * 8 + 2 * t + e % 2;
                    let x = sparse_logit(
                        &element_rules,
                        acc_get(&s_acc, kt, e, c_vs),
                        scale,
                        masked,
                        b,
                        h,
                        i,
                        j,
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
                    );
                    let mut p = softmax_exp(x.x - lse_row[e / 2], MMA_PTX);
                    if x.hidden {
                        p = f32::new(0.0);
                    }
                    let ds = p * (acc_get(&dp_acc, kt, e, c_vs) * x.keep - d_row[e / 2]);
                    if comptime!(rules.soft_edge) {
                        row_grad[e / 2] += ds * x.slope;
                    }
                    acc_set(&mut s_acc, kt, e, c_vs, ds * x.d_cap);
                }
            }
            // dQ += dS K.
            mma.acc_b(
                lane,
                &s_acc,
                &k_smem,
                k_buf,
                &mut dq_acc,
                d_stride,
                block_k / 16,
                dq_tiles,
            );
        }
        // Every plane is done with this K/V buffer before it is staged again.
        sync_cube();
        stage = 1 - stage;
    }

    if comptime!(rules.soft_edge) {
        write_row_sums(d_reach, &row_grad, b, h, w0, g, t, seq_q);
    }
    // dQ over the plane's own rows of Q (read by no other plane; the last step's barrier
    // has passed, and without steps nothing was copied there).
    write_plane_gradient::<F, NQ>(
        &dq_acc,
        scale,
        &mut q_smem,
        dq,
        b,
        h,
        w0,
        warp,
        lane,
        seq_q,
        dim,
        d_stride,
        dq_tiles,
        c_vs,
        dim_pad,
    );
}

/// Matrix-unit sparse backward, key-major: `dK` and `dV`, summed over the query heads of
/// each kv head.
///
/// Launch as `flash_mma_backward_dkdv_kernel` (natural cube order, asynchronous staging),
/// after [`flash_mma_sparse_backward_dq_kernel()`] has written `delta`, with the transposed
/// lists (`[batch or 1, heads or 1, k_blocks]` counts, `[.., k_blocks, q_blocks]` query
/// blocks) on blocks of `q_tiles_per_block` tiles of this kernel's `block_q` query rows by
/// `k_tiles_per_block` of its cubes; with `rules.key_bias` it writes the bias's gradient
/// `d_key_bias` (f32 `[batch, heads, seq_k]`, per query head; a placeholder otherwise).
#[cube(
    launch_unchecked,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_sparse_backward_dkdv_kernel<F: Float, NK: Size, NV: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<Vector<F, NK>>,
    dv: &mut Tensor<Vector<F, NV>>,
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
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] warps: usize,
    #[comptime] block_q: usize,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let mut mma = PlaneMma::<F>::new();
    let c_vs = mma.def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = mma.def.vectors_per_lane(MatrixIdent::Accumulator);

    let cube = CubeHead::key_major(q, k, 0u32);
    let (b, kvh, h_first, group) = (cube.batch, cube.kv_head, cube.head, cube.group);
    let (seq_q, seq_k) = (cube.seq_q, cube.seq_k);
    let (dim, value_dim) = (q.shape(3), v.shape(3));
    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let g = lane / 4;
    let t = lane % 4;
    let block_kv = comptime!(16 * warps);
    let c0 = cube.block * block_kv;
    let w0 = c0 + warp * 16;
    comptime!(assert!(
        block_q <= 32 * warps,
        "block_q: one query row of lse and D per unit"
    ));

    // Shared memory as `flash_mma_backward_dkdv_kernel`'s, double-buffered Q, dO, lse, D.
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
    let mut q_smem = Shared::<[F]>::new_aligned_slice(comptime!(2 * q_tile.len()), 16usize);
    let mut do_smem = Shared::<[F]>::new_aligned_slice(comptime!(2 * do_tile.len()), 16usize);
    let mut lse_tile = Shared::<[f32]>::new_slice(comptime!(2 * block_q));
    let mut delta_tile = Shared::<[f32]>::new_slice(comptime!(2 * block_q));
    let tid = warp * 32 + lane;
    let k_at = HeadRows::new(k, b, kvh, seq_k, dim);
    let v_at = HeadRows::new(v, b, kvh, seq_k, value_dim);
    zero_pad_columns::<F>(&mut q_smem, dim, tid, q_tile, 2usize);
    zero_pad_columns::<F>(&mut do_smem, value_dim, tid, do_tile, 2usize);
    // K and V once, with plain loads: published, with the zeroed columns, by the
    // barriers' initialisation (it synchronises the cube).
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
    let barriers = BufferBarriers::new();

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
    // S^T then keep * P^T; dP^T then dS^T.
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(q_tiles * c_vecs));
    let mut dp_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(q_tiles * c_vecs));
    // The key bias's gradient of the current query head, per key half (key bias only).
    let mut key_grad = Array::<f32>::new(2usize);
    let always_masked = comptime!(rules.dropout || rules.has_terms());
    let key_block = cube.block / k_tiles_per_block as usize;

    let mut stage = 0usize;
    // The query heads of this kv head, in a fixed order.
    for gi in 0..group {
        let h = h_first + gi;
        key_grad[0] = f32::new(0.0);
        key_grad[1] = f32::new(0.0);
        let list = KeyBlockList::new(
            t_partial_count,
            t_partial_index,
            t_full_count,
            t_full_index,
            b,
            h,
            key_block,
        );
        let steps = list.len * q_tiles_per_block;
        if steps > 0 {
            // The head's first query tile; its lse and D with plain stores, published by
            // the cube barrier (the buffer was last read before the previous step's
            // closing barrier).
            let first = list.tile_start(
                0u32,
                t_partial_index,
                t_full_index,
                q_tiles_per_block,
                block_q,
            );
            let stats = issue_query_tile::<F>(
                q,
                d_out,
                lse,
                delta,
                &mut q_smem,
                &mut do_smem,
                &barriers,
                b,
                h,
                usize::cast_from(first),
                stage,
                tid,
                seq_q,
                dim,
                value_dim,
                q_tile,
                do_tile,
                block_q,
            );
            if tid < block_q {
                lse_tile[stage * block_q + tid] = live_lse(stats.lse);
                delta_tile[stage * block_q + tid] = stats.delta;
            }
            sync_cube();
        }
        for s in 0..steps {
            let t0 = list.tile_start(s, t_partial_index, t_full_index, q_tiles_per_block, block_q);
            let has_next = s + 1 < steps;
            // The next tile's copies, and this unit's row of its lse and D, in flight
            // during this step (`has_next` is uniform: every unit commits and arrives).
            let mut next_lse = f32::new(DEAD_LSE);
            let mut next_delta = f32::new(0.0);
            if has_next {
                let tn = list.tile_start(
                    s + 1,
                    t_partial_index,
                    t_full_index,
                    q_tiles_per_block,
                    block_q,
                );
                let stats = issue_query_tile::<F>(
                    q,
                    d_out,
                    lse,
                    delta,
                    &mut q_smem,
                    &mut do_smem,
                    &barriers,
                    b,
                    h,
                    usize::cast_from(tn),
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
            let q_buf = stage * comptime!(q_tile.len());
            let do_buf = stage * comptime!(do_tile.len());
            let st_at = stage * block_q;
            let masked = s / q_tiles_per_block < list.partial || always_masked;
            if t0 < seq_q as i32 && w0 < seq_k {
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
                #[unroll]
                for qt in 0..q_tiles {
                    #[unroll]
                    for e in 0..4usize {
                        let qc = qt * 8 + 2 * t + e % 2;
                        let key = w0 + g + 8 * (e / 2);
                        let x = sparse_logit(
                            &element_rules,
                            acc_get(&s_acc, qt, e, c_vs),
                            scale,
                            masked,
                            b,
                            h,
                            t0 as usize + qc,
                            key,
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
                        );
                        let mut p = softmax_exp(x.x - lse_tile[st_at + qc], MMA_PTX);
                        if x.hidden {
                            p = f32::new(0.0);
                        }
                        let ds =
                            p * (acc_get(&dp_acc, qt, e, c_vs) * x.keep - delta_tile[st_at + qc]);
                        if comptime!(rules.key_bias) {
                            key_grad[e / 2] += ds;
                        }
                        acc_set(&mut s_acc, qt, e, c_vs, p * x.keep);
                        acc_set(&mut dp_acc, qt, e, c_vs, ds * x.d_cap);
                    }
                }
                // dV += (keep * P)^T dO, dK += dS^T Q.
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
            // The next step's lse and D into the other buffer, with plain stores: it was
            // last read before the previous step's closing barrier, and is next read after
            // this step's (as in `flash_mma_backward_dkdv_kernel`).
            if has_next && tid < block_q {
                let other = 1 - stage;
                lse_tile[other * block_q + tid] = live_lse(next_lse);
                delta_tile[other * block_q + tid] = next_delta;
            }
            // Every plane is done with this Q/dO (and lse/D) buffer before it is staged
            // again.
            sync_cube();
            stage = 1 - stage;
        }
        if comptime!(rules.key_bias) {
            write_row_sums(d_key_bias, &key_grad, b, h, w0, g, t, seq_k);
        }
    }

    // dK and dV over the plane's own rows of K and V (read by no other plane).
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
