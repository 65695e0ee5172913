//! Linear attention on the chunked kernel: a backend extension of its own (`Cube` and
//! `Autodiff`), which [`linear_attention_with`](crate::linear_attention_with) and
//! [`causal_linear_attention_with`](crate::causal_linear_attention_with) call on CubeCL
//! devices. The forward saves only its output and the f32 normaliser per row; the backward
//! is three more passes of the same kernel (see `linear_cube`), so training memory stays
//! O(seq) and no per-chunk state is ever stored.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::backend::{backend_extension, tensor::FloatTensor, Backend};
use burn::tensor::{DType, Tensor};
use burn_attn_kernels::plan::{plan_linear, Unsupported};

use super::cube_impl::precision_of;
use super::linear_passes::Direction;
use super::sparse::cube_caps;
use crate::dispatch::{report, Decline, Declines, Dispatch, Implementation, Pass};
use crate::linear::{LinearAttentionState, LinearOptions};
use crate::shape::AttentionShape;
use crate::KernelPolicy;

/// One linear-attention call on the kernel: its form, whether it starts from a given state,
/// and the caller's options.
#[derive(Debug, Clone)]
pub(crate) struct LinearCall {
    /// Causal (chunked, with a carried state) or not.
    pub causal: bool,
    /// Whether the causal call starts from a given state.
    pub state_in: bool,
    /// Whether the backward's passes all run on the matrix-unit kernel (what the backward
    /// reports).
    pub matrix_backward: bool,
    pub options: LinearOptions,
}

/// Linear attention of feature-mapped operands on the chunked kernel, forward and backward.
#[backend_extension(Cube: cfg(feature = "cube"), Autodiff)]
pub(crate) trait LinearAttentionBackend: Backend {
    /// `(out, den, s, z)`: the output `[batch, heads, seq_q, value_dim]` in the inputs'
    /// dtype, the f32 divisor `den + eps` per row `[batch, heads, seq_q]` (`[1, 1, 1]`
    /// unnormalised) and, causal, the f32 state after the last row (`s: [batch, heads, dim,
    /// value_dim]`, `z: [batch, heads, dim]`; `[1, 1, 1, 1]` and `[1, 1, 1]` otherwise).
    /// `s0`, `z0` are the starting state where `call.state_in` (placeholders otherwise);
    /// no gradient flows into them.
    fn linear_attention_kernel(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        call: LinearCall,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// `(dq, dk, dv)` of [`LinearAttentionBackend::linear_attention_kernel`] for `d_out`.
    #[allow(clippy::too_many_arguments)]
    fn linear_attention_kernel_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        out: FloatTensor<Self>,
        den: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        call: LinearCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The passes a call runs, forward and backward, each planned on the device: the kernel
/// serves the call only if it takes every one. Returns whether the forward's passes, and
/// the backward's, all run on the matrix-unit kernel.
fn plan_call(
    shape: &AttentionShape,
    dtypes: [DType; 3],
    call: &LinearCall,
    caps: &burn_attn_kernels::plan::DeviceCaps,
) -> Result<(bool, bool), Unsupported> {
    let precision = precision_of(dtypes[0], dtypes[1], dtypes[2])?;
    let (mut forward, mut backward) = (true, true);
    for (direction, sizes, mode) in call.planned_passes(shape) {
        let plan = plan_linear(&sizes, &mode, precision, caps, call.options.kernel_chunk)?;
        match direction {
            Direction::Forward => forward &= plan.matrix,
            Direction::Backward => backward &= plan.matrix,
        }
    }
    Ok((forward, backward))
}

/// Runs a call on the kernel, or returns why it declines (empty: the device has no
/// kernels). Causal calls return the state after the last row (f32).
pub(crate) fn linear_kernel_attention(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    state: Option<LinearAttentionState>,
    shape: &AttentionShape,
    causal: bool,
    options: &LinearOptions,
) -> Result<(Tensor<4>, Option<LinearAttentionState>), Declines> {
    let Some(caps) = cube_caps(&phi_q.device()) else {
        return Err(Vec::new());
    };
    let decline = |why: Decline| vec![(Implementation::LinearChunk, why)];
    if options.kernel == KernelPolicy::Tiled {
        return Err(decline(Decline::TiledRequested));
    }
    let mut call = LinearCall {
        causal,
        state_in: state.is_some(),
        matrix_backward: false,
        options: options.clone(),
    };
    let dtypes = [phi_q.dtype(), phi_k.dtype(), v.dtype()];
    let (matrix_forward, matrix_backward) =
        plan_call(shape, dtypes, &call, &caps).map_err(|why| decline(Decline::Kernel(why)))?;
    call.matrix_backward = matrix_backward;
    report(
        options.log.as_ref(),
        Dispatch {
            pass: Pass::Forward,
            served: if matrix_forward {
                Implementation::LinearChunkMma
            } else {
                Implementation::LinearChunk
            },
            declined: Vec::new(),
        },
    );
    let device = phi_q.device();
    let (s0, z0) = match state {
        Some(state) => (
            state.kv.cast(DType::F32).into_dispatch(),
            state.z.cast(DType::F32).into_dispatch(),
        ),
        None => (
            Tensor::<4>::zeros([1, 1, 1, 1], (&device, DType::F32)).into_dispatch(),
            Tensor::<3>::zeros([1, 1, 1], (&device, DType::F32)).into_dispatch(),
        ),
    };
    let (out, _den, s, z) =
        <burn::backend::Dispatch as LinearAttentionBackend>::linear_attention_kernel(
            phi_q.into_dispatch(),
            phi_k.into_dispatch(),
            v.into_dispatch(),
            s0,
            z0,
            call,
        );
    let state = causal.then(|| LinearAttentionState {
        kv: Tensor::from_dispatch(s),
        z: Tensor::from_dispatch(z),
    });
    Ok((Tensor::from_dispatch(out), state))
}

/// The backward step of one linear-attention call.
#[derive(Debug)]
struct LinearBackwardStep;

/// What the backward needs: Q, K, V, the starting state, O, the divisor and the call.
type SavedState<E> = (
    [FloatTensor<E>; 3],
    [FloatTensor<E>; 2],
    FloatTensor<E>,
    FloatTensor<E>,
    LinearCall,
);

impl<E: LinearAttentionBackend> Backward<E, 3> for LinearBackwardStep {
    type State = SavedState<E>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let d_out = grads.consume::<E>(&ops.node);
        let ([q, k, v], [s0, z0], out, den, call) = ops.state;
        let (dq, dk, dv) =
            E::linear_attention_kernel_backward(q, k, v, s0, z0, out, den, d_out, call);
        for (node, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<E>(node.id, grad);
            }
        }
    }
}

impl<E: LinearAttentionBackend, C: CheckpointStrategy> LinearAttentionBackend for Autodiff<E, C> {
    fn linear_attention_kernel(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        call: LinearCall,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let (s0, z0) = (s0.into_primitive(), z0.into_primitive());
        let inputs = [q, k, v];
        let [q, k, v] = inputs.clone();
        let (out, den, s, z) =
            E::linear_attention_kernel(q, k, v, s0.clone(), z0.clone(), call.clone());
        let tracked = LinearBackwardStep
            .prepare::<C>([q_node, k_node, v_node])
            .compute_bound()
            .stateful();
        let out = match tracked {
            OpsKind::Tracked(prep) => {
                prep.finish((inputs, [s0, z0], out.clone(), den.clone(), call), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (
            out,
            FloatTensor::<Self>::new(den),
            FloatTensor::<Self>::new(s),
            FloatTensor::<Self>::new(z),
        )
    }

    fn linear_attention_kernel_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        out: FloatTensor<Self>,
        den: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        call: LinearCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = E::linear_attention_kernel_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            s0.into_primitive(),
            z0.into_primitive(),
            out.into_primitive(),
            den.into_primitive(),
            d_out.into_primitive(),
            call,
        );
        (
            FloatTensor::<Self>::new(dq),
            FloatTensor::<Self>::new(dk),
            FloatTensor::<Self>::new(dv),
        )
    }
}
