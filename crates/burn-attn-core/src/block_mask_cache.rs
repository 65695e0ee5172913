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

/// Plans a cache holds at once (a call's pattern, or the band calls strided columns split
/// into), the least recently used dropped first.
const HELD_PLANS: usize = 8;

/// The lock of a cache, which a panic elsewhere does not leave unusable (the data under it
/// is only ever replaced whole).
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cache of block-sparse plans for the calls made with the options that hold it
/// ([`AttentionOptions::with_block_mask_cache`](crate::AttentionOptions::with_block_mask_cache)):
/// one per pattern, at most eight (the calls strided columns split into take one each),
/// the least recently used dropped first. Clones share one cache, and two options are
/// equal when they share it.
///
/// The plan of a pattern without a block layout is built for the longest call seen and
/// serves every call it holds (fewer keys, queries at its rows: shorter sequences and
/// decoding steps) with a part of its cover ([`BlockCover::part`]); a longer call
/// replaces it with one for at least an eighth more keys and the rows later decoding
/// steps need, so a decoding cache that grows by a token per step rebuilds it a
/// logarithmic number of times and holds a band of rows, not a square. A block layout is built
/// for its lengths, so its plan serves those only. Another kernel grid or device replaces
/// a pattern's plan, so a module keeps one cache per layer. It holds device memory (each
/// plan's cover and, once a call with no other mask asks for them, four `q_blocks x
/// k_blocks` i32 tensors of lists and their transposes) until dropped or
/// [cleared](Self::clear).
#[derive(Clone, Default)]
pub struct BlockMaskCache(Arc<Mutex<Vec<Held>>>);

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
        let mut held = locked(&self.0);
        // The pattern's plan, if held, moves last (the most recently used).
        let reusable = match held.iter().position(|h| h.serves(pattern, grid, device)) {
            Some(at) => {
                let h = held.remove(at);
                held.push(h);
                true
            }
            None => false,
        };
        if reusable {
            let h = held.last_mut().expect("just moved last");
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
        let build_grid = match held.last() {
            Some(h) if reusable && pattern.blocks.is_none() => Self::grown(h.grid, grid),
            _ => grid,
        };
        let on_call_grid = build_grid == grid;
        let plan = PatternPlan::build(pattern, build_grid, device, lists && on_call_grid)?;
        let call_plan = if on_call_grid {
            plan.clone()
        } else {
            PatternPlan::of_cover(plan.cover.part(grid.seq_q, grid.seq_k)?, None, lists)
        };
        // The pattern's plan is replaced (it outgrew its grid), or one more is held.
        if reusable {
            held.pop();
        } else if held.len() == HELD_PLANS {
            held.remove(0);
        }
        held.push(Held {
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

    /// The grid of the plan used last, if any.
    pub fn held_grid(&self) -> Option<BlockGrid> {
        locked(&self.0).last().map(|h| h.grid)
    }

    /// How many plans the cache holds.
    pub fn held_plans(&self) -> usize {
        locked(&self.0).len()
    }

    /// Drops the held plans (and their device memory).
    pub fn clear(&self) {
        locked(&self.0).clear();
    }
}

impl core::fmt::Debug for BlockMaskCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0.try_lock() {
            Ok(held) => write!(f, "BlockMaskCache({} plans)", held.len()),
            Err(_) => write!(f, "BlockMaskCache(in use)"),
        }
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
/// builds (about a hundred device ops), the others reuse. The ids cannot change after they are made, so a held plan is always theirs.
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
    /// On `grid` and `device`, the cover of the ids `queries` and `keys` (their owner's,
    /// ordered, of the grid's lengths), the ids in i32 and, with `lists` (a pattern and how
    /// to build its lists from the ids' cover, for a call whose only other mask is that
    /// pattern), the call's i32 lists: held, or built and held.
    pub(crate) fn plan(
        &self,
        queries: &Tensor<2, Int>,
        keys: &Tensor<2, Int>,
        grid: BlockGrid,
        device: &Device,
        lists: Option<(&KeyPattern, &dyn Fn(BlockCover) -> BlockMask)>,
    ) -> (BlockCover, [Tensor<2, Int>; 2], Option<BlockMask>) {
        let mut held = locked(&self.0);
        let at = match held
            .iter()
            .position(|p| p.grid == grid && same_device(&p.device, device))
        {
            Some(at) => at,
            None => {
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
                held.len() - 1
            }
        };
        let plan = &mut held[at];
        let mask =
            lists.map(
                |(pattern, build)| match plan.masks.iter().find(|(p, _)| p == pattern) {
                    Some((_, mask)) => mask.clone(),
                    None => {
                        if plan.masks.len() == HELD_DOCUMENT_PATTERNS {
                            plan.masks.remove(0);
                        }
                        let mask = build(plan.cover.clone()).cast(IntDType::I32);
                        plan.masks.push((pattern.clone(), mask.clone()));
                        mask
                    }
                },
            );
        (plan.cover.clone(), plan.ids.clone(), mask)
    }

    /// How many grids the ids hold plans for.
    pub(crate) fn held_grids(&self) -> usize {
        locked(&self.0).len()
    }
}

impl core::fmt::Debug for DocumentPlans {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0.try_lock() {
            Ok(held) => write!(f, "DocumentPlans({} grids)", held.len()),
            Err(_) => write!(f, "DocumentPlans(in use)"),
        }
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
        let held_lists = || cache.0.lock().unwrap().last().unwrap().plan.mask.is_some();
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
        // Another pattern is held beside it (the one used last comes last); its lists are
        // built when a call asks.
        let other = KeyPattern::band(Window::symmetric(3), false);
        let plan = cache.plan(&other, grid(20, 20), &device, false).unwrap();
        assert!(plan.mask.is_none() && !held_lists());
        cache.plan(&other, grid(20, 20), &device, true).unwrap();
        assert_eq!((held(), cache.held_plans()), ((20, 20), 2));
        assert!(held_lists());
        served(260, 255);
        assert_eq!((held(), cache.held_plans()), ((260, 255), 2));
        // At most HELD_PLANS, the least recently used dropped first.
        for w in 0..HELD_PLANS {
            let band = KeyPattern::band(Window::new(Some(10 + w), Some(10 + w)), false);
            cache.plan(&band, grid(20, 20), &device, false).unwrap();
        }
        assert_eq!(cache.held_plans(), HELD_PLANS);
        let first = KeyPattern::band(Window::new(Some(10), Some(10)), false);
        assert!(cache.0.lock().unwrap().iter().all(|h| h.pattern != pattern));
        assert!(cache.0.lock().unwrap().iter().any(|h| h.pattern == first));
        cache.clear();
        assert_eq!(cache.held_plans(), 0);
    }

    /// Document ids build their cover once per grid and device and their lists once per
    /// pattern: later calls get the held tensors (the same device buffers), and equal
    /// lists to a fresh build; clones share the plans.
    #[test]
    fn document_ids_hold_their_plans() {
        use std::cell::Cell;
        let device = Device::ndarray();
        let ids: Vec<i64> = (0..2 * 40).map(|at| ((at % 40) / 13) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 40]), &device);
        let docs = crate::DocumentIds::self_attention(ids.clone());
        let shared = docs.clone();
        let band = KeyPattern::band(Window::symmetric(6), false);
        let plain = KeyPattern::default();
        let built = Cell::new(0);
        // A call's lists through the clone, counting list builds.
        let lists = |pattern: &KeyPattern, grid: BlockGrid| {
            let pattern_cover = BlockCover::of_pattern(pattern, grid, &device).unwrap();
            let build = |held: BlockCover| {
                built.set(built.get() + 1);
                BlockMask::new(pattern_cover.clone().intersect(held).unwrap())
            };
            let (cover, _, mask) = shared.plan(grid, &device, Some((pattern, &build)));
            (cover, mask.expect("lists asked for"))
        };
        let as_vec = |t: Tensor<4, Int>| t.into_data().convert::<i64>().to_vec::<i64>().unwrap();
        let all = |m: BlockMask| {
            [
                m.partial_index,
                m.full_index,
                m.t_partial_index,
                m.t_full_index,
                m.partial_count.unsqueeze(),
                m.full_count.unsqueeze(),
                m.t_partial_count.unsqueeze(),
                m.t_full_count.unsqueeze(),
            ]
            .map(as_vec)
        };
        let (cover, held) = lists(&band, grid(40, 40));
        assert_eq!(built.get(), 1);
        assert_eq!(held.partial_index.dtype(), IntDType::I32.into());
        // The held cover and lists equal a fresh build's, all eight lists.
        let fresh_ids = BlockCover::of_documents(ids.clone(), ids.clone(), grid(40, 40)).unwrap();
        assert_eq!(cover.to_covers(), fresh_ids.to_covers());
        let fresh = BlockMask::new(
            BlockCover::of_pattern(&band, grid(40, 40), &device)
                .unwrap()
                .intersect(fresh_ids)
                .unwrap(),
        );
        assert_eq!(all(held), all(fresh));
        // The same pattern and grid again: nothing built.
        lists(&band, grid(40, 40));
        assert_eq!(
            built.get(),
            1,
            "the held lists serve the same pattern and grid"
        );
        // Another pattern builds its lists on the held cover; another grid its cover.
        lists(&plain, grid(40, 40));
        assert_eq!((built.get(), docs.held_plans()), (2, 1));
        let wide = BlockGrid::new(16, 8, 40, 40).unwrap();
        lists(&band, wide);
        assert_eq!((built.get(), docs.held_plans()), (3, 2));
        // A call with other masks takes the cover alone.
        let (_, _, none) = docs.plan(grid(40, 40), &device, None);
        assert!(none.is_none());
        assert_eq!(built.get(), 3);
        // At most HELD_DOCUMENT_GRIDS grids, the oldest dropped first.
        for block in [4, 5, 10, 20] {
            lists(&band, BlockGrid::new(block, 8, 40, 40).unwrap());
        }
        assert_eq!(docs.held_plans(), HELD_DOCUMENT_GRIDS);
        let before = built.get();
        lists(&band, grid(40, 40));
        assert_eq!(built.get(), before + 1, "the first grid was dropped");
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
