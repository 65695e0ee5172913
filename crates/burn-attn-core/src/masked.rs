//! Attention under every mask a call can carry: a [`KeyPattern`] (band, causal rule,
//! strided columns, block layout), key padding, document ids (packed sequences), score
//! terms (a per-key bias, a soft window edge) and dropout, and the one place that routes such a call: the band kernels when the mask is a
//! plain band, the block-sparse kernels on CubeCL devices otherwise, the tiled tensor ops
//! where no kernel takes it.

use burn::tensor::{Bool, Int, Tensor};

use crate::backend::{banded, same_dtype};
use crate::block_mask_cache::DocumentPlans;
use crate::dispatch::{serve_tiled, Decline, Implementation, Pass};
use crate::error::OrPanic;
use crate::options::AttentionOptions;
use crate::pattern::KeyPattern;
use crate::score_terms::{check_score_terms, ScoreTerms, SoftEdge};
use crate::shape::AttentionShape;
use crate::tiled::{tiled_attention, TiledSpec, DEFAULT_TILE};
use crate::AttentionError;

/// Document ids of packed sequences: query `i` of batch `b` sees key `j` only when
/// `queries[b, i] == keys[b, j]`. Ids must not decrease along a sequence (each document is
/// one contiguous run), so a batch of variable-length sequences needs no padding.
///
/// Every call checks the order (which reads a flag back from the device, and so waits for
/// the queue), unless the ids were checked once with [`DocumentIds::checked`]: do that
/// when one batch's ids serve several calls (every layer of a model).
///
/// The ids keep the block-sparse plans the kernels' calls build from them (their cover,
/// and the lists of calls with no other mask, per kernel grid and pattern), shared by
/// clones: pass one batch's ids to every layer and only the first call on each grid
/// builds a plan, as FlexAttention's block mask is built once per batch. They are freed
/// with the last clone.
#[derive(Debug, Clone)]
pub struct DocumentIds {
    queries: Tensor<2, Int>,
    keys: Tensor<2, Int>,
    ordered: bool,
    plans: DocumentPlans,
}

impl DocumentIds {
    /// Ids of queries (`[batch, seq_q]`) and keys (`[batch, seq_k]`), checked by each call.
    pub fn new(queries: Tensor<2, Int>, keys: Tensor<2, Int>) -> Self {
        Self {
            queries,
            keys,
            ordered: false,
            plans: DocumentPlans::default(),
        }
    }

    /// The ids of self-attention (`[batch, seq]`): queries and keys are the same positions.
    pub fn self_attention(ids: Tensor<2, Int>) -> Self {
        Self::new(ids.clone(), ids)
    }

    /// The same ids with their order checked now, once: calls then skip the check.
    ///
    /// # Errors
    /// When ids decrease along a sequence, naming the batch and positions.
    pub fn checked(self) -> Result<Self, AttentionError> {
        crate::block_mask::check_documents_order(&self.queries, &self.keys)?;
        Ok(Self {
            ordered: true,
            ..self
        })
    }

    /// The queries' ids, `[batch, seq_q]`.
    pub fn queries(&self) -> &Tensor<2, Int> {
        &self.queries
    }

    /// The keys' ids, `[batch, seq_k]`.
    pub fn keys(&self) -> &Tensor<2, Int> {
        &self.keys
    }

    /// Whether the order was checked ([`DocumentIds::checked`]).
    pub fn is_checked(&self) -> bool {
        self.ordered
    }

    /// How many kernel grids the ids hold block-sparse plans for (0 until a call on the
    /// block-sparse kernels; the CPU backends build none).
    pub fn held_plans(&self) -> usize {
        self.plans.held_grids()
    }

    /// On `grid` and `device`, the ids' block cover, the ids in i32 and, with `lists` (a
    /// pattern and how to build its lists from the ids' cover), the lists of a call whose
    /// only other mask is that pattern: held by the ids, or built and held.
    #[cfg_attr(not(feature = "cube"), allow(dead_code))]
    pub(crate) fn plan(
        &self,
        grid: crate::BlockGrid,
        device: &burn::tensor::Device,
        lists: Option<(&KeyPattern, &dyn Fn(crate::BlockCover) -> crate::BlockMask)>,
    ) -> (
        crate::BlockCover,
        [Tensor<2, Int>; 2],
        Option<crate::BlockMask>,
    ) {
        self.plans
            .plan(&self.queries, &self.keys, grid, device, lists)
    }
}

impl From<Tensor<2, Int>> for DocumentIds {
    /// The ids of self-attention ([`DocumentIds::self_attention`]).
    fn from(ids: Tensor<2, Int>) -> Self {
        Self::self_attention(ids)
    }
}

/// The masks of a call beside its [`KeyPattern`]. `Default`: none, no dropout.
#[derive(Debug, Clone, Default)]
pub struct AttentionMasks {
    /// `[batch, seq_k]`, `true` where the key is padding and hidden from every query.
    pub key_padding: Option<Tensor<2, Bool>>,
    /// Document ids (packed sequences).
    pub documents: Option<DocumentIds>,
    /// `[batch, seq_q, seq_k]`, `true` where query `i` must not see key `j` (burn-nn's
    /// `mask_attn`): any mask, at O(seq_q * seq_k) memory. The kernels read it on the blocks
    /// it leaves partly visible and skip the blocks it hides whole.
    pub attention_mask: Option<Tensor<3, Bool>>,
    /// A bias added to the scaled scores of each key, `[batch or 1, heads or 1, seq_k]`
    /// (query heads; learned sparsity's gate); `-inf` hides a key. Differentiable.
    pub key_bias: Option<Tensor<3>>,
    /// A soft window edge per query (the adaptive window). Differentiable in its reach.
    pub soft_edge: Option<SoftEdge>,
    /// ALiBi slopes, one per query head: `-slope_h * |j - i - (seq_k - seq_q)|` adds to the
    /// scaled score of query `i`, key `j` (a constant: no gradient).
    pub alibi: Option<Vec<f32>>,
    /// A tanh softcap (Gemma 2's): the scaled scores become `softcap * tanh(s / softcap)`
    /// before the other terms; finite and positive. Differentiable (in the scores).
    pub softcap: Option<f64>,
    /// Any additive bias on the scaled scores, `[batch or 1, heads or 1, seq_q, seq_k]`
    /// (query heads; relative-position biases, T5-style; `-inf` hides a key). Differentiable.
    /// It costs O(seq_q * seq_k) memory, and no kernel reads it: such calls take the tiled
    /// tensor ops on every backend (the dispatch log says why). Prefer `key_bias`,
    /// `soft_edge` or `alibi` where they express the bias: the kernels evaluate those.
    pub score_bias: Option<Tensor<4>>,
    /// Probability of dropping an attention probability, in `[0, 1)`; applies only while
    /// the backend tracks gradients (training).
    pub dropout: f64,
}

impl AttentionMasks {
    /// Whether the call changes scores beyond hiding them (a key bias, a soft edge, ALiBi,
    /// a softcap, a score bias).
    pub(crate) fn has_score_terms(&self) -> bool {
        self.key_bias.is_some()
            || self.soft_edge.is_some()
            || self.alibi.is_some()
            || self.softcap.is_some()
            || self.score_bias.is_some()
    }
}

/// Whether calls on `device` can take the block-sparse kernels (a CubeCL device: CUDA or
/// WGPU), for modules whose best formulation differs between the kernels and the tiled
/// tensor ops (learned sparsity gathers its selected keys for the tiled ops).
pub fn block_sparse_kernels(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "cube")]
    return crate::backend::sparse::cube_caps(device).is_some();
    #[cfg(not(feature = "cube"))]
    {
        let _ = device;
        false
    }
}

/// Exact attention over `pattern` under `masks`: the band kernels when the call is a
/// plain band without masks; for strided columns with no mask but key padding and
/// dropout, the band call plus calls over the gathered columns (merged by log-sum-exp),
/// each on the band kernels, or with key padding or dropout on the block-sparse kernels;
/// the block-sparse kernels (forward and backward) for other strided calls, block layouts,
/// key padding, document ids, attention masks and dropout in training on CubeCL devices
/// (`FlashMmaSparse` on CUDA f16/bf16, `FlashUnitSparse` elsewhere); the tiled tensor ops
/// otherwise (every such call on the CPU backends). Score terms (`key_bias`, `soft_edge`)
/// get gradients on every path.
///
/// Dropout on the kernels draws its mask from a counter-based hash of a seed taken from
/// the device's random generator, not from Burn's dropout: the same probability, another
/// mask than the tiled path's for the same seed. Document ids are checked (one value read
/// back per call).
///
/// # Panics
/// With a message naming the values when shapes do not match, ids decrease or options are
/// invalid ([`try_masked_attention`] returns the error instead).
pub fn masked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &AttentionMasks,
) -> Tensor<4> {
    try_masked_attention(q, k, v, pattern, options, masks).or_panic()
}

/// [`masked_attention`] returning bad input as an [`AttentionError`] instead of panicking.
pub fn try_masked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &AttentionMasks,
) -> Result<Tensor<4>, AttentionError> {
    let shape = AttentionShape::of(&q, &k, &v)?;
    same_dtype(&q, &k, &v)?;
    options.validate()?;
    pattern.validate(shape.seq_q, shape.seq_k)?;
    check_masks(masks, &shape)?;
    let dropout = masks.dropout;
    let dropout_active = dropout > 0.0 && q.is_autodiff();
    let plain_band = pattern.stride.is_none() && pattern.blocks.is_none();
    let unmasked = masks.key_padding.is_none()
        && masks.documents.is_none()
        && masks.attention_mask.is_none()
        && !masks.has_score_terms();
    if plain_band && unmasked && !dropout_active {
        let options = AttentionOptions {
            causal: pattern.causal || options.causal,
            window: pattern.window.intersect(options.window),
            ..options.clone()
        };
        return Ok(banded(q, k, v, &shape, &options).0);
    }
    let mut pattern = pattern.clone();
    pattern.causal |= options.causal;
    pattern.window = pattern.window.intersect(options.window);
    // Strided columns split into band calls, which take key padding and dropout (on the
    // block-sparse kernels) but no other mask.
    let split_masks =
        masks.documents.is_none() && masks.attention_mask.is_none() && !masks.has_score_terms();
    if split_masks
        && crate::strided::splits(&pattern, shape.seq_q, shape.seq_k)
        && crate::backend::extension_serves_tensor(&q)
    {
        let split = crate::strided::SplitMasks {
            key_padding: masks.key_padding.clone(),
            dropout: dropout_active.then_some(dropout),
        };
        let out = crate::strided::strided_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &pattern,
            options,
            &split,
        )?;
        if let Some(out) = out {
            return Ok(out);
        }
    }
    let why = if dropout_active {
        "dropout"
    } else if pattern.stride.is_some() {
        "strided columns"
    } else if pattern.blocks.is_some() {
        "block layouts"
    } else if masks.documents.is_some() {
        "document ids"
    } else if masks.attention_mask.is_some() {
        "attention masks"
    } else if masks.score_bias.is_some() {
        "a score bias (no kernel reads one)"
    } else if masks.has_score_terms() {
        "score terms"
    } else {
        "key padding"
    };
    #[cfg_attr(not(feature = "cube"), allow(unused_mut))]
    let mut declined: Vec<_> = [Implementation::FlashMma, Implementation::FlashUnit]
        .map(|imp| (imp, Decline::Mask(why)))
        .to_vec();
    #[cfg(feature = "cube")]
    if masks.score_bias.is_none() {
        match crate::backend::sparse::sparse_kernel_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &pattern,
            options,
            masks,
            dropout_active.then_some(dropout),
        ) {
            Ok(out) => return Ok(out),
            Err(sparse_declined) => declined.extend(sparse_declined),
        }
    }
    let mut spec = TiledSpec::new(&pattern, options.scale_for(shape.head_dim))
        .with_tile(options.tile.unwrap_or(DEFAULT_TILE));
    spec.key_padding = masks.key_padding.clone();
    spec.documents = masks
        .documents
        .as_ref()
        .map(|d| (d.queries.clone(), d.keys.clone()));
    spec.attention_mask = masks.attention_mask.clone();
    spec.dropout = dropout;
    spec.softcap = masks.softcap;
    let terms = ScoreTerms {
        key_bias: masks.key_bias.as_ref(),
        soft_edge: masks.soft_edge.as_ref(),
        alibi: masks.alibi.as_deref(),
        score_bias: masks.score_bias.as_ref(),
        offset: shape.seq_k as i64 - shape.seq_q as i64,
        device: q.device(),
    };
    if terms.any() {
        spec.bias = Some(&terms);
    }
    Ok(serve_tiled(Pass::Forward, options, declined, || {
        tiled_attention(q, k, v, &spec).0
    }))
}

/// The masks' shapes, dropout's range and the document ids' order, against the call.
fn check_masks(masks: &AttentionMasks, shape: &AttentionShape) -> Result<(), AttentionError> {
    if !(0.0..1.0).contains(&masks.dropout) {
        return Err(AttentionError::Invalid(format!(
            "dropout {} (takes 0 <= dropout < 1)",
            masks.dropout
        )));
    }
    let expect = |what: &'static str, dims: [usize; 2], len: usize, side: &str| {
        if dims == [shape.batch, len] {
            Ok(())
        } else {
            Err(AttentionError::Shape {
                what,
                expected: format!("[{}, {len}] (batch, {side})", shape.batch),
                got: dims.to_vec(),
            })
        }
    };
    if let Some(pad) = &masks.key_padding {
        expect("key padding mask", pad.dims(), shape.seq_k, "seq_k")?;
    }
    if let Some(mask) = &masks.attention_mask {
        let dims = mask.dims();
        if dims != [shape.batch, shape.seq_q, shape.seq_k] {
            return Err(AttentionError::Shape {
                what: "attention mask",
                expected: format!(
                    "[{}, {}, {}] (batch, seq_q, seq_k)",
                    shape.batch, shape.seq_q, shape.seq_k
                ),
                got: dims.to_vec(),
            });
        }
    }
    if let Some(docs) = &masks.documents {
        expect(
            "query document ids",
            docs.queries.dims(),
            shape.seq_q,
            "seq_q",
        )?;
        expect("key document ids", docs.keys.dims(), shape.seq_k, "seq_k")?;
        if !docs.ordered {
            crate::block_mask::check_documents_order(&docs.queries, &docs.keys)?;
        }
    }
    if let Some(cap) = masks.softcap {
        // Checked in f32, where the kernels and the terms apply it.
        let in_f32 = cap as f32;
        if !(in_f32.is_finite() && in_f32 > 0.0) {
            return Err(AttentionError::Invalid(format!(
                "softcap {cap} (takes a value finite and > 0 in f32)"
            )));
        }
    }
    if let Some(bias) = &masks.score_bias {
        let dims = bias.dims();
        let fits = (dims[0] == 1 || dims[0] == shape.batch)
            && (dims[1] == 1 || dims[1] == shape.heads)
            && dims[2..] == [shape.seq_q, shape.seq_k];
        if !fits {
            return Err(AttentionError::Shape {
                what: "score bias",
                expected: format!(
                    "[{} or 1, {} or 1, {}, {}] (batch, query heads, seq_q, seq_k)",
                    shape.batch, shape.heads, shape.seq_q, shape.seq_k
                ),
                got: dims.to_vec(),
            });
        }
    }
    check_score_terms(
        masks.key_bias.as_ref(),
        masks.soft_edge.as_ref(),
        masks.alibi.as_deref(),
        shape,
    )
}
