//! Block-sparse attention on the kernels: a backend extension of its own (`Cube` and
//! `Autodiff`), which [`masked_attention`](crate::masked_attention) calls when the
//! block-sparse kernels take a call whose mask the band kernels cannot evaluate (strided
//! columns, block layouts, key padding, document ids, dropout in training).
//!
//! The call's [`BlockMask`] is built here with tensor ops on the device, on the grid of the
//! kernels' plan; its lists and the rule tensors travel as [`SparseMaskTensors`], the rules'
//! values as a [`SparseCall`]. The backward recomputes probabilities from the saved output
//! and log-sum-exp, as the band op's does, so training memory stays O(seq).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::backend::{
    backend_extension,
    tensor::{FloatTensor, IntTensor},
    Backend, DispatchDevice, ExtensionType,
};
use burn::tensor::{Device, Distribution, Int, IntDType, Tensor};
use burn_attn_kernels::launch::device_caps;
use burn_attn_kernels::plan::{
    plan_sparse, BandArgs, DeviceCaps, Problem, SparseBackward, SparseForward, Unsupported,
};

use super::cube_impl::precision_of;
use crate::block_mask::{BlockCover, BlockGrid, BlockMask};
use crate::block_mask_cache::PatternPlan;
use crate::dispatch::{report, Decline, Declines, Dispatch, DispatchLog, Implementation, Pass};
use crate::masked::AttentionMasks;
use crate::options::{AttentionOptions, ForcedPlan};
use crate::pattern::KeyPattern;

/// The block lists of a call and its rule tensors, all i32 (`[1]` placeholders for rules
/// the call does not have): see burn-attn-kernels' `BlockLists` and `SparseRules`.
#[derive(ExtensionType, Debug, Clone)]
#[extension_type(fusion)]
pub(crate) struct SparseMaskTensors<B: Backend> {
    pub partial_count: IntTensor<B>,
    pub partial_index: IntTensor<B>,
    pub full_count: IntTensor<B>,
    pub full_index: IntTensor<B>,
    pub t_partial_count: IntTensor<B>,
    pub t_partial_index: IntTensor<B>,
    pub t_full_count: IntTensor<B>,
    pub t_full_index: IntTensor<B>,
    /// Active flags of the block layout, `[q_blocks * k_blocks]`.
    pub layout: IntTensor<B>,
    /// Key padding, `[batch, seq_k]`, nonzero where hidden.
    pub padding: IntTensor<B>,
    /// Document ids of queries `[batch, seq_q]` and keys `[batch, seq_k]`.
    pub doc_q: IntTensor<B>,
    pub doc_k: IntTensor<B>,
    /// A dense mask `[batch, seq_q, seq_k]`, nonzero where hidden.
    pub dense: IntTensor<B>,
    /// The dropout seed, `[1]`.
    pub seed: IntTensor<B>,
}

/// The values of a block-sparse call: its grid, scale and which rules it has.
#[derive(Debug, Clone)]
pub(crate) struct SparseCall {
    /// Query rows and keys per block of the lists.
    pub block_q: usize,
    pub block_k: usize,
    pub scale: f32,
    /// The pattern (its window, causal rule, stride; block layout sizes where it has one).
    pub left: Option<usize>,
    pub right: Option<usize>,
    pub causal: bool,
    pub stride: Option<usize>,
    pub layout: Option<(usize, usize)>,
    /// Whether the call has key padding, and document ids.
    pub padding: bool,
    pub documents: bool,
    /// Whether the call has a dense attention mask.
    pub dense: bool,
    /// Whether the call has a per-key score bias, and a soft edge (its ramp width).
    pub key_bias: bool,
    pub soft_edge: Option<f32>,
    /// ALiBi slopes, one per query head.
    pub alibi: Option<Vec<f32>>,
    /// A tanh softcap of the scaled scores.
    pub softcap: Option<f32>,
    /// The probability of dropping an attention probability (training only).
    pub dropout: Option<f64>,
    pub forced: ForcedPlan,
    /// The backward kernels the plan picked, and where the backward's dispatch is
    /// recorded.
    pub backward: Implementation,
    pub log: Option<DispatchLog>,
}

/// Exact attention under a block-sparse mask, forward and backward, on the kernels.
#[backend_extension(Cube: cfg(feature = "cube"), Autodiff)]
pub(crate) trait SparseAttentionBackend: Backend {
    /// Output `[batch, heads, seq_q, value_dim]` and f32 row log-sum-exp `[batch, heads,
    /// seq_q]` (`-inf` where a row sees no key; its output is 0). `key_bias` (`[batch or 1,
    /// heads or 1, seq_k]`) and `reach` (`[batch or 1, heads or 1, seq_q]`) are the score
    /// terms where `call` has them, `[1, 1, 1]` placeholders otherwise.
    fn sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        #[extension_type] mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq, dk, dv, d_key_bias, d_reach)` of [`SparseAttentionBackend::sparse_attention`]
    /// for `d_out` (the score terms' gradients in their tensors' shapes and dtypes).
    // The extension macro takes tuple outputs written out, not through an alias.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn sparse_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        #[extension_type] mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// The gradient tap of a block-sparse call whose rows are merged with other calls'
    /// (by log-sum-exp): returns `carried`. Under autodiff its backward passes the output
    /// gradient on to `carried` and adds the call's share of the gradients,
    /// [`SparseAttentionBackend::sparse_attention_backward`] with the merged rows' `out`
    /// and `lse`, so the shares of every call sum to the gradients of one call over all
    /// their keys.
    #[allow(clippy::too_many_arguments)]
    fn sparse_attention_tap(
        carried: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        #[extension_type] mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> FloatTensor<Self> {
        let _ = (q, k, v, key_bias, reach, out, lse, mask, call);
        carried
    }
}

/// The gradients of a block-sparse call: q, k, v, the key bias, the reach.
pub(crate) type SparseGradients<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

/// The capabilities of a device, where it is a CubeCL device (under autodiff or not).
pub(crate) fn cube_caps(device: &Device) -> Option<DeviceCaps> {
    #[allow(unreachable_patterns)]
    match device.as_dispatch().clone().inner() {
        DispatchDevice::Cube(device) => Some(device_caps(&device.client())),
        _ => None,
    }
}

/// An integer tensor as the kernels read it: i32, through Burn's dispatch.
fn i32_dispatch<const D: usize>(t: Tensor<D, Int>) -> burn::backend::DispatchTensor {
    t.cast(IntDType::I32).into_dispatch()
}

/// Runs a call on the block-sparse kernels, or returns why they decline it. `pattern`
/// carries the options' causal rule and window already; `dropout` (in `(0, 1)`, for
/// training) drops probabilities with a seed drawn from the device's random generator
/// (so `Backend::seed` makes it repeatable), which the backward reuses.
pub(crate) fn sparse_kernel_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &AttentionMasks,
    dropout: Option<f64>,
) -> Result<Tensor<4>, Declines> {
    let call = PreparedSparseCall::new(&q, &k, &v, pattern, options, masks, dropout)?;
    Ok(call.forward(q, k, v).0)
}

/// A call planned for the block-sparse kernels, its mask built: run by
/// [`PreparedSparseCall::forward`], and differentiated either by its forward (a call of
/// its own) or by [`PreparedSparseCall::tap`] (a part of merged rows).
pub(crate) struct PreparedSparseCall {
    tensors: SparseMaskTensors<burn::backend::Dispatch>,
    key_bias: burn::backend::DispatchTensor,
    reach: burn::backend::DispatchTensor,
    call: SparseCall,
    served: Implementation,
}

impl PreparedSparseCall {
    /// Plans a call of `q`, `k`, `v` (their shapes and dtypes; see
    /// [`sparse_kernel_attention`]) and builds its mask, or returns why the kernels decline.
    pub(crate) fn new(
        q: &Tensor<4>,
        k: &Tensor<4>,
        v: &Tensor<4>,
        pattern: &KeyPattern,
        options: &AttentionOptions,
        masks: &AttentionMasks,
        dropout: Option<f64>,
    ) -> Result<Self, Declines> {
        let decline = |why: Decline| {
            [
                Implementation::FlashMmaSparse,
                Implementation::FlashUnitSparse,
            ]
            .map(|imp| (imp, why.clone()))
            .to_vec()
        };
        let Some(caps) = cube_caps(&q.device()) else {
            return Err(Vec::new());
        };
        if options.kernel == crate::KernelPolicy::Tiled {
            return Err(decline(Decline::TiledRequested));
        }
        let (q_dims, k_dims, v_dims) = (q.dims(), k.dims(), v.dims());
        let scale = options.scale_for(q_dims[3]) as f32;
        let band = BandArgs {
            scale,
            left: None,
            right: None,
        };
        let forced = options.forced_plan.unwrap_or_default();
        let plan = precision_of(q.dtype(), k.dtype(), v.dtype())
            .and_then(|precision| Problem::contiguous(q_dims, k_dims, v_dims, precision, band))
            .and_then(|problem| plan_sparse(&problem, &caps, &forced))
            .map_err(|why| decline(Decline::Kernel(why)))?;
        let device = q.device();
        let (seq_q, seq_k) = (q_dims[2], k_dims[2]);
        // An empty call has no blocks to list (the tiled ops give its empty or zero rows), and
        // the lists index positions with 32-bit integers.
        let grid = BlockGrid::new(plan.block_q, plan.block_k, seq_q, seq_k)
            .map_err(|why| decline(Decline::Kernel(Unsupported::Shapes(why.to_string()))))?;
        // The call's masks' covers besides its pattern and document ids: keys whose bias is
        // -inf are hidden too, so their blocks are skipped.
        let covers: Vec<BlockCover> = [
            masks.key_bias.as_ref().map(|bias| {
                let hidden = bias.clone().equal_elem(f32::NEG_INFINITY);
                BlockCover::of_hidden_keys(hidden, grid).expect("checked shape")
            }),
            masks
                .key_padding
                .as_ref()
                .map(|pad| BlockCover::of_key_padding(pad.clone(), grid).expect("checked shape")),
            masks.attention_mask.as_ref().map(|dense| {
                BlockCover::of_attention_mask(dense.clone(), grid).expect("checked shape")
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        // Without them, the call takes its pattern's lists, or with document ids the lists
        // the ids hold for the pattern.
        let alone = covers.is_empty();
        // The pattern's plan, kept across calls where the options hold a cache.
        let lists = alone && masks.documents.is_none();
        let pattern_plan = match &options.block_masks {
            Some(cache) => cache.plan(pattern, grid, &device, lists),
            None => PatternPlan::build(pattern, grid, &device, lists),
        }
        .expect("the pattern was validated");
        let intersect = |covers: Vec<BlockCover>| {
            let cover = covers
                .into_iter()
                .fold(pattern_plan.cover.clone(), |cover, other| {
                    cover.intersect(other).expect("one grid")
                });
            BlockMask::new(cover)
        };
        let (documents, mask) = match &masks.documents {
            Some(docs) => {
                let build = |ids: BlockCover| intersect(vec![ids]);
                let held = alone.then_some((pattern, &build as &dyn Fn(BlockCover) -> BlockMask));
                let (cover, ids, lists) = docs.plan(grid, &device, held);
                let mask =
                    lists.unwrap_or_else(|| intersect([cover].into_iter().chain(covers).collect()));
                (Some(ids), mask)
            }
            None if alone => (
                None,
                pattern_plan
                    .mask
                    .expect("a call with no other mask has lists"),
            ),
            None => (None, intersect(covers)),
        };
        // One 1-element tensor stands in for every absent rule (the kernels never read it).
        let absent = i32_dispatch(Tensor::<1, Int>::zeros([1], &device));
        let placeholder = || absent.clone();
        let layout = pattern_plan.layout.map_or_else(placeholder, i32_dispatch);
        let padding = masks
            .key_padding
            .as_ref()
            .map_or_else(placeholder, |pad| i32_dispatch(pad.clone().int()));
        let (doc_q, doc_k) = match documents {
            Some([queries, keys]) => (i32_dispatch(queries), i32_dispatch(keys)),
            None => (placeholder(), placeholder()),
        };
        let dense = masks
            .attention_mask
            .as_ref()
            .map_or_else(placeholder, |m| i32_dispatch(m.clone().int()));
        let seed = match dropout {
            Some(_) => i32_dispatch(Tensor::<1, Int>::random(
                [1],
                Distribution::Uniform(0.0, i32::MAX as f64),
                &device,
            )),
            None => placeholder(),
        };
        let tensors = SparseMaskTensors {
            partial_count: i32_dispatch(mask.partial_count),
            partial_index: i32_dispatch(mask.partial_index),
            full_count: i32_dispatch(mask.full_count),
            full_index: i32_dispatch(mask.full_index),
            t_partial_count: i32_dispatch(mask.t_partial_count),
            t_partial_index: i32_dispatch(mask.t_partial_index),
            t_full_count: i32_dispatch(mask.t_full_count),
            t_full_index: i32_dispatch(mask.t_full_index),
            layout,
            padding,
            doc_q,
            doc_k,
            dense,
            seed,
        };
        // The score terms (placeholders where absent) keep their dtype: the kernels' launch
        // reads them as f32 and returns gradients in it.
        let absent_term = Tensor::<3>::zeros([1, 1, 1], &device);
        let term_placeholder = || absent_term.clone().into_dispatch();
        let key_bias = masks
            .key_bias
            .clone()
            .map_or_else(term_placeholder, Tensor::into_dispatch);
        let reach = masks
            .soft_edge
            .as_ref()
            .map_or_else(term_placeholder, |e| e.reach.clone().into_dispatch());
        let call = SparseCall {
            block_q: plan.block_q,
            block_k: plan.block_k,
            scale,
            left: pattern.window.left,
            right: pattern.window.right,
            causal: pattern.causal,
            stride: pattern.stride,
            layout: pattern.blocks.as_ref().map(|l| (l.block_q, l.block_k)),
            padding: masks.key_padding.is_some(),
            documents: masks.documents.is_some(),
            dense: masks.attention_mask.is_some(),
            key_bias: masks.key_bias.is_some(),
            soft_edge: masks.soft_edge.as_ref().map(|e| e.ramp as f32),
            alibi: masks.alibi.clone(),
            softcap: masks.softcap.map(|cap| cap as f32),
            dropout,
            forced,
            backward: match plan.backward {
                SparseBackward::Mma(_) => Implementation::FlashMmaSparseBackward,
                SparseBackward::Unit(_) => Implementation::FlashUnitSparseBackward,
            },
            log: options.log.clone(),
        };
        let served = match plan.forward {
            SparseForward::Mma(_) => Implementation::FlashMmaSparse,
            SparseForward::Unit(_) => Implementation::FlashUnitSparse,
        };
        Ok(Self {
            tensors,
            key_bias,
            reach,
            call,
            served,
        })
    }

    /// The call's output and f32 row log-sum-exp (`-inf` where a row sees no key), the
    /// output differentiable where the inputs are tracked.
    pub(crate) fn forward(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<3>) {
        report(
            self.call.log.as_ref(),
            Dispatch {
                pass: Pass::Forward,
                served: self.served,
                declined: Vec::new(),
            },
        );
        let (out, lse) = <burn::backend::Dispatch as SparseAttentionBackend>::sparse_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            self.key_bias.clone(),
            self.reach.clone(),
            self.tensors.clone(),
            self.call.clone(),
        );
        (Tensor::from_dispatch(out), Tensor::from_dispatch(lse))
    }

    /// The gradient tap of this call as a part of merged rows: returns `carried`, and under
    /// autodiff its backward passes the output gradient on and adds this call's share of
    /// `q`'s, `k`'s and `v`'s gradients, the backward recomputing the probabilities with the
    /// merged rows' `out` and `lse` (the same mask, dropout seed included, as the forward).
    pub(crate) fn tap(
        &self,
        carried: Tensor<4>,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        out: Tensor<4>,
        lse: Tensor<3>,
    ) -> Tensor<4> {
        Tensor::from_dispatch(
            <burn::backend::Dispatch as SparseAttentionBackend>::sparse_attention_tap(
                carried.into_dispatch(),
                q.into_dispatch(),
                k.into_dispatch(),
                v.into_dispatch(),
                self.key_bias.clone(),
                self.reach.clone(),
                out.into_dispatch(),
                lse.into_dispatch(),
                self.tensors.clone(),
                self.call.clone(),
            ),
        )
    }
}

/// The backward step of one block-sparse call.
#[derive(Debug)]
struct SparseAttentionBackwardStep;

/// What the backward needs: Q, K, V, the key bias and reach, O, the lse, the mask and the
/// call.
type SavedState<E> = (
    [FloatTensor<E>; 5],
    FloatTensor<E>,
    FloatTensor<E>,
    SparseMaskTensors<E>,
    SparseCall,
);

impl<E: SparseAttentionBackend> Backward<E, 5> for SparseAttentionBackwardStep {
    type State = SavedState<E>;

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let d_out = grads.consume::<E>(&ops.node);
        for (node, grad) in ops.parents.into_iter().zip(gradients(ops.state, d_out)) {
            if let Some(node) = node {
                grads.register::<E>(node.id, grad);
            }
        }
    }
}

/// The gradients of a call for `d_out` from its saved state: q, k, v, the key bias, the
/// reach.
fn gradients<E: SparseAttentionBackend>(
    state: SavedState<E>,
    d_out: FloatTensor<E>,
) -> [FloatTensor<E>; 5] {
    let ([q, k, v, key_bias, reach], out, lse, mask, call) = state;
    let (dq, dk, dv, d_key_bias, d_reach) =
        E::sparse_attention_backward(q, k, v, key_bias, reach, out, lse, d_out, mask, call);
    [dq, dk, dv, d_key_bias, d_reach]
}

/// The backward step of a block-sparse call's tap: the output gradient passes on to the
/// carried rows, and the call's share goes to its inputs.
#[derive(Debug)]
struct SparseAttentionTapStep;

impl<E: SparseAttentionBackend> Backward<E, 6> for SparseAttentionTapStep {
    type State = SavedState<E>;

    fn backward(
        self,
        ops: Ops<Self::State, 6>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let d_out = grads.consume::<E>(&ops.node);
        let [carried, parents @ ..] = ops.parents;
        let shares = gradients(ops.state, d_out.clone());
        if let Some(node) = carried {
            grads.register::<E>(node.id, d_out);
        }
        for (node, grad) in parents.into_iter().zip(shares) {
            if let Some(node) = node {
                grads.register::<E>(node.id, grad);
            }
        }
    }
}

/// The mask of an autodiff call on its inner backend (integer tensors are not tracked).
fn inner_mask<E: Backend, C: CheckpointStrategy>(
    m: SparseMaskTensors<Autodiff<E, C>>,
) -> SparseMaskTensors<E> {
    SparseMaskTensors {
        partial_count: m.partial_count,
        partial_index: m.partial_index,
        full_count: m.full_count,
        full_index: m.full_index,
        t_partial_count: m.t_partial_count,
        t_partial_index: m.t_partial_index,
        t_full_count: m.t_full_count,
        t_full_index: m.t_full_index,
        layout: m.layout,
        padding: m.padding,
        doc_q: m.doc_q,
        doc_k: m.doc_k,
        dense: m.dense,
        seed: m.seed,
    }
}

impl<E: SparseAttentionBackend, C: CheckpointStrategy> SparseAttentionBackend for Autodiff<E, C> {
    fn sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let mask = inner_mask(mask);
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let (key_bias, bias_node) = key_bias.into_parts();
        let (reach, reach_node) = reach.into_parts();
        let inputs = [q, k, v, key_bias, reach];
        let [q, k, v, key_bias, reach] = inputs.clone();
        let (out, lse) = E::sparse_attention(q, k, v, key_bias, reach, mask.clone(), call.clone());
        let tracked = SparseAttentionBackwardStep
            .prepare::<C>([q_node, k_node, v_node, bias_node, reach_node])
            .compute_bound()
            .stateful();
        let out = match tracked {
            OpsKind::Tracked(prep) => {
                prep.finish((inputs, out.clone(), lse.clone(), mask, call), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, FloatTensor::<Self>::new(lse))
    }

    fn sparse_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> SparseGradients<Self> {
        let (dq, dk, dv, d_key_bias, d_reach) = E::sparse_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            key_bias.into_primitive(),
            reach.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            d_out.into_primitive(),
            inner_mask(mask),
            call,
        );
        (
            FloatTensor::<Self>::new(dq),
            FloatTensor::<Self>::new(dk),
            FloatTensor::<Self>::new(dv),
            FloatTensor::<Self>::new(d_key_bias),
            FloatTensor::<Self>::new(d_reach),
        )
    }

    fn sparse_attention_tap(
        carried: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> FloatTensor<Self> {
        let (carried, carried_node) = carried.into_parts();
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let (key_bias, bias_node) = key_bias.into_parts();
        let (reach, reach_node) = reach.into_parts();
        let tracked = SparseAttentionTapStep
            .prepare::<C>([carried_node, q_node, k_node, v_node, bias_node, reach_node])
            .compute_bound()
            .stateful();
        match tracked {
            OpsKind::Tracked(prep) => {
                let state = (
                    [q, k, v, key_bias, reach],
                    out.into_primitive(),
                    lse.into_primitive(),
                    inner_mask(mask),
                    call,
                );
                prep.finish(state, carried)
            }
            OpsKind::UnTracked(prep) => prep.finish(carried),
        }
    }
}
