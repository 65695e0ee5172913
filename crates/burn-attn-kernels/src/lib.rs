//! CubeCL attention kernels and their launchers. No modules, no configs: callers (the
//! `burn-attn-core` crate) resolve options into plain launch arguments and decide which
//! implementation runs.
//!
//! - [`flash_forward_unit`]: the portable FlashAttention forward (no matrix units), for
//!   every runtime including WGSL and software Vulkan (lavapipe).
//! - [`flash_forward_mma`]: the matrix-unit forward (`mma.sync.m16n8k16`, f16/bf16) for
//!   runtimes that report that instruction (CUDA sm_80+).
//! - [`flash_forward_tf32`]: the matrix-unit forward for f32 inputs (`mma.sync.m16n8k8` on
//!   tf32, CUDA sm_80+); opt-in (`BURN_ATTN_TF32=1`) because tf32 rounds the products'
//!   inputs to 10 mantissa bits (66 TFLOP/s on the H200 at n = 4096, d = 128).
//! - [`flash_backward_unit`]: the portable backward (dQ, dK, dV from the saved output and
//!   log-sum-exp; no matrix units, no atomics), for every runtime.
//! - [`flash_backward_mma`]: the matrix-unit backward (same contract, f16/bf16, head and
//!   value dims up to 128) where the matrix-unit forward runs.
#![warn(missing_docs)]

// The #[cube(launch)] macro generates undocumented items.
#[allow(missing_docs)]
mod flash_mma;
#[allow(missing_docs)]
mod flash_mma_backward;
#[allow(missing_docs)]
mod flash_tf32;
#[allow(missing_docs)]
mod flash_unit;
#[allow(missing_docs)]
mod flash_unit_backward;
mod launch;
mod launch_backward;
#[allow(missing_docs)]
mod mma_softmax;
mod register_tile;
#[allow(missing_docs)]
mod schedule;

/// The CubeCL types of the launchers' signatures, for callers that launch them directly.
pub use burn_cubecl::{tensor::CubeTensor, CubeBackend, CubeRuntime};
pub use flash_mma::flash_mma_kernel;
pub use flash_mma_backward::{flash_mma_backward_dkdv_kernel, flash_mma_backward_dq_kernel};
pub use flash_tf32::flash_tf32_kernel;
pub use flash_unit::flash_unit_kernel;
pub use flash_unit_backward::{flash_unit_backward_dkdv_kernel, flash_unit_backward_dq_kernel};
pub use launch::{
    flash_forward, flash_forward_mma, flash_forward_tf32, flash_forward_unit, BandArgs,
    Unsupported, MAX_HEAD_DIM,
};
pub use launch_backward::{flash_backward, flash_backward_mma, flash_backward_unit, Gradients};
pub use mma_softmax::{online_softmax_probe, online_softmax_probe_kernel};
pub use schedule::{cube_order_probe, cube_order_probe_kernel};
