//! Which keys each query may see, described once for every implementation.
//!
//! A [`KeyPattern`] is a rule, not a dense matrix: a band (window), optional strided
//! "global" key columns, the causal rule and an optional block layout (for block-random
//! patterns). Implementations ask it two questions: how a tile of queries x keys is
//! covered ([`KeyPattern::classify`]: skip it, use it whole, or mask it), and, for the
//! tiles that need one, the element mask built with tensor ops ([`KeyPattern::tile_mask`]).
//! [`KeyPattern::visible`] is the scalar definition the other two are tested against.

use core::ops::Range;

use burn::tensor::{Bool, Device, Int, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::AttentionError;
use crate::options::{aligned, signed, Window};

/// How a tile of queries x keys is covered by a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileCover {
    /// No key of the tile is visible to any query of the tile: skip it.
    Empty,
    /// Every key of the tile is visible to every query of the tile: no mask needed.
    Full,
    /// Some are visible: apply [`KeyPattern::tile_mask`].
    Partial,
}

impl TileCover {
    fn union(self, other: TileCover) -> TileCover {
        match (self, other) {
            (TileCover::Full, _) | (_, TileCover::Full) => TileCover::Full,
            (TileCover::Empty, TileCover::Empty) => TileCover::Empty,
            _ => TileCover::Partial,
        }
    }

    fn intersect(self, other: TileCover) -> TileCover {
        match (self, other) {
            (TileCover::Empty, _) | (_, TileCover::Empty) => TileCover::Empty,
            (TileCover::Full, TileCover::Full) => TileCover::Full,
            _ => TileCover::Partial,
        }
    }
}

/// A block-granular layout: which `block_q x block_k` blocks of the score matrix are active.
///
/// Built for given lengths. Block granularity is what lets a GPU kernel skip whole tiles
/// (as BigBird's random attention does); a per-element random mask could not be skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Query rows per block.
    pub block_q: usize,
    /// Key columns per block.
    pub block_k: usize,
    /// Number of query blocks (`ceil(seq_q / block_q)`).
    pub q_blocks: usize,
    /// Number of key blocks (`ceil(seq_k / block_k)`).
    pub k_blocks: usize,
    /// Row-major activity, `q_blocks * k_blocks` entries.
    pub active: Vec<bool>,
}

impl BlockLayout {
    /// A seeded random layout: each block is active with probability `density`, and the
    /// blocks holding each query's aligned key position are always active, so no query that
    /// has a key at its own position is left without keys.
    pub fn random(
        seq_q: usize,
        seq_k: usize,
        block: usize,
        density: f64,
        seed: u64,
    ) -> Result<Self, AttentionError> {
        if block == 0 {
            return Err(AttentionError::ZeroSize { what: "block size" });
        }
        if !(density > 0.0 && density <= 1.0) {
            return Err(AttentionError::OutOfUnitRange {
                what: "density",
                value: density,
            });
        }
        let q_blocks = seq_q.div_ceil(block);
        let k_blocks = seq_k.div_ceil(block);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut active: Vec<bool> = (0..q_blocks * k_blocks)
            .map(|_| rng.random_bool(density))
            .collect();
        for qb in 0..q_blocks {
            let first = aligned(qb * block, seq_q, seq_k);
            let last = aligned(((qb + 1) * block).min(seq_q) - 1, seq_q, seq_k);
            if last < 0 {
                continue;
            }
            let lo = first.max(0) as usize / block;
            let hi = (last as usize).min(seq_k.saturating_sub(1)) / block;
            for kb in lo..=hi.min(k_blocks.saturating_sub(1)) {
                active[qb * k_blocks + kb] = true;
            }
        }
        Ok(Self {
            block_q: block,
            block_k: block,
            q_blocks,
            k_blocks,
            active,
        })
    }

    /// Whether block `(qb, kb)` is active.
    pub fn is_active(&self, qb: usize, kb: usize) -> bool {
        self.active[qb * self.k_blocks + kb]
    }

    /// The fraction of active blocks.
    pub fn density(&self) -> f64 {
        if self.active.is_empty() {
            return 0.0;
        }
        self.active.iter().filter(|a| **a).count() as f64 / self.active.len() as f64
    }
}

/// The visible keys of every query: `causal && (band || strided column) && active block`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyPattern {
    /// The band around each query's aligned position.
    pub window: Window,
    /// Keys `j` with `j % stride == 0` are visible to every query (as global columns),
    /// in addition to the band.
    pub stride: Option<usize>,
    /// Whether keys after the query's aligned position are hidden (applies to the strided
    /// columns too).
    pub causal: bool,
    /// A block layout restricting everything above to its active blocks.
    pub blocks: Option<BlockLayout>,
}

/// The key columns covered by the `block_k`-aligned tiles that hold `keys`, clipped to
/// `seq_k` (empty when `keys` is).
pub fn tile_span(keys: Range<usize>, block_k: usize, seq_k: usize) -> Range<usize> {
    let block_k = block_k.max(1);
    let first = keys.start - keys.start % block_k;
    if first >= keys.end {
        return first..first;
    }
    first..(first + (keys.end - first).div_ceil(block_k) * block_k).min(seq_k)
}

impl KeyPattern {
    /// Checks the pattern against the lengths it is applied to: a stride of at least 1, and
    /// a block layout with blocks of at least 1 built for these lengths.
    pub fn validate(&self, seq_q: usize, seq_k: usize) -> Result<(), AttentionError> {
        if self.stride == Some(0) {
            return Err(AttentionError::ZeroSize { what: "stride" });
        }
        if let Some(b) = &self.blocks {
            if b.block_q == 0 || b.block_k == 0 {
                return Err(AttentionError::ZeroSize { what: "block size" });
            }
            let (q_blocks, k_blocks) = (seq_q.div_ceil(b.block_q), seq_k.div_ceil(b.block_k));
            if (b.q_blocks, b.k_blocks) != (q_blocks, k_blocks)
                || b.active.len() != q_blocks * k_blocks
            {
                return Err(AttentionError::Invalid(format!(
                    "block layout of {} x {} blocks ({} entries) used for seq_q {seq_q}, \
                     seq_k {seq_k}, which take {q_blocks} x {k_blocks} blocks of {} x {}",
                    b.q_blocks,
                    b.k_blocks,
                    b.active.len(),
                    b.block_q,
                    b.block_k
                )));
            }
        }
        Ok(())
    }

    /// A pattern that is only a band (and optionally causal).
    pub fn band(window: Window, causal: bool) -> Self {
        Self {
            window,
            causal,
            ..Self::default()
        }
    }

    /// Whether the pattern hides nothing.
    pub fn is_dense(&self) -> bool {
        self.window.is_full() && !self.causal && self.blocks.is_none()
    }

    /// The band intersected with the causal rule.
    fn causal_window(&self) -> Window {
        if self.causal {
            Window::new(None, Some(0))
        } else {
            Window::FULL
        }
    }

    /// The stride as the masks compute with it over `seq_k` keys: at most `seq_k` (a larger
    /// stride marks column 0 only, as `seq_k` does), so it fits their signed integers.
    pub(crate) fn stride_within(&self, seq_k: usize) -> Option<usize> {
        self.stride.map(|s| s.min(seq_k.max(1)))
    }

    /// The scalar definition: whether key `j` is visible to query `i`.
    pub fn visible(&self, i: usize, j: usize, seq_q: usize, seq_k: usize) -> bool {
        let causal_ok = self.causal_window().contains(i, j, seq_q, seq_k);
        let band = self.window.contains(i, j, seq_q, seq_k);
        let strided = self.stride.is_some_and(|s| j.is_multiple_of(s));
        let block_ok = self
            .blocks
            .as_ref()
            .is_none_or(|b| b.is_active(i / b.block_q, j / b.block_k));
        causal_ok && (band || strided) && block_ok
    }

    /// The range of keys that can be visible to some query in `rows` (a superset: tiles in
    /// it may still be empty), or an empty range.
    pub fn key_range(&self, rows: Range<usize>, seq_q: usize, seq_k: usize) -> Range<usize> {
        if self.stride.is_some() {
            Self::range_of(
                Window::FULL.intersect(self.causal_window()),
                rows,
                seq_q,
                seq_k,
            )
        } else {
            self.band_key_range(rows, seq_q, seq_k)
        }
    }

    /// The range of keys the band (with the causal rule) can make visible to `rows`,
    /// leaving out strided columns.
    pub fn band_key_range(&self, rows: Range<usize>, seq_q: usize, seq_k: usize) -> Range<usize> {
        Self::range_of(
            self.window.intersect(self.causal_window()),
            rows,
            seq_q,
            seq_k,
        )
    }

    fn range_of(band: Window, rows: Range<usize>, seq_q: usize, seq_k: usize) -> Range<usize> {
        if rows.is_empty() || seq_k == 0 {
            return 0..0;
        }
        let first = aligned(rows.start, seq_q, seq_k);
        let last = aligned(rows.end - 1, seq_q, seq_k);
        let lo = band
            .left
            .map_or(0, |l| first.saturating_sub(signed(l)))
            .max(0);
        let hi = band
            .right
            .map_or(seq_k as i64, |r| {
                last.saturating_add(signed(r)).saturating_add(1)
            })
            .min(seq_k as i64);
        if lo >= hi {
            0..0
        } else {
            lo as usize..hi as usize
        }
    }

    /// The strided columns outside `covered` that the causal rule lets some query in
    /// `rows` see, in increasing order (empty without a stride).
    pub fn strided_columns_outside(
        &self,
        rows: Range<usize>,
        covered: Range<usize>,
        seq_q: usize,
        seq_k: usize,
    ) -> Vec<usize> {
        let Some(stride) = self.stride else {
            return Vec::new();
        };
        let reach = Self::range_of(self.causal_window(), rows, seq_q, seq_k);
        (reach.start.div_ceil(stride) * stride..reach.end)
            .step_by(stride)
            .filter(|j| !covered.contains(j))
            .collect()
    }

    /// The key tiles a block of query rows visits within `keys`: `block_k`-wide tiles
    /// aligned to multiples of `block_k` (so they match block layouts) over
    /// `tile_span`, each with its cover for `rows`; tiles no row of `rows` sees are
    /// skipped. The forward and the backward walk the same tiles through this.
    pub fn visible_tiles(
        &self,
        rows: Range<usize>,
        keys: Range<usize>,
        block_k: usize,
        seq_q: usize,
        seq_k: usize,
    ) -> impl Iterator<Item = (Range<usize>, TileCover)> + '_ {
        let block_k = block_k.max(1);
        tile_span(keys, block_k, seq_k)
            .step_by(block_k)
            .filter_map(move |col| {
                let cols = col..(col + block_k).min(seq_k);
                let cover = self.classify(rows.clone(), cols.clone(), seq_q, seq_k);
                (cover != TileCover::Empty).then_some((cols, cover))
            })
    }

    /// How the tile `rows x cols` is covered.
    pub fn classify(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        seq_q: usize,
        seq_k: usize,
    ) -> TileCover {
        if rows.is_empty() || cols.is_empty() {
            return TileCover::Empty;
        }
        if let Some(b) = &self.blocks {
            let (qb0, qb1) = (rows.start / b.block_q, (rows.end - 1) / b.block_q);
            let (kb0, kb1) = (cols.start / b.block_k, (cols.end - 1) / b.block_k);
            let states: Vec<bool> = (qb0..=qb1)
                .flat_map(|qb| (kb0..=kb1).map(move |kb| (qb, kb)))
                .map(|(qb, kb)| b.is_active(qb, kb))
                .collect();
            if states.iter().all(|a| !a) {
                return TileCover::Empty;
            }
            if !states.iter().all(|a| *a) {
                return TileCover::Partial;
            }
        }
        // Differences j - i' over the tile.
        let min_diff = cols.start as i64 - aligned(rows.end - 1, seq_q, seq_k);
        let max_diff = (cols.end - 1) as i64 - aligned(rows.start, seq_q, seq_k);
        let band_cover = |w: Window| {
            let lo = w.left.map_or(i64::MIN, |l| -signed(l));
            let hi = w.right.map_or(i64::MAX, signed);
            if max_diff < lo || min_diff > hi {
                TileCover::Empty
            } else if min_diff >= lo && max_diff <= hi {
                TileCover::Full
            } else {
                TileCover::Partial
            }
        };
        let mut cover = band_cover(self.window);
        if let Some(s) = self.stride {
            let first_multiple = cols.start.div_ceil(s) * s;
            let strided = if s == 1 {
                TileCover::Full
            } else if first_multiple < cols.end {
                TileCover::Partial
            } else {
                TileCover::Empty
            };
            cover = cover.union(strided);
        }
        cover.intersect(band_cover(self.causal_window()))
    }

    /// The visibility mask of the tile `rows x cols` as a `[rows, cols]` tensor, `true`
    /// where the key is visible. Built with tensor ops (no per-element host loop).
    pub fn tile_mask(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        seq_q: usize,
        seq_k: usize,
        device: &Device,
    ) -> Tensor<2, Bool> {
        let col_pos = Tensor::<1, Int>::arange(cols.start as i64..cols.end as i64, device);
        let mut mask = self.rule_mask(rows.clone(), col_pos, seq_q, seq_k);
        if let Some(b) = &self.blocks {
            mask = mask.bool_and(block_mask(b, rows, cols, device));
        }
        mask
    }

    /// The visibility mask of queries `rows` over the keys at positions `cols` (any order),
    /// `[rows, cols.len()]`. Only for patterns without a block layout.
    pub fn columns_mask(
        &self,
        rows: Range<usize>,
        cols: &[usize],
        seq_q: usize,
        seq_k: usize,
        device: &Device,
    ) -> Tensor<2, Bool> {
        assert!(
            self.blocks.is_none(),
            "columns_mask is for patterns without a block layout"
        );
        let positions: Vec<i64> = cols.iter().map(|&c| c as i64).collect();
        let col_pos = Tensor::<1, Int>::from_data(
            burn::tensor::TensorData::new(positions, [cols.len()]),
            device,
        );
        self.rule_mask(rows, col_pos, seq_q, seq_k)
    }

    /// Band, strided columns and causal rule over explicit column positions.
    fn rule_mask(
        &self,
        rows: Range<usize>,
        col_pos: Tensor<1, Int>,
        seq_q: usize,
        seq_k: usize,
    ) -> Tensor<2, Bool> {
        let device = col_pos.device();
        let (nr, nc) = (rows.len(), col_pos.dims()[0]);
        let offset = seq_k as i64 - seq_q as i64;
        let row_pos: Tensor<2, Int> = Tensor::<1, Int>::arange(
            rows.start as i64 + offset..rows.end as i64 + offset,
            &device,
        )
        .reshape([nr, 1])
        .expand([nr, nc]);
        let col_pos: Tensor<2, Int> = col_pos.reshape([1, nc]).expand([nr, nc]);
        let diff = col_pos.clone() - row_pos;
        let within = |w: Window, diff: &Tensor<2, Int>| -> Tensor<2, Bool> {
            let mut m = Tensor::<2, Bool>::full([nr, nc], true, &device);
            // A side at least `seq_q + seq_k` bounds nothing (and may not fit the backend's
            // integer type): skip it.
            let reach = (seq_q + seq_k) as i64;
            if let Some(l) = w.left.map(signed).filter(|&l| l < reach) {
                m = m.bool_and(diff.clone().greater_equal_elem(-l));
            }
            if let Some(r) = w.right.map(signed).filter(|&r| r < reach) {
                m = m.bool_and(diff.clone().lower_equal_elem(r));
            }
            m
        };
        let mut mask = within(self.window, &diff);
        if let Some(s) = self.stride_within(seq_k) {
            mask = mask.bool_or(col_pos.remainder_scalar(s as i64).equal_elem(0));
        }
        if self.causal {
            mask = mask.bool_and(within(self.causal_window(), &diff));
        }
        mask
    }
}

/// The element mask of a block layout over `rows x cols`, by expanding the block grid.
fn block_mask(
    layout: &BlockLayout,
    rows: Range<usize>,
    cols: Range<usize>,
    device: &Device,
) -> Tensor<2, Bool> {
    let (qb0, qb1) = (
        rows.start / layout.block_q,
        (rows.end - 1) / layout.block_q + 1,
    );
    let (kb0, kb1) = (
        cols.start / layout.block_k,
        (cols.end - 1) / layout.block_k + 1,
    );
    let (nqb, nkb) = (qb1 - qb0, kb1 - kb0);
    // One value per block (not per element): the layout is block-granular by construction.
    let grid: Vec<bool> = (qb0..qb1)
        .flat_map(|qb| (kb0..kb1).map(move |kb| (qb, kb)))
        .map(|(qb, kb)| layout.is_active(qb, kb))
        .collect();
    let grid =
        Tensor::<1, Bool>::from_data(burn::tensor::TensorData::new(grid, [nqb * nkb]), device)
            .reshape([nqb, 1, nkb, 1])
            .expand([nqb, layout.block_q, nkb, layout.block_k])
            .reshape([nqb * layout.block_q, nkb * layout.block_k]);
    let r0 = rows.start - qb0 * layout.block_q;
    let c0 = cols.start - kb0 * layout.block_k;
    grid.slice([r0..r0 + rows.len(), c0..c0 + cols.len()])
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;

    fn patterns(seq_q: usize, seq_k: usize) -> Vec<KeyPattern> {
        vec![
            KeyPattern::default(),
            KeyPattern::band(Window::FULL, true),
            KeyPattern::band(Window::symmetric(6), false),
            KeyPattern::band(Window::new(Some(0), Some(3)), true),
            KeyPattern::band(Window::new(Some(4), Some(0)), false),
            KeyPattern {
                window: Window::symmetric(4),
                stride: Some(5),
                causal: true,
                blocks: None,
            },
            // Past any length: only column 0 is strided.
            KeyPattern {
                window: Window::new(Some(1), Some(2)),
                stride: Some(usize::MAX),
                causal: false,
                blocks: None,
            },
            KeyPattern {
                blocks: Some(BlockLayout::random(seq_q, seq_k, 4, 0.3, 7).unwrap()),
                ..KeyPattern::default()
            },
            KeyPattern {
                causal: true,
                blocks: Some(BlockLayout::random(seq_q, seq_k, 3, 0.5, 1).unwrap()),
                ..KeyPattern::default()
            },
        ]
    }

    #[test]
    fn tile_mask_and_classification_match_scalar_definition() {
        let device = Device::ndarray();
        for (seq_q, seq_k) in [(13, 13), (5, 17), (17, 5), (1, 9)] {
            for p in patterns(seq_q, seq_k) {
                for (rows, cols) in [(0..seq_q, 0..seq_k), (1..4.min(seq_q), 2..seq_k)] {
                    if rows.is_empty() || cols.is_empty() {
                        continue;
                    }
                    let mask = p.tile_mask(rows.clone(), cols.clone(), seq_q, seq_k, &device);
                    let got: Vec<bool> = mask.into_data().to_vec().unwrap();
                    let want: Vec<bool> = rows
                        .clone()
                        .flat_map(|i| cols.clone().map(move |j| (i, j)))
                        .map(|(i, j)| p.visible(i, j, seq_q, seq_k))
                        .collect();
                    assert_eq!(got, want, "{p:?} rows {rows:?} cols {cols:?}");
                    let cover = p.classify(rows.clone(), cols.clone(), seq_q, seq_k);
                    let expected = if want.iter().all(|v| *v) {
                        TileCover::Full
                    } else if want.iter().all(|v| !v) {
                        TileCover::Empty
                    } else {
                        TileCover::Partial
                    };
                    // Classification may be conservative (Partial) but never wrong.
                    assert!(
                        cover == expected || cover == TileCover::Partial,
                        "{p:?}: {cover:?} vs {expected:?}"
                    );
                    assert!(
                        !(cover == TileCover::Partial
                            && expected != TileCover::Partial
                            && p.blocks.is_none()
                            && p.stride.is_none()),
                        "band tiles are classified exactly: {p:?} {rows:?} {cols:?}"
                    );
                }
                // The key range covers every visible key.
                for i in 0..seq_q {
                    let r = p.key_range(i..i + 1, seq_q, seq_k);
                    for j in 0..seq_k {
                        if p.visible(i, j, seq_q, seq_k) {
                            assert!(r.contains(&j), "{p:?}: key {j} of query {i} outside {r:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn random_layout_is_seeded_and_keeps_diagonal() {
        let a = BlockLayout::random(64, 64, 8, 0.2, 42).unwrap();
        let b = BlockLayout::random(64, 64, 8, 0.2, 42).unwrap();
        let c = BlockLayout::random(64, 64, 8, 0.2, 43).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for qb in 0..a.q_blocks {
            assert!(a.is_active(qb, qb));
        }
        assert!(a.density() < 0.6, "density {}", a.density());
    }

    #[test]
    fn random_layout_rejects_bad_density() {
        let err = BlockLayout::random(8, 8, 4, 1.5, 0).unwrap_err();
        assert!(err.to_string().contains("1.5"), "{err}");
        let err = BlockLayout::random(8, 8, 4, 0.0, 0).unwrap_err();
        assert!(err.to_string().contains("density"), "{err}");
    }
}
