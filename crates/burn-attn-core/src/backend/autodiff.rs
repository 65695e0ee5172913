//! [`AttentionBackend`] for `Autodiff<B>`: the forward is the inner backend's op (its
//! kernel where it has one); the backward is the inner backend's
//! [`AttentionBackend::banded_attention_backward`] (the backward kernels on `CubeBackend`,
//! [`tiled_band_backward`](crate::tiled_band_backward) elsewhere), which
//! recomputes the probabilities tile by tile from the saved O and log-sum-exp. The
//! probabilities are never saved, so training memory stays O(seq) per head instead of
//! O(seq^2).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{backend::Backend, ops::FloatTensor, Tensor, TensorPrimitive};

use super::AttentionBackend;
use crate::options::AttentionOptions;

/// The backward step of one banded attention call.
#[derive(Debug)]
struct BandedAttentionBackward;

/// What the backward needs: Q, K, V, O, the lse and the options.
type SavedState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    AttentionOptions,
);

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

impl<B: AttentionBackend> Backward<B, 3> for BandedAttentionBackward {
    type State = SavedState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let (q, k, v, out, lse, options) = ops.state;
        let (dq, dk, dv) = B::banded_attention_backward(
            float::<B, 4>(q),
            float::<B, 4>(k),
            float::<B, 4>(v),
            float::<B, 4>(out),
            float::<B, 3>(lse),
            float::<B, 4>(d_out),
            &options,
        );
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn banded_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        let q = q.into_primitive().tensor();
        let k = k.into_primitive().tensor();
        let v = v.into_primitive().tensor();
        let (out, lse) = B::banded_attention(
            float(q.primitive.clone()),
            float(k.primitive.clone()),
            float(v.primitive.clone()),
            options,
        );
        let out = out.into_primitive().tensor();
        let lse_inner = lse.clone();
        let lse = lse.into_primitive().tensor();
        let tracked = BandedAttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful();
        let out = match tracked {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    q.primitive,
                    k.primitive,
                    v.primitive,
                    out.clone(),
                    lse.clone(),
                    options.clone(),
                ),
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        // The lse is an output for callers (and the backward), not a differentiable one.
        (
            Tensor::from_primitive(TensorPrimitive::Float(out)),
            Tensor::from_inner(lse_inner),
        )
    }
}
