//! The staging pipeline of a tile loop: the two tiles a step reads (K and V per key tile
//! in the forward and dQ passes, Q and dO per query tile in the dK/dV pass), either copied
//! with `cp.async` into two buffers, the next step's copies in flight while this one is
//! computed (one barrier per buffer), or loaded into one buffer with plain loads.

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use super::staging::{stage_rows_async, stage_rows_sync, HeadRows, StageTile};

/// One barrier per buffer of a double-buffered tile pair: buffer `i`'s copies are
/// committed on, and waited for at, barrier `i`.
#[derive(CubeType)]
pub(crate) struct BufferBarriers {
    first: Shared<Barrier>,
    second: Shared<Barrier>,
}

#[cube]
impl BufferBarriers {
    /// Both barriers, for the whole cube (their initialisation synchronises the cube, which
    /// also publishes shared memory written before it).
    pub fn new() -> BufferBarriers {
        BufferBarriers {
            first: Barrier::shared(CUBE_DIM, UNIT_POS == 0),
            second: Barrier::shared(CUBE_DIM, UNIT_POS == 0),
        }
    }

    /// Tracks this unit's copies issued since the last commit on `buffer`'s barrier.
    pub fn commit(&self, buffer: usize) {
        if buffer == 0 {
            self.first.commit_copy_async();
        } else {
            self.second.commit_copy_async();
        }
    }

    /// Waits until every copy committed on `buffer`'s barrier has landed.
    pub fn wait(&self, buffer: usize) {
        if buffer == 0 {
            self.first.arrive_and_wait();
        } else {
            self.second.arrive_and_wait();
        }
    }
}

/// Stages rows `row0..` of `a` and of `b` into buffer `buffer` of their tiles: with
/// `cp.async` (the caller commits them) or with plain loads (the caller synchronises).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_pair<F: Float>(
    a: &Tensor<F>,
    a_at: HeadRows,
    a_smem: &mut [F],
    b: &Tensor<F>,
    b_at: HeadRows,
    b_smem: &mut [F],
    row0: usize,
    buffer: usize,
    tid: usize,
    #[comptime] a_tile: StageTile,
    #[comptime] b_tile: StageTile,
    #[comptime] async_copy: bool,
) {
    if comptime!(async_copy) {
        stage_rows_async::<F>(
            a,
            a_at,
            row0,
            a_smem,
            buffer * comptime!(a_tile.len()),
            tid,
            a_tile,
        );
        stage_rows_async::<F>(
            b,
            b_at,
            row0,
            b_smem,
            buffer * comptime!(b_tile.len()),
            tid,
            b_tile,
        );
    } else {
        stage_rows_sync::<F>(
            a,
            a_at,
            row0,
            a_smem,
            buffer * comptime!(a_tile.len()),
            tid,
            a_tile,
        );
        stage_rows_sync::<F>(
            b,
            b_at,
            row0,
            b_smem,
            buffer * comptime!(b_tile.len()),
            tid,
            b_tile,
        );
    }
}

/// The top of one step of a tile loop over rows `row0..` of `a` and `b`: when it returns,
/// buffer `stage` holds them for the whole cube. With `cp.async` (the rows of this step
/// were issued a step earlier), first issues the rows of the next step, `next..`, into the
/// other buffer where `has_next` (uniform over the cube: every unit commits, and arrives,
/// on the same barriers), then waits for `stage`; the other buffer was last read before
/// the previous step's closing cube barrier. Otherwise stages the rows into buffer 0 and
/// synchronises the cube.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn acquire_pair<F: Float>(
    a: &Tensor<F>,
    a_at: HeadRows,
    a_smem: &mut [F],
    b: &Tensor<F>,
    b_at: HeadRows,
    b_smem: &mut [F],
    barriers: &BufferBarriers,
    row0: usize,
    next: usize,
    has_next: bool,
    stage: usize,
    tid: usize,
    #[comptime] a_tile: StageTile,
    #[comptime] b_tile: StageTile,
    #[comptime] async_copy: bool,
) {
    if comptime!(async_copy) {
        if has_next {
            stage_pair::<F>(
                a,
                a_at,
                a_smem,
                b,
                b_at,
                b_smem,
                next,
                1 - stage,
                tid,
                a_tile,
                b_tile,
                true,
            );
            barriers.commit(1 - stage);
        }
        barriers.wait(stage);
    } else {
        stage_pair::<F>(
            a, a_at, a_smem, b, b_at, b_smem, row0, 0usize, tid, a_tile, b_tile, false,
        );
        sync_cube();
    }
}
