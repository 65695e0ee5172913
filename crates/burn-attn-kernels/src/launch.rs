//! Host-side launchers: pick tiles for the device, allocate outputs, launch.

use burn_backend::{DType, Shape};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use crate::flash_unit::flash_unit_kernel;

/// The band and scale of one banded attention call, already resolved by the caller: the
/// window intersected with the causal rule, `None` = unbounded side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandArgs {
    /// Multiplier of `q . k`.
    pub scale: f32,
    /// Visible keys before the aligned query position (`None`: all).
    pub left: Option<usize>,
    /// Visible keys after the aligned query position (`None`: all).
    pub right: Option<usize>,
}

/// Why a launcher declined a call (the caller then uses another implementation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// The input dtype is not f32, f16 or bf16, or q, k, v differ in dtype.
    DType(String),
    /// A size is outside what the kernel handles (named in the message).
    Size(String),
    /// The device cannot stage even the smallest key tile in shared memory.
    SharedMemory(String),
}

impl core::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Unsupported::DType(s) => write!(f, "unsupported dtype: {s}"),
            Unsupported::Size(s) => write!(f, "unsupported size: {s}"),
            Unsupported::SharedMemory(s) => write!(f, "not enough shared memory: {s}"),
        }
    }
}

/// Largest head (or value) dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Most keys a row may see for the portable kernel (see the known bug in `flash_forward_unit`).
pub const UNIT_MAX_VISIBLE_KEYS: usize = 448;

/// Query rows per cube of the portable kernel.
const UNIT_BLOCK_Q: usize = 32;

/// Exact banded attention forward with the portable kernel (no matrix units).
///
/// `q: [batch, heads, seq_q, head_dim]`, `k: [batch, kv_heads, seq_k, head_dim]`,
/// `v: [batch, kv_heads, seq_k, value_dim]`, any strides, same dtype (f32, f16 or bf16),
/// shapes already checked by the caller (`kv_heads` divides `heads`). Returns the output
/// `[batch, heads, seq_q, value_dim]` in the input dtype and the row log-sum-exp
/// `[batch, heads, seq_q]` in f32 (`-inf` with a zero output row where no key is visible).
///
/// Declines (`Unsupported::Size`) bands wider than [`UNIT_MAX_VISIBLE_KEYS`] keys: on
/// lavapipe such rows come out wrong, for a reason not found yet.
pub fn flash_forward_unit<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    band: BandArgs,
) -> Result<(CubeTensor<R>, CubeTensor<R>), Unsupported> {
    check_dtypes(&q, &k, &v)?;
    let [batch, heads, seq_q, dim] = dims4(&q);
    let [_, _, seq_k, _] = dims4(&k);
    let value_dim = dims4(&v)[3];
    if dim == 0 || dim > MAX_HEAD_DIM || value_dim == 0 || value_dim > MAX_HEAD_DIM {
        return Err(Unsupported::Size(format!(
            "head_dim {dim} / value_dim {value_dim} (1..={MAX_HEAD_DIM})"
        )));
    }
    // Band arithmetic is i32 in the kernel; unbounded sides become seq_q + seq_k.
    let unbounded = seq_q + seq_k;
    if unbounded >= (i32::MAX / 4) as usize {
        return Err(Unsupported::Size(format!("seq_q + seq_k = {unbounded}")));
    }
    // Known bug (docs/PERFORMANCE.md, flash_unit v1): on lavapipe, rows that see more than
    // 448 keys get wrong outputs (lse stays right). Until it is understood, decline such
    // bands so the caller runs the tiled path; `BURN_ATTN_UNIT_NO_CAP=1` lifts the cap for
    // diagnosis.
    let widest = match (band.left, band.right) {
        (Some(l), Some(r)) => (l + r + 1).min(seq_k),
        _ => seq_k,
    };
    let no_cap = std::env::var("BURN_ATTN_UNIT_NO_CAP").is_ok_and(|v| v == "1");
    if widest > UNIT_MAX_VISIBLE_KEYS && !no_cap {
        return Err(Unsupported::Size(format!(
            "up to {widest} visible keys per row (the portable kernel takes {UNIT_MAX_VISIBLE_KEYS})"
        )));
    }
    let grid_y = batch * heads;
    let grid_x = seq_q.div_ceil(UNIT_BLOCK_Q);
    if grid_y > u16::MAX as usize || grid_x > u16::MAX as usize {
        return Err(Unsupported::Size(format!(
            "grid {grid_x} x {grid_y} (batch*heads and seq_q/{UNIT_BLOCK_Q} up to 65535)"
        )));
    }

    let client = q.client.clone();
    let device = q.device.clone();
    let dtype = q.dtype;
    // Plain contiguous buffers of exactly the tensor's size (not `empty_device_dtype`,
    // whose layout may be pitched).
    let alloc = |shape: Shape, dtype: DType| {
        let bytes = shape.num_elements() * dtype.size();
        let handle = client.empty(bytes.max(dtype.size()));
        CubeTensor::new_contiguous(client.clone(), device.clone(), shape, handle, dtype)
    };
    let out = alloc(Shape::new([batch, heads, seq_q, value_dim]), dtype);
    let lse = alloc(Shape::new([batch, heads, seq_q]), DType::F32);
    if batch * heads * seq_q == 0 {
        return Ok((out, lse));
    }

    let elem = dtype.size();
    let shared = client.properties().hardware.max_shared_memory_size;
    let block_k = [32usize, 16, 8, 4]
        .into_iter()
        .find(|bk| bk * (dim + value_dim) * elem <= shared)
        .ok_or_else(|| {
            Unsupported::SharedMemory(format!(
                "{shared} bytes for head_dim {dim}, value_dim {value_dim}"
            ))
        })?;

    let clamp = |side: Option<usize>| side.unwrap_or(unbounded).min(unbounded) as i32;
    flash_unit_kernel::launch::<R>(
        &client,
        CubeCount::Static(grid_x as u32, grid_y as u32, 1),
        CubeDim::new_1d(UNIT_BLOCK_Q as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        band.scale,
        clamp(band.left),
        clamp(band.right),
        f32::NEG_INFINITY,
        dim,
        value_dim,
        UNIT_BLOCK_Q,
        block_k,
        dtype.into(),
    );
    Ok((out, lse))
}

fn dims4<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}

fn check_dtypes<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
) -> Result<(), Unsupported> {
    let ok = matches!(q.dtype, DType::F32 | DType::F16 | DType::BF16);
    if !ok || k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(Unsupported::DType(format!(
            "q {:?}, k {:?}, v {:?} (need one of f32, f16, bf16 for all)",
            q.dtype, k.dtype, v.dtype
        )));
    }
    Ok(())
}
