//! The matrix-unit FlashAttention forward (CUDA `mma.sync`), one kernel for f16/bf16
//! ([`Ldmatrix16`](crate::components::products::Ldmatrix16)) and for f32 inputs on tf32
//! ([`Tf32Lanes`](crate::components::products::Tf32Lanes)): the two differ only in how
//! they load fragments (`components::products`).
//!
//! One cube of `warps` planes handles `16 * m_tiles * warps` query rows of one (batch,
//! head); each plane owns `16 * m_tiles` rows (one or two `m16` row tiles) for the whole
//! pass (FlashAttention-2's split: no cross-plane reduction). The cube stages its Q tile
//! once, and K and V per key tile of `block_k` keys (`components::pipeline`); each plane
//! computes `S = Q K^T` on the matrix units, the online softmax on the accumulator
//! registers (`components::softmax`), and `O += P V` with `P` taken from the `S`
//! registers, so the probabilities never leave registers. The band arithmetic is
//! `components::band`'s.

use cubecl::cmma::MatrixIdent;
use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;

use crate::components::band::BandBounds;
use crate::components::epilogue::write_output_rows;
use crate::components::exp::MMA_PTX;
use crate::components::fragments::MmaVecAcc;
use crate::components::mma_forward::mma_key_tile;
use crate::components::pipeline::{stage_pair, BufferBarriers};
use crate::components::products::{ForwardProducts, ProductTile};
use crate::components::schedule::CubeHead;
use crate::components::softmax::{TileBand, NEG_BIG};
use crate::components::staging::{
    stage_rows_async, stage_rows_sync, zero_pad_columns, HeadRows, StageTile,
};

/// Matrix-unit FlashAttention forward, products by `P`.
///
/// Launch with `CubeDim::new_2d(32, warps)` and `CubeCount::Static(ceil(seq_q / (16 *
/// m_tiles * warps)), batch * heads, 1)`. `dim_pad` and `value_dim_pad` are the head and
/// value dims rounded up to the products' `k` (16, or 8 on tf32); `block_k` is a multiple
/// of 16; `row_pad` is the shared-memory row padding and copy chunk (16 bytes of the
/// dtype). Outputs as `flash_unit_kernel`, except that `out` must be contiguous and is
/// written `N` values per store: `N` must divide the value dim, and must be 1 where
/// `value_dim_pad > dim_pad` (the epilogue stages output rows in Q's shared-memory rows,
/// which are too narrow there, and stores one value at a time).
///
/// `async_copy` stages with `cp.async` into two K/V buffers, the next key tile's copies in
/// flight while the current one is computed (one cube barrier per tile instead of two). It
/// needs contiguous rows of Q, K and V, head and value dims that are multiples of
/// `row_pad` and 16-byte aligned rows (the plan checks); otherwise the kernel stages with
/// plain loads into one buffer. `heavy_first`: heads per group of the heavy-first cube
/// order (0: the natural order; see `schedule::cube_block`); any value computes the same
/// result. Exponentials through PTX's `ex2.approx` (`components::exp`): CUDA only, as
/// the plans launch it.
#[cube(
    launch_unchecked,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_kernel<F: Float, P: ForwardProducts, N: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    scale: f32,
    left: i32,
    right: i32,
    heavy_first: u32,
    neg_inf: f32,
    split_keys: i32,
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] warps: usize,
    #[comptime] m_tiles: usize,
    #[comptime] block_k: usize,
    #[comptime] row_pad: usize,
    #[comptime] async_copy: bool,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    P::register::<F>();
    // Both products accumulate in f32 `m16n8` tiles: the accumulator's layout depends on
    // nothing else, so any `m16n8` definition gives it.
    let acc = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let c_vs = acc.vector_size(MatrixIdent::Accumulator);
    let c_vecs = acc.vectors_per_lane(MatrixIdent::Accumulator);

    // The cube's rows, this plane's, and the keys they see.
    let cube = CubeHead::query_major(q, k, heavy_first);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let (dim, value_dim) = (q.shape(3), v.shape(3));
    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let plane_q = comptime!(16 * m_tiles);
    let block_q = comptime!(plane_q * warps);
    let r0 = cube.block * block_q;
    let w0 = r0 + warp * plane_q;
    let bounds = BandBounds::new(r0, w0, seq_q, seq_k, offset, left, right, block_q, plane_q);
    let band = TileBand {
        plane_full: bounds.plane_full,
        full_lo: bounds.full_lo,
        full_hi: bounds.full_hi,
        row_a: (w0 + lane / 4) as i32,
        t: lane % 4,
        offset,
        left,
        right,
        seq_k,
    };

    // Shared memory, all `[row][d]` with rows padded by 16 bytes (distinct banks for the
    // fragment loads) and 16-byte aligned (for `ldmatrix` and `cp.async`; the allocator
    // otherwise aligns to the element size): the cube's Q tile, staged once, and one or two
    // K and V buffers.
    let buffers = comptime!(if async_copy { 2usize } else { 1usize });
    let threads = comptime!(32 * warps);
    let tiles = comptime!(StageTile::head_and_value(
        block_q,
        dim_pad,
        value_dim_pad,
        threads,
        row_pad
    ));
    let (q_tile, q_value_tile) = comptime!(tiles);
    let (k_tile, v_tile) = comptime!((q_tile.with_rows(block_k), q_value_tile.with_rows(block_k)));
    let tile = comptime!(ProductTile {
        m_tiles,
        k_tiles: block_k / 8,
        v_tiles: value_dim_pad / 8,
        d_pad: dim_pad,
        q_stride: q_tile.stride,
        k_stride: k_tile.stride,
        v_stride: v_tile.stride,
    });
    let mut q_smem = Shared::<[F]>::new_aligned_slice(comptime!(q_tile.len()), 16usize);
    let mut k_smem = Shared::<[F]>::new_aligned_slice(comptime!(buffers * k_tile.len()), 16usize);
    let mut v_smem = Shared::<[F]>::new_aligned_slice(comptime!(buffers * v_tile.len()), 16usize);
    let tid = warp * 32 + lane;
    let q_at = HeadRows::new(q, b, h, seq_q, dim);
    let k_at = HeadRows::new(k, b, kvh, seq_k, dim);
    let v_at = HeadRows::new(v, b, kvh, seq_k, value_dim);
    if comptime!(async_copy) {
        zero_pad_columns::<F>(&mut q_smem, dim, tid, q_tile, 1usize);
        zero_pad_columns::<F>(&mut k_smem, dim, tid, k_tile, buffers);
        zero_pad_columns::<F>(&mut v_smem, value_dim, tid, v_tile, buffers);
    }
    // Their initialisation synchronises the cube (publishing the zeroed columns).
    let barriers = BufferBarriers::new();

    // Output accumulators, scores, and per row half `2 * mt + hf` (rows 16 mt + g and
    // 16 mt + g + 8) the running maximum in scaled-score units and this lane's partial sum.
    let mut o_acc =
        Array::<Vector<f32, MmaVecAcc>>::new(comptime!(m_tiles * tile.v_tiles * c_vecs));
    #[unroll]
    for i in 0..comptime!(m_tiles * tile.v_tiles * c_vecs) {
        o_acc[i] = Vector::new(f32::new(0.0));
    }
    let mut s_acc =
        Array::<Vector<f32, MmaVecAcc>>::new(comptime!(m_tiles * tile.k_tiles * c_vecs));
    let halves = comptime!(2 * m_tiles);
    let mut m_row = Array::<f32>::new(halves);
    let mut l_row = Array::<f32>::new(halves);
    #[unroll]
    for hf in 0..halves {
        m_row[hf] = f32::new(NEG_BIG);
        l_row[hf] = f32::new(0.0);
    }
    let lanes = P::lane_offsets(warp, lane, tile);

    // Q and the first key tile (asynchronously: committed together on buffer 0).
    let bk_i = block_k as i32;
    // This cube's split of the keys (`split_keys` a multiple of `block_k`, so no tile
    // straddles two splits; one split: `split_keys >= seq_k`).
    let split = CUBE_POS_Z as i32;
    let split_end = min(bounds.end, (split + 1) * split_keys);
    let lo = max(bounds.start, split * split_keys);
    let mut t0 = lo - (lo % bk_i);
    let mut stage = 0usize;
    if comptime!(async_copy) {
        if t0 < split_end {
            stage_rows_async::<F>(q, q_at, r0, &mut q_smem, 0usize, tid, q_tile);
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
    } else {
        stage_rows_sync::<F>(q, q_at, r0, &mut q_smem, 0usize, tid, q_tile);
    }

    // The block-sparse kernels' rule flags and score terms.
    let no_hide = Array::<u32>::new(1usize);
    let no_bias = Array::<f32>::new(1usize);
    while t0 < split_end {
        let next = t0 + bk_i;
        mma_key_tile::<F, P>(
            k,
            k_at,
            v,
            v_at,
            &q_smem,
            &mut k_smem,
            &mut v_smem,
            &barriers,
            lanes,
            &mut s_acc,
            &mut o_acc,
            &mut m_row,
            &mut l_row,
            &no_hide,
            &no_bias,
            1.0f32,
            band,
            scale,
            t0,
            next,
            next < split_end,
            bounds.plane_sees(t0, next - 1),
            false,
            stage,
            tid,
            k_tile,
            v_tile,
            tile,
            c_vs,
            MMA_PTX,
            async_copy,
            false,
            false,
            false,
            false,
        );
        t0 = next;
        if comptime!(async_copy) {
            stage = 1 - stage;
        }
    }

    // Row sums, normalised rows and log-sum-exp (staged through the plane's Q rows where
    // they fit).
    write_output_rows::<F, N>(
        &o_acc,
        &m_row,
        &l_row,
        &mut q_smem,
        out,
        lse,
        CUBE_POS_Z as usize * q.shape(0) + b,
        h,
        w0,
        warp,
        lane,
        seq_q,
        value_dim,
        neg_inf,
        m_tiles,
        q_tile.stride,
        c_vs,
        dim_pad,
        value_dim_pad,
        async_copy,
    );
}
