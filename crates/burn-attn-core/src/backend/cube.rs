//! [`AttentionBackend`] for the CubeCL backends: `CubeBackend` asks the kernels' plans in
//! order and launches the first that takes the call; `Fusion<B>` records each call as a
//! custom operation that runs the inner backend's implementation when the fusion stream
//! executes.
//!
//! The order is the one place that decides which implementation runs: forward
//! `flash_mma` (f16/bf16 matrix units), `flash_mma` on tf32 products (f32 on matrix
//! units, only when the options allow tf32), `flash_unit` (portable), then the tiled
//! tensor ops; backward
//! `flash_mma_backward`, `flash_unit_backward`, then the tiled tensor ops. Every decline's
//! reason goes to the options' [`DispatchLog`](crate::DispatchLog).

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_attn_kernels::launch::{
    device_caps, forward_problem, launch_backward, launch_forward, BackwardInputs,
};
use burn_attn_kernels::plan::{
    plan_backward, plan_forward, BackwardKernel, BandArgs, ForwardKernel, Problem, Unsupported,
};
use burn_cubecl::{
    tensor::CubeTensor, BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{tiled_band, AttentionBackend};
use crate::backward::tiled_band_backward;
use crate::dispatch::{
    report, serve_tiled, Decline, Declines, Dispatch, Implementation, KernelPolicy, Pass,
};
use crate::options::AttentionOptions;

/// The tiled tensor-op path with the lse in f32, as the kernels return it.
fn tiled_fallback<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: &AttentionOptions,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let (out, lse) = tiled_band(q, k, v, options);
    let lse = if lse.dtype() == DType::F32 {
        lse
    } else {
        lse.cast(DType::F32)
    };
    (out, lse)
}

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
fn first_plan<K: Copy, P>(
    kernels: &[(K, Implementation)],
    problem: &Result<Problem, Unsupported>,
    options: &AttentionOptions,
    plan: impl Fn(K, &Problem) -> Result<P, Unsupported>,
) -> (Option<(P, Implementation)>, Declines) {
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
            Ok(plan) => return (Some((plan, implementation)), declined),
            Err(why @ Unsupported::Forced(_)) => {
                declined.push((implementation, Decline::Kernel(why)));
                break;
            }
            Err(why) => declined.push((implementation, Decline::Kernel(why))),
        }
    }
    (None, declined)
}

fn primitive<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: &Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    t.clone().into_primitive().tensor()
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionBackend
    for CubeBackend<R, F, I, BT>
{
    fn banded_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        let (qp, kp, vp) = (primitive(&q), primitive(&k), primitive(&v));
        let problem = forward_problem(&qp, &kp, &vp, band_args(options, q.dims()[3]));
        let caps = device_caps(&qp.client);
        let forced = options.forced_plan.unwrap_or_default();
        let kernels = forward_kernels(options);
        let (chosen, declined) = first_plan(kernels, &problem, options, |kernel, p| {
            plan_forward(kernel, p, &caps, &forced)
        });
        let Some((plan, served)) = chosen else {
            return serve_tiled(Pass::Forward, options, declined, || {
                tiled_fallback(q, k, v, options)
            });
        };
        let problem = problem.expect("a plan was made for it");
        log::trace!("burn-attn: {plan:?} for {:?}", problem.sizes);
        // SAFETY: `plan` was made by `plan_forward` for `problem`, the problem of these
        // tensors.
        let (out, lse) = unsafe { launch_forward(&plan, &problem, qp, kp, vp) };
        report(
            options.log.as_ref(),
            Dispatch {
                pass: Pass::Forward,
                served,
                declined,
            },
        );
        (
            Tensor::from_primitive(TensorPrimitive::Float(out)),
            Tensor::from_primitive(TensorPrimitive::Float(lse)),
        )
    }

    fn banded_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        out: Tensor<Self, 4>,
        lse: Tensor<Self, 3>,
        d_out: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        // The kernels take the lse in f32 (what the forward returns; a cast otherwise).
        let lse32 = if lse.dtype() == DType::F32 {
            lse.clone()
        } else {
            lse.clone().cast(DType::F32)
        };
        let inputs = BackwardInputs {
            q: primitive(&q),
            k: primitive(&k),
            v: primitive(&v),
            out: primitive(&out),
            lse: primitive(&lse32),
            d_out: primitive(&d_out),
        };
        let problem = inputs.problem(band_args(options, q.dims()[3]));
        let caps = device_caps(&inputs.q.client);
        let forced = options.forced_plan.unwrap_or_default();
        let (chosen, declined) = first_plan(&BACKWARD_KERNELS, &problem, options, |kernel, p| {
            plan_backward(kernel, p, &caps, &forced)
        });
        let Some((plan, served)) = chosen else {
            return serve_tiled(Pass::Backward, options, declined, || {
                tiled_band_backward(q, k, v, out, lse, d_out, options)
            });
        };
        let problem = problem.expect("a plan was made for it");
        log::trace!("burn-attn: {plan:?} for {:?}", problem.sizes);
        // SAFETY: `plan` was made by `plan_backward` for `problem`, the problem of `inputs`.
        let (dq, dk, dv) = unsafe { launch_backward(&plan, &problem, inputs) };
        report(
            options.log.as_ref(),
            Dispatch {
                pass: Pass::Backward,
                served,
                declined,
            },
        );
        let float = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
        (float(dq), float(dk), float(dv))
    }
}

/// The fusion custom operation: runs the inner backend's `banded_attention`.
#[derive(Clone, Debug)]
struct BandedAttentionOp<B> {
    desc: CustomOpIr,
    options: AttentionOptions,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + AttentionBackend> Operation<B::FusionRuntime> for BandedAttentionOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([q, k, v], [out, lse]) = self.desc.as_fixed();
        let tensor =
            |t: B::FloatTensorPrimitive| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
        let q = tensor(handles.get_float_tensor::<B>(q));
        let k = tensor(handles.get_float_tensor::<B>(k));
        let v = tensor(handles.get_float_tensor::<B>(v));
        let (o, l) = B::banded_attention(q, k, v, &self.options);
        handles.register_float_tensor::<B>(&out.id, o.into_primitive().tensor());
        handles.register_float_tensor::<B>(&lse.id, l.into_primitive().tensor());
    }
}

/// The fusion custom operation of the backward: runs the inner backend's
/// `banded_attention_backward`.
#[derive(Clone, Debug)]
struct BandedAttentionBackwardOp<B> {
    desc: CustomOpIr,
    options: AttentionOptions,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + AttentionBackend> Operation<B::FusionRuntime>
    for BandedAttentionBackwardOp<B>
{
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([q, k, v, out, lse, d_out], [dq, dk, dv]) = self.desc.as_fixed();
        let mut get = |t: &TensorIr| handles.get_float_tensor::<B>(t);
        let (q, k, v, out, lse, d_out) = (get(q), get(k), get(v), get(out), get(lse), get(d_out));
        let f4 =
            |t: B::FloatTensorPrimitive| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
        let (gq, gk, gv) = B::banded_attention_backward(
            f4(q),
            f4(k),
            f4(v),
            f4(out),
            Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse)),
            f4(d_out),
            &self.options,
        );
        for (ir, grad) in [(dq, gq), (dk, gk), (dv, gv)] {
            handles.register_float_tensor::<B>(&ir.id, grad.into_primitive().tensor());
        }
    }
}

impl<B: FusionBackend + AttentionBackend> AttentionBackend for Fusion<B> {
    fn banded_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        let [batch, heads, seq_q, _] = q.dims();
        let value_dim = v.dims()[3];
        let dtype = q.dtype();
        let q = q.into_primitive().tensor();
        let k = k.into_primitive().tensor();
        let v = v.into_primitive().tensor();
        let client = q.client.clone();
        let streams = OperationStreams::with_inputs([&q, &k, &v]);
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            [batch, heads, seq_q, value_dim].into(),
            dtype,
        );
        let lse = TensorIr::uninit(
            client.create_empty_handle(),
            [batch, heads, seq_q].into(),
            DType::F32,
        );
        let desc = CustomOpIr::new(
            "burn_attn_banded_attention",
            &[q.into_ir(), k.into_ir(), v.into_ir()],
            &[out, lse],
        );
        let op = BandedAttentionOp::<B> {
            desc: desc.clone(),
            options: options.clone(),
            _backend: core::marker::PhantomData,
        };
        let mut outputs = client.register(streams, OperationIr::Custom(desc), op);
        let lse = outputs.pop().expect("two outputs");
        let out = outputs.pop().expect("two outputs");
        (
            Tensor::from_primitive(TensorPrimitive::Float(out)),
            Tensor::from_primitive(TensorPrimitive::Float(lse)),
        )
    }

    fn banded_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        out: Tensor<Self, 4>,
        lse: Tensor<Self, 3>,
        d_out: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let dtype = q.dtype();
        let shapes = [q.dims(), k.dims(), v.dims()];
        let q = q.into_primitive().tensor();
        let k = k.into_primitive().tensor();
        let v = v.into_primitive().tensor();
        let out = out.into_primitive().tensor();
        let lse = lse.into_primitive().tensor();
        let d_out = d_out.into_primitive().tensor();
        let client = q.client.clone();
        let streams = OperationStreams::with_inputs([&q, &k, &v, &out, &lse, &d_out]);
        let grads =
            shapes.map(|shape| TensorIr::uninit(client.create_empty_handle(), shape.into(), dtype));
        let desc = CustomOpIr::new(
            "burn_attn_banded_attention_backward",
            &[
                q.into_ir(),
                k.into_ir(),
                v.into_ir(),
                out.into_ir(),
                lse.into_ir(),
                d_out.into_ir(),
            ],
            &grads,
        );
        let op = BandedAttentionBackwardOp::<B> {
            desc: desc.clone(),
            options: options.clone(),
            _backend: core::marker::PhantomData,
        };
        let mut outputs = client.register(streams, OperationIr::Custom(desc), op);
        let float = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
        let dv = outputs.pop().expect("three outputs");
        let dk = outputs.pop().expect("three outputs");
        let dq = outputs.pop().expect("three outputs");
        (float(dq), float(dk), float(dv))
    }
}
