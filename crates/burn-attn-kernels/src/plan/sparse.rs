//! The plans of the block-sparse portable kernels: the forward's and both backward kernels'
//! tiles, and the block grid their lists must be on.

use super::{
    plan_backward, plan_forward, BackwardKernel, BackwardPlan, DeviceCaps, ForcedPlan,
    ForwardKernel, ForwardPlan, Problem, UnitBackwardPlan, UnitPlan, Unsupported,
};

/// The portable forward and backward plans of a block-sparse call, and its block grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparsePlan {
    /// The forward's plan.
    pub forward: UnitPlan,
    /// The backward's plans (dQ; dK/dV).
    pub backward: UnitBackwardPlan,
    /// Query rows per block of the lists: a multiple of every kernel's query tile.
    pub block_q: usize,
    /// Keys per block of the lists: a multiple of every kernel's key tile.
    pub block_k: usize,
}

/// Plans the block-sparse portable kernels for `problem` (its band is ignored: the element
/// rules carry the mask), or says why they decline.
pub fn plan_sparse(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<SparsePlan, Unsupported> {
    let ForwardPlan::Unit(forward) = plan_forward(ForwardKernel::Unit, problem, caps, forced)?
    else {
        unreachable!("the portable forward plans a portable kernel")
    };
    let BackwardPlan::Unit(backward) =
        plan_backward(BackwardKernel::Unit, problem, caps, forced)?
    else {
        unreachable!("the portable backward plans portable kernels")
    };
    let (f, dq, kv) = (forward.tiles, backward.dq_tiles, backward.kv_tiles);
    // Tiles are powers of two: the largest is a multiple of the others (the dK/dV kernel's
    // rows are keys).
    Ok(SparsePlan {
        forward,
        backward,
        block_q: f.rows.max(dq.rows).max(kv.cols),
        block_k: f.cols.max(dq.cols).max(kv.rows),
    })
}
