//! A closed-form cost model of every attention variant: memory, compute and parameters.
//!
//! The model answers "what should this method cost at this length?" without running it, so
//! the comparison tool can print the prediction beside the measurement and users can pick a
//! method before building one. It generalises the seed's `AttentionComplexityAnalyzer`:
//!
//! - **memory** counts the elements of the attention intermediates that grow with the
//!   sequence length (score matrices, row statistics, feature maps, chunk states), beyond
//!   the Q, K, V and output activations (those are in [`Cost::activations`]). Buffers whose
//!   size does not depend on `n` (flash tiles, the `d_k x d_k` state of non-causal linear
//!   attention) are left out, as in the seed. With `batch = heads = 1` and the seed's
//!   settings, the formulas reduce to the seed's (`n^2`, `n`, `density * n^2`,
//!   `n * d_model`, `n * w`), up to the exact count of the band's edge rows.
//! - **compute** is FLOPs of the attention core in FlashAttention's convention: forward
//!   `4 * b * h * (visible pairs) * d_k`, so dense attention is `4*b*h*n*n*d_k`, causal
//!   half of it, and windows count only the visible band. Projections are separate
//!   ([`Cost::projection_compute`]).
//! - **parameters**: `4 * d_model^2` for Q, K, V and O plus `4 * d_model` biases, plus the
//!   learned-sparsity gate or the window predictor where the method has one.
//! - **exponents**: the asymptotic power of `n` in memory and time when the window,
//!   stride, density, ratio and chunk are held fixed.
//!
//! Everything here is plain arithmetic on `u64`/`f64`: no tensors, no backend.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// Bytes of one f32 element, to turn [`Cost::memory`] into bytes.
pub const F32_BYTES: u64 = 4;

/// An attention method the model knows.
///
/// Serialised and parsed in kebab case (`"sparse-local"`, `"causal-linear"`, ...), the same
/// names the comparison tool prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Standard attention with the full `n x n` score matrix materialised.
    Exact,
    /// FlashAttention: exact, tiled, with only row statistics kept.
    Flash,
    /// Sparse attention with a local (symmetric band) pattern of `sparse_window` keys.
    SparseLocal,
    /// Sparse attention with every `stride`-th key column plus the keys within `local`.
    SparseStrided,
    /// Sparse attention with seeded random blocks of density `density`.
    SparseRandom,
    /// Learned sparsity: each query sees the top `ratio * n` keys chosen by a gate.
    LearnedSparse,
    /// Linear attention `phi(Q) (phi(K)^T V)`.
    Linear,
    /// Causal linear attention, chunk-parallel with chunk size `chunk`.
    CausalLinear,
    /// Sliding window attention over `window` keys.
    SlidingWindow,
    /// Adaptive sliding window, bounded by `max_window` keys plus its soft edge `ramp`.
    AdaptiveWindow,
    /// Hybrid: flash up to `flash_max`, sparse up to `sparse_max`, sliding window beyond.
    Hybrid,
}

impl Method {
    /// Every method, in the order the comparison tool prints them.
    pub const ALL: [Method; 11] = [
        Method::Exact,
        Method::Flash,
        Method::SparseLocal,
        Method::SparseStrided,
        Method::SparseRandom,
        Method::LearnedSparse,
        Method::Linear,
        Method::CausalLinear,
        Method::SlidingWindow,
        Method::AdaptiveWindow,
        Method::Hybrid,
    ];

    /// The kebab-case name (`"sparse-local"`), as printed and parsed.
    pub fn name(self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Flash => "flash",
            Method::SparseLocal => "sparse-local",
            Method::SparseStrided => "sparse-strided",
            Method::SparseRandom => "sparse-random",
            Method::LearnedSparse => "learned-sparse",
            Method::Linear => "linear",
            Method::CausalLinear => "causal-linear",
            Method::SlidingWindow => "sliding-window",
            Method::AdaptiveWindow => "adaptive-window",
            Method::Hybrid => "hybrid",
        }
    }

    /// Whether the method computes exactly softmax attention under its own visibility
    /// pattern, i.e. equals [`Method::Exact`] when the pattern hides nothing. Only
    /// [`Method::Exact`] and [`Method::Flash`] are exact for every length and setting.
    pub fn is_exact(self) -> bool {
        matches!(self, Method::Exact | Method::Flash)
    }

    /// The asymptotic exponents `(memory, time)` of `n` with the window, stride, density,
    /// ratio and chunk held fixed. Hybrid reports its regime beyond `sparse_max` (sliding
    /// window); use [`ComplexityModel::hybrid_choice`] for the regime at a given length.
    pub fn exponents(self) -> (f64, f64) {
        match self {
            Method::Exact => (2.0, 2.0),
            Method::Flash => (1.0, 2.0),
            // A fixed band: each query sees a constant number of keys.
            Method::SparseLocal | Method::SlidingWindow | Method::AdaptiveWindow => (1.0, 1.0),
            // n / stride global columns per query: quadratic with a fixed stride.
            Method::SparseStrided => (2.0, 2.0),
            // A fixed fraction of all pairs.
            Method::SparseRandom | Method::LearnedSparse => (2.0, 2.0),
            Method::Linear | Method::CausalLinear => (1.0, 1.0),
            Method::Hybrid => (1.0, 1.0),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing a [`Method`] from an unknown name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMethod(pub String);

impl fmt::Display for UnknownMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        write!(
            f,
            "unknown attention method `{}` (expected one of: {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownMethod {}

impl FromStr for Method {
    type Err = UnknownMethod;

    /// Parses a kebab-case name; `_` is accepted for `-`, and case is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Method::ALL
            .into_iter()
            .find(|m| m.name() == norm)
            .ok_or_else(|| UnknownMethod(s.to_string()))
    }
}

/// The length thresholds at which [`Method::Hybrid`] changes regime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HybridThresholds {
    /// Lengths up to this use flash attention (seed: 2048).
    pub flash_max: usize,
    /// Lengths up to this (and above `flash_max`) use sparse attention (seed: 8192); longer
    /// ones use the sliding window.
    pub sparse_max: usize,
    /// The sparse pattern of the middle regime.
    pub sparse: Method,
}

impl Default for HybridThresholds {
    fn default() -> Self {
        Self {
            flash_max: 2048,
            sparse_max: 8192,
            sparse: Method::SparseLocal,
        }
    }
}

/// The inputs of the cost model: shapes and every method's settings.
///
/// Build with [`ComplexityModel::new`] (the seed's defaults) and the `with_*` methods, then
/// ask [`ComplexityModel::cost`] for a method at a length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ComplexityModel {
    /// Batch size.
    pub batch: usize,
    /// Attention heads; `d_model` must be a multiple.
    pub heads: usize,
    /// Model width.
    pub d_model: usize,
    /// Whether exact, flash, sparse and window methods are causal (halves their pairs).
    pub causal: bool,
    /// Whether the projections have biases (counted in [`Cost::parameters`]).
    pub bias: bool,
    /// Total size of the sliding window (`left = right = window / 2`; causal:
    /// `window - 1` back). Seed: 256.
    pub window: usize,
    /// Total size of the local sparse band. Seed: 128.
    pub sparse_window: usize,
    /// Column stride of the strided pattern. Seed: 64.
    pub stride: usize,
    /// Half-width of the strided pattern's local band: keys within `local` of the query.
    /// Seed: 32 (`i - 32 ..= i + 32`).
    pub local: usize,
    /// Fraction of active blocks of the random pattern. Seed: 0.1.
    pub density: f64,
    /// Block size of the random pattern (diagonal blocks are always active). 1 gives the
    /// seed's per-element pattern.
    pub block: usize,
    /// Fraction of keys learned sparsity keeps per query. Seed: 0.1.
    pub ratio: f64,
    /// Chunk size of causal linear attention.
    pub chunk: usize,
    /// Smallest window of the adaptive window. Seed: 64.
    pub min_window: usize,
    /// Largest window of the adaptive window (what memory and compute are bounded by).
    /// Seed: 512.
    pub max_window: usize,
    /// Width of the adaptive window's soft edge, in keys: the band visited reaches
    /// `ramp / 2` beyond the largest window. Default: 16.
    pub ramp: f64,
    /// The hybrid's regimes.
    pub hybrid: HybridThresholds,
}

impl Default for ComplexityModel {
    fn default() -> Self {
        Self::new(768, 12)
    }
}

/// The predicted cost of one method at one length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// The method asked for.
    pub method: Method,
    /// For [`Method::Hybrid`], the regime it picks at this length; otherwise the method.
    pub selected: Method,
    /// Sequence length.
    pub seq_len: usize,
    /// Query-key pairs whose score is computed (all heads and batches).
    pub pairs: u64,
    /// Elements of attention intermediates that grow with `n` (see the module docs).
    pub memory: u64,
    /// Elements of the Q, K, V and attention-output activations: `4 * b * n * d_model`.
    pub activations: u64,
    /// FLOPs of the attention core (FlashAttention's count).
    pub compute: u64,
    /// FLOPs of the projections, gate and predictor: `2 * b * n * d_model` per output.
    pub projection_compute: u64,
    /// Trainable parameters.
    pub parameters: u64,
    /// Asymptotic exponent of `n` in memory.
    pub memory_exponent: f64,
    /// Asymptotic exponent of `n` in time.
    pub time_exponent: f64,
}

impl Cost {
    /// [`Cost::memory`] in bytes of f32.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.saturating_mul(F32_BYTES)
    }

    /// Attention and projection FLOPs together.
    pub fn total_compute(&self) -> u64 {
        self.compute.saturating_add(self.projection_compute)
    }
}

/// Visible pairs of an `n x n` band with `left` keys back and `right` keys ahead
/// (`None`: unbounded): `sum over offsets d in [-L, R] of (n - |d|)`.
pub fn band_pairs(n: usize, left: Option<usize>, right: Option<usize>) -> u64 {
    if n == 0 {
        return 0;
    }
    let n = n as u64;
    let l = left.map_or(n - 1, |l| (l as u64).min(n - 1));
    let r = right.map_or(n - 1, |r| (r as u64).min(n - 1));
    n * (l + r + 1) - l * (l + 1) / 2 - r * (r + 1) / 2
}

/// Visible pairs of the strided pattern: key columns `j % stride == 0` plus the keys
/// within `local` of the query (causal: keys after the query are hidden from both).
pub fn strided_pairs(n: usize, stride: usize, local: usize, causal: bool) -> u64 {
    let stride = stride.max(1) as u64;
    let half = local as u64;
    // Multiples of `stride` in `0..=x`.
    let upto = |x: u64| x / stride + 1;
    let n64 = n as u64;
    (0..n64)
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = if causal { i } else { (i + half).min(n64 - 1) };
            let cap = if causal { i } else { n64 - 1 };
            let in_band = upto(hi) - if lo == 0 { 0 } else { upto(lo - 1) };
            (hi - lo + 1) + upto(cap) - in_band
        })
        .sum()
}

/// Expected visible pairs of the random block pattern: diagonal blocks always, every other
/// block with probability `density` (causal: only pairs at or below the diagonal).
pub fn random_pairs(n: usize, block: usize, density: f64, causal: bool) -> f64 {
    let block = block.max(1);
    let tri = |s: usize| (s * (s + 1) / 2) as f64;
    let sq = |s: usize| (s * s) as f64;
    let area = |s: usize| if causal { tri(s) } else { sq(s) };
    let full = area(n);
    let diagonal = (n / block) as f64 * area(block) + area(n % block);
    diagonal + density.clamp(0.0, 1.0) * (full - diagonal)
}

impl ComplexityModel {
    /// A model for `d_model` and `heads` with the seed's settings: windows 256 (sliding) and
    /// 128 (local sparse), stride 64 with a local half-width of 32, density 0.1 in blocks of 64,
    /// ratio 0.1, chunk 64, adaptive window 64..=512, hybrid thresholds 2048/8192, batch 1,
    /// not causal, with biases.
    pub fn new(d_model: usize, heads: usize) -> Self {
        Self {
            batch: 1,
            heads,
            d_model,
            causal: false,
            bias: true,
            window: 256,
            sparse_window: 128,
            stride: 64,
            local: 32,
            density: 0.1,
            block: 64,
            ratio: 0.1,
            chunk: 64,
            min_window: 64,
            max_window: 512,
            ramp: 16.0,
            hybrid: HybridThresholds::default(),
        }
    }

    /// The seed analyzer's setting: one batch, one head, no biases, per-element random
    /// pattern, so the seed's formulas (and its table) come out.
    pub fn seed(d_model: usize) -> Self {
        Self::new(d_model, 1).with_bias(false).with_block(1)
    }

    /// Sets the batch size.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Sets whether exact, flash, sparse and window methods are causal.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets whether projections have biases.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the sliding window size.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Sets the local sparse band size.
    pub fn with_sparse_window(mut self, window: usize) -> Self {
        self.sparse_window = window;
        self
    }

    /// Sets the strided pattern's stride.
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    /// Sets the strided pattern's local half-width.
    pub fn with_local(mut self, local: usize) -> Self {
        self.local = local;
        self
    }

    /// Sets the random pattern's block density.
    pub fn with_density(mut self, density: f64) -> Self {
        self.density = density;
        self
    }

    /// Sets the random pattern's block size.
    pub fn with_block(mut self, block: usize) -> Self {
        self.block = block;
        self
    }

    /// Sets learned sparsity's kept fraction of keys.
    pub fn with_ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Sets causal linear attention's chunk size.
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk;
        self
    }

    /// Sets the adaptive window's bounds.
    pub fn with_adaptive_window(mut self, min_window: usize, max_window: usize) -> Self {
        self.min_window = min_window;
        self.max_window = max_window;
        self
    }

    /// Sets the width of the adaptive window's soft edge.
    pub fn with_ramp(mut self, ramp: f64) -> Self {
        self.ramp = ramp;
        self
    }

    /// Sets the hybrid's regimes.
    pub fn with_hybrid(mut self, hybrid: HybridThresholds) -> Self {
        self.hybrid = hybrid;
        self
    }

    /// Per-head width `d_model / heads` (at least 1).
    pub fn head_dim(&self) -> usize {
        (self.d_model / self.heads.max(1)).max(1)
    }

    /// The regime [`Method::Hybrid`] runs at length `n`.
    pub fn hybrid_choice(&self, n: usize) -> Method {
        if n <= self.hybrid.flash_max {
            Method::Flash
        } else if n <= self.hybrid.sparse_max {
            self.hybrid.sparse
        } else {
            Method::SlidingWindow
        }
    }

    /// Keys learned sparsity keeps per query at length `n`: `ceil(ratio * n)`, in `1..=n`.
    pub fn learned_keys(&self, n: usize) -> usize {
        ((self.ratio * n as f64).ceil() as usize).clamp(1.min(n), n)
    }

    /// Visible query-key pairs of one head of one sequence.
    fn head_pairs(&self, method: Method, n: usize) -> u64 {
        let dense = if self.causal {
            band_pairs(n, None, Some(0))
        } else {
            band_pairs(n, None, None)
        };
        // A window of total size `w`: symmetric halves, or `w - 1` back when causal.
        let window = |w: usize| {
            if self.causal {
                band_pairs(n, Some(w.saturating_sub(1)), Some(0))
            } else {
                band_pairs(n, Some(w / 2), Some(w / 2))
            }
        };
        match method {
            Method::Exact | Method::Flash => dense,
            Method::SparseLocal => window(self.sparse_window),
            Method::SparseStrided => strided_pairs(n, self.stride, self.local, self.causal),
            Method::SparseRandom => {
                random_pairs(n, self.block, self.density, self.causal).round() as u64
            }
            Method::LearnedSparse => (n * self.learned_keys(n)) as u64,
            Method::SlidingWindow => window(self.window),
            Method::AdaptiveWindow => {
                // The largest reach plus half the soft edge, on each side.
                let half_ramp = self.ramp.max(0.0) / 2.0;
                if self.causal {
                    let left = (self.max_window.saturating_sub(1) as f64 + half_ramp).ceil();
                    band_pairs(n, Some(left as usize), Some(0))
                } else {
                    let extent = (self.max_window as f64 / 2.0 + half_ramp).ceil() as usize;
                    band_pairs(n, Some(extent), Some(extent))
                }
            }
            // Linear methods have no score pairs outside causal linear's chunks.
            Method::Linear => 0,
            Method::CausalLinear => {
                let c = self.chunk.clamp(1, n.max(1));
                let tri = |s: usize| (s * (s + 1) / 2) as u64;
                (n / c) as u64 * tri(c) + tri(n % c)
            }
            Method::Hybrid => self.head_pairs(self.hybrid_choice(n), n),
        }
    }

    /// Parameters of a method: Q, K, V, O projections plus its gate or predictor.
    pub fn parameters(&self, method: Method) -> u64 {
        let d = self.d_model as u64;
        let bias = |outputs: u64| if self.bias { outputs } else { 0 };
        let base = 4 * d * d + bias(4 * d);
        match method {
            // Gate: Linear(d_model, heads).
            Method::LearnedSparse => base + d * self.heads as u64 + bias(self.heads as u64),
            // Window predictor: Linear(d_model, 1).
            Method::AdaptiveWindow => base + d + bias(1),
            // The hybrid shares one set of projections across its regimes.
            _ => base,
        }
    }

    /// The predicted cost of `method` at sequence length `n`.
    pub fn cost(&self, method: Method, n: usize) -> Cost {
        let selected = if method == Method::Hybrid {
            self.hybrid_choice(n)
        } else {
            method
        };
        let b = self.batch as u64;
        let h = self.heads as u64;
        let bh = b * h;
        let dk = self.head_dim() as u64;
        let d = self.d_model as u64;
        let n64 = n as u64;
        let pairs = bh * self.head_pairs(selected, n);
        // FlashAttention's count: 2 FLOPs per multiply-add in QK^T and in PV.
        let fa = 4 * pairs * dk;
        let (memory, compute, extra_proj) = match selected {
            // The materialised score matrix is n x n even when causal masks half of it.
            Method::Exact => (bh * n64 * n64, fa, 0),
            // Only the row log-sum-exp survives the tiles.
            Method::Flash => (bh * n64, fa, 0),
            Method::SparseLocal
            | Method::SparseStrided
            | Method::SparseRandom
            | Method::SlidingWindow => (pairs, fa, 0),
            // Scores of the kept keys plus the gate's [b, n, heads] scores.
            Method::LearnedSparse => (pairs + b * n64 * h, fa, 2 * b * n64 * d * h),
            // The band bounded by max_window plus the predicted size per position.
            Method::AdaptiveWindow => (pairs + b * n64, fa, 2 * b * n64 * d),
            // phi(K)^T [V, 1] and phi(Q) times it: the ones column is the normaliser.
            Method::Linear => (bh * n64 * dk, 4 * bh * n64 * dk * (dk + 1), 0),
            Method::CausalLinear => {
                let c = self.chunk.clamp(1, n.max(1)) as u64;
                let chunks = n64.div_ceil(c);
                let state = dk * (dk + 1);
                // Features, the intra-chunk score blocks and one prefix state per chunk.
                let memory = bh * (n64 * dk + chunks * c * c + chunks * state);
                // Intra-chunk causal QK^T and P [V, 1]; per-chunk state update and read;
                // the prefix sum over chunk states.
                let compute = 2 * pairs * dk
                    + 2 * pairs * (dk + 1)
                    + 4 * bh * n64 * state
                    + bh * chunks * state;
                (memory, compute, 0)
            }
            Method::Hybrid => unreachable!("hybrid resolves to its regime"),
        };
        let (memory_exponent, time_exponent) = method.exponents();
        Cost {
            method,
            selected,
            seq_len: n,
            pairs,
            memory,
            activations: 4 * b * n64 * d,
            compute,
            projection_compute: 8 * b * n64 * d * d + extra_proj,
            parameters: self.parameters(method),
            memory_exponent,
            time_exponent,
        }
    }

    /// Costs of every method in [`Method::ALL`] at length `n`.
    pub fn compare(&self, n: usize) -> Vec<Cost> {
        Method::ALL.iter().map(|m| self.cost(*m, n)).collect()
    }

    /// The seed's table for this model: memory of flash, random sparse, linear and sliding
    /// window relative to standard attention, per length.
    pub fn relative_memory(&self, lengths: &[usize]) -> Vec<RelativeMemoryRow> {
        lengths
            .iter()
            .map(|&n| {
                let standard = self.cost(Method::Exact, n).memory.max(1) as f64;
                let rel = |m: Method| self.cost(m, n).memory as f64 / standard;
                RelativeMemoryRow {
                    seq_len: n,
                    standard: 1.0,
                    flash: rel(Method::Flash),
                    sparse: rel(Method::SparseRandom),
                    linear: rel(Method::Linear),
                    sliding: rel(Method::SlidingWindow),
                }
            })
            .collect()
    }
}

/// One row of the seed's "Memory Usage (relative to standard attention)" table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RelativeMemoryRow {
    /// Sequence length.
    pub seq_len: usize,
    /// Standard attention, always 1.
    pub standard: f64,
    /// FlashAttention.
    pub flash: f64,
    /// Sparse attention (random, density 0.1 in the seed).
    pub sparse: f64,
    /// Linear attention.
    pub linear: f64,
    /// Sliding window (256 in the seed).
    pub sliding: f64,
}

impl RelativeMemoryRow {
    /// The header line, tab separated as in the seed.
    pub const HEADER: &'static str = "Seq Len\tStandard\tFlash\tSparse\tLinear\tSliding";
}

impl fmt::Display for RelativeMemoryRow {
    /// Tab separated with two decimals, as the seed prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\t{:.2}",
            self.seq_len, self.standard, self.flash, self.sparse, self.linear, self.sliding
        )
    }
}

/// The seed's relative-memory table: [`ComplexityModel::seed`] (one head, density 0.1,
/// window 256) at each length. Print [`RelativeMemoryRow::HEADER`] then each row, or use
/// [`format_relative_memory_table`].
///
/// The sliding column counts the band's visible pairs exactly, so where the window is not
/// small against `n` it is below the seed's `w / n` (0.44 instead of 0.50 at n = 512).
pub fn relative_memory_table(lengths: &[usize], d_model: usize) -> Vec<RelativeMemoryRow> {
    ComplexityModel::seed(d_model).relative_memory(lengths)
}

/// The seed's printout: title, header and one line per row.
pub fn format_relative_memory_table(rows: &[RelativeMemoryRow]) -> String {
    let mut out = String::from("Memory Usage (relative to standard attention):\n");
    out.push_str(RelativeMemoryRow::HEADER);
    out.push('\n');
    for row in rows {
        out.push_str(&row.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts visible pairs by brute force.
    fn brute(n: usize, visible: impl Fn(usize, usize) -> bool) -> u64 {
        (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|&(i, j)| visible(i, j))
            .count() as u64
    }

    #[test]
    fn seed_numbers_at_4096_768() {
        let m = ComplexityModel::seed(768);
        let n = 4096u64;
        let exact = m.cost(Method::Exact, 4096);
        assert_eq!(exact.memory, n * n);
        // FlashAttention count 4*n*n*d with one head; the seed's n^2*d up to that factor.
        assert_eq!(exact.compute, 4 * n * n * 768);
        // The seed's 4*d^2 (no biases in the seed model).
        assert_eq!(exact.parameters, 4 * 768 * 768);
        assert_eq!(m.cost(Method::Flash, 4096).memory, n);
        assert_eq!(m.cost(Method::Linear, 4096).memory, n * 768);
        let sparse = m.cost(Method::SparseRandom, 4096).memory as f64;
        assert!((sparse / (n * n) as f64 - 0.1).abs() < 1e-3);
        let sliding = m.cost(Method::SlidingWindow, 4096).memory;
        // n * (w + 1) minus the edge triangles of the band.
        assert_eq!(sliding, 4096 * 257 - 128 * 129);
    }

    #[test]
    fn seed_table_rows() {
        let rows = relative_memory_table(&[512, 1024, 2048, 4096, 8192], 768);
        let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        assert_eq!(lines[3], "4096\t1.00\t0.00\t0.10\t0.19\t0.06");
        assert_eq!(lines[4], "8192\t1.00\t0.00\t0.10\t0.09\t0.03");
        // Edge rows see fewer keys: 0.24 and 0.44 where the seed's `w / n` says 0.25, 0.50.
        assert_eq!(lines[1], "1024\t1.00\t0.00\t0.10\t0.75\t0.24");
        assert_eq!(lines[0], "512\t1.00\t0.00\t0.10\t1.50\t0.44");
        let table = format_relative_memory_table(&rows);
        assert!(table.contains("Seq Len\tStandard\tFlash\tSparse\tLinear\tSliding"));
        assert_eq!(table.lines().count(), 2 + 5);
    }

    #[test]
    fn band_pairs_match_brute_force() {
        for n in [0usize, 1, 2, 5, 17, 64] {
            for l in [None, Some(0), Some(1), Some(3), Some(100)] {
                for r in [None, Some(0), Some(2), Some(100)] {
                    let want = brute(n, |i, j| {
                        let d = j as i64 - i as i64;
                        l.is_none_or(|l| d >= -(l as i64)) && r.is_none_or(|r| d <= r as i64)
                    });
                    assert_eq!(band_pairs(n, l, r), want, "n={n} l={l:?} r={r:?}");
                }
            }
        }
    }

    #[test]
    fn strided_pairs_match_brute_force() {
        for n in [1usize, 7, 33, 100] {
            for stride in [1usize, 4, 9] {
                for local in [0usize, 4, 10] {
                    for causal in [false, true] {
                        let want = brute(n, |i, j| {
                            let band = (j as i64 - i as i64).abs() <= local as i64;
                            (band || j % stride == 0) && (!causal || j <= i)
                        });
                        assert_eq!(
                            strided_pairs(n, stride, local, causal),
                            want,
                            "n={n} stride={stride} local={local} causal={causal}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn random_pairs_limits() {
        // Density 1 is dense; density 0 leaves the diagonal blocks.
        assert_eq!(random_pairs(100, 16, 1.0, false), 10_000.0);
        assert_eq!(random_pairs(100, 16, 0.0, false), (6 * 256 + 16) as f64);
        assert_eq!(random_pairs(10, 4, 1.0, true), 55.0);
        assert_eq!(random_pairs(10, 4, 0.0, true), (2 * 10 + 3) as f64);
    }

    #[test]
    fn exponents() {
        assert_eq!(Method::Exact.exponents(), (2.0, 2.0));
        assert_eq!(Method::Flash.exponents(), (1.0, 2.0));
        assert_eq!(Method::Linear.exponents(), (1.0, 1.0));
        assert_eq!(Method::SlidingWindow.exponents(), (1.0, 1.0));
        // The empirical slopes agree with the declared exponents at long lengths.
        let m = ComplexityModel::new(512, 8);
        for method in Method::ALL {
            if method == Method::Hybrid {
                continue;
            }
            let (a, b) = (m.cost(method, 1 << 15), m.cost(method, 1 << 16));
            let slope = |x: u64, y: u64| (y as f64 / x as f64).log2();
            let (me, te) = method.exponents();
            assert!(
                (slope(a.memory, b.memory) - me).abs() < 0.1,
                "{method} memory"
            );
            assert!(
                (slope(a.compute, b.compute) - te).abs() < 0.1,
                "{method} time"
            );
        }
    }

    #[test]
    fn multi_head_counts() {
        let m = ComplexityModel::new(64, 4).with_batch(2);
        let c = m.cost(Method::Flash, 32);
        assert_eq!(c.compute, 4 * 2 * 4 * 32 * 32 * 16);
        assert_eq!(c.memory, 2 * 4 * 32);
        assert_eq!(c.activations, 4 * 2 * 32 * 64);
        assert_eq!(c.projection_compute, 8 * 2 * 32 * 64 * 64);
        let causal = m.with_causal(true).cost(Method::Flash, 32);
        assert_eq!(causal.compute, 4 * 2 * 4 * (32 * 33 / 2) * 16);
        // Materialised exact keeps the full matrix even when causal.
        assert_eq!(
            m.with_causal(true).cost(Method::Exact, 32).memory,
            2 * 4 * 32 * 32
        );
    }

    #[test]
    fn windows_cover_everything_when_short() {
        let m = ComplexityModel::new(64, 4);
        let exact = m.cost(Method::Exact, 100);
        let sliding = m.cost(Method::SlidingWindow, 100);
        assert_eq!(sliding.compute, exact.compute);
        assert!(m.cost(Method::SlidingWindow, 4096).compute < m.cost(Method::Exact, 4096).compute);
        // The adaptive window is bounded by its max window, so it costs at least the
        // 256-wide sliding window's band.
        assert!(
            m.cost(Method::AdaptiveWindow, 4096).compute
                >= m.cost(Method::SlidingWindow, 4096).compute
        );
    }

    #[test]
    fn chunk_size_trades_memory() {
        let m = ComplexityModel::new(512, 8);
        let n = 8192;
        let small = m.with_chunk(1).cost(Method::CausalLinear, n);
        let mid = m.with_chunk(64).cost(Method::CausalLinear, n);
        let large = m.with_chunk(4096).cost(Method::CausalLinear, n);
        // Tiny chunks store a state per step; huge chunks store big score blocks.
        assert!(mid.memory < small.memory);
        assert!(mid.memory < large.memory);
        assert!(mid.compute < large.compute);
    }

    #[test]
    fn learned_sparse_keys_and_parameters() {
        let m = ComplexityModel::new(64, 4).with_ratio(0.1);
        assert_eq!(m.learned_keys(100), 10);
        assert_eq!(m.learned_keys(5), 1);
        assert_eq!(m.learned_keys(0), 0);
        let base = 4 * 64 * 64 + 4 * 64;
        assert_eq!(m.parameters(Method::Exact), base);
        assert_eq!(m.parameters(Method::LearnedSparse), base + 64 * 4 + 4);
        assert_eq!(m.parameters(Method::AdaptiveWindow), base + 64 + 1);
        assert_eq!(m.parameters(Method::Hybrid), base);
        let c = m.cost(Method::LearnedSparse, 100);
        assert_eq!(c.pairs, 4 * 100 * 10);
    }

    #[test]
    fn hybrid_regimes() {
        let m = ComplexityModel::new(768, 12);
        assert_eq!(m.hybrid_choice(2048), Method::Flash);
        assert_eq!(m.hybrid_choice(2049), Method::SparseLocal);
        assert_eq!(m.hybrid_choice(8192), Method::SparseLocal);
        assert_eq!(m.hybrid_choice(8193), Method::SlidingWindow);
        let c = m.cost(Method::Hybrid, 4096);
        assert_eq!(c.method, Method::Hybrid);
        assert_eq!(c.selected, Method::SparseLocal);
        assert_eq!(c.compute, m.cost(Method::SparseLocal, 4096).compute);
    }

    #[test]
    fn names_round_trip_and_serde() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
        assert_eq!(
            "Sparse_Local".parse::<Method>().unwrap(),
            Method::SparseLocal
        );
        assert!("nope".parse::<Method>().is_err());
        let model = ComplexityModel::new(64, 4).with_chunk(32);
        let back: ComplexityModel =
            serde_json::from_str(&serde_json::to_string(&model).unwrap()).unwrap();
        assert_eq!(back, model);
        let cost = model.cost(Method::Hybrid, 128);
        let back: Cost = serde_json::from_str(&serde_json::to_string(&cost).unwrap()).unwrap();
        assert_eq!(back, cost);
    }
}
