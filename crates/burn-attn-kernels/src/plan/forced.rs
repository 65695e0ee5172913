//! A forced plan: explicit tile and schedule choices for tuning runs, passed as an
//! argument (never read from the environment). Every field `None` (or `false`) leaves the
//! choice to the plan; a forced value the call cannot run makes the kernel decline with
//! [`Unsupported::Forced`](super::Unsupported::Forced) rather than time another plan.

/// Forced choices of the kernels' plans (for tuning; the default forces nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ForcedPlan {
    /// Planes (32-unit warps) per cube of the matrix-unit forward: 2, 4 or 8.
    pub mma_planes: Option<usize>,
    /// Query rows per plane of the matrix-unit forward: 16 or 32.
    pub mma_rows: Option<usize>,
    /// Keys per tile of the matrix-unit forward: 16, 32 or 64.
    pub mma_block_k: Option<usize>,
    /// Query rows per plane of the tf32 forward: 16 or 32.
    pub tf32_rows: Option<usize>,
    /// Keys per tile of the tf32 forward: 8, 16, 32 or 64.
    pub tf32_block_k: Option<usize>,
    /// Synchronous single-buffer staging in the matrix-unit kernels, where asynchronous
    /// double buffering would run.
    pub sync_staging: bool,
    /// Query rows per cube of the portable forward: 8, 16, 32 or 64.
    pub unit_block_q: Option<usize>,
    /// Keys per tile of the portable forward: 8, 16, 32 or 64.
    pub unit_block_k: Option<usize>,
    /// Shared memory the portable kernels' tiles may take, in KiB: 32 to 192.
    pub unit_shared_kib: Option<usize>,
    /// Heads per group of the heavy-first cube order (0: the natural order): 0, 1, 2, 4,
    /// 8, 16, 32 or 64.
    pub heavy_first: Option<u32>,
    /// Keys per tile of the matrix-unit dQ kernel: 16, 32 or 64.
    pub dq_block_k: Option<usize>,
    /// Query rows per plane of the matrix-unit dQ kernel: 16 or 32.
    pub dq_rows: Option<usize>,
    /// Query rows per tile of the matrix-unit dK/dV kernel: 16, 32 or 64.
    pub dkdv_block_q: Option<usize>,
    /// Key splits of the forwards (dense): 1 to 64 (1: none).
    pub key_splits: Option<usize>,
    /// Leaves the matrix-unit kernels out (forward and backward), so the portable ones
    /// serve f16/bf16 on CUDA too (comparisons).
    pub no_matrix_units: bool,
    /// Lifts the portable kernels' loop-budget cap on software adapters (diagnosis only:
    /// past the budget their results are wrong).
    pub lift_loop_cap: bool,
}

impl ForcedPlan {
    /// Whether nothing is forced.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `value` if it is one of `allowed`, else a decline naming the field.
pub(crate) fn allowed<T: PartialEq + Copy + core::fmt::Debug>(
    field: &'static str,
    value: Option<T>,
    allowed: &[T],
) -> Result<Option<T>, super::Unsupported> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(super::Unsupported::Forced(format!(
            "{field} = {v:?} (takes one of {allowed:?})"
        ))),
        other => Ok(other),
    }
}
