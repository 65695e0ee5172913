//! Plans of the forward kernels: which tiles, planes and staging each kernel would launch
//! for a problem on a device, or why it declines.

use super::forced::allowed;
use super::schedule::heavy_first;
use super::unit_tiles::{UnitTiles, SOFTWARE_LOOP_BUDGET, UNIT_SHARED_BUDGET};
use super::{DeviceCaps, ForcedPlan, Grid, Offsets, Precision, Problem, RuntimeKind, Unsupported};

/// Query rows per row tile of the matrix-unit kernels (the `m` of `m16n8k16`).
pub const MMA_ROWS_PER_TILE: usize = 16;

/// Planes per cube of the matrix-unit forwards.
const MMA_PLANES: usize = 4;

/// The widest band (keys per row) that runs one row tile per plane in the matrix-unit
/// forward (see [`mma_row_tiles`]).
const NARROW_BAND_KEYS: usize = 512;

/// The forward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardKernel {
    /// `flash_mma`: matrix units, f16/bf16, CUDA sm_80+.
    Mma,
    /// `flash_mma` on tf32 products: f32 inputs, CUDA sm_80+ (opt-in).
    Tf32,
    /// `flash_unit`: the portable kernel, every runtime and dtype.
    Unit,
}

/// The launch plan of the matrix-unit forward (`flash_mma`, either products).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaPlan {
    /// Planes (32-unit warps) per cube.
    pub planes: usize,
    /// Row tiles of 16 query rows per plane.
    pub row_tiles: usize,
    /// Keys per tile.
    pub block_k: usize,
    /// Head dim padded for the instruction.
    pub dim_pad: usize,
    /// Value dim padded for the instruction.
    pub value_dim_pad: usize,
    /// Asynchronous double-buffered staging (else synchronous, one buffer).
    pub async_copy: bool,
    /// Values per output store of the epilogue.
    pub out_vector: usize,
    /// Heads per group of the heavy-first order (0: natural order).
    pub heavy_first: u32,
    /// The grid (one split deep).
    pub grid: Grid,
    /// Splits of the keys (1: none), as [`UnitPlan::key_splits`].
    pub key_splits: usize,
    /// Keys per split (a multiple of `block_k`; at least `seq_k` without splits).
    pub split_keys: usize,
    /// Shared memory per cube, in bytes.
    pub shared_bytes: usize,
    /// Width of the element offsets.
    pub offsets: Offsets,
}

impl MmaPlan {
    /// Query rows per cube.
    pub fn block_q(&self) -> usize {
        MMA_ROWS_PER_TILE * self.row_tiles * self.planes
    }
}

/// The launch plan of the portable forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitPlan {
    /// Tiles and units per cube.
    pub tiles: UnitTiles,
    /// Heads per group of the heavy-first order (0: natural order).
    pub heavy_first: u32,
    /// The grid (one split deep).
    pub grid: Grid,
    /// Splits of the keys (1: none): the grid is this deep, each split's rows are merged
    /// by their log-sum-exp (`merge_key_splits`).
    pub key_splits: usize,
    /// Keys per split (a multiple of the key tile; at least `seq_k` without splits).
    pub split_keys: usize,
    /// Width of the element offsets.
    pub offsets: Offsets,
}

/// Cubes below which a call without enough query rows to fill the device splits its keys.
const SPLIT_BELOW_CUBES: usize = 128;
/// Cubes the splits aim at.
const SPLIT_TARGET_CUBES: usize = 256;
/// Fewest key tiles per split.
const SPLIT_MIN_TILES: usize = 8;

/// Key splits of a portable forward on `grid` with key tiles of `cols` (forced, or chosen:
/// where the grid has fewer than [`SPLIT_BELOW_CUBES`] cubes and a cube's band spans most
/// keys, as many as bring it to [`SPLIT_TARGET_CUBES`] with at least [`SPLIT_MIN_TILES`]
/// tiles each), and the keys per split.
fn key_splits(
    problem: &Problem,
    grid: &Grid,
    rows: usize,
    cols: usize,
    forced: &ForcedPlan,
) -> Result<(usize, usize), Unsupported> {
    let seq_k = problem.sizes.seq_k.max(1);
    let cubes = grid.x as usize * grid.y as usize;
    let splits = match allowed(
        "key_splits",
        forced.key_splits,
        &(1..=64).collect::<Vec<_>>(),
    )? {
        Some(splits) => splits,
        None if cubes < SPLIT_BELOW_CUBES && 2 * problem.band.cube_span(rows, seq_k) >= seq_k => {
            SPLIT_TARGET_CUBES
                .div_ceil(cubes.max(1))
                .min(seq_k / (SPLIT_MIN_TILES * cols))
                .clamp(1, 64)
        }
        None => 1,
    };
    // The partial outputs (`splits` times the output) and their merge (one unit per output
    // element) count in 32 bits.
    let s = &problem.sizes;
    let out = s.batch * s.heads * s.seq_q * s.value_dim;
    let fits = |splits: usize| splits == 1 || out.saturating_mul(splits) <= u32::MAX as usize;
    let splits = match (forced.key_splits, fits(splits)) {
        (_, true) => splits,
        (Some(_), false) => {
            return Err(Unsupported::Forced(format!(
                "key_splits = {splits}: {splits} partial outputs of {out} elements (at most \
                 {} in all)",
                u32::MAX
            )))
        }
        (None, false) => 1,
    };
    let split_keys = seq_k.div_ceil(splits).div_ceil(cols) * cols;
    Ok((splits, split_keys))
}

/// The plan of one forward kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPlan {
    /// `flash_mma`.
    Mma(MmaPlan),
    /// `flash_mma` on tf32 products (f32 inputs).
    Tf32(MmaPlan),
    /// `flash_unit`.
    Unit(UnitPlan),
}

/// The plan of `kernel` for `problem` on `caps`, or why it declines. `tf32` off makes the
/// tf32 kernel decline ([`Unsupported::NotRequested`]): tf32 rounds the products' inputs
/// to 10 mantissa bits, which f32 callers must ask for.
pub fn plan_forward(
    kernel: ForwardKernel,
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<ForwardPlan, Unsupported> {
    match kernel {
        ForwardKernel::Mma => plan_mma(problem, caps, forced).map(ForwardPlan::Mma),
        ForwardKernel::Tf32 => plan_tf32(problem, caps, forced).map(ForwardPlan::Tf32),
        ForwardKernel::Unit => plan_unit(problem, caps, forced).map(ForwardPlan::Unit),
    }
}

/// Whether the matrix-unit kernels (`m16n8k16`, forward and backward) can run the problem's
/// dtype on the device: f16 or bf16, CUDA (the kernels hard-code PTX's register layout),
/// and the instruction with f32 accumulation plus `ldmatrix` for the dtype.
pub(crate) fn mma_support(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<(), Unsupported> {
    if forced.no_matrix_units {
        return Err(Unsupported::NotRequested(
            "matrix units (left out by the forced plan)",
        ));
    }
    if problem.precision == Precision::F32 {
        return Err(Unsupported::Precision {
            got: problem.precision,
            takes: "f16 and bf16",
        });
    }
    cuda_only(caps)?;
    if !caps.mma_for(problem.precision) {
        return Err(Unsupported::MatrixInstruction {
            instruction: "mma.sync.m16n8k16 (f32 accumulation) with ldmatrix",
            precision: problem.precision,
        });
    }
    Ok(())
}

fn cuda_only(caps: &DeviceCaps) -> Result<(), Unsupported> {
    if caps.runtime != RuntimeKind::Cuda {
        return Err(Unsupported::Runtime {
            got: caps.runtime_name,
            needs: "CUDA",
        });
    }
    Ok(())
}

/// Asynchronous double-buffered staging where the device has `cp.async`, the rows allow
/// 16-byte copies, the offsets take it ([`Offsets::take_async_copy`]), and the plan does
/// not force synchronous staging.
pub(crate) fn staging(problem: &Problem, caps: &DeviceCaps, forced: &ForcedPlan) -> (bool, usize) {
    let async_copy = !forced.sync_staging
        && caps.copy_async
        && problem.aligned_rows
        && problem.offsets(caps).is_ok_and(Offsets::take_async_copy);
    (async_copy, if async_copy { 2 } else { 1 })
}

/// Values per store of a matrix-unit kernel's staged epilogue for contiguous rows of
/// `cols` values of `elem` bytes: the widest of 16 bytes' worth (8 16-bit or 4 32-bit
/// values), half and a quarter of that, down to 2, dividing `cols`, so that a vector never
/// straddles rows and starts at a multiple of its size; 1 otherwise.
pub fn store_vector(cols: usize, elem: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .filter(|n| n * elem <= 16)
        .find(|n| cols.is_multiple_of(*n))
        .unwrap_or(1)
}

/// Values per output store of the matrix-unit forwards: [`store_vector`] where their
/// epilogue stages the output rows in shared memory (value dims padded no wider than head
/// dims), 1 otherwise.
fn mma_out_vector(dim_pad: usize, value_dim_pad: usize, value_dim: usize, elem: usize) -> usize {
    if value_dim_pad > dim_pad {
        return 1;
    }
    store_vector(value_dim, elem)
}

/// A streamed tile's rows (keys, or query rows in the dK/dV kernel): the forced size if
/// it is one of `allowed` and its `bytes` fit `shared` (a decline if not), else the first
/// of `candidates` (largest first) that fits.
pub(crate) fn tile_rows(
    field: &'static str,
    forced: Option<usize>,
    allowed_sizes: &[usize],
    candidates: &[usize],
    bytes: impl Fn(usize) -> usize,
    shared: usize,
) -> Result<usize, Unsupported> {
    if let Some(rows) = allowed(field, forced, allowed_sizes)? {
        if bytes(rows) > shared {
            return Err(Unsupported::Forced(format!(
                "{field} = {rows} needs {} bytes of shared memory, the device has {shared}",
                bytes(rows)
            )));
        }
        return Ok(rows);
    }
    candidates
        .iter()
        .copied()
        .find(|&rows| bytes(rows) <= shared)
        .ok_or(Unsupported::SharedMemory {
            needed: bytes(candidates[candidates.len() - 1]),
            available: shared,
        })
}

/// Row tiles per plane of the matrix-unit forward: two (32 rows, each K/V fragment feeding
/// four MMAs) while the O accumulators of both fit the registers (value dims up to 128),
/// else one.
///
/// Narrow bands take one row tile too: a cube's key range is its rows plus the band, so
/// for a window of `w` keys a 128-row cube stages and walks `128 + w` keys for `w` useful
/// ones per row; 64-row cubes cut that waste (at `w` = 257: 384 -> 320 keys), which
/// outweighs the fragment reuse of two row tiles while `w` is at most
/// [`NARROW_BAND_KEYS`]. One row tile needs twice the cubes along the rows: past the
/// grid's limit there, two row tiles (where their registers fit) if those fit the grid.
fn mma_row_tiles(
    problem: &Problem,
    value_dim_pad: usize,
    planes: usize,
    forced_rows: Option<usize>,
) -> usize {
    let two_fit = value_dim_pad <= 128;
    let tiles = match forced_rows {
        Some(rows) => rows / MMA_ROWS_PER_TILE,
        None if two_fit && problem.band.row_keys() > NARROW_BAND_KEYS => 2,
        None => 1,
    };
    let fits_grid = |tiles: usize| {
        problem
            .sizes
            .query_grid(MMA_ROWS_PER_TILE * tiles * planes)
            .is_ok()
    };
    if tiles == 1 && two_fit && !fits_grid(1) && fits_grid(2) {
        2
    } else {
        tiles
    }
}

/// What the two matrix-unit forwards' plans choose differently; [`matrix_plan`] makes the
/// rest of the plan from it.
struct MatrixTiles {
    planes: usize,
    row_tiles: usize,
    dim_pad: usize,
    value_dim_pad: usize,
    /// Elements added to each staged row (16 bytes' worth, so `ldmatrix` hits distinct
    /// banks).
    row_pad: usize,
    /// The forced-plan field naming the key tile, and its forced value.
    key_field: &'static str,
    forced_block_k: Option<usize>,
    /// Key tiles allowed, largest first.
    key_sizes: &'static [usize],
    /// Whether the default skips the largest key tile (fewer live score registers).
    skip_largest: bool,
}

/// The plan of a matrix-unit forward from its tile choices: grid, staging, key tile
/// (the largest that fits shared memory: one Q tile plus one K and one V tile per stage,
/// two stages with asynchronous staging), output vector and cube order.
fn matrix_plan(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
    t: MatrixTiles,
) -> Result<MmaPlan, Unsupported> {
    let block_q = MMA_ROWS_PER_TILE * t.row_tiles * t.planes;
    let grid = problem.sizes.query_grid(block_q)?;
    let elem = problem.precision.size();
    let (async_copy, stages) = staging(problem, caps, forced);
    // Padded Q tile [block_q][dim_pad + pad], and `stages` K tiles [block_k][dim_pad + pad]
    // and V tiles [block_k][value_dim_pad + pad], plus the two barriers.
    let (q_row, kv_row) = (
        t.dim_pad + t.row_pad,
        t.dim_pad + t.value_dim_pad + 2 * t.row_pad,
    );
    let bytes = |bk: usize| (block_q * q_row + stages * bk * kv_row) * elem + 64;
    let block_k = tile_rows(
        t.key_field,
        t.forced_block_k,
        t.key_sizes,
        &t.key_sizes[usize::from(t.skip_largest)..],
        bytes,
        caps.shared_memory,
    )?;
    let (key_splits, split_keys) = key_splits(problem, &grid, block_q, block_k, forced)?;
    Ok(MmaPlan {
        planes: t.planes,
        row_tiles: t.row_tiles,
        block_k,
        dim_pad: t.dim_pad,
        value_dim_pad: t.value_dim_pad,
        async_copy,
        out_vector: mma_out_vector(t.dim_pad, t.value_dim_pad, problem.sizes.value_dim, elem),
        heavy_first: heavy_first(&problem.band, &grid, forced)?,
        key_splits,
        split_keys,
        grid,
        shared_bytes: bytes(block_k),
        offsets: problem.offsets(caps)?,
    })
}

/// `flash_mma` (`mma.sync.m16n8k16`, f16/bf16). Head and value dims are padded to 16.
fn plan_mma(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<MmaPlan, Unsupported> {
    mma_support(problem, caps, forced)?;
    let sizes = &problem.sizes;
    let dim_pad = sizes.dim.div_ceil(16) * 16;
    let value_dim_pad = sizes.value_dim.div_ceil(16) * 16;
    let planes = allowed("mma_planes", forced.mma_planes, &[2, 4, 8])?.unwrap_or(MMA_PLANES);
    let forced_rows = allowed("mma_rows", forced.mma_rows, &[16, 32])?;
    let row_tiles = mma_row_tiles(problem, value_dim_pad, planes, forced_rows);
    // 64 keys per tile where they fit, except past head dim 64 with one row tile per plane
    // (narrow bands, value dims past 128) or past head dim 128: 32 there. On the H200 at
    // d = 128, 64 keys ran 7-10% faster than 32 with two row tiles (full, causal, windows
    // of 1024) and 8% slower with one (window 256).
    let tiles = MatrixTiles {
        planes,
        row_tiles,
        dim_pad,
        value_dim_pad,
        row_pad: 8,
        key_field: "mma_block_k",
        forced_block_k: forced.mma_block_k,
        key_sizes: &[64, 32, 16],
        skip_largest: dim_pad > 64 && (row_tiles == 1 || dim_pad > 128),
    };
    matrix_plan(problem, caps, forced, tiles)
}

/// `flash_mma` on tf32 products (`mma.sync.m16n8k8`, f32 inputs). Head and value dims are
/// padded to 8. One row tile per plane (at head dim 128 the O accumulators alone take 64
/// registers per lane); 32 keys per tile past head dim 64 (fewer live accumulator
/// registers; measured: 64 keys ran 43-45% slower there, one cube per multiprocessor).
fn plan_tf32(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<MmaPlan, Unsupported> {
    if forced.no_matrix_units {
        return Err(Unsupported::NotRequested(
            "matrix units (left out by the forced plan)",
        ));
    }
    if problem.precision != Precision::F32 {
        return Err(Unsupported::Precision {
            got: problem.precision,
            takes: "f32",
        });
    }
    cuda_only(caps)?;
    if !caps.mma_tf32 {
        return Err(Unsupported::MatrixInstruction {
            instruction: "mma.sync.m16n8k8 on tf32 (f32 accumulation)",
            precision: problem.precision,
        });
    }
    let sizes = &problem.sizes;
    let dim_pad = sizes.dim.div_ceil(8) * 8;
    let value_dim_pad = sizes.value_dim.div_ceil(8) * 8;
    // Two row tiles' O accumulators need 256 registers per lane past value dim 128.
    let row_tiles = match allowed("tf32_rows", forced.tf32_rows, &[16, 32])? {
        Some(32) if value_dim_pad > 128 => {
            return Err(Unsupported::Forced(format!(
                "tf32_rows = 32 at value dim {} (at most 128)",
                sizes.value_dim
            )))
        }
        Some(rows) => rows / MMA_ROWS_PER_TILE,
        None => 1,
    };
    let tiles = MatrixTiles {
        planes: MMA_PLANES,
        row_tiles,
        dim_pad,
        value_dim_pad,
        row_pad: 4,
        key_field: "tf32_block_k",
        forced_block_k: forced.tf32_block_k,
        key_sizes: &[64, 32, 16, 8],
        skip_largest: dim_pad > 64,
    };
    matrix_plan(problem, caps, forced, tiles)
}

/// The shared memory the portable kernels' tiles may take on `caps`.
pub(crate) fn unit_budget(caps: &DeviceCaps, forced: &ForcedPlan) -> Result<usize, Unsupported> {
    let kib = allowed(
        "unit_shared_kib",
        forced.unit_shared_kib,
        &[32, 48, 64, 96, 128, 160, 192],
    )?;
    Ok(caps
        .shared_memory
        .min(kib.map_or(UNIT_SHARED_BUDGET, |kib| kib * 1024)))
}

/// `flash_unit`, the portable forward: every runtime and dtype. On software adapters it
/// declines calls whose units could run more loop iterations than llvmpipe allows one
/// invocation (65535; past it every loop ends early and rows come out wrong with no
/// error): about 5700 keys in a cube's band at head dim 128 in f32 on lavapipe's 32 KiB of
/// shared memory, 15700 at head dim 64.
fn plan_unit(
    problem: &Problem,
    caps: &DeviceCaps,
    forced: &ForcedPlan,
) -> Result<UnitPlan, Unsupported> {
    let sizes = &problem.sizes;
    let (dim, value_dim) = (sizes.dim, sizes.value_dim);
    let elem = problem.precision.size();
    let block_q = allowed("unit_block_q", forced.unit_block_q, &[8, 16, 32, 64])?;
    let block_k = allowed("unit_block_k", forced.unit_block_k, &[8, 16, 32, 64])?;
    // Q transposed and padded, one buffer for K (transposed, padded) then V, the
    // probabilities (f32, padded) and the per-thread row partials.
    let shared_bytes = |t: &UnitTiles| {
        let q = dim * (t.rows + 1);
        let kv = (dim * (t.cols + 1)).max(t.cols * value_dim);
        (q + kv) * elem + (t.rows * (t.cols + 1) + t.rows * t.col_threads) * 4
    };
    let registers = |t: &UnitTiles| t.unit_rows() * (t.unit_cols() + t.unit_width(value_dim));
    let wanted = |t: &UnitTiles| {
        block_q.is_none_or(|bq| bq == t.rows) && block_k.is_none_or(|bk| bk == t.cols)
    };
    let budget = unit_budget(caps, forced)?;
    let tiles = UnitTiles::choose(budget, shared_bytes, registers, wanted).ok_or_else(|| {
        if block_q.is_some() || block_k.is_some() {
            Unsupported::Forced(format!(
                "no portable tile of {block_q:?} x {block_k:?} fits {budget} bytes"
            ))
        } else {
            Unsupported::SharedMemory {
                needed: UnitTiles::smallest_bytes(shared_bytes),
                available: budget,
            }
        }
    })?;
    if caps.software_adapter && !forced.lift_loop_cap {
        let keys = problem.band.cube_span(tiles.rows, sizes.seq_k);
        let iterations = tiles.forward_loop_iterations(dim, value_dim, keys);
        // A small margin for what the count could leave out.
        if iterations + 64 > SOFTWARE_LOOP_BUDGET {
            return Err(Unsupported::LoopBudget {
                iterations,
                budget: SOFTWARE_LOOP_BUDGET,
            });
        }
    }
    let grid = sizes.query_grid(tiles.rows)?;
    let (key_splits, split_keys) = key_splits(problem, &grid, tiles.rows, tiles.cols, forced)?;
    Ok(UnitPlan {
        tiles,
        heavy_first: heavy_first(&problem.band, &grid, forced)?,
        grid,
        key_splits,
        split_keys,
        offsets: problem.offsets(caps)?,
    })
}
