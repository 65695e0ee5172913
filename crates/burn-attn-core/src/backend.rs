//! The attention op as a Burn backend extension: the one place that decides which
//! implementation runs. The CubeCL backend (`Cube`: CUDA, WGPU) plans its kernels and falls
//! back to the tiled tensor ops; the CPU backends run the tiled tensor ops; `Autodiff`
//! runs the inner backend's forward and, in its backward, the inner backend's
//! [`AttentionBackend::banded_attention_backward`]. Other backends Burn dispatches to take
//! the tiled tensor ops through the high-level tensor API.

use burn::backend::{
    backend_extension, tensor::FloatTensor, Backend, DispatchKindConversion, DispatchTensor,
    DispatchTensorKind,
};
use burn::tensor::{Bool, Tensor};

use crate::backward::tiled_band_backward;
use crate::dispatch::{serve_tiled, Declines, Pass};
use crate::error::OrPanic;
use crate::grouped_rows;
use crate::options::AttentionOptions;
use crate::pattern::KeyPattern;
use crate::shape::AttentionShape;
use crate::tiled::{tiled_attention, TiledSpec, DEFAULT_TILE};

/// A backend that runs exact attention over a band (full, causal or windowed): Burn 0.22's
/// backend extension of this crate, on tensor primitives.
///
/// Implemented for the CPU backends `NdArray` and `Flex` (with the `ndarray` and `flex`
/// features), the CubeCL backend `Cube` (with `wgpu`/`cuda`) and `Autodiff`; calls through [`attention`] and the other functions of
/// this crate reach it by Burn's dispatch. Inputs are already checked by then.
#[backend_extension(
    Cube: cfg(feature = "cube"),
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait AttentionBackend: Backend {
    /// Exact attention of `q: [batch, heads, seq_q, head_dim]` over
    /// `k: [batch, kv_heads, seq_k, head_dim]`, `v: [batch, kv_heads, seq_k, value_dim]`.
    ///
    /// Returns the output `[batch, heads, seq_q, value_dim]` and the row log-sum-exp
    /// `[batch, heads, seq_q]` (f32 for f16/bf16 inputs, the inputs' dtype otherwise; `-inf`
    /// for rows that see no key, whose output is 0).
    fn banded_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients `(dq, dk, dv)` of [`AttentionBackend::banded_attention`] for the output
    /// gradient `d_out`, from the forward's inputs, output `out` and row log-sum-exp `lse`
    /// (the probabilities are recomputed, never saved). Shapes and dtypes are those of the
    /// forward; with GQA/MQA, `dk` and `dv` sum over the query heads sharing a kv head.
    #[allow(clippy::too_many_arguments)]
    fn banded_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        options: AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The gradient tap of one key block of a merged attention row (the ring form of
    /// context-parallel attention): returns `carried` unchanged. Under autodiff its backward
    /// passes the output gradient on to `carried` and adds the block's share of the
    /// gradients: [`AttentionBackend::banded_attention_backward`] of `q` (rows
    /// `rows_start..rows_start + q's rows` of `carried`) against this block's `k` and `v`
    /// (on their owner's device; copied to `q`'s for the backward, and their gradients
    /// copied back), with the merged rows' `out` and `lse`. Probabilities recomputed with
    /// the merged lse are this block's part of the whole row's, so the shares of every
    /// block sum to the gradients of one call over all of them.
    #[allow(clippy::too_many_arguments)]
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
        let _ = (q, k, v, out, lse, rows_start, options);
        carried
    }
}

/// The tiled tensor-op path for a band (the lse in f32 for f16/bf16 inputs): the implementation
/// of backends without kernels and the fallback of the kernels.
pub(crate) fn tiled_band(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &AttentionOptions,
) -> (Tensor<4>, Tensor<3>) {
    let pattern = KeyPattern::band(options.window, options.causal);
    let scale = options.scale_for(q.dims()[3]);
    let spec = TiledSpec::new(&pattern, scale).with_tile(options.tile.unwrap_or(DEFAULT_TILE));
    tiled_attention(q, k, v, &spec)
}

/// A backend primitive as a high-level tensor (on that backend, without autodiff), so the
/// tiled tensor ops serve it.
pub(crate) fn lift<E: Backend, const D: usize>(t: FloatTensor<E>) -> Tensor<D>
where
    DispatchTensor: DispatchKindConversion<E>,
{
    Tensor::from_primitive::<E>(t)
}

/// The primitive of a tensor [`lift`]ed from backend `E`.
pub(crate) fn lower<E: Backend, const D: usize>(t: Tensor<D>) -> FloatTensor<E>
where
    DispatchTensor: DispatchKindConversion<E>,
{
    t.try_into_primitive::<E>()
        .unwrap_or_else(|e| panic!("burn-attn: a tiled result left its backend: {e:?}"))
}

/// The tiled forward on backend `E`'s primitives (its whole implementation where it has no
/// kernels), recorded as served by the tiled path.
pub(crate) fn tiled_forward_on<E: Backend>(
    q: FloatTensor<E>,
    k: FloatTensor<E>,
    v: FloatTensor<E>,
    options: &AttentionOptions,
    declined: Declines,
) -> (FloatTensor<E>, FloatTensor<E>)
where
    DispatchTensor: DispatchKindConversion<E>,
{
    serve_tiled(Pass::Forward, options, declined, || {
        let (out, lse) = tiled_band(lift::<E, 4>(q), lift::<E, 4>(k), lift::<E, 4>(v), options);
        (lower::<E, 4>(out), lower::<E, 3>(lse))
    })
}

/// The tiled backward on backend `E`'s primitives, recorded as served by the tiled path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_backward_on<E: Backend>(
    q: FloatTensor<E>,
    k: FloatTensor<E>,
    v: FloatTensor<E>,
    out: FloatTensor<E>,
    lse: FloatTensor<E>,
    d_out: FloatTensor<E>,
    options: &AttentionOptions,
    declined: Declines,
) -> (FloatTensor<E>, FloatTensor<E>, FloatTensor<E>)
where
    DispatchTensor: DispatchKindConversion<E>,
{
    serve_tiled(Pass::Backward, options, declined, || {
        let four = lift::<E, 4>;
        let (dq, dk, dv) = tiled_band_backward(
            four(q),
            four(k),
            four(v),
            four(out),
            lift::<E, 3>(lse),
            four(d_out),
            options,
        );
        (lower::<E, 4>(dq), lower::<E, 4>(dk), lower::<E, 4>(dv))
    })
}

/// Whether this crate's backend extension serves a tensor of this kind (every other
/// backend takes the tiled tensor ops through the high-level API).
fn extension_serves(kind: &DispatchTensorKind) -> bool {
    #[allow(unreachable_patterns)]
    match kind {
        #[cfg(feature = "cube")]
        DispatchTensorKind::Cube(_) => true,
        #[cfg(feature = "ndarray")]
        DispatchTensorKind::NdArray(_) => true,
        #[cfg(feature = "flex")]
        DispatchTensorKind::Flex(_) => true,
        DispatchTensorKind::Autodiff(inner) => extension_serves(inner),
        _ => false,
    }
}

/// Whether this crate's backend extension serves `t`'s backend.
pub(crate) fn extension_serves_tensor(t: &Tensor<4>) -> bool {
    extension_serves(&t.clone().into_dispatch().kind)
}

/// [`AttentionBackend::banded_attention_block_tap`] through Burn's dispatch (backends the
/// extension serves; see [`extension_serves_tensor`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_tap(
    carried: Tensor<4>,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    out: Tensor<4>,
    lse: Tensor<3>,
    rows_start: usize,
    options: AttentionOptions,
) -> Tensor<4> {
    Tensor::from_dispatch(
        <burn::backend::Dispatch as AttentionBackend>::banded_attention_block_tap(
            carried.into_dispatch(),
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            out.into_dispatch(),
            lse.into_dispatch(),
            rows_start,
            options,
        ),
    )
}

/// The banded op through Burn's dispatch (the extension where it serves the backend, the
/// tiled tensor ops otherwise, differentiated by Burn's autodiff there). Grouped-query calls
/// whose every query sees every key run with each group's query heads as rows of one head
/// (`grouped_rows`). `shape` is the call's, as the callers checked it.
pub(crate) fn banded(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    shape: &AttentionShape,
    options: &AttentionOptions,
) -> (Tensor<4>, Tensor<3>) {
    if grouped_rows::packs(shape, options) {
        return grouped_rows::packed(q, k, v, shape, options, banded_heads);
    }
    banded_heads(q, k, v, options)
}

/// [`banded`] with the call's heads as they are.
pub(crate) fn banded_heads(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &AttentionOptions,
) -> (Tensor<4>, Tensor<3>) {
    let q = q.into_dispatch();
    if !extension_serves(&q.kind) {
        let q = Tensor::from_dispatch(q);
        return serve_tiled(Pass::Forward, options, Vec::new(), || {
            tiled_band(q, k, v, options)
        });
    }
    let (out, lse) = <burn::backend::Dispatch as AttentionBackend>::banded_attention(
        q,
        k.into_dispatch(),
        v.into_dispatch(),
        options.clone(),
    );
    (Tensor::from_dispatch(out), Tensor::from_dispatch(lse))
}

/// q, k and v must share one dtype (a mix would silently promote or fail deep inside).
pub(crate) fn same_dtype(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
) -> Result<(), crate::AttentionError> {
    let (dq, dk, dv) = (q.dtype(), k.dtype(), v.dtype());
    if dq == dk && dq == dv {
        Ok(())
    } else {
        Err(crate::AttentionError::Invalid(format!(
            "q, k and v must share one dtype: q {dq:?}, k {dk:?}, v {dv:?}"
        )))
    }
}

/// Exact attention with the options' scale, causal rule and window; see
/// [`AttentionBackend::banded_attention`] for the layouts.
///
/// # Panics
/// With a message naming the values when shapes do not match, heads do not divide, or the
/// options are invalid ([`try_attention`] returns the error instead).
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &AttentionOptions,
) -> Tensor<4> {
    attention_with_lse(q, k, v, options).0
}

/// [`attention`], also returning the row log-sum-exp `[batch, heads, seq_q]` (`-inf` for
/// rows that see no key): f32 for f16/bf16 inputs, the inputs' dtype otherwise. It
/// is a value: on the backends the extension serves, no gradient flows through it (build a
/// loss on it from a detached copy, or recompute it).
///
/// # Panics
/// As [`attention`] ([`try_attention_with_lse`] returns the error instead).
pub fn attention_with_lse(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &AttentionOptions,
) -> (Tensor<4>, Tensor<3>) {
    try_attention_with_lse(q, k, v, options).or_panic()
}

/// [`attention`] for callers that must not panic on bad input (a server answering a
/// request): the same checks, returned as an [`AttentionError`](crate::AttentionError) naming the values. A call
/// that passes them runs as [`attention`] does (with [`KernelPolicy::Require`], a kernel
/// that declines still panics: that is a configuration of the caller's, not input).
///
/// [`KernelPolicy::Require`]: crate::KernelPolicy::Require
pub fn try_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &AttentionOptions,
) -> Result<Tensor<4>, crate::AttentionError> {
    try_attention_with_lse(q, k, v, options).map(|(out, _)| out)
}

/// [`try_attention`], also returning the row log-sum-exp `[batch, heads, seq_q]`.
pub fn try_attention_with_lse(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    options: &AttentionOptions,
) -> Result<(Tensor<4>, Tensor<3>), crate::AttentionError> {
    let shape = AttentionShape::of(&q, &k, &v)?;
    same_dtype(&q, &k, &v)?;
    options.validate()?;
    Ok(banded(q, k, v, &shape, options))
}

/// Exact attention over any [`KeyPattern`], with optional key padding and dropout:
/// [`masked_attention`](crate::masked_attention) with these masks (see there for which
/// implementation runs).
///
/// `key_padding` is `[batch, seq_k]`, `true` where the key is padding. `dropout` applies
/// to the attention probabilities only while the backend tracks gradients.
///
/// # Panics
/// With a message naming the values when shapes do not match or options are invalid
/// ([`try_pattern_attention`] returns the error instead).
pub fn pattern_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    key_padding: Option<Tensor<2, Bool>>,
    dropout: f64,
) -> Tensor<4> {
    try_pattern_attention(q, k, v, pattern, options, key_padding, dropout).or_panic()
}

/// [`pattern_attention`] returning bad input as an [`AttentionError`](crate::AttentionError) instead of
/// panicking (see [`try_attention`]).
pub fn try_pattern_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    key_padding: Option<Tensor<2, Bool>>,
    dropout: f64,
) -> Result<Tensor<4>, crate::AttentionError> {
    let masks = crate::AttentionMasks {
        key_padding,
        dropout,
        ..crate::AttentionMasks::default()
    };
    crate::try_masked_attention(q, k, v, pattern, options, &masks)
}

/// The CPU backends: the tiled tensor ops, forward and backward.
macro_rules! tiled_backend {
    ($backend:ty) => {
        impl AttentionBackend for $backend {
            fn banded_attention(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                options: AttentionOptions,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                tiled_forward_on::<Self>(q, k, v, &options, Vec::new())
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
                tiled_backward_on::<Self>(q, k, v, out, lse, d_out, &options, Vec::new())
            }
        }
    };
}

// Burn 0.22 deprecates burn-ndarray (for Flex); it stays this crate's default CPU backend.
#[cfg(feature = "ndarray")]
tiled_backend!(burn::backend::NdArray);
#[cfg(feature = "flex")]
tiled_backend!(burn::backend::Flex);

#[path = "backend/autodiff.rs"]
mod autodiff_impl;

#[cfg(feature = "cube")]
#[path = "backend/cube.rs"]
mod cube_impl;

#[cfg(feature = "cube")]
#[path = "backend/sparse.rs"]
pub(crate) mod sparse;

#[cfg(feature = "cube")]
#[path = "backend/sparse_cube.rs"]
mod sparse_cube;

#[cfg(feature = "cube")]
#[path = "backend/linear_kernel.rs"]
pub(crate) mod linear_kernel;

#[cfg(feature = "cube")]
#[path = "backend/linear_cube.rs"]
mod linear_cube;

#[cfg(feature = "cube")]
#[path = "backend/linear_passes.rs"]
mod linear_passes;
