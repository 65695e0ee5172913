//! The matrix-unit forward over a block-sparse plan: `flash_mma`'s key-tile step
//! (`components::mma_forward`) on the key blocks a query block's lists name
//! (`components::key_blocks`), with the element rules (`components::element_rules`) on
//! the partially visible ones as the softmax step's hide bits, and the score terms of
//! every visited tile as per-lane biases (`ElementRules::term`). A list's block is
//! `q_tiles_per_block` cubes of query rows by `k_tiles_per_block` key tiles, as in
//! `flash_unit_sparse`.

use cubecl::cmma::MatrixIdent;
use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;

use crate::components::band::BandBounds;
use crate::components::element_rules::{ElementRules, RuleSet};
use crate::components::epilogue::write_output_rows;
use crate::components::exp::MMA_PTX;
use crate::components::fragments::{acc_get, acc_set, MmaVecAcc};
use crate::components::key_blocks::KeyBlockList;
use crate::components::mma_forward::mma_key_tile;
use crate::components::pipeline::{stage_pair, BufferBarriers};
use crate::components::products::{ForwardProducts, ProductTile};
use crate::components::schedule::CubeHead;
use crate::components::softmax::{flag_bit, TileBand, NEG_BIG};
use crate::components::staging::{
    stage_rows_async, stage_rows_sync, zero_pad_columns, HeadRows, StageTile,
};

/// Matrix-unit FlashAttention forward over a block-sparse plan, products by `P`.
///
/// Launch as `flash_mma_kernel` (natural cube order), with the lists and rules of
/// `flash_unit_sparse_kernel` (a list's query block is `q_tiles_per_block` cubes, its key
/// block `k_tiles_per_block` tiles of `block_k` keys) and `unbounded` = `seq_q + seq_k`.
/// Outputs as `flash_mma_kernel`; a row whose lists are empty outputs 0 with lse `neg_inf`.
/// With `rules.dropout`, probabilities are dropped as `ElementRules::drops` says; score
/// terms (`key_bias`, `reach`) as in `flash_unit_sparse_kernel`.
#[cube(
    launch_unchecked,
    address_type = "dynamic",
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_sparse_kernel<F: Float, P: ForwardProducts, N: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
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
    element_rules: ElementRules,
    q_tiles_per_block: u32,
    k_tiles_per_block: u32,
    scale: f32,
    unbounded: i32,
    neg_inf: f32,
    #[comptime] rules: RuleSet,
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
    let cube = CubeHead::query_major(q, k, 0u32);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let (dim, value_dim) = (q.shape(3), v.shape(3));
    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let plane_q = comptime!(16 * m_tiles);
    let block_q = comptime!(plane_q * warps);
    let r0 = cube.block * block_q;
    let w0 = r0 + warp * plane_q;
    // Unbounded sides: every key is in the band, the rules carry the mask.
    let (left, right) = (unbounded, unbounded);
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
    // This lane's flag bits: hidden and dropped per accumulator element, 32 per word.
    let words = comptime!((m_tiles * tile.k_tiles * 8).div_ceil(32));
    let mut hide = Array::<u32>::new(words);
    // And its score terms, one per accumulator element.
    let terms = comptime!(rules.has_terms());
    let mut bias = Array::<f32>::new(comptime!(if terms {
        m_tiles * tile.k_tiles * 4
    } else {
        1
    }));

    // Q and the first key tile (asynchronously: committed together on buffer 0).
    let mut stage = 0usize;
    if comptime!(async_copy) {
        if steps > 0 {
            stage_rows_async::<F>(q, q_at, r0, &mut q_smem, 0usize, tid, q_tile);
            let t0 = list.tile_start(0u32, partial_index, full_index, k_tiles_per_block, block_k);
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

    let bk_i = block_k as i32;
    for s in 0..steps {
        let t0 = list.tile_start(s, partial_index, full_index, k_tiles_per_block, block_k);
        let has_next = s + 1 < steps;
        let mut next = 0i32;
        if has_next {
            next = list.tile_start(s + 1, partial_index, full_index, k_tiles_per_block, block_k);
        }
        // With dropout or score terms every tile takes its flags.
        let masked = s / k_tiles_per_block < list.partial || comptime!(rules.dropout || terms);
        let visit = t0 < seq_k as i32 && bounds.plane_sees(t0, t0 + bk_i - 1);
        if masked {
            #[unroll]
            for w in 0..words {
                hide[w] = 0u32;
            }
            #[unroll]
            for mt in 0..m_tiles {
                #[unroll]
                for kt in 0..tile.k_tiles {
                    #[unroll]
                    for e in 0..4usize {
                        let i = band.row_a as usize + 16 * mt + 8 * (e / 2);
                        let j = t0 as usize + kt * 8 + 2 * band.t + e % 2;
                        let verdict = element_rules.element(
                            b, h, i, j, seq_q, seq_k, layout, padding, doc_q, doc_k, dense, seed,
                            key_bias, reach, slopes, rules,
                        );
                        if comptime!(terms) {
                            bias[(mt * tile.k_tiles + kt) * 4 + e] = verdict.bias;
                        }
                        let flags = select(verdict.hidden, 1u32, 0u32)
                            | select(verdict.dropped, 2u32, 0u32);
                        let at = flag_bit(mt * tile.k_tiles + kt, e);
                        hide[at / 32] |= flags << (at % 32) as u32;
                    }
                }
            }
        }
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
            &hide,
            &bias,
            element_rules.softcap,
            band,
            scale,
            t0,
            next,
            has_next,
            visit,
            masked,
            stage,
            tid,
            k_tile,
            v_tile,
            tile,
            c_vs,
            MMA_PTX,
            async_copy,
            true,
            comptime!(rules.dropout),
            terms,
            comptime!(rules.softcap),
        );
        if comptime!(async_copy) {
            stage = 1 - stage;
        }
    }

    // Dropout: the kept probabilities' share, 1 / (1 - p), on the output accumulators
    // (f32) rather than on P (which the products round to the input dtype).
    if comptime!(rules.dropout) {
        #[unroll]
        for t in 0..comptime!(m_tiles * tile.v_tiles) {
            #[unroll]
            for e in 0..4usize {
                let o = acc_get(&o_acc, t, e, c_vs);
                acc_set(&mut o_acc, t, e, c_vs, o * element_rules.keep_scale);
            }
        }
    }

    write_output_rows::<F, N>(
        &o_acc,
        &m_row,
        &l_row,
        &mut q_smem,
        out,
        lse,
        b,
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
