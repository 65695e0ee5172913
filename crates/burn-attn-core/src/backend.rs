//! The attention op as a Burn backend extension: the one place that decides which
//! implementation runs. Backends with kernels override [`AttentionBackend::banded_attention`]
//! and [`AttentionBackend::banded_attention_backward`]; every other backend gets the tiled
//! tensor-op implementations.

use burn::tensor::{backend::Backend, Bool, Tensor};

use crate::backward::tiled_band_backward;
use crate::dispatch::{serve_tiled, Decline, Implementation, Pass};
use crate::options::AttentionOptions;
use crate::pattern::KeyPattern;
use crate::shape::AttentionShape;
use crate::tiled::{tiled_attention, TiledSpec, DEFAULT_TILE};

/// A backend that can run exact attention over a band (full, causal or windowed).
///
/// Implemented for `NdArray`, `Autodiff<B>`, and (with the `wgpu`/`cuda` features) for
/// `CubeBackend` and `Fusion<CubeBackend>`. The default methods are the tiled tensor-op
/// paths.
pub trait AttentionBackend: Backend {
    /// Exact attention of `q: [batch, heads, seq_q, head_dim]` over
    /// `k: [batch, kv_heads, seq_k, head_dim]`, `v: [batch, kv_heads, seq_k, value_dim]`.
    ///
    /// Returns the output `[batch, heads, seq_q, value_dim]` and the row log-sum-exp
    /// `[batch, heads, seq_q]` (in f32 precision; `-inf` for rows that see no key, whose
    /// output is 0). Inputs are already checked by [`attention`].
    fn banded_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        serve_tiled(Pass::Forward, options, Vec::new(), || {
            tiled_band(q, k, v, options)
        })
    }

    /// Gradients `(dq, dk, dv)` of [`AttentionBackend::banded_attention`] for the output
    /// gradient `d_out`, from the forward's inputs, output `out` and row log-sum-exp `lse`
    /// (the probabilities are recomputed, never saved). Shapes and dtypes are those of the
    /// forward; with GQA/MQA, `dk` and `dv` sum over the query heads sharing a kv head.
    ///
    /// The default is [`tiled_band_backward`]; `Autodiff<B>` calls this in its backward.
    #[allow(clippy::too_many_arguments)]
    fn banded_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        out: Tensor<Self, 4>,
        lse: Tensor<Self, 3>,
        d_out: Tensor<Self, 4>,
        options: &AttentionOptions,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        serve_tiled(Pass::Backward, options, Vec::new(), || {
            tiled_band_backward(q, k, v, out, lse, d_out, options)
        })
    }
}

/// The tiled tensor-op path for a band: the default of
/// [`AttentionBackend::banded_attention`] and the fallback of the kernels.
pub(crate) fn tiled_band<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: &AttentionOptions,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let pattern = KeyPattern::band(options.window, options.causal);
    let scale = options.scale_for(q.dims()[3]);
    let spec = TiledSpec::new(&pattern, scale).with_tile(options.tile.unwrap_or(DEFAULT_TILE));
    tiled_attention(q, k, v, &spec)
}

/// q, k and v must share one dtype (a mix would silently promote or fail deep inside).
fn same_dtype<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
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
pub fn attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: &AttentionOptions,
) -> Tensor<B, 4> {
    attention_with_lse(q, k, v, options).0
}

/// [`attention`], also returning the row log-sum-exp `[batch, heads, seq_q]`.
///
/// # Panics
/// As [`attention`] ([`try_attention_with_lse`] returns the error instead).
pub fn attention_with_lse<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: &AttentionOptions,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    try_attention_with_lse(q, k, v, options).unwrap_or_else(|err| panic!("burn-attn: {err}"))
}

/// [`attention`] for callers that must not panic on bad input (a server answering a
/// request): the same checks, returned as an [`AttentionError`] naming the values. A call
/// that passes them runs as [`attention`] does (with [`KernelPolicy::Require`], a kernel
/// that declines still panics: that is a configuration of the caller's, not input).
///
/// [`KernelPolicy::Require`]: crate::KernelPolicy::Require
pub fn try_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: &AttentionOptions,
) -> Result<Tensor<B, 4>, crate::AttentionError> {
    try_attention_with_lse(q, k, v, options).map(|(out, _)| out)
}

/// [`try_attention`], also returning the row log-sum-exp `[batch, heads, seq_q]`.
pub fn try_attention_with_lse<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: &AttentionOptions,
) -> Result<(Tensor<B, 4>, Tensor<B, 3>), crate::AttentionError> {
    AttentionShape::of(&q, &k, &v)?;
    same_dtype(&q, &k, &v)?;
    options.validate()?;
    Ok(B::banded_attention(q, k, v, options))
}

/// Exact attention over any [`KeyPattern`], with optional key padding and dropout: the
/// kernel of [`AttentionBackend::banded_attention`] when the call is a plain band, the
/// tiled tensor-op path otherwise (strided columns, block layouts, padding, dropout in
/// training).
///
/// `key_padding` is `[batch, seq_k]`, `true` where the key is padding. `dropout` applies
/// to the attention probabilities only while the backend tracks gradients.
///
/// # Panics
/// With a message naming the values when shapes do not match or options are invalid
/// ([`try_pattern_attention`] returns the error instead).
pub fn pattern_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    key_padding: Option<Tensor<B, 2, Bool>>,
    dropout: f64,
) -> Tensor<B, 4> {
    try_pattern_attention(q, k, v, pattern, options, key_padding, dropout)
        .unwrap_or_else(|err| panic!("burn-attn: {err}"))
}

/// [`pattern_attention`] returning bad input as an [`AttentionError`] instead of
/// panicking (see [`try_attention`]).
pub fn try_pattern_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    key_padding: Option<Tensor<B, 2, Bool>>,
    dropout: f64,
) -> Result<Tensor<B, 4>, crate::AttentionError> {
    let shape = AttentionShape::of(&q, &k, &v)?;
    same_dtype(&q, &k, &v)?;
    options.validate()?;
    pattern.validate(shape.seq_q, shape.seq_k)?;
    if !(0.0..1.0).contains(&dropout) {
        return Err(crate::AttentionError::Invalid(format!(
            "dropout {dropout} (takes 0 <= dropout < 1)"
        )));
    }
    if let Some(pad) = &key_padding {
        let dims = pad.dims();
        if dims != [shape.batch, shape.seq_k] {
            return Err(crate::AttentionError::Shape {
                what: "key padding mask",
                expected: format!("[{}, {}] (batch, seq_k)", shape.batch, shape.seq_k),
                got: dims.to_vec(),
            });
        }
    }
    let dropout_active = dropout > 0.0 && B::ad_enabled(&q.device());
    let plain_band = pattern.stride.is_none() && pattern.blocks.is_none();
    if plain_band && key_padding.is_none() && !dropout_active {
        let options = AttentionOptions {
            causal: pattern.causal || options.causal,
            window: pattern.window.intersect(options.window),
            ..options.clone()
        };
        return Ok(B::banded_attention(q, k, v, &options).0);
    }
    let mut pattern = pattern.clone();
    pattern.causal |= options.causal;
    pattern.window = pattern.window.intersect(options.window);
    let mut spec = TiledSpec::new(&pattern, options.scale_for(shape.head_dim))
        .with_tile(options.tile.unwrap_or(DEFAULT_TILE));
    let why = if pattern.stride.is_some() {
        "strided columns"
    } else if pattern.blocks.is_some() {
        "block layouts"
    } else if key_padding.is_some() {
        "key padding"
    } else {
        "dropout"
    };
    spec.key_padding = key_padding;
    spec.dropout = dropout;
    let declined = [Implementation::FlashMma, Implementation::FlashUnit]
        .map(|imp| (imp, Decline::Mask(why)))
        .to_vec();
    Ok(serve_tiled(Pass::Forward, options, declined, || {
        tiled_attention(q, k, v, &spec).0
    }))
}

#[cfg(feature = "ndarray")]
mod ndarray_impl {
    use super::AttentionBackend;
    use burn::backend::NdArray;

    impl AttentionBackend for NdArray<f32, i64, i8> {}
    impl AttentionBackend for NdArray<f64, i64, i8> {}
    impl AttentionBackend for NdArray<f32, i32, i8> {}
    impl AttentionBackend for NdArray<f64, i32, i8> {}
}

#[path = "backend/autodiff.rs"]
mod autodiff_impl;

#[cfg(feature = "cube")]
#[path = "backend/cube.rs"]
mod cube_impl;
