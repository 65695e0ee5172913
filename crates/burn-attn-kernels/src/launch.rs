//! Host-side launchers: pick tiles for the device, allocate outputs, launch.

use burn_backend::{DType, Shape};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use cubecl::ir::features::MmaConfig;
use cubecl::ir::{ElemType, FloatKind, StorageType};

use crate::flash_mma::flash_mma_kernel;
use crate::flash_tf32::flash_tf32_kernel;
use crate::flash_unit::flash_unit_kernel;

/// The band and scale of one banded attention call, already resolved by the caller: the
/// window intersected with the causal rule, `None` = unbounded side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandArgs {
    /// Multiplier of `q . k`.
    pub scale: f32,
    /// Visible keys before the aligned query position (`None`: all).
    pub left: Option<usize>,
    /// Visible keys after the aligned query position (`None`: all).
    pub right: Option<usize>,
}

impl BandArgs {
    /// Keys a cube of `rows` consecutive query rows can see (or query rows that can see a
    /// cube of `rows` consecutive keys): its rows' bands together, at most `n`.
    pub(crate) fn cube_span(&self, rows: usize, n: usize) -> usize {
        match (self.left, self.right) {
            (Some(l), Some(r)) => l.saturating_add(r).saturating_add(rows).min(n),
            _ => n,
        }
    }
}

/// Why a launcher declined a call (the caller then uses another implementation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// The input dtype is not f32, f16 or bf16, or q, k, v differ in dtype.
    DType(String),
    /// A size is outside what the kernel handles (named in the message).
    Size(String),
    /// The device cannot stage even the smallest key tile in shared memory.
    SharedMemory(String),
}

impl core::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Unsupported::DType(s) => write!(f, "unsupported dtype: {s}"),
            Unsupported::Size(s) => write!(f, "unsupported size: {s}"),
            Unsupported::SharedMemory(s) => write!(f, "not enough shared memory: {s}"),
        }
    }
}

/// Largest head (or value) dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Loop iterations one invocation may run on llvmpipe/lavapipe: its compiled shaders count
/// every loop back-edge against one budget per invocation (`LP_MAX_TGSI_LOOP_ITERATIONS`,
/// "shared between every loop") and silently leave all loops once it is spent. The
/// portable kernels decline, on software adapters, calls whose units could reach it.
pub(crate) const SOFTWARE_LOOP_BUDGET: usize = 65535;

/// The most shared memory a portable kernel's cube takes, below the device's limit: more
/// would buy bigger tiles at the price of fewer cubes per multiprocessor.
/// `BURN_ATTN_UNIT_SHARED_KIB` (32 to 192) replaces it, for tuning runs.
const UNIT_SHARED_BUDGET: usize = 48 * 1024;

/// [`UNIT_SHARED_BUDGET`] or its tuning override.
fn unit_shared_budget() -> usize {
    tuning_override(
        "BURN_ATTN_UNIT_SHARED_KIB",
        &[32, 48, 64, 96, 128, 160, 192],
    )
    .map_or(UNIT_SHARED_BUDGET, |kib| kib * 1024)
}

/// The most f32 registers of product and output tiles one unit of a portable kernel holds.
const UNIT_TILE_REGISTERS: usize = 96;

/// One launch configuration of a portable kernel: a cube of `row_threads x col_threads`
/// units whose product tiles are `rows x cols` (query rows x keys in the forward and dQ
/// kernels, keys x query rows in the dK/dV kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnitTiles {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_threads: usize,
    pub(crate) col_threads: usize,
}

impl UnitTiles {
    /// Preferred first: the most multiply-adds per shared-memory read.
    const CANDIDATES: [UnitTiles; 8] = [
        UnitTiles::new(64, 64, 8, 16),
        UnitTiles::new(64, 32, 8, 16),
        UnitTiles::new(32, 32, 8, 16),
        UnitTiles::new(32, 16, 8, 16),
        UnitTiles::new(16, 16, 8, 16),
        UnitTiles::new(16, 8, 8, 8),
        UnitTiles::new(8, 8, 8, 8),
        UnitTiles::new(8, 4, 8, 4),
    ];

    const fn new(rows: usize, cols: usize, row_threads: usize, col_threads: usize) -> Self {
        Self {
            rows,
            cols,
            row_threads,
            col_threads,
        }
    }

    pub(crate) fn units(&self) -> usize {
        self.row_threads * self.col_threads
    }

    /// A unit's rows of the product tile.
    pub(crate) fn unit_rows(&self) -> usize {
        self.rows / self.row_threads
    }

    /// A unit's columns of the product tile.
    pub(crate) fn unit_cols(&self) -> usize {
        self.cols / self.col_threads
    }

    /// A unit's columns of a `width`-wide output (head or value dim).
    pub(crate) fn unit_width(&self, width: usize) -> usize {
        width.div_ceil(self.col_threads)
    }

    /// Iterations of a loop of `rows x width` elements split over the cube's units, as
    /// llvmpipe counts them (one more than the trips: the exit test).
    pub(crate) fn staging_loop(&self, rows: usize, width: usize) -> usize {
        (rows * width).div_ceil(self.units()) + 1
    }

    /// The first candidate whose shared memory fits `min(shared, unit_shared_budget())` and
    /// whose f32 tile registers stay within [`UNIT_TILE_REGISTERS`] (else the last that
    /// fits: the smallest tiles), among those `wanted` keeps.
    pub(crate) fn choose(
        shared: usize,
        shared_bytes: impl Fn(&Self) -> usize,
        registers: impl Fn(&Self) -> usize,
        wanted: impl Fn(&Self) -> bool,
    ) -> Option<Self> {
        let budget = shared.min(unit_shared_budget());
        let candidates = || {
            Self::CANDIDATES
                .into_iter()
                .filter(|t| shared_bytes(t) <= budget && wanted(t))
        };
        candidates()
            .find(|t| registers(t) <= UNIT_TILE_REGISTERS)
            .or_else(|| candidates().next_back())
    }

    /// The forward kernel's tiles (`rows` query rows, `cols` keys); the tuning overrides
    /// `BURN_ATTN_UNIT_BLOCK_Q` / `BURN_ATTN_UNIT_BLOCK_K` keep only matching candidates.
    fn forward(dim: usize, value_dim: usize, elem: usize, shared: usize) -> Option<Self> {
        let block_q = tuning_override("BURN_ATTN_UNIT_BLOCK_Q", &[8, 16, 32, 64]);
        let block_k = tuning_override("BURN_ATTN_UNIT_BLOCK_K", &[8, 16, 32, 64]);
        // Q transposed and padded, one buffer for K (transposed, padded) then V, the
        // probabilities (f32, padded) and the per-thread row partials.
        let shared_bytes = |t: &Self| {
            let q = dim * (t.rows + 1);
            let kv = (dim * (t.cols + 1)).max(t.cols * value_dim);
            (q + kv) * elem + (t.rows * (t.cols + 1) + t.rows * t.col_threads) * 4
        };
        let registers = |t: &Self| t.unit_rows() * (t.unit_cols() + t.unit_width(value_dim));
        let wanted = |t: &Self| {
            block_q.is_none_or(|bq| bq == t.rows) && block_k.is_none_or(|bk| bk == t.cols)
        };
        Self::choose(shared, shared_bytes, registers, wanted).or_else(|| {
            let forced = block_q.is_some() || block_k.is_some();
            if forced {
                eprintln!(
                    "burn-attn: no portable tile fits BURN_ATTN_UNIT_BLOCK_Q/_K {block_q:?} x \
                     {block_k:?} here; ignoring them"
                );
            }
            forced
                .then(|| Self::choose(shared, shared_bytes, registers, |_| true))
                .flatten()
        })
    }

    /// Loop iterations one unit of the forward kernel runs for a cube whose rows' band
    /// spans `keys` keys, as llvmpipe counts them (every loop once more than its trips):
    /// the Q staging loop, then per key tile the K staging loop, the score loop over the
    /// head dim, the V staging loop, the `P V` loop over the keys and the tile loop itself
    /// (the register-tile loops are unrolled). Checked on lavapipe at f32 d = 128 (tiles
    /// 32 x 16, 181 per tile: 361 tiles right, 362 wrong) and d = 64 (32 x 32, 133 per
    /// tile: 487 tiles right, 494 wrong).
    fn forward_loop_iterations(&self, dim: usize, value_dim: usize, keys: usize) -> usize {
        let per_tile = self.staging_loop(self.cols, dim)
            + (dim + 1)
            + self.staging_loop(self.cols, value_dim)
            + (self.cols + 1)
            + 1;
        self.staging_loop(self.rows, dim) + 1 + keys.div_ceil(self.cols) * per_tile
    }
}

/// Exact banded attention forward with the portable kernel (no matrix units).
///
/// `q: [batch, heads, seq_q, head_dim]`, `k: [batch, kv_heads, seq_k, head_dim]`,
/// `v: [batch, kv_heads, seq_k, value_dim]`, any strides, same dtype (f32, f16 or bf16),
/// shapes already checked by the caller (`kv_heads` divides `heads`). Returns the output
/// `[batch, heads, seq_q, value_dim]` in the input dtype and the row log-sum-exp
/// `[batch, heads, seq_q]` in f32 (`-inf` with a zero output row where no key is visible).
///
/// On CPU-type WGPU adapters (lavapipe: a WGPU runtime without plane operations) it
/// declines (`Unsupported::Size`) calls whose units could run more loop iterations than
/// llvmpipe allows one invocation (65535; past it every loop ends early and
/// rows come out wrong with no error): about 5700 keys in a cube's band at head dim 128
/// in f32 on lavapipe's 32 KiB of shared memory, 15700 at head dim 64.
/// `BURN_ATTN_UNIT_NO_CAP=1` lifts that cap, for diagnosis.
pub fn flash_forward_unit<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    band: BandArgs,
) -> Result<(CubeTensor<R>, CubeTensor<R>), Unsupported> {
    check_dtypes(&q, &k, &v)?;
    let sizes = Sizes::check(&q, &k, &v)?;
    let Sizes {
        seq_k,
        dim,
        value_dim,
        ..
    } = sizes;
    let client = q.client.clone();
    let dtype = q.dtype;
    let shared = client.properties().hardware.max_shared_memory_size;
    let tiles = UnitTiles::forward(dim, value_dim, dtype.size(), shared).ok_or_else(|| {
        Unsupported::SharedMemory(format!(
            "{shared} bytes for head_dim {dim}, value_dim {value_dim}"
        ))
    })?;

    let no_cap = std::env::var("BURN_ATTN_UNIT_NO_CAP").is_ok_and(|v| v == "1");
    if !no_cap && is_software_wgpu(&client) {
        let keys = band.cube_span(tiles.rows, seq_k);
        let loops = tiles.forward_loop_iterations(dim, value_dim, keys);
        // A small margin for what the count could leave out.
        if loops + 64 > SOFTWARE_LOOP_BUDGET {
            return Err(Unsupported::Size(format!(
                "up to {loops} loop iterations per unit on a software adapter (llvmpipe ends \
                 loops past {SOFTWARE_LOOP_BUDGET}): {keys} keys per cube, head_dim {dim}, \
                 value_dim {value_dim}"
            )));
        }
    }
    let grid = sizes.grid(tiles.rows)?;
    let heavy = heavy_first(&band, &grid);
    let (out, lse) = alloc_outputs(&q, &sizes);
    if sizes.is_empty() {
        return Ok((out, lse));
    }
    trace(|| format!("flash_unit tiles {tiles:?}"));

    flash_unit_kernel::launch::<R>(
        &client,
        grid,
        CubeDim::new_1d(tiles.units() as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        band.scale,
        sizes.side(band.left),
        sizes.side(band.right),
        heavy,
        f32::NEG_INFINITY,
        dim,
        value_dim,
        tiles.rows,
        tiles.cols,
        tiles.row_threads,
        tiles.col_threads,
        dtype.into(),
    );
    Ok((out, lse))
}

/// Query rows per row tile of the matrix-unit kernel (the `m` of `m16n8k16`).
const MMA_ROWS_PER_TILE: usize = 16;

/// Row tiles per plane of the matrix-unit kernel: two (32 rows, each K/V fragment feeding
/// four MMAs) while the O accumulators of both fit the registers (value dims up to 128),
/// else one. `BURN_ATTN_MMA_ROWS` = 16 or 32 overrides it, for tuning runs.
///
/// Narrow bands take one row tile too: a cube's key range is its rows plus the band, so
/// for a window of `w` keys a 128-row cube stages and walks `128 + w` keys for `w` useful
/// ones per row; 64-row cubes cut that waste (at `w` = 257: 384 -> 320 keys), which
/// outweighs the fragment reuse of two row tiles while `w` is at most
/// [`NARROW_BAND_KEYS`]. One row tile needs twice the cubes along the rows: past the
/// grid's limit there, two row tiles (where their registers fit) if those fit the grid.
fn mma_row_tiles(value_dim_pad: usize, band: &BandArgs, planes: usize, sizes: &Sizes) -> usize {
    let two_fit = value_dim_pad <= 128;
    let band_keys = match (band.left, band.right) {
        (Some(left), Some(right)) => left.saturating_add(right).saturating_add(1),
        _ => usize::MAX,
    };
    let tiles = match tuning_override("BURN_ATTN_MMA_ROWS", &[16, 32]) {
        Some(rows) => rows / MMA_ROWS_PER_TILE,
        None if two_fit && band_keys > NARROW_BAND_KEYS => 2,
        None => 1,
    };
    let fits_grid = |tiles: usize| sizes.grid(MMA_ROWS_PER_TILE * tiles * planes).is_ok();
    if tiles == 1 && two_fit && !fits_grid(1) && fits_grid(2) {
        2
    } else {
        tiles
    }
}

/// The widest band (keys per row) that runs one row tile per plane ([`mma_row_tiles`]).
const NARROW_BAND_KEYS: usize = 512;

/// Planes per cube of the matrix-unit kernel (`BURN_ATTN_MMA_PLANES` = 2, 4 or 8
/// overrides it, for tuning runs: 2 halves a cube's rows, and with them the band-edge keys
/// a window's cube stages beyond its rows' bands).
const MMA_PLANES: usize = 4;

/// Exact banded attention forward with the matrix-unit kernel (`mma.sync.m16n8k16`).
///
/// Same contract as [`flash_forward_unit`]; f16 and bf16 only (f32 declines with
/// `Unsupported::DType`), and only where the runtime is CUDA and reports the `m16n8k16`
/// instruction with f32 accumulation for the dtype (sm_80 and newer): elsewhere it
/// declines with `Unsupported::Size`. Head and value dims are padded to 16 inside the
/// kernel; one Q tile plus one K and one V tile per stage (two stages with asynchronous
/// staging) must fit the device's shared memory per cube (`Unsupported::SharedMemory`
/// otherwise).
pub fn flash_forward_mma<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    band: BandArgs,
) -> Result<(CubeTensor<R>, CubeTensor<R>), Unsupported> {
    check_dtypes(&q, &k, &v)?;
    mma_support(&q)?;
    let sizes = Sizes::check(&q, &k, &v)?;
    let Sizes { dim, value_dim, .. } = sizes;
    let dim_pad = dim.div_ceil(16) * 16;
    let value_dim_pad = value_dim.div_ceil(16) * 16;
    let planes = tuning_override("BURN_ATTN_MMA_PLANES", &[2, 4, 8]).unwrap_or(MMA_PLANES);
    let m_tiles = mma_row_tiles(value_dim_pad, &band, planes, &sizes);
    let block_q = MMA_ROWS_PER_TILE * m_tiles * planes;
    let grid = sizes.grid(block_q)?;
    let heavy = heavy_first(&band, &grid);
    let elem = q.dtype.size();
    let shared = q.client.properties().hardware.max_shared_memory_size;
    // Asynchronous double-buffered staging where the layout allows 16-byte copies;
    // `BURN_ATTN_MMA_SYNC=1` forces the synchronous single-buffer staging (tuning runs).
    let force_sync = std::env::var("BURN_ATTN_MMA_SYNC").is_ok_and(|v| v == "1");
    let async_copy = !force_sync
        && q.client.properties().features.copy_async
        && [&q, &k, &v].iter().all(|t| aligned_rows(t));
    let stages = if async_copy { 2 } else { 1 };
    // Padded Q tile [block_q][dim_pad + 8], and `stages` K tiles [block_k][dim_pad + 8] and
    // V tiles [block_k][value_dim_pad + 8], plus the two barriers.
    let smem = |bk: usize| {
        (block_q * (dim_pad + 8) + stages * bk * (dim_pad + 8 + value_dim_pad + 8)) * elem + 64
    };
    // 64 keys per tile where they fit, except past head dim 64 with one row tile per plane
    // (narrow bands, value dims past 128) or past head dim 128: 32 there. On the H200 at
    // d = 128 (kernel v9), 64 keys ran 7-10% faster than 32 with two row tiles (full,
    // causal, windows of 1024) and 8% slower with one (window 256). `BURN_ATTN_MMA_BLOCK_K`
    // (16, 32 or 64) overrides the choice, for tuning runs.
    let skip_64 = dim_pad > 64 && (m_tiles == 1 || dim_pad > 128);
    let block_k = key_tile("BURN_ATTN_MMA_BLOCK_K", &[64, 32, 16], skip_64, |bk| {
        smem(bk) <= shared
    })
    .ok_or_else(|| {
        Unsupported::SharedMemory(format!(
            "{shared} bytes for head_dim {dim}, value_dim {value_dim}"
        ))
    })?;
    trace(|| {
        format!(
            "flash_mma planes {planes}, rows/plane {}, block_k {block_k}, {} staging, {} B shared",
            MMA_ROWS_PER_TILE * m_tiles,
            if async_copy { "async" } else { "sync" },
            smem(block_k)
        )
    });

    let (out, lse) = alloc_outputs(&q, &sizes);
    if sizes.is_empty() {
        return Ok((out, lse));
    }
    let out_vector = mma_out_vector(dim_pad, value_dim_pad, value_dim, elem);
    let client = q.client.clone();
    let dtype = q.dtype;
    // SAFETY: every global access of the kernel is guarded by the tensor's own sizes (rows
    // < seq_q, keys < seq_k, columns < head/value dim) and shared-memory indices are bounded
    // by the comptime tile sizes, so the runtime's per-access bounds checks are redundant.
    // The 16-byte `cp.async` reads stay inside a row because `aligned_rows` demands unit
    // column strides and head/value dims that are multiples of 8; the output's `N`-value
    // stores likewise, `out` being contiguous (`alloc_outputs`) and `N` dividing its rows.
    unsafe {
        flash_mma_kernel::launch_unchecked::<R>(
            &client,
            grid,
            CubeDim::new_2d(32, planes as u32),
            out_vector,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            band.scale,
            sizes.side(band.left),
            sizes.side(band.right),
            heavy,
            f32::NEG_INFINITY,
            dim_pad,
            value_dim_pad,
            planes,
            m_tiles,
            block_k,
            async_copy,
            dtype.into(),
        );
    }
    Ok((out, lse))
}

/// Values per output store of the matrix-unit forwards (`elem`-byte outputs):
/// [`store_vector`] where their epilogue stages the output rows in shared memory (value
/// dims padded no wider than head dims), 1 otherwise.
fn mma_out_vector(dim_pad: usize, value_dim_pad: usize, value_dim: usize, elem: usize) -> usize {
    if value_dim_pad > dim_pad {
        return 1;
    }
    store_vector(value_dim, elem)
}

/// Values per store of a matrix-unit kernel's staged epilogue (`store_plane_rows`) for
/// contiguous rows of `cols` values of `elem` bytes: the widest of 16 bytes' worth (8
/// 16-bit or 4 32-bit values), half and a quarter of that, down to 2, dividing `cols`, so
/// that a vector never straddles rows and starts at a multiple of its size; 1 otherwise.
pub(crate) fn store_vector(cols: usize, elem: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .filter(|n| n * elem <= 16)
        .find(|n| cols.is_multiple_of(*n))
        .unwrap_or(1)
}

/// Row tiles per plane of the tf32 kernel: one (16 rows; at head dim 128 the O
/// accumulators alone take 64 registers per lane). `BURN_ATTN_TF32_ROWS` = 16 or 32
/// overrides it, for tuning runs; 32 rows only up to value dims of 128 (past that, two
/// row tiles' O accumulators would need 256 registers per lane).
fn tf32_row_tiles(value_dim_pad: usize) -> usize {
    match tuning_override("BURN_ATTN_TF32_ROWS", &[16, 32]) {
        Some(rows) if value_dim_pad <= 128 => rows / MMA_ROWS_PER_TILE,
        _ => 1,
    }
}

/// Exact banded attention forward for f32 inputs on the matrix units, with tf32 products
/// (`mma.sync.m16n8k8`, f32 accumulation).
///
/// Same contract as [`flash_forward_unit`]; f32 only (f16 and bf16 decline with
/// `Unsupported::DType`: [`flash_forward_mma`] takes them), and only where the runtime is
/// CUDA and reports the tf32 `m16n8k8` instruction with f32 accumulation (sm_80 and newer):
/// elsewhere it declines with `Unsupported::Size`. Head and value dims are padded to 8
/// inside the kernel; one Q tile plus one K and one V tile per stage (two stages with
/// asynchronous staging) must fit the device's shared memory per cube
/// (`Unsupported::SharedMemory` otherwise).
///
/// Precision: tf32 keeps 10 of f32's 23 mantissa bits, so the products' inputs (Q, K, V
/// and the probabilities) are rounded to about 5e-4 relative and the outputs differ from
/// full f32 at about 1e-3 relative, as with PyTorch's `allow_tf32`; sums and the softmax
/// stay f32. [`flash_forward`] therefore tries this kernel only when `BURN_ATTN_TF32=1`.
pub fn flash_forward_tf32<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    band: BandArgs,
) -> Result<(CubeTensor<R>, CubeTensor<R>), Unsupported> {
    check_dtypes(&q, &k, &v)?;
    tf32_support(&q)?;
    let sizes = Sizes::check(&q, &k, &v)?;
    let Sizes { dim, value_dim, .. } = sizes;
    let dim_pad = dim.div_ceil(8) * 8;
    let value_dim_pad = value_dim.div_ceil(8) * 8;
    let planes = MMA_PLANES;
    let m_tiles = tf32_row_tiles(value_dim_pad);
    let block_q = MMA_ROWS_PER_TILE * m_tiles * planes;
    let grid = sizes.grid(block_q)?;
    let heavy = heavy_first(&band, &grid);
    let elem = q.dtype.size();
    let shared = q.client.properties().hardware.max_shared_memory_size;
    // Asynchronous double-buffered staging where the layout allows 16-byte copies (four
    // f32); `BURN_ATTN_MMA_SYNC=1` forces the synchronous single-buffer staging.
    let force_sync = std::env::var("BURN_ATTN_MMA_SYNC").is_ok_and(|v| v == "1");
    let async_copy = !force_sync
        && q.client.properties().features.copy_async
        && [&q, &k, &v].iter().all(|t| aligned_rows(t));
    let stages = if async_copy { 2 } else { 1 };
    // Padded Q tile [block_q][dim_pad + 4], and `stages` K tiles [block_k][dim_pad + 4] and
    // V tiles [block_k][value_dim_pad + 4], plus the two barriers.
    let smem = |bk: usize| {
        (block_q * (dim_pad + 4) + stages * bk * (dim_pad + 4 + value_dim_pad + 4)) * elem + 64
    };
    // 32 keys per tile past head dim 64 (fewer live accumulator registers; the f16/bf16
    // kernel's move to 64 keys at d = 65-128 was not measured here, where the tiles hold
    // f32); `BURN_ATTN_TF32_BLOCK_K` (8, 16, 32 or 64) overrides the choice, for tuning
    // runs.
    let block_k = key_tile(
        "BURN_ATTN_TF32_BLOCK_K",
        &[64, 32, 16, 8],
        dim_pad > 64,
        |bk| smem(bk) <= shared,
    )
    .ok_or_else(|| {
        Unsupported::SharedMemory(format!(
            "{shared} bytes for head_dim {dim}, value_dim {value_dim} (f32 tiles)"
        ))
    })?;
    trace(|| {
        format!(
            "flash_tf32 planes {planes}, rows/plane {}, block_k {block_k}, {} staging, {} B shared",
            MMA_ROWS_PER_TILE * m_tiles,
            if async_copy { "async" } else { "sync" },
            smem(block_k)
        )
    });

    let (out, lse) = alloc_outputs(&q, &sizes);
    if sizes.is_empty() {
        return Ok((out, lse));
    }
    let out_vector = mma_out_vector(dim_pad, value_dim_pad, value_dim, elem);
    let client = q.client.clone();
    // SAFETY: every global access of the kernel is guarded by the tensor's own sizes (rows
    // < seq_q, keys < seq_k, columns < head/value dim) and shared-memory indices are bounded
    // by the comptime tile sizes, so the runtime's per-access bounds checks are redundant.
    // The 16-byte `cp.async` reads (four f32) stay inside a row because `aligned_rows`
    // demands unit column strides and head/value dims that are multiples of 4; the
    // output's `N`-value stores likewise, `out` being contiguous and `N` dividing its rows.
    unsafe {
        flash_tf32_kernel::launch_unchecked::<R>(
            &client,
            grid,
            CubeDim::new_2d(32, planes as u32),
            out_vector,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            band.scale,
            sizes.side(band.left),
            sizes.side(band.right),
            heavy,
            f32::NEG_INFINITY,
            dim_pad,
            value_dim_pad,
            planes,
            m_tiles,
            block_k,
            async_copy,
        );
    }
    Ok((out, lse))
}

/// The best kernel for the call: the matrix-unit kernel where it applies, else the
/// portable one. `Err` when neither takes the call (the caller runs another path).
///
/// f32 inputs run the portable kernel (full f32 products) unless `BURN_ATTN_TF32=1`: then
/// [`flash_forward_tf32`] (tf32 products, about 1e-3 relative error) is tried first.
pub fn flash_forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    band: BandArgs,
) -> Result<(CubeTensor<R>, CubeTensor<R>), Unsupported> {
    let disabled = std::env::var("BURN_ATTN_NO_MMA").is_ok_and(|v| v == "1");
    if !disabled {
        match flash_forward_mma(q.clone(), k.clone(), v.clone(), band) {
            Ok(done) => {
                trace(|| format!("flash_mma for q {:?}", q.meta.shape()));
                return Ok(done);
            }
            Err(why) => trace(|| format!("flash_mma declined: {why}")),
        }
        let tf32 = std::env::var("BURN_ATTN_TF32").is_ok_and(|v| v == "1");
        if tf32 && q.dtype == DType::F32 {
            match flash_forward_tf32(q.clone(), k.clone(), v.clone(), band) {
                Ok(done) => {
                    trace(|| format!("flash_tf32 for q {:?}", q.meta.shape()));
                    return Ok(done);
                }
                Err(why) => trace(|| format!("flash_tf32 declined: {why}")),
            }
        }
    }
    let shape = q.meta.shape().clone();
    let unit = flash_forward_unit(q, k, v, band);
    match &unit {
        Ok(_) => trace(|| format!("flash_unit for q {shape:?}")),
        Err(why) => trace(|| format!("flash_unit declined: {why}")),
    }
    unit
}

/// A tuning override from the environment: `Some(value)` when `name` holds one of
/// `allowed`, `None` when it is unset. Any other value is ignored with a warning on stderr
/// (once per process), so a typo does not silently measure the default.
pub(crate) fn tuning_override(name: &str, allowed: &[usize]) -> Option<usize> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let raw = std::env::var(name).ok()?;
    let value = raw.parse::<usize>().ok().filter(|v| allowed.contains(v));
    if value.is_none() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("burn-attn: ignoring {name}={raw:?} (takes one of {allowed:?})");
    }
    value
}

/// Keys per tile of a matrix-unit forward: the first of `sizes` (largest first) that
/// `fits`, skipping the largest where `skip_largest` (fewer live score registers); the
/// environment variable `name` forces one of `sizes` (tuning runs). `None` when none fits.
fn key_tile(
    name: &str,
    sizes: &[usize],
    skip_largest: bool,
    fits: impl Fn(usize) -> bool,
) -> Option<usize> {
    match tuning_override(name, sizes) {
        Some(bk) => Some(bk).filter(|&bk| fits(bk)),
        None => {
            let skip = usize::from(skip_largest);
            sizes.iter().copied().skip(skip).find(|&bk| fits(bk))
        }
    }
}

/// With `BURN_ATTN_TRACE=1`, says on stderr which kernel ran or why one declined.
pub(crate) fn trace(message: impl FnOnce() -> String) {
    if std::env::var("BURN_ATTN_TRACE").is_ok_and(|v| v == "1") {
        eprintln!("burn-attn: {}", message());
    }
}

/// Output `[b, h, seq_q, value_dim]` in the input dtype and lse `[b, h, seq_q]` in f32, as
/// plain contiguous buffers of exactly the tensor's size (not `empty_device_dtype`, whose
/// layout may be pitched).
fn alloc_outputs<R: CubeRuntime>(
    q: &CubeTensor<R>,
    sizes: &Sizes,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let Sizes {
        batch,
        heads,
        seq_q,
        value_dim,
        ..
    } = *sizes;
    (
        alloc_contiguous(q, Shape::new([batch, heads, seq_q, value_dim]), q.dtype),
        alloc_contiguous(q, Shape::new([batch, heads, seq_q]), DType::F32),
    )
}

/// A plain contiguous buffer of exactly `shape` in `dtype`, on `like`'s device (not
/// `empty_device_dtype`, whose layout may be pitched).
pub(crate) fn alloc_contiguous<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Shape,
    dtype: DType,
) -> CubeTensor<R> {
    let bytes = shape.num_elements() * dtype.size();
    let handle = like.client.empty(bytes.max(dtype.size()));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

/// Whether the rows of `t` can be staged with 16-byte copies: contiguous columns, row,
/// head and batch strides and the buffer offset all multiples of 16 bytes.
pub(crate) fn aligned_rows<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    let elem = t.dtype.size();
    let [.., dim] = dims4(t);
    let strides = t.meta.strides();
    let chunk = 16 / elem;
    dim.is_multiple_of(chunk)
        && strides[3] == 1
        && strides[..3].iter().all(|s| s.is_multiple_of(chunk))
        && t.handle.offset_start.unwrap_or(0).is_multiple_of(16)
}

/// A WGPU runtime without plane operations: CubeCL withholds them on CPU-type adapters
/// (lavapipe), the only place the portable kernel's wide-band bug was seen.
pub(crate) fn is_software_wgpu<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    use cubecl::ir::features::Plane;
    R::name(client).starts_with("wgpu") && !client.properties().features.plane.contains(Plane::Ops)
}

/// The sizes of a call, checked against what both kernels take.
#[derive(Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    /// Key/value heads (dividing `heads`).
    pub(crate) kv_heads: usize,
    pub(crate) seq_q: usize,
    pub(crate) seq_k: usize,
    pub(crate) dim: usize,
    pub(crate) value_dim: usize,
    /// What an unbounded band side becomes in the kernels' i32 arithmetic.
    pub(crate) unbounded: usize,
}

impl Sizes {
    pub(crate) fn check<R: CubeRuntime>(
        q: &CubeTensor<R>,
        k: &CubeTensor<R>,
        v: &CubeTensor<R>,
    ) -> Result<Self, Unsupported> {
        let [batch, heads, seq_q, dim] = dims4(q);
        let [k_batch, kv_heads, seq_k, k_dim] = dims4(k);
        let [v_batch, v_heads, v_seq, value_dim] = dims4(v);
        let kv_ok = kv_heads > 0 && heads.is_multiple_of(kv_heads) && v_heads == kv_heads;
        if k_batch != batch || v_batch != batch || k_dim != dim || v_seq != seq_k || !kv_ok {
            return Err(Unsupported::Size(format!(
                "q {:?}, k {:?}, v {:?} do not match (k and v need q's batch, one kv head count \
                 dividing q's heads and one length; k needs q's head dim)",
                q.meta.shape(),
                k.meta.shape(),
                v.meta.shape()
            )));
        }
        if dim == 0 || dim > MAX_HEAD_DIM || value_dim == 0 || value_dim > MAX_HEAD_DIM {
            return Err(Unsupported::Size(format!(
                "head_dim {dim} / value_dim {value_dim} (1..={MAX_HEAD_DIM})"
            )));
        }
        // Band arithmetic is i32 in the kernels; unbounded sides become seq_q + seq_k.
        let unbounded = seq_q + seq_k;
        if unbounded >= (i32::MAX / 4) as usize {
            return Err(Unsupported::Size(format!("seq_q + seq_k = {unbounded}")));
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            dim,
            value_dim,
            unbounded,
        })
    }
    /// No output rows (nothing to launch).
    pub(crate) fn is_empty(&self) -> bool {
        self.batch * self.heads * self.seq_q == 0
    }

    /// A band side as the kernels take it: `None` (unbounded) becomes `unbounded`.
    pub(crate) fn side(&self, side: Option<usize>) -> i32 {
        side.unwrap_or(self.unbounded).min(self.unbounded) as i32
    }

    /// One cube per `block_q` query rows and per (batch, head), within CubeCL's grid limits.
    pub(crate) fn grid(&self, block_q: usize) -> Result<CubeCount, Unsupported> {
        cube_grid(self.seq_q, block_q, self.batch * self.heads, "batch*heads")
    }
}

/// `ceil(rows / block) x y` cubes, within CubeCL's grid limits (`y_name` names `y` in the
/// error).
pub(crate) fn cube_grid(
    rows: usize,
    block: usize,
    y: usize,
    y_name: &str,
) -> Result<CubeCount, Unsupported> {
    let x = rows.div_ceil(block);
    if y > u16::MAX as usize || x > u16::MAX as usize {
        return Err(Unsupported::Size(format!(
            "grid {x} x {y} ({y_name} and rows/{block} up to 65535)"
        )));
    }
    Ok(CubeCount::Static(x as u32, y as u32, 1))
}

/// Heads per group of the heavy-first order. On the H200 (bf16, d = 128, causal) groups
/// of 64 heads ran as fast as or faster than groups of 4 and 16 at n = 1024, 4096 and
/// 16384 (kernel times -3%, -5%, -6% against the natural order); PERFORMANCE.md, v9.
const HEAVY_FIRST_HEADS: u32 = 64;

/// Heads per group of the heavy-first cube order (`schedule::cube_block`) for `grid`
/// (blocks along `x`, heads along `y`), 0 for the natural order. Only bands with no left
/// bound and a right bound (causal) are reordered: there a query block's cost grows with
/// its index (a key block's shrinks), and the natural order would leave every head's
/// heaviest block for the end. `BURN_ATTN_HEAVY_FIRST` (0, 1, 2, 4, 8, 16, 32 or 64)
/// overrides it, for tuning runs.
pub(crate) fn heavy_first(band: &BandArgs, grid: &CubeCount) -> u32 {
    if let Some(group) = tuning_override("BURN_ATTN_HEAVY_FIRST", &[0, 1, 2, 4, 8, 16, 32, 64]) {
        return group as u32;
    }
    let several_blocks = matches!(grid, CubeCount::Static(x, _, _) if *x > 1);
    if band.left.is_none() && band.right.is_some() && several_blocks {
        HEAVY_FIRST_HEADS
    } else {
        0
    }
}

pub(crate) fn dims4<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}

pub(crate) fn check_dtypes<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
) -> Result<(), Unsupported> {
    let ok = matches!(q.dtype, DType::F32 | DType::F16 | DType::BF16);
    if !ok || k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(Unsupported::DType(format!(
            "q {:?}, k {:?}, v {:?} (need one of f32, f16, bf16 for all)",
            q.dtype, k.dtype, v.dtype
        )));
    }
    Ok(())
}

/// Whether the matrix-unit kernels can run `q`'s dtype on its device: f16 or bf16 (else
/// `Unsupported::DType`), the CUDA runtime (the kernels hard-code PTX's `m16n8k16`
/// register layout) and that instruction with f32 accumulation plus `ldmatrix` for the
/// dtype (else `Unsupported::Size`). Shared by the forward and backward launchers.
pub(crate) fn mma_support<R: CubeRuntime>(q: &CubeTensor<R>) -> Result<(), Unsupported> {
    let kind = match q.dtype {
        DType::F16 => FloatKind::F16,
        DType::BF16 => FloatKind::BF16,
        other => {
            return Err(Unsupported::DType(format!(
                "{other:?} (the matrix-unit kernels take f16 and bf16)"
            )))
        }
    };
    if R::name(&q.client) != "cuda" {
        return Err(Unsupported::Size(format!(
            "runtime {} (the matrix-unit kernels are CUDA only)",
            R::name(&q.client)
        )));
    }
    let input: StorageType = ElemType::Float(kind).into();
    let config = MmaConfig {
        a_type: input,
        b_type: input,
        cd_type: ElemType::Float(FloatKind::F32).into(),
        m: 16,
        n: 8,
        k: 16,
    };
    let matmul = &q.client.properties().features.matmul;
    if !matmul.mma.contains(&config) || !matmul.ldmatrix.contains(&input) {
        return Err(Unsupported::Size(format!(
            "no m16n8k16 matrix instruction or ldmatrix for {:?} on this device",
            q.dtype
        )));
    }
    Ok(())
}

/// Whether the tf32 kernel can run `q`'s dtype on its device: f32 (else
/// `Unsupported::DType`), the CUDA runtime (the kernel hard-codes PTX's `m16n8k8` register
/// layout) and that instruction on tf32 with f32 accumulation (else `Unsupported::Size`).
pub(crate) fn tf32_support<R: CubeRuntime>(q: &CubeTensor<R>) -> Result<(), Unsupported> {
    if q.dtype != DType::F32 {
        return Err(Unsupported::DType(format!(
            "{:?} (the tf32 kernel takes f32)",
            q.dtype
        )));
    }
    if R::name(&q.client) != "cuda" {
        return Err(Unsupported::Size(format!(
            "runtime {} (the tf32 kernel is CUDA only)",
            R::name(&q.client)
        )));
    }
    let tf32: StorageType = ElemType::Float(FloatKind::TF32).into();
    let config = MmaConfig {
        a_type: tf32,
        b_type: tf32,
        cd_type: ElemType::Float(FloatKind::F32).into(),
        m: 16,
        n: 8,
        k: 8,
    };
    if !q.client.properties().features.matmul.mma.contains(&config) {
        return Err(Unsupported::Size(
            "no m16n8k8 tf32 matrix instruction on this device".to_string(),
        ));
    }
    Ok(())
}
