//! The matrix-unit FlashAttention forward for f32 inputs (CUDA `mma.sync.m16n8k8` on
//! tf32, f32 accumulation).
//!
//! Structure, band arithmetic and online softmax are `flash_mma`'s: one cube of `warps`
//! planes, each owning `16 * m_tiles` query rows for the whole pass (no cross-plane
//! reduction); the cube stages its Q tile once and K and V per key tile of `block_k` keys
//! (double-buffered with `cp.async` where rows allow 16-byte copies, else plain loads into
//! one buffer); the softmax runs on the accumulator registers. What differs is how the
//! fragments are built, because `ldmatrix` moves 16-bit elements only:
//! - every fragment element is read from shared memory by the lane that needs it, from
//!   `[row][d]` tiles whose rows are padded by 4 floats (a row stride of 4 mod 8 words, so
//!   the 32 reads of one fragment hit 32 distinct banks), and rounded to tf32 on the way
//!   (CubeCL's cast to `tf32`, `cvt.rna.tf32.f32`);
//! - `O += P V` takes `P` from the lane's own `S` accumulator registers, without shuffles,
//!   by ordering the 8 keys of each `k8` chunk as `0, 2, 4, 6, 1, 3, 5, 7`: the `A` elements
//!   of lane `(g, t)` at reduction indices `t` and `t + 4` are then keys `2t` and `2t + 1`,
//!   which are its accumulator elements 0 and 1 (row `g`) and 2 and 3 (row `g + 8`); the `B`
//!   fragment reads the V rows of the same keys. A sum over keys does not depend on their
//!   order.
//!
//! The register layouts are PTX's `m16n8k8` tf32 ones (lane `l`: `g = l / 4`, `t = l % 4`):
//! `A` (16x8, row-major) `a0 = A[g][t]`, `a1 = A[g + 8][t]`, `a2 = A[g][t + 4]`,
//! `a3 = A[g + 8][t + 4]`; `B` (8x8, `B[k][n]`) `b0 = B[t][g]`, `b1 = B[t + 4][g]`; the
//! accumulator as for `m16n8k16` (element `e` at row `g + 8 * (e / 2)`, column
//! `2 * t + e % 2`). CubeCL hands a fragment array to the instruction in array order
//! (`a0..a3`, `b0, b1`, `c0..c3`), one tf32 per 32-bit register.
//!
//! tf32 keeps 10 of f32's 23 mantissa bits: results differ from full f32 at about 1e-3
//! relative (as with PyTorch's `allow_tf32`), so the core runs this kernel on request
//! only (`AttentionOptions::tf32`; the plan is `plan::ForwardKernel::Tf32`).

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::components::epilogue::write_output_rows;
use crate::components::fragments::{acc_get, register_vector_sizes, MmaVecA, MmaVecAcc, MmaVecB};
use crate::components::schedule::cube_block;
use crate::components::softmax::{online_softmax_tile, TileBand, NEG_BIG};
use crate::components::staging::{stage_rows_async, stage_rows_sync, zero_pad_columns};

/// Sets element `e` of a fragment (`vs` elements per vector) to `value` cast to `T`: with
/// `T = tf32`, rounded to tf32. (`e` is a constant once the callers' loops are unrolled.)
#[cube]
fn set_elem<T: Float, N: Size>(
    frag: &mut Array<Vector<T, N>>,
    e: usize,
    #[comptime] vs: usize,
    value: f32,
) {
    let mut vector = frag[e / vs];
    vector[e % vs] = T::cast_from(value);
    frag[e / vs] = vector;
}

/// One MMA: accumulator tile `tile` of `acc` += `A` times `B`. `c_frag` is scratch (the
/// instruction takes whole arrays).
#[cube]
fn mma_tile(
    def: MmaDefinition<tf32, tf32, f32>,
    a_frag: &Array<Vector<tf32, MmaVecA>>,
    b_frag: &Array<Vector<tf32, MmaVecB>>,
    acc: &mut Array<Vector<f32, MmaVecAcc>>,
    tile: usize,
    c_frag: &mut Array<Vector<f32, MmaVecAcc>>,
    #[comptime] c_vecs: usize,
) {
    #[unroll]
    for i in 0..c_vecs {
        c_frag[i] = acc[tile * c_vecs + i];
    }
    def.execute_inplace(a_frag, b_frag, c_frag);
    #[unroll]
    for i in 0..c_vecs {
        acc[tile * c_vecs + i] = c_frag[i];
    }
}

/// Matrix-unit FlashAttention forward for f32 inputs (tf32 products, f32 accumulation).
///
/// Launch with `CubeDim::new_2d(32, warps)` and `CubeCount::Static(ceil(seq_q / (16 *
/// m_tiles * warps)), batch * heads, 1)`. `dim_pad` and `value_dim_pad` are the head and
/// value dims rounded up to 8 (the `k` of the instruction); `block_k` is a multiple of 8.
/// Each plane owns `16 * m_tiles` query rows. Outputs as `flash_unit_kernel`, with
/// `flash_mma_kernel`'s output contract (contiguous `out`, `N` values per store, `N`
/// dividing the value dim, and 1 where `value_dim_pad > dim_pad`).
///
/// `async_copy` stages with `cp.async` into two K/V buffers, the next key tile's copies in
/// flight while the current one is computed. It needs contiguous rows of Q, K and V, head
/// and value dims that are multiples of 4 and 16-byte aligned rows (the plan checks);
/// otherwise the kernel stages with plain loads into one buffer.
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result.
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub fn flash_tf32_kernel<N: Size>(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    out: &mut Tensor<Vector<f32, N>>,
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
) {
    let def = MmaDefinition::<tf32, tf32, f32>::new(16usize, 8usize, 8usize);
    register_vector_sizes::<tf32>(def);
    let a_vs = def.vector_size(MatrixIdent::A);
    let a_vecs = def.vectors_per_lane(MatrixIdent::A);
    let b_vs = def.vector_size(MatrixIdent::B);
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

    // Shared memory, all `[row][d]` with rows padded by 4 floats: with a stride of 4 mod 8
    // words, the reads of one fragment (rows g, columns t for Q and K; rows 2t and 2t + 1,
    // columns g for V) fall in 32 distinct banks, and rows stay 16-byte aligned for
    // `cp.async`. The cube's Q tile is staged once (fragments are re-read per key tile
    // instead of living in registers), then `stages` K and V tiles.
    let stages = comptime!(if async_copy { 2usize } else { 1usize });
    let d_chunks = comptime!(dim_pad / 8);
    let q_stride = comptime!(dim_pad + 4);
    let k_stride = comptime!(dim_pad + 4);
    let v_stride = comptime!(value_dim_pad + 4);
    let k_stage = comptime!(block_k * (dim_pad + 4));
    let v_stage = comptime!(block_k * (value_dim_pad + 4));
    // 16-byte aligned: `cp.async` destinations must be (the allocator otherwise aligns to
    // the element size, and may place the 8-byte barriers first).
    let mut q_smem = SharedMemory::<f32>::new_aligned(comptime!(block_q * (dim_pad + 4)), 16usize);
    let mut k_smem =
        SharedMemory::<f32>::new_aligned(comptime!(stages * block_k * (dim_pad + 4)), 16usize);
    let mut v_smem = SharedMemory::<f32>::new_aligned(
        comptime!(stages * block_k * (value_dim_pad + 4)),
        16usize,
    );
    let threads = comptime!(32 * warps);
    let tid = warp * 32 + lane;
    let q_base = b * q.stride(0) + h * q.stride(1);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);
    if comptime!(async_copy) {
        zero_pad_columns::<f32>(&mut q_smem, dim, tid, block_q, dim_pad, q_stride, threads);
        zero_pad_columns::<f32>(
            &mut k_smem,
            dim,
            tid,
            comptime!(stages * block_k),
            dim_pad,
            k_stride,
            threads,
        );
        zero_pad_columns::<f32>(
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
    // The A fragments of every row tile, the A and B fragments an MMA takes, and scratch
    // for its accumulator.
    let mut a_all = Array::<Vector<tf32, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
    let mut a_frag = Array::<Vector<tf32, MmaVecA>>::new(a_vecs);
    let mut b_frag = Array::<Vector<tf32, MmaVecB>>::new(b_vecs);
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
            stage_rows_async::<f32>(
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
                4usize,
            );
            stage_rows_async::<f32>(
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
                4usize,
            );
            stage_rows_async::<f32>(
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
                4usize,
            );
            bar0.commit_copy_async();
        }
    } else {
        stage_rows_sync::<f32>(
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
                stage_rows_async::<f32>(
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
                    4usize,
                );
                stage_rows_async::<f32>(
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
                    4usize,
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
            stage_rows_sync::<f32>(
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
            stage_rows_sync::<f32>(
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
        let k_buf = stage * k_stage;
        let v_buf = stage * v_stage;

        let tile_hi = t0 + bk_i - 1;
        let plane_sees = plane_rows && tile_hi >= w_lo && t0 <= w_hi;
        if plane_sees {
            // S = Q K^T: per 8-wide head-dim chunk, one A fragment per row tile, each K
            // fragment reused over the row tiles.
            #[unroll]
            for i in 0..comptime!(m_tiles * k_tiles * c_vecs) {
                s_acc[i] = Vector::new(f32::new(0.0));
            }
            #[unroll]
            for dc in 0..d_chunks {
                #[unroll]
                for mt in 0..m_tiles {
                    // A = Q: rows g and g + 8 of the row tile, head dims t and t + 4 of the
                    // chunk.
                    let q_at = (warp * plane_q + mt * 16 + g) * q_stride + dc * 8 + t;
                    set_elem::<tf32, MmaVecA>(&mut a_frag, 0usize, a_vs, q_smem[q_at]);
                    set_elem::<tf32, MmaVecA>(
                        &mut a_frag,
                        1usize,
                        a_vs,
                        q_smem[q_at + 8 * q_stride],
                    );
                    set_elem::<tf32, MmaVecA>(&mut a_frag, 2usize, a_vs, q_smem[q_at + 4]);
                    set_elem::<tf32, MmaVecA>(
                        &mut a_frag,
                        3usize,
                        a_vs,
                        q_smem[q_at + 8 * q_stride + 4],
                    );
                    #[unroll]
                    for i in 0..a_vecs {
                        a_all[mt * a_vecs + i] = a_frag[i];
                    }
                }
                #[unroll]
                for kt in 0..k_tiles {
                    // B[k = head dim][n = key] = K[key][head dim]: key g of key tile kt,
                    // head dims t and t + 4 of the chunk.
                    let k_at = k_buf + (kt * 8 + g) * k_stride + dc * 8 + t;
                    set_elem::<tf32, MmaVecB>(&mut b_frag, 0usize, b_vs, k_smem[k_at]);
                    set_elem::<tf32, MmaVecB>(&mut b_frag, 1usize, b_vs, k_smem[k_at + 4]);
                    #[unroll]
                    for mt in 0..m_tiles {
                        #[unroll]
                        for i in 0..a_vecs {
                            a_frag[i] = a_all[mt * a_vecs + i];
                        }
                        mma_tile(
                            def,
                            &a_frag,
                            &b_frag,
                            &mut s_acc,
                            mt * k_tiles + kt,
                            &mut c_frag,
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

            // O += P V per 8-key chunk kc (S tile kc of each row tile), keys in the order
            // 0, 2, 4, 6, 1, 3, 5, 7 (module doc): A element 0 / 1 (rows g / g + 8, index t)
            // is key 2t, accumulator element 0 / 2; A element 2 / 3 (index t + 4) is key
            // 2t + 1, accumulator element 1 / 3.
            #[unroll]
            for kc in 0..k_tiles {
                #[unroll]
                for mt in 0..m_tiles {
                    let tile = mt * k_tiles + kc;
                    set_elem::<tf32, MmaVecA>(
                        &mut a_frag,
                        0usize,
                        a_vs,
                        acc_get(&s_acc, tile, 0usize, c_vs),
                    );
                    set_elem::<tf32, MmaVecA>(
                        &mut a_frag,
                        1usize,
                        a_vs,
                        acc_get(&s_acc, tile, 2usize, c_vs),
                    );
                    set_elem::<tf32, MmaVecA>(
                        &mut a_frag,
                        2usize,
                        a_vs,
                        acc_get(&s_acc, tile, 1usize, c_vs),
                    );
                    set_elem::<tf32, MmaVecA>(
                        &mut a_frag,
                        3usize,
                        a_vs,
                        acc_get(&s_acc, tile, 3usize, c_vs),
                    );
                    #[unroll]
                    for i in 0..a_vecs {
                        a_all[mt * a_vecs + i] = a_frag[i];
                    }
                }
                #[unroll]
                for vt in 0..v_tiles {
                    // B[k = key][n = value dim]: V rows of keys 2t (index t) and 2t + 1
                    // (index t + 4) of the chunk, value dim g of value tile vt.
                    let v_at = v_buf + (kc * 8 + 2 * t) * v_stride + vt * 8 + g;
                    set_elem::<tf32, MmaVecB>(&mut b_frag, 0usize, b_vs, v_smem[v_at]);
                    set_elem::<tf32, MmaVecB>(&mut b_frag, 1usize, b_vs, v_smem[v_at + v_stride]);
                    #[unroll]
                    for mt in 0..m_tiles {
                        #[unroll]
                        for i in 0..a_vecs {
                            a_frag[i] = a_all[mt * a_vecs + i];
                        }
                        mma_tile(
                            def,
                            &a_frag,
                            &b_frag,
                            &mut o_acc,
                            mt * v_tiles + vt,
                            &mut c_frag,
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
    write_output_rows::<f32, N>(
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
