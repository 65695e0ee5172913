//! Plans of the chunked linear-attention kernel (`linear_chunk`): one pass over the rows of
//! a head in chunks, carrying an f32 state, in one of the modes [`LinearMode`] names.
//!
//! Every linear-attention product is a pass of this one kernel: with row operands `a`
//! (queries' role), `b` (keys' role) and `c` (values' role) of one length, the causal pass
//! computes `out_i = sum_{j <= i} (a_i . b_j) c_j + a_i S0` (optionally normalised by
//! `sum_{j <= i} a_i . b_j + a_i . z0 + eps`) and the state `S = S0 + sum_j b_j^T c_j`;
//! the state pass computes only `S`; the apply pass only `out_i = a_i S0`. Reversed, `j <=
//! i` becomes `j >= i` (the backward's key-side products). One optional per-row scalar
//! adds `e_i` (on the rows' side) or `e_j` (on the keys' side) to every `a_i . b_j`: the
//! normaliser's gradient in the backward.

use super::{DeviceCaps, Grid, Offsets, Precision, Unsupported, SOFTWARE_LOOP_BUDGET};
use super::{MAX_HEAD_DIM, UNIT_SHARED_BUDGET};

/// Units along a chunk's rows, and along its keys and value columns.
pub const LINEAR_ROW_THREADS: usize = 8;
/// Units along a chunk's keys and the value columns of a cube.
pub const LINEAR_COL_THREADS: usize = 16;

/// Planes of a matrix-unit cube (16 rows of a chunk each, `dim / 4` rows of the state).
pub const LINEAR_MMA_PLANES: usize = 4;

/// The matrix-unit kernel's chunk and value block.
const MATRIX_CHUNK: usize = 64;
const MATRIX_VALUE_BLOCK: usize = 64;

/// Cubes a causal pass should launch at least (four per multiprocessor of an H100-class
/// device): below it, [`segment_rows`] splits the rows into segments.
pub const LINEAR_TARGET_CUBES: usize = 512;

/// Rows of one segment, at least (a segment's start state costs a state pass over it).
const MIN_SEGMENT_ROWS: usize = 256;

/// Where the pass's optional per-row scalar enters `a_i . b_j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearExtra {
    /// No scalar.
    None,
    /// `a_i . b_j + e_i` (the rows' side; the keys' side counts 1).
    Rows,
    /// `a_i . b_j + e_j` (the keys' side; the rows' side counts 1).
    Keys,
}

/// A feature map the kernel applies to operands as it stages them (zero rows past the
/// operand's end stay zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearMap {
    /// No map.
    Identity,
    /// `elu(x) + 1`.
    EluPlusOne,
    /// `max(x, 0)`.
    Relu,
    /// `ln(1 + e^x)`.
    Softplus,
}

/// What one pass computes (a comptime value of the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearMode {
    /// The in-chunk causal term `sum_{j <= i in the chunk} (a_i . b_j) c_j`.
    pub intra: bool,
    /// Whether rows are written (`out`, and the normaliser with `normalise`).
    pub outputs: bool,
    /// Whether the state takes each chunk's `b^T c` after its rows.
    pub update: bool,
    /// `out_i / (den_i + eps)`, the normaliser `den_i` written too.
    pub normalise: bool,
    /// Rows from the last to the first (`j >= i`).
    pub reverse: bool,
    /// The per-row scalar, if any.
    pub extra: LinearExtra,
    /// Whether the pass starts from a given state (else from 0).
    pub state_in: bool,
    /// Whether the pass writes its final state.
    pub state_out: bool,
    /// The feature map, and which of `a`, `b`, `c` it applies to.
    pub map: LinearMap,
    /// `map` on the rows' operand `a`.
    pub map_a: bool,
    /// `map` on the keys' operand `b`.
    pub map_b: bool,
    /// `map` on the values' operand `c`.
    pub map_c: bool,
}

impl LinearMode {
    /// No feature map on any operand (the fields the constructors share).
    const UNMAPPED: Self = Self {
        intra: false,
        outputs: false,
        update: false,
        normalise: false,
        reverse: false,
        extra: LinearExtra::None,
        state_in: false,
        state_out: false,
        map: LinearMap::Identity,
        map_a: false,
        map_b: false,
        map_c: false,
    };

    /// The causal pass: in-chunk term, carried state, rows out.
    pub fn causal(normalise: bool) -> Self {
        Self {
            intra: true,
            outputs: true,
            update: true,
            normalise,
            reverse: false,
            extra: LinearExtra::None,
            state_in: false,
            state_out: false,
            ..Self::UNMAPPED
        }
    }

    /// The state pass: `S = sum_j b_j^T c_j` (and `z = sum_j b_j` with `normalise`), no rows.
    pub fn state(normalise: bool) -> Self {
        Self {
            intra: false,
            outputs: false,
            update: true,
            normalise,
            reverse: false,
            extra: LinearExtra::None,
            state_in: false,
            state_out: true,
            ..Self::UNMAPPED
        }
    }

    /// The apply pass: `out_i = a_i S0` (normalised by `a_i . z0 + eps` with `normalise`).
    pub fn apply(normalise: bool) -> Self {
        Self {
            intra: false,
            outputs: true,
            update: false,
            normalise,
            reverse: false,
            extra: LinearExtra::None,
            state_in: true,
            state_out: false,
            ..Self::UNMAPPED
        }
    }

    /// The same pass with `map` applied to the operands flagged.
    pub fn mapped(self, map: LinearMap, a: bool, b: bool, c: bool) -> Self {
        Self {
            map,
            map_a: a,
            map_b: b,
            map_c: c,
            ..self
        }
    }

    /// Whether the pass reads the rows' operand `a`.
    pub fn reads_rows(&self) -> bool {
        self.outputs
    }

    /// Whether the pass reads the keys' operands `b` and `c`.
    pub fn reads_keys(&self) -> bool {
        self.intra || self.update
    }

    /// Whether the pass reads its per-row scalars: the rows' in the rows' steps, the keys'
    /// in the key steps (a state pass with the rows' scalar adds `c` with weight 1).
    pub fn reads_scalars(&self) -> bool {
        match self.extra {
            LinearExtra::None => false,
            LinearExtra::Rows => self.outputs,
            LinearExtra::Keys => self.reads_keys(),
        }
    }
}

/// The tiles of one pass: `chunk` rows at a time, `value_block` value columns per cube,
/// the head dim rounded up to the units along the rows (`dim_pad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearTiles {
    /// Rows per chunk.
    pub chunk: usize,
    /// Value columns per cube.
    pub value_block: usize,
    /// The head dim of `a` and `b`, a multiple of [`LINEAR_ROW_THREADS`].
    pub dim_pad: usize,
}

impl LinearTiles {
    /// Preferred first: the longest chunks (the in-chunk products are the matrix-shaped
    /// work) and the widest value blocks (the in-chunk scores are recomputed per block).
    const CANDIDATES: [(usize, usize); 7] = [
        (64, 64),
        (64, 32),
        (32, 64),
        (32, 32),
        (32, 16),
        (16, 32),
        (16, 16),
    ];

    /// Units of a cube (the portable kernel's 8 x 16, or the matrix kernel's four planes:
    /// the same count).
    pub fn units(&self) -> usize {
        LINEAR_ROW_THREADS * LINEAR_COL_THREADS
    }

    /// The matrix-unit kernel's tiles for head dim `dim`.
    fn matrix(dim: usize) -> Self {
        Self {
            chunk: MATRIX_CHUNK,
            value_block: MATRIX_VALUE_BLOCK,
            dim_pad: dim,
        }
    }

    /// Shared memory of a matrix-unit cube in bytes, for inputs of `precision`: `a`, `b`
    /// and `c` rows and the rounded state, each row padded by 8 values, the state's f32
    /// home where the pass writes rows and updates it, and the f32 vectors.
    pub fn matrix_shared_bytes(&self, mode: &LinearMode, precision: Precision) -> usize {
        let (c, bv, dp) = (self.chunk, self.value_block, self.dim_pad);
        let e = precision.size();
        let rows = if mode.reads_rows() { c * (dp + 8) } else { 8 };
        let keys = if mode.reads_keys() {
            c * (dp + 8) + c * (bv + 8)
        } else {
            16
        };
        let state = if mode.outputs { dp * (bv + 8) } else { 8 };
        // The state's f32 home in a pass that writes rows and updates it.
        let home = if mode.outputs && mode.update {
            dp * (bv + 8)
        } else {
            8
        };
        (rows + keys + state) * e + (home + c + dp + bv) * 4
    }

    /// Shared memory of a cube in bytes, for inputs of `precision`.
    pub fn shared_bytes(&self, mode: &LinearMode, precision: Precision) -> usize {
        let (c, bv, dp) = (self.chunk, self.value_block, self.dim_pad);
        let e = precision.size();
        let rows = if mode.reads_rows() {
            dp * (c + 1) * e
        } else {
            0
        };
        let keys = if mode.reads_keys() {
            dp * (c + 1) * e + c * bv * e
        } else {
            0
        };
        let scores = if mode.intra { c * (c + 1) * 4 } else { 0 };
        let state = (dp * bv + dp + bv + c) * 4;
        rows + keys + scores + state
    }

    /// f32 registers of a unit's largest tile (state update or output rows).
    fn registers(&self) -> usize {
        let cols = self.value_block / LINEAR_COL_THREADS;
        (self.dim_pad / LINEAR_ROW_THREADS).max(self.chunk / LINEAR_ROW_THREADS) * cols
    }

    /// Loop iterations one unit runs over `rows` rows (the products' loops over the head
    /// dim and the chunk, the staging loops), for software adapters' budgets.
    fn loop_iterations(&self, rows: usize, value_dim: usize) -> usize {
        let (c, dp, bv) = (self.chunk, self.dim_pad, self.value_block);
        let per_chunk = 2 * dp + 3 * c + 3 * (dp * (c + 1)).div_ceil(self.units()) + bv;
        rows.div_ceil(c) * per_chunk + 2 * (dp * bv).div_ceil(self.units()) + value_dim
    }
}

/// The sizes of one pass: `batch x heads` cubes rows of `rows` (the grid's heads: the
/// output's, or the state's for a state pass), head dim `dim` of `a` and `b`, value dim
/// `value_dim` of `c` and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSizes {
    /// Batch.
    pub batch: usize,
    /// Heads of the grid (every operand's heads divide them).
    pub heads: usize,
    /// Rows of the pass.
    pub rows: usize,
    /// Head dim of `a` and `b`.
    pub dim: usize,
    /// Value dim of `c` and of the output.
    pub value_dim: usize,
    /// Elements of the largest tensor the pass reads or writes.
    pub span: usize,
    /// Whether every row operand can be copied in 16-byte pieces (contiguous columns; row,
    /// head and batch strides and offset multiples of 16 bytes).
    pub aligned_rows: bool,
}

/// The launch plan of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearPlan {
    /// Tiles.
    pub tiles: LinearTiles,
    /// Whether the matrix-unit kernel runs the pass (`linear_chunk_mma`), else the portable
    /// one (`linear_chunk`).
    pub matrix: bool,
    /// Whether the matrix-unit kernel stages rows with 16-byte `cp.async` copies (aligned
    /// rows on a device that has them), else with plain loads.
    pub async_copy: bool,
    /// Value blocks along `x`, `batch * heads` along `y`.
    pub grid: Grid,
    /// The kernels' offset width.
    pub offsets: Offsets,
}

/// Plans one pass of `mode` over `sizes` in `precision` on `caps`, or says why not.
/// `chunk`, when given, fixes the chunk length (16, 32 or 64).
///
/// The matrix-unit kernel takes bf16 passes on devices with bf16 matrix units, head dims
/// of 64 or 128 and value dims a multiple of 64, in chunks of 64. f16 stays on the
/// portable kernel: the rows' products read the state rounded to the inputs' type, and a
/// state summed over a long sequence passes f16's largest value (65504).
pub fn plan_linear(
    sizes: &LinearSizes,
    mode: &LinearMode,
    precision: Precision,
    caps: &DeviceCaps,
    chunk: Option<usize>,
) -> Result<LinearPlan, Unsupported> {
    let LinearSizes {
        batch,
        heads,
        rows,
        dim,
        value_dim,
        span,
        aligned_rows,
    } = *sizes;
    if dim == 0 || dim > MAX_HEAD_DIM || value_dim == 0 || value_dim > MAX_HEAD_DIM {
        return Err(Unsupported::HeadDim {
            dim,
            value_dim,
            max: MAX_HEAD_DIM,
        });
    }
    if let Some(c) = chunk {
        if ![16, 32, 64].contains(&c) {
            return Err(Unsupported::Forced(format!(
                "chunk {c} (the linear kernel takes 16, 32 or 64)"
            )));
        }
    }
    // Rows are indexed in u32 and i32 arithmetic.
    let max_rows = (i32::MAX / 2) as usize;
    if rows > max_rows {
        return Err(Unsupported::Length {
            total: rows,
            max: max_rows,
        });
    }
    let offsets = if span <= u32::MAX as usize {
        Offsets::U32
    } else if caps.offsets_64 {
        Offsets::U64
    } else {
        return Err(Unsupported::Offsets {
            span,
            max: u32::MAX as usize,
            runtime: caps.runtime_name,
        });
    };
    let matrix = LinearTiles::matrix(dim);
    if precision == Precision::BF16
        && caps.mma_for(precision)
        && (dim == 64 || dim == 128)
        && value_dim.is_multiple_of(MATRIX_VALUE_BLOCK)
        && chunk.is_none_or(|c| c == MATRIX_CHUNK)
        && matrix.matrix_shared_bytes(mode, precision) <= caps.shared_memory
    {
        return Ok(LinearPlan {
            tiles: matrix,
            matrix: true,
            async_copy: aligned_rows && caps.copy_async && offsets.take_async_copy(),
            grid: Grid::new(value_dim, MATRIX_VALUE_BLOCK, batch * heads)?,
            offsets,
        });
    }
    let budget = caps.shared_memory.min(UNIT_SHARED_BUDGET);
    let dim_pad = dim.next_multiple_of(LINEAR_ROW_THREADS);
    let candidates = LinearTiles::CANDIDATES
        .iter()
        .filter(|(c, _)| chunk.is_none_or(|want| want == *c))
        .map(|&(chunk, value_block)| LinearTiles {
            chunk,
            // No wider than the value dim needs.
            value_block: value_block.min(value_dim.next_multiple_of(LINEAR_COL_THREADS)),
            dim_pad,
        })
        .collect::<Vec<_>>();
    let tiles = candidates
        .iter()
        .find(|t| t.shared_bytes(mode, precision) <= budget && t.registers() <= 64)
        .copied()
        .ok_or_else(|| Unsupported::SharedMemory {
            needed: candidates
                .iter()
                .map(|t| t.shared_bytes(mode, precision))
                .min()
                .unwrap_or(0),
            available: budget,
        })?;
    if caps.software_adapter {
        let iterations = tiles.loop_iterations(rows, value_dim);
        if iterations > SOFTWARE_LOOP_BUDGET {
            return Err(Unsupported::LoopBudget {
                iterations,
                budget: SOFTWARE_LOOP_BUDGET,
            });
        }
    }
    let grid = Grid::new(value_dim, tiles.value_block, batch * heads)?;
    Ok(LinearPlan {
        tiles,
        matrix: false,
        async_copy: false,
        grid,
        offsets,
    })
}

/// Rows per segment of a causal pass planned as `plan` over `sizes`: the rows split into
/// segments (a multiple of 64 rows each, at least 256) until about
/// [`LINEAR_TARGET_CUBES`] cubes run, or all rows in one segment. Each segment starts from
/// the state of the rows before it, which a state pass over the segments and a prefix sum
/// provide.
pub fn segment_rows(sizes: &LinearSizes, plan: &LinearPlan) -> usize {
    let cubes = plan.grid.x as usize * plan.grid.y as usize;
    let wanted = LINEAR_TARGET_CUBES.div_ceil(cubes.max(1));
    let segments = wanted.min(sizes.rows / MIN_SEGMENT_ROWS).max(1);
    if segments == 1 {
        return sizes.rows.max(1);
    }
    sizes.rows.div_ceil(segments).next_multiple_of(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(rows: usize, dim: usize, value_dim: usize) -> LinearSizes {
        LinearSizes {
            batch: 2,
            heads: 16,
            rows,
            dim,
            value_dim,
            span: 2 * 16 * rows * dim.max(value_dim),
            aligned_rows: true,
        }
    }

    #[test]
    fn hopper_takes_long_chunks_within_the_shared_budget() {
        let mode = LinearMode::causal(true);
        for precision in [Precision::F16, Precision::F32] {
            let plan = plan_linear(
                &sizes(16384, 128, 128),
                &mode,
                precision,
                &DeviceCaps::hopper(),
                None,
            )
            .unwrap();
            assert!(plan.tiles.shared_bytes(&mode, precision) <= UNIT_SHARED_BUDGET);
            assert_eq!(plan.grid.y, 32);
            assert_eq!(plan.grid.x as usize * plan.tiles.value_block, 128);
        }
    }

    #[test]
    fn bf16_on_matrix_units_takes_the_matrix_kernel() {
        let caps = DeviceCaps::hopper();
        let backward = LinearMode {
            reverse: true,
            extra: LinearExtra::Keys,
            ..LinearMode::causal(false)
        };
        for mode in [LinearMode::causal(true), LinearMode::apply(true), backward] {
            for (dim, value_dim) in [(128, 128), (64, 192), (128, 64)] {
                let plan = plan_linear(
                    &sizes(4096, dim, value_dim),
                    &mode,
                    Precision::BF16,
                    &caps,
                    None,
                )
                .unwrap();
                assert!(plan.matrix, "{mode:?} {dim} {value_dim}");
                assert_eq!(plan.tiles, LinearTiles::matrix(dim));
                assert!(plan.async_copy);
                assert_eq!(plan.grid.x as usize, value_dim / 64);
                assert!(plan.tiles.matrix_shared_bytes(&mode, Precision::BF16) < 112 * 1024);
            }
        }
        // Rows that cannot be copied in 16-byte pieces: the matrix kernel, staging with loads.
        let misaligned = LinearSizes {
            aligned_rows: false,
            ..sizes(4096, 128, 128)
        };
        let plan = plan_linear(&misaligned, &backward, Precision::BF16, &caps, None).unwrap();
        assert!(plan.matrix && !plan.async_copy);
        // f16 and f32, other head dims and value dims, other chunks: the portable kernel.
        let portable = |dim, value_dim, precision, chunk| {
            let plan = plan_linear(
                &sizes(4096, dim, value_dim),
                &LinearMode::causal(true),
                precision,
                &caps,
                chunk,
            )
            .unwrap();
            !plan.matrix
        };
        assert!(portable(128, 128, Precision::F16, None));
        assert!(portable(128, 128, Precision::F32, None));
        assert!(portable(96, 128, Precision::BF16, None));
        assert!(portable(128, 96, Precision::BF16, None));
        assert!(portable(128, 128, Precision::BF16, Some(32)));
        let wgpu = DeviceCaps::lavapipe();
        let plan = plan_linear(
            &sizes(64, 128, 128),
            &LinearMode::causal(true),
            Precision::BF16,
            &wgpu,
            None,
        );
        assert!(plan.is_ok_and(|p| !p.matrix));
    }

    #[test]
    fn narrow_values_take_one_block_and_odd_dims_pad() {
        let plan = plan_linear(
            &sizes(17, 5, 7),
            &LinearMode::causal(true),
            Precision::F32,
            &DeviceCaps::lavapipe(),
            None,
        )
        .unwrap();
        assert_eq!(plan.tiles.value_block, 16);
        assert_eq!(plan.tiles.dim_pad, 8);
        assert_eq!(plan.grid.x, 1);
    }

    #[test]
    fn few_cubes_split_long_rows_into_segments() {
        let mode = LinearMode::causal(true);
        let caps = DeviceCaps::hopper();
        let long = sizes(16384, 128, 128);
        let plan = plan_linear(&long, &mode, Precision::BF16, &caps, None).unwrap();
        let rows = segment_rows(&long, &plan);
        let cubes = plan.grid.x as usize * plan.grid.y as usize * 16384usize.div_ceil(rows);
        assert!(
            rows.is_multiple_of(64) && rows >= MIN_SEGMENT_ROWS,
            "{rows}"
        );
        assert!(cubes >= LINEAR_TARGET_CUBES, "{cubes} cubes");
        let short = sizes(300, 128, 128);
        let plan = plan_linear(&short, &mode, Precision::BF16, &caps, None).unwrap();
        assert_eq!(segment_rows(&short, &plan), 300);
    }

    #[test]
    fn declines_with_reasons() {
        let caps = DeviceCaps::lavapipe();
        let mode = LinearMode::causal(true);
        let head = plan_linear(&sizes(8, 300, 8), &mode, Precision::F32, &caps, None);
        assert!(matches!(head, Err(Unsupported::HeadDim { dim: 300, .. })));
        let chunk = plan_linear(&sizes(8, 8, 8), &mode, Precision::F32, &caps, Some(24));
        assert!(matches!(chunk, Err(Unsupported::Forced(_))));
        let long = plan_linear(&sizes(1 << 20, 64, 64), &mode, Precision::F32, &caps, None);
        assert!(matches!(long, Err(Unsupported::LoopBudget { .. })));
        let mut wide = sizes(1 << 20, 64, 64);
        wide.span = 1 << 33;
        let offsets = plan_linear(&wide, &mode, Precision::F32, &caps, None);
        assert!(matches!(offsets, Err(Unsupported::Offsets { .. })));
    }
}
