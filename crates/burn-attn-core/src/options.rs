//! The options every attention core shares: scale, causal flag and window band, and the
//! choices about how a call runs (which implementations may serve it, tf32 products, a
//! dispatch log, a forced kernel plan for tuning).
//!
//! One definition for every backend (see `DESIGN.md`): when `seq_q != seq_k` query `i`
//! sits at key position `i + seq_k - seq_q` (bottom-right alignment), and key `j` is in
//! the window of query `i` iff `i' - left <= j <= i' + right` with that aligned `i'`.

use serde::{Deserialize, Serialize};

use crate::dispatch::{DispatchLog, KernelPolicy};
use crate::error::AttentionError;
pub use burn_attn_kernels::plan::ForcedPlan;

/// A band of visible keys around each query's aligned position.
///
/// `None` on a side means unbounded. Causal attention is `right = Some(0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Window {
    /// How many keys before the aligned query position are visible (`None`: all).
    pub left: Option<usize>,
    /// How many keys after the aligned query position are visible (`None`: all).
    pub right: Option<usize>,
}

impl Window {
    /// No restriction: every key is visible.
    pub const FULL: Window = Window {
        left: None,
        right: None,
    };

    /// A window with explicit sides.
    pub fn new(left: Option<usize>, right: Option<usize>) -> Self {
        Self { left, right }
    }

    /// The seed's symmetric window of total size `size`: `left = right = size / 2`.
    pub fn symmetric(size: usize) -> Self {
        Self {
            left: Some(size / 2),
            right: Some(size / 2),
        }
    }

    /// A causal window that sees `size - 1` keys back and the query's own key:
    /// `left = size - 1, right = 0`, so each query sees at most `size` keys (size 0 is
    /// size 1: the query's own key).
    pub fn causal(size: usize) -> Self {
        Self {
            left: Some(size.saturating_sub(1)),
            right: Some(0),
        }
    }

    /// Whether neither side is bounded.
    pub fn is_full(&self) -> bool {
        self.left.is_none() && self.right.is_none()
    }

    /// The intersection of two bands (the tighter bound on each side).
    pub fn intersect(self, other: Window) -> Window {
        fn tighter(a: Option<usize>, b: Option<usize>) -> Option<usize> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, None) => a,
                (None, b) => b,
            }
        }
        Window {
            left: tighter(self.left, other.left),
            right: tighter(self.right, other.right),
        }
    }

    /// Whether key `j` is inside the band of query `i` for the given lengths.
    pub fn contains(&self, i: usize, j: usize, seq_q: usize, seq_k: usize) -> bool {
        let diff = j as i64 - aligned(i, seq_q, seq_k);
        self.left.is_none_or(|l| diff >= -signed(l)) && self.right.is_none_or(|r| diff <= signed(r))
    }
}

/// A window side as a signed offset, saturating: sides past `i64::MAX` (such as
/// `usize::MAX`, a natural "unbounded") reach every key.
pub(crate) fn signed(side: usize) -> i64 {
    i64::try_from(side).unwrap_or(i64::MAX)
}

/// The key position query `i` is aligned with (bottom-right alignment); may be negative
/// when `seq_q > seq_k`.
pub fn aligned(i: usize, seq_q: usize, seq_k: usize) -> i64 {
    i as i64 + seq_k as i64 - seq_q as i64
}

/// Options of an exact (banded) attention core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AttentionOptions {
    /// Multiplier of `q . k`; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Whether key `j` is hidden from query `i` when `j > i + seq_k - seq_q`.
    pub causal: bool,
    /// The band of visible keys (intersected with the causal rule when both are set).
    pub window: Window,
    /// Tile size of the tensor-op implementation (backends without a kernel); `None` uses
    /// its default. GPU kernels choose their own tiles and ignore it.
    pub tile: Option<usize>,
    /// Lets f32 inputs run the matrix units with tf32 products (CUDA sm_80+): 10 of f32's
    /// 23 mantissa bits in the products' inputs, so outputs differ from full f32 at about
    /// 1e-3 relative, as with PyTorch's `allow_tf32`; sums and the softmax stay f32. Off
    /// by default: f32 means f32 unless asked.
    #[serde(default)]
    pub tf32: bool,
    /// Which implementations may serve the call.
    #[serde(default)]
    pub kernel: KernelPolicy,
    /// Records which implementation served each pass of the calls made with these options.
    #[serde(skip)]
    pub log: Option<DispatchLog>,
    /// Forced kernel tiles and schedule, for tuning runs: a forced choice the call cannot
    /// run makes that kernel decline (the log says why). `None` lets the plans choose.
    #[serde(skip)]
    pub forced_plan: Option<ForcedPlan>,
    /// Keeps the block-sparse plan of the calls made with these options across calls
    /// (modules with a fixed pattern hold one); `None` builds it on every call.
    #[serde(skip)]
    pub block_masks: Option<crate::BlockMaskCache>,
}

impl AttentionOptions {
    /// Plain exact attention with the default scale.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the causal flag.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets the window band.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    /// Sets an explicit scale.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Allows tf32 products for f32 inputs (see [`AttentionOptions::tf32`]).
    pub fn with_tf32(mut self, tf32: bool) -> Self {
        self.tf32 = tf32;
        self
    }

    /// Sets which implementations may serve the call.
    pub fn with_kernel(mut self, kernel: KernelPolicy) -> Self {
        self.kernel = kernel;
        self
    }

    /// Records each pass's dispatch in `log` (clones of a log share its record).
    pub fn with_log(mut self, log: DispatchLog) -> Self {
        self.log = Some(log);
        self
    }

    /// Keeps the block-sparse plan across the calls made with these options (see
    /// [`BlockMaskCache`](crate::BlockMaskCache)).
    pub fn with_block_mask_cache(mut self, cache: crate::BlockMaskCache) -> Self {
        self.block_masks = Some(cache);
        self
    }

    /// Forces kernel tiles and schedule (tuning runs).
    pub fn with_forced_plan(mut self, plan: ForcedPlan) -> Self {
        self.forced_plan = Some(plan);
        self
    }

    /// The band actually applied: the window intersected with the causal rule.
    pub fn effective_window(&self) -> Window {
        if self.causal {
            self.window.intersect(Window::new(None, Some(0)))
        } else {
            self.window
        }
    }

    /// The scale applied to `q . k` for the given head dimension.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (head_dim as f64).sqrt())
    }

    /// Checks the options themselves (shapes are checked separately).
    pub fn validate(&self) -> Result<(), AttentionError> {
        if self.tile == Some(0) {
            return Err(AttentionError::ZeroSize { what: "tile" });
        }
        if let Some(scale) = self.scale {
            // The kernels and f32 paths take the scale as f32: it must stay finite there.
            let as_f32 = scale as f32;
            if !scale.is_finite() || scale <= 0.0 || !as_f32.is_finite() || as_f32 == 0.0 {
                return Err(AttentionError::InvalidScale { scale });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_window_matches_seed_definition() {
        // The seed: start = i - w/2, end = i + w/2 + 1 (exclusive).
        let w = Window::symmetric(6);
        let visible: Vec<usize> = (0..20).filter(|&j| w.contains(10, j, 20, 20)).collect();
        assert_eq!(visible, (7..=13).collect::<Vec<_>>());
    }

    #[test]
    fn bottom_right_alignment_when_lengths_differ() {
        let causal = AttentionOptions::new().with_causal(true).effective_window();
        // 2 queries over 5 keys: query 0 sits at key 3, query 1 at key 4.
        assert!(causal.contains(0, 3, 2, 5));
        assert!(!causal.contains(0, 4, 2, 5));
        assert!(causal.contains(1, 4, 2, 5));
        // 5 queries over 2 keys: the first 3 queries see nothing.
        assert!(!(0..2).any(|j| causal.contains(2, j, 5, 2)));
        assert!(causal.contains(3, 0, 5, 2));
    }

    #[test]
    fn causal_intersects_window() {
        let opts = AttentionOptions::new()
            .with_causal(true)
            .with_window(Window::symmetric(8));
        assert_eq!(opts.effective_window(), Window::new(Some(4), Some(0)));
    }

    #[test]
    fn huge_sides_saturate_to_unbounded() {
        let huge = Window::new(Some(usize::MAX), Some(usize::MAX));
        let causal = Window::causal(usize::MAX);
        for (i, j) in [(0, 0), (0, 19), (19, 0), (7, 12)] {
            assert!(huge.contains(i, j, 20, 20), "{i} {j}");
            assert_eq!(causal.contains(i, j, 20, 20), j <= i, "{i} {j}");
        }
    }

    #[test]
    fn bad_scale_is_rejected() {
        let err = AttentionOptions::new()
            .with_scale(-1.0)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("-1"), "{err}");
    }
}
