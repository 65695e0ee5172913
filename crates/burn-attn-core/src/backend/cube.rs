//! [`AttentionBackend`] for the CubeCL backends: `CubeBackend` launches the kernels of
//! `burn-attn-kernels` (forward and backward); `Fusion<B>` records each call as a custom
//! operation that runs the inner backend's implementation when the fusion stream executes.
//!
//! Anything the kernels decline (dtype, sizes, shared memory) runs the tiled tensor-op path.

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_attn_kernels::{flash_backward, flash_forward, BandArgs};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{tiled_band, AttentionBackend};
use crate::backward::tiled_band_backward;
use crate::options::AttentionOptions;

/// Whether `BURN_ATTN_NO_KERNEL=1` is set (as the other switches, only "1" counts): forces
/// the tiled path (for comparisons and to rule the kernels out when debugging).
fn kernel_disabled() -> bool {
    std::env::var("BURN_ATTN_NO_KERNEL").is_ok_and(|v| v == "1")
}

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

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionBackend
    for CubeBackend<R, F, I, BT>
{
    fn banded_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        if kernel_disabled() {
            return tiled_fallback(q, k, v, options);
        }
        let band = band_args(options, q.dims()[3]);
        let launched = flash_forward::<R>(
            q.clone().into_primitive().tensor(),
            k.clone().into_primitive().tensor(),
            v.clone().into_primitive().tensor(),
            band,
        );
        match launched {
            Ok((out, lse)) => (
                Tensor::from_primitive(TensorPrimitive::Float(out)),
                Tensor::from_primitive(TensorPrimitive::Float(lse)),
            ),
            Err(_) => tiled_fallback(q, k, v, options),
        }
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
        if kernel_disabled() {
            return tiled_band_backward(q, k, v, out, lse, d_out, options);
        }
        let band = band_args(options, q.dims()[3]);
        // The kernels take the lse in f32 (what the forward returns; a cast otherwise).
        let lse32 = if lse.dtype() == DType::F32 {
            lse.clone()
        } else {
            lse.clone().cast(DType::F32)
        };
        let prim = |t: &Tensor<Self, 4>| t.clone().into_primitive().tensor();
        let launched = flash_backward::<R>(
            prim(&q),
            prim(&k),
            prim(&v),
            prim(&out),
            lse32.into_primitive().tensor(),
            prim(&d_out),
            band,
        );
        let float = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
        match launched {
            Ok((dq, dk, dv)) => (float(dq), float(dk), float(dv)),
            Err(_) => tiled_band_backward(q, k, v, out, lse, d_out, options),
        }
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
            options: *options,
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
            options: *options,
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
