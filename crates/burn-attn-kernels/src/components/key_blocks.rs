//! The key blocks one query block visits under a block-sparse plan: its partially visible
//! blocks (the element rules apply), then its fully visible ones, each list in increasing
//! order. The lists are `[batch, heads, q_blocks, k_blocks]` with counts `[batch, heads,
//! q_blocks]` (i32; a batch or head dimension of 1 serves every batch or head).

use cubecl::prelude::*;

/// Where one query block's lists start, and their lengths.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct KeyBlockList {
    partial_at: usize,
    full_at: usize,
    partial_step: usize,
    full_step: usize,
    /// Partially visible blocks.
    pub partial: u32,
    /// Every listed block.
    pub len: u32,
    /// Blocks of the other side (key blocks, or query blocks of transposed lists).
    blocks: u32,
}

/// Where `(batch, head, block)` starts in `t` (`[batch or 1, heads or 1, blocks, ..]`): a
/// dimension of size 1 serves every batch or head.
#[cube]
fn list_at(t: &Tensor<i32>, batch: usize, head: usize, block: usize) -> usize {
    let b = select(t.shape(0) == 1, 0, batch);
    let h = select(t.shape(1) == 1, 0, head);
    b * t.stride(0) + h * t.stride(1) + block * t.stride(2)
}

#[cube]
impl KeyBlockList {
    /// The lists of query block `block` of `(batch, head)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        partial_count: &Tensor<i32>,
        partial_index: &Tensor<i32>,
        full_count: &Tensor<i32>,
        full_index: &Tensor<i32>,
        batch: usize,
        head: usize,
        block: usize,
    ) -> KeyBlockList {
        // A list holds at most one entry per key block: counts past that (lists not built
        // by `BlockMask`) are cut, so the walk stays bounded; `block` maps an index outside
        // the blocks to tiles the kernel skips.
        let blocks = partial_index.shape(3) as u32;
        let partial = min(
            partial_count[list_at(partial_count, batch, head, block)] as u32,
            blocks,
        );
        let full = min(
            full_count[list_at(full_count, batch, head, block)] as u32,
            blocks - partial,
        );
        KeyBlockList {
            partial_at: list_at(partial_index, batch, head, block),
            full_at: list_at(full_index, batch, head, block),
            partial_step: partial_index.stride(3),
            full_step: full_index.stride(3),
            partial,
            len: partial + full,
            blocks,
        }
    }

    /// The key block of entry `e < len`: the partial list first, then the full one. An
    /// index outside `0..blocks` (lists not built by `BlockMask`) becomes `blocks`, whose
    /// tiles lie past the keys and are skipped, so no tile start wraps around.
    pub fn block(&self, e: u32, partial_index: &Tensor<i32>, full_index: &Tensor<i32>) -> u32 {
        let index = if e < self.partial {
            partial_index[self.partial_at + e as usize * self.partial_step]
        } else {
            full_index[self.full_at + (e - self.partial) as usize * self.full_step]
        };
        select(
            index < 0 || index as u32 > self.blocks,
            self.blocks,
            index as u32,
        )
    }

    /// The first row (key, or query of transposed lists) of step `s` of a walk over the
    /// list's blocks in tiles of `tile` rows, `tiles_per_block` to a block: entry `s /
    /// tiles_per_block`, its `s % tiles_per_block`-th tile.
    pub fn tile_start(
        &self,
        s: u32,
        partial_index: &Tensor<i32>,
        full_index: &Tensor<i32>,
        tiles_per_block: u32,
        #[comptime] tile: usize,
    ) -> i32 {
        let block = self.block(s / tiles_per_block, partial_index, full_index);
        ((block * tiles_per_block + s % tiles_per_block) * comptime!(tile as u32)) as i32
    }
}
