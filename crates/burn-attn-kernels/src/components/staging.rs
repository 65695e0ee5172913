//! Shared-memory staging: copies of row blocks of `[.., seq, d]` tensors (and of per-row
//! statistics) into padded shared-memory tiles, synchronous or with `cp.async` into a
//! double buffer, zero past the tensor's rows and columns.

use cubecl::prelude::barrier::copy_async_checked;
use cubecl::prelude::*;

use super::softmax::{live_lse, DEAD_LSE};

/// Stages `rows` rows of a `[.., seq, d]` tensor, from row `row0`, into `smem[dst..]` as
/// `[row][smem_stride]` with plain loads and stores, zero past `seq` and from `d` to `d_pad`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows_sync<F: Float>(
    src: &Tensor<F>,
    base: usize,
    row_stride: usize,
    col_stride: usize,
    row0: usize,
    seq: usize,
    d: usize,
    smem: &mut SharedMemory<F>,
    dst: usize,
    tid: usize,
    #[comptime] rows: usize,
    #[comptime] d_pad: usize,
    #[comptime] smem_stride: usize,
    #[comptime] threads: usize,
) {
    let mut idx = tid;
    while idx < comptime!(rows * d_pad) {
        let r = idx / d_pad;
        let c = idx % d_pad;
        let j = row0 + r;
        let mut x = F::new(0.0);
        if j < seq && c < d {
            x = src[base + j * row_stride + c * col_stride];
        }
        smem[dst + r * smem_stride + c] = x;
        idx += threads;
    }
}

/// The same staging with 16-byte asynchronous copies (`cp.async`, `chunk` values each:
/// eight 16-bit or four 32-bit ones), for rows whose columns are contiguous,
/// `d % chunk == 0` and 16-byte aligned: rows past `seq` are zero-filled by the copy itself
/// (source length 0). Columns `d..d_pad` are not written (see `zero_pad_columns`).
/// Completion is tracked by the caller's barrier. Where the threads divide the rows'
/// chunks evenly (d = 64, 128, 256 with 128 threads) each thread's copies are a constant
/// number of steps down one column, their offsets computed once; otherwise
/// a strided loop over all chunks.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows_async<F: Float>(
    src: &Tensor<F>,
    base: usize,
    row_stride: usize,
    row0: usize,
    seq: usize,
    d: usize,
    smem: &mut SharedMemory<F>,
    dst: usize,
    tid: usize,
    #[comptime] rows: usize,
    #[comptime] d_pad: usize,
    #[comptime] smem_stride: usize,
    #[comptime] threads: usize,
    #[comptime] chunk: usize,
) {
    let chunks = comptime!(d_pad / chunk);
    let copy_len = comptime!(chunk as u32);
    if comptime!(threads.is_multiple_of(chunks) && (rows * chunks).is_multiple_of(threads)) {
        // Every thread copies the same column of rows `tid / chunks + i * row_step`: the
        // offsets are computed once and stepped, the copy count is a constant.
        let row_step = comptime!(threads / chunks);
        let c = (tid % chunks) * chunk;
        if c < d {
            let r_first = tid / chunks;
            let j_first = row0 + r_first;
            let src_first = base + j_first * row_stride + c;
            let src_step = row_step * row_stride;
            let to_first = dst + r_first * smem_stride + c;
            #[unroll]
            for i in 0..comptime!(rows * chunks / threads) {
                let valid = j_first + i * row_step < seq;
                // An empty source at a valid address makes the copy write 16 zero bytes.
                let off = select(valid, src_first + i * src_step, base);
                let len = select(valid, chunk, 0usize);
                let to = to_first + comptime!(i * row_step * smem_stride);
                copy_async_checked(
                    &src.slice(off, off + len),
                    &mut smem.slice_mut(to, to + chunk),
                    copy_len,
                );
            }
        }
    } else {
        let mut idx = tid;
        while idx < comptime!(rows * d_pad / chunk) {
            let r = idx / chunks;
            let c = (idx % chunks) * chunk;
            if c < d {
                let j = row0 + r;
                let valid = j < seq;
                let off = select(valid, base + j * row_stride + c, base);
                let len = select(valid, chunk, 0usize);
                let to = dst + r * smem_stride + c;
                copy_async_checked(
                    &src.slice(off, off + len),
                    &mut smem.slice_mut(to, to + chunk),
                    copy_len,
                );
            }
            idx += threads;
        }
    }
}

/// Zeroes columns `d..d_pad` of `rows` shared-memory rows (`d` a multiple of the copy
/// chunk): the asynchronous staging never writes them, and the fragment loads read them.
#[cube]
pub(crate) fn zero_pad_columns<F: Float>(
    smem: &mut SharedMemory<F>,
    d: usize,
    tid: usize,
    #[comptime] rows: usize,
    #[comptime] d_pad: usize,
    #[comptime] smem_stride: usize,
    #[comptime] threads: usize,
) {
    let pad = d_pad - d;
    let mut idx = tid;
    while idx < rows * pad {
        smem[(idx / pad) * smem_stride + d + idx % pad] = F::new(0.0);
        idx += threads;
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
    tile: &mut SharedMemory<F>,
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
    lse_tile: &mut SharedMemory<f32>,
    delta_tile: &mut SharedMemory<f32>,
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
