//! Shared-memory staging: copies of row blocks of `[.., seq, d]` tensors (and of per-row
//! statistics) into padded shared-memory tiles, synchronous or with `cp.async` into a
//! double buffer, zero past the tensor's rows and columns.

use cubecl::prelude::barrier::copy_async_checked;
use cubecl::prelude::*;

use super::softmax::{live_lse, DEAD_LSE};

/// The shape of one shared-memory tile of rows: `rows` rows of `d_pad` values (the head or
/// value dim rounded up for the products) at `stride` values apart, filled by `threads`
/// units, in copies of `chunk` values (16 bytes) where it is filled asynchronously. A
/// comptime value: each distinct tile compiles its own copy loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StageTile {
    pub rows: usize,
    pub d_pad: usize,
    pub stride: usize,
    pub threads: usize,
    pub chunk: usize,
}

impl StageTile {
    /// The tiles of `rows` rows of the head dim (Q, K) and of the value dim (V, dO), rows
    /// padded by `pad` values and copied `pad` values at a time (`pad` = 16 bytes of the
    /// dtype: distinct banks for the fragment loads, whole `cp.async` copies).
    pub fn head_and_value(
        rows: usize,
        dim_pad: usize,
        value_dim_pad: usize,
        threads: usize,
        pad: usize,
    ) -> (Self, Self) {
        let head = Self {
            rows,
            d_pad: dim_pad,
            stride: dim_pad + pad,
            threads,
            chunk: pad,
        };
        let value = Self {
            d_pad: value_dim_pad,
            stride: value_dim_pad + pad,
            ..head
        };
        (head, value)
    }

    /// Values one buffer of this tile takes.
    pub fn len(&self) -> usize {
        self.rows * self.stride
    }

    /// The same tile with `rows` rows.
    pub fn with_rows(&self, rows: usize) -> Self {
        Self { rows, ..*self }
    }
}

/// Where one head's rows of a `[batch, heads, seq, d]` tensor are: the element offset of
/// its row 0, the row and column strides, and the valid rows and columns (`seq`, `d`).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct HeadRows {
    pub base: usize,
    pub row_stride: usize,
    pub col_stride: usize,
    pub seq: usize,
    pub d: usize,
}

#[cube]
impl HeadRows {
    /// Head `h` of batch `b` of `src`, with `seq` valid rows of `d` valid columns (the
    /// kernel's own sizes, which it keeps live anyway: reading them again from each tensor
    /// would hold more registers).
    pub fn new<F: Float>(src: &Tensor<F>, b: usize, h: usize, seq: usize, d: usize) -> HeadRows {
        HeadRows {
            base: b * src.stride(0) + h * src.stride(1),
            row_stride: src.stride(2),
            col_stride: src.stride(3),
            seq,
            d,
        }
    }
}

/// Stages `tile.rows` rows of `src`, from row `row0`, into `smem[dst..]` with plain loads
/// and stores, zero past the valid rows and from the valid columns to `tile.d_pad`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows_sync<F: Float>(
    src: &Tensor<F>,
    at: HeadRows,
    row0: usize,
    smem: &mut [F],
    dst: usize,
    tid: usize,
    #[comptime] tile: StageTile,
) {
    let d_pad = comptime!(tile.d_pad);
    let mut idx = tid;
    while idx < comptime!(tile.rows * tile.d_pad) {
        let r = idx / d_pad;
        let c = idx % d_pad;
        let j = row0 + r;
        let mut x = F::new(0.0);
        if j < at.seq && c < at.d {
            x = src[at.base + j * at.row_stride + c * at.col_stride];
        }
        smem[dst + r * comptime!(tile.stride) + c] = x;
        idx += comptime!(tile.threads);
    }
}

/// The same staging with 16-byte asynchronous copies (`cp.async`, `tile.chunk` values each),
/// for rows whose columns are contiguous, with `d % chunk == 0` and 16-byte aligned: rows
/// past the valid ones are zero-filled by the copy itself (source length 0). Columns from
/// `d` to `d_pad` are not written (see [`zero_pad_columns`]). Completion is tracked by the
/// caller's barrier. Where the threads divide the rows' chunks evenly (d = 64, 128, 256
/// with 128 threads) each thread's copies are a constant number of steps down one column,
/// their offsets computed once; otherwise a strided loop over all chunks.
#[cube]
pub(crate) fn stage_rows_async<F: Float>(
    src: &Tensor<F>,
    at: HeadRows,
    row0: usize,
    smem: &mut [F],
    dst: usize,
    tid: usize,
    #[comptime] tile: StageTile,
) {
    let chunk = comptime!(tile.chunk);
    let threads = comptime!(tile.threads);
    let chunks = comptime!(tile.d_pad / tile.chunk);
    let copy_len = comptime!(tile.chunk as u32);
    let smem_stride = comptime!(tile.stride);
    if comptime!(threads.is_multiple_of(chunks) && (tile.rows * chunks).is_multiple_of(threads)) {
        // Every thread copies the same column of rows `tid / chunks + i * row_step`: the
        // offsets are computed once and stepped, the copy count is a constant.
        let row_step = comptime!(threads / chunks);
        let c = (tid % chunks) * chunk;
        if c < at.d {
            let r_first = tid / chunks;
            let j_first = row0 + r_first;
            let src_first = at.base + j_first * at.row_stride + c;
            let src_step = row_step * at.row_stride;
            let to_first = dst + r_first * smem_stride + c;
            #[unroll]
            for i in 0..comptime!(tile.rows * chunks / threads) {
                let valid = j_first + i * row_step < at.seq;
                // An empty source at a valid address makes the copy write 16 zero bytes.
                let off = select(valid, src_first + i * src_step, at.base);
                let len = select(valid, chunk, 0usize);
                let to = to_first + comptime!(i * row_step * smem_stride);
                copy_async_checked(&src[off..off + len], &mut smem[to..to + chunk], copy_len);
            }
        }
    } else {
        let mut idx = tid;
        while idx < comptime!(tile.rows * chunks) {
            let r = idx / chunks;
            let c = (idx % chunks) * chunk;
            if c < at.d {
                let j = row0 + r;
                let valid = j < at.seq;
                let off = select(valid, at.base + j * at.row_stride + c, at.base);
                let len = select(valid, chunk, 0usize);
                let to = dst + r * smem_stride + c;
                copy_async_checked(&src[off..off + len], &mut smem[to..to + chunk], copy_len);
            }
            idx += threads;
        }
    }
}

/// Zeroes columns `d..tile.d_pad` of `buffers` consecutive buffers of `tile` (`d` a
/// multiple of the copy chunk): the asynchronous staging never writes them, and the
/// fragment loads read them.
#[cube]
pub(crate) fn zero_pad_columns<F: Float>(
    smem: &mut [F],
    d: usize,
    tid: usize,
    #[comptime] tile: StageTile,
    #[comptime] buffers: usize,
) {
    let pad = comptime!(tile.d_pad) - d;
    let mut idx = tid;
    while idx < comptime!(buffers * tile.rows) * pad {
        smem[(idx / pad) * comptime!(tile.stride) + d + idx % pad] = F::new(0.0);
        idx += comptime!(tile.threads);
    }
}

/// Cooperatively stages rows `t0 .. t0 + rows` of one head of `src` (`[b, h, n, d]`, any
/// strides) into `tile`, rows past `n` as zeros: row-major (`rows x dim`), or with
/// `transposed` element `(r, c)` at `c * (rows + 1) + r` (the padding keeps both the
/// staging writes and the product's reads of consecutive rows on distinct banks). `units`
/// is the number of units of the cube.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows<F: Float>(
    src: &Tensor<F>,
    tile: &mut [F],
    base: usize,
    t0: usize,
    n: usize,
    #[comptime] dim: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] transposed: bool,
) {
    let stride_n = src.stride(2);
    let stride_d = src.stride(3);
    let mut idx = UNIT_POS_X as usize;
    while idx < rows * dim {
        let r = idx / dim;
        let c = idx % dim;
        let j = t0 + r;
        let mut val = F::new(0.0);
        if j < n {
            val = src[base + j * stride_n + c * stride_d];
        }
        if transposed {
            tile[c * (rows + 1) + r] = val;
        } else {
            tile[idx] = val;
        }
        idx += units;
    }
}

/// Stages the lse (through [`live_lse`]) and `D` of query rows `t0 .. t0 + rows` of one head
/// into shared memory from element `dst`, with plain loads and stores; rows past `seq_q` get
/// [`DEAD_LSE`] and `D = 0`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_row_stats(
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    lse_tile: &mut [f32],
    delta_tile: &mut [f32],
    lse_base: usize,
    delta_base: usize,
    t0: usize,
    seq_q: usize,
    dst: usize,
    tid: usize,
    #[comptime] rows: usize,
    #[comptime] threads: usize,
) {
    let mut idx = tid;
    while idx < rows {
        let i = t0 + idx;
        let mut l = f32::new(DEAD_LSE);
        let mut d = f32::new(0.0);
        if i < seq_q {
            l = live_lse(lse[lse_base + i * lse.stride(2)]);
            d = delta[delta_base + i * delta.stride(2)];
        }
        lse_tile[dst + idx] = l;
        delta_tile[dst + idx] = d;
        idx += threads;
    }
}
