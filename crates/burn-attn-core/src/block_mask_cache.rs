//! A block-sparse plan kept across calls: the cover and lists of one [`KeyPattern`] on the
//! kernels' grid, and its block layout's flags on the device, built on the first call and
//! reused while the pattern, grid and device stay the same (a model's layer at a fixed
//! length: every training step after the first). Building them takes a dozen device ops
//! and, for a block layout, an upload per call; a hit takes none.

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
    /// Its lists, for calls with no other mask.
    pub mask: BlockMask,
    /// The block layout's active flags (`[q_blocks * k_blocks]`, 0 or 1), where it has one.
    pub layout: Option<Tensor<1, Int>>,
}

impl PatternPlan {
    /// Builds the plan of `pattern` on `grid`.
    pub(crate) fn build(
        pattern: &KeyPattern,
        grid: BlockGrid,
        device: &Device,
    ) -> Result<Self, AttentionError> {
        let cover = BlockCover::of_pattern(pattern, grid, device)?;
        let layout = pattern.blocks.as_ref().map(|l| {
            let active: Vec<i32> = l.active.iter().map(|&a| i32::from(a)).collect();
            let n = active.len();
            Tensor::<1, Int>::from_data(TensorData::new(active, [n]), device)
        });
        // In the kernels' i32 once, so calls served from a cache cast nothing.
        Ok(Self {
            mask: BlockMask::new(cover.clone()).cast(IntDType::I32),
            cover,
            layout: layout.map(|l| l.cast(IntDType::I32)),
        })
    }
}

/// The plan held, with what it was built for.
#[derive(Debug)]
struct Held {
    pattern: KeyPattern,
    grid: BlockGrid,
    device: Device,
    plan: PatternPlan,
}

/// A cache of one block-sparse plan for the calls made with the options that hold it
/// ([`AttentionOptions::with_block_mask_cache`](crate::AttentionOptions::with_block_mask_cache));
/// clones share one cache, and two options are equal when they share it. A call whose
/// pattern, lengths, kernel grid or device differ from the held plan's replaces it, so a
/// module keeps one per layer. It holds device memory (four `q_blocks x k_blocks` i32
/// tensors of lists and their transposes) until dropped or [cleared](Self::clear).
#[derive(Clone, Default)]
pub struct BlockMaskCache(Arc<Mutex<Option<Held>>>);

impl BlockMaskCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan of `pattern` on `grid` and `device`: the held one when it was built for
    /// them, a new one (then held) otherwise.
    pub(crate) fn plan(
        &self,
        pattern: &KeyPattern,
        grid: BlockGrid,
        device: &Device,
    ) -> Result<PatternPlan, AttentionError> {
        let mut held = self.0.lock().expect("block mask cache lock");
        if let Some(h) = held.as_ref() {
            // Device equality may not tell an autodiff device from its inner one; tensors
            // made on one are kept to its calls (a module trains, then evaluates).
            let same_device = &h.device == device && h.device.is_autodiff() == device.is_autodiff();
            if h.grid == grid && same_device && &h.pattern == pattern {
                return Ok(h.plan.clone());
            }
        }
        let plan = PatternPlan::build(pattern, grid, device)?;
        *held = Some(Held {
            pattern: pattern.clone(),
            grid,
            device: device.clone(),
            plan: plan.clone(),
        });
        Ok(plan)
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
