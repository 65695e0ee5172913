//! Host side: reads a call's problem and its device's capabilities, allocates outputs and
//! launches a plan.

mod backward;
mod buffers;
mod device;
mod forward;
mod linear;
mod probes;
mod sparse;

pub use backward::{flash_backward_with, launch_backward, BackwardInputs, Gradients};
pub use device::{device_caps, forward_problem};
pub use forward::{flash_forward_with, launch_forward, ForwardOutput};
pub use linear::{linear_pass, LinearOperands, LinearPassOutput, LinearState};
pub use probes::{cube_order_probe, online_softmax_probe};
pub use sparse::{
    flash_backward_sparse, flash_forward_sparse, sparse_blocks, BlockLists, SparseGradients,
    SparseRules,
};
