//! Exact attention with the FlashAttention algorithm.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{
    alibi_slopes, ensure, masked_attention, AttentionError, AttentionMasks, AttentionOptions,
    BlockMaskCache, DocumentIds, KeyPattern, Window,
};

use crate::context_parallel::{attend_context_parallel, unsupported_masks};
use crate::dropout::{validate_dropout, AttentionDropout};
use crate::input::AttentionInput;
use crate::kv_cache::{decode, KvCache};
use crate::paged_kv_cache::{decode_paged, PagedKvCache, SequenceId};
use crate::projection::{validate_heads, MultiHeadProjection, MultiHeadProjectionConfig};
use crate::rotary::{rotate_heads, validate_rotary};
use burn_attn_core::OrPanic;

/// Configuration of [`FlashAttention`].
#[derive(Config, Debug)]
pub struct FlashAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads; must divide `d_model`.
    pub n_heads: usize,
    /// Key/value heads (GQA/MQA); must divide `n_heads`. Default: `None` (= `n_heads`).
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Whether the linears have a bias. Default: `true`.
    #[config(default = true)]
    pub bias: bool,
    /// Dropout on the attention probabilities while training. Default: `0.0`.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Hide keys after each query's aligned position. Default: `false`.
    #[config(default = false)]
    pub causal: bool,
    /// Keys visible before each query (`None`: all). Default: `None`.
    #[config(default = "None")]
    pub window_left: Option<usize>,
    /// Keys visible after each query (`None`: all). Default: `None`.
    #[config(default = "None")]
    pub window_right: Option<usize>,
    /// Multiplier of `q . k`. Default: `None` (= `1 / sqrt(head_dim)`).
    #[config(default = "None")]
    pub scale: Option<f64>,
    /// Tile of the tensor-op implementation (backends without a kernel; kernels choose
    /// their own). Default: `64`, the seed's block size.
    #[config(default = 64)]
    pub block_size: usize,
    /// ALiBi position biases (Press et al.'s slopes, [`alibi_slopes`]): `-slope_h * |i -
    /// j|` on each head's scores. Calls then take the block-sparse kernels on GPUs (forward
    /// and backward). Default: `false`.
    #[config(default = false)]
    pub alibi: bool,
    /// A tanh softcap of the scaled scores (Gemma 2's): `softcap * tanh(s / softcap)`;
    /// finite and positive. Calls then take the block-sparse kernels on GPUs. Default:
    /// `None`.
    #[config(default = "None")]
    pub softcap: Option<f64>,
    /// Rotary position embeddings on the projected queries and keys, with this base
    /// (10000.0 in RoFormer and Llama; burn-nn's `RotaryEncoding`), decoding included;
    /// the head dim must be even. Default: `None`.
    #[config(default = "None")]
    pub rotary_theta: Option<f32>,
}

impl FlashAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        validate_rotary(self.rotary_theta, self.d_model / self.n_heads)?;
        if self.block_size == 0 {
            return Err(AttentionError::ZeroSize { what: "block_size" });
        }
        if let Some(cap) = self.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(AttentionError::Invalid(format!(
                    "softcap must be finite and positive, got {cap}"
                )));
            }
        }
        self.options().validate()
    }

    fn options(&self) -> AttentionOptions {
        AttentionOptions {
            scale: self.scale,
            causal: self.causal,
            window: Window::new(self.window_left, self.window_right),
            tile: Some(self.block_size),
            ..AttentionOptions::default()
        }
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> FlashAttention {
        ensure(self.validate());
        FlashAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            scale: self.scale,
            causal: self.causal,
            window_left: self.window_left,
            window_right: self.window_right,
            block_size: self.block_size,
            dropout: AttentionDropout::new(self.dropout),
            alibi: self.alibi,
            softcap: self.softcap,
            rotary_theta: self.rotary_theta,
            block_masks: BlockMaskCache::new(),
        }
    }
}

/// Exact multi-head attention computed tile by tile with an online softmax: O(n) extra
/// memory, the same result as materialised attention. Runs the GPU kernel on backends
/// that have one.
#[derive(Module, Debug)]
pub struct FlashAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// Explicit scale, if any.
    pub scale: Option<f64>,
    /// Causal flag.
    pub causal: bool,
    /// Left side of the window.
    pub window_left: Option<usize>,
    /// Right side of the window.
    pub window_right: Option<usize>,
    /// Tile of the tensor-op path.
    pub block_size: usize,
    /// Dropout on probabilities while training.
    pub dropout: AttentionDropout,
    /// ALiBi position biases.
    pub alibi: bool,
    /// Tanh softcap of the scores.
    pub softcap: Option<f64>,
    /// Base of the rotary position embeddings, if any.
    pub rotary_theta: Option<f32>,
    /// The band's block-sparse plan of the last masked call's lengths (padding, documents,
    /// dropout, score modifiers), reused by the next calls of the same lengths on the GPU
    /// kernels (clones of the module share it).
    #[module(skip)]
    pub block_masks: BlockMaskCache,
}

impl FlashAttention {
    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_cross(x.clone(), x.clone(), x, None)
    }

    /// Attention of `query` (`[batch, seq_q, d_model]`) over `key`/`value`
    /// (`[batch, seq_k, d_model]`) with an optional `[batch, seq_k]` key padding mask
    /// (`true` = padding). Rows that see no key give 0.
    pub fn forward_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let mut input = AttentionInput::new(query, key, value);
        input.mask_pad = key_padding;
        self.forward_input(input)
    }

    /// Attention with burn-nn's masks ([`AttentionInput`], burn-nn's `MhaInput` field for
    /// field): `[batch, seq_q, d_model]` out.
    ///
    /// # Panics
    /// When a mask's shape does not match the call (naming the shapes).
    pub fn forward_input(&self, input: AttentionInput) -> Tensor<3> {
        let masks = self.with_score_modifiers(input.masks(self.dropout.active()));
        let pattern = KeyPattern::default();
        attend(
            &self.projection,
            input,
            &pattern,
            &self.options(),
            &masks,
            self.rotary_theta,
        )
    }

    /// Self-attention over packed sequences: each row of `x` (`[batch, seq, d_model]`)
    /// holds several documents one after another, `documents` (`[batch, seq]`) their ids,
    /// not decreasing along a row. A token attends only within its document (with the
    /// module's causal rule and window), so sequences of different lengths share a batch
    /// without padding: the same result as each document run alone. Ids given as a tensor
    /// are checked by each call (a read back from the device); pass
    /// [`DocumentIds::checked`] ids to check them once for several layers (clones of one
    /// `DocumentIds` also share the block plans the kernels' calls build from them).
    ///
    /// # Panics
    /// When `documents` does not match `x` or its ids decrease (naming the position).
    pub fn forward_packed(&self, x: Tensor<3>, documents: impl Into<DocumentIds>) -> Tensor<3> {
        let masks =
            self.with_score_modifiers(packed_masks(documents.into(), self.dropout.active()));
        let pattern = KeyPattern::default();
        let input = AttentionInput::self_attn(x);
        attend(
            &self.projection,
            input,
            &pattern,
            &self.options(),
            &masks,
            self.rotary_theta,
        )
    }

    /// Decoding: self-attention of the next tokens `x` (`[batch, new, d_model]`) over every
    /// token so far, whose projected keys and values `cache` holds (and then holds `x`'s
    /// too). The result equals the last `new` rows of [`forward`](Self::forward) over the
    /// whole sequence, without projecting the prefix again. A rolling cache
    /// ([`KvCache::rolling`]) keeps only the `window_left` keys the window still shows.
    ///
    /// # Panics
    /// When the module is not causal or `cache` does not fit the call (naming the values;
    /// [`try_forward_cache`](Self::try_forward_cache) returns the error instead).
    pub fn forward_cache(&self, x: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        self.try_forward_cache(x, cache).or_panic()
    }

    /// [`forward_cache`](Self::forward_cache) returning bad input as an error.
    pub fn try_forward_cache(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>, AttentionError> {
        let pattern = KeyPattern::default();
        let masks = self.with_score_modifiers(AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        });
        decode(
            &self.projection,
            x,
            cache,
            &pattern,
            &self.options(),
            &masks,
            self.rotary_theta,
        )
    }

    /// Decodes the new tokens `x` (`[batch, new, d_model]`) of several sequences at once:
    /// row `b` continues sequence `ids[b]` of `cache`, whatever its length. Each row's
    /// queries see their own sequence's keys (causal, and the module's window) and rotary
    /// embeddings continue at its own position. Needs a causal module; panics on bad input
    /// (see [`try_forward_paged`](Self::try_forward_paged)).
    pub fn forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Tensor<3> {
        self.try_forward_paged(x, cache, ids).or_panic()
    }

    /// [`forward_paged`](Self::forward_paged) returning bad input (a non-causal module,
    /// an id the cache does not hold or given twice, a batch that is not one row per id,
    /// too few free pages) as an error; the cache is unchanged then.
    pub fn try_forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Result<Tensor<3>, AttentionError> {
        let masks = self.with_score_modifiers(AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        });
        decode_paged(
            &self.projection,
            x,
            cache,
            ids,
            &KeyPattern::default(),
            &self.options(),
            &masks,
            self.rotary_theta,
        )
    }

    /// Context-parallel self-attention: one sequence split into contiguous slices
    /// (`[batch, rows, d_model]` each, in order, each on its peer's device), every peer
    /// computing its own rows. The projections run on each peer (this module's weights
    /// copied there; under autodiff their gradients return to this module's), rotary
    /// embeddings at the slice's positions, and the core through
    /// [`try_context_parallel_attention`](burn_attn_core::try_context_parallel_attention)
    /// (its ring form: key/value blocks visit the peers one at a time). The outputs,
    /// concatenated, equal [`forward`](Self::forward) over the
    /// whole sequence.
    ///
    /// # Errors
    /// A module with ALiBi, a softcap or dropout (not in the context-parallel core), and
    /// slices the core rejects (naming the values).
    pub fn try_forward_context_parallel(
        &self,
        slices: Vec<Tensor<3>>,
    ) -> Result<Vec<Tensor<3>>, AttentionError> {
        if self.alibi || self.softcap.is_some() || self.dropout.active() > 0.0 {
            return Err(unsupported_masks(format!(
                "alibi {}, softcap {:?}, dropout {}",
                self.alibi,
                self.softcap,
                self.dropout.active()
            )));
        }
        attend_context_parallel(&self.projection, slices, &self.options(), self.rotary_theta)
    }

    /// [`try_forward_context_parallel`](Self::try_forward_context_parallel), panicking on
    /// its error.
    pub fn forward_context_parallel(&self, slices: Vec<Tensor<3>>) -> Vec<Tensor<3>> {
        self.try_forward_context_parallel(slices).or_panic()
    }

    /// `masks` with the module's score modifiers (ALiBi slopes, softcap), where it has them.
    fn with_score_modifiers(&self, mut masks: AttentionMasks) -> AttentionMasks {
        if self.alibi {
            masks.alibi = Some(alibi_slopes(self.projection.n_heads));
        }
        masks.softcap = self.softcap;
        masks
    }

    /// The options of the attention core: scale, causal flag, window, tile and the
    /// module's block-sparse plan cache.
    pub fn options(&self) -> AttentionOptions {
        AttentionOptions {
            scale: self.scale,
            causal: self.causal,
            window: Window::new(self.window_left, self.window_right),
            tile: Some(self.block_size),
            block_masks: Some(self.block_masks.clone()),
            ..AttentionOptions::default()
        }
    }

    /// The shared projections (for exact baselines with the same weights).
    pub fn projection(&self) -> &MultiHeadProjection {
        &self.projection
    }
}

/// The exact modules' one path: projections (with rotary embeddings of base `rotary`),
/// [`masked_attention`] under `pattern`, `options` and `masks`, output projection.
pub(crate) fn attend(
    projection: &MultiHeadProjection,
    input: AttentionInput,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &AttentionMasks,
    rotary: Option<f32>,
) -> Tensor<3> {
    let h = rotate_heads(
        projection.split(input.query, input.key, input.value),
        rotary,
        0,
    );
    projection.merge(masked_attention(h.q, h.k, h.v, pattern, options, masks))
}

/// The masks of packed self-attention: document ids `documents`, with `dropout`.
pub(crate) fn packed_masks(documents: DocumentIds, dropout: f64) -> AttentionMasks {
    AttentionMasks {
        documents: Some(documents),
        dropout,
        ..AttentionMasks::default()
    }
}

/// The projection config shared by every variant's config.
pub(crate) fn projection_config(
    d_model: usize,
    n_heads: usize,
    n_kv_heads: Option<usize>,
    bias: bool,
) -> MultiHeadProjectionConfig {
    MultiHeadProjectionConfig::new(d_model, n_heads)
        .with_n_kv_heads(n_kv_heads)
        .with_bias(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::Int;

    /// Context-parallel slices give the whole forward's rows, and the same gradients of the
    /// input and of the weights (causal with rotary and GQA; a two-sided window); a module
    /// with ALiBi is refused, naming it.
    #[test]
    fn context_parallel_slices_equal_the_whole_forward() {
        let device = cpu_ad();
        for config in [
            FlashAttentionConfig::new(32, 4)
                .with_n_kv_heads(Some(2))
                .with_causal(true)
                .with_rotary_theta(Some(100.0)),
            FlashAttentionConfig::new(32, 4)
                .with_window_left(Some(5))
                .with_window_right(Some(3)),
        ] {
            let module = config.init(&device);
            let x = randn([2, 21, 32], &device).require_grad();
            let w = randn([2, 21, 32], &device);
            let want = module.forward(x.clone());
            let want_grads = (want.clone() * w.clone()).sum().backward();
            let x2 = x.clone().detach().require_grad();
            let slices = [0..6, 6..13, 13..21]
                .map(|rows| x2.clone().slice([0..2, rows, 0..32]))
                .to_vec();
            let got = Tensor::cat(module.forward_context_parallel(slices), 1);
            let grads = (got.clone() * w).sum().backward();
            assert_close(got, want, 1e-5);
            assert_close(x2.grad(&grads).unwrap(), x.grad(&want_grads).unwrap(), 1e-5);
            let weight = module.projection.query.weight.val();
            assert_close(
                weight.grad(&grads).unwrap(),
                weight.grad(&want_grads).unwrap(),
                1e-5,
            );
        }
        let err = FlashAttentionConfig::new(32, 4)
            .with_alibi(true)
            .init(&cpu())
            .try_forward_context_parallel(vec![randn([1, 4, 32], &cpu())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("alibi true"), "{err}");
    }

    /// ALiBi: the module equals the dense reference with `-slope_h * |i - j|` added to
    /// each head's scores (causal, GQA, 6 heads: slopes of 4 and 8 heads interleaved), and
    /// decoding with a cache gives the same rows.
    #[test]
    fn alibi_equals_the_reference_and_decodes() {
        use burn::tensor::TensorData;
        use burn_attn_core::reference_attention;
        let heads = 6;
        let slopes = alibi_slopes(heads);
        assert_eq!(slopes.len(), heads);
        // 4 heads' 1/4 .. 1/256, then every other of 8 heads' slopes: 1/2, 1/8.
        let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        assert!(
            slopes.iter().zip(want).all(|(s, w)| (s - w).abs() < 1e-7),
            "{slopes:?}"
        );
        let module = FlashAttentionConfig::new(48, heads)
            .with_n_kv_heads(Some(2))
            .with_causal(true)
            .with_alibi(true)
            .init(&cpu());
        let (b, n) = (2, 21);
        let x = randn([b, n, 48], &cpu());
        let got = module.forward(x.clone());
        let mut bias = Vec::with_capacity(heads * n * n);
        for slope in &slopes {
            for i in 0..n {
                for j in 0..n {
                    bias.push(-slope * (i as f32 - j as f32).abs());
                }
            }
        }
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [1, heads, n, n]), &cpu())
            .expand([b, heads, n, n]);
        let h = module.projection().split_self(x.clone());
        let scale = 1.0 / (h.q.dims()[3] as f64).sqrt();
        let pattern = KeyPattern::band(Window::FULL, true);
        let (out, _) = reference_attention(h.q, h.k, h.v, &pattern, scale, None, Some(bias));
        assert_close(got.clone(), module.projection().merge(out), 2e-5);

        let mut cache = crate::KvCache::new();
        let steps: Vec<_> = (0..n)
            .map(|t| module.forward_cache(x.clone().slice([0..b, t..t + 1, 0..48]), &mut cache))
            .collect();
        assert_close(Tensor::cat(steps, 1), got, 2e-5);
    }

    /// A softcap: the module equals materialised attention of the capped scores.
    #[test]
    fn softcap_equals_the_capped_reference() {
        let cap = 0.7;
        let module = FlashAttentionConfig::new(32, 4)
            .with_causal(true)
            .with_softcap(Some(cap))
            .init(&cpu());
        let x = randn([2, 13, 32], &cpu());
        let got = module.forward(x.clone());
        let h = module.projection().split_self(x);
        let scale = 1.0 / (h.q.dims()[3] as f64).sqrt();
        let s = h.q.matmul(h.k.swap_dims(2, 3)).mul_scalar(scale);
        let s = s.div_scalar(cap).tanh().mul_scalar(cap);
        let n = 13;
        let keys = Tensor::<1, Int>::arange(0..n as i64, &cpu());
        let future = keys
            .clone()
            .reshape([1, n])
            .expand([n, n])
            .greater(keys.reshape([n, 1]).expand([n, n]))
            .reshape([1, 1, n, n])
            .expand([2, 4, n, n]);
        let p = burn::tensor::activation::softmax(s.mask_fill(future, f32::NEG_INFINITY), 3);
        assert_close(got, module.projection().merge(p.matmul(h.v)), 2e-5);
        let err = FlashAttentionConfig::new(32, 4)
            .with_softcap(Some(0.0))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("softcap") && err.contains('0'), "{err}");
    }

    fn exact_check(config: FlashAttentionConfig, batch: usize, seq: usize) {
        let module = config.init(&cpu());
        let x = randn([batch, seq, config.d_model], &cpu());
        let got = module.forward(x.clone());
        let want = module.projection().exact(x, config.causal);
        assert_close(got, want, 2e-5);
    }

    #[test]
    fn equals_exact_attention_on_odd_lengths() {
        for seq in [1, 17, 97] {
            exact_check(FlashAttentionConfig::new(32, 4), 2, seq);
            exact_check(FlashAttentionConfig::new(32, 4).with_causal(true), 2, seq);
        }
    }

    /// Rotary embeddings equal burn-nn's `RotaryEncoding` applied by hand to the projected
    /// queries and keys (and change the result).
    #[test]
    fn rotary_equals_burn_nn_rotary_applied_by_hand() {
        use burn::nn::RotaryEncodingConfig;
        let x = randn([2, 9, 16], &cpu());
        let plain = FlashAttentionConfig::new(16, 2).with_causal(true);
        let module = plain.clone().with_rotary_theta(Some(100.0)).init(&cpu());
        let got = module.forward(x.clone());
        let h = module.projection().split_self(x.clone());
        let rope = RotaryEncodingConfig::new(9, 8)
            .with_theta(100.0)
            .init(&cpu());
        let out =
            burn_attn_core::attention(rope.forward(h.q), rope.forward(h.k), h.v, &module.options());
        let want = module.projection().merge(out);
        assert_close(got.clone(), want, 1e-5);
        let unrotated = FlashAttention {
            rotary_theta: None,
            ..module.clone()
        };
        let diff = (got - unrotated.forward(x))
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(diff > 1e-2, "rotary changed nothing ({diff})");
        assert!(FlashAttentionConfig::new(12, 4)
            .with_rotary_theta(Some(1e4))
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head dim 3 must be even"));
    }

    #[test]
    fn packed_documents_equal_each_document_alone() {
        for config in [
            FlashAttentionConfig::new(16, 4),
            FlashAttentionConfig::new(16, 4).with_causal(true),
            FlashAttentionConfig::new(16, 4)
                .with_window_left(Some(3))
                .with_window_right(Some(1)),
        ] {
            let module = config.init(&cpu());
            // Ids checked once up front, and checked by the call.
            check_packed(
                config.d_model,
                |x, docs| {
                    let ids = DocumentIds::self_attention(docs).checked().unwrap();
                    assert!(ids.is_checked());
                    module.forward_packed(x, ids)
                },
                |x| module.forward(x),
            );
            check_packed(
                config.d_model,
                |x, docs| module.forward_packed(x, docs),
                |x| module.forward(x),
            );
        }
    }

    #[test]
    fn equals_exact_attention_at_1025_with_small_tiles() {
        exact_check(
            FlashAttentionConfig::new(16, 2)
                .with_block_size(128)
                .with_causal(true),
            1,
            1025,
        );
    }

    #[test]
    fn grouped_query_heads_equal_exact() {
        exact_check(
            FlashAttentionConfig::new(48, 6).with_n_kv_heads(Some(2)),
            2,
            33,
        );
        exact_check(
            FlashAttentionConfig::new(48, 6).with_n_kv_heads(Some(1)),
            1,
            20,
        );
    }

    #[test]
    fn cross_attention_with_different_lengths_and_padding() {
        let module = FlashAttentionConfig::new(32, 4)
            .with_block_size(8)
            .init(&cpu());
        let q = randn([2, 13, 32], &cpu());
        let kv = randn([2, 29, 32], &cpu());
        let pad = Tensor::<1, burn::tensor::Int>::arange(0..29, &cpu())
            .reshape([1, 29])
            .repeat_dim(0, 2)
            .greater_equal_elem(21);
        let got = module.forward_cross(q.clone(), kv.clone(), kv.clone(), Some(pad.clone()));
        let want = module
            .projection()
            .exact_cross(q, kv.clone(), kv, Some(pad), false);
        assert_close(got, want, 2e-5);
    }

    #[test]
    fn fully_masked_rows_give_zero_not_nan() {
        // 9 queries causally over 4 keys: the first 5 queries see no key.
        let module = FlashAttentionConfig::new(16, 2)
            .with_causal(true)
            .with_bias(false)
            .init(&cpu());
        let q = randn([1, 9, 16], &cpu());
        let kv = randn([1, 4, 16], &cpu());
        let out = module.forward_cross(q.clone(), kv.clone(), kv.clone(), None);
        assert_finite(out.clone());
        let masked = out.clone().slice([0..1, 0..5]);
        assert_close(masked.clone(), masked.zeros_like(), 0.0);
        let want = module
            .projection()
            .exact_cross(q, kv.clone(), kv, None, true);
        assert_close(out, want, 2e-5);
    }

    /// DESIGN.md's rule: against the f64 truth, the tiled path's error is at most twice
    /// the error of the materialised reference run in the same (f32) precision.
    #[test]
    fn large_logits_within_twice_the_reference_error() {
        let to_f64 = |t: &Tensor<4>| t.clone().cast(burn::tensor::DType::F64);
        let err = |got: Tensor<4>, truth: &Tensor<4>| -> f64 {
            (to_f64(&got) - truth.clone()).abs().max().into_scalar()
        };
        for (causal, gain) in [(false, 30.0), (true, 30.0), (false, 100.0)] {
            let q = randn([2, 3, 70, 16], &cpu()) * gain;
            let k = randn([2, 3, 70, 16], &cpu());
            let v = randn([2, 3, 70, 16], &cpu());
            let pattern = KeyPattern::band(Window::FULL, causal);
            let (truth, _) = burn_attn_core::reference_attention(
                to_f64(&q),
                to_f64(&k),
                to_f64(&v),
                &pattern,
                1.0,
                None,
                None,
            );
            let (low, _) = burn_attn_core::reference_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                &pattern,
                1.0,
                None,
                None,
            );
            let options = AttentionOptions {
                scale: Some(1.0),
                causal,
                tile: Some(16),
                ..AttentionOptions::default()
            };
            let ours = burn_attn_core::attention(q, k, v, &options);
            assert_finite(ours.clone());
            let (ours_err, ref_err) = (err(ours, &truth), err(low, &truth));
            assert!(
                ours_err <= 2.0 * ref_err + 1e-6,
                "tiled error {ours_err} > 2 x reference error {ref_err} (gain {gain})"
            );
        }
    }

    #[test]
    fn window_equals_exact_with_band_mask() {
        let config = FlashAttentionConfig::new(16, 2)
            .with_window_left(Some(3))
            .with_window_right(Some(0))
            .with_block_size(4);
        let module = config.init(&cpu());
        let x = randn([2, 23, 16], &cpu());
        let got = module.forward(x.clone());
        let h = module.projection().split_self(x);
        let pattern = KeyPattern::band(Window::new(Some(3), Some(0)), false);
        let (want, _) = burn_attn_core::reference_attention(
            h.q,
            h.k,
            h.v,
            &pattern,
            1.0 / 8f64.sqrt(),
            None,
            None,
        );
        assert_close(got, module.projection().merge(want), 2e-5);
    }

    #[test]
    fn trains_and_round_trips() {
        let config = FlashAttentionConfig::new(16, 2).with_causal(true);
        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");

        let module = config.init(&cpu());
        let x = randn([1, 7, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);

        let json = serde_json::to_string(&config).unwrap();
        let back: FlashAttentionConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }

    #[test]
    fn bad_configs_name_the_values() {
        let msg = |c: FlashAttentionConfig| c.validate().unwrap_err().to_string();
        assert!(msg(FlashAttentionConfig::new(30, 4)).contains("30"));
        assert!(msg(FlashAttentionConfig::new(32, 4).with_n_kv_heads(Some(3))).contains("(3)"));
        assert!(msg(FlashAttentionConfig::new(32, 4).with_block_size(0)).contains("block_size"));
        assert!(msg(FlashAttentionConfig::new(32, 4).with_dropout(1.5)).contains("1.5"));
    }

    #[test]
    #[should_panic(expected = "query input has shape [1, 5, 12], expected [batch, seq, 32]")]
    fn wrong_width_panics_with_values() {
        let module = FlashAttentionConfig::new(32, 4).init(&cpu());
        module.forward(randn([1, 5, 12], &cpu()));
    }
}
