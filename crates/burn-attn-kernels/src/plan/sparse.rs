//! The plans of the block-sparse kernels: the forward and the backward (matrix units where
//! they take the call, portable otherwise), and the block grid their lists must be on.

use super::{
    plan_backward, plan_forward, BackwardKernel, BackwardPlan, DeviceCaps, ForcedPlan,
    ForwardKernel, ForwardPlan, MmaBackwardPlan, MmaPlan, Problem, UnitBackwardPlan, UnitPlan,
    Unsupported, MMA_ROWS_PER_TILE,
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

/// The backward kernels of a block-sparse call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseBackward {
    /// `flash_mma_sparse_backward` (f16/bf16 matrix units, CUDA sm_80+, asynchronous
    /// staging).
    Mma(MmaBackwardPlan),
    /// `flash_unit_sparse_backward` (portable).
    Unit(UnitBackwardPlan),
}

impl SparseBackward {
    /// Query rows x keys of the dQ kernel's tiles, and of the dK/dV kernel's.
    pub fn tiles(&self) -> [(usize, usize); 2] {
        match self {
            SparseBackward::Mma(plan) => {
                let rows = MMA_ROWS_PER_TILE * plan.planes;
                [
                    (rows * plan.dq_row_tiles, plan.block_k),
                    (plan.block_q, rows),
                ]
            }
            SparseBackward::Unit(plan) => [
                (plan.dq_tiles.rows, plan.dq_tiles.cols),
                (plan.kv_tiles.cols, plan.kv_tiles.rows),
            ],
        }
    }
}

/// The forward and backward plans of a block-sparse call, and its block grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparsePlan {
    /// The forward's plan.
    pub forward: SparseForward,
    /// The backward's plans (dQ; dK/dV): the matrix-unit ones where they take the call.
    pub backward: SparseBackward,
    /// Query rows per block of the lists: a multiple of every kernel's query tile.
    pub block_q: usize,
    /// Keys per block of the lists: a multiple of every kernel's key tile.
    pub block_k: usize,
}

/// Plans the block-sparse kernels for `problem` (its band is ignored: the element rules
/// carry the mask), or says why they decline: the matrix-unit kernels where their plans take
/// the call (f16/bf16 on CUDA; the backward also needs asynchronous staging), the portable
/// ones otherwise.
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
    let BackwardPlan::Unit(portable_backward) =
        plan_backward(BackwardKernel::Unit, problem, caps, forced)?
    else {
        unreachable!("the portable backward plans portable kernels")
    };
    // The block-sparse dQ kernel takes 16 query rows per plane.
    let sparse_forced = ForcedPlan {
        dq_rows: Some(16),
        ..*forced
    };
    let backward = match plan_backward(BackwardKernel::Mma, problem, caps, &sparse_forced) {
        Ok(BackwardPlan::Mma(plan)) if plan.async_copy => SparseBackward::Mma(plan),
        _ => SparseBackward::Unit(portable_backward),
    };
    let [dq, kv] = backward.tiles();
    let [u_dq, u_kv] = SparseBackward::Unit(portable_backward).tiles();
    let (f_rows, f_cols) = forward.tile();
    // Tiles are powers of two: the largest is a multiple of the others (the portable
    // backward's included).
    Ok(SparsePlan {
        forward,
        backward,
        block_q: f_rows.max(dq.0).max(kv.0).max(u_dq.0).max(u_kv.0),
        block_k: f_cols.max(dq.1).max(kv.1).max(u_dq.1).max(u_kv.1),
    })
}

/// MurmurHash3's 32-bit finaliser.
fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The dropout hash of the kernels (their `components::element_rules::dropout_hash`, the
/// same arithmetic on the device): element `(i, j)` of the (batch, head) pair `pair`
/// (`batch * heads + head`) under `seed`.
pub fn dropout_hash(seed: u32, pair: u32, i: u32, j: u32) -> u32 {
    mix32(mix32(mix32(seed ^ pair) ^ i) ^ j)
}

/// The hashes below which the kernels drop an element, for dropout probability `p`
/// (`p * 2^32`, rounded).
pub fn dropout_threshold(p: f64) -> u32 {
    (p * 4_294_967_296.0).round().clamp(0.0, u32::MAX as f64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash drops each element with probability p: over a million positions of two
    /// heads, the dropped fraction is within 0.3% of p, and neighbouring positions are
    /// not correlated (dropped pairs of neighbours at p^2).
    #[test]
    fn dropout_hash_drops_with_probability_p() {
        for p in [0.1, 0.5] {
            let threshold = dropout_threshold(p);
            let (mut dropped, mut both, mut total) = (0u64, 0u64, 0u64);
            for pair in 0..2u32 {
                for i in 0..500u32 {
                    let mut previous = false;
                    for j in 0..1000u32 {
                        let d = dropout_hash(7, pair, i, j) < threshold;
                        dropped += u64::from(d);
                        both += u64::from(d && previous);
                        previous = d;
                        total += 1;
                    }
                }
            }
            let fraction = dropped as f64 / total as f64;
            assert!((fraction - p).abs() < 0.003, "p {p}: dropped {fraction}");
            let pairs = both as f64 / total as f64;
            assert!((pairs - p * p).abs() < 0.003, "p {p}: neighbours {pairs}");
        }
    }
}
