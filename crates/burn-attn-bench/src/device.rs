//! The device a run uses: the backend and float type of the command line, as a Burn
//! device whose default float type is that type, its memory meter, and waiting for it.

use burn::tensor::{Device, FloatDType};

use crate::cli::{BackendKind, DType};
use crate::run::{DeviceMemory, MemoryMeter};

/// The device of `backend` with `dtype` as its default float type (tensors created there,
/// and the modules' parameters, take it), or why this build or backend cannot run it.
pub fn device_for(backend: BackendKind, dtype: DType) -> Result<Device, String> {
    let mut device = match backend {
        BackendKind::Cpu if dtype != DType::F32 => {
            return Err(format!("the CPU backend runs f32, not {}", dtype.name()))
        }
        // Burn 0.22 deprecates burn-ndarray; it stays this tool's CPU backend.
        #[allow(deprecated)]
        BackendKind::Cpu => Device::ndarray(),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Device::cuda(0),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu if dtype == DType::Bf16 => {
            return Err("WGPU has no bf16; use f32 or f16".to_string())
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        #[allow(unreachable_patterns)]
        other => {
            return Err(format!(
                "backend {other:?} is not compiled in: build with `--features {}`",
                format!("{other:?}").to_lowercase()
            ))
        }
    };
    let float = match dtype {
        DType::F32 => FloatDType::F32,
        DType::F16 => FloatDType::F16,
        DType::Bf16 => FloatDType::BF16,
    };
    device
        .configure(float)
        .map_err(|e| format!("{backend:?} with {}: {e:?}", dtype.name()))?;
    Ok(device)
}

/// How `compare` measures memory on `device`: its allocator's pool where the backend
/// reports one (GPUs), the host allocator otherwise.
pub fn memory_meter(device: &Device) -> MemoryMeter {
    if device.memory_pool_usage().is_none() {
        return MemoryMeter::allocator();
    }
    let (sampled, cleaned) = (device.clone(), device.clone());
    MemoryMeter {
        description: "device memory pool: growth of bytes reserved from the device during one \
            forward after a pool cleanup, or of bytes in use if larger (the pool keeps no peak \
            counter; sampled after the synced forward with its output alive)"
            .into(),
        sample: Some(Box::new(move || {
            let usage = sampled.memory_pool_usage();
            DeviceMemory {
                in_use: usage.as_ref().map_or(0, |u| u.bytes_in_use),
                reserved: usage.as_ref().map_or(0, |u| u.bytes_reserved),
            }
        })),
        cleanup: Some(Box::new(move || cleaned.memory_cleanup())),
    }
}

/// Waits for `device`'s queued work. A failed execution (a GPU allocation that did not
/// fit, a faulted kernel) panics here, naming the device and the error, so the row fails
/// at the call that caused it.
pub(crate) fn sync(device: &Device) {
    if let Err(e) = device.sync() {
        panic!("{device:?}: execution failed: {e}");
    }
}
