//! A hybrid that picks the attention core by sequence length, with one set of weights.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{
    ensure, AttentionError, AttentionMasks, AttentionOptions, BlockMaskCache, DocumentIds,
    KeyPattern, Window,
};
use serde::{Deserialize, Serialize};

use crate::dropout::{validate_dropout, AttentionDropout};
use crate::flash::{attend, projection_config};
use crate::input::AttentionInput;
use crate::kv_cache::{decode, KvCache};
use crate::paged_kv_cache::{decode_paged_grouped, PagedKvCache, SequenceId};
use crate::projection::{validate_heads, MultiHeadProjection};
use crate::sparse::SparsePattern;
use burn_attn_core::OrPanic;

/// The core a [`HybridAttention`] runs for a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HybridChoice {
    /// Exact attention (flash).
    Flash,
    /// Fixed-pattern sparse attention.
    Sparse,
    /// Sliding-window attention.
    SlidingWindow,
}

/// One timing behind a [`HybridProfile`]: a core's median forward time at one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HybridMeasurement {
    /// The core's name as the comparison tool prints it (`flash`, `sparse-local`,
    /// `sliding-window`, ...).
    pub method: String,
    /// Sequence length.
    pub seq_len: usize,
    /// Median time of one forward pass of the whole module, in milliseconds.
    pub median_ms: f64,
}

/// Where one core becomes faster than flash attention on the calibrated device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HybridCrossover {
    /// The core's name (`sparse-local`, `sliding-window`, ...).
    pub method: String,
    /// The estimated length from which it stays faster than flash over the measured
    /// lengths (interpolated in log-log between the two measured lengths around the
    /// crossing); `None` when it never became faster within them.
    pub faster_than_flash_from: Option<usize>,
}

/// Hybrid thresholds measured on one device, written by `burn-attn-bench calibrate` and
/// read by [`HybridAttentionConfig::with_profile`] / [`HybridAttentionConfig::with_profile_file`].
///
/// A profile is a performance measurement, but applying it changes the model: the cores
/// are not numerically equivalent (sparse and windowed cores hide keys that flash sees), so
/// a model trained or evaluated with one set of thresholds computes a different function
/// under another. Apply a profile when the model is configured, before training, and keep
/// the resulting [`HybridAttentionConfig`] (which holds the thresholds, pattern and window)
/// with the model's weights; do not swap profiles under a trained model.
#[derive(Config, Debug, PartialEq)]
pub struct HybridProfile {
    /// The device the timings come from (backend name and device).
    pub device: String,
    /// The float type of the timings (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Model width of the measured modules.
    pub d_model: usize,
    /// Heads of the measured modules.
    pub n_heads: usize,
    /// Batch size of the measured inputs.
    pub batch: usize,
    /// Lengths up to this run flash.
    pub flash_max_len: usize,
    /// Lengths up to this (above `flash_max_len`) run the sparse pattern; longer ones the
    /// sliding window.
    pub sparse_max_len: usize,
    /// The sparse pattern the timings were taken with.
    pub sparse_pattern: SparsePattern,
    /// The sliding window the timings were taken with.
    pub window: usize,
    /// Where each core became faster than flash.
    pub crossovers: Vec<HybridCrossover>,
    /// The raw timings.
    pub measured: Vec<HybridMeasurement>,
}

/// Configuration of [`HybridAttention`].
///
/// The thresholds default to the seed's explicit 2048 / 8192; a device-calibrated
/// [`HybridProfile`] can replace them ([`with_profile`](Self::with_profile)).
///
/// The mechanisms are not numerically equivalent: switching core changes the function the
/// model computes, so the thresholds are part of the model's configuration and are saved
/// with it.
#[derive(Config, Debug)]
pub struct HybridAttentionConfig {
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
    /// Hide future keys in every core. Default: `false`.
    #[config(default = false)]
    pub causal: bool,
    /// Lengths up to this run exact (flash) attention. Default: `2048`, as the seed.
    #[config(default = 2048)]
    pub flash_max_len: usize,
    /// Lengths up to this (and above `flash_max_len`) run sparse attention; longer ones
    /// run the sliding window. Default: `8192`, as the seed.
    #[config(default = 8192)]
    pub sparse_max_len: usize,
    /// The sparse core's pattern. Default: `Local { window: 128 }`.
    #[config(default = "SparsePattern::Local { window: 128 }")]
    pub sparse_pattern: SparsePattern,
    /// The sliding window's size. Default: `256`.
    #[config(default = 256)]
    pub window: usize,
}

impl HybridAttentionConfig {
    /// Takes the thresholds, sparse pattern and window from a calibrated profile. The
    /// result changes what the model computes (see [`HybridProfile`]): apply it when the
    /// model is configured and save this config with the model.
    pub fn with_profile(mut self, profile: &HybridProfile) -> Self {
        self.flash_max_len = profile.flash_max_len;
        self.sparse_max_len = profile.sparse_max_len;
        self.sparse_pattern = profile.sparse_pattern;
        self.window = profile.window;
        self
    }

    /// [`with_profile`](Self::with_profile) with a profile read from a JSON file (as
    /// written by `burn-attn-bench calibrate`).
    pub fn with_profile_file(
        self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<Self, burn::config::ConfigError> {
        let profile = HybridProfile::load(path)?;
        Ok(self.with_profile(&profile))
    }

    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        self.sparse_pattern.validate()?;
        if self.window == 0 {
            return Err(AttentionError::ZeroSize { what: "window" });
        }
        if self.flash_max_len > self.sparse_max_len {
            return Err(AttentionError::MinAboveMax {
                what: "hybrid thresholds (flash_max_len, sparse_max_len)",
                min: self.flash_max_len,
                max: self.sparse_max_len,
            });
        }
        Ok(())
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> HybridAttention {
        ensure(self.validate());
        HybridAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            causal: self.causal,
            flash_max_len: self.flash_max_len,
            sparse_max_len: self.sparse_max_len,
            sparse_pattern: self.sparse_pattern,
            window: self.window,
            dropout: AttentionDropout::new(self.dropout),
            block_masks: BlockMaskCache::new(),
        }
    }
}

/// Attention whose core depends on the sequence length: exact up to `flash_max_len`,
/// sparse up to `sparse_max_len`, sliding window beyond. One set of projections serves
/// every core, so weights trained at one length are used at all lengths.
#[derive(Module, Debug)]
pub struct HybridAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// Causal flag.
    pub causal: bool,
    /// Longest length for flash.
    pub flash_max_len: usize,
    /// Longest length for sparse.
    pub sparse_max_len: usize,
    /// The sparse pattern.
    #[module(skip)]
    pub sparse_pattern: SparsePattern,
    /// The sliding window size.
    pub window: usize,
    /// Dropout on probabilities while training.
    pub dropout: AttentionDropout,
    /// The block-sparse plan of the last call's core and lengths, reused by the next calls
    /// of the same core and lengths on the GPU kernels (clones of the module share it).
    #[module(skip)]
    pub block_masks: BlockMaskCache,
}

/// The error of a decoding call whose chosen core is a `Random` sparse pattern.
fn random_does_not_decode(total: usize) -> AttentionError {
    AttentionError::Invalid(format!(
        "hybrid attention chose its sparse core at {total} tokens, and a random sparse pattern \
         does not decode with a key/value cache (its block layout is drawn for whole lengths)"
    ))
}

impl HybridAttention {
    /// The core used for a sequence of `seq_len` tokens.
    pub fn choose(&self, seq_len: usize) -> HybridChoice {
        if seq_len <= self.flash_max_len {
            HybridChoice::Flash
        } else if seq_len <= self.sparse_max_len {
            HybridChoice::Sparse
        } else {
            HybridChoice::SlidingWindow
        }
    }

    /// The key pattern of the core chosen for `seq_len`.
    pub fn key_pattern(&self, seq_len: usize) -> KeyPattern {
        match self.choose(seq_len) {
            HybridChoice::Flash => KeyPattern::band(Window::FULL, self.causal),
            HybridChoice::Sparse => self
                .sparse_pattern
                .key_pattern(seq_len, seq_len, self.causal)
                .or_panic(),
            HybridChoice::SlidingWindow => KeyPattern::band(
                if self.causal {
                    Window::causal(self.window)
                } else {
                    Window::symmetric(self.window)
                },
                self.causal,
            ),
        }
    }

    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    ///
    /// Only the chosen core runs, on the same pattern description as the standalone
    /// module of that mechanism: the forward allocates what that mechanism needs and
    /// nothing for the cores it did not choose (no dense mask, no second projection).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_padded(x, None)
    }

    /// [`forward`](Self::forward) with an optional `[batch, seq]` key padding mask (`true`
    /// = padding, hidden from every query; a row that sees no key gives 0). One core serves
    /// the call, the one chosen for the padded length `seq` (choosing per sequence would
    /// read the mask back to the host), so a short sequence padded past a threshold takes
    /// the longer length's core; [`try_forward_paged`](Self::try_forward_paged) chooses per
    /// sequence.
    ///
    /// # Panics
    /// When the mask's shape does not match `x` (naming both).
    pub fn forward_padded(&self, x: Tensor<3>, key_padding: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let masks = AttentionMasks {
            key_padding,
            ..self.masks()
        };
        self.attend(x, &masks)
    }

    /// Self-attention over packed sequences: each row of `x` (`[batch, seq, d_model]`)
    /// holds several documents one after another, `documents` (`[batch, seq]`) their ids,
    /// not decreasing along a row; a token attends only within its document. The core is
    /// the one chosen for the packed length `seq`. With the flash or sliding-window core,
    /// or a `Local` sparse pattern, each document gets what it would get alone under that
    /// core; `Strided` and `Random` place their columns and blocks by position in the
    /// packed row. See [`FlashAttention::forward_packed`](crate::FlashAttention::forward_packed)
    /// for checking ids once.
    ///
    /// # Panics
    /// When `documents` does not match `x` or its ids decrease (naming the position).
    pub fn forward_packed(&self, x: Tensor<3>, documents: impl Into<DocumentIds>) -> Tensor<3> {
        let masks = AttentionMasks {
            documents: Some(documents.into()),
            ..self.masks()
        };
        self.attend(x, &masks)
    }

    /// Self-attention of `x` under `masks` with the core chosen for its length.
    fn attend(&self, x: Tensor<3>, masks: &AttentionMasks) -> Tensor<3> {
        let pattern = self.key_pattern(x.dims()[1]);
        let input = AttentionInput::self_attn(x);
        attend(
            &self.projection,
            input,
            &pattern,
            &self.options(),
            masks,
            None,
        )
    }

    /// The masks of every call: dropout while training.
    fn masks(&self) -> AttentionMasks {
        AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        }
    }

    /// The options of every call: the defaults with the module's block-sparse plan cache
    /// (one for every core: a call of another core or length replaces its plan).
    fn options(&self) -> AttentionOptions {
        AttentionOptions::new().with_block_mask_cache(self.block_masks.clone())
    }

    /// Decoding: self-attention of the next tokens `x` (`[batch, new, d_model]`) over every
    /// token so far, whose projected keys and values `cache` holds (and then holds `x`'s
    /// too). The core is the one chosen for the sequence so far (`cache.seen() + new`
    /// tokens), so the rows equal the last `new` rows of [`forward`](Self::forward) over
    /// that prefix: a generation that crosses a threshold switches core there, as a
    /// forward over the longer sequence would. Causal modules only; the cache must keep
    /// every key (short lengths run exact attention), and a `Random` sparse pattern does
    /// not decode (its layout is drawn for whole lengths).
    ///
    /// # Errors
    /// When the module is not causal, `cache` is rolling, the sparse core with a `Random`
    /// pattern is chosen, or `cache` does not fit the call (naming the values).
    pub fn try_forward_cache(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>, AttentionError> {
        if cache.is_rolling() {
            return Err(AttentionError::Invalid(
                "hybrid attention needs every key (it runs exact attention at short lengths): \
                 use KvCache::new or with_capacity, not rolling"
                    .into(),
            ));
        }
        let total = cache.seen() + x.dims()[1];
        let choice = self.choose(total);
        if choice == HybridChoice::Sparse {
            if let SparsePattern::Random { .. } = self.sparse_pattern {
                return Err(random_does_not_decode(total));
            }
        }
        let pattern = self.key_pattern(total);
        let masks = self.masks();
        decode(
            &self.projection,
            x,
            cache,
            &pattern,
            &self.options(),
            &masks,
            None,
        )
    }

    /// [`try_forward_cache`](Self::try_forward_cache), panicking on its error.
    pub fn forward_cache(&self, x: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        self.try_forward_cache(x, cache).or_panic()
    }

    /// Decoding several sequences of different lengths through a [`PagedKvCache`]: the
    /// next tokens `x` (`[ids.len(), new, d_model]`, row `b` for sequence `ids[b]`) over
    /// every token of their sequences so far. Each sequence runs the core chosen for its own
    /// length (`cache.sequence_len(id) + new`), as [`try_forward_cache`](Self::try_forward_cache)
    /// does for one, so its rows equal the last `new` rows of [`forward`](Self::forward) over
    /// its prefix. Sequences that share a core share one call (flash and the window pad
    /// shorter sequences at the front); the sparse core places its columns by absolute
    /// position, so it runs one call per length.
    ///
    /// # Errors
    /// When the module is not causal, the sparse core with a `Random` pattern is chosen, an
    /// id is not held or given twice, `x` is not one row per id, or the call needs more
    /// pages than are free (naming the values); the cache is unchanged then.
    pub fn try_forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Result<Tensor<3>, AttentionError> {
        let masks = self.masks();
        decode_paged_grouped(
            &self.projection,
            x,
            cache,
            ids,
            &self.options(),
            &masks,
            None,
            |total| {
                let choice = self.choose(total);
                let key = match choice {
                    HybridChoice::Sparse => {
                        if let SparsePattern::Random { .. } = self.sparse_pattern {
                            return Err(random_does_not_decode(total));
                        }
                        (choice, total)
                    }
                    _ => (choice, 0),
                };
                Ok((key, self.key_pattern(total)))
            },
        )
    }

    /// [`try_forward_paged`](Self::try_forward_paged), panicking on its error.
    pub fn forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Tensor<3> {
        self.try_forward_paged(x, cache, ids).or_panic()
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

    #[test]
    fn packed_documents_equal_each_document_alone() {
        // Thresholds that give every length here one core: flash, local sparse, window.
        for (flash_max, sparse_max) in [(32, 64), (0, 64), (0, 0)] {
            let module = HybridAttentionConfig::new(16, 4)
                .with_causal(true)
                .with_flash_max_len(flash_max)
                .with_sparse_max_len(sparse_max)
                .with_sparse_pattern(SparsePattern::Local { window: 4 })
                .with_window(3)
                .init(&cpu());
            check_packed(
                16,
                |x, docs| module.forward_packed(x, docs),
                |x| module.forward(x),
            );
        }
    }

    #[test]
    fn padding_hides_keys() {
        for (flash_max, sparse_max) in [(32, 64), (4, 64), (2, 4)] {
            let module = HybridAttentionConfig::new(16, 2)
                .with_flash_max_len(flash_max)
                .with_sparse_max_len(sparse_max)
                .init(&cpu());
            assert_padding_hides_keys(|x, pad| module.forward_padded(x, Some(pad)), [2, 13, 16], 3);
        }
    }
    use burn_attn_core::reference_attention;

    /// A causal module whose sparse core, chosen from the first token, has a random layout.
    fn random_sparse_first() -> HybridAttention {
        small()
            .with_causal(true)
            .with_flash_max_len(0)
            .with_sparse_pattern(SparsePattern::Random {
                density: 0.5,
                block: 4,
                seed: 3,
            })
            .init(&cpu())
    }

    fn small() -> HybridAttentionConfig {
        HybridAttentionConfig::new(16, 2)
            .with_flash_max_len(8)
            .with_sparse_max_len(24)
            .with_sparse_pattern(SparsePattern::Strided {
                stride: 4,
                local: 1,
            })
            .with_window(4)
    }

    /// Each decoding step equals the forward over the sequence so far (its last rows),
    /// across both thresholds (flash to 8 tokens, strided sparse to 24, then the window).
    #[test]
    fn decoding_equals_the_forward_over_each_prefix() {
        let module = small()
            .with_causal(true)
            .with_n_kv_heads(Some(1))
            .init(&cpu());
        let x = randn([2, 30, 16], &cpu());
        for (mut cache, chunk) in [(KvCache::new(), 1), (KvCache::with_capacity(30), 3)] {
            let mut start = 0;
            while start < 30 {
                let end = (start + chunk).min(30);
                let got =
                    module.forward_cache(x.clone().slice([0..2, start..end, 0..16]), &mut cache);
                let want = module
                    .forward(x.clone().slice([0..2, 0..end, 0..16]))
                    .slice([0..2, start..end, 0..16]);
                assert_close(got, want, 1e-5);
                start = end;
            }
            assert_eq!(cache.seen(), 30);
        }
        let step = |module: &HybridAttention, mut cache: KvCache| {
            module
                .try_forward_cache(randn([1, 1, 16], &cpu()), &mut cache)
                .unwrap_err()
                .to_string()
        };
        assert!(step(&module, KvCache::rolling()).contains("rolling"));
        let full = small().init(&cpu());
        assert!(step(&full, KvCache::new()).contains("causal"));
        let random = random_sparse_first();
        assert!(step(&random, KvCache::new()).contains("random"));
    }

    /// Sequences of different lengths decoded together, one token at a time, each on the
    /// core its own length chooses (some sequences cross a threshold during the run): every
    /// row equals the forward over its sequence's prefix; bad calls change nothing.
    #[test]
    fn paged_decoding_equals_the_forward_over_each_prefix() {
        let module = small()
            .with_causal(true)
            .with_n_kv_heads(Some(1))
            .init(&cpu());
        // Thresholds 8 (flash) and 24 (strided sparse): the prompts start in each core, and
        // the sparse ones of equal length share a call.
        let (mut cache, ids) = check_paged_decoding(
            &[3, 6, 13, 14, 14, 22, 26],
            4,
            16,
            64,
            &|x, cache, ids| module.forward_paged(x, cache, ids),
            &|x| module.forward(x),
        );
        let free = cache.free_pages();
        let err = |module: &HybridAttention, cache: &mut PagedKvCache, ids: &[SequenceId]| {
            let x = randn([ids.len(), 1, 16], &cpu());
            module
                .try_forward_paged(x, cache, ids)
                .unwrap_err()
                .to_string()
        };
        let rows = module
            .try_forward_paged(randn([1, 1, 16], &cpu()), &mut cache, &ids[..2])
            .unwrap_err()
            .to_string();
        assert!(rows.contains("one id per batch row"), "{rows}");
        let twice = [ids[0], ids[0]];
        assert!(err(&module, &mut cache, &twice).contains("twice"));
        let mut small_cache = PagedKvCache::new(2, 4).unwrap();
        let held = [small_cache.add_sequence(), small_cache.add_sequence()];
        module.forward_paged(randn([2, 4, 16], &cpu()), &mut small_cache, &held);
        let e = err(&module, &mut small_cache, &held);
        assert!(e.contains("free pages"), "{e}");
        assert_eq!(small_cache.sequence_len(held[0]), Some(4));
        let random = random_sparse_first();
        let mut c = PagedKvCache::new(4, 4).unwrap();
        let one = [c.add_sequence()];
        assert!(err(&random, &mut c, &one).contains("random"));
        assert_eq!(cache.free_pages(), free);
    }

    #[test]
    fn chooses_by_length_with_seed_defaults() {
        let m = HybridAttentionConfig::new(16, 2).init(&cpu());
        assert_eq!(m.choose(2048), HybridChoice::Flash);
        assert_eq!(m.choose(2049), HybridChoice::Sparse);
        assert_eq!(m.choose(8192), HybridChoice::Sparse);
        assert_eq!(m.choose(8193), HybridChoice::SlidingWindow);
    }

    #[test]
    fn each_regime_equals_exact_with_its_mask_and_shares_weights() {
        let module = small().init(&cpu());
        for (seq, choice) in [
            (8, HybridChoice::Flash),
            (17, HybridChoice::Sparse),
            (30, HybridChoice::SlidingWindow),
        ] {
            assert_eq!(module.choose(seq), choice);
            let x = randn([2, seq, 16], &cpu());
            let got = module.forward(x.clone());
            let h = module.projection().split_self(x);
            let (want, _) = reference_attention(
                h.q,
                h.k,
                h.v,
                &module.key_pattern(seq),
                1.0 / 8f64.sqrt(),
                None,
                None,
            );
            assert_close(got, module.projection().merge(want), 2e-5);
        }
    }

    #[test]
    fn profile_sets_thresholds_and_round_trips() {
        let profile = HybridProfile::new(
            "ndarray cpu".into(),
            "f32".into(),
            16,
            2,
            1,
            8,
            24,
            SparsePattern::Local { window: 6 },
            4,
            vec![HybridCrossover {
                method: "sliding-window".into(),
                faster_than_flash_from: Some(9),
            }],
            vec![HybridMeasurement {
                method: "flash".into(),
                seq_len: 8,
                median_ms: 0.5,
            }],
        );
        let path = std::env::temp_dir().join(format!(
            "burn-attn-hybrid-profile-{}.json",
            std::process::id()
        ));
        profile.save(&path).unwrap();
        let config = HybridAttentionConfig::new(16, 2)
            .with_profile_file(&path)
            .unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!((config.flash_max_len, config.sparse_max_len), (8, 24));
        assert_eq!(config.sparse_pattern, SparsePattern::Local { window: 6 });
        assert_eq!(config.window, 4);
        let module = config.init(&cpu());
        assert_eq!(module.choose(8), HybridChoice::Flash);
        assert_eq!(module.choose(9), HybridChoice::Sparse);
        assert_eq!(module.choose(25), HybridChoice::SlidingWindow);
        // The thresholds live in the config, so they are saved with the model.
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"flash_max_len\":8"), "{json}");
    }

    #[test]
    fn trains_round_trips_and_rejects_bad_thresholds() {
        let config = small();
        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
        let module = config.init(&cpu());
        let x = randn([1, 30, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        let err = config
            .with_flash_max_len(100)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("(100)") && err.contains("(24)"), "{err}");
    }
}
