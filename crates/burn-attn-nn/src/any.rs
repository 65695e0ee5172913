//! One module type over every mechanism, chosen by configuration: a model holds an
//! [`AnyAttention`] and switches attention by changing its [`AnyAttentionConfig`] (saved
//! with the model's config like any other).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use burn_attn_core::{AttentionError, DocumentIds, LinearAttentionState};

use crate::input::AttentionInput;
use crate::{
    AdaptiveSlidingWindowAttention, AdaptiveSlidingWindowAttentionConfig, CausalLinearAttention,
    CausalLinearAttentionConfig, FlashAttention, FlashAttentionConfig, HybridAttention,
    HybridAttentionConfig, KvCache, LearnedSparseAttention, LearnedSparseAttentionConfig,
    LinearAttention, LinearAttentionConfig, PagedKvCache, SequenceId, SlidingWindowAttention,
    SlidingWindowAttentionConfig, SparseAttention, SparseAttentionConfig,
};
use burn_attn_core::OrPanic;

/// What one layer of an [`AnyAttention`] keeps between decoding calls
/// ([`AnyAttention::forward_decode`]): the projected keys and values of the tokens so far
/// for the softmax mechanisms, the running state for causal linear attention. Start one
/// with [`AnyAttention::decode_state`]; a state serves one module and one batch of
/// sequences.
#[derive(Debug, Clone)]
pub enum DecodeState {
    /// Keys and values of the tokens so far.
    Keys(KvCache),
    /// Causal linear attention's state after the tokens so far (`None` before the first).
    Linear(Option<LinearAttentionState>),
}

/// The configuration of any attention mechanism of this crate.
#[derive(Config, Debug)]
pub enum AnyAttentionConfig {
    /// Exact attention ([`FlashAttention`]).
    Flash(FlashAttentionConfig),
    /// A fixed window ([`SlidingWindowAttention`]).
    SlidingWindow(SlidingWindowAttentionConfig),
    /// A fixed sparse pattern ([`SparseAttention`]).
    Sparse(SparseAttentionConfig),
    /// Keys picked by a learned gate ([`LearnedSparseAttention`]).
    LearnedSparse(LearnedSparseAttentionConfig),
    /// Linear attention over the whole sequence ([`LinearAttention`]).
    Linear(LinearAttentionConfig),
    /// Causal linear attention ([`CausalLinearAttention`]).
    CausalLinear(CausalLinearAttentionConfig),
    /// A window each token predicts ([`AdaptiveSlidingWindowAttention`]).
    AdaptiveWindow(AdaptiveSlidingWindowAttentionConfig),
    /// A mechanism picked by sequence length ([`HybridAttention`]).
    Hybrid(HybridAttentionConfig),
}

impl AnyAttentionConfig {
    /// The module of this configuration on `device`.
    ///
    /// # Panics
    /// As the chosen mechanism's `init` (invalid settings, named).
    pub fn init(&self, device: &Device) -> AnyAttention {
        match self {
            Self::Flash(c) => AnyAttention::Flash(c.init(device)),
            Self::SlidingWindow(c) => AnyAttention::SlidingWindow(c.init(device)),
            Self::Sparse(c) => AnyAttention::Sparse(c.init(device)),
            Self::LearnedSparse(c) => AnyAttention::LearnedSparse(c.init(device)),
            Self::Linear(c) => AnyAttention::Linear(c.init(device)),
            Self::CausalLinear(c) => AnyAttention::CausalLinear(c.init(device)),
            Self::AdaptiveWindow(c) => AnyAttention::AdaptiveWindow(c.init(device)),
            Self::Hybrid(c) => AnyAttention::Hybrid(c.init(device)),
        }
    }

    /// The mechanism's name, as the comparison tool prints it (`flash`, `sliding-window`,
    /// `sparse`, `learned-sparse`, `linear`, `causal-linear`, `adaptive-window`, `hybrid`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Flash(_) => "flash",
            Self::SlidingWindow(_) => "sliding-window",
            Self::Sparse(_) => "sparse",
            Self::LearnedSparse(_) => "learned-sparse",
            Self::Linear(_) => "linear",
            Self::CausalLinear(_) => "causal-linear",
            Self::AdaptiveWindow(_) => "adaptive-window",
            Self::Hybrid(_) => "hybrid",
        }
    }
}

/// Any attention mechanism of this crate as one module type (see [`AnyAttentionConfig`]).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyAttention {
    /// Exact attention.
    Flash(FlashAttention),
    /// A fixed window.
    SlidingWindow(SlidingWindowAttention),
    /// A fixed sparse pattern.
    Sparse(SparseAttention),
    /// Keys picked by a learned gate.
    LearnedSparse(LearnedSparseAttention),
    /// Linear attention.
    Linear(LinearAttention),
    /// Causal linear attention.
    CausalLinear(CausalLinearAttention),
    /// A window each token predicts.
    AdaptiveWindow(AdaptiveSlidingWindowAttention),
    /// A mechanism picked by sequence length.
    Hybrid(HybridAttention),
}

impl AnyAttention {
    /// Self-attention: `x` is `[batch, seq, d_model]`, as is the output.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Flash(m) => m.forward(x),
            Self::SlidingWindow(m) => m.forward(x),
            Self::Sparse(m) => m.forward(x),
            Self::LearnedSparse(m) => m.forward(x),
            Self::Linear(m) => m.forward(x),
            Self::CausalLinear(m) => m.forward(x),
            Self::AdaptiveWindow(m) => m.forward(x),
            Self::Hybrid(m) => m.forward(x),
        }
    }

    /// Whether the mechanism takes separate queries, keys and values
    /// ([`forward_cross`](Self::forward_cross)): all but causal linear, adaptive-window and
    /// hybrid attention, whose masks follow the query's own position in one sequence.
    pub fn supports_cross(&self) -> bool {
        !matches!(
            self,
            Self::CausalLinear(_) | Self::AdaptiveWindow(_) | Self::Hybrid(_)
        )
    }

    /// Cross-attention with optional key padding (`[batch, seq_k]`, `true` where hidden),
    /// as the chosen mechanism's `forward_cross`.
    ///
    /// # Panics
    /// Where the mechanism has no cross form ([`supports_cross`](Self::supports_cross) is
    /// false), naming it.
    pub fn forward_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        match self {
            Self::Flash(m) => m.forward_cross(query, key, value, key_padding),
            Self::SlidingWindow(m) => m.forward_cross(query, key, value, key_padding),
            Self::Sparse(m) => m.forward_cross(query, key, value, key_padding),
            Self::LearnedSparse(m) => m.forward_cross(query, key, value, key_padding),
            Self::Linear(m) => m.forward_cross(query, key, value, key_padding),
            Self::CausalLinear(_) | Self::AdaptiveWindow(_) | Self::Hybrid(_) => panic!(
                "burn-attn: {} attention has no cross form (queries, keys and values from one \
                 sequence only)",
                self.name()
            ),
        }
    }

    /// Whether the mechanism takes key padding on self-attention
    /// ([`forward_padded`](Self::forward_padded)): all but causal linear attention, whose
    /// running state has no mask.
    pub fn supports_padding(&self) -> bool {
        !matches!(self, Self::CausalLinear(_))
    }

    /// Self-attention with optional key padding (`[batch, seq]`, `true` where hidden): the
    /// chosen mechanism's `forward_padded`, or its `forward_cross` with `x` as query, key
    /// and value. Rows that see no key give 0.
    ///
    /// # Panics
    /// For a mask on causal linear attention
    /// ([`supports_padding`](Self::supports_padding) is false), naming it, and when the
    /// mask does not match `x`.
    pub fn forward_padded(&self, x: Tensor<3>, key_padding: Option<Tensor<2, Bool>>) -> Tensor<3> {
        match self {
            Self::AdaptiveWindow(m) => m.forward_padded(x, key_padding),
            Self::Hybrid(m) => m.forward_padded(x, key_padding),
            Self::CausalLinear(m) if key_padding.is_none() => m.forward(x),
            Self::CausalLinear(_) => panic!(
                "burn-attn: {} attention takes no key padding (its running state has no mask)",
                self.name()
            ),
            _ => self.forward_cross(x.clone(), x.clone(), x, key_padding),
        }
    }

    /// Attention with burn-nn's masks ([`AttentionInput`]), as the chosen mechanism's
    /// `forward_input`: flash and sliding window, the mechanisms that take an attention
    /// mask. Another mechanism is an error naming it (its key padding alone goes through
    /// [`forward_cross`](Self::forward_cross) or [`forward_padded`](Self::forward_padded)).
    ///
    /// # Panics
    /// When a mask's shape does not match the call, as the mechanism's `forward_input`.
    pub fn try_forward_input(&self, input: AttentionInput) -> Result<Tensor<3>, AttentionError> {
        match self {
            Self::Flash(m) => Ok(m.forward_input(input)),
            Self::SlidingWindow(m) => Ok(m.forward_input(input)),
            _ => Err(AttentionError::Invalid(format!(
                "{} attention takes no burn-nn attention input (flash and sliding-window do)",
                self.name()
            ))),
        }
    }

    /// [`try_forward_input`](Self::try_forward_input), panicking on its error too.
    pub fn forward_input(&self, input: AttentionInput) -> Tensor<3> {
        self.try_forward_input(input).or_panic()
    }

    /// Self-attention over packed sequences (document ids `[batch, seq]`, a token attends
    /// within its document only), as the chosen mechanism's `forward_packed`: flash,
    /// sliding window and hybrid. Another mechanism is an error naming it.
    ///
    /// # Panics
    /// When the ids do not match `x` or decrease, as the mechanism's `forward_packed`.
    pub fn try_forward_packed(
        &self,
        x: Tensor<3>,
        documents: impl Into<DocumentIds>,
    ) -> Result<Tensor<3>, AttentionError> {
        match self {
            Self::Flash(m) => Ok(m.forward_packed(x, documents)),
            Self::SlidingWindow(m) => Ok(m.forward_packed(x, documents)),
            Self::Hybrid(m) => Ok(m.forward_packed(x, documents)),
            _ => Err(AttentionError::Invalid(format!(
                "{} attention takes no document ids (flash, sliding-window and hybrid do)",
                self.name()
            ))),
        }
    }

    /// [`try_forward_packed`](Self::try_forward_packed), panicking on its error too.
    pub fn forward_packed(&self, x: Tensor<3>, documents: impl Into<DocumentIds>) -> Tensor<3> {
        self.try_forward_packed(x, documents).or_panic()
    }

    /// Decoding with a key/value cache ([`KvCache`]), as the chosen mechanism's
    /// `try_forward_cache`: the exact causal mechanisms (flash, sliding window, sparse with
    /// a local or strided pattern, hybrid). Another mechanism is an error naming it.
    pub fn try_forward_cache(
        &self,
        x: Tensor<3>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>, AttentionError> {
        match self {
            Self::Flash(m) => m.try_forward_cache(x, cache),
            Self::SlidingWindow(m) => m.try_forward_cache(x, cache),
            Self::Sparse(m) => m.try_forward_cache(x, cache),
            Self::Hybrid(m) => m.try_forward_cache(x, cache),
            _ => Err(AttentionError::Invalid(format!(
                "{} attention does not decode with a key/value cache (flash, sliding-window, \
                 sparse and hybrid do)",
                self.name()
            ))),
        }
    }

    /// Decoding several sequences of different lengths through a [`PagedKvCache`], as the
    /// chosen mechanism's `try_forward_paged`: flash, sliding window, sparse (local and
    /// strided) and hybrid. Another mechanism is an error naming it.
    pub fn try_forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        ids: &[SequenceId],
    ) -> Result<Tensor<3>, AttentionError> {
        match self {
            Self::Flash(m) => m.try_forward_paged(x, cache, ids),
            Self::SlidingWindow(m) => m.try_forward_paged(x, cache, ids),
            Self::Hybrid(m) => m.try_forward_paged(x, cache, ids),
            Self::Sparse(m) => m.try_forward_paged(x, cache, ids),
            _ => Err(AttentionError::Invalid(format!(
                "{} attention does not decode with a paged cache (flash, sliding-window, \
                 sparse and hybrid do)",
                self.name()
            ))),
        }
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

    /// Context-parallel self-attention over contiguous slices of one sequence on their
    /// peers' devices, as the chosen mechanism's `try_forward_context_parallel`: flash and
    /// sliding window. Another mechanism is an error naming it.
    pub fn try_forward_context_parallel(
        &self,
        slices: Vec<Tensor<3>>,
    ) -> Result<Vec<Tensor<3>>, AttentionError> {
        match self {
            Self::Flash(m) => m.try_forward_context_parallel(slices),
            Self::SlidingWindow(m) => m.try_forward_context_parallel(slices),
            _ => Err(AttentionError::Invalid(format!(
                "{} attention has no context-parallel form (flash and sliding-window do)",
                self.name()
            ))),
        }
    }

    /// [`try_forward_cache`](Self::try_forward_cache), panicking on its error.
    pub fn forward_cache(&self, x: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        self.try_forward_cache(x, cache).or_panic()
    }

    /// An empty decoding state for this mechanism: causal linear attention's state, a
    /// rolling [`KvCache`] for the sliding window (its window's keys only), a growing one
    /// otherwise.
    pub fn decode_state(&self) -> DecodeState {
        match self {
            Self::CausalLinear(_) => DecodeState::Linear(None),
            Self::SlidingWindow(_) => DecodeState::Keys(KvCache::rolling()),
            _ => DecodeState::Keys(KvCache::new()),
        }
    }

    /// Decoding with any mechanism that generates: the next tokens `x` (`[batch, new,
    /// d_model]`) over the tokens `state` holds, whose rows equal the last `new` rows of
    /// [`forward`](Self::forward) over the whole sequence; `state` then holds `x` too. The
    /// softmax mechanisms decode as their `try_forward_cache` (flash, sliding window,
    /// sparse with a local or strided pattern, hybrid; causal ones), causal linear attention
    /// through its running state. A mechanism that does not decode, or a state of the
    /// other kind, is an error naming them.
    pub fn try_forward_decode(
        &self,
        x: Tensor<3>,
        state: &mut DecodeState,
    ) -> Result<Tensor<3>, AttentionError> {
        match (self, state) {
            (Self::CausalLinear(m), DecodeState::Linear(held)) => {
                // A clone of the handles: a call that panics leaves the state as it was.
                let (out, next) = m.forward_with_state(x, held.clone());
                *held = Some(next);
                Ok(out)
            }
            (Self::CausalLinear(_), DecodeState::Keys(_)) => Err(AttentionError::Invalid(
                "causal-linear attention decodes with its running state \
                 (DecodeState::Linear), not a key/value cache"
                    .into(),
            )),
            (_, DecodeState::Keys(cache)) => self.try_forward_cache(x, cache),
            (_, DecodeState::Linear(_)) => Err(AttentionError::Invalid(format!(
                "{} attention decodes with a key/value cache (DecodeState::Keys), not a \
                 linear-attention state",
                self.name()
            ))),
        }
    }

    /// [`try_forward_decode`](Self::try_forward_decode), panicking on its error.
    pub fn forward_decode(&self, x: Tensor<3>, state: &mut DecodeState) -> Tensor<3> {
        self.try_forward_decode(x, state).or_panic()
    }

    /// The mechanism's name (see [`AnyAttentionConfig::name`]).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Flash(_) => "flash",
            Self::SlidingWindow(_) => "sliding-window",
            Self::Sparse(_) => "sparse",
            Self::LearnedSparse(_) => "learned-sparse",
            Self::Linear(_) => "linear",
            Self::CausalLinear(_) => "causal-linear",
            Self::AdaptiveWindow(_) => "adaptive-window",
            Self::Hybrid(_) => "hybrid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_padding_hides_keys, check_packed, cpu, max_abs_diff, randn};
    use crate::SparsePattern;

    /// Standard-normal input from seed `seed`.
    fn seeded_input(shape: [usize; 3], seed: u64, device: &Device) -> Tensor<3> {
        device.seed(seed);
        randn(shape, device)
    }

    fn configs(d: usize, heads: usize) -> Vec<AnyAttentionConfig> {
        vec![
            AnyAttentionConfig::Flash(FlashAttentionConfig::new(d, heads).with_causal(true)),
            AnyAttentionConfig::SlidingWindow(
                SlidingWindowAttentionConfig::new(d, heads).with_window(3),
            ),
            AnyAttentionConfig::Sparse(SparseAttentionConfig::new(d, heads).with_pattern(
                SparsePattern::Strided {
                    stride: 3,
                    local: 2,
                },
            )),
            AnyAttentionConfig::LearnedSparse(LearnedSparseAttentionConfig::new(d, heads)),
            AnyAttentionConfig::Linear(LinearAttentionConfig::new(d, heads)),
            AnyAttentionConfig::CausalLinear(CausalLinearAttentionConfig::new(d, heads)),
            AnyAttentionConfig::AdaptiveWindow(
                AdaptiveSlidingWindowAttentionConfig::new(d, heads)
                    .with_min_window(2)
                    .with_max_window(8),
            ),
            AnyAttentionConfig::Hybrid(HybridAttentionConfig::new(d, heads)),
        ]
    }

    /// The mechanism's own module built from the variant's config, with `any`'s weights
    /// (a variant of another kind panics).
    fn direct(
        config: &AnyAttentionConfig,
        any: &AnyAttention,
        device: &Device,
    ) -> Box<dyn Fn(Tensor<3>) -> Tensor<3>> {
        // Every variant: the config's own module, loaded with the variant's record.
        macro_rules! own {
            ($($variant:ident),*) => {
                match (config, any) {
                    $((AnyAttentionConfig::$variant(c), AnyAttention::$variant(m)) => {
                        let own = c.init(device).load_record(m.clone().into_record());
                        Box::new(move |x| own.forward(x))
                    })*
                    _ => panic!("{} built {}", config.name(), any.name()),
                }
            };
        }
        own!(
            Flash,
            SlidingWindow,
            Sparse,
            LearnedSparse,
            Linear,
            CausalLinear,
            AdaptiveWindow,
            Hybrid
        )
    }

    #[test]
    fn each_config_builds_its_mechanism_and_forwards_as_it() {
        let device = cpu();
        let (d, heads) = (16, 4);
        let x = seeded_input([2, 11, d], 5, &device);
        let mut names = Vec::new();
        for config in configs(d, heads) {
            let any = config.init(&device);
            let got = any.forward(x.clone());
            let want = direct(&config, &any, &device)(x.clone());
            assert_eq!(any.name(), config.name());
            names.push(any.name());
            assert_eq!(got.dims(), [2, 11, d]);
            let diff = max_abs_diff(got, want);
            assert!(
                diff == 0.0,
                "{}: differs from its own module by {diff}",
                config.name()
            );
            // The config round-trips through its serialised form.
            let json = serde_json::to_string(&config).unwrap();
            let back: AnyAttentionConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back.name(), config.name());
        }
        names.dedup();
        assert_eq!(names.len(), 8);
    }

    #[test]
    fn cross_attention_where_the_mechanism_has_it() {
        let device = cpu();
        let (d, heads) = (16, 4);
        let (q, kv) = (
            seeded_input([2, 5, d], 1, &device),
            seeded_input([2, 9, d], 2, &device),
        );
        for config in configs(d, heads) {
            let any = config.init(&device);
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                any.forward_cross(q.clone(), kv.clone(), kv.clone(), None)
            }));
            match run {
                Ok(out) => {
                    assert!(any.supports_cross(), "{}", any.name());
                    assert_eq!(out.dims(), [2, 5, d]);
                }
                Err(_) => assert!(!any.supports_cross(), "{} panicked", any.name()),
            }
        }
    }

    /// Key padding hides keys for every mechanism that takes it; without a mask the call
    /// is the plain forward; a mask on causal linear attention is refused, naming it.
    #[test]
    fn key_padding_where_the_mechanism_has_it() {
        let device = cpu();
        let (d, heads) = (16, 4);
        let x = seeded_input([2, 13, d], 4, &device);
        for config in configs(d, heads) {
            // Not causal: a causal flash never sees the padded last keys anyway.
            let config = match config {
                AnyAttentionConfig::Flash(c) => AnyAttentionConfig::Flash(c.with_causal(false)),
                other => other,
            };
            let any = config.init(&device);
            assert_eq!(
                max_abs_diff(any.forward_padded(x.clone(), None), any.forward(x.clone())),
                0.0,
                "{}",
                any.name()
            );
            if !any.supports_padding() {
                let pad = Tensor::<2, Bool>::full([2, 13], false, &device);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    any.forward_padded(x.clone(), Some(pad))
                }));
                let err = run.unwrap_err();
                let msg = err.downcast_ref::<String>().unwrap();
                assert!(msg.contains(any.name()), "{msg}");
                continue;
            }
            assert_padding_hides_keys(|x, pad| any.forward_padded(x, Some(pad)), [2, 13, d], 3);
        }
    }

    /// Document ids and burn-nn's input reach the mechanisms that take them (packed rows
    /// equal each document alone; the input without masks is the plain forward); the
    /// others are refused, naming them.
    #[test]
    fn packed_and_burn_nn_input_where_the_mechanism_has_them() {
        let device = cpu();
        let (d, heads) = (16, 4);
        let x = seeded_input([2, 13, d], 6, &device);
        let docs = Tensor::<2, burn::tensor::Int>::zeros([2, 13], &device);
        for config in configs(d, heads) {
            let any = config.init(&device);
            let takes_packed = matches!(
                any,
                AnyAttention::Flash(_) | AnyAttention::SlidingWindow(_) | AnyAttention::Hybrid(_)
            );
            let takes_input =
                matches!(any, AnyAttention::Flash(_) | AnyAttention::SlidingWindow(_));
            if takes_packed {
                check_packed(d, |x, docs| any.forward_packed(x, docs), |x| any.forward(x));
            } else {
                let err = any.try_forward_packed(x.clone(), docs.clone()).unwrap_err();
                assert!(err.to_string().contains(any.name()), "{err}");
            }
            match any.try_forward_input(AttentionInput::self_attn(x.clone())) {
                Ok(out) => {
                    assert!(takes_input, "{}", any.name());
                    assert_eq!(
                        max_abs_diff(out, any.forward(x.clone())),
                        0.0,
                        "{}",
                        any.name()
                    );
                }
                Err(e) => {
                    assert!(!takes_input, "{}: {e}", any.name());
                    assert!(e.to_string().contains(any.name()), "{e}");
                }
            }
        }
    }

    /// Flash and the sliding window run context-parallel slices to their own forward's
    /// rows; every other mechanism is refused, naming it.
    #[test]
    fn context_parallel_where_the_mechanism_has_it() {
        let device = cpu();
        let (d, heads) = (16, 4);
        let x = seeded_input([1, 9, d], 5, &device);
        for config in configs(d, heads) {
            let any = config.init(&device);
            let slices = vec![
                x.clone().slice([0..1, 0..4, 0..d]),
                x.clone().slice([0..1, 4..9, 0..d]),
            ];
            match any.try_forward_context_parallel(slices) {
                Ok(outs) => {
                    assert!(
                        matches!(any.name(), "flash" | "sliding-window"),
                        "{}",
                        any.name()
                    );
                    let got = Tensor::cat(outs, 1);
                    assert!(
                        max_abs_diff(got, any.forward(x.clone())) < 1e-5,
                        "{}",
                        any.name()
                    );
                }
                Err(err) => {
                    let err = err.to_string();
                    assert!(err.contains(any.name()), "{}: {err}", any.name());
                }
            }
        }
    }

    /// Flash (causal) decodes through its cache as its own module does; the sliding window,
    /// sparse and hybrid configs of the test are not causal and mechanisms without a cache
    /// form are refused: both name the reason.
    #[test]
    fn decoding_where_the_mechanism_has_it() {
        let device = cpu();
        let (d, heads) = (16, 4);
        let x = seeded_input([1, 6, d], 3, &device);
        for config in configs(d, heads) {
            let any = config.init(&device);
            let mut cache = KvCache::new();
            match any.try_forward_cache(x.clone(), &mut cache) {
                Ok(out) => {
                    assert_eq!(any.name(), "flash");
                    assert_eq!(max_abs_diff(out, any.forward(x.clone())), 0.0);
                }
                Err(err) => {
                    let err = err.to_string();
                    let why = if matches!(any.name(), "sliding-window" | "sparse" | "hybrid") {
                        "causal"
                    } else {
                        any.name()
                    };
                    assert!(err.contains(why), "{}: {err}", any.name());
                }
            }
        }
    }

    /// Every mechanism that generates decodes through one state type, token by token and
    /// in chunks, to its own forward's rows; the others, and a state of the other kind,
    /// are refused, naming them.
    #[test]
    fn one_decoding_state_for_every_mechanism_that_generates() {
        let device = cpu();
        let (d, heads, seq) = (16, 4, 9);
        let x = seeded_input([2, seq, d], 8, &device);
        let causal = |config: AnyAttentionConfig| match config {
            AnyAttentionConfig::Flash(c) => AnyAttentionConfig::Flash(c.with_causal(true)),
            AnyAttentionConfig::SlidingWindow(c) => {
                AnyAttentionConfig::SlidingWindow(c.with_causal(true))
            }
            AnyAttentionConfig::Sparse(c) => AnyAttentionConfig::Sparse(c.with_causal(true)),
            AnyAttentionConfig::Hybrid(c) => AnyAttentionConfig::Hybrid(c.with_causal(true)),
            other => other,
        };
        let mut decoded = Vec::new();
        for config in configs(d, heads).into_iter().map(causal) {
            let any = config.init(&device);
            let whole = any.forward(x.clone());
            for chunk in [1, 4] {
                let mut state = any.decode_state();
                let outs: Result<Vec<_>, _> = (0..seq)
                    .step_by(chunk)
                    .map(|s| {
                        let part = x.clone().narrow(1, s, chunk.min(seq - s));
                        any.try_forward_decode(part, &mut state)
                    })
                    .collect();
                match outs {
                    Ok(outs) => {
                        let diff = max_abs_diff(Tensor::cat(outs, 1), whole.clone());
                        assert!(diff < 1e-5, "{}, chunks of {chunk}: {diff}", any.name());
                        decoded.push(any.name());
                    }
                    Err(e) => assert!(e.to_string().contains(any.name()), "{e}"),
                }
            }
            // A state of the other kind.
            let mut other = match any.decode_state() {
                DecodeState::Linear(_) => DecodeState::Keys(KvCache::new()),
                DecodeState::Keys(_) => DecodeState::Linear(None),
            };
            let err = any.try_forward_decode(x.clone(), &mut other).unwrap_err();
            assert!(err.to_string().contains("DecodeState::"), "{err}");
        }
        decoded.dedup();
        assert_eq!(
            decoded,
            [
                "flash",
                "sliding-window",
                "sparse",
                "causal-linear",
                "hybrid"
            ],
            "the mechanisms that decode"
        );
    }
}
