//! The pieces the matrix-unit backwards (`flash_mma_backward`, `flash_mma_sparse_backward`)
//! share: the dQ kernel's row statistics, the dK/dV kernel's streamed query tile issued a
//! step ahead, and the gradient rows out. The kernels differ only in which tiles they visit
//! and which elements they mask.

use cubecl::prelude::*;

use super::epilogue::{acc_rows_to_smem, store_plane_rows};
use super::fragments::MmaVecAcc;
use super::pipeline::{stage_pair, BufferBarriers};
use super::softmax::{live_lse, DEAD_LSE};
use super::staging::{HeadRows, StageTile};

/// `D = rowsum(dO * O)` and the lse (through [`live_lse`]; [`DEAD_LSE`] past `seq_q`) of
/// the lane's two rows `w0 + g` and `w0 + g + 8` into `d_row` and `lse_row`, from global
/// memory, and `D` into `delta`. The four lanes of a group hold the same rows: each sums
/// every fourth column of `dO * O`, then they exchange sums.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dq_row_stats<F: Float>(
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &mut Tensor<f32>,
    do_at: HeadRows,
    d_row: &mut Array<f32>,
    lse_row: &mut Array<f32>,
    b: usize,
    h: usize,
    w0: usize,
    g: usize,
    t: usize,
    seq_q: usize,
    value_dim: usize,
) {
    let o_base = b * out.stride(0) + h * out.stride(1);
    #[unroll]
    for hf in 0..2usize {
        let row = w0 + g + 8 * hf;
        let mut d = f32::new(0.0);
        let mut l = f32::new(DEAD_LSE);
        if row < seq_q {
            let mut c = t;
            while c < value_dim {
                d += f32::cast_from(
                    d_out[do_at.base + row * do_at.row_stride + c * do_at.col_stride],
                ) * f32::cast_from(out[o_base + row * out.stride(2) + c * out.stride(3)]);
                c += 4;
            }
            l = live_lse(lse[b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2)]);
        }
        d += plane_shuffle_xor(d, 1);
        d += plane_shuffle_xor(d, 2);
        if row < seq_q && t == 0 {
            let at = b * delta.stride(0) + h * delta.stride(1) + row * delta.stride(2);
            delta[at] = d;
        }
        d_row[hf] = d;
        lse_row[hf] = l;
    }
}

/// One query row's lse (as the forward stored it) and `D`, loaded a step ahead.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone))]
pub(crate) struct RowStats {
    pub lse: f32,
    pub delta: f32,
}

/// The dK/dV kernels' next step, issued while the current one is computed: rows `tn..` of
/// query head `hn`'s Q and dO copied with `cp.async` into `buffer` of their tiles and
/// committed on its barrier (every unit of the cube must call it), and this unit's row
/// `tn + tid` of the lse and `D` loaded (units below `block_q`; a padding row's values
/// elsewhere), for the caller to store into the other stats buffer at the end of the step.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_query_tile<F: Float>(
    q: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    q_smem: &mut [F],
    do_smem: &mut [F],
    barriers: &BufferBarriers,
    b: usize,
    hn: usize,
    tn: usize,
    buffer: usize,
    tid: usize,
    seq_q: usize,
    dim: usize,
    value_dim: usize,
    #[comptime] q_tile: StageTile,
    #[comptime] do_tile: StageTile,
    #[comptime] block_q: usize,
) -> RowStats {
    stage_pair::<F>(
        q,
        HeadRows::new(q, b, hn, seq_q, dim),
        q_smem,
        d_out,
        HeadRows::new(d_out, b, hn, seq_q, value_dim),
        do_smem,
        tn,
        buffer,
        tid,
        q_tile,
        do_tile,
        true,
    );
    barriers.commit(buffer);
    let mut stats = RowStats {
        lse: f32::new(DEAD_LSE),
        delta: f32::new(0.0),
    };
    if tid < block_q {
        let i = tn + tid;
        if i < seq_q {
            stats.lse = lse[b * lse.stride(0) + hn * lse.stride(1) + i * lse.stride(2)];
            stats.delta = delta[b * delta.stride(0) + hn * delta.stride(1) + i * delta.stride(2)];
        }
    }
    stats
}

/// A plane's 16 gradient rows out: its accumulators (`tiles` tiles of 8 columns) times
/// `scale` over its own rows of `smem` (row stride `stride`; only this plane reads them),
/// then stored along rows to rows `w0..` (below `n_rows`, columns below `cols`) of head `h`
/// of batch `b` of `out` ([`store_plane_rows`]). The caller synchronises the cube first
/// (other planes may still read, or write, those rows).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_plane_gradient<F: Float, N: Size>(
    acc: &Array<Vector<f32, MmaVecAcc>>,
    scale: f32,
    smem: &mut [F],
    out: &mut Tensor<Vector<F, N>>,
    b: usize,
    h: usize,
    w0: usize,
    warp: usize,
    lane: usize,
    n_rows: usize,
    cols: usize,
    #[comptime] stride: usize,
    #[comptime] tiles: usize,
    #[comptime] c_vs: usize,
    #[comptime] cols_pad: usize,
) {
    let at = warp * 16 * stride;
    acc_rows_to_smem::<F>(
        acc,
        scale,
        smem,
        at,
        stride,
        lane / 4,
        lane % 4,
        tiles,
        c_vs,
    );
    sync_plane();
    let base = b * out.stride(0) + h * out.stride(1);
    let row_stride = out.stride(2);
    store_plane_rows::<F, N>(
        &*smem, at, stride, out, base, row_stride, w0, n_rows, cols, lane, 16usize, cols_pad,
    );
}

/// Adds up a per-row (or per-key) gradient held by each lane as partial sums of its two
/// accumulator rows `w0 + g` and `w0 + g + 8` over the four lanes of its group, and writes
/// it to `grad[b, h, row]` (rows below `end`; lane `t = 0` writes).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_row_sums(
    grad: &mut Tensor<f32>,
    partial: &Array<f32>,
    b: usize,
    h: usize,
    w0: usize,
    g: usize,
    t: usize,
    end: usize,
) {
    #[unroll]
    for hf in 0..2usize {
        let mut x = partial[hf];
        x += plane_shuffle_xor(x, 1);
        x += plane_shuffle_xor(x, 2);
        let row = w0 + g + 8 * hf;
        let at = b * grad.stride(0) + h * grad.stride(1) + row * grad.stride(2);
        if row < end && t == 0 {
            grad[at] = x;
        }
    }
}
