//! The pieces of the chunked linear-attention kernel: where a chunk's rows are in a head
//! (forward or reversed), their staging into shared memory, the carried f32 state.

// A comptime condition around a runtime one stays two `if`s.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::barrier::copy_async_checked;
use cubecl::prelude::*;

use crate::plan::{LinearExtra, LinearMap, LinearMode};

/// The rows of one head of a `[batch, heads, rows, d]` tensor as a pass walks them: row `t`
/// of the walk is row `t` of the head, or row `rows - 1 - t` when reversed.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct WalkRows {
    pub base: usize,
    pub row_stride: usize,
    pub col_stride: usize,
    pub rows: usize,
}

#[cube]
impl WalkRows {
    /// Batch `b`, grid head `h` of `heads` (the tensor's head is `h / (heads / its heads)`).
    pub fn new<F: Numeric>(
        src: &Tensor<F>,
        b: usize,
        h: usize,
        heads: usize,
        rows: usize,
    ) -> WalkRows {
        let head = h / (heads / src.shape(1));
        WalkRows {
            base: b * src.stride(0) + head * src.stride(1),
            row_stride: src.stride(2),
            col_stride: src.stride(3),
            rows,
        }
    }

    /// The element offset of row `t` of the walk (which must be `< rows`), column `col`.
    pub fn at(&self, t: usize, col: usize, #[comptime] reverse: bool) -> usize {
        let row = if reverse { self.rows - 1 - t } else { t };
        self.base + row * self.row_stride + col * self.col_stride
    }
}

/// Where one cube of a pass works (see `linear_chunk_kernel`'s grid): batch `batch`, grid
/// head `head`, value columns from `v0`, walk rows `start .. end` of its segment, and the
/// batch of its state in the state tensors (segment-major).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct PassCube {
    pub batch: usize,
    pub head: usize,
    pub v0: usize,
    pub start: usize,
    pub end: usize,
    pub state_batch: usize,
}

#[cube]
impl PassCube {
    /// This cube's, for `rows` rows, `heads` grid heads, segments of `segment_rows` and
    /// value blocks of `value_block` columns.
    pub fn new(
        rows: usize,
        heads: usize,
        segment_rows: usize,
        #[comptime] value_block: usize,
    ) -> PassCube {
        let bh = CUBE_POS_Y as usize;
        let batch = bh / heads;
        let segment = CUBE_POS_Z as usize;
        let start = segment * segment_rows;
        let mut end = start + segment_rows;
        if end > rows {
            end = rows;
        }
        PassCube {
            batch,
            head: bh % heads,
            v0: CUBE_POS_X as usize * value_block,
            start,
            end,
            state_batch: segment * (CUBE_COUNT_Y as usize / heads) + batch,
        }
    }
}

/// `map` of `x` (the identity where `apply` is off).
#[cube]
pub(crate) fn feature_map(x: f32, #[comptime] map: LinearMap, #[comptime] apply: bool) -> f32 {
    let mut y = x;
    if comptime!(apply && map == LinearMap::EluPlusOne) {
        y = if x > 0.0 { x + 1.0 } else { f32::exp(x) };
    }
    if comptime!(apply && map == LinearMap::Relu) {
        y = f32::max(x, 0.0);
    }
    if comptime!(apply && map == LinearMap::Softplus) {
        // ln(1 + e^x) = x + ln(1 + e^-x), exact in f32 past x = 20.
        y = if x > 20.0 {
            x
        } else {
            f32::ln(1.0 + f32::exp(x))
        };
    }
    y
}

/// Stages rows `t0 .. t0 + chunk` of the walk transposed: `smem[col * (chunk + 1) + r] =
/// row t0 + r, column col` (through `map` where `mapped`), zero from row `end` and from
/// `dim` to `dim_pad`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_transposed<F: Float>(
    src: &Tensor<F>,
    walk: WalkRows,
    smem: &mut [F],
    t0: usize,
    end: usize,
    dim: usize,
    #[comptime] chunk: usize,
    #[comptime] dim_pad: usize,
    #[comptime] units: usize,
    #[comptime] reverse: bool,
    #[comptime] map: LinearMap,
    #[comptime] mapped: bool,
) {
    let stride = comptime!(chunk + 1);
    let mut idx = UNIT_POS_X as usize;
    // Consecutive units take consecutive columns of one row: coalesced reads.
    while idx < comptime!(chunk * dim_pad) {
        let r = idx / dim_pad;
        let col = idx % dim_pad;
        let t = t0 + r;
        let mut x = F::new(0.0);
        if t < end && col < dim {
            x = F::cast_from(feature_map(
                f32::cast_from(src[walk.at(t, col, reverse)]),
                map,
                mapped,
            ));
        }
        smem[col * stride + r] = x;
        idx += units;
    }
}

/// Stages rows `t0 .. t0 + chunk`, columns `v0 .. v0 + width` of the walk row-major:
/// `smem[r * stride + v] = row t0 + r, column v0 + v` (through `map` where `mapped`), zero
/// from row `end` and past `value_dim`. Unit `tid` of `units` takes every `units`-th
/// element, `group` of them per loop step (unrolled: their loads are in flight together;
/// `units * group` must divide `chunk * width`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_value_block<F: Float>(
    src: &Tensor<F>,
    walk: WalkRows,
    smem: &mut [F],
    t0: usize,
    end: usize,
    v0: usize,
    value_dim: usize,
    tid: usize,
    #[comptime] chunk: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
    #[comptime] reverse: bool,
    #[comptime] map: LinearMap,
    #[comptime] mapped: bool,
    #[comptime] group: usize,
) {
    let mut first = tid;
    while first < comptime!(chunk * width) {
        #[unroll]
        for i in 0..group {
            stage_element::<F>(
                src,
                walk,
                smem,
                first + i * units,
                t0,
                end,
                v0,
                value_dim,
                width,
                stride,
                reverse,
                map,
                mapped,
            );
        }
        first += comptime!(units * group);
    }
}

/// Element `idx` of [`stage_value_block`]'s block.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_element<F: Float>(
    src: &Tensor<F>,
    walk: WalkRows,
    smem: &mut [F],
    idx: usize,
    t0: usize,
    end: usize,
    v0: usize,
    value_dim: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] reverse: bool,
    #[comptime] map: LinearMap,
    #[comptime] mapped: bool,
) {
    let r = idx / width;
    let v = idx % width;
    let t = t0 + r;
    let mut x = F::new(0.0);
    if t < end && v0 + v < value_dim {
        let value = f32::cast_from(src[walk.at(t, v0 + v, reverse)]);
        x = F::cast_from(feature_map(value, map, mapped));
    }
    smem[r * stride + v] = x;
}

/// Where unit `tid`'s pieces of a staged block are: the block's `chunk` rows of `width`
/// values go in pieces of `copy` values, each unit one column of pieces, on rows `row +
/// i * row_step` (`units` a multiple of `width / copy`, dividing `chunk * width / copy`).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct BlockPieces {
    /// The unit's first row.
    pub row: usize,
    /// The unit's column.
    pub col: usize,
}

#[cube]
impl BlockPieces {
    /// Unit `tid`'s.
    pub fn of(tid: usize, #[comptime] width: usize, #[comptime] copy: usize) -> BlockPieces {
        let pieces = comptime!(width / copy);
        BlockPieces {
            row: tid / pieces,
            col: (tid % pieces) * copy,
        }
    }
}

/// Rows between a unit's pieces (see [`BlockPieces`]).
fn piece_row_step(width: usize, units: usize, copy: usize) -> usize {
    units / (width / copy)
}

/// [`stage_value_block`] with 16-byte asynchronous copies (`cp.async`, `copy` values each),
/// for contiguous columns, 16-byte aligned rows and a block whose columns are all valid:
/// rows from `end` are zero-filled by the copy itself (an empty source). The caller commits
/// the copies and waits for them, then maps the block ([`map_staged_block`]).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_value_block_async<F: Float>(
    src: &Tensor<F>,
    walk: WalkRows,
    smem: &mut [F],
    t0: usize,
    end: usize,
    v0: usize,
    tid: usize,
    #[comptime] chunk: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
    #[comptime] reverse: bool,
    #[comptime] copy: usize,
) {
    let row_step = comptime!(piece_row_step(width, units, copy));
    let at = BlockPieces::of(tid, width, copy);
    let first = at.row * stride + at.col;
    #[unroll]
    for i in 0..comptime!(chunk * width / copy / units) {
        let t = t0 + at.row + i * row_step;
        let valid = t < end;
        // An empty source at a valid address makes the copy write zeros.
        let off = select(
            valid,
            walk.at(select(valid, t, 0usize), v0 + at.col, reverse),
            walk.base,
        );
        let len = select(valid, copy, 0usize);
        let to = first + comptime!(i * row_step * stride);
        copy_async_checked(
            &src[off..off + len],
            &mut smem[to..to + copy],
            comptime!(copy as u32),
        );
    }
}

/// Applies `map` in place to unit `tid`'s pieces of a block [`stage_value_block_async`]
/// staged (rows before `end` only: rows past it stay zero).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn map_staged_block<F: Float>(
    smem: &mut [F],
    t0: usize,
    end: usize,
    tid: usize,
    #[comptime] chunk: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
    #[comptime] map: LinearMap,
    #[comptime] copy: usize,
) {
    let row_step = comptime!(piece_row_step(width, units, copy));
    let at = BlockPieces::of(tid, width, copy);
    let first = at.row * stride + at.col;
    #[unroll]
    for i in 0..comptime!(chunk * width / copy / units) {
        if t0 + at.row + i * row_step < end {
            #[unroll]
            for j in 0..copy {
                let to = first + comptime!(i * row_step * stride + j);
                smem[to] = F::cast_from(feature_map(f32::cast_from(smem[to]), map, true));
            }
        }
    }
}

/// Stages the per-row scalars of rows `t0 .. t0 + chunk` of `src` (`[batch, heads, rows]`,
/// f32; batch `b`, head `head`; reversed within `rows`): zero from row `end`. Units
/// `tid < chunk` stage one each.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_row_scalars(
    src: &Tensor<f32>,
    b: usize,
    head: usize,
    rows: usize,
    end: usize,
    smem: &mut [f32],
    t0: usize,
    tid: usize,
    #[comptime] chunk: usize,
    #[comptime] reverse: bool,
) {
    let r = tid;
    if r < chunk {
        let t = t0 + r;
        let mut x = f32::new(0.0);
        if t < end {
            let row = if reverse { rows - 1 - t } else { t };
            x = src[b * src.stride(0) + head * src.stride(1) + row * src.stride(2)];
        }
        smem[r] = x;
    }
}

/// The starting vectors of the state: `z` (`dim`, zero-padded to `dim_pad`) and the
/// scalar's row `x` (the cube's `value_block` columns from `v0`), from `z_in` and `x_in` at
/// state batch `batch`, head `hs` with `state_in`, else 0. Unit `tid` of `units`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_state_vectors(
    z_in: &Tensor<f32>,
    x_in: &Tensor<f32>,
    z_s: &mut [f32],
    x_s: &mut [f32],
    batch: usize,
    hs: usize,
    v0: usize,
    dim: usize,
    value_dim: usize,
    tid: usize,
    #[comptime] dim_pad: usize,
    #[comptime] value_block: usize,
    #[comptime] units: usize,
    #[comptime] mode: LinearMode,
) {
    let mut d = tid;
    while d < dim_pad {
        let mut x = f32::new(0.0);
        if comptime!(mode.state_in) {
            if d < dim {
                x = z_in[batch * z_in.stride(0) + hs * z_in.stride(1) + d * z_in.stride(2)];
            }
        }
        z_s[d] = x;
        d += units;
    }
    if tid < value_block {
        let mut x = f32::new(0.0);
        if comptime!(mode.state_in && mode.extra != LinearExtra::None) {
            if v0 + tid < value_dim {
                x = x_in
                    [batch * x_in.stride(0) + hs * x_in.stride(1) + (v0 + tid) * x_in.stride(2)];
            }
        }
        x_s[tid] = x;
    }
}

/// Writes the final state's vectors: `z` (the same in every value block, from the first
/// only) and the scalar's row `x` (where the mode has a scalar). Unit `tid` of `units`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_state_vectors(
    z_out: &mut Tensor<f32>,
    x_out: &mut Tensor<f32>,
    z_s: &[f32],
    x_s: &[f32],
    batch: usize,
    h: usize,
    v0: usize,
    dim: usize,
    value_dim: usize,
    tid: usize,
    #[comptime] value_block: usize,
    #[comptime] units: usize,
    #[comptime] mode: LinearMode,
) {
    if v0 == 0 {
        let mut d = tid;
        while d < dim {
            let at = batch * z_out.stride(0) + h * z_out.stride(1) + d * z_out.stride(2);
            z_out[at] = z_s[d];
            d += units;
        }
    }
    if comptime!(mode.extra != LinearExtra::None) {
        if tid < value_block && v0 + tid < value_dim {
            let at = batch * x_out.stride(0) + h * x_out.stride(1) + (v0 + tid) * x_out.stride(2);
            x_out[at] = x_s[tid];
        }
    }
}

/// The state's vectors take the chunk: `z += sum of the b rows` (where the mode normalises
/// or writes its state) and `x += sum_j e_j c_j` (the keys' scalars, or 1 per row for the
/// rows' side) where it has a scalar. `b` row `j`, column `d` is at `j * b_row + d *
/// b_col`; `c` row `j` at `j * c_row`. Unit `tid` of `units`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn update_state_vectors<F: Float>(
    b_s: &[F],
    c_s: &[F],
    e_s: &[f32],
    z_s: &mut [f32],
    x_s: &mut [f32],
    tid: usize,
    #[comptime] b_row: usize,
    #[comptime] b_col: usize,
    #[comptime] c_row: usize,
    #[comptime] chunk: usize,
    #[comptime] dim_pad: usize,
    #[comptime] value_block: usize,
    #[comptime] units: usize,
    #[comptime] mode: LinearMode,
) {
    if comptime!(mode.normalise || mode.state_out) {
        let mut d = tid;
        while d < dim_pad {
            let mut sum = f32::new(0.0);
            for j in 0..chunk {
                sum += f32::cast_from(b_s[j * b_row + d * b_col]);
            }
            z_s[d] += sum;
            d += units;
        }
    }
    if comptime!(mode.extra != LinearExtra::None) {
        // Padded rows have c = 0, so a weight of 1 there adds nothing.
        if tid < value_block {
            let mut sum = f32::new(0.0);
            for j in 0..chunk {
                let mut weight = f32::new(1.0);
                if comptime!(mode.extra == LinearExtra::Keys) {
                    weight = e_s[j];
                }
                sum += weight * f32::cast_from(c_s[j * c_row + tid]);
            }
            x_s[tid] += sum;
        }
    }
}
