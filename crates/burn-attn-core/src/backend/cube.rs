//! [`AttentionBackend`] for the CubeCL backend `Cube` (CUDA, WGPU; fused): the call's
//! metadata (shapes, dtype, device) goes through the kernels' plans in order; the first
//! that takes it is recorded in the fusion stream as a [`KernelLaunch`] that launches it
//! when the stream executes; when none does, the tiled tensor ops serve the call.
//!
//! The order is the one place that decides which implementation runs: forward
//! `flash_mma` (f16/bf16 matrix units), `flash_mma` on tf32 products (f32 on matrix
//! units, only when the options allow tf32), `flash_unit` (portable), then the tiled
//! tensor ops; backward `flash_mma_backward`, `flash_unit_backward`, then the tiled tensor
//! ops. Every decline's reason goes to the options' [`DispatchLog`](crate::DispatchLog).

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Cube, TensorMetadata};
use burn::tensor::{DType, FloatDType};
use burn_attn_kernels::launch::{
    device_caps, forward_problem, launch_backward, launch_forward, BackwardInputs,
};
use burn_attn_kernels::plan::{
    plan_backward, plan_forward, BackwardKernel, BandArgs, DeviceCaps, ForwardKernel, Precision,
    Problem, Unsupported,
};
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeBackend};

use super::{tiled_backward_on, tiled_forward_on, AttentionBackend};
use crate::dispatch::{report, Decline, Declines, Dispatch, Implementation, KernelPolicy, Pass};
use crate::options::AttentionOptions;

/// The launch arguments of the options for a head dimension.
fn band_args(options: &AttentionOptions, head_dim: usize) -> BandArgs {
    let window = options.effective_window();
    BandArgs {
        scale: options.scale_for(head_dim) as f32,
        left: window.left,
        right: window.right,
    }
}

/// The forward kernels in the order they are tried, with the implementation each is; the
/// tf32 kernel only where the options allow tf32.
fn forward_kernels(options: &AttentionOptions) -> &'static [(ForwardKernel, Implementation)] {
    const MMA: (ForwardKernel, Implementation) = (ForwardKernel::Mma, Implementation::FlashMma);
    const TF32: (ForwardKernel, Implementation) = (ForwardKernel::Tf32, Implementation::FlashTf32);
    const UNIT: (ForwardKernel, Implementation) = (ForwardKernel::Unit, Implementation::FlashUnit);
    if options.tf32 {
        &[MMA, TF32, UNIT]
    } else {
        &[MMA, UNIT]
    }
}

/// The backward kernels in the order they are tried.
const BACKWARD_KERNELS: [(BackwardKernel, Implementation); 2] = [
    (BackwardKernel::Mma, Implementation::FlashMmaBackward),
    (BackwardKernel::Unit, Implementation::FlashUnitBackward),
];

/// The first of `kernels` whose plan takes `problem`, with the declines before it; the
/// declines alone when none does. A problem every kernel declines (its dtype or shapes),
/// or the tiled policy, is a decline of each; a forced plan that a kernel cannot run ends
/// the search there, so a tuning run never times another kernel than the one it forced.
fn first_kernel<K: Copy, P>(
    kernels: &[(K, Implementation)],
    problem: &Result<Problem, Unsupported>,
    options: &AttentionOptions,
    plan: impl Fn(K, &Problem) -> Result<P, Unsupported>,
) -> (Option<(K, Implementation)>, Declines) {
    let every = |why: Decline| kernels.iter().map(|&(_, imp)| (imp, why.clone())).collect();
    if options.kernel == KernelPolicy::Tiled {
        return (None, every(Decline::TiledRequested));
    }
    let problem = match problem {
        Ok(problem) => problem,
        Err(why) => return (None, every(Decline::Kernel(why.clone()))),
    };
    let mut declined = Vec::new();
    for &(kernel, implementation) in kernels {
        match plan(kernel, problem) {
            Ok(_) => return (Some((kernel, implementation)), declined),
            Err(why @ Unsupported::Forced(_)) => {
                declined.push((implementation, Decline::Kernel(why)));
                break;
            }
            Err(why) => declined.push((implementation, Decline::Kernel(why))),
        }
    }
    (None, declined)
}

fn dims4(shape: &[usize]) -> [usize; 4] {
    [shape[0], shape[1], shape[2], shape[3]]
}

/// The kernels' precision of a call's dtypes.
pub(crate) fn precision_of(q: DType, k: DType, v: DType) -> Result<Precision, Unsupported> {
    match (q, k, v) {
        (DType::F32, DType::F32, DType::F32) => Ok(Precision::F32),
        (DType::F16, DType::F16, DType::F16) => Ok(Precision::F16),
        (DType::BF16, DType::BF16, DType::BF16) => Ok(Precision::BF16),
        (q, k, v) => Err(Unsupported::DType {
            got: format!("q {q:?}, k {k:?}, v {v:?}"),
        }),
    }
}

/// The problem of a call from its tensors' metadata, as contiguous tensors.
fn metadata_problem(
    q: &FloatTensor<Cube>,
    k: &FloatTensor<Cube>,
    v: &FloatTensor<Cube>,
    options: &AttentionOptions,
) -> Result<Problem, Unsupported> {
    let precision = precision_of(q.dtype(), k.dtype(), v.dtype())?;
    let q = dims4(&q.shape());
    let band = band_args(options, q[3]);
    Problem::contiguous(q, dims4(&k.shape()), dims4(&v.shape()), precision, band)
}

/// `lse` in f32.
pub(crate) fn f32_lse(lse: FloatTensor<Cube>) -> FloatTensor<Cube> {
    if lse.dtype() == DType::F32 {
        lse
    } else {
        Cube::float_cast(lse, FloatDType::F32)
    }
}

/// The capabilities of the device a fused tensor lives on.
fn caps_of(t: &FloatTensor<Cube>) -> DeviceCaps {
    device_caps(&t.device().client())
}

impl AttentionBackend for Cube {
    fn banded_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let problem = metadata_problem(&q, &k, &v, &options);
        let caps = caps_of(&q);
        let forced = options.forced_plan.unwrap_or_default();
        let kernels = forward_kernels(&options);
        let (chosen, declined) = first_kernel(kernels, &problem, &options, |kernel, p| {
            plan_forward(kernel, p, &caps, &forced)
        });
        let Some((kernel, served)) = chosen else {
            // The lse in f32, as the kernels return it.
            let (out, lse) = tiled_forward_on::<Self>(q, k, v, &options, declined);
            return (out, f32_lse(lse));
        };
        report(
            options.log.as_ref(),
            Dispatch {
                pass: Pass::Forward,
                served,
                declined,
            },
        );
        <Self as KernelLaunch>::flash_forward(q, k, v, kernel, options)
    }

    fn banded_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // The kernels take the lse in f32 (what the forward returns; a cast otherwise), and
        // out and d_out in the inputs' dtype and rows.
        let lse = f32_lse(lse);
        let problem = if out.dtype() == q.dtype() && d_out.dtype() == q.dtype() {
            metadata_problem(&q, &k, &v, &options).and_then(|p| {
                p.check_backward_shapes(&out.shape(), &lse.shape(), &d_out.shape())
                    .map(|()| p)
            })
        } else {
            Err(Unsupported::DType {
                got: format!(
                    "out {:?}, d_out {:?} with q {:?} (out and d_out in the input dtype)",
                    out.dtype(),
                    d_out.dtype(),
                    q.dtype()
                ),
            })
        };
        let caps = caps_of(&q);
        let forced = options.forced_plan.unwrap_or_default();
        let (chosen, declined) =
            first_kernel(&BACKWARD_KERNELS, &problem, &options, |kernel, p| {
                plan_backward(kernel, p, &caps, &forced)
            });
        let Some((kernel, served)) = chosen else {
            return tiled_backward_on::<Self>(q, k, v, out, lse, d_out, &options, declined);
        };
        report(
            options.log.as_ref(),
            Dispatch {
                pass: Pass::Backward,
                served,
                declined,
            },
        );
        <Self as KernelLaunch>::flash_backward(q, k, v, out, lse, d_out, kernel, options)
    }
}

/// The forward's outputs: rows like q with v's width, in q's dtype; the lse in f32.
fn forward_outputs(
    q: &TensorSpec,
    _k: &TensorSpec,
    v: &TensorSpec,
    _kernel: &ForwardKernel,
    _options: &AttentionOptions,
) -> (TensorSpec, TensorSpec) {
    let [b, h, n, _] = dims4(&q.shape);
    let value_dim = v.shape[3];
    (
        TensorSpec::new([b, h, n, value_dim].into(), q.dtype),
        TensorSpec::new([b, h, n].into(), DType::F32),
    )
}

/// The backward's outputs: gradients like q, k and v.
#[allow(clippy::too_many_arguments)]
fn backward_outputs(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _out: &TensorSpec,
    _lse: &TensorSpec,
    _d_out: &TensorSpec,
    _kernel: &BackwardKernel,
    _options: &AttentionOptions,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone())
}

/// The kernel launches, as a backend extension of their own so that the fused backend
/// records them in its stream (the `Fusion` implementation the macro generates) and
/// `CubeBackend` runs them when the stream executes. The kernel was chosen from the call's
/// metadata; a layout that kernel does not take (strides, offsets) is made contiguous
/// first, which the metadata's plan takes.
#[backend_extension(Cube, Fusion)]
pub trait KernelLaunch: Backend {
    /// Launches forward `kernel`: output and row log-sum-exp.
    #[fusion(meta = forward_outputs)]
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        kernel: ForwardKernel,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Launches backward `kernel`: `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = backward_outputs)]
    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        kernel: BackwardKernel,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `why` a kernel chosen from a call's metadata declined its contiguous tensors: a bug of
/// the plans (the metadata's problem is that of contiguous tensors).
fn declined_contiguous(kernel: impl core::fmt::Debug, why: Unsupported) -> ! {
    panic!(
        "burn-attn: {kernel:?} took the call's metadata but declined its contiguous tensors: {why}"
    )
}

impl KernelLaunch for CubeBackend {
    fn flash_forward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        kernel: ForwardKernel,
        options: AttentionOptions,
    ) -> (CubeTensor, CubeTensor) {
        let band = band_args(&options, q.meta.shape()[3]);
        let caps = device_caps(&q.client);
        let forced = options.forced_plan.unwrap_or_default();
        let planned = |q: &CubeTensor, k: &CubeTensor, v: &CubeTensor| {
            let problem = forward_problem(q, k, v, band)?;
            plan_forward(kernel, &problem, &caps, &forced).map(|plan| (plan, problem))
        };
        let (q, k, v, (plan, problem)) = match planned(&q, &k, &v) {
            Ok(planned) => (q, k, v, planned),
            Err(_) => {
                let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
                let planned =
                    planned(&q, &k, &v).unwrap_or_else(|why| declined_contiguous(kernel, why));
                (q, k, v, planned)
            }
        };
        log::trace!("burn-attn: {plan:?} for {:?}", problem.sizes);
        // SAFETY: `plan` was made by `plan_forward` for `problem`, the problem of these
        // tensors.
        unsafe { launch_forward(&plan, &problem, q, k, v) }
    }

    fn flash_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        d_out: CubeTensor,
        kernel: BackwardKernel,
        options: AttentionOptions,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let band = band_args(&options, q.meta.shape()[3]);
        let caps = device_caps(&q.client);
        let forced = options.forced_plan.unwrap_or_default();
        let planned = |inputs: &BackwardInputs| {
            let problem = inputs.problem(band)?;
            plan_backward(kernel, &problem, &caps, &forced).map(|plan| (plan, problem))
        };
        let inputs = BackwardInputs {
            q,
            k,
            v,
            out,
            lse,
            d_out,
        };
        let (inputs, (plan, problem)) = match planned(&inputs) {
            Ok(planned) => (inputs, planned),
            Err(_) => {
                let inputs = BackwardInputs {
                    q: into_contiguous(inputs.q),
                    k: into_contiguous(inputs.k),
                    v: into_contiguous(inputs.v),
                    out: into_contiguous(inputs.out),
                    lse: into_contiguous(inputs.lse),
                    d_out: into_contiguous(inputs.d_out),
                };
                let planned =
                    planned(&inputs).unwrap_or_else(|why| declined_contiguous(kernel, why));
                (inputs, planned)
            }
        };
        log::trace!("burn-attn: {plan:?} for {:?}", problem.sizes);
        // SAFETY: `plan` was made by `plan_backward` for `problem`, the problem of `inputs`.
        unsafe { launch_backward(&plan, &problem, inputs) }
    }
}
