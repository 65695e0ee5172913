//! The forward's two products on the matrix units, `S = Q K^T` and `O += P V`, from the
//! shared-memory tiles into a plane's accumulator registers. The matrix-unit forward kernel
//! is written once against [`ForwardProducts`]; what differs between dtypes is only how the
//! fragments are loaded:
//! - [`Ldmatrix16`]: f16/bf16 on `mma.sync.m16n8k16`, fragments loaded with `ldmatrix`;
//! - [`Tf32Lanes`]: f32 inputs on `mma.sync.m16n8k8` over tf32, every fragment element read
//!   by the lane that needs it and rounded to tf32.
//!
//! Both leave scores and outputs in the `m16n8` f32 accumulator layout (lane `l`:
//! `g = l / 4`, `t = l % 4`; element `e` at row `g + 8 * (e / 2)`, column `2 * t + e % 2`),
//! which the online-softmax step and the epilogue read.

mod ldmatrix;
mod tf32;

pub use ldmatrix::Ldmatrix16;
pub use tf32::Tf32Lanes;

use cubecl::prelude::*;

use super::fragments::MmaVecAcc;

/// Comptime shape of the products of one plane: `m_tiles` row tiles of 16 query rows,
/// `k_tiles` key tiles and `v_tiles` value tiles of 8, `d_pad` head-dim values, and the row
/// strides of the Q, K and V shared-memory tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProductTile {
    pub m_tiles: usize,
    pub k_tiles: usize,
    pub v_tiles: usize,
    pub d_pad: usize,
    pub q_stride: usize,
    pub k_stride: usize,
    pub v_stride: usize,
}

/// Each lane's part of its shared-memory reads, fixed for the whole pass (the rest is a
/// constant of the unrolled loops): into the plane's Q rows, and into a K and a V buffer.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct LaneOffsets {
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

/// How a matrix-unit forward computes its two products (see the module doc).
#[cube]
pub trait ForwardProducts: Send + Sync + 'static {
    /// Binds the fragment vector sizes for the kernel (`F` the inputs' dtype).
    fn register<F: Float>();

    /// This lane's offsets, for the plane `warp` whose Q rows start at row
    /// `warp * 16 * m_tiles` of the Q tile.
    fn lane_offsets(warp: usize, lane: usize, #[comptime] tile: ProductTile) -> LaneOffsets;

    /// `s_acc = Q K^T` over the plane's rows and the K buffer starting at `k_buf`
    /// (`m_tiles * k_tiles` accumulator tiles, tile `mt * k_tiles + kt`).
    fn scores<F: Float>(
        q_smem: &[F],
        k_smem: &[F],
        k_buf: usize,
        at: LaneOffsets,
        s_acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] tile: ProductTile,
    );

    /// `o_acc += P V` with `P` the probabilities left in `s_acc` and the V buffer starting
    /// at `v_buf` (`m_tiles * v_tiles` accumulator tiles, tile `mt * v_tiles + vt`).
    fn accumulate<F: Float>(
        s_acc: &Array<Vector<f32, MmaVecAcc>>,
        v_smem: &[F],
        v_buf: usize,
        at: LaneOffsets,
        o_acc: &mut Array<Vector<f32, MmaVecAcc>>,
        #[comptime] tile: ProductTile,
    );
}
