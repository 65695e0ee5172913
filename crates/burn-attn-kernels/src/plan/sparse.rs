//! The plans of the block-sparse kernels: the forward (matrix units where they take the
//! call, portable otherwise), the portable backward, and the block grid their lists must be
//! on.

use super::{
    plan_backward, plan_forward, BackwardKernel, BackwardPlan, DeviceCaps, ForcedPlan,
    ForwardKernel, ForwardPlan, MmaPlan, Problem, UnitBackwardPlan, UnitPlan, Unsupported,
};

/// The forward kernel of a block-sparse call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseForward {
    /// `flash_mma_sparse` (f16/bf16 matrix units, CUDA sm_80+).
    Mma(MmaPlan),
    /// `flash_unit_sparse` (portable).
    Unit(UnitPlan),
}

impl SparseForward {
    /// Query rows and keys of the kernel's tiles.
    pub fn tile(&self) -> (usize, usize) {
        match self {
            SparseForward::Mma(plan) => (plan.block_q(), plan.block_k),
            SparseForward::Unit(plan) => (plan.tiles.rows, plan.tiles.cols),
        }
    }
}

/// The forward and backward plans of a block-sparse call, and its block grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparsePlan {
    /// The forward's plan.
    pub forward: SparseForward,
    /// The backward's plans (dQ; dK/dV).
    pub backward: UnitBackwardPlan,
    /// Query rows per block of the lists: a multiple of every kernel's query tile.
    pub block_q: usize,
    /// Keys per block of the lists: a multiple of every kernel's key tile.
    pub block_k: usize,
}

/// Plans the block-sparse kernels for `problem` (its band is ignored: the element rules
/// carry the mask), or says why they decline: the matrix-unit forward where its plan takes
/// the call (f16/bf16 on CUDA), the portable one otherwise; the portable backward.
pub fn plan_sparse(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<SparsePlan, Unsupported> {
    let forward = match plan_forward(ForwardKernel::Mma, problem, caps, forced) {
        Ok(ForwardPlan::Mma(plan)) => SparseForward::Mma(plan),
        _ => match plan_forward(ForwardKernel::Unit, problem, caps, forced)? {
            ForwardPlan::Unit(plan) => SparseForward::Unit(plan),
            other => unreachable!("the portable forward plans {other:?}"),
        },
    };
    let BackwardPlan::Unit(backward) = plan_backward(BackwardKernel::Unit, problem, caps, forced)?
    else {
        unreachable!("the portable backward plans portable kernels")
    };
    let ((f_rows, f_cols), dq, kv) = (forward.tile(), backward.dq_tiles, backward.kv_tiles);
    // Tiles are powers of two: the largest is a multiple of the others (the dK/dV kernel's
    // rows are keys).
    Ok(SparsePlan {
        forward,
        backward,
        block_q: f_rows.max(dq.rows).max(kv.cols),
        block_k: f_cols.max(dq.cols).max(kv.rows),
    })
}
