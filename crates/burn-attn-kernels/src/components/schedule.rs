//! Which block (of query rows, or of keys) and which head a cube takes.
//!
//! CUDA hands cubes to the SMs in launch order, `x` fastest. Where the blocks of one head
//! cost different amounts (causal: query block `i` visits `i + 1` key blocks), the
//! natural order (block = `CUBE_POS_X`, head = `CUBE_POS_Y`) dispatches every head's
//! heaviest block last, so the final wave is a tail of heavy cubes on a half-idle GPU. The
//! heavy-first order takes the heads in groups and, within a group, each block for every
//! head of the group before the next block, heaviest block first: the cubes left for the
//! end are the light ones (longest-processing-time-first scheduling), while the cubes in
//! flight together still share a few heads' K and V in L2.

use cubecl::prelude::*;

/// The block and head of one cube ([`cube_block`]).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct CubeBlock {
    /// Index of the cube's block along the rows (or keys) it owns.
    pub block: usize,
    /// Index into the grid's `y` extent (batch * heads, or batch * kv_heads).
    pub head: usize,
}

/// The block and head this cube computes, for a grid of `CUBE_COUNT_X` blocks by
/// `CUBE_COUNT_Y` heads. `group` 0 keeps the natural order; `group` > 0 takes heads in
/// groups of that many (the last group may be smaller) and, in each, the blocks heaviest
/// first: from the last block down where `heaviest_last` (causal query blocks), from the
/// first up otherwise (causal key blocks). Every (block, head) pair is taken exactly once.
#[cube]
pub(crate) fn cube_block(group: u32, #[comptime] heaviest_last: bool) -> CubeBlock {
    let blocks = CUBE_COUNT_X as usize;
    let heads = CUBE_COUNT_Y as usize;
    let mut block = CUBE_POS_X as usize;
    let mut head = CUBE_POS_Y as usize;
    if group > 0 {
        let group = group as usize;
        let launch = head * blocks + block;
        let group_index = launch / (group * blocks);
        let first = group_index * group;
        let size = min(group, heads - first);
        let within = launch - group_index * group * blocks;
        let step = within / size;
        head = first + within % size;
        if comptime!(heaviest_last) {
            block = blocks - 1 - step;
        } else {
            block = step;
        }
    }
    CubeBlock { block, head }
}

/// What one cube of an attention kernel serves: its block, its batch and heads, and the
/// sequence sizes, read from `q` `[batch, heads, seq_q, d]` and `k` `[batch, kv_heads,
/// seq_k, d]`.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct CubeHead {
    /// The cube's block of rows (query-major) or keys (key-major).
    pub block: usize,
    pub batch: usize,
    /// The query head (query-major), or the first query head of the kv head's group
    /// (key-major).
    pub head: usize,
    pub kv_head: usize,
    /// Query heads per kv head.
    pub group: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    /// `seq_k - seq_q`: the bottom-right alignment of the band.
    pub offset: i32,
}

#[cube]
impl CubeHead {
    /// A cube of a grid over query blocks and `batch * heads` (forwards, dQ), heaviest
    /// block first in the heavy-first order (`heavy_first` heads per group; 0: natural).
    pub fn query_major<F: Float>(q: &Tensor<F>, k: &Tensor<F>, heavy_first: u32) -> CubeHead {
        let cube = cube_block(heavy_first, true);
        let heads = q.shape(1);
        let group = heads / k.shape(1);
        let head = cube.head % heads;
        CubeHead {
            block: cube.block,
            batch: cube.head / heads,
            head,
            kv_head: head / group,
            group,
            seq_q: q.shape(2),
            seq_k: k.shape(2),
            offset: k.shape(2) as i32 - q.shape(2) as i32,
        }
    }

    /// A cube of a grid over key blocks and `batch * kv_heads` (dK/dV), heaviest block
    /// (the first, under a causal band) first in the heavy-first order.
    pub fn key_major<F: Float>(q: &Tensor<F>, k: &Tensor<F>, heavy_first: u32) -> CubeHead {
        let cube = cube_block(heavy_first, false);
        let kv_heads = k.shape(1);
        let group = q.shape(1) / kv_heads;
        let kv_head = cube.head % kv_heads;
        CubeHead {
            block: cube.block,
            batch: cube.head / kv_heads,
            head: kv_head * group,
            kv_head,
            group,
            seq_q: q.shape(2),
            seq_k: k.shape(2),
            offset: k.shape(2) as i32 - q.shape(2) as i32,
        }
    }
}

/// Test support for [`cube_order_probe`](crate::launch::cube_order_probe): the cube at launch index `y * blocks + x` writes
/// the block and head `cube_block` gives it to `order[2 * index]` and `order[2 * index
/// + 1]`.
#[cube(launch)]
pub fn cube_order_probe_kernel(
    order: &mut Tensor<f32>,
    group: u32,
    #[comptime] heaviest_last: bool,
) {
    if UNIT_POS == 0 {
        let cube = cube_block(group, heaviest_last);
        let launch = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
        order[2 * launch] = f32::cast_from(cube.block);
        order[2 * launch + 1] = f32::cast_from(cube.head);
    }
}
