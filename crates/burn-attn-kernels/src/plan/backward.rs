//! Plans of the backward kernels (a dQ kernel over query blocks, a dK/dV kernel over key
//! blocks; no atomics), or why they decline.

use super::forced::allowed;
use super::forward::{
    mma_support, staging, store_vector, tile_rows, unit_budget, MMA_ROWS_PER_TILE,
};
use super::schedule::heavy_first;
use super::unit_tiles::{backward_loop_iterations, UnitTiles, SOFTWARE_LOOP_BUDGET};
use super::{DeviceCaps, ForcedPlan, Grid, Offsets, Problem, Unsupported};

/// Planes per cube of the matrix-unit backward kernels; each owns 16 rows (query rows of
/// the dQ kernel, key rows of the dK/dV kernel).
const MMA_BACKWARD_PLANES: usize = 4;

/// Largest head or value dim, padded to 16, of the matrix-unit backward: the dK/dV kernel
/// keeps both gradient rows in f32 registers (`dim_pad / 2 + value_dim_pad / 2` per lane),
/// which past 128 would leave too few registers for the tile's scores (spills).
pub const MMA_BACKWARD_MAX_DIM: usize = 128;

/// Mean visible keys per query row from which the dQ kernel takes two row tiles per plane.
const DQ_TWO_TILES_FROM_KEYS: usize = 2048;

/// The backward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackwardKernel {
    /// `flash_mma_backward`: matrix units, f16/bf16, head and value dims up to 128.
    Mma,
    /// `flash_unit_backward`: the portable kernels, every runtime and dtype.
    Unit,
}

/// The launch plan of the matrix-unit backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaBackwardPlan {
    /// Planes per cube (16 rows each).
    pub planes: usize,
    /// Keys per streamed tile of the dQ kernel.
    pub block_k: usize,
    /// Row tiles of 16 query rows per plane of the dQ kernel (1 or 2).
    pub dq_row_tiles: usize,
    /// Query rows per streamed tile of the dK/dV kernel.
    pub block_q: usize,
    /// Head dim padded to 16.
    pub dim_pad: usize,
    /// Value dim padded to 16.
    pub value_dim_pad: usize,
    /// Asynchronous double-buffered staging (else synchronous, one buffer).
    pub async_copy: bool,
    /// Values per store of dQ and dK.
    pub dim_vector: usize,
    /// Values per store of dV.
    pub value_dim_vector: usize,
    /// Grid of the dQ kernel (query blocks).
    pub dq_grid: Grid,
    /// Grid of the dK/dV kernel (key blocks).
    pub kv_grid: Grid,
    /// Heavy-first group of the dQ launch.
    pub dq_heavy_first: u32,
    /// Heavy-first group of the dK/dV launch.
    pub kv_heavy_first: u32,
    /// Width of the element offsets.
    pub offsets: Offsets,
}

/// The launch plan of the portable backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitBackwardPlan {
    /// Tiles of the dQ kernel (query rows x keys).
    pub dq_tiles: UnitTiles,
    /// Tiles of the dK/dV kernel (keys x query rows).
    pub kv_tiles: UnitTiles,
    /// Grid of the dQ kernel.
    pub dq_grid: Grid,
    /// Grid of the dK/dV kernel.
    pub kv_grid: Grid,
    /// Heavy-first group of the dQ launch.
    pub dq_heavy_first: u32,
    /// Heavy-first group of the dK/dV launch.
    pub kv_heavy_first: u32,
    /// Width of the element offsets.
    pub offsets: Offsets,
}

/// The plan of one backward kernel pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardPlan {
    /// `flash_mma_backward`.
    Mma(MmaBackwardPlan),
    /// `flash_unit_backward`.
    Unit(UnitBackwardPlan),
}

/// The plan of `kernel` for `problem` (whose `aligned_rows` covers q, k, v and d_out) on
/// `caps`, or why it declines.
pub fn plan_backward(
    kernel: BackwardKernel,
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<BackwardPlan, Unsupported> {
    match kernel {
        BackwardKernel::Mma => plan_mma_backward(problem, caps, forced).map(BackwardPlan::Mma),
        BackwardKernel::Unit => plan_unit_backward(problem, caps, forced).map(BackwardPlan::Unit),
    }
}

/// `flash_mma_backward`: each kernel stages its cube's own rows (Q and dO, or K and V) and
/// one streamed tile per stage (K and V, or Q and dO plus lse and D).
fn plan_mma_backward(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<MmaBackwardPlan, Unsupported> {
    mma_support(problem, caps, forced)?;
    let sizes = &problem.sizes;
    let dim_pad = sizes.dim.div_ceil(16) * 16;
    let value_dim_pad = sizes.value_dim.div_ceil(16) * 16;
    let widest = dim_pad.max(value_dim_pad);
    if widest > MMA_BACKWARD_MAX_DIM {
        return Err(Unsupported::HeadDim {
            dim: sizes.dim,
            value_dim: sizes.value_dim,
            max: MMA_BACKWARD_MAX_DIM,
        });
    }
    let planes = MMA_BACKWARD_PLANES;
    let rows = MMA_ROWS_PER_TILE * planes;
    let forced_dq_rows = allowed("dq_rows", forced.dq_rows, &[16, 32])?;
    let kv_grid = sizes.key_grid(rows)?;
    let elem = problem.precision.size();
    let shared = caps.shared_memory;
    let (async_copy, stages) = staging(problem, caps, forced);
    // All tiles padded `[row][d_pad + 8]`; the dK/dV kernel adds each streamed tile's lse
    // and D (8 bytes a row). 128 bytes cover the 16-byte alignment of the four tiles and
    // the two 8-byte barriers.
    let bytes = |rows: usize, block: usize, per_row: usize| {
        (rows + stages * block) * (dim_pad + 8 + value_dim_pad + 8) * elem
            + stages * block * per_row
            + 128
    };
    // Streamed tiles: 64 rows up to head dim 64; past it 32 keys per dQ tile (fewer live
    // score registers) but 64 queries per dK/dV tile, which measured 8-14% faster at d =
    // 128 (64 keys per dQ tile were 2-3% slower); 16 where shared memory is short.
    let (dq_candidates, dkdv_candidates): (&[usize], &[usize]) = if widest > 64 {
        (&[32, 16], &[64, 32, 16])
    } else {
        (&[64, 32, 16], &[64, 32, 16])
    };
    let pick = |field, forced, rows, per_row, candidates| {
        let bytes = |block| bytes(rows, block, per_row);
        tile_rows(field, forced, &[16, 32, 64], candidates, bytes, shared)
    };
    // Two dQ row tiles per plane share each K and V fragment: 3-6% faster from rows of
    // 2048 visible keys at d = 128 (H100), 2-6% slower at 1024-key windows and causal n =
    // 1024, unmeasured below d = 128. One tile where two would take narrower key tiles.
    let two_tiles =
        widest > 64 && problem.band.mean_row_keys(sizes.seq_k) >= DQ_TWO_TILES_FROM_KEYS;
    let dq_pick = |row_tiles: usize| {
        pick(
            "dq_block_k",
            forced.dq_block_k,
            rows * row_tiles,
            0,
            dq_candidates,
        )
    };
    let (dq_row_tiles, block_k) = match forced_dq_rows {
        Some(r) => (r / 16, dq_pick(r / 16)?),
        None => {
            let one = dq_pick(1)?;
            // Two tiles only with key tiles as wide as one tile's (shared memory).
            match two_tiles.then(|| dq_pick(2)) {
                Some(Ok(two)) if two >= one => (2, two),
                _ => (1, one),
            }
        }
    };
    let dq_grid = sizes.query_grid(rows * dq_row_tiles)?;
    let block_q = pick(
        "dkdv_block_q",
        forced.dkdv_block_q,
        rows,
        8,
        dkdv_candidates,
    )?;
    Ok(MmaBackwardPlan {
        planes,
        block_k,
        dq_row_tiles,
        block_q,
        dim_pad,
        value_dim_pad,
        async_copy,
        dim_vector: store_vector(sizes.dim, elem),
        value_dim_vector: store_vector(sizes.value_dim, elem),
        dq_heavy_first: heavy_first(&problem.band, &dq_grid, forced)?,
        kv_heavy_first: heavy_first(&problem.band, &kv_grid, forced)?,
        dq_grid,
        kv_grid,
        offsets: problem.offsets(caps)?,
    })
}

/// `flash_unit_backward`. On software adapters it declines calls whose units could run
/// more loop iterations than llvmpipe allows one invocation: at head dim 128 in f32 on
/// lavapipe about 3360 keys per query row and 1664 query rows (times the query heads per
/// kv head) per key.
fn plan_unit_backward(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<UnitBackwardPlan, Unsupported> {
    let sizes = &problem.sizes;
    let (dim, value_dim) = (sizes.dim, sizes.value_dim);
    let elem = problem.precision.size();
    let widths = dim + value_dim;
    let budget = unit_budget(caps, forced)?;
    let choose = |bytes: &dyn Fn(&UnitTiles) -> usize, registers: &dyn Fn(&UnitTiles) -> usize| {
        UnitTiles::choose(budget, bytes, registers, |_| true).ok_or(Unsupported::SharedMemory {
            needed: UnitTiles::smallest_bytes(bytes),
            available: budget,
        })
    };
    // dQ kernel (query rows x keys): Q and dO transposed and padded, one buffer for V then
    // K (transposed, padded), dS (f32, padded), and each row's lse and D.
    let dq_tiles = choose(
        &|t| {
            (widths * (t.rows + 1) + dim.max(value_dim) * (t.cols + 1)) * elem
                + (t.rows * (t.cols + 1) + 2 * t.rows) * 4
        },
        &|t| t.unit_rows() * (2 * t.unit_cols() + t.unit_width(dim)),
    )?;
    // dK/dV kernel (keys x query rows): K, V, Q and dO transposed and padded, P^T and dS^T
    // (f32, padded), and each query row's lse and D.
    let kv_tiles = choose(
        &|t| {
            widths * (t.rows + 1 + t.cols + 1) * elem + (2 * t.rows * (t.cols + 1) + 2 * t.cols) * 4
        },
        &|t| t.unit_rows() * (2 * t.unit_cols() + t.unit_width(dim) + t.unit_width(value_dim)),
    )?;
    let dq_grid = sizes.query_grid(dq_tiles.rows)?;
    let kv_grid = sizes.key_grid(kv_tiles.rows)?;
    if caps.software_adapter && !forced.lift_loop_cap {
        let iterations = backward_loop_iterations(sizes, &problem.band, &dq_tiles, &kv_tiles);
        // A small margin for what the count could leave out.
        if iterations + 64 > SOFTWARE_LOOP_BUDGET {
            return Err(Unsupported::LoopBudget {
                iterations,
                budget: SOFTWARE_LOOP_BUDGET,
            });
        }
    }
    Ok(UnitBackwardPlan {
        dq_tiles,
        kv_tiles,
        dq_heavy_first: heavy_first(&problem.band, &dq_grid, forced)?,
        kv_heavy_first: heavy_first(&problem.band, &kv_grid, forced)?,
        dq_grid,
        kv_grid,
        offsets: problem.offsets(caps)?,
    })
}
