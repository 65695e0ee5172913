//! What a device offers the plans: runtime, matrix instructions, asynchronous copies and
//! shared memory. Read from a CubeCL client by `launch::device_caps`; plain data, so plans
//! are unit-tested for any device on the host.

use super::Precision;

/// The runtime family of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// CubeCL's CUDA runtime.
    Cuda,
    /// CubeCL's WGPU runtime (WGSL, SPIR-V or MSL).
    Wgpu,
    /// Any other CubeCL runtime.
    Other,
}

/// The capabilities of a device that the plans depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    /// The runtime's name (for messages).
    pub runtime_name: &'static str,
    /// The runtime family.
    pub runtime: RuntimeKind,
    /// `mma.sync.m16n8k16` with f32 accumulation plus `ldmatrix`, for f16.
    pub mma_f16: bool,
    /// The same for bf16.
    pub mma_bf16: bool,
    /// `mma.sync.m16n8k8` on tf32 with f32 accumulation.
    pub mma_tf32: bool,
    /// Asynchronous global-to-shared copies (`cp.async`).
    pub copy_async: bool,
    /// Shared memory a cube may use, in bytes.
    pub shared_memory: usize,
    /// A CPU-type adapter (llvmpipe/lavapipe: a WGPU runtime without plane operations),
    /// whose shaders leave every loop once an invocation's iteration budget is spent.
    pub software_adapter: bool,
    /// 64-bit element offsets in kernels (CUDA; not WGPU).
    pub offsets_64: bool,
}

impl DeviceCaps {
    /// Whether the `m16n8k16` matrix instruction and `ldmatrix` exist for `precision`.
    pub fn mma_for(&self, precision: Precision) -> bool {
        match precision {
            Precision::F16 => self.mma_f16,
            Precision::BF16 => self.mma_bf16,
            Precision::F32 => false,
        }
    }

    /// A CUDA device of compute capability 9.0 (H100/H200: 227 KiB of shared memory per
    /// cube), for tests of the plans.
    pub fn hopper() -> Self {
        Self {
            runtime_name: "cuda",
            runtime: RuntimeKind::Cuda,
            mma_f16: true,
            mma_bf16: true,
            mma_tf32: true,
            copy_async: true,
            shared_memory: 232_448,
            software_adapter: false,
            offsets_64: true,
        }
    }

    /// Lavapipe (Mesa's software Vulkan device, 32 KiB of shared memory), for tests of the
    /// plans.
    pub fn lavapipe() -> Self {
        Self {
            runtime_name: "wgpu<vulkan>",
            runtime: RuntimeKind::Wgpu,
            mma_f16: false,
            mma_bf16: false,
            mma_tf32: false,
            copy_async: false,
            shared_memory: 32_768,
            software_adapter: true,
            offsets_64: false,
        }
    }
}
