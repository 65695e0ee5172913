//! Sliding-window attention: each query sees a fixed band of keys around (or before) it.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{
    ensure, AttentionError, AttentionMasks, AttentionOptions, BlockMaskCache, DocumentIds,
    KeyPattern, Window,
};

use crate::context_parallel::{attend_context_parallel, unsupported_masks};
use crate::dropout::{validate_dropout, AttentionDropout};
use crate::flash::{attend, packed_masks, projection_config};
use crate::input::AttentionInput;
use crate::kv_cache::{decode, KvCache};
use crate::paged_kv_cache::{decode_paged, PagedKvCache, SequenceId};
use crate::projection::{validate_heads, MultiHeadProjection};
use crate::rotary::validate_rotary;
use burn_attn_core::OrPanic;

/// Configuration of [`SlidingWindowAttention`].
#[derive(Config, Debug)]
pub struct SlidingWindowAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads; must divide `d_model`.
    pub n_heads: usize,
    /// Key/value heads (GQA/MQA). Default: `None` (= `n_heads`).
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Whether the linears have a bias. Default: `true`.
    #[config(default = true)]
    pub bias: bool,
    /// Dropout on the attention probabilities while training. Default: `0.0`.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Window size. Symmetric: keys within `window / 2` on each side (the seed's
    /// definition). Causal: the `window` most recent keys, the query's own included.
    /// Default: `256`, as the seed.
    #[config(default = 256)]
    pub window: usize,
    /// Look only backwards. Default: `false` (symmetric).
    #[config(default = false)]
    pub causal: bool,
    /// Rotary position embeddings on the projected queries and keys, with this base
    /// (as [`FlashAttentionConfig::rotary_theta`](crate::FlashAttentionConfig::rotary_theta)),
    /// decoding included; the head dim must be even. Default: `None`.
    #[config(default = "None")]
    pub rotary_theta: Option<f32>,
}

impl SlidingWindowAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        validate_rotary(self.rotary_theta, self.d_model / self.n_heads)?;
        if self.window == 0 {
            return Err(AttentionError::ZeroSize { what: "window" });
        }
        Ok(())
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> SlidingWindowAttention {
        ensure(self.validate());
        SlidingWindowAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            window: self.window,
            causal: self.causal,
            dropout: AttentionDropout::new(self.dropout),
            rotary_theta: self.rotary_theta,
            block_masks: BlockMaskCache::new(),
        }
    }
}

/// Exact attention inside a sliding window. Only the band is visited: O(n * window) time
/// and memory on every backend.
#[derive(Module, Debug)]
pub struct SlidingWindowAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// Window size.
    pub window: usize,
    /// Causal flag.
    pub causal: bool,
    /// Dropout on probabilities while training.
    pub dropout: AttentionDropout,
    /// Base of the rotary position embeddings, if any.
    pub rotary_theta: Option<f32>,
    /// The band's block-sparse plan of the last masked call's lengths, reused by the next
    /// calls of the same lengths on the GPU kernels (clones of the module share it).
    #[module(skip)]
    pub block_masks: BlockMaskCache,
}

impl SlidingWindowAttention {
    /// The band this module applies.
    pub fn band(&self) -> Window {
        if self.causal {
            Window::causal(self.window)
        } else {
            Window::symmetric(self.window)
        }
    }

    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_cross(x.clone(), x.clone(), x, None)
    }

    /// Attention of `query` over `key`/`value` (aligned bottom-right) with an optional
    /// `[batch, seq_k]` key padding mask (`true` = padding).
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

    /// Attention with burn-nn's masks ([`AttentionInput`]) inside the window.
    ///
    /// # Panics
    /// When a mask's shape does not match the call (naming the shapes).
    pub fn forward_input(&self, input: AttentionInput) -> Tensor<3> {
        let masks = input.masks(self.dropout.active());
        self.attend(input, &masks)
    }

    /// Self-attention over packed sequences: `documents` (`[batch, seq]`, not decreasing
    /// along a row) gives each token's document; a token attends within its document and
    /// window only, the same result as each document run alone (see
    /// [`FlashAttention::forward_packed`](crate::FlashAttention::forward_packed)).
    ///
    /// # Panics
    /// When `documents` does not match `x` or its ids decrease (naming the position).
    pub fn forward_packed(&self, x: Tensor<3>, documents: impl Into<DocumentIds>) -> Tensor<3> {
        let masks = packed_masks(documents.into(), self.dropout.active());
        self.attend(AttentionInput::self_attn(x), &masks)
    }

    /// Decoding (causal windows only): the next tokens `x` (`[batch, new, d_model]`) over
    /// the tokens so far held by `cache`, as
    /// [`FlashAttention::forward_cache`](crate::FlashAttention::forward_cache). With
    /// [`KvCache::rolling`] the cache keeps the `window - 1` most recent keys only: constant
    /// memory however long the generation.
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
        let pattern = KeyPattern::band(self.band(), self.causal);
        let masks = AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        };
        decode(
            &self.projection,
            x,
            cache,
            &pattern,
            &AttentionOptions::new().with_block_mask_cache(self.block_masks.clone()),
            &masks,
            self.rotary_theta,
        )
    }

    /// Decodes the new tokens `x` of several sequences of different lengths at once, row
    /// `b` continuing sequence `ids[b]` of `cache`, as
    /// [`FlashAttention::forward_paged`](crate::FlashAttention::forward_paged) (the cache
    /// holds every key; the window hides the older ones). Panics on bad input
    /// ([`try_forward_paged`](Self::try_forward_paged) returns it).
    pub fn forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Tensor<3> {
        self.try_forward_paged(x, cache, ids).or_panic()
    }

    /// [`forward_paged`](Self::forward_paged) returning bad input as an error.
    pub fn try_forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Result<Tensor<3>, AttentionError> {
        let masks = AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        };
        decode_paged(
            &self.projection,
            x,
            cache,
            ids,
            &KeyPattern::band(self.band(), self.causal),
            &AttentionOptions::new().with_block_mask_cache(self.block_masks.clone()),
            &masks,
            self.rotary_theta,
        )
    }

    fn attend(&self, input: AttentionInput, masks: &AttentionMasks) -> Tensor<3> {
        let pattern = KeyPattern::band(self.band(), self.causal);
        attend(
            &self.projection,
            input,
            &pattern,
            &AttentionOptions::new().with_block_mask_cache(self.block_masks.clone()),
            masks,
            self.rotary_theta,
        )
    }

    /// Context-parallel self-attention over contiguous slices of one sequence on their
    /// peers' devices, as
    /// [`FlashAttention::try_forward_context_parallel`](crate::FlashAttention::try_forward_context_parallel):
    /// only the blocks of its neighbours inside the window visit each peer.
    ///
    /// # Errors
    /// A module with dropout (not in the context-parallel core), and slices the core
    /// rejects (naming the values).
    pub fn try_forward_context_parallel(
        &self,
        slices: Vec<Tensor<3>>,
    ) -> Result<Vec<Tensor<3>>, AttentionError> {
        if self.dropout.active() > 0.0 {
            return Err(unsupported_masks(format!(
                "dropout {}",
                self.dropout.active()
            )));
        }
        let options = AttentionOptions::new()
            .with_window(self.band())
            .with_causal(self.causal);
        attend_context_parallel(&self.projection, slices, &options, self.rotary_theta)
    }

    /// [`try_forward_context_parallel`](Self::try_forward_context_parallel), panicking on
    /// its error.
    pub fn forward_context_parallel(&self, slices: Vec<Tensor<3>>) -> Vec<Tensor<3>> {
        self.try_forward_context_parallel(slices).or_panic()
    }

    /// The shared projections (for exact baselines with the same weights).
    pub fn projection(&self) -> &MultiHeadProjection {
        &self.projection
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn_attn_core::reference_attention;

    /// Context-parallel slices give the whole forward's rows (causal window with rotary,
    /// and a symmetric window over slices shorter than it).
    #[test]
    fn context_parallel_slices_equal_the_whole_forward() {
        for (window, causal, cuts) in [(6, true, vec![5, 8, 7]), (9, false, vec![3, 3, 4, 10])] {
            let module = SlidingWindowAttentionConfig::new(32, 4)
                .with_window(window)
                .with_causal(causal)
                .with_rotary_theta(Some(100.0))
                .init(&cpu());
            let n: usize = cuts.iter().sum();
            let x = randn([2, n, 32], &cpu());
            let mut at = 0;
            let slices = cuts
                .iter()
                .map(|&rows| {
                    at += rows;
                    x.clone().slice([0..2, at - rows..at, 0..32])
                })
                .collect();
            let got = Tensor::cat(module.forward_context_parallel(slices), 1);
            assert_close(got, module.forward(x), 1e-5);
        }
    }

    #[test]
    fn input_masks_equal_the_reference() {
        use burn::tensor::{Bool, TensorData};
        let module = SlidingWindowAttentionConfig::new(16, 4)
            .with_window(6)
            .init(&cpu());
        let (batch, n) = (2, 11);
        let x = randn([batch, n, 16], &cpu());
        let hidden: Vec<bool> = (0..batch * n * n).map(|at| at % 7 == 3).collect();
        let mask =
            Tensor::<3, Bool>::from_data(TensorData::new(hidden.clone(), [batch, n, n]), &cpu());
        let got = module
            .forward_input(crate::AttentionInput::self_attn(x.clone()).mask_attn(mask.clone()));
        let h = module.projection().split_self(x);
        let band = KeyPattern::band(module.band(), false);
        let bias = Tensor::<3>::zeros([batch, n, n], &cpu())
            .mask_fill(mask, f32::NEG_INFINITY)
            .reshape([batch, 1, n, n]);
        let scale = 1.0 / (h.q.dims()[3] as f64).sqrt();
        let (want, _) = reference_attention(h.q, h.k, h.v, &band, scale, None, Some(bias));
        assert_close(got, module.projection().merge(want), 2e-5);
    }

    #[test]
    fn packed_documents_equal_each_document_alone() {
        for causal in [false, true] {
            let config = SlidingWindowAttentionConfig::new(16, 4)
                .with_window(4)
                .with_causal(causal);
            let module = config.init(&cpu());
            check_packed(
                16,
                |x, docs| module.forward_packed(x, docs),
                |x| module.forward(x),
            );
        }
    }

    #[test]
    fn equals_exact_with_band_mask() {
        for (window, causal) in [(1, false), (6, false), (7, true), (1, true), (64, false)] {
            let config = SlidingWindowAttentionConfig::new(32, 4)
                .with_window(window)
                .with_causal(causal)
                .with_n_kv_heads(Some(2));
            let module = config.init(&cpu());
            for seq in [1, 17, 97] {
                let x = randn([2, seq, 32], &cpu());
                let got = module.forward(x.clone());
                let h = module.projection().split_self(x);
                let pattern = KeyPattern::band(module.band(), causal);
                let (want, _) =
                    reference_attention(h.q, h.k, h.v, &pattern, 1.0 / 8f64.sqrt(), None, None);
                assert_close(got, module.projection().merge(want), 2e-5);
            }
        }
    }

    #[test]
    fn causal_window_sees_window_keys() {
        let module = SlidingWindowAttentionConfig::new(8, 1)
            .with_window(4)
            .with_causal(true)
            .init(&cpu());
        let band = module.band();
        let visible = (0..20).filter(|&j| band.contains(10, j, 20, 20)).count();
        assert_eq!(visible, 4);
    }

    #[test]
    fn trains_round_trips_and_rejects_zero_window() {
        let config = SlidingWindowAttentionConfig::new(16, 2).with_window(4);
        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        let err = config.with_window(0).validate().unwrap_err().to_string();
        assert!(err.contains("window must be at least 1, got 0"), "{err}");
    }
}
