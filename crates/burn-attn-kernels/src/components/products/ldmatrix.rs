//! The f16/bf16 products: `mma.sync.m16n8k16` with fragments from `ldmatrix` (four 8x8
//! blocks per instruction; lane `l` gives the address of row `l % 8` of block `l / 8`).
//! Tiles are `[row][d]` with rows padded by 8 values (16 bytes), so the eight row addresses
//! of one `ldmatrix` hit distinct banks. `P` goes from the `S` registers straight into `A`
//! fragments (the accumulator layout of two `n8` tiles is the `A` layout of one `k16`
//! chunk); V's fragments come from `ldmatrix.trans`, so V is staged as it is stored.

use cubecl::cmma::MatrixIdent;
use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;

use super::{ForwardProducts, LaneOffsets, ProductTile};
use crate::components::fragments::{
    acc_get, mma_pair, register_vector_sizes, MmaVecA, MmaVecAcc, MmaVecB,
};

/// f16/bf16 products on `m16n8k16` with `ldmatrix` fragment loads.
pub struct Ldmatrix16;

#[cube]
impl ForwardProducts for Ldmatrix16 {
    fn register<F: Float>() {
        register_vector_sizes::<F>(MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize));
    }

    fn lane_offsets(warp: usize, lane: usize, #[comptime] tile: ProductTile) -> LaneOffsets {
        let ld_block = lane / 8;
        let ld_row = lane % 8;
        let plane_q = comptime!(16 * tile.m_tiles);
        // Q's A blocks (rows 0-7 | 8-15) x (d 0-7 | 8-15), K's B blocks (keys 0-7 | 8-15) x
        // (d 0-7 | 8-15), V's transposed B blocks (keys 0-7 | 8-15) x (values 0-7 | 8-15).
        LaneOffsets {
            q: (warp * plane_q + ld_row + 8 * (ld_block % 2)) * comptime!(tile.q_stride)
                + 8 * (ld_block / 2),
            k: (8 * (ld_block / 2) + ld_row) * comptime!(tile.k_stride) + 8 * (ld_block % 2),
            v: (8 * (ld_block % 2) + ld_row) * comptime!(tile.v_stride) + 8 * (ld_block / 2),
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
        let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let b_vecs = def.vectors_per_lane(MatrixIdent::B);
        let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
        let m_tiles = comptime!(tile.m_tiles);
        let k_tiles = comptime!(tile.k_tiles);
        let q_stride = comptime!(tile.q_stride);
        let k_stride = comptime!(tile.k_stride);
        let k_at = k_buf + at.k;
        // The A fragments of every row tile, the one an MMA takes, and scratch.
        let mut a_all = Array::<Vector<F, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
        let mut a_frag = Array::<Vector<F, MmaVecA>>::new(a_vecs);
        let mut b_frag = Array::<Vector<F, MmaVecB>>::new(b_vecs);
        let mut c_frag = Array::<Vector<f32, MmaVecAcc>>::new(c_vecs);
        #[unroll]
        for i in 0..comptime!(m_tiles * k_tiles * c_vecs) {
            s_acc[i] = Vector::new(f32::new(0.0));
        }
        // Per head-dim chunk, one A fragment per row tile, each K fragment reused over the
        // row tiles.
        #[unroll]
        for dc in 0..comptime!(tile.d_pad / 16) {
            #[unroll]
            for mt in 0..m_tiles {
                let q_off = at.q + mt * 16 * q_stride + dc * 16;
                let a_regs = def.load_matrix::<F, MmaVecA>(
                    &q_smem[q_off..q_off + 8],
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
                    &k_smem[k_off..k_off + 8],
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
                        s_acc,
                        mt * k_tiles + 2 * kp,
                        &mut b_frag,
                        &mut c_frag,
                        b_vecs,
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
        let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        let a_vs = def.vector_size(MatrixIdent::A);
        let a_vecs = def.vectors_per_lane(MatrixIdent::A);
        let b_vecs = def.vectors_per_lane(MatrixIdent::B);
        let c_vs = def.vector_size(MatrixIdent::Accumulator);
        let c_vecs = def.vectors_per_lane(MatrixIdent::Accumulator);
        let m_tiles = comptime!(tile.m_tiles);
        let k_tiles = comptime!(tile.k_tiles);
        let v_tiles = comptime!(tile.v_tiles);
        let v_stride = comptime!(tile.v_stride);
        let v_at = v_buf + at.v;
        let mut a_all = Array::<Vector<F, MmaVecA>>::new(comptime!(m_tiles * a_vecs));
        let mut a_frag = Array::<Vector<F, MmaVecA>>::new(a_vecs);
        let mut b_frag = Array::<Vector<F, MmaVecB>>::new(b_vecs);
        let mut c_frag = Array::<Vector<f32, MmaVecAcc>>::new(c_vecs);
        // Key chunk kc covers accumulator tiles 2kc (A elements 0..4) and 2kc + 1 (A
        // elements 4..8) of each row tile.
        #[unroll]
        for kc in 0..comptime!(k_tiles / 2) {
            #[unroll]
            for mt in 0..m_tiles {
                #[unroll]
                for i in 0..a_vecs {
                    let mut vector = Vector::empty();
                    #[unroll]
                    for n in 0..a_vs {
                        let ei = i * a_vs + n;
                        let tile = mt * k_tiles + kc * 2 + ei / 4;
                        vector.insert_dynamic(n, F::cast_from(acc_get(s_acc, tile, ei % 4, c_vs)));
                    }
                    a_all[mt * a_vecs + i] = vector;
                }
            }
            #[unroll]
            for vp in 0..comptime!(v_tiles / 2) {
                // B for value tiles 2vp and 2vp + 1 from V [key][d] transposed.
                let v_off = v_at + kc * 16 * v_stride + vp * 16;
                let b_regs = def.load_matrix::<F, MmaVecB>(
                    &v_smem[v_off..v_off + 8],
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
                        o_acc,
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
}
