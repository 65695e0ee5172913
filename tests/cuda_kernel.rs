//! The FlashAttention kernel on CUDA against the materialised reference (same grid and
//! rules as `wgpu_kernel.rs`, plus bf16). CI has no GPU: build with `--features cuda` and
//! run the binary on a CUDA machine (shared/DEVICE.md).
#![cfg(feature = "cuda")]

use burn::backend::Cuda;
use burn::tensor::DType;

mod kernel_common;
use kernel_common::*;

/// The fusion-wrapped type users get (`burn::backend::Cuda`); its custom op runs the
/// `CubeBackend` impl, so both impls are exercised. (`burn` does not re-export the plain
/// CUDA `CubeBackend`.)
type Fused = Cuda;

#[test]
fn cuda_kernel_f32_matches_reference_fused() {
    for case in grid() {
        check_f32::<Fused>(case);
    }
}

#[test]
fn cuda_kernel_long_sequence() {
    let mut case = Case::new(1025, 1025, 64).causal();
    case.heads = 1;
    case.kv_heads = 1;
    check_f32::<Fused>(case);
    check_f32::<Fused>(case.window(Some(100), Some(0)));
    check_low::<Fused>(case, DType::F16);
}

#[test]
fn cuda_kernel_f16_within_twice_reference_error() {
    for case in grid() {
        check_low::<Fused>(case, DType::F16);
    }
}

#[test]
fn cuda_kernel_bf16_within_twice_reference_error() {
    for case in grid() {
        check_low::<Fused>(case, DType::BF16);
    }
}
