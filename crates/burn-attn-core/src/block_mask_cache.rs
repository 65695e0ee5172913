//! A block-sparse plan kept across calls: the cover and lists of one [`KeyPattern`] on the
//! kernels' grid, and its block layout's flags on the device, built on the first call and
//! reused while the pattern, block sizes and device stay the same (a model's layer at a
//! fixed length: every training step after the first; shorter calls and decoding steps
//! from a part of its cover). Building them takes a dozen device ops and, for a block
//! layout, an upload per call; a hit at the built lengths takes none, a part the lists'
//! few ops.

// Only the block-sparse kernels read the plans: a build without them keeps the type (the
// options and modules hold one) but never fills it.
#![cfg_attr(not(feature = "cube"), allow(dead_code))]

use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Int, IntDType, Tensor, TensorData};

use crate::block_mask::{BlockCover, BlockGrid, BlockMask};
use crate::error::AttentionError;
use crate::pattern::KeyPattern;

/// The device plan of one pattern on one grid.
#[derive(Debug, Clone)]
pub(crate) struct PatternPlan {
    /// The pattern's cover, to intersect with a call's other masks.
    pub cover: BlockCover,
    /// Its lists, for calls with no other mask (built where a call asks for them).
    pub mask: Option<BlockMask>,
    /// The block layout's active flags (`[q_blocks * k_blocks]`, 0 or 1), where it has one.
    pub layout: Option<Tensor<1, Int>>,
}

impl PatternPlan {
    /// Builds the plan of `pattern` on `grid`, with its lists where `lists`.
    pub(crate) fn build(
        pattern: &KeyPattern,
        grid: BlockGrid,
        device: &Device,
        lists: bool,
    ) -> Result<Self, AttentionError> {
        let cover = BlockCover::of_pattern(pattern, grid, device)?;
        let layout = pattern.blocks.as_ref().map(|l| {
            let active: Vec<i32> = l.active.iter().map(|&a| i32::from(a)).collect();
            let n = active.len();
            Tensor::<1, Int>::from_data(TensorData::new(active, [n]), device)
        });
        Ok(Self::of_cover(cover, layout, lists))
    }

    /// The plan of `cover`, with the block layout's flags where the pattern has one and
    /// its lists where `lists`.
    pub(crate) fn of_cover(cover: BlockCover, layout: Option<Tensor<1, Int>>, lists: bool) -> Self {
        Self {
            mask: lists.then(|| lists_of(&cover)),
            cover,
            layout: layout.map(|l| l.cast(IntDType::I32)),
        }
    }
}

/// The lists of `cover`, in the kernels' i32 once, so calls served from a cache cast
/// nothing.
fn lists_of(cover: &BlockCover) -> BlockMask {
    BlockMask::new(cover.clone()).cast(IntDType::I32)
}

/// The plan held, with what it was built for.
#[derive(Debug)]
struct Held {
    pattern: KeyPattern,
    grid: BlockGrid,
    device: Device,
    plan: PatternPlan,
}

impl Held {
    /// Whether the plan was built for `pattern`'s blocks of `grid`'s sizes on `device`.
    fn serves(&self, pattern: &KeyPattern, grid: BlockGrid, device: &Device) -> bool {
        (self.grid.block_q, self.grid.block_k) == (grid.block_q, grid.block_k)
            && same_device(&self.device, device)
            && &self.pattern == pattern
    }
}

/// Whether tensors made on `held` serve calls on `call`. Device equality may not tell an
/// autodiff device from its inner one; tensors made on one are kept to its calls (a module
/// trains, then evaluates).
fn same_device(held: &Device, call: &Device) -> bool {
    held == call && held.is_autodiff() == call.is_autodiff()
}

/// A cache of one block-sparse plan for the calls made with the options that hold it
/// ([`AttentionOptions::with_block_mask_cache`](crate::AttentionOptions::with_block_mask_cache));
/// clones share one cache, and two options are equal when they share it.
///
/// The plan of a pattern without a block layout is built for the longest call seen and
/// serves every call it holds (fewer keys, queries at its rows: shorter sequences and
/// decoding steps) with a part of its cover ([`BlockCover::part`]); a longer call
/// replaces it with one for at least an eighth more keys and the rows later decoding
/// steps need, so a decoding cache that grows by a token per step rebuilds it a
/// logarithmic number of times and holds a band of rows, not a square. A block layout is built
/// for its lengths, so its plan serves those only. Another pattern, kernel grid or device
/// replaces the plan, so a module keeps one per layer. It holds device memory (the cover
/// and four `q_blocks x k_blocks` i32 tensors of lists and their transposes) until
/// dropped or [cleared](Self::clear).
#[derive(Clone, Default)]
pub struct BlockMaskCache(Arc<Mutex<Option<Held>>>);

impl BlockMaskCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan of `pattern` on `grid` and `device`, with its lists where `lists` (a call
    /// with no other mask): the held one when it was built for them, a part of it when it
    /// holds the call, a new one (then held) otherwise. Lists are built when a call first
    /// asks for them.
    pub(crate) fn plan(
        &self,
        pattern: &KeyPattern,
        grid: BlockGrid,
        device: &Device,
        lists: bool,
    ) -> Result<PatternPlan, AttentionError> {
        let mut held = self.0.lock().expect("block mask cache lock");
        let reusable = held.as_mut().filter(|h| h.serves(pattern, grid, device));
        if let Some(h) = reusable {
            if h.grid == grid {
                if lists && h.plan.mask.is_none() {
                    h.plan.mask = Some(lists_of(&h.plan.cover));
                }
                return Ok(h.plan.clone());
            }
            if pattern.blocks.is_none() {
                if let Ok(cover) = h.plan.cover.part(grid.seq_q, grid.seq_k) {
                    return Ok(PatternPlan::of_cover(cover, None, lists));
                }
            }
        }
        let build_grid = match held.as_ref().filter(|h| h.serves(pattern, grid, device)) {
            Some(h) if pattern.blocks.is_none() => Self::grown(h.grid, grid),
            _ => grid,
        };
        let on_call_grid = build_grid == grid;
        let plan = PatternPlan::build(pattern, build_grid, device, lists && on_call_grid)?;
        let call_plan = if on_call_grid {
            plan.clone()
        } else {
            PatternPlan::of_cover(plan.cover.part(grid.seq_q, grid.seq_k)?, None, lists)
        };
        *held = Some(Held {
            pattern: pattern.clone(),
            grid: build_grid,
            device: device.clone(),
            plan,
        });
        Ok(call_plan)
    }

    /// The grid a plan held for `held` is rebuilt on for a call on `call` it does not hold:
    /// keys for the call and at least an eighth more than held, and the rows of the call's
    /// queries and of every later call's that adds as many keys as queries (a decoding
    /// step), so a decoding cache holds a band of the last rows, not a square (`call`'s
    /// own grid where it has more queries than keys, or where the grid is past the lists'
    /// 32-bit positions).
    fn grown(held: BlockGrid, call: BlockGrid) -> BlockGrid {
        if call.seq_q > call.seq_k {
            return call;
        }
        let keys = call
            .seq_k
            .max(held.seq_k + (held.seq_k / 8).max(held.block_k));
        let rows = keys - (call.seq_k - call.seq_q);
        BlockGrid::new(call.block_q, call.block_k, rows, keys).unwrap_or(call)
    }

    /// The grid of the held plan, if any.
    pub fn held_grid(&self) -> Option<BlockGrid> {
        self.0
            .lock()
            .expect("block mask cache lock")
            .as_ref()
            .map(|h| h.grid)
    }

    /// Drops the held plan (and its device memory).
    pub fn clear(&self) {
        *self.0.lock().expect("block mask cache lock") = None;
    }
}

impl core::fmt::Debug for BlockMaskCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "BlockMaskCache({:?})", self.held_grid())
    }
}

/// Caches share identity, not contents.
impl PartialEq for BlockMaskCache {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// How many grids (dtype and head-dim classes) one batch's document ids hold plans for,
/// and how many patterns per grid; the oldest goes first.
const HELD_DOCUMENT_GRIDS: usize = 4;
const HELD_DOCUMENT_PATTERNS: usize = 4;

/// The block plans of one batch's document ids ([`DocumentIds`](crate::DocumentIds)),
/// shared by the ids' clones: per grid and device, the ids' cover and the ids in the
/// kernels' i32, and per pattern the lists of calls whose only other mask is that pattern.
/// A model passes one batch's ids to every layer: the first call on each grid and pattern
/// builds (some hundred device ops, which short calls wait on the host for), the others
/// reuse. The ids cannot change after they are made, so a held plan is always theirs.
#[derive(Clone, Default)]
pub(crate) struct DocumentPlans(Arc<Mutex<Vec<DocumentPlan>>>);

/// The plans of the ids on one grid and device.
struct DocumentPlan {
    grid: BlockGrid,
    device: Device,
    cover: BlockCover,
    ids: [Tensor<2, Int>; 2],
    masks: Vec<(KeyPattern, BlockMask)>,
}

impl DocumentPlans {
    /// The cover of the ids `queries` and `keys` (ordered, of the grid's lengths) on
    /// `grid` and `device`, and the ids in i32: held, or built and held.
    pub(crate) fn cover(
        &self,
        queries: &Tensor<2, Int>,
        keys: &Tensor<2, Int>,
        grid: BlockGrid,
        device: &Device,
    ) -> (BlockCover, [Tensor<2, Int>; 2]) {
        let mut held = self.0.lock().expect("document plans lock");
        if Self::held(&mut held, grid, device).is_none() {
            if held.len() == HELD_DOCUMENT_GRIDS {
                held.remove(0);
            }
            held.push(DocumentPlan {
                grid,
                device: device.clone(),
                cover: BlockCover::of_sorted_documents(queries.clone(), keys.clone(), grid),
                ids: [queries, keys].map(|ids| ids.clone().cast(IntDType::I32)),
                masks: Vec::new(),
            });
        }
        let plan = Self::held(&mut held, grid, device).expect("just held");
        (plan.cover.clone(), plan.ids.clone())
    }

    /// The i32 lists of a call on `grid` and `device` whose masks are `pattern` and the
    /// ids alone: held, or `build` (from the ids' cover) and held. The ids' cover on the
    /// grid must be held ([`DocumentPlans::cover`]).
    pub(crate) fn mask(
        &self,
        pattern: &KeyPattern,
        grid: BlockGrid,
        device: &Device,
        build: impl FnOnce(BlockCover) -> BlockMask,
    ) -> BlockMask {
        let mut held = self.0.lock().expect("document plans lock");
        let plan = Self::held(&mut held, grid, device).expect("the ids' cover is held");
        if let Some((_, mask)) = plan.masks.iter().find(|(p, _)| p == pattern) {
            return mask.clone();
        }
        if plan.masks.len() == HELD_DOCUMENT_PATTERNS {
            plan.masks.remove(0);
        }
        let mask = build(plan.cover.clone()).cast(IntDType::I32);
        plan.masks.push((pattern.clone(), mask.clone()));
        mask
    }

    /// The held plan of `grid` on `device`.
    fn held<'a>(
        held: &'a mut [DocumentPlan],
        grid: BlockGrid,
        device: &Device,
    ) -> Option<&'a mut DocumentPlan> {
        held.iter_mut()
            .find(|p| p.grid == grid && same_device(&p.device, device))
    }

    /// How many grids the ids hold plans for.
    pub(crate) fn held_grids(&self) -> usize {
        self.0.lock().expect("document plans lock").len()
    }
}

impl core::fmt::Debug for DocumentPlans {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "DocumentPlans({} grids)", self.held_grids())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Window;
    use crate::pattern::BlockLayout;

    fn grid(seq_q: usize, seq_k: usize) -> BlockGrid {
        BlockGrid::new(8, 8, seq_q, seq_k).unwrap()
    }

    /// Shorter calls and decoding steps are served from the held plan's cover, which grows
    /// by at least an eighth, with the rows later steps read, when a call outgrows it; the
    /// part served equals the part of a plan built for the held lengths.
    #[test]
    fn a_held_plan_serves_shorter_calls_and_grows_for_longer_ones() {
        let device = Device::ndarray();
        let pattern = KeyPattern {
            window: Window::causal(12),
            stride: Some(16),
            causal: true,
            blocks: None,
        };
        let cache = BlockMaskCache::new();
        let held = || {
            let g = cache.held_grid().expect("held");
            (g.seq_q, g.seq_k)
        };
        let served = |seq_q, seq_k| {
            let plan = cache
                .plan(&pattern, grid(seq_q, seq_k), &device, true)
                .unwrap();
            assert_eq!(
                plan.mask.as_ref().expect("lists").grid(),
                grid(seq_q, seq_k)
            );
            plan
        };
        served(40, 40);
        assert_eq!(held(), (40, 40));
        let part = served(30, 30);
        assert_eq!(held(), (40, 40));
        let built = PatternPlan::build(&pattern, grid(40, 40), &device, false).unwrap();
        let want = built.cover.part(30, 30).unwrap();
        assert_eq!(part.cover.to_covers(), want.to_covers());
        // Decoding: one query against a growing cache.
        for seq_k in 33..=40 {
            served(1, seq_k);
        }
        assert_eq!(held(), (40, 40));
        // 41 keys: 8 more than 40 (a block; an eighth is 5), and the 1 + 7 last rows
        // that the steps up to 48 keys read.
        served(1, 41);
        assert_eq!(held(), (8, 48));
        let held_lists = || {
            cache
                .0
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .plan
                .mask
                .is_some()
        };
        assert!(
            !held_lists(),
            "a grown plan builds no lists for its own grid"
        );
        for seq_k in 42..=48 {
            served(1, seq_k);
        }
        served(4, 48);
        assert_eq!(held(), (8, 48));
        served(2, 49);
        assert_eq!(held(), (9, 56), "an eighth of 48 is 6, below a block");
        served(1, 200);
        assert_eq!(held(), (1, 200), "at least the call's keys");
        // A longer square call: square.
        served(230, 230);
        assert_eq!(held(), (230, 230));
        // More queries than keys: the call's own grid.
        served(260, 255);
        assert_eq!(held(), (260, 255));
        // Another pattern replaces the plan; its lists are built when a call asks.
        let other = KeyPattern::band(Window::symmetric(3), false);
        let plan = cache.plan(&other, grid(20, 20), &device, false).unwrap();
        assert!(plan.mask.is_none() && !held_lists());
        cache.plan(&other, grid(20, 20), &device, true).unwrap();
        assert_eq!(held(), (20, 20));
        assert!(held_lists());
    }

    /// Document ids build their cover once per grid and device and their lists once per
    /// pattern: later calls get the held tensors (the same device buffers), and equal
    /// lists to a fresh build; clones share the plans.
    #[test]
    fn document_ids_hold_their_plans() {
        let device = Device::ndarray();
        let ids: Vec<i64> = (0..2 * 40).map(|at| ((at % 40) / 13) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 40]), &device);
        let docs = crate::DocumentIds::self_attention(ids.clone());
        let shared = docs.clone();
        let plans = docs.plans();
        let band = KeyPattern::band(Window::symmetric(6), false);
        let plain = KeyPattern::default();
        let lists = |pattern: &KeyPattern, grid: BlockGrid| {
            let (cover, _) = shared.plans().cover(&ids, &ids, grid, &device);
            let pattern_cover = BlockCover::of_pattern(pattern, grid, &device).unwrap();
            let mut built = 0;
            let mask = plans.mask(pattern, grid, &device, |held| {
                built += 1;
                BlockMask::new(pattern_cover.intersect(held).unwrap())
            });
            (cover, mask, built)
        };
        let as_vec = |t: Tensor<4, Int>| t.into_data().convert::<i64>().to_vec::<i64>().unwrap();
        let (first, mask, built) = lists(&band, grid(40, 40));
        assert_eq!(built, 1);
        let (again, held, built) = lists(&band, grid(40, 40));
        assert_eq!(built, 0, "the held lists serve the same pattern and grid");
        assert_eq!(first.to_covers(), again.to_covers());
        assert_eq!(held.partial_index.dtype(), IntDType::I32.into());
        assert_eq!(as_vec(mask.partial_index), as_vec(held.partial_index));
        let fresh = BlockMask::new(
            BlockCover::of_pattern(&band, grid(40, 40), &device)
                .unwrap()
                .intersect(
                    BlockCover::of_documents(ids.clone(), ids.clone(), grid(40, 40)).unwrap(),
                )
                .unwrap(),
        );
        assert_eq!(as_vec(held.full_index), as_vec(fresh.full_index));
        assert_eq!(as_vec(held.t_partial_index), as_vec(fresh.t_partial_index));
        // Another pattern builds its lists on the held cover; another grid its cover.
        assert_eq!(lists(&plain, grid(40, 40)).2, 1);
        assert_eq!(docs.held_plans(), 1);
        let wide = BlockGrid::new(16, 8, 40, 40).unwrap();
        assert_eq!(lists(&band, wide).2, 1);
        assert_eq!(docs.held_plans(), 2);
        // At most HELD_DOCUMENT_GRIDS grids, the oldest dropped first.
        for block in [4, 5, 10, 20] {
            lists(&band, BlockGrid::new(block, 8, 40, 40).unwrap());
        }
        assert_eq!(docs.held_plans(), HELD_DOCUMENT_GRIDS);
        assert_eq!(
            lists(&band, grid(40, 40)).2,
            1,
            "the first grid was dropped"
        );
    }

    /// A block layout's plan serves the lengths it was built for only.
    #[test]
    fn a_layout_plan_serves_its_lengths_only() {
        let device = Device::ndarray();
        let layout = |n| KeyPattern {
            blocks: Some(BlockLayout::random(n, n, 8, 0.5, 3).unwrap()),
            ..KeyPattern::default()
        };
        let cache = BlockMaskCache::new();
        cache
            .plan(&layout(40), grid(40, 40), &device, true)
            .unwrap();
        cache
            .plan(&layout(30), grid(30, 30), &device, true)
            .unwrap();
        let g = cache.held_grid().unwrap();
        assert_eq!((g.seq_q, g.seq_k), (30, 30));
        assert!(cache
            .plan(&layout(30), grid(20, 20), &device, true)
            .is_err());
    }
}
