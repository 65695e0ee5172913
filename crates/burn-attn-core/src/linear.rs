//! Linear attention cores: `phi(Q) (phi(K)^T V)`, normalised or not, non-causal and causal.
//!
//! They take feature-mapped queries and keys, so any feature map plugs in, or raw ones
//! with a [`FeatureMap`] in the options. On CubeCL devices the chunked kernel serves them
//! (`backend::linear_kernel`); the tensor ops here are the CPU's implementation and the
//! fallback. Their causal form is chunk-parallel: inside a chunk a masked quadratic
//! product, across chunks an exclusive prefix sum of per-chunk `phi(K)^T V` states. No host
//! loop over time steps; the same code with a chunk of one token is the recurrent step.

use burn::tensor::{Bool, DType, Tensor, TensorCreationOptions};

use crate::dispatch::{serve_tiled_with, DispatchLog, KernelPolicy, Pass};
use crate::error::OrPanic;
use crate::error::{ensure, AttentionError};
use crate::feature_map::FeatureMap;
use crate::shape::{repeat_kv, AttentionShape};
use crate::untracked::untracked;

/// Options of a linear-attention call: normalisation, the chunk of the tensor-op path, and
/// which implementation may serve it.
///
/// On WGPU and CUDA the chunked kernel serves the call where it takes it (see
/// [`Implementation::LinearChunk`](crate::Implementation::LinearChunk)); on CUDA its
/// matrix-unit form serves bf16 calls at head dims 64 and 128 (value dims a multiple of 64;
/// [`Implementation::LinearChunkMma`](crate::Implementation::LinearChunkMma)); elsewhere,
/// and where they decline, the tensor ops do.
#[derive(Debug, Clone)]
pub struct LinearOptions {
    /// The feature map to apply to the queries and keys the call takes (fused into the
    /// kernel's loads where the kernel serves it), or `None` (the default): they are
    /// feature-mapped already.
    pub feature_map: Option<FeatureMap>,
    /// `phi(q) S / (phi(q) . z + eps)` (the default), or the unnormalised `phi(q) S`.
    pub normalise: bool,
    /// The normaliser's `eps`: finite and positive. Default `1e-6`.
    pub eps: f64,
    /// Rows per chunk of the causal form on the tensor-op path (the in-chunk products are
    /// `chunk x chunk`). Default 64.
    pub chunk: usize,
    /// Rows per chunk of the kernel (16, 32 or 64), for tests and tuning; `None` (the
    /// default) lets its plan choose from the device.
    pub kernel_chunk: Option<usize>,
    /// Kernel or tensor ops ([`KernelPolicy::Auto`] by default).
    pub kernel: KernelPolicy,
    /// Where the implementation that served each pass is recorded.
    pub log: Option<DispatchLog>,
}

impl Default for LinearOptions {
    fn default() -> Self {
        Self {
            feature_map: None,
            normalise: true,
            eps: 1e-6,
            chunk: 64,
            kernel_chunk: None,
            kernel: KernelPolicy::Auto,
            log: None,
        }
    }
}

impl LinearOptions {
    /// The defaults: normalised, `eps = 1e-6`, chunks of 64, a kernel where one serves.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queries and keys are raw: the call applies `map` to them.
    pub fn with_feature_map(mut self, map: FeatureMap) -> Self {
        self.feature_map = Some(map);
        self
    }

    /// Normalised or not.
    pub fn with_normalise(mut self, normalise: bool) -> Self {
        self.normalise = normalise;
        self
    }

    /// The normaliser's `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// The tensor-op path's chunk.
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk;
        self
    }

    /// The kernel's chunk (16, 32 or 64).
    pub fn with_kernel_chunk(mut self, chunk: usize) -> Self {
        self.kernel_chunk = Some(chunk);
        self
    }

    /// The kernel policy.
    pub fn with_kernel(mut self, kernel: KernelPolicy) -> Self {
        self.kernel = kernel;
        self
    }

    /// A log of the implementations that served each pass.
    pub fn with_log(mut self, log: DispatchLog) -> Self {
        self.log = Some(log);
        self
    }

    /// Checks `eps` (where the call normalises) and the chunk.
    pub fn validate(&self) -> Result<(), AttentionError> {
        if self.normalise {
            check_linear_eps(self.eps)?;
        }
        if self.chunk == 0 {
            return Err(AttentionError::ZeroSize { what: "chunk size" });
        }
        if let Some(chunk) = self.kernel_chunk {
            if ![16, 32, 64].contains(&chunk) {
                return Err(AttentionError::Invalid(format!(
                    "kernel_chunk must be 16, 32 or 64, got {chunk}"
                )));
            }
        }
        Ok(())
    }
}

/// The running state of causal linear attention: everything the past contributes.
#[derive(Debug, Clone)]
pub struct LinearAttentionState {
    /// `sum_j phi(k_j)^T v_j`, `[batch, heads, head_dim, value_dim]`.
    pub kv: Tensor<4>,
    /// `sum_j phi(k_j)`, `[batch, heads, head_dim]`.
    pub z: Tensor<3>,
}

impl LinearAttentionState {
    /// The state before any token, on a device (`&device`: the device's default float
    /// dtype) or with a dtype (`(&device, dtype)`).
    pub fn zeros(
        batch: usize,
        heads: usize,
        head_dim: usize,
        value_dim: usize,
        options: impl Into<TensorCreationOptions>,
    ) -> Self {
        let options = options.into();
        Self {
            kv: Tensor::zeros([batch, heads, head_dim, value_dim], options.clone()),
            z: Tensor::zeros([batch, heads, head_dim], options),
        }
    }
}

fn checked_shape(phi_q: &Tensor<4>, phi_k: &Tensor<4>, v: &Tensor<4>) -> AttentionShape {
    AttentionShape::of(phi_q, phi_k, v).or_panic()
}

/// Checks the normaliser's `eps`: finite and positive in f32, where the normaliser is
/// computed, since with 0 a row whose features are all 0 (ReLU, or every key padded)
/// divides 0 by 0.
pub fn check_linear_eps(eps: f64) -> Result<(), AttentionError> {
    let in_f32 = eps as f32;
    if in_f32.is_finite() && in_f32 > 0.0 {
        Ok(())
    } else {
        Err(AttentionError::Invalid(format!(
            "eps must be finite and positive in f32 (the normaliser divides by phi(q) . z + \
             eps), got {eps}"
        )))
    }
}

/// Non-causal linear attention of feature-mapped `phi_q: [batch, heads, seq_q, d]` over
/// `phi_k: [batch, kv_heads, seq_k, d]`, `v: [batch, kv_heads, seq_k, dv]`:
/// `out_i = phi(q_i) S / (phi(q_i) . z + eps)` with `S = sum_j phi(k_j)^T v_j`,
/// `z = sum_j phi(k_j)`. `key_padding` (`[batch, seq_k]`, `true` = padding) removes keys.
/// O(n d dv) time, O(d dv) extra memory per head. [`linear_attention_with`] with the
/// default options and this `eps`.
pub fn linear_attention(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    eps: f64,
    key_padding: Option<Tensor<2, Bool>>,
) -> Tensor<4> {
    linear_attention_with(
        phi_q,
        phi_k,
        v,
        key_padding,
        &LinearOptions::new().with_eps(eps),
    )
}

/// [`linear_attention`] with options: a feature map applied to raw `q` and `k` in place of
/// feature-mapped ones (fused into the kernel's loads), unnormalised (`phi(q) S`), the
/// kernel policy, a dispatch log. Panics with the reason on invalid input.
pub fn linear_attention_with(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    key_padding: Option<Tensor<2, Bool>>,
    options: &LinearOptions,
) -> Tensor<4> {
    let shape = checked_shape(&phi_q, &phi_k, &v);
    ensure(options.validate());
    let (mut phi_q, mut phi_k) = (phi_q, phi_k);
    let mut options = options.clone();
    if let Some(pad) = key_padding {
        if pad.dims() != [shape.batch, shape.seq_k] {
            ensure(Err(AttentionError::Shape {
                what: "key padding mask",
                expected: format!("[{}, {}] (batch, seq_k)", shape.batch, shape.seq_k),
                got: pad.dims().to_vec(),
            }));
        }
        // Padded keys are zero after the map (which maps 0 to 1 for elu + 1), so the map
        // is applied here.
        if let Some(map) = options.feature_map.take() {
            phi_q = map.apply(phi_q);
            phi_k = map.apply(phi_k);
        }
        let keep =
            pad.bool_not()
                .float()
                .cast(phi_k.dtype())
                .reshape([shape.batch, 1, shape.seq_k, 1]);
        phi_k = phi_k * keep;
    }
    let declined = match kernel_attention(
        phi_q.clone(),
        phi_k.clone(),
        v.clone(),
        None,
        &shape,
        false,
        &options,
    ) {
        Ok((out, _)) => return out,
        Err(declined) => declined,
    };
    serve_tiled_with(
        Pass::Forward,
        options.kernel,
        options.log.as_ref(),
        declined,
        || {
            let dtype = phi_q.dtype();
            let (phi_q, phi_k) = mapped(options.feature_map, phi_q, phi_k);
            // The sums over every key and the normalisation in f32, as in the kernel (with
            // elu+1, f16's z passes 65504 past as many keys).
            let f32_of = |t: Tensor<4>| t.cast(DType::F32);
            let phi_q = f32_of(phi_q);
            let phi_k = f32_of(repeat_kv(phi_k, shape.heads));
            let v = f32_of(repeat_kv(v, shape.heads));
            let kv = phi_k.clone().swap_dims(2, 3).matmul(v); // [b, h, d, dv]
            let num = phi_q.clone().matmul(kv);
            if !options.normalise {
                return num.cast(dtype);
            }
            let z = phi_k.sum_dim(2); // [b, h, 1, d]
            let den = phi_q.matmul(z.swap_dims(2, 3)); // [b, h, n, 1]
            (num / (den + options.eps)).cast(dtype)
        },
    )
}

/// The chunked kernel where the device has it (see `backend::linear_kernel`); the reasons
/// it declines otherwise (none where the device has no kernels).
#[cfg(feature = "cube")]
fn kernel_attention(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    state: Option<LinearAttentionState>,
    shape: &AttentionShape,
    causal: bool,
    options: &LinearOptions,
) -> Result<(Tensor<4>, Option<LinearAttentionState>), crate::dispatch::Declines> {
    crate::backend::linear_kernel::linear_kernel_attention(
        phi_q, phi_k, v, state, shape, causal, options,
    )
}

#[cfg(not(feature = "cube"))]
fn kernel_attention(
    _phi_q: Tensor<4>,
    _phi_k: Tensor<4>,
    _v: Tensor<4>,
    _state: Option<LinearAttentionState>,
    _shape: &AttentionShape,
    _causal: bool,
    _options: &LinearOptions,
) -> Result<(Tensor<4>, Option<LinearAttentionState>), crate::dispatch::Declines> {
    Err(Vec::new())
}

/// Causal linear attention, chunk-parallel: token `i` sees keys `0..=i` of this call plus
/// everything folded into `state`. Returns the output `[batch, heads, seq, dv]` and the
/// state after the last token, so a stream can be processed call by call (a call with
/// one token is the recurrent step). Keys and queries have the same length.
/// [`causal_linear_attention_with`] with the default options and this chunk and `eps`.
///
/// Cost: O(n * chunk * d) for the in-chunk products plus O(n / chunk * d * dv) for the
/// chunk states; memory O(n / chunk * d * dv + n * chunk) on the tensor-op path, O(d * dv)
/// per head on the kernel.
pub fn causal_linear_attention(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    chunk: usize,
    eps: f64,
    state: Option<LinearAttentionState>,
) -> (Tensor<4>, LinearAttentionState) {
    let options = LinearOptions::new().with_chunk(chunk).with_eps(eps);
    causal_linear_attention_with(phi_q, phi_k, v, state, &options)
}

/// [`causal_linear_attention`] with options: a feature map applied to raw `q` and `k` in
/// place of feature-mapped ones (fused into the kernel's loads), unnormalised (`phi(q_i)
/// S_i`), the kernel policy, a dispatch log. The state comes back in f32 (the kernel and
/// the tensor ops keep it so: prefix sums over long streams overflow f16 and stall in
/// bf16); gradients flow into `phi_q`, `phi_k` and `v`, not into a given state (it is taken
/// as a constant, as truncated backpropagation through time does). Panics with the reason
/// on invalid input.
pub fn causal_linear_attention_with(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    state: Option<LinearAttentionState>,
    options: &LinearOptions,
) -> (Tensor<4>, LinearAttentionState) {
    let shape = checked_shape(&phi_q, &phi_k, &v);
    ensure(options.validate());
    if shape.seq_q != shape.seq_k {
        ensure(Err(AttentionError::Invalid(format!(
            "causal linear attention needs as many queries as keys, got {} and {}",
            shape.seq_q, shape.seq_k
        ))));
    }
    let AttentionShape {
        batch,
        heads,
        head_dim: d,
        value_dim: dv,
        ..
    } = shape;
    if let Some(state) = &state {
        let (kv, z) = (state.kv.dims(), state.z.dims());
        if kv != [batch, heads, d, dv] || z != [batch, heads, d] {
            ensure(Err(AttentionError::Invalid(format!(
                "the linear attention state has kv {kv:?} and z {z:?}, expected kv [{batch}, \
                 {heads}, {d}, {dv}] and z [{batch}, {heads}, {d}] (batch, heads, head_dim, \
                 value_dim)"
            ))));
        }
    }
    let declined = match kernel_attention(
        phi_q.clone(),
        phi_k.clone(),
        v.clone(),
        state.clone(),
        &shape,
        true,
        options,
    ) {
        Ok((out, Some(state))) => return (out, state),
        Ok((_, None)) => unreachable!("the causal kernel returns its state"),
        Err(declined) => declined,
    };
    serve_tiled_with(
        Pass::Forward,
        options.kernel,
        options.log.as_ref(),
        declined,
        || {
            let (phi_q, phi_k) = mapped(options.feature_map, phi_q, phi_k);
            chunked_tensor_ops(phi_q, phi_k, v, state, &shape, options)
        },
    )
}

/// The causal form in tensor ops (the CPU's implementation and the reference of the
/// kernel).
fn chunked_tensor_ops(
    phi_q: Tensor<4>,
    phi_k: Tensor<4>,
    v: Tensor<4>,
    state: Option<LinearAttentionState>,
    shape: &AttentionShape,
    options: &LinearOptions,
) -> (Tensor<4>, LinearAttentionState) {
    let AttentionShape {
        batch,
        heads,
        seq_q: seq,
        head_dim: d,
        value_dim: dv,
        ..
    } = *shape;
    let chunk = options.chunk;
    let device = phi_q.device();
    // The in-chunk terms follow the inputs' dtype (f16/bf16 inputs on a backend whose
    // default float is f32 must not meet f32 constants); the state, the terms across chunks
    // and the normalisation are f32, as in the kernel. A given state is a constant.
    let dtype = phi_q.dtype();
    let phi_k = repeat_kv(phi_k, heads);
    let v = repeat_kv(v, heads);
    let state = match state {
        Some(state) => LinearAttentionState {
            kv: untracked(state.kv).cast(DType::F32),
            z: untracked(state.z).cast(DType::F32),
        },
        None => LinearAttentionState::zeros(batch, heads, d, dv, (&device, DType::F32)),
    };
    if seq == 0 {
        return (
            Tensor::zeros([batch, heads, 0, dv], (&device, dtype)),
            state,
        );
    }

    let chunk = chunk.min(seq);
    let n_chunks = seq.div_ceil(chunk);
    let padded = n_chunks * chunk;
    // Zero padding after the feature map: padded keys add nothing to any state, and padded
    // queries come after every real token, so no real token sees them.
    let pad = |x: Tensor<4>, width: usize| {
        if padded == seq {
            x
        } else {
            Tensor::cat(
                vec![
                    x,
                    Tensor::zeros([batch, heads, padded - seq, width], (&device, dtype)),
                ],
                2,
            )
        }
    };
    let q = pad(phi_q, d).reshape([batch, heads, n_chunks, chunk, d]);
    let k = pad(phi_k, d).reshape([batch, heads, n_chunks, chunk, d]);
    let v = pad(v, dv).reshape([batch, heads, n_chunks, chunk, dv]);

    // Inside each chunk: causal quadratic form.
    let causal = Tensor::<2>::ones([chunk, chunk], (&device, dtype))
        .tril(0)
        .reshape([1, 1, 1, chunk, chunk]);
    let scores = q.clone().matmul(k.clone().swap_dims(3, 4)) * causal; // [b,h,c,C,C]
    let intra_num = scores.clone().matmul(v.clone()).cast(DType::F32);
    let intra_den = scores.sum_dim(4).cast(DType::F32); // [b,h,c,C,1]

    // Across chunks: exclusive prefix sums of the chunk states, plus the carried state.
    let kv_chunks = k.clone().swap_dims(3, 4).matmul(v).cast(DType::F32); // [b,h,c,d,dv]
    let z_chunks = k.sum_dim(3).cast(DType::F32); // [b,h,c,1,d]
    let kv_prefix = kv_chunks.clone().cumsum(2) - kv_chunks.clone()
        + state.kv.clone().reshape([batch, heads, 1, d, dv]);
    let z_prefix = z_chunks.clone().cumsum(2) - z_chunks.clone()
        + state.z.clone().reshape([batch, heads, 1, 1, d]);
    let q = q.cast(DType::F32);
    let num = intra_num + q.clone().matmul(kv_prefix);
    let out = if options.normalise {
        let den = intra_den + q.matmul(z_prefix.swap_dims(3, 4));
        num / (den + options.eps)
    } else {
        num
    };
    let out = out
        .reshape([batch, heads, padded, dv])
        .slice([0..batch, 0..heads, 0..seq])
        .cast(dtype);

    let next = LinearAttentionState {
        kv: state.kv + kv_chunks.sum_dim(2).reshape([batch, heads, d, dv]),
        z: state.z + z_chunks.sum_dim(2).reshape([batch, heads, d]),
    };
    (out, next)
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn positive(shape: [usize; 4]) -> Tensor<4> {
        Tensor::random(shape, Distribution::Uniform(0.1, 1.0), &Device::ndarray())
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The naive quadratic form: a causal mask on `phi(Q) phi(K)^T`.
    fn quadratic(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, eps: f64) -> Tensor<4> {
        let n = q.dims()[2];
        let mask = Tensor::<2>::ones([n, n], &Device::ndarray())
            .tril(0)
            .reshape([1, 1, n, n]);
        let a = q.matmul(k.swap_dims(2, 3)) * mask;
        let den = a.clone().sum_dim(3);
        a.matmul(v) / (den + eps)
    }

    #[test]
    fn chunked_equals_quadratic_and_recurrent() {
        for (seq, chunk) in [(1, 4), (17, 4), (17, 1), (33, 64), (97, 16)] {
            let q = positive([2, 3, seq, 5]);
            let k = positive([2, 3, seq, 5]);
            let v = positive([2, 3, seq, 7]);
            let (chunked, state) =
                causal_linear_attention(q.clone(), k.clone(), v.clone(), chunk, 1e-6, None);
            let want = quadratic(q.clone(), k.clone(), v.clone(), 1e-6);
            assert!(max_diff(chunked.clone(), want) < 1e-5);

            // Recurrent: one token at a time through the state.
            let mut st = None;
            let mut steps = Vec::new();
            for t in 0..seq {
                let sl = |x: &Tensor<4>| x.clone().slice([0..2, 0..3, t..t + 1]);
                let (o, s) = causal_linear_attention(sl(&q), sl(&k), sl(&v), chunk, 1e-6, st);
                steps.push(o);
                st = Some(s);
            }
            assert!(max_diff(Tensor::cat(steps, 2), chunked) < 1e-5);
            let st = st.unwrap();
            assert!((st.kv - state.kv).abs().max().into_scalar::<f32>() < 1e-4);
        }
    }

    /// A given state is a constant: the second call's gradients reach its own inputs, not
    /// the first call's, and the state comes back in f32.
    #[test]
    fn a_given_state_carries_no_gradient() {
        let device = Device::ndarray().autodiff();
        let leaf = |d| {
            Tensor::<4>::random([1, 2, 9, d], Distribution::Uniform(0.1, 1.0), &device)
                .require_grad()
        };
        let (q1, k1, v1) = (leaf(4), leaf(4), leaf(3));
        let (_, state) = causal_linear_attention(q1.clone(), k1.clone(), v1.clone(), 4, 1e-6, None);
        assert_eq!(
            (state.kv.dtype(), state.z.dtype()),
            (DType::F32, DType::F32)
        );
        let (q2, k2, v2) = (leaf(4), leaf(4), leaf(3));
        let (out, _) = causal_linear_attention(q2.clone(), k2, v2, 4, 1e-6, Some(state));
        let grads = out.sum().backward();
        assert!(q2.grad(&grads).is_some());
        for (name, t) in [("q", &q1), ("k", &k1), ("v", &v1)] {
            assert!(
                t.grad(&grads).is_none(),
                "the first call's {name} got a gradient"
            );
        }
    }

    #[test]
    fn unnormalised_forms_are_the_numerators() {
        let (q, k, v) = (
            positive([1, 2, 21, 4]),
            positive([1, 2, 21, 4]),
            positive([1, 2, 21, 3]),
        );
        let options = LinearOptions::new().with_normalise(false).with_chunk(8);
        let (causal, _) =
            causal_linear_attention_with(q.clone(), k.clone(), v.clone(), None, &options);
        let mask = Tensor::<2>::ones([21, 21], &Device::ndarray())
            .tril(0)
            .reshape([1, 1, 21, 21]);
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
        assert!(max_diff(causal, (scores.clone() * mask).matmul(v.clone())) < 1e-4);
        let full = linear_attention_with(q, k, v.clone(), None, &options);
        assert!(max_diff(full, scores.matmul(v)) < 1e-4);
    }

    #[test]
    fn non_causal_equals_quadratic_without_mask() {
        let q = positive([1, 2, 19, 4]);
        let k = positive([1, 1, 23, 4]);
        let v = positive([1, 1, 23, 6]);
        let got = linear_attention(q.clone(), k.clone(), v.clone(), 1e-6, None);
        let k2 = repeat_kv(k, 2);
        let v2 = repeat_kv(v, 2);
        let a = q.matmul(k2.swap_dims(2, 3));
        let want = a.clone().matmul(v2) / (a.sum_dim(3) + 1e-6);
        assert!(max_diff(got, want) < 1e-5);
    }
}

/// Queries and keys through `map` where one is given (the tensor-op paths' feature map).
fn mapped(map: Option<FeatureMap>, q: Tensor<4>, k: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    match map {
        Some(map) => (map.apply(q), map.apply(k)),
        None => (q, k),
    }
}
