//! Tiles of the portable kernels: a cube of `row_threads x col_threads` units whose
//! product tiles are `rows x cols`, and the loop-iteration counts that software adapters
//! limit.

use super::{BandArgs, Sizes};

/// Loop iterations one invocation may run on llvmpipe/lavapipe: its compiled shaders count
/// every loop back-edge against one budget per invocation (`LP_MAX_TGSI_LOOP_ITERATIONS`,
/// "shared between every loop") and silently leave all loops once it is spent.
pub const SOFTWARE_LOOP_BUDGET: usize = 65535;

/// The most shared memory a portable kernel's cube takes by default, below the device's
/// limit: more would buy bigger tiles at the price of fewer cubes per multiprocessor.
pub const UNIT_SHARED_BUDGET: usize = 48 * 1024;

/// The most f32 registers of product and output tiles one unit of a portable kernel holds.
const UNIT_TILE_REGISTERS: usize = 96;

/// One launch configuration of a portable kernel: a cube of `row_threads x col_threads`
/// units whose product tiles are `rows x cols` (query rows x keys in the forward and dQ
/// kernels, keys x query rows in the dK/dV kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitTiles {
    /// Rows of the product tile.
    pub rows: usize,
    /// Columns of the product tile.
    pub cols: usize,
    /// Units along the rows.
    pub row_threads: usize,
    /// Units along the columns.
    pub col_threads: usize,
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

    /// Units per cube.
    pub fn units(&self) -> usize {
        self.row_threads * self.col_threads
    }

    /// A unit's rows of the product tile.
    pub fn unit_rows(&self) -> usize {
        self.rows / self.row_threads
    }

    /// A unit's columns of the product tile.
    pub fn unit_cols(&self) -> usize {
        self.cols / self.col_threads
    }

    /// A unit's columns of a `width`-wide output (head or value dim).
    pub fn unit_width(&self, width: usize) -> usize {
        width.div_ceil(self.col_threads)
    }

    /// Iterations of a loop of `rows x width` elements split over the cube's units, as
    /// llvmpipe counts them (one more than the trips: the exit test).
    pub fn staging_loop(&self, rows: usize, width: usize) -> usize {
        (rows * width).div_ceil(self.units()) + 1
    }

    /// The first candidate whose shared memory fits `budget` and whose f32 tile registers
    /// stay within `UNIT_TILE_REGISTERS` (else the last that fits: the smallest tiles),
    /// among those `wanted` keeps.
    pub fn choose(
        budget: usize,
        shared_bytes: impl Fn(&Self) -> usize,
        registers: impl Fn(&Self) -> usize,
        wanted: impl Fn(&Self) -> bool,
    ) -> Option<Self> {
        let candidates = || {
            Self::CANDIDATES
                .into_iter()
                .filter(|t| shared_bytes(t) <= budget && wanted(t))
        };
        candidates()
            .find(|t| registers(t) <= UNIT_TILE_REGISTERS)
            .or_else(|| candidates().next_back())
    }

    /// Shared memory of the smallest candidate (for a decline's message).
    pub fn smallest_bytes(shared_bytes: impl Fn(&Self) -> usize) -> usize {
        shared_bytes(&Self::CANDIDATES[Self::CANDIDATES.len() - 1])
    }

    /// Loop iterations one unit of the forward kernel runs for a cube whose rows' band
    /// spans `keys` keys, as llvmpipe counts them (every loop once more than its trips):
    /// the Q staging loop, then per key tile the K staging loop, the score loop over the
    /// head dim, the V staging loop, the `P V` loop over the keys and the tile loop itself
    /// (the register-tile loops are unrolled). Checked on lavapipe at f32 d = 128 (tiles
    /// 32 x 16, 181 per tile: 361 tiles right, 362 wrong) and d = 64 (32 x 32, 133 per
    /// tile: 487 tiles right, 494 wrong).
    pub fn forward_loop_iterations(&self, dim: usize, value_dim: usize, keys: usize) -> usize {
        let per_tile = self.staging_loop(self.cols, dim)
            + (dim + 1)
            + self.staging_loop(self.cols, value_dim)
            + (self.cols + 1)
            + 1;
        self.staging_loop(self.rows, dim) + 1 + keys.div_ceil(self.cols) * per_tile
    }
}

/// Loop iterations of one unit of either portable backward kernel, the larger, as llvmpipe
/// counts them (every loop once more than its trips: the exit test; the register-tile loops
/// are unrolled and count nothing).
/// - dQ kernel, per cube of query rows: Q and dO staging, the D loop (a value-dim loop per
///   row the unit takes), then per key tile V staging, the `dP` product over the value
///   dim, K staging, the `S` product over the head dim, the `dQ` product over the keys and
///   the tile loop.
/// - dK/dV kernel, per cube of keys: K and V staging, then per query head and query tile Q
///   and dO staging, the lse/D loop, the `S^T` and `dP^T` products, the `dV` and `dK`
///   products over the tile's rows and the tile loop.
pub fn backward_loop_iterations(
    sizes: &Sizes,
    band: &BandArgs,
    dq: &UnitTiles,
    kv: &UnitTiles,
) -> usize {
    let Sizes {
        seq_q,
        seq_k,
        dim,
        value_dim,
        heads,
        kv_heads,
        ..
    } = *sizes;
    let group = heads / kv_heads;
    let rows_per_unit = |t: &UnitTiles| t.rows.div_ceil(t.units());
    let dq_prologue = dq.staging_loop(dq.rows, dim)
        + dq.staging_loop(dq.rows, value_dim)
        + rows_per_unit(dq) * (value_dim + 1)
        + rows_per_unit(dq)
        + 1;
    let dq_tile = dq.staging_loop(dq.cols, value_dim)
        + (value_dim + 1)
        + dq.staging_loop(dq.cols, dim)
        + (dim + 1)
        + (dq.cols + 1)
        + 1;
    let dq_loops = dq_prologue + 1 + band.cube_span(dq.rows, seq_k).div_ceil(dq.cols) * dq_tile;

    let kv_prologue = kv.staging_loop(kv.rows, dim) + kv.staging_loop(kv.rows, value_dim);
    let kv_tile = kv.staging_loop(kv.cols, dim)
        + kv.staging_loop(kv.cols, value_dim)
        + kv.cols.div_ceil(kv.units())
        + 1
        + (dim + 1)
        + (value_dim + 1)
        + 2 * (kv.cols + 1)
        + 1;
    let per_head = 2 + band.cube_span(kv.rows, seq_q).div_ceil(kv.cols) * kv_tile;
    let kv_loops = kv_prologue + 1 + group * per_head;
    dq_loops.max(kv_loops)
}
