//! CubeCL attention kernels and their launchers. No modules, no configs: callers (the
//! `burn-attn-core` crate) resolve options into plain launch arguments and decide which
//! implementation runs.
//!
//! - [`flash_forward_unit`]: the portable FlashAttention forward (no matrix units), for
//!   every runtime including WGSL and software Vulkan (lavapipe).
//! - [`flash_forward_mma`]: the matrix-unit forward (`mma.sync.m16n8k16`, f16/bf16) for
//!   runtimes that report that instruction (CUDA sm_80+).
#![warn(missing_docs)]

// The #[cube(launch)] macro generates undocumented items.
#[allow(missing_docs)]
mod flash_mma;
#[allow(missing_docs)]
mod flash_unit;
mod launch;

pub use flash_mma::flash_mma_kernel;
pub use flash_unit::flash_unit_kernel;
pub use launch::{
    flash_forward, flash_forward_mma, flash_forward_unit, BandArgs, Unsupported, MAX_HEAD_DIM,
    UNIT_MAX_BAND_ELEMENTS,
};
