//! The matrix-unit FlashAttention forward kernel (CUDA `mma.sync.m16n8k16`, f16/bf16).
//!
//! One cube of `warps` planes handles `16 * m_tiles * warps` query rows of one (batch,
//! head); each plane owns `16 * m_tiles` rows (one or two `m16` row tiles) and keeps them
//! to itself for the whole pass (FlashAttention-2's split: no cross-plane reduction). The cube stages its Q tile once, and per key tile of
//! `block_k` keys K and V (all `[row][d]`, rows padded by 16 bytes so that `ldmatrix`
//! hits distinct banks); then each plane computes `S = Q K^T` with the matrix units
//! (fragments loaded with `ldmatrix`, four 8x8 blocks per instruction), the online softmax
//! on the accumulator registers, and `O += P V` with `P` taken straight from the `S`
//! registers (the accumulator layout of two `n8` tiles is the `A` layout of one `k16`
//! chunk), so the probabilities never leave registers; V's fragments come from
//! `ldmatrix.trans`, so V is staged as it is stored.
//!
//! The register layouts are those of PTX's `m16n8k16` (lane `l`: group `g = l / 4`,
//! `t = l % 4`; accumulator element `e` sits at row `g + 8 * (e / 2)`, column
//! `2 * t + e % 2`). The plan only picks this kernel where CubeCL reports that
//! instruction and `ldmatrix` for the dtype (CUDA, sm_80 and newer).
//!
//! Staging: where the layout allows 16-byte copies, K and V tiles are double-buffered with
//! `cp.async` (the next tile's copies in flight while this one is computed, one `mbarrier`
//! per buffer); otherwise plain loads into one buffer (see the kernel's `async_copy`).
//!
//! Band arithmetic is the portable kernel's (`flash_unit`): `i32`, key `j` visible to
//! query `i` iff `i + offset - left <= j <= i + offset + right` and `0 <= j < seq_k`.

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::components::epilogue::write_output_rows;
use crate::components::fragments::{
    acc_get, mma_pair, register_vector_sizes, MmaVecA, MmaVecAcc, MmaVecB,
};
use crate::components::schedule::cube_block;
use crate::components::softmax::{online_softmax_tile, TileBand, NEG_BIG};
use crate::components::staging::{stage_rows_async, stage_rows_sync, zero_pad_columns};

/// Matrix-unit FlashAttention forward.
///
/// Launch with `CubeDim::new_2d(32, warps)` and `CubeCount::Static(ceil(seq_q / (16 *
/// m_tiles * warps)), batch * heads, 1)`. `dim_pad` and `value_dim_pad` are the head and
/// value dims rounded up to 16; `block_k` is a multiple of 16. Each plane owns `16 *
/// m_tiles` query rows: with two row tiles every K and V fragment loaded from shared
/// memory feeds four MMAs instead of two (at the cost of twice the accumulator
/// registers). Outputs as `flash_unit_kernel`, except that `out` must be contiguous and is
/// written `N` values per store: `N` must divide the value dim, and must be 1 where
/// `value_dim_pad > dim_pad` (the epilogue stages output rows in Q's shared-memory rows,
/// which are too narrow there, and stores one value at a time).
///
/// `async_copy` stages with `cp.async` into two K/V buffers, the next key tile's copies
/// in flight while the current one is computed (one cube barrier per tile instead of
/// two). It needs contiguous rows of Q, K and V, head and value dims that are multiples
/// of 8 and 16-byte aligned rows (the plan checks); otherwise the kernel stages with
/// plain loads into one buffer.
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result.
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_mma_kernel<F: Float, N: Size>(
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
    #[comptime] dim_pad: usize,
    #[comptime] value_dim_pad: usize,
    #[comptime] warps: usize,
    #[comptime] m_tiles: usize,
    #[comptime] block_k: usize,
    #[comptime] async_copy: bool,
    #[define(F)] _dtype: StorageType,
) {
    let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    register_vector_sizes::<F>(def);
    let a_vs = def.vector_size(MatrixIdent::A);
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let b_vecs = def.vectors_per_lane(MatrixIdent::B);
    let c_vs = def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);

    let dim = q.shape(3);
    let value_dim = v.shape(3);
    let heads = q.shape(1);
    let seq_q = q.shape(2);
    let kv_heads = k.shape(1);
    let seq_k = k.shape(2);
    let cube = cube_block(heavy_first, true);
    let bh = cube.head;
    let b = bh / heads;
    let h = bh % heads;
    let kvh = h / (heads / kv_heads);

    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let g = lane / 4;
    let t = lane % 4;
    let plane_q = comptime!(16 * m_tiles);
    let block_q = comptime!(plane_q * warps);
    let r0 = cube.block * block_q;
    let w0 = r0 + warp * plane_q;
    let offset = seq_k as i32 - seq_q as i32;

    // Key range of the cube (union of its rows' bands) and of this plane.
    let r_last = min(r0 + block_q, seq_q) - 1;
    let k_start = max(r0 as i32 + offset - left, 0);
    let k_end = min(r_last as i32 + offset + right + 1, seq_k as i32);
    let w_last = min(w0 + plane_q - 1, seq_q - 1);
    let w_lo = w0 as i32 + offset - left;
    let w_hi = w_last as i32 + offset + right;
    // Keys visible to every row of the plane.
    let full_lo = w_last as i32 + offset - left;
    let full_hi = w0 as i32 + offset + right;
    let plane_rows = w0 < seq_q;
    let plane_full = w0 + plane_q <= seq_q;
    // This lane's first row (accumulator elements 0, 1; elements 2, 3 are 8 rows down;
    // row tile `mt` adds 16 * mt).
    let row_a = (w0 + g) as i32;

    // Shared memory, all `[row][d]` with rows padded by 8 values (16 bytes) so that the
    // eight row addresses of one `ldmatrix` hit distinct banks: the cube's Q tile, staged
    // once (fragments are read per head-dim chunk instead of living in registers), and
    // `stages` K and V tiles.
    let stages = comptime!(if async_copy { 2usize } else { 1usize });
    let d_chunks = comptime!(dim_pad / 16);
    let q_stride = comptime!(dim_pad + 8);
    let k_stride = comptime!(dim_pad + 8);
    let v_stride = comptime!(value_dim_pad + 8);
    let k_stage = comptime!(block_k * (dim_pad + 8));
    let v_stage = comptime!(block_k * (value_dim_pad + 8));
    // 16-byte aligned: `ldmatrix` rows and `cp.async` destinations must be (the allocator
    // otherwise aligns to the element size, and may place the 8-byte barriers first).
    let mut q_smem = SharedMemory::<F>::new_aligned(comptime!(block_q * (dim_pad + 8)), 16usize);
    let mut k_smem =
        SharedMemory::<F>::new_aligned(comptime!(stages * block_k * (dim_pad + 8)), 16usize);
    let mut v_smem =
        SharedMemory::<F>::new_aligned(comptime!(stages * block_k * (value_dim_pad + 8)), 16usize);
    let threads = comptime!(32 * warps);
    let tid = warp * 32 + lane;
    let q_base = b * q.stride(0) + h * q.stride(1);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);
    if comptime!(async_copy) {
        zero_pad_columns::<F>(&mut q_smem, dim, tid, block_q, dim_pad, q_stride, threads);
        zero_pad_columns::<F>(
            &mut k_smem,
            dim,
            tid,
            comptime!(stages * block_k),
            dim_pad,
            k_stride,
            threads,
        );
        zero_pad_columns::<F>(
            &mut v_smem,
            value_dim,
            tid,
            comptime!(stages * block_k),
            value_dim_pad,
            v_stride,
            threads,
        );
    }
    // One barrier per K/V buffer (their initialisation synchronises the cube, which also
    // publishes the zeroed columns). Unused by the synchronous staging.
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    let v_tiles = comptime!(value_dim_pad / 8);
    let k_tiles = comptime!(block_k / 8);
    // Accumulator tile `mt * v_tiles + vt` (O) and `mt * k_tiles + kt` (S) of row tile mt.
    let mut o_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(m_tiles * v_tiles * c_vecs));
    #[unroll]
    for i in 0..comptime!(m_tiles * v_tiles * c_vecs) {
        o_acc[i] = Vector::new(f32::new(0.0));
    }
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(m_tiles * k_tiles * c_vecs));
    // The A fragments of every row tile, and the one an MMA takes.
    let mut a_all = Array::<Vector<F, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
    let mut a_frag = Array::<Vector<F, MmaVecA>>::new(a_vecs);
    let mut b_frag = Array::<Vector<F, MmaVecB>>::new(b_vecs);
    // ldmatrix x4: lane l gives the address of row l % 8 of 8x8 block l / 8.
    let ld_block = lane / 8;
    let ld_row = lane % 8;
    // Each lane's part of its `ldmatrix` addresses, fixed for the whole pass (the rest is
    // a constant of the unrolled loops): Q's A blocks (rows 0-7 | 8-15) x (d 0-7 | 8-15),
    // K's B blocks (keys 0-7 | 8-15) x (d 0-7 | 8-15), V's transposed B blocks likewise.
    let q_lane = (warp * plane_q + ld_row + 8 * (ld_block % 2)) * q_stride + 8 * (ld_block / 2);
    let k_lane = (8 * (ld_block / 2) + ld_row) * k_stride + 8 * (ld_block % 2);
    let v_lane = (8 * (ld_block % 2) + ld_row) * v_stride + 8 * (ld_block / 2);
    let mut c_frag = Array::<Vector<f32, MmaVecAcc>>::new(c_vecs);
    // Per row half `2 * mt + hf` (rows 16 mt + g and 16 mt + g + 8): running max in
    // scaled-score units and this lane's partial row sum.
    let halves = comptime!(2 * m_tiles);
    let mut m_row = Array::<f32>::new(halves);
    let mut l_row = Array::<f32>::new(halves);
    // The plane's band for the online-softmax step (fixed for the pass).
    let band = TileBand {
        plane_full,
        full_lo,
        full_hi,
        row_a,
        t,
        offset,
        left,
        right,
        seq_k,
    };
    #[unroll]
    for hf in 0..halves {
        m_row[hf] = f32::new(NEG_BIG);
        l_row[hf] = f32::new(0.0);
    }

    let (k_sn, k_sd) = (k.stride(2), k.stride(3));
    let (v_sn, v_sd) = (v.stride(2), v.stride(3));

    let bk_i = block_k as i32;
    let mut t0 = k_start - (k_start % bk_i);
    // The buffer holding tile t0 (always 0 with synchronous staging).
    let mut stage = 0usize;
    if comptime!(async_copy) {
        if t0 < k_end {
            let t0u = usize::cast_from(t0);
            stage_rows_async::<F>(
                q,
                q_base,
                q.stride(2),
                r0,
                seq_q,
                dim,
                &mut q_smem,
                0usize,
                tid,
                block_q,
                dim_pad,
                q_stride,
                threads,
                8usize,
            );
            stage_rows_async::<F>(
                k,
                k_base,
                k_sn,
                t0u,
                seq_k,
                dim,
                &mut k_smem,
                0usize,
                tid,
                block_k,
                dim_pad,
                k_stride,
                threads,
                8usize,
            );
            stage_rows_async::<F>(
                v,
                v_base,
                v_sn,
                t0u,
                seq_k,
                value_dim,
                &mut v_smem,
                0usize,
                tid,
                block_k,
                value_dim_pad,
                v_stride,
                threads,
                8usize,
            );
            bar0.commit_copy_async();
        }
    } else {
        stage_rows_sync::<F>(
            q,
            q_base,
            q.stride(2),
            q.stride(3),
            r0,
            seq_q,
            dim,
            &mut q_smem,
            0usize,
            tid,
            block_q,
            dim_pad,
            q_stride,
            threads,
        );
    }

    while t0 < k_end {
        let t0u = usize::cast_from(t0);
        if comptime!(async_copy) {
            // Issue the next tile into the other buffer (last read before the previous
            // iteration's closing barrier), then wait for this one.
            let next = t0 + bk_i;
            if next < k_end {
                let other = 1 - stage;
                let nu = usize::cast_from(next);
                stage_rows_async::<F>(
                    k,
                    k_base,
                    k_sn,
                    nu,
                    seq_k,
                    dim,
                    &mut k_smem,
                    other * k_stage,
                    tid,
                    block_k,
                    dim_pad,
                    k_stride,
                    threads,
                    8usize,
                );
                stage_rows_async::<F>(
                    v,
                    v_base,
                    v_sn,
                    nu,
                    seq_k,
                    value_dim,
                    &mut v_smem,
                    other * v_stage,
                    tid,
                    block_k,
                    value_dim_pad,
                    v_stride,
                    threads,
                    8usize,
                );
                if other == 0 {
                    bar0.commit_copy_async();
                } else {
                    bar1.commit_copy_async();
                }
            }
            if stage == 0 {
                bar0.arrive_and_wait();
            } else {
                bar1.arrive_and_wait();
            }
        } else {
            stage_rows_sync::<F>(
                k,
                k_base,
                k_sn,
                k_sd,
                t0u,
                seq_k,
                dim,
                &mut k_smem,
                0usize,
                tid,
                block_k,
                dim_pad,
                k_stride,
                threads,
            );
            stage_rows_sync::<F>(
                v,
                v_base,
                v_sn,
                v_sd,
                t0u,
                seq_k,
                value_dim,
                &mut v_smem,
                0usize,
                tid,
                block_k,
                value_dim_pad,
                v_stride,
                threads,
            );
            sync_cube();
        }
        let k_at = stage * k_stage + k_lane;
        let v_at = stage * v_stage + v_lane;

        let tile_hi = t0 + bk_i - 1;
        let plane_sees = plane_rows && tile_hi >= w_lo && t0 <= w_hi;
        if plane_sees {
            // S = Q K^T: per head-dim chunk, one A fragment per row tile, each K fragment
            // reused over the row tiles.
            #[unroll]
            for i in 0..comptime!(m_tiles * k_tiles * c_vecs) {
                s_acc[i] = Vector::new(f32::new(0.0));
            }
            #[unroll]
            for dc in 0..d_chunks {
                #[unroll]
                for mt in 0..m_tiles {
                    let q_off = q_lane + mt * 16 * q_stride + dc * 16;
                    let a_regs = def.load_matrix::<F, MmaVecA>(
                        &q_smem.slice(q_off, q_off + 8),
                        MatrixIdent::A,
                        4usize,
                        false,
                    );
                    #[unroll]
                    for i in 0..a_vecs {
                        a_all[mt * a_vecs + i] = a_regs[i];
                    }
                }
                #[unroll]
                for kp in 0..comptime!(k_tiles / 2) {
                    // B for key tiles 2kp and 2kp + 1 (K rows being B's columns).
                    let k_off = k_at + kp * 16 * k_stride + dc * 16;
                    let b_regs = def.load_matrix::<F, MmaVecB>(
                        &k_smem.slice(k_off, k_off + 8),
                        MatrixIdent::B,
                        4usize,
                        false,
                    );
                    #[unroll]
                    for mt in 0..m_tiles {
                        #[unroll]
                        for i in 0..a_vecs {
                            a_frag[i] = a_all[mt * a_vecs + i];
                        }
                        mma_pair::<F>(
                            def,
                            &a_frag,
                            &b_regs,
                            &mut s_acc,
                            mt * k_tiles + 2 * kp,
                            &mut b_frag,
                            &mut c_frag,
                            b_vecs,
                            c_vecs,
                        );
                    }
                }
            }

            // Scale, mask and softmax on the score registers (shared with the other
            // matrix-unit forward).
            online_softmax_tile(
                &mut s_acc, &mut o_acc, &mut m_row, &mut l_row, scale, band, t0, m_tiles, k_tiles,
                v_tiles, c_vs,
            );

            // O += P V: key chunk kc covers accumulator tiles 2kc (A elements 0..4) and
            // 2kc + 1 (A elements 4..8) of each row tile.
            #[unroll]
            for kc in 0..comptime!(block_k / 16) {
                #[unroll]
                for mt in 0..m_tiles {
                    #[unroll]
                    for i in 0..a_vecs {
                        let mut vector = Vector::empty();
                        #[unroll]
                        for n in 0..a_vs {
                            let ei = i * a_vs + n;
                            let tile = mt * k_tiles + kc * 2 + ei / 4;
                            vector[n] = F::cast_from(acc_get(&s_acc, tile, ei % 4, c_vs));
                        }
                        a_all[mt * a_vecs + i] = vector;
                    }
                }
                #[unroll]
                for vp in 0..comptime!(v_tiles / 2) {
                    // B for value tiles 2vp and 2vp + 1 from V [key][d] transposed.
                    let v_off = v_at + kc * 16 * v_stride + vp * 16;
                    let b_regs = def.load_matrix::<F, MmaVecB>(
                        &v_smem.slice(v_off, v_off + 8),
                        MatrixIdent::B,
                        4usize,
                        true,
                    );
                    #[unroll]
                    for mt in 0..m_tiles {
                        #[unroll]
                        for i in 0..a_vecs {
                            a_frag[i] = a_all[mt * a_vecs + i];
                        }
                        mma_pair::<F>(
                            def,
                            &a_frag,
                            &b_regs,
                            &mut o_acc,
                            mt * v_tiles + 2 * vp,
                            &mut b_frag,
                            &mut c_frag,
                            b_vecs,
                            c_vecs,
                        );
                    }
                }
            }
        }
        // Every plane is done with this buffer before it is staged again.
        sync_cube();
        t0 += bk_i;
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
        b,
        h,
        w0,
        warp,
        lane,
        seq_q,
        value_dim,
        neg_inf,
        m_tiles,
        q_stride,
        c_vs,
        dim_pad,
        value_dim_pad,
        async_copy,
    );
}
