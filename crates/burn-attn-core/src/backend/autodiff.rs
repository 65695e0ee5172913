//! [`AttentionBackend`] for `Autodiff<E>`: the forward is the inner backend's op (its
//! kernel where it has one); the backward is the inner backend's
//! [`AttentionBackend::banded_attention_backward`] (the backward kernels on `Cube`,
//! [`tiled_band_backward`](crate::tiled_band_backward) elsewhere), which recomputes the
//! probabilities tile by tile from the saved O and log-sum-exp. The probabilities are never
//! saved, so training memory stays O(seq) per head instead of O(seq^2). The block tap of
//! context parallelism's ring form is an op of its own: an identity forward whose backward
//! adds one key block's share of the gradients.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::tensor::Slice;

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

/// The backward step of one key block's tap (the ring form of context parallelism).
#[derive(Debug)]
struct BlockTapBackward;

/// What the tap's backward needs: Q (the block's query rows), the block's K and V (on their
/// owner's device), the merged rows' O and lse, where Q's rows start in the carried output,
/// and the options of the block's call.
type TapState<E> = (
    FloatTensor<E>,
    FloatTensor<E>,
    FloatTensor<E>,
    FloatTensor<E>,
    FloatTensor<E>,
    usize,
    AttentionOptions,
);

impl<E: AttentionBackend> Backward<E, 4> for BlockTapBackward {
    type State = TapState<E>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_carried, node_q, node_k, node_v] = ops.parents;
        let d_carried = grads.consume::<E>(&ops.node);
        let (q, k, v, out, lse, rows_start, options) = ops.state;
        let rows = q.shape()[2];
        let d_out = if rows == d_carried.shape()[2] {
            d_carried.clone()
        } else {
            let all = Slice::from(..);
            let own = Slice::new(rows_start as isize, Some((rows_start + rows) as isize), 1);
            E::float_slice(d_carried.clone(), &[all, all, own, all])
        };
        // The block visits the queries' device for its share, which returns to its owner.
        let (here, owner) = (q.device(), k.device());
        let move_to = |t: FloatTensor<E>, device| {
            if owner == here {
                t
            } else {
                E::float_to_device(t, device)
            }
        };
        let (k, v) = (move_to(k, &here), move_to(v, &here));
        let (dq, dk, dv) = E::banded_attention_backward(q, k, v, out, lse, d_out, options);
        let home = |t| move_to(t, &owner);
        if let Some(node) = node_carried {
            grads.register::<E>(node.id, d_carried);
        }
        for (node, grad) in [(node_q, dq), (node_k, home(dk)), (node_v, home(dv))] {
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

    fn banded_attention_block_tap(
        carried: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        rows_start: usize,
        options: AttentionOptions,
    ) -> FloatTensor<Self> {
        let (carried, carried_node) = carried.into_parts();
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let tracked = BlockTapBackward
            .prepare::<C>([carried_node, q_node, k_node, v_node])
            .compute_bound()
            .stateful();
        match tracked {
            OpsKind::Tracked(prep) => {
                let state = (
                    q,
                    k,
                    v,
                    out.into_primitive(),
                    lse.into_primitive(),
                    rows_start,
                    options,
                );
                prep.finish(state, carried)
            }
            OpsKind::UnTracked(prep) => prep.finish(carried),
        }
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
