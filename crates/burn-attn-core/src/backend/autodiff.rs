//! [`AttentionBackend`] for `Autodiff<E>`: the forward is the inner backend's op (its
//! kernel where it has one); the backward is the inner backend's
//! [`AttentionBackend::banded_attention_backward`] (the backward kernels on `Cube`,
//! [`tiled_band_backward`](crate::tiled_band_backward) elsewhere), which recomputes the
//! probabilities tile by tile from the saved O and log-sum-exp. The probabilities are never
//! saved, so training memory stays O(seq) per head instead of O(seq^2).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::backend::tensor::FloatTensor;

use super::AttentionBackend;
use crate::options::AttentionOptions;

/// The backward step of one banded attention call.
#[derive(Debug)]
struct BandedAttentionBackward;

/// What the backward needs: Q, K, V, O, the lse and the options.
type SavedState<E> = (
    FloatTensor<E>,
    FloatTensor<E>,
    FloatTensor<E>,
    FloatTensor<E>,
    FloatTensor<E>,
    AttentionOptions,
);

impl<E: AttentionBackend> Backward<E, 3> for BandedAttentionBackward {
    type State = SavedState<E>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = grads.consume::<E>(&ops.node);
        let (q, k, v, out, lse, options) = ops.state;
        let (dq, dk, dv) = E::banded_attention_backward(q, k, v, out, lse, d_out, options);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<E>(node.id, grad);
            }
        }
    }
}

impl<E: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<E, C> {
    fn banded_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let (out, lse) = E::banded_attention(q.clone(), k.clone(), v.clone(), options.clone());
        let tracked = BandedAttentionBackward
            .prepare::<C>([q_node, k_node, v_node])
            .compute_bound()
            .stateful();
        let out = match tracked {
            OpsKind::Tracked(prep) => {
                prep.finish((q, k, v, out.clone(), lse.clone(), options), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        // The lse is an output for callers (and the backward), not a differentiable one.
        (out, FloatTensor::<Self>::new(lse))
    }

    /// The inner backend's backward, as constants (a backward of the backward is not
    /// recorded).
    fn banded_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = E::banded_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            d_out.into_primitive(),
            options,
        );
        (
            FloatTensor::<Self>::new(dq),
            FloatTensor::<Self>::new(dk),
            FloatTensor::<Self>::new(dv),
        )
    }
}
