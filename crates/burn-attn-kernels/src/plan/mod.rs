//! Launch plans: pure functions from a problem (sizes, dtype, band, layout) and a device's
//! capabilities to the tiles, planes, staging and grid a kernel launches with, or the typed
//! reason it declines. No tensors, no device: unit-tested on the host for any device.
//!
//! A [`ForcedPlan`] (tuning runs) fixes choices explicitly, as an argument.

mod backward;
mod decline;
mod device;
mod forced;
mod forward;
mod linear;
mod problem;
mod schedule;
mod sparse;
mod unit_tiles;

pub use backward::{
    plan_backward, BackwardKernel, BackwardPlan, MmaBackwardPlan, UnitBackwardPlan,
    MMA_BACKWARD_MAX_DIM,
};
pub use decline::Unsupported;
pub use device::{DeviceCaps, RuntimeKind};
pub use forced::ForcedPlan;
pub use forward::{
    plan_forward, store_vector, ForwardKernel, ForwardPlan, MmaPlan, UnitPlan, MMA_ROWS_PER_TILE,
};
pub use linear::{
    plan_linear, segment_rows, LinearExtra, LinearMap, LinearMode, LinearPlan, LinearSizes,
    LinearTiles, LINEAR_COL_THREADS, LINEAR_MMA_PLANES, LINEAR_ROW_THREADS, LINEAR_TARGET_CUBES,
};
pub use problem::{span, BandArgs, Grid, Offsets, Precision, Problem, Sizes, MAX_HEAD_DIM};
pub use schedule::heavy_first;
pub use sparse::{
    dropout_hash, dropout_threshold, plan_sparse, SparseBackward, SparseForward, SparsePlan,
};
pub use unit_tiles::{UnitTiles, SOFTWARE_LOOP_BUDGET, UNIT_SHARED_BUDGET};

#[cfg(test)]
mod tests;
