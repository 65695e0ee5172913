//! [`SparseAttentionBackend`] for the CubeCL backend `Cube`: the block-sparse portable
//! kernels, recorded in the fusion stream as a [`SparseKernelLaunch`] that launches them
//! when the stream executes. The caller planned the call before building its mask
//! (`sparse_kernel_attention`), so a launch that declines is a bug, not a fallback.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Cube, TensorMetadata};
use burn::tensor::DType;
use burn_attn_kernels::launch::{
    flash_backward_sparse, flash_forward_sparse, BackwardInputs, BlockLists, SparseRules,
};
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeBackend};

use super::cube_impl::f32_lse;
use super::sparse::{
    SparseAttentionBackend, SparseCall, SparseGradients, SparseMaskTensors,
    SparseMaskTensorsMetadata,
};
use crate::dispatch::{report, Dispatch, Pass};

/// A tensor in `dtype` (cast where it is another).
fn in_dtype(t: FloatTensor<Cube>, dtype: DType) -> FloatTensor<Cube> {
    if t.dtype() == dtype {
        t
    } else {
        Cube::float_cast(t, dtype.into())
    }
}

/// A score term's gradient (f32, per batch and query head) in the term's own shape
/// (summed over the dimensions it broadcasts) and dtype.
fn term_gradient(grad: FloatTensor<Cube>, term: &FloatTensor<Cube>) -> FloatTensor<Cube> {
    let (want, have) = (term.shape(), grad.shape());
    let mut grad = grad;
    for dim in 0..2 {
        if want[dim] == 1 && have[dim] != 1 {
            grad = Cube::float_sum_dim(grad, dim);
        }
    }
    in_dtype(grad, term.dtype())
}

impl SparseAttentionBackend for Cube {
    fn sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let key_bias = in_dtype(key_bias, DType::F32);
        let reach = in_dtype(reach, DType::F32);
        <Self as SparseKernelLaunch>::sparse_forward(q, k, v, key_bias, reach, mask, call)
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
        report(
            call.log.as_ref(),
            Dispatch {
                pass: Pass::Backward,
                served: call.backward,
                declined: Vec::new(),
            },
        );
        // The kernels take the lse and score terms in f32 and out, d_out in the inputs'
        // dtype.
        let lse = f32_lse(lse);
        let d_out = in_dtype(d_out, q.dtype());
        let terms = (
            in_dtype(key_bias.clone(), DType::F32),
            in_dtype(reach.clone(), DType::F32),
        );
        let (dq, dk, dv, d_key_bias, d_reach) = <Self as SparseKernelLaunch>::sparse_backward(
            q, k, v, terms.0, terms.1, out, lse, d_out, mask, call,
        );
        (
            dq,
            dk,
            dv,
            term_gradient(d_key_bias, &key_bias),
            term_gradient(d_reach, &reach),
        )
    }
}

/// The forward's outputs: rows like q with v's width, in q's dtype; the lse in f32.
fn forward_outputs(
    q: &TensorSpec,
    _k: &TensorSpec,
    v: &TensorSpec,
    _key_bias: &TensorSpec,
    _reach: &TensorSpec,
    _mask: &SparseMaskTensorsMetadata,
    _call: &SparseCall,
) -> (TensorSpec, TensorSpec) {
    let (b, h, n) = (q.shape[0], q.shape[1], q.shape[2]);
    (
        TensorSpec::new([b, h, n, v.shape[3]].into(), q.dtype),
        TensorSpec::new([b, h, n].into(), DType::F32),
    )
}

/// The backward's outputs: gradients like q, k and v; the score terms' per batch and
/// query head in f32 (`[1, 1, 1]` where the call has none).
#[allow(clippy::too_many_arguments)]
fn backward_outputs(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _key_bias: &TensorSpec,
    _reach: &TensorSpec,
    _out: &TensorSpec,
    _lse: &TensorSpec,
    _d_out: &TensorSpec,
    _mask: &SparseMaskTensorsMetadata,
    call: &SparseCall,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    let term = |present: bool, positions: usize| {
        let shape = if present {
            [q.shape[0], q.shape[1], positions]
        } else {
            [1, 1, 1]
        };
        TensorSpec::new(shape.into(), DType::F32)
    };
    (
        q.clone(),
        k.clone(),
        v.clone(),
        term(call.key_bias, k.shape[2]),
        term(call.soft_edge.is_some(), q.shape[2]),
    )
}

/// The block-sparse kernel launches, recorded in the fused backend's stream.
#[backend_extension(Cube, Fusion)]
pub(crate) trait SparseKernelLaunch: Backend {
    /// Launches the block-sparse forward: output and row log-sum-exp.
    #[fusion(meta = forward_outputs)]
    fn sparse_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        reach: FloatTensor<Self>,
        #[extension_type] mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Launches the block-sparse backward: `(dq, dk, dv)` and the score terms' gradients
    /// (see [`backward_outputs`]).
    // The extension macro takes tuple outputs written out, not through an alias.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[fusion(meta = backward_outputs)]
    fn sparse_backward(
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
}

/// The kernels' lists and rules of a call's mask tensors and f32 score terms.
fn lists_and_rules(
    mask: SparseMaskTensors<CubeBackend>,
    terms: (CubeTensor, CubeTensor),
    call: &SparseCall,
) -> (BlockLists, SparseRules) {
    let c = into_contiguous;
    let lists = BlockLists {
        block_q: call.block_q,
        block_k: call.block_k,
        partial_count: c(mask.partial_count),
        partial_index: c(mask.partial_index),
        full_count: c(mask.full_count),
        full_index: c(mask.full_index),
        t_partial_count: c(mask.t_partial_count),
        t_partial_index: c(mask.t_partial_index),
        t_full_count: c(mask.t_full_count),
        t_full_index: c(mask.t_full_index),
    };
    let rules = SparseRules {
        left: call.left,
        right: call.right,
        causal: call.causal,
        stride: call.stride,
        layout: call.layout.map(|(rows, cols)| (c(mask.layout), rows, cols)),
        padding: call.padding.then(|| c(mask.padding)),
        documents: call.documents.then(|| (c(mask.doc_q), c(mask.doc_k))),
        dropout: call.dropout.map(|p| (p, c(mask.seed))),
        dense: call.dense.then(|| c(mask.dense)),
        key_bias: call.key_bias.then(|| c(terms.0)),
        soft_edge: call.soft_edge.map(|ramp| (c(terms.1), ramp)),
        alibi: call.alibi.clone(),
        softcap: call.softcap,
    };
    (lists, rules)
}

/// A launch the caller's plan took but the launcher declined: a bug of the plans.
fn declined(pass: &str, why: impl core::fmt::Display) -> ! {
    panic!("burn-attn: the block-sparse {pass} was planned for this call but declined it: {why}")
}

impl SparseKernelLaunch for CubeBackend {
    fn sparse_forward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        key_bias: CubeTensor,
        reach: CubeTensor,
        mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> (CubeTensor, CubeTensor) {
        let (lists, rules) = lists_and_rules(mask, (key_bias, reach), &call);
        flash_forward_sparse(
            into_contiguous(q),
            into_contiguous(k),
            into_contiguous(v),
            call.scale,
            &lists,
            &rules,
            &call.forced,
        )
        .unwrap_or_else(|why| declined("forward", why))
    }

    fn sparse_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        key_bias: CubeTensor,
        reach: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        d_out: CubeTensor,
        mask: SparseMaskTensors<Self>,
        call: SparseCall,
    ) -> SparseGradients<Self> {
        let (lists, rules) = lists_and_rules(mask, (key_bias, reach), &call);
        let inputs = BackwardInputs {
            q: into_contiguous(q),
            k: into_contiguous(k),
            v: into_contiguous(v),
            out: into_contiguous(out),
            lse: into_contiguous(lse),
            d_out: into_contiguous(d_out),
        };
        let grads = flash_backward_sparse(inputs, call.scale, &lists, &rules, &call.forced)
            .unwrap_or_else(|why| declined("backward", why));
        let (dq, dk, dv) = grads.qkv;
        // Where the call has no such term, its placeholder gradient (never read).
        let placeholder = || {
            zeros_client(
                dq.client.clone(),
                dq.device.clone(),
                [1, 1, 1].into(),
                DType::F32,
            )
        };
        let d_key_bias = grads.key_bias.unwrap_or_else(placeholder);
        let d_reach = grads.reach.unwrap_or_else(placeholder);
        (dq, dk, dv, d_key_bias, d_reach)
    }
}
