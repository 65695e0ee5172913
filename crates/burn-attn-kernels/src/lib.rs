//! CubeCL attention kernels and their launchers. No modules, no configs: the caller
//! (`burn-attn-core`) decides which implementation serves a call.
//!
//! - [`plan`]: pure functions from a problem (shapes, dtype, band) and a device's
//!   capabilities to a launch plan (kernel family, tiles, planes, staging, grid), or the
//!   typed reason a kernel declines; a [`plan::ForcedPlan`] fixes choices for tuning.
//!   Always built (no GPU dependencies), so callers can name plans and reasons.
//! - `components` (feature `launch`): band bounds, staging and its pipeline, fragments and
//!   the forward's products, softmax step, epilogues, register tiles, schedule.
//! - `kernels` (feature `launch`): the kernels, written with the components.
//! - [`launch`] (feature `launch`): reads a call's problem and device, allocates outputs,
//!   launches a plan.
//!
//! The kernels: `flash_mma` (matrix units, CUDA sm_80+: f16/bf16, or f32 inputs on tf32
//! products, opt-in), `flash_unit` (portable, every CubeCL runtime), and the backward pairs
//! `flash_mma_backward` and `flash_unit_backward` (dQ; dK/dV; no atomics); over
//! block-sparse plans, `flash_mma_sparse` and `flash_unit_sparse` forward and the
//! `flash_unit_sparse_backward` pair.
#![warn(missing_docs)]

pub mod plan;

// The #[cube(launch)] macro generates undocumented items.
#[cfg(feature = "launch")]
#[allow(missing_docs)]
mod components;
#[cfg(feature = "launch")]
#[allow(missing_docs)]
pub mod kernels;
#[cfg(feature = "launch")]
pub mod launch;
#[cfg(test)]
mod source_hash;

/// The hash of the kernels' source and this crate's version: a comptime argument of every
/// kernel, so CubeCL's compilation cache never serves a kernel compiled from other source.
pub const KERNEL_SOURCE: u64 = include!(concat!(env!("OUT_DIR"), "/kernel_source.rs"));

/// The CubeCL types of the launchers' signatures, for callers that launch them directly.
#[cfg(feature = "launch")]
pub use burn_cubecl::{tensor::CubeTensor, CubeBackend};
#[cfg(feature = "launch")]
pub use components::schedule::cube_order_probe_kernel;
#[cfg(feature = "launch")]
pub use components::softmax::online_softmax_probe_kernel;
#[cfg(feature = "launch")]
pub use launch::{cube_order_probe, online_softmax_probe};
