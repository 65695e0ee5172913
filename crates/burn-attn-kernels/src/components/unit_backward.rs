//! The steps the portable backwards (`flash_unit_backward`, `flash_unit_sparse_backward`)
//! share: the dQ kernel's row statistics, key-tile step and dQ write, and the dK/dV
//! kernel's query-tile step and gradient write. The kernels differ only in which tiles
//! they visit and which elements they mask.
//!
//! A step's mask: an element is visible when it lies in the band (`lo0..=hi0` for the
//! unit's first row or key, shifted per register row) and below the sequence ends, and,
//! with `use_hide` (comptime: the flags exist only then) on a `masked` step, its `hide`
//! flags do not hold the hidden bit (1); rows whose lse is `-inf` get nothing. Where the flags hold
//! the dropped bit (2) the forward dropped the probability: its `P` enters `dV` and `dP` as 0, the
//! kept ones times `keep_scale` (FlashAttention's dropout backward: `dS = P (dP' - D)`
//! with `dP'` the masked, scaled `dO V^T`). With `use_bias` on a `masked` step, `bias` terms
//! add to the scaled scores, and `dS` is their gradient: the dQ step sums `dS * slope` per
//! row (`grad_terms`: the soft edge's reach), the dK/dV step `dS` per key (`grad_terms`:
//! the key bias). With `use_softcap` the scaled scores pass through `softcap * tanh(s /
//! softcap)` first, and `dS` takes its derivative before the products.

use cubecl::prelude::*;

use super::register_tile::tile_product;
use super::softmax::{has_probabilities, NEG_BIG};
use super::staging::stage_rows;

/// Stages `D_i = rowsum(dO_i * O_i)` (also written to `delta`) and the lse of the cube's
/// `block_q` rows from `r0` into `d_tile` and `lse_tile` (rows past `seq_q`: 0 and
/// `NEG_BIG`, so they get no probabilities). `do_base` is the head's offset in `d_out`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_row_stats<F: Float>(
    out: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &mut Tensor<f32>,
    d_tile: &mut [f32],
    lse_tile: &mut [f32],
    b: usize,
    h: usize,
    r0: usize,
    seq_q: usize,
    do_base: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] units: usize,
) {
    let mut idx = UNIT_POS_X as usize;
    while idx < block_q {
        let row = r0 + idx;
        let mut d_i = f32::new(0.0);
        let mut lse_i = f32::new(NEG_BIG);
        if row < seq_q {
            let o_at = b * out.stride(0) + h * out.stride(1) + row * out.stride(2);
            let g_at = do_base + row * d_out.stride(2);
            for c in 0..value_dim {
                d_i += f32::cast_from(d_out[g_at + c * d_out.stride(3)])
                    * f32::cast_from(out[o_at + c * out.stride(3)]);
            }
            lse_i = lse[b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2)];
            let at = b * delta.stride(0) + h * delta.stride(1) + row * delta.stride(2);
            delta[at] = d_i;
        }
        d_tile[idx] = d_i;
        lse_tile[idx] = lse_i;
        idx += units;
    }
}

/// The dQ kernel's step over the key tile at `t0`, for the whole cube: `dP = dO V^T` (V
/// staged into `kv`), `S = Q K^T` (K staged into `kv`, kept for the product), `dS = P (dP
/// - D)` into `ds_tile` (zero where masked), then `dQ += dS K` into each unit's register
/// tile `dq_acc` (and with `grad_terms`, `row_grad[a] += dS * slope` over the tile's keys
/// for register row `a`). `hide` holds `rq x rk` flags (row-major by register row).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dq_key_tile<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    q_t: &[F],
    do_t: &[F],
    kv: &mut [F],
    ds_tile: &mut [f32],
    lse_tile: &[f32],
    d_tile: &[f32],
    s: &mut Array<f32>,
    dp: &mut Array<f32>,
    dq_acc: &mut Array<f32>,
    hide: &Array<u32>,
    bias: &Array<f32>,
    slope: &Array<f32>,
    row_grad: &mut Array<f32>,
    k_base: usize,
    v_base: usize,
    t0: i32,
    masked: bool,
    lo0: i32,
    hi0: i32,
    seq_k: usize,
    scale: f32,
    keep_scale: f32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] use_hide: bool,
    #[comptime] use_bias: bool,
    #[comptime] grad_terms: bool,
    softcap: f32,
    #[comptime] use_softcap: bool,
) {
    let rq = comptime!(block_q / row_threads);
    let rk = comptime!(block_k / col_threads);
    let rd = comptime!(dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let q_stride = comptime!(block_q + 1);
    let k_stride = comptime!(block_k + 1);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    let start = usize::cast_from(t0);

    // dP = dO V^T over the value dim.
    stage_rows::<F>(v, kv, v_base, start, seq_k, value_dim, block_k, units, true);
    sync_cube();
    tile_product::<F, F>(
        dp,
        do_t,
        &*kv,
        ty,
        tx,
        value_dim,
        q_stride,
        1usize,
        k_stride,
        1usize,
        rq,
        row_threads,
        rk,
        col_threads,
        block_k,
        true,
    );
    sync_cube();
    // S = Q K^T over the head dim; K stays for dQ.
    stage_rows::<F>(k, kv, k_base, start, seq_k, dim, block_k, units, true);
    sync_cube();
    tile_product::<F, F>(
        s,
        q_t,
        &*kv,
        ty,
        tx,
        dim,
        q_stride,
        1usize,
        k_stride,
        1usize,
        rq,
        row_threads,
        rk,
        col_threads,
        block_k,
        true,
    );
    #[unroll]
    for a in 0..rq {
        let r = ty + a * row_threads;
        let shift = (a * row_threads) as i32;
        let lse_i = lse_tile[r];
        let d_i = d_tile[r];
        #[unroll]
        for c in 0..rk {
            let key = tx + c * col_threads;
            let j = t0 + key as i32;
            let mut seen = j >= lo0 + shift
                && j <= hi0 + shift
                && j < seq_k as i32
                && has_probabilities(lse_i);
            let e = element_logit(
                s[a * rk + c],
                scale,
                softcap,
                hide,
                bias,
                a * rk + c,
                masked,
                keep_scale,
                use_hide,
                use_bias,
                use_softcap,
            );
            seen = seen && !e.hidden;
            let mut ds = f32::new(0.0);
            if seen {
                let p = f32::exp(e.x - lse_i);
                ds = p * (dp[a * rk + c] * e.keep - d_i);
            }
            #[allow(clippy::collapsible_if)]
            if grad_terms {
                if masked {
                    row_grad[a] += ds * slope[a * rk + c];
                }
            }
            ds_tile[r * k_stride + key] = ds * e.d_cap;
        }
    }
    sync_cube();
    // dQ += dS K: K as [key][d] read from its transposed tile.
    tile_product::<f32, F>(
        dq_acc,
        &*ds_tile,
        &*kv,
        ty,
        tx,
        block_k,
        1usize,
        k_stride,
        1usize,
        k_stride,
        rq,
        row_threads,
        rd,
        col_threads,
        dim,
        false,
    );
    sync_cube();
}

/// Writes the dQ kernel's register tiles (times `scale`) for the cube's rows from `r0`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_dq<F: Float>(
    dq: &mut Tensor<F>,
    dq_acc: &Array<f32>,
    b: usize,
    h: usize,
    r0: usize,
    seq_q: usize,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] rq: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
) {
    let rd = comptime!(dim.div_ceil(col_threads));
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    #[unroll]
    for a in 0..rq {
        let row = r0 + ty + a * row_threads;
        if row < seq_q {
            let dq_at = b * dq.stride(0) + h * dq.stride(1) + row * dq.stride(2);
            #[unroll]
            for e in 0..rd {
                let c = tx + e * col_threads;
                if c < dim {
                    let at = dq_at + c * dq.stride(3);
                    dq[at] = F::cast_from(dq_acc[a * rd + e] * scale);
                }
            }
        }
    }
}

/// The dK/dV kernel's step over the query tile at `t0` of query head `h`, for the whole
/// cube of `block_k` keys from `c0` (staged in `k_t`, `v_t`): stages Q, dO, the lse and D
/// of the tile, computes `S^T = K Q^T` and `dP^T = V dO^T`, `P^T` and `dS^T = P^T (dP^T -
/// D)` into `p_tile`, `ds_tile` (zero where masked), then `dV += P^T dO` and `dK += dS^T
/// Q` (and with `grad_terms`, `key_grad[a] += dS` over the tile's rows for register key
/// `a`). `hide` holds `rk x rq` flags (row-major by register key); the band is
/// `i_lo0..=i_hi0` for the unit's first key, rows from `row_end` on are outside it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dkdv_query_tile<F: Float>(
    q: &Tensor<F>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    k_t: &[F],
    v_t: &[F],
    q_t: &mut [F],
    do_t: &mut [F],
    p_tile: &mut [f32],
    ds_tile: &mut [f32],
    lse_tile: &mut [f32],
    d_tile: &mut [f32],
    st: &mut Array<f32>,
    dpt: &mut Array<f32>,
    dk_acc: &mut Array<f32>,
    dv_acc: &mut Array<f32>,
    hide: &Array<u32>,
    bias: &Array<f32>,
    key_grad: &mut Array<f32>,
    b: usize,
    h: usize,
    c0: usize,
    t0: i32,
    masked: bool,
    i_lo0: i32,
    i_hi0: i32,
    row_end: i32,
    seq_q: usize,
    seq_k: usize,
    scale: f32,
    keep_scale: f32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_k: usize,
    #[comptime] block_q: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] use_hide: bool,
    #[comptime] use_bias: bool,
    #[comptime] grad_terms: bool,
    softcap: f32,
    #[comptime] use_softcap: bool,
) {
    let rk = comptime!(block_k / row_threads);
    let rq = comptime!(block_q / col_threads);
    let rd = comptime!(dim.div_ceil(col_threads));
    let rv = comptime!(value_dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let k_stride = comptime!(block_k + 1);
    let q_stride = comptime!(block_q + 1);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    let start = usize::cast_from(t0);
    let q_base = b * q.stride(0) + h * q.stride(1);
    let do_base = b * d_out.stride(0) + h * d_out.stride(1);
    let lse_base = b * lse.stride(0) + h * lse.stride(1);
    let delta_base = b * delta.stride(0) + h * delta.stride(1);

    stage_rows::<F>(q, q_t, q_base, start, seq_q, dim, block_q, units, true);
    stage_rows::<F>(
        d_out, do_t, do_base, start, seq_q, value_dim, block_q, units, true,
    );
    let mut idx = UNIT_POS_X as usize;
    while idx < block_q {
        let i = start + idx;
        let mut lse_i = f32::new(NEG_BIG);
        let mut d_i = f32::new(0.0);
        if i < seq_q {
            lse_i = lse[lse_base + i * lse.stride(2)];
            d_i = delta[delta_base + i * delta.stride(2)];
        }
        lse_tile[idx] = lse_i;
        d_tile[idx] = d_i;
        idx += units;
    }
    sync_cube();

    // S^T = K Q^T and dP^T = V dO^T: keys ty + a * row_threads, query rows tx + c *
    // col_threads of the tile.
    tile_product::<F, F>(
        st,
        k_t,
        &*q_t,
        ty,
        tx,
        dim,
        k_stride,
        1usize,
        q_stride,
        1usize,
        rk,
        row_threads,
        rq,
        col_threads,
        block_q,
        true,
    );
    tile_product::<F, F>(
        dpt,
        v_t,
        &*do_t,
        ty,
        tx,
        value_dim,
        k_stride,
        1usize,
        q_stride,
        1usize,
        rk,
        row_threads,
        rq,
        col_threads,
        block_q,
        true,
    );
    #[unroll]
    for a in 0..rk {
        let key = ty + a * row_threads;
        let shift = (a * row_threads) as i32;
        let key_ok = c0 + key < seq_k;
        #[unroll]
        for c in 0..rq {
            let qi = tx + c * col_threads;
            let i = t0 + qi as i32;
            let lse_i = lse_tile[qi];
            let mut seen = key_ok
                && i >= i_lo0 + shift
                && i <= i_hi0 + shift
                && i < row_end
                && has_probabilities(lse_i);
            let e = element_logit(
                st[a * rq + c],
                scale,
                softcap,
                hide,
                bias,
                a * rq + c,
                masked,
                keep_scale,
                use_hide,
                use_bias,
                use_softcap,
            );
            seen = seen && !e.hidden;
            let mut p = f32::new(0.0);
            let mut ds = f32::new(0.0);
            if seen {
                let p_full = f32::exp(e.x - lse_i);
                p = p_full * e.keep;
                ds = p_full * (dpt[a * rq + c] * e.keep - d_tile[qi]);
            }
            #[allow(clippy::collapsible_if)]
            if grad_terms {
                if masked {
                    key_grad[a] += ds;
                }
            }
            p_tile[key * q_stride + qi] = p;
            ds_tile[key * q_stride + qi] = ds * e.d_cap;
        }
    }
    sync_cube();
    // dV += P^T dO and dK += dS^T Q: dO and Q as [row][col] read from their transposed
    // tiles.
    tile_product::<f32, F>(
        dv_acc,
        &*p_tile,
        &*do_t,
        ty,
        tx,
        block_q,
        1usize,
        q_stride,
        1usize,
        q_stride,
        rk,
        row_threads,
        rv,
        col_threads,
        value_dim,
        false,
    );
    tile_product::<f32, F>(
        dk_acc,
        &*ds_tile,
        &*q_t,
        ty,
        tx,
        block_q,
        1usize,
        q_stride,
        1usize,
        q_stride,
        rk,
        row_threads,
        rd,
        col_threads,
        dim,
        false,
    );
    sync_cube();
}

/// Writes the dK/dV kernel's register tiles (dK times `scale`) for the cube's keys from
/// `c0` of kv head `kvh`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_dkdv<F: Float>(
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    dk_acc: &Array<f32>,
    dv_acc: &Array<f32>,
    b: usize,
    kvh: usize,
    c0: usize,
    seq_k: usize,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] rk: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
) {
    let rd = comptime!(dim.div_ceil(col_threads));
    let rv = comptime!(value_dim.div_ceil(col_threads));
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    #[unroll]
    for a in 0..rk {
        let key = c0 + ty + a * row_threads;
        if key < seq_k {
            let dk_at = b * dk.stride(0) + kvh * dk.stride(1) + key * dk.stride(2);
            let dv_at = b * dv.stride(0) + kvh * dv.stride(1) + key * dv.stride(2);
            #[unroll]
            for e in 0..rd {
                let c = tx + e * col_threads;
                if c < dim {
                    let at = dk_at + c * dk.stride(3);
                    dk[at] = F::cast_from(dk_acc[a * rd + e] * scale);
                }
            }
            #[unroll]
            for e in 0..rv {
                let c = tx + e * col_threads;
                if c < value_dim {
                    let at = dv_at + c * dv.stride(3);
                    dv[at] = F::cast_from(dv_acc[a * rv + e]);
                }
            }
        }
    }
}

/// One element's logit as the backward steps see it, with what its flags say.
#[derive(CubeType, Clone, Copy)]
struct ElementLogit {
    /// The scaled score, softcapped, plus its bias term.
    x: f32,
    /// The softcap's derivative (1 without one), which the score's gradient takes.
    d_cap: f32,
    /// Whether its hidden flag is set.
    hidden: bool,
    /// Its probability's factor in `P V` and `dP`: 0 where dropout dropped it, else
    /// `keep_scale` (1 on steps without flags).
    keep: f32,
}

/// The logit of register element `at` from its raw score: scaled, through the softcap
/// (`use_softcap`), and on a `masked` step with `use_hide` its `hide` flags and (with
/// `use_bias`) its `bias` term; the arrays are read only where their switches are on.
#[cube]
#[allow(clippy::too_many_arguments)]
fn element_logit(
    score: f32,
    scale: f32,
    softcap: f32,
    hide: &Array<u32>,
    bias: &Array<f32>,
    at: usize,
    masked: bool,
    keep_scale: f32,
    #[comptime] use_hide: bool,
    #[comptime] use_bias: bool,
    #[comptime] use_softcap: bool,
) -> ElementLogit {
    let mut e = ElementLogit {
        x: score * scale,
        d_cap: f32::new(1.0),
        hidden: false,
        keep: f32::new(1.0),
    };
    if use_softcap {
        let t = f32::tanh(e.x / softcap);
        e.x = softcap * t;
        e.d_cap = f32::new(1.0) - t * t;
    }
    // Nested: the outer switch is comptime.
    #[allow(clippy::collapsible_if)]
    if use_hide {
        if masked {
            let flags = hide[at];
            e.hidden = flags & 1u32 != 0;
            e.keep = select(flags & 2u32 != 0, 0.0f32, keep_scale);
            if use_bias {
                e.x += bias[at];
            }
        }
    }
    e
}

/// Adds up a per-position gradient held by each unit as `rk` partial sums (register row
/// `a` is position `p0 + ty + a * row_threads`), over the `col_threads` units of a row
/// through `part` (at least `rows * row_threads * col_threads` floats), and writes it to `grad[b, h, position]`
/// (positions below `end`). Syncs the cube first and last.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_term_grad(
    grad: &mut Tensor<f32>,
    partial: &Array<f32>,
    part: &mut [f32],
    b: usize,
    h: usize,
    p0: usize,
    end: usize,
    #[comptime] rows: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
) {
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    sync_cube();
    #[unroll]
    for a in 0..rows {
        part[(ty + a * row_threads) * col_threads + tx] = partial[a];
    }
    sync_cube();
    if tx == 0 {
        #[unroll]
        for a in 0..rows {
            let position = p0 + ty + a * row_threads;
            if position < end {
                let row = (ty + a * row_threads) * col_threads;
                let mut sum = f32::new(0.0);
                #[unroll]
                for c in 0..col_threads {
                    sum += part[row + c];
                }
                let at = b * grad.stride(0) + h * grad.stride(1) + position * grad.stride(2);
                grad[at] = sum;
            }
        }
    }
    sync_cube();
}
