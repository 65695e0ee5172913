//! Host side: reads a call's problem and its device's capabilities, allocates outputs and
//! launches a plan.

mod backward;
mod buffers;
mod device;
mod forward;

pub use backward::{flash_backward_with, launch_backward, BackwardInputs, Gradients};
pub(crate) use buffers::alloc_contiguous;
pub use device::{device_caps, forward_problem};
pub use forward::{flash_forward_with, launch_forward, ForwardOutput};
