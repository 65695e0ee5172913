//! Output buffers of the launchers: plain contiguous allocations of exactly the tensor's
//! size (not `empty_device_dtype`, whose layout may be pitched).

use burn_backend::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;

use crate::plan::Sizes;

/// A plain contiguous buffer of exactly `shape` in `dtype`, on `like`'s device.
pub(crate) fn alloc_contiguous(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    let bytes = shape.num_elements() * dtype.size();
    let handle = like.client.empty(bytes.max(dtype.size()));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

/// The forward's output `[b, h, seq_q, value_dim]` in the input dtype and lse `[b, h,
/// seq_q]` in f32.
pub(crate) fn alloc_outputs(q: &CubeTensor, sizes: &Sizes) -> (CubeTensor, CubeTensor) {
    let Sizes {
        batch,
        heads,
        seq_q,
        value_dim,
        ..
    } = *sizes;
    (
        alloc_contiguous(q, Shape::new([batch, heads, seq_q, value_dim]), q.dtype),
        alloc_contiguous(q, Shape::new([batch, heads, seq_q]), DType::F32),
    )
}

/// The backward's `dq`, `dk`, `dv` (contiguous, in `q`'s dtype, in the shapes of `q`, `k`
/// and `v`) and the f32 `D = rowsum(dO * O)` buffer `[batch, heads, seq_q]` the dQ kernel
/// writes for the dK/dV kernel.
pub(crate) fn alloc_gradients(q: &CubeTensor, sizes: &Sizes) -> [CubeTensor; 4] {
    let Sizes {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        dim,
        value_dim,
    } = *sizes;
    let dtype = q.dtype;
    [
        alloc_contiguous(q, Shape::new([batch, heads, seq_q, dim]), dtype),
        alloc_contiguous(q, Shape::new([batch, kv_heads, seq_k, dim]), dtype),
        alloc_contiguous(q, Shape::new([batch, kv_heads, seq_k, value_dim]), dtype),
        alloc_contiguous(q, Shape::new([batch, heads, seq_q]), DType::F32),
    ]
}
