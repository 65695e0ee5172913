//! The f32 products on tf32: `mma.sync.m16n8k8` (f32 accumulation), whose fragments
//! `ldmatrix` cannot load (it moves 16-bit elements only). Every fragment element is read
//! from shared memory by the lane that needs it and rounded to tf32 on the way (CubeCL's
//! cast, `cvt.rna.tf32.f32`); tiles are `[row][d]` with rows padded by 4 floats (a row
//! stride of 4 mod 8 words, so the 32 reads of one fragment hit 32 distinct banks).
//!
//! Register layouts (PTX, lane `l`: `g = l / 4`, `t = l % 4`): `A` (16x8, row-major)
//! `a0 = A[g][t]`, `a1 = A[g + 8][t]`, `a2 = A[g][t + 4]`, `a3 = A[g + 8][t + 4]`; `B` (8x8,
//! `B[k][n]`) `b0 = B[t][g]`, `b1 = B[t + 4][g]`. `O += P V` takes `P` from the lane's own
//! `S` registers, without shuffles, by ordering the 8 keys of each `k8` chunk as
//! `0, 2, 4, 6, 1, 3, 5, 7`: the `A` elements of lane `(g, t)` at reduction indices `t` and
//! `t + 4` are then keys `2t` and `2t + 1`, its accumulator elements 0 and 1 (row `g`) and
//! 2 and 3 (row `g + 8`); the `B` fragment reads the V rows of the same keys. A sum over
//! keys does not depend on their order.
//!
//! tf32 keeps 10 of f32's 23 mantissa bits: results differ from full f32 at about 1e-3
//! relative (as with PyTorch's `allow_tf32`), so the core runs it on request only.

use cubecl::cmma::MatrixIdent;
use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;

use super::{ForwardProducts, LaneOffsets, ProductTile};
use crate::components::fragments::{acc_get, register_vector_sizes, MmaVecA, MmaVecAcc, MmaVecB};

/// f32 products on `m16n8k8` over tf32, fragments read per lane.
pub struct Tf32Lanes;

/// Sets element `e` of a fragment (`vs` elements per vector) to `value` rounded to tf32.
/// (`e` is a constant once the callers' loops are unrolled.)
#[cube]
fn set_elem<T: Float, S: Float, N: Size>(
    frag: &mut Array<Vector<T, N>>,
    e: usize,
    #[comptime] vs: usize,
    value: S,
) {
    let mut vector = frag[e / vs];
    vector.insert_dynamic(e % vs, T::cast_from(value));
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

#[cube]
impl ForwardProducts for Tf32Lanes {
    fn register<F: Float>() {
        register_vector_sizes::<tf32>(MmaDefinition::<tf32, tf32, f32>::new(
            16usize, 8usize, 8usize,
        ));
    }

    fn lane_offsets(warp: usize, lane: usize, #[comptime] tile: ProductTile) -> LaneOffsets {
        let g = lane / 4;
        let t = lane % 4;
        // Q: row g of the plane's rows, head dim t; K: key g, head dim t; V: key 2t, value g.
        LaneOffsets {
            q: (warp * comptime!(16 * tile.m_tiles) + g) * comptime!(tile.q_stride) + t,
            k: g * comptime!(tile.k_stride) + t,
            v: 2 * t * comptime!(tile.v_stride) + g,
        }
    }

    fn scores<F: Float>(
        q_smem: &[F],
        k_smem: &[F],
        k_buf: usize,
        at: LaneOffsets,
        s_acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] tile: ProductTile,
    ) {
        let def = MmaDefinition::<tf32, tf32, f32>::new(16usize, 8usize, 8usize);
        let a_vs = def.vector_size(MatrixIdent::A);
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let b_vs = def.vector_size(MatrixIdent::B);
        let b_vecs = def.vectors_per_lane(MatrixIdent::B);
        let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
        let m_tiles = comptime!(tile.m_tiles);
        let k_tiles = comptime!(tile.k_tiles);
        let q_stride = comptime!(tile.q_stride);
        let k_stride = comptime!(tile.k_stride);
        let mut a_all = Array::<Vector<tf32, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
        let mut a_frag = Array::<Vector<tf32, MmaVecA>>::new(a_vecs);
        let mut b_frag = Array::<Vector<tf32, MmaVecB>>::new(b_vecs);
        let mut c_frag = Array::<Vector<f32, MmaVecAcc>>::new(c_vecs);
        #[unroll]
        for i in 0..comptime!(m_tiles * k_tiles * c_vecs) {
            s_acc[i] = Vector::new(f32::new(0.0));
        }
        // Per 8-wide head-dim chunk, one A fragment per row tile, each K fragment reused
        // over the row tiles.
        #[unroll]
        for dc in 0..comptime!(tile.d_pad / 8) {
            #[unroll]
            for mt in 0..m_tiles {
                // A = Q: rows g and g + 8 of the row tile, head dims t and t + 4.
                let q_at = at.q + mt * 16 * q_stride + dc * 8;
                set_elem::<tf32, F, MmaVecA>(&mut a_frag, 0usize, a_vs, q_smem[q_at]);
                set_elem::<tf32, F, MmaVecA>(
                    &mut a_frag,
                    1usize,
                    a_vs,
                    q_smem[q_at + 8 * q_stride],
                );
                set_elem::<tf32, F, MmaVecA>(&mut a_frag, 2usize, a_vs, q_smem[q_at + 4]);
                set_elem::<tf32, F, MmaVecA>(
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
                // B[k = head dim][n = key] = K[key][head dim]: key g of key tile kt, head
                // dims t and t + 4.
                let k_at = k_buf + at.k + kt * 8 * k_stride + dc * 8;
                set_elem::<tf32, F, MmaVecB>(&mut b_frag, 0usize, b_vs, k_smem[k_at]);
                set_elem::<tf32, F, MmaVecB>(&mut b_frag, 1usize, b_vs, k_smem[k_at + 4]);
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
                        s_acc,
                        mt * k_tiles + kt,
                        &mut c_frag,
                        c_vecs,
                    );
                }
            }
        }
    }

    fn accumulate<F: Float>(
        s_acc: &Array<Vector<f32, MmaVecAcc>>,
        v_smem: &[F],
        v_buf: usize,
        at: LaneOffsets,
        o_acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] tile: ProductTile,
    ) {
        let def = MmaDefinition::<tf32, tf32, f32>::new(16usize, 8usize, 8usize);
        let a_vs = def.vector_size(MatrixIdent::A);
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let b_vs = def.vector_size(MatrixIdent::B);
        let b_vecs = def.vectors_per_lane(MatrixIdent::B);
        let c_vs = def.vector_size(MatrixIdent::Accumulator);
        let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
        let m_tiles = comptime!(tile.m_tiles);
        let k_tiles = comptime!(tile.k_tiles);
        let v_tiles = comptime!(tile.v_tiles);
        let v_stride = comptime!(tile.v_stride);
        let mut a_all = Array::<Vector<tf32, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
        let mut a_frag = Array::<Vector<tf32, MmaVecA>>::new(a_vecs);
        let mut b_frag = Array::<Vector<tf32, MmaVecB>>::new(b_vecs);
        let mut c_frag = Array::<Vector<f32, MmaVecAcc>>::new(c_vecs);
        // Per 8-key chunk kc (S tile kc of each row tile), keys in the order 0, 2, 4, 6, 1,
        // 3, 5, 7: A element 0 / 1 (rows g / g + 8, index t) is key 2t, accumulator element
        // 0 / 2; A element 2 / 3 (index t + 4) is key 2t + 1, accumulator element 1 / 3.
        #[unroll]
        for kc in 0..k_tiles {
            #[unroll]
            for mt in 0..m_tiles {
                let tile = mt * k_tiles + kc;
                set_elem::<tf32, f32, MmaVecA>(
                    &mut a_frag,
                    0usize,
                    a_vs,
                    acc_get(s_acc, tile, 0usize, c_vs),
                );
                set_elem::<tf32, f32, MmaVecA>(
                    &mut a_frag,
                    1usize,
                    a_vs,
                    acc_get(s_acc, tile, 2usize, c_vs),
                );
                set_elem::<tf32, f32, MmaVecA>(
                    &mut a_frag,
                    2usize,
                    a_vs,
                    acc_get(s_acc, tile, 1usize, c_vs),
                );
                set_elem::<tf32, f32, MmaVecA>(
                    &mut a_frag,
                    3usize,
                    a_vs,
                    acc_get(s_acc, tile, 3usize, c_vs),
                );
                #[unroll]
                for i in 0..a_vecs {
                    a_all[mt * a_vecs + i] = a_frag[i];
                }
            }
            #[unroll]
            for vt in 0..v_tiles {
                // B[k = key][n = value dim]: V rows of keys 2t (index t) and 2t + 1 (index
                // t + 4) of the chunk, value dim g of value tile vt.
                let v_at = v_buf + at.v + kc * 8 * v_stride + vt * 8;
                set_elem::<tf32, F, MmaVecB>(&mut b_frag, 0usize, b_vs, v_smem[v_at]);
                set_elem::<tf32, F, MmaVecB>(&mut b_frag, 1usize, b_vs, v_smem[v_at + v_stride]);
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
                        o_acc,
                        mt * v_tiles + vt,
                        &mut c_frag,
                        c_vecs,
                    );
                }
            }
        }
    }
}
