//! Sparse attention with fixed patterns: local, strided and block-random.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{
    ensure, pattern_attention, AttentionError, AttentionMasks, AttentionOptions, BlockLayout,
    BlockMaskCache, KeyPattern, Window,
};
use serde::{Deserialize, Serialize};

use crate::dropout::{validate_dropout, AttentionDropout};
use crate::flash::projection_config;
use crate::kv_cache::{decode, KvCache};
use crate::paged_kv_cache::{decode_paged_grouped, PagedKvCache, SequenceId};
use crate::projection::{validate_heads, MultiHeadProjection};
use burn_attn_core::OrPanic;

/// A fixed sparsity pattern, described once (band, strided columns, block layout) so every
/// implementation evaluates the same rule per tile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SparsePattern {
    /// Each query sees the keys within `window / 2` of its position (the seed's local
    /// pattern; `window = 128` there).
    Local {
        /// Total window size.
        window: usize,
    },
    /// Each query sees every `stride`-th key plus the keys within `local` of its position
    /// (the seed uses `stride = 64`, `local = 32`).
    Strided {
        /// Distance between the global key columns.
        stride: usize,
        /// Half-width of the local band.
        local: usize,
    },
    /// Blocks of `block x block` are active with probability `density`, drawn from `seed`
    /// (BigBird's block-random attention); the blocks on each query's own position are
    /// always active, so no row is left without keys.
    Random {
        /// Fraction of active blocks, in `(0, 1]`.
        density: f64,
        /// Block size.
        block: usize,
        /// Seed of the layout: the same config gives the same pattern everywhere.
        seed: u64,
    },
}

impl Default for SparsePattern {
    fn default() -> Self {
        SparsePattern::Local { window: 128 }
    }
}

impl SparsePattern {
    /// Checks the parameters; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        match *self {
            SparsePattern::Local { window: 0 } => Err(AttentionError::ZeroSize {
                what: "local window",
            }),
            SparsePattern::Strided { stride: 0, .. } => {
                Err(AttentionError::ZeroSize { what: "stride" })
            }
            SparsePattern::Random { block: 0, .. } => Err(AttentionError::ZeroSize {
                what: "random block",
            }),
            SparsePattern::Random { density, .. } if !(density > 0.0 && density <= 1.0) => {
                Err(AttentionError::OutOfUnitRange {
                    what: "density",
                    value: density,
                })
            }
            _ => Ok(()),
        }
    }

    /// The key pattern for the given lengths.
    pub fn key_pattern(
        &self,
        seq_q: usize,
        seq_k: usize,
        causal: bool,
    ) -> Result<KeyPattern, AttentionError> {
        self.validate()?;
        Ok(match *self {
            SparsePattern::Local { window } => KeyPattern::band(Window::symmetric(window), causal),
            SparsePattern::Strided { stride, local } => KeyPattern {
                window: Window::new(Some(local), Some(local)),
                stride: Some(stride),
                causal,
                blocks: None,
            },
            SparsePattern::Random {
                density,
                block,
                seed,
            } => KeyPattern {
                causal,
                blocks: Some(BlockLayout::random(seq_q, seq_k, block, density, seed)?),
                ..KeyPattern::default()
            },
        })
    }

    /// A short name for tables: `local`, `strided` or `random`.
    pub fn name(&self) -> &'static str {
        match self {
            SparsePattern::Local { .. } => "local",
            SparsePattern::Strided { .. } => "strided",
            SparsePattern::Random { .. } => "random",
        }
    }
}

/// Configuration of [`SparseAttention`].
#[derive(Config, Debug)]
pub struct SparseAttentionConfig {
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
    /// The pattern. Default: `Local { window: 128 }`, as the seed.
    #[config(default = "SparsePattern::Local { window: 128 }")]
    pub pattern: SparsePattern,
    /// Additionally hide future keys. Default: `false`.
    #[config(default = false)]
    pub causal: bool,
}

impl SparseAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        self.pattern.validate()
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> SparseAttention {
        ensure(self.validate());
        SparseAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            pattern: self.pattern,
            block_masks: BlockMaskCache::new(),
            causal: self.causal,
            dropout: AttentionDropout::new(self.dropout),
        }
    }
}

/// Exact softmax attention restricted to a fixed sparse pattern. Only the tiles the
/// pattern touches are computed; the mask is evaluated per tile, never stored densely.
#[derive(Module, Debug)]
pub struct SparseAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// The pattern.
    #[module(skip)]
    pub pattern: SparsePattern,
    /// The block-sparse plan of the last call's lengths, reused by the next calls of the
    /// same lengths on the GPU kernels (clones of the module share it).
    #[module(skip)]
    pub block_masks: BlockMaskCache,
    /// Causal flag.
    pub causal: bool,
    /// Dropout on probabilities while training.
    pub dropout: AttentionDropout,
}

impl SparseAttention {
    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_cross(x.clone(), x.clone(), x, None)
    }

    /// Attention of `query` over `key`/`value` with an optional `[batch, seq_k]` key
    /// padding mask (`true` = padding).
    pub fn forward_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let h = self.projection.split(query, key, value);
        let (seq_q, seq_k) = (h.q.dims()[2], h.k.dims()[2]);
        let pattern = self.key_pattern(seq_q, seq_k);
        let out = pattern_attention(
            h.q,
            h.k,
            h.v,
            &pattern,
            &AttentionOptions::new().with_block_mask_cache(self.block_masks.clone()),
            key_padding,
            self.dropout.active(),
        );
        self.projection.merge(out)
    }

    /// Decoding: self-attention of the next tokens `x` (`[batch, new, d_model]`) over every
    /// token so far, whose projected keys and values `cache` holds (and then holds `x`'s
    /// too); equals the last `new` rows of [`forward`](Self::forward) over the whole
    /// sequence. Causal modules with a `Local` pattern (a rolling cache keeps the window's
    /// keys) or a `Strided` one (a growing cache: its global columns reach back to the
    /// start); `Random` layouts are drawn for whole lengths and do not decode.
    ///
    /// # Errors
    /// When the module is not causal, the pattern is `Random`, a `Strided` pattern is given
    /// a rolling cache, or `cache` does not fit the call (naming the values).
    pub fn try_forward_cache(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>, AttentionError> {
        match self.pattern {
            SparsePattern::Random { .. } => {
                return Err(AttentionError::Invalid(
                    "a random sparse pattern does not decode with a key/value cache: its block \
                     layout is drawn for whole lengths"
                        .into(),
                ))
            }
            SparsePattern::Strided { .. } if cache.is_rolling() => {
                return Err(AttentionError::Invalid(
                    "a strided sparse pattern needs every key (its global columns reach back to \
                     the start): use KvCache::new or with_capacity, not rolling"
                        .into(),
                ))
            }
            _ => {}
        }
        // Local and strided patterns do not depend on the lengths.
        let pattern = self.pattern.key_pattern(1, 1, self.causal)?;
        let masks = AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        };
        let options = AttentionOptions::new().with_block_mask_cache(self.block_masks.clone());
        decode(&self.projection, x, cache, &pattern, &options, &masks, None)
    }

    /// [`try_forward_cache`](Self::try_forward_cache), panicking on its error.
    pub fn forward_cache(&self, x: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        self.try_forward_cache(x, cache).or_panic()
    }

    /// Decoding several sequences of different lengths through a [`PagedKvCache`] (row `b`
    /// of `x`, `[ids.len(), new, d_model]`, continues sequence `ids[b]`): causal `Local` and
    /// `Strided` patterns. The cache pads shorter sequences at the front, which a band does
    /// not notice but strided columns would (they sit at absolute positions), so a
    /// `Strided` pattern runs one call per sequence length.
    ///
    /// # Errors
    /// When the module is not causal, the pattern is `Random`, an id is not held or given
    /// twice, `x` is not one row per id, or the call needs more pages than are free (naming
    /// the values); the cache is unchanged then.
    pub fn try_forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Result<Tensor<3>, AttentionError> {
        if let SparsePattern::Random { .. } = self.pattern {
            return Err(AttentionError::Invalid(
                "a random sparse pattern does not decode with a paged cache: its block layout \
                 is drawn for whole lengths"
                    .into(),
            ));
        }
        let masks = AttentionMasks {
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        };
        let options = AttentionOptions::new().with_block_mask_cache(self.block_masks.clone());
        let strided = matches!(self.pattern, SparsePattern::Strided { .. });
        // Local and strided patterns do not depend on the lengths.
        let pattern = self.pattern.key_pattern(1, 1, self.causal)?;
        decode_paged_grouped(
            &self.projection,
            x,
            cache,
            ids,
            &options,
            &masks,
            None,
            |total| Ok((if strided { total } else { 0 }, pattern.clone())),
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

    /// The key pattern used for the given lengths.
    pub fn key_pattern(&self, seq_q: usize, seq_k: usize) -> KeyPattern {
        self.pattern
            .key_pattern(seq_q, seq_k, self.causal)
            .or_panic()
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

    fn against_masked_reference(config: SparseAttentionConfig, seq_q: usize, seq_k: usize) {
        let module = config.init(&cpu());
        let q = randn([2, seq_q, config.d_model], &cpu());
        let kv = randn([2, seq_k, config.d_model], &cpu());
        let got = module.forward_cross(q.clone(), kv.clone(), kv.clone(), None);
        assert_finite(got.clone());
        let h = module.projection().split(q, kv.clone(), kv);
        let scale = 1.0 / (h.q.dims()[3] as f64).sqrt();
        let pattern = module.key_pattern(seq_q, seq_k);
        let (want, _) = reference_attention(h.q, h.k, h.v, &pattern, scale, None, None);
        assert_close(got, module.projection().merge(want), 2e-5);
    }

    /// Sequences of different lengths decoded together one token at a time: every row
    /// equals the forward over its sequence's prefix, for a band and for strided columns
    /// (whose lengths here differ by other than multiples of the stride); random refuses.
    #[test]
    fn paged_decoding_equals_the_forward_over_each_prefix() {
        for pattern in [
            SparsePattern::Local { window: 6 },
            SparsePattern::Strided {
                stride: 4,
                local: 1,
            },
        ] {
            let module = SparseAttentionConfig::new(16, 2)
                .with_causal(true)
                .with_pattern(pattern)
                .init(&cpu());
            check_paged_decoding(
                &[5, 6, 9, 9, 14],
                3,
                16,
                32,
                &|x, cache, ids| module.forward_paged(x, cache, ids),
                &|x| module.forward(x),
            );
        }
        let random = SparseAttentionConfig::new(16, 2)
            .with_causal(true)
            .with_pattern(SparsePattern::Random {
                density: 0.5,
                block: 4,
                seed: 1,
            })
            .init(&cpu());
        let mut cache = PagedKvCache::new(4, 4).unwrap();
        let id = cache.add_sequence();
        let err = random
            .try_forward_paged(randn([1, 2, 16], &cpu()), &mut cache, &[id])
            .unwrap_err()
            .to_string();
        assert!(err.contains("random"), "{err}");
        assert_eq!(cache.sequence_len(id), Some(0));
    }

    #[test]
    fn every_pattern_equals_exact_with_its_mask() {
        let patterns = [
            SparsePattern::Local { window: 8 },
            SparsePattern::Strided {
                stride: 7,
                local: 3,
            },
            SparsePattern::Random {
                density: 0.3,
                block: 8,
                seed: 11,
            },
        ];
        for pattern in patterns {
            for causal in [false, true] {
                let config = SparseAttentionConfig::new(32, 4)
                    .with_pattern(pattern)
                    .with_causal(causal);
                for (seq_q, seq_k) in [(1, 1), (17, 17), (97, 97), (13, 40)] {
                    against_masked_reference(config.clone(), seq_q, seq_k);
                }
            }
        }
        against_masked_reference(
            SparseAttentionConfig::new(32, 4)
                .with_n_kv_heads(Some(2))
                .with_pattern(SparsePattern::Strided {
                    stride: 5,
                    local: 2,
                }),
            33,
            33,
        );
    }

    #[test]
    fn strided_with_key_padding_equals_reference() {
        for causal in [false, true] {
            let module = SparseAttentionConfig::new(32, 4)
                .with_pattern(SparsePattern::Strided {
                    stride: 5,
                    local: 2,
                })
                .with_causal(causal)
                .init(&cpu());
            let q = randn([2, 300, 32], &cpu());
            let pad = burn::tensor::Tensor::<1, burn::tensor::Int>::arange(0..300, &cpu())
                .reshape([1, 300])
                .repeat_dim(0, 2)
                .remainder_scalar(3)
                .equal_elem(1);
            let got = module.forward_cross(q.clone(), q.clone(), q.clone(), Some(pad.clone()));
            let h = module.projection().split_self(q);
            let pattern = module.key_pattern(300, 300);
            let scale = 1.0 / 8f64.sqrt();
            let (want, _) = reference_attention(h.q, h.k, h.v, &pattern, scale, Some(pad), None);
            assert_close(got, module.projection().merge(want), 2e-5);
        }
    }

    #[test]
    fn pattern_is_sparse_and_seeded() {
        let module = SparseAttentionConfig::new(16, 2)
            .with_pattern(SparsePattern::Random {
                density: 0.1,
                block: 16,
                seed: 3,
            })
            .init(&cpu());
        let a = module.key_pattern(512, 512);
        assert_eq!(a, module.key_pattern(512, 512));
        let density = a.blocks.as_ref().unwrap().density();
        assert!(density > 0.05 && density < 0.25, "density {density}");
    }

    #[test]
    fn trains_and_round_trips() {
        let config = SparseAttentionConfig::new(16, 2).with_pattern(SparsePattern::Strided {
            stride: 4,
            local: 2,
        });
        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");

        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        let json = serde_json::to_string(&config).unwrap();
        let back: SparseAttentionConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.pattern, config.pattern);
    }

    #[test]
    fn bad_patterns_name_the_values() {
        let msg = |p: SparsePattern| p.validate().unwrap_err().to_string();
        assert!(msg(SparsePattern::Local { window: 0 }).contains("window"));
        assert!(msg(SparsePattern::Strided {
            stride: 0,
            local: 1
        })
        .contains("stride"));
        assert!(msg(SparsePattern::Random {
            density: 0.0,
            block: 4,
            seed: 0
        })
        .contains("0"));
        assert!(msg(SparsePattern::Random {
            density: 1.2,
            block: 4,
            seed: 0
        })
        .contains("1.2"));
    }
}
