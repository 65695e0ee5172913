//! The pieces of the chunked linear-attention kernel: where a chunk's rows are in a head
//! (forward or reversed), their staging into shared memory, the carried f32 state.

use cubecl::prelude::*;

use crate::plan::LinearMap;

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
/// `smem[r * width + v] = row t0 + r, column v0 + v` (through `map` where `mapped`), zero
/// from row `end` and past `value_dim`.
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
    #[comptime] chunk: usize,
    #[comptime] width: usize,
    #[comptime] units: usize,
    #[comptime] reverse: bool,
    #[comptime] map: LinearMap,
    #[comptime] mapped: bool,
) {
    let mut idx = UNIT_POS_X as usize;
    while idx < comptime!(chunk * width) {
        let r = idx / width;
        let v = idx % width;
        let t = t0 + r;
        let mut x = F::new(0.0);
        if t < end && v0 + v < value_dim {
            let value = f32::cast_from(src[walk.at(t, v0 + v, reverse)]);
            x = F::cast_from(feature_map(value, map, mapped));
        }
        smem[idx] = x;
        idx += units;
    }
}

/// Stages the per-row scalars of rows `t0 .. t0 + chunk` of `src` (`[batch, heads, rows]`,
/// f32; batch `b`, head `head`; reversed within `rows`): zero from row `end`.
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
    #[comptime] chunk: usize,
    #[comptime] reverse: bool,
) {
    let r = UNIT_POS_X as usize;
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
