//! The softmax's exponential. CubeCL 0.11's C++ backend turns `f32::exp` into the
//! full-precision `exp` even in kernels declared fast-math (CubeCL 0.10 emitted `__expf`);
//! on the matrix-unit kernels, where every score takes one, that costs about a tenth of the
//! forward's time. On CUDA the kernels take the hardware's base-2 approximation instead.

use cubecl::prelude::*;

/// The `ptx` argument of [`softmax_exp`] in the matrix-unit kernels, which the plans
/// launch on CUDA only.
pub(crate) const MMA_PTX: bool = true;

/// `e^x`. With `ptx` (CUDA targets only: inline PTX), `ex2.approx.ftz.f32` of `x *
/// log2(e)`, what `__expf` compiles to (about 2 ulp; results below f32's normal range flush
/// to 0, so masked scores give exactly 0); otherwise `f32::exp`. NaN stays NaN either way.
#[cube]
pub(crate) fn softmax_exp(x: f32, #[comptime] ptx: bool) -> f32 {
    if comptime!(ptx) {
        let power = x * f32::new(core::f32::consts::LOG2_E);
        let y: f32;
        gpu_asm!("ex2.approx.ftz.f32 {}, {};", out(_) y, in(_) power, options(pure, nomem));
        y
    } else {
        f32::exp(x)
    }
}
