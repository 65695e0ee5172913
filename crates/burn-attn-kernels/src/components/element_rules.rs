//! Which keys of a partially visible block a query sees under the rules a block-sparse call
//! combines: `causal && (band || strided column) && active layout block && key not padding
//! && same document && not hidden by a dense mask` (the scalar definition is burn-attn-core's
//! `KeyPattern::visible`, with key padding, document ids and a dense `[batch, seq_q, seq_k]`
//! mask), and which probabilities attention dropout drops. Each
//! rule past the band is a comptime switch, so a call pays only for the rules it has.
//!
//! Score terms add to the scaled scores of every visited tile, with gradients from the
//! backward: a per-key bias `[batch, heads, seq_k]` (learned sparsity's gate) and a soft
//! window edge from a per-query reach `[batch, heads, seq_q]` (the adaptive window):
//! `ln(clamp((reach_i - |j - (i + offset)|) / ramp + 1/2, 0, 1))`, hidden where the weight
//! is 0; and ALiBi, `-slope_h * |j - (i + offset)|` with one slope per query head (no
//! gradient).
//!
//! Dropout is counter-based: element `(b, h, i, j)` is dropped when [`dropout_hash`] of the
//! call's seed and its position falls below the threshold `p * 2^32`, so the backward
//! regenerates the forward's mask from the same seed without storing it.

use cubecl::prelude::*;

/// The runtime values of the rules (positions in `i32`: query `i` is aligned with key `i +
/// offset`).
#[derive(CubeLaunch, CubeType, Clone, Copy)]
pub struct ElementRules {
    /// `seq_k - seq_q`.
    pub offset: i32,
    /// Keys visible left and right of the aligned position (the band; `seq_q + seq_k`
    /// for an unbounded side).
    pub left: i32,
    pub right: i32,
    /// Keys visible right of the aligned position under the causal rule (0 when causal,
    /// unbounded otherwise); applies to strided columns too.
    pub causal_right: i32,
    /// Every key `j` with `j % stride == 0` is visible besides the band (0: none).
    pub stride: i32,
    /// Query rows and key columns per block of the layout, and its key blocks per row.
    pub layout_rows: u32,
    pub layout_cols: u32,
    pub layout_k_blocks: u32,
    /// Dropout: hashes below this are dropped; kept probabilities are scaled by
    /// `keep_scale` (`1 / (1 - p)`); `heads` is the query heads, so a (batch, head) pair is
    /// `b * heads + h` in the hash.
    pub drop_threshold: u32,
    pub keep_scale: f32,
    pub heads: u32,
    /// Width of the soft edge, in keys (positive; 1 without a soft edge).
    pub ramp: f32,
    /// The tanh softcap of the scaled scores, `softcap * tanh(s / softcap)` (positive; 1
    /// without one).
    pub softcap: f32,
}

/// Which rules past the band and the causal rule a call has (comptime).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, Default)]
pub struct RuleSet {
    /// Strided columns.
    pub stride: bool,
    /// A block layout (`[q_blocks * k_blocks]`, row-major and contiguous; nonzero where active).
    pub layout: bool,
    /// Key padding (`[batch, seq_k]`, nonzero where the key is padding).
    pub padding: bool,
    /// Document ids (`[batch, seq_q]` and `[batch, seq_k]`).
    pub documents: bool,
    /// Attention dropout (a 1-element seed tensor).
    pub dropout: bool,
    /// A dense mask (`[batch, seq_q, seq_k]`, nonzero where hidden).
    pub dense: bool,
    /// A per-key score bias (`[batch or 1, heads or 1, seq_k]`, f32).
    pub key_bias: bool,
    /// A soft window edge from a per-query reach (`[batch or 1, heads or 1, seq_q]`, f32).
    pub soft_edge: bool,
    /// ALiBi: `-slope[h] * distance` (`[heads]` slopes, f32).
    pub alibi: bool,
    /// A tanh softcap of the scaled scores (before the other terms).
    pub softcap: bool,
}

impl RuleSet {
    /// Whether the call adds score terms (every visited tile then takes the rules).
    pub fn has_terms(&self) -> bool {
        self.key_bias || self.soft_edge || self.alibi || self.softcap
    }
}

/// Where `(batch, head, position)` is in `t` (`[batch or 1, heads or 1, positions]`).
#[cube]
fn term_at(t: &Tensor<f32>, batch: usize, head: usize, position: usize) -> usize {
    let b = select(t.shape(0) == 1, 0, batch);
    let h = select(t.shape(1) == 1, 0, head);
    b * t.stride(0) + h * t.stride(1) + position * t.stride(2)
}

/// MurmurHash3's 32-bit finaliser.
#[cube]
fn mix32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h *= 0x85eb_ca6bu32;
    h ^= h >> 13;
    h *= 0xc2b2_ae35u32;
    h ^= h >> 16;
    h
}

/// The dropout hash of element `(i, j)` of the (batch, head) pair `pair` (`b * heads + h`):
/// `mix32(mix32(mix32(seed ^ pair) ^ i) ^ j)` in wrapping 32-bit arithmetic, as the host's
/// `plan::dropout_hash` (the tests check the two agree through the kernels).
#[cube]
pub fn dropout_hash(seed: u32, pair: u32, i: u32, j: u32) -> u32 {
    mix32(mix32(mix32(seed ^ pair) ^ i) ^ j)
}

#[cube]
impl ElementRules {
    /// Whether query `i` (`< seq_q`) of batch `b` must not see key `j` (`< seq_k`).
    #[allow(clippy::too_many_arguments)]
    pub fn hides(
        &self,
        b: usize,
        i: usize,
        j: usize,
        layout: &Tensor<i32>,
        padding: &Tensor<i32>,
        doc_q: &Tensor<i32>,
        doc_k: &Tensor<i32>,
        dense: &Tensor<i32>,
        #[comptime] rules: RuleSet,
    ) -> bool {
        let d = j as i32 - (i as i32 + self.offset);
        let mut seen = d >= -self.left && d <= self.right;
        if comptime!(rules.stride) {
            seen = seen || (j as i32) % self.stride == 0;
        }
        seen = seen && d <= self.causal_right;
        if comptime!(rules.layout) {
            let at =
                (i as u32 / self.layout_rows) * self.layout_k_blocks + j as u32 / self.layout_cols;
            seen = seen && layout[at as usize] != 0;
        }
        if comptime!(rules.padding) {
            seen = seen && padding[b * padding.stride(0) + j * padding.stride(1)] == 0;
        }
        if comptime!(rules.documents) {
            seen = seen
                && doc_q[b * doc_q.stride(0) + i * doc_q.stride(1)]
                    == doc_k[b * doc_k.stride(0) + j * doc_k.stride(1)];
        }
        if comptime!(rules.dense) {
            seen =
                seen && dense[b * dense.stride(0) + i * dense.stride(1) + j * dense.stride(2)] == 0;
        }
        !seen
    }
}

#[cube]
impl ElementRules {
    /// Whether dropout drops the probability of query `i`, key `j` of batch `b`, query
    /// head `h` (the seed is `seed[0]`).
    pub fn drops(&self, b: usize, h: usize, i: usize, j: usize, seed: &Tensor<i32>) -> bool {
        let pair = (b * self.heads as usize + h) as u32;
        let hash = dropout_hash(seed[0] as u32, pair, i as u32, j as u32);
        hash < self.drop_threshold
    }

    /// The rules' verdict on query `i`, key `j` of batch `b`, query head `h`: hidden past
    /// `seq_q` or `seq_k`, where [`ElementRules::hides`] says so or a score term hides the
    /// key; dropped where dropout drops it (with `rules.dropout`); with score terms, the
    /// bias and slope of [`ElementRules::term`] (0 past the sequence ends).
    #[allow(clippy::too_many_arguments)]
    pub fn element(
        &self,
        b: usize,
        h: usize,
        i: usize,
        j: usize,
        seq_q: usize,
        seq_k: usize,
        layout: &Tensor<i32>,
        padding: &Tensor<i32>,
        doc_q: &Tensor<i32>,
        doc_k: &Tensor<i32>,
        dense: &Tensor<i32>,
        seed: &Tensor<i32>,
        key_bias: &Tensor<f32>,
        reach: &Tensor<f32>,
        slopes: &Tensor<f32>,
        #[comptime] rules: RuleSet,
    ) -> ElementVerdict {
        let mut verdict = ElementVerdict {
            hidden: true,
            dropped: false,
            bias: f32::new(0.0),
            slope: f32::new(0.0),
        };
        if i < seq_q && j < seq_k {
            verdict.hidden = self.hides(b, i, j, layout, padding, doc_q, doc_k, dense, rules);
            if comptime!(rules.dropout) {
                verdict.dropped = self.drops(b, h, i, j, seed);
            }
            if comptime!(rules.has_terms()) {
                let term = self.term(b, h, i, j, key_bias, reach, slopes, rules);
                verdict.bias = term.bias;
                verdict.slope = term.slope;
                verdict.hidden = verdict.hidden || term.hidden;
            }
        }
        verdict
    }

    /// Fills a unit's `rows x cols` register tile of flags (row-major): the hidden bit (1)
    /// and the dropped bit (2) of [`ElementRules::element`]; with score terms, `bias` and
    /// `slope` in the same order (1-element placeholders without terms). Register row `a` is
    /// query `i0 + a * row_step` and column `c` key `j0 + c * col_step`, or with
    /// `keys_major` row `a` is key `j0 + a * row_step` and column `c` query `i0 + c *
    /// col_step` (the transposed tiles of a key-major pass); `h` is the query head.
    #[allow(clippy::too_many_arguments)]
    pub fn hide_tile(
        &self,
        hide: &mut Array<u32>,
        bias: &mut Array<f32>,
        slope: &mut Array<f32>,
        b: usize,
        h: usize,
        i0: usize,
        j0: usize,
        seq_q: usize,
        seq_k: usize,
        layout: &Tensor<i32>,
        padding: &Tensor<i32>,
        doc_q: &Tensor<i32>,
        doc_k: &Tensor<i32>,
        dense: &Tensor<i32>,
        seed: &Tensor<i32>,
        key_bias: &Tensor<f32>,
        reach: &Tensor<f32>,
        slopes: &Tensor<f32>,
        #[comptime] rules: RuleSet,
        #[comptime] rows: usize,
        #[comptime] row_step: usize,
        #[comptime] cols: usize,
        #[comptime] col_step: usize,
        #[comptime] keys_major: bool,
    ) {
        #[unroll]
        for a in 0..rows {
            #[unroll]
            for c in 0..cols {
                let mut i = i0 + a * row_step;
                let mut j = j0 + c * col_step;
                if comptime!(keys_major) {
                    i = i0 + c * col_step;
                    j = j0 + a * row_step;
                }
                let at = a * cols + c;
                let verdict = self.element(
                    b, h, i, j, seq_q, seq_k, layout, padding, doc_q, doc_k, dense, seed, key_bias,
                    reach, slopes, rules,
                );
                hide[at] = select(verdict.hidden, 1u32, 0u32) | select(verdict.dropped, 2u32, 0u32);
                if comptime!(rules.has_terms()) {
                    bias[at] = verdict.bias;
                    slope[at] = verdict.slope;
                }
            }
        }
    }
}

/// What the rules make of one element: hidden (no probability), dropped by dropout, and
/// its score terms' bias and the bias's derivative by the query's reach.
#[derive(CubeType, Clone, Copy)]
pub struct ElementVerdict {
    pub hidden: bool,
    pub dropped: bool,
    pub bias: f32,
    pub slope: f32,
}

/// The score terms of one element: the bias added to its scaled score, the bias's
/// derivative by the query's reach, and whether a term hides the key.
#[derive(CubeType, Clone, Copy)]
pub struct ElementTerm {
    pub bias: f32,
    pub slope: f32,
    pub hidden: bool,
}

#[cube]
impl ElementRules {
    /// The score terms of query `i` (`< seq_q`), key `j` (`< seq_k`) of batch `b`, query
    /// head `h`: `key_bias[b, h, j]` (below -1e30, i.e. `-inf`, hides the key; NaN stays
    /// NaN) plus the soft edge's `ln(weight)`, weight `min((reach_i - |j - (i + offset)|) /
    /// ramp + 1/2, 1)`, which hides the key at or below 1e-30 and has slope `1 / (ramp *
    /// weight)` on the ramp (0 inside the window), plus ALiBi's `-slopes[h] * |j - (i +
    /// offset)|`.
    #[allow(clippy::too_many_arguments)]
    pub fn term(
        &self,
        b: usize,
        h: usize,
        i: usize,
        j: usize,
        key_bias: &Tensor<f32>,
        reach: &Tensor<f32>,
        slopes: &Tensor<f32>,
        #[comptime] rules: RuleSet,
    ) -> ElementTerm {
        let mut term = ElementTerm {
            bias: f32::new(0.0),
            slope: f32::new(0.0),
            hidden: false,
        };
        if comptime!(rules.key_bias) {
            let bias_j = key_bias[term_at(key_bias, b, h, j)];
            if bias_j < f32::new(-1.0e30) {
                term.hidden = true;
            } else {
                term.bias += bias_j;
            }
        }
        let d = j as i32 - (i as i32 + self.offset);
        let distance = f32::cast_from(select(d < 0, -d, d));
        if comptime!(rules.alibi) {
            term.bias -= slopes[h] * distance;
        }
        if comptime!(rules.soft_edge) {
            let weight = f32::min(
                (reach[term_at(reach, b, h, i)] - distance) / self.ramp + f32::new(0.5),
                f32::new(1.0),
            );
            // Tiny weights count as 0, so the log stays finite.
            if weight > f32::new(1.0e-30) {
                term.bias += f32::ln(weight);
                term.slope = select(
                    weight < f32::new(1.0),
                    f32::new(1.0) / (self.ramp * weight),
                    f32::new(0.0),
                );
            } else {
                term.hidden = true;
            }
        }
        term
    }
}
