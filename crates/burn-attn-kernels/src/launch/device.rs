//! What the plans need to know of a call's tensors and device, read from CubeCL.

use burn_backend::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::features::{MmaConfig, Plane};
use cubecl::ir::{AddressType, ElemType, FloatKind};
use cubecl::prelude::*;

use crate::plan::{
    span, BandArgs, DeviceCaps, Precision, Problem, RuntimeKind, Sizes, Unsupported,
};

/// The capabilities of `client`'s device.
pub fn device_caps(client: &Client) -> DeviceCaps {
    let name = client.name();
    let props = client.properties();
    let runtime = if name == "cuda" {
        RuntimeKind::Cuda
    } else if name.starts_with("wgpu") {
        RuntimeKind::Wgpu
    } else {
        RuntimeKind::Other
    };
    let f32_acc = ElemType::Float(FloatKind::F32);
    let matmul = &props.features.matmul;
    let has_mma = |input: FloatKind, k: u32| {
        let input = ElemType::Float(input);
        matmul.mma.contains(&MmaConfig {
            a_type: input,
            b_type: input,
            cd_type: f32_acc,
            m: 16,
            n: 8,
            k,
        })
    };
    let has_ldmatrix = |input: FloatKind| {
        let input = ElemType::Float(input);
        matmul.ldmatrix.contains(&input)
    };
    DeviceCaps {
        runtime_name: name,
        runtime,
        mma_f16: has_mma(FloatKind::F16, 16) && has_ldmatrix(FloatKind::F16),
        mma_bf16: has_mma(FloatKind::BF16, 16) && has_ldmatrix(FloatKind::BF16),
        mma_tf32: has_mma(FloatKind::TF32, 8),
        copy_async: props.features.copy_async,
        shared_memory: props.hardware.max_shared_memory_size,
        software_adapter: runtime == RuntimeKind::Wgpu
            && !props.features.plane.contains(Plane::Ops),
        offsets_64: props.supports_address(AddressType::U64),
    }
}

/// The forward's problem: `q: [batch, heads, seq_q, head_dim]`, `k: [batch, kv_heads,
/// seq_k, head_dim]`, `v: [batch, kv_heads, seq_k, value_dim]`, one dtype of f32, f16 or
/// bf16, any strides.
pub fn forward_problem(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    band: BandArgs,
) -> Result<Problem, Unsupported> {
    let precision = precision_of(q, k, v)?;
    let sizes = Sizes::check(dims4(q), dims4(k), dims4(v))?;
    // The output and the gradients the kernels allocate are contiguous, of q's, k's, v's
    // or the output rows' shape.
    let out_rows = [sizes.batch, sizes.heads, sizes.seq_q, sizes.value_dim];
    Ok(Problem {
        sizes,
        precision,
        band,
        aligned_rows: [q, k, v].iter().all(|t| aligned_rows(t)),
        span: [q, k, v]
            .iter()
            .map(|t| tensor_span(t).max(t.meta.shape().iter().product()))
            .fold(out_rows.iter().product(), usize::max),
    })
}

/// The backward's problem: the forward's inputs, its output `out` and `d_out` (`[batch,
/// heads, seq_q, value_dim]`, the inputs' dtype) and its row log-sum-exp `lse` (`[batch,
/// heads, seq_q]`, f32).
pub(crate) fn backward_problem(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    out: &CubeTensor,
    lse: &CubeTensor,
    d_out: &CubeTensor,
    band: BandArgs,
) -> Result<Problem, Unsupported> {
    let mut problem = forward_problem(q, k, v, band)?;
    if out.dtype != q.dtype || d_out.dtype != q.dtype || lse.dtype != DType::F32 {
        return Err(Unsupported::DType {
            got: format!(
                "out {:?}, d_out {:?}, lse {:?} with q {:?} (out and d_out in the input \
                 dtype, lse in f32)",
                out.dtype, d_out.dtype, lse.dtype, q.dtype
            ),
        });
    }
    problem.check_backward_shapes(
        out.meta.shape().as_slice(),
        lse.meta.shape().as_slice(),
        d_out.meta.shape().as_slice(),
    )?;
    problem.aligned_rows &= aligned_rows(d_out);
    problem.span = [out, lse, d_out]
        .iter()
        .map(|t| tensor_span(t))
        .fold(problem.span, usize::max);
    Ok(problem)
}

/// The precision of a call whose `q`, `k` and `v` share one float dtype, or why not.
pub(crate) fn precision_of(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
) -> Result<Precision, Unsupported> {
    let precision = match q.dtype {
        DType::F32 => Some(Precision::F32),
        DType::F16 => Some(Precision::F16),
        DType::BF16 => Some(Precision::BF16),
        _ => None,
    };
    match precision {
        Some(p) if k.dtype == q.dtype && v.dtype == q.dtype => Ok(p),
        _ => Err(Unsupported::DType {
            got: format!("q {:?}, k {:?}, v {:?}", q.dtype, k.dtype, v.dtype),
        }),
    }
}

/// Whether the rows of `t` can be staged with 16-byte copies: contiguous columns, row,
/// head and batch strides and the buffer offset all multiples of 16 bytes.
pub(crate) fn aligned_rows(t: &CubeTensor) -> bool {
    let elem = t.dtype.size();
    let [.., dim] = dims4(t);
    let strides = t.meta.strides();
    let chunk = 16 / elem;
    dim.is_multiple_of(chunk)
        && strides[3] == 1
        && strides[..3].iter().all(|s| s.is_multiple_of(chunk))
        && t.handle.offset_start.unwrap_or(0).is_multiple_of(16)
}

/// Elements `t` spans from its first: its highest element offset plus one.
pub(crate) fn tensor_span(t: &CubeTensor) -> usize {
    span(t.meta.shape().as_slice(), t.meta.strides())
}

pub(crate) fn dims4(t: &CubeTensor) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}
