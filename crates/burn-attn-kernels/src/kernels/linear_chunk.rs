//! The chunked linear-attention kernel (portable: no matrix units, f32 accumulation).
//!
//! One cube of 8 x 16 units walks the rows of one (batch, head) in chunks, for one block of
//! value columns, carrying the state `S` (`dim x value_block`, f32, in shared memory) from
//! chunk to chunk, so no per-chunk state is ever written out. Per chunk, in the mode's
//! steps (see `plan::linear`):
//! 1. stage the chunk's `a` rows (transposed), `b` rows (transposed), `c` rows of the value
//!    block (each through the feature map where the mode maps it), and the per-row
//!    scalars;
//! 2. rows (`outputs`): each unit's register tile of `a S`, plus with `intra` the chunk's
//!    causal scores `a b^T` (masked, through shared memory) times `c`, normalised by the
//!    row's `a z` plus its masked score sum plus `eps`;
//! 3. state (`update`): `S += b^T c`, `z += sum of b` (`normalise`), each unit adding its
//!    own register tile of `S`.
//!
//! The in-chunk scores are recomputed by every value block's cube: the price of keeping
//! the state of a whole head dim in one cube's shared memory.

// A comptime condition around a runtime one stays two `if`s: merged, the comptime part
// would be evaluated at run time.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::components::linear_chunk::{
    load_state_vectors, stage_row_scalars, stage_transposed, stage_value_block,
    store_state_vectors, update_state_vectors, PassCube, WalkRows,
};
use crate::components::register_tile::tile_product;
use crate::plan::{LinearExtra, LinearMode, LinearTiles, LINEAR_COL_THREADS, LINEAR_ROW_THREADS};

/// One pass of chunked linear attention (see `plan::linear` for the modes).
///
/// Launch with `CubeDim::new_1d(128)` and `CubeCount::Static(ceil(value_dim /
/// value_block), batch * heads, segments)`: cube `z` walks rows `z * segment_rows ..
/// (z + 1) * segment_rows` (a multiple of the chunk) from the state at batch `z * batch +
/// b` of the state tensors, and writes its final state there (one segment: `segment_rows
/// >= rows`). Operands: `a: [batch, ha, rows, dim]`, `b: [batch, hb,
/// rows, dim]`, `c: [batch, hc, rows, value_dim]`, `extra: [batch, he, rows]` (f32), the
/// state `s_in: [batch, hs, dim, value_dim]`, `z_in: [batch, hs, dim]`, `x_in: [batch, hs,
/// value_dim]` (f32; `x` is the state row of the per-row scalar), every head count dividing
/// `heads`; outputs `out: [batch, heads, rows, value_dim]`, `den: [batch, heads, rows]`
/// (f32, `den_i + eps`), and the final state in `s_out`, `z_out`, `x_out` (`[batch, heads,
/// ..]`). Tensors a mode does not use are placeholders of their rank (never read).
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn linear_chunk_kernel<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    extra: &Tensor<f32>,
    s_in: &Tensor<f32>,
    z_in: &Tensor<f32>,
    x_in: &Tensor<f32>,
    out: &mut Tensor<F>,
    den: &mut Tensor<f32>,
    s_out: &mut Tensor<f32>,
    z_out: &mut Tensor<f32>,
    x_out: &mut Tensor<f32>,
    rows: u32,
    heads: u32,
    segment_rows: u32,
    eps: f32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let chunk = comptime!(tiles.chunk);
    let bv = comptime!(tiles.value_block);
    let dp = comptime!(tiles.dim_pad);
    let rt = comptime!(LINEAR_ROW_THREADS);
    let ct = comptime!(LINEAR_COL_THREADS);
    let units = comptime!(LINEAR_ROW_THREADS * LINEAR_COL_THREADS);
    let stride = comptime!(tiles.chunk + 1);
    let rq = comptime!(tiles.chunk / LINEAR_ROW_THREADS);
    let rv = comptime!(tiles.value_block / LINEAR_COL_THREADS);
    let has_extra = comptime!(mode.extra != LinearExtra::None);
    let extra_rows = comptime!(mode.extra == LinearExtra::Rows);
    let reverse = comptime!(mode.reverse);

    let tid = UNIT_POS_X as usize;
    let ty = tid / ct;
    let tx = tid % ct;
    let heads = heads as usize;
    let rows = rows as usize;
    let cube = PassCube::new(rows, heads, segment_rows as usize, bv);
    let (batch, h, v0) = (cube.batch, cube.head, cube.v0);
    let (start, end, state_batch) = (cube.start, cube.end, cube.state_batch);

    let a_rows = WalkRows::new::<F>(a, batch, h, heads, rows);
    let b_rows = WalkRows::new::<F>(b, batch, h, heads, rows);
    let c_rows = WalkRows::new::<F>(c, batch, h, heads, rows);
    let extra_head = h / (heads / extra.shape(1));

    let a_len = comptime!(if mode.reads_rows() {
        tiles.dim_pad * (tiles.chunk + 1)
    } else {
        1
    });
    let b_len = comptime!(if mode.reads_keys() {
        tiles.dim_pad * (tiles.chunk + 1)
    } else {
        1
    });
    let c_len = comptime!(if mode.reads_keys() {
        tiles.chunk * tiles.value_block
    } else {
        1
    });
    let p_len = comptime!(if mode.intra {
        tiles.chunk * (tiles.chunk + 1)
    } else {
        1
    });
    let mut a_t = Shared::<[F]>::new_slice(a_len);
    let mut b_t = Shared::<[F]>::new_slice(b_len);
    let mut c_s = Shared::<[F]>::new_slice(c_len);
    let mut p_s = Shared::<[f32]>::new_slice(p_len);
    let mut e_s = Shared::<[f32]>::new_slice(chunk);
    // The state: S (`dim_pad x value_block`), z (`dim_pad`), the scalar's row x
    // (`value_block`).
    let mut s_s = Shared::<[f32]>::new_slice(comptime!(tiles.dim_pad * tiles.value_block));
    let mut z_s = Shared::<[f32]>::new_slice(dp);
    let mut x_s = Shared::<[f32]>::new_slice(bv);

    load_state(
        s_in,
        z_in,
        x_in,
        &mut s_s,
        &mut z_s,
        &mut x_s,
        state_batch,
        h,
        heads,
        v0,
        dim,
        value_dim,
        tiles,
        mode,
    );
    sync_cube();

    let mut t0 = start;
    while t0 < end {
        // 1. Stage the chunk.
        if comptime!(mode.reads_rows()) {
            stage_transposed::<F>(
                a, a_rows, &mut a_t, t0, end, dim, chunk, dp, units, reverse, mode.map, mode.map_a,
            );
        }
        if comptime!(mode.reads_keys()) {
            stage_transposed::<F>(
                b, b_rows, &mut b_t, t0, end, dim, chunk, dp, units, reverse, mode.map, mode.map_b,
            );
            stage_value_block::<F>(
                c, c_rows, &mut c_s, t0, end, v0, value_dim, tid, chunk, bv, bv, units, reverse,
                mode.map, mode.map_c, 1usize,
            );
        }
        // The scalars where a step reads them: the rows' in the rows' steps, the keys' in
        // the key steps.
        if comptime!(mode.reads_scalars()) {
            stage_row_scalars(
                extra, batch, extra_head, rows, end, &mut e_s, t0, tid, chunk, reverse,
            );
        }
        sync_cube();

        // 2. The chunk's rows.
        if comptime!(mode.outputs) {
            let mut o = Array::<f32>::new(comptime!(rq * rv));
            tile_product::<F, f32>(
                &mut o, &a_t, &s_s, ty, tx, dp, stride, 1usize, bv, 1usize, rq, rt, rv, ct, bv,
                true,
            );
            if comptime!(mode.intra) {
                chunk_scores::<F>(&a_t, &b_t, &e_s, &mut p_s, ty, tx, tiles, mode);
                sync_cube();
                tile_product::<f32, F>(
                    &mut o, &p_s, &c_s, ty, tx, chunk, 1usize, stride, bv, 1usize, rq, rt, rv, ct,
                    bv, false,
                );
            }
            #[unroll]
            for i in 0..rq {
                let r = ty + i * rt;
                // The per-row scalar's row of the state: `e_r x` (rows' side) or `x`.
                let mut weight = f32::new(0.0);
                if has_extra {
                    weight = f32::new(1.0);
                    if extra_rows {
                        weight = e_s[r];
                    }
                }
                let mut divisor = f32::new(1.0);
                if comptime!(mode.normalise) {
                    divisor = row_normaliser::<F>(&a_t, &p_s, &z_s, r, tiles, mode) + eps;
                }
                let t = t0 + r;
                if t < end {
                    #[unroll]
                    for j in 0..rv {
                        let v = tx + j * ct;
                        if v0 + v < value_dim {
                            let mut value = o[i * rv + j];
                            if has_extra {
                                value += weight * x_s[v];
                            }
                            let row = if reverse { rows - 1 - t } else { t };
                            let at = batch * out.stride(0)
                                + h * out.stride(1)
                                + row * out.stride(2)
                                + (v0 + v) * out.stride(3);
                            out[at] = F::cast_from(value / divisor);
                        }
                    }
                    if comptime!(mode.normalise) {
                        if tx == 0 && v0 == 0 {
                            let row = if reverse { rows - 1 - t } else { t };
                            let at =
                                batch * den.stride(0) + h * den.stride(1) + row * den.stride(2);
                            den[at] = divisor;
                        }
                    }
                }
            }
        }

        // 3. The state takes the chunk (after every read of it above).
        if comptime!(mode.update) {
            sync_cube();
            update_state::<F>(
                &b_t, &c_s, &e_s, &mut s_s, &mut z_s, &mut x_s, ty, tx, tiles, mode,
            );
        }
        sync_cube();
        t0 += chunk;
    }

    if comptime!(mode.state_out) {
        store_state(
            s_out,
            z_out,
            x_out,
            &s_s,
            &z_s,
            &x_s,
            state_batch,
            h,
            v0,
            dim,
            value_dim,
            tiles,
            mode,
        );
    }
}

/// The chunk's masked scores `p[r][j] = a_r . b_j (+ the per-row scalar)` for `j <= r`
/// (0 after), into `p_s` (`chunk x (chunk + 1)`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_scores<F: Float>(
    a_t: &[F],
    b_t: &[F],
    e_s: &[f32],
    p_s: &mut [f32],
    ty: usize,
    tx: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) {
    let rt = comptime!(LINEAR_ROW_THREADS);
    let ct = comptime!(LINEAR_COL_THREADS);
    let rq = comptime!(tiles.chunk / LINEAR_ROW_THREADS);
    let rk = comptime!(tiles.chunk / LINEAR_COL_THREADS);
    let stride = comptime!(tiles.chunk + 1);
    let mut p = Array::<f32>::new(comptime!(rq * rk));
    tile_product::<F, F>(
        &mut p,
        a_t,
        b_t,
        ty,
        tx,
        comptime!(tiles.dim_pad),
        stride,
        1usize,
        stride,
        1usize,
        rq,
        rt,
        rk,
        ct,
        comptime!(tiles.chunk),
        true,
    );
    #[unroll]
    for i in 0..rq {
        let r = ty + i * rt;
        #[unroll]
        for j in 0..rk {
            let key = tx + j * ct;
            let mut score = p[i * rk + j];
            if comptime!(mode.extra == LinearExtra::Rows) {
                score += e_s[r];
            }
            if comptime!(mode.extra == LinearExtra::Keys) {
                score += e_s[key];
            }
            if key > r {
                score = f32::new(0.0);
            }
            p_s[r * stride + key] = score;
        }
    }
}

/// Row `r`'s normaliser: `a_r . z` plus, with `intra`, its masked scores' sum.
#[cube]
fn row_normaliser<F: Float>(
    a_t: &[F],
    p_s: &[f32],
    z_s: &[f32],
    r: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) -> f32 {
    let stride = comptime!(tiles.chunk + 1);
    let mut sum = f32::new(0.0);
    for d in 0..comptime!(tiles.dim_pad) {
        sum += f32::cast_from(a_t[d * stride + r]) * z_s[d];
    }
    if comptime!(mode.intra) {
        for j in 0..comptime!(tiles.chunk) {
            sum += p_s[r * stride + j];
        }
    }
    sum
}

/// `S += b^T c` (each unit its register tile of rows `ty + i * 8`, columns `tx + j * 16`),
/// `z += sum of b` with `normalise`, `x += e^T c` (the keys' scalars, or 1 per valid row
/// for the rows' side) with a scalar.
#[cube]
#[allow(clippy::too_many_arguments)]
fn update_state<F: Float>(
    b_t: &[F],
    c_s: &[F],
    e_s: &[f32],
    s_s: &mut [f32],
    z_s: &mut [f32],
    x_s: &mut [f32],
    ty: usize,
    tx: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) {
    let rt = comptime!(LINEAR_ROW_THREADS);
    let ct = comptime!(LINEAR_COL_THREADS);
    let rd = comptime!(tiles.dim_pad / LINEAR_ROW_THREADS);
    let rv = comptime!(tiles.value_block / LINEAR_COL_THREADS);
    let bv = comptime!(tiles.value_block);
    let chunk = comptime!(tiles.chunk);
    let stride = comptime!(tiles.chunk + 1);
    let mut s = Array::<f32>::new(comptime!(rd * rv));
    tile_product::<F, F>(
        &mut s, b_t, c_s, ty, tx, chunk, 1usize, stride, bv, 1usize, rd, rt, rv, ct, bv, true,
    );
    #[unroll]
    for i in 0..rd {
        #[unroll]
        for j in 0..rv {
            let at = (ty + i * rt) * bv + tx + j * ct;
            s_s[at] += s[i * rv + j];
        }
    }
    update_state_vectors::<F>(
        b_t,
        c_s,
        e_s,
        z_s,
        x_s,
        UNIT_POS_X as usize,
        1usize,
        stride,
        bv,
        chunk,
        comptime!(tiles.dim_pad),
        bv,
        comptime!(LINEAR_ROW_THREADS * LINEAR_COL_THREADS),
        mode,
    );
}

/// The starting state: the given one (`state_in`) or 0, zero in the padding.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_state(
    s_in: &Tensor<f32>,
    z_in: &Tensor<f32>,
    x_in: &Tensor<f32>,
    s_s: &mut [f32],
    z_s: &mut [f32],
    x_s: &mut [f32],
    batch: usize,
    h: usize,
    heads: usize,
    v0: usize,
    dim: usize,
    value_dim: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) {
    let units = comptime!(LINEAR_ROW_THREADS * LINEAR_COL_THREADS);
    let bv = comptime!(tiles.value_block);
    let tid = UNIT_POS_X as usize;
    let hs = h / (heads / s_in.shape(1));
    let mut idx = tid;
    while idx < comptime!(tiles.dim_pad * tiles.value_block) {
        let d = idx / bv;
        let v = idx % bv;
        let mut x = f32::new(0.0);
        if comptime!(mode.state_in) {
            if d < dim && v0 + v < value_dim {
                x = s_in[batch * s_in.stride(0)
                    + hs * s_in.stride(1)
                    + d * s_in.stride(2)
                    + (v0 + v) * s_in.stride(3)];
            }
        }
        s_s[idx] = x;
        idx += units;
    }
    load_state_vectors(
        z_in,
        x_in,
        z_s,
        x_s,
        batch,
        hs,
        v0,
        dim,
        value_dim,
        tid,
        tiles.dim_pad,
        bv,
        units,
        mode,
    );
}

/// Writes the cube's block of the final state (z, the same in every value block, from the
/// first only).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_state(
    s_out: &mut Tensor<f32>,
    z_out: &mut Tensor<f32>,
    x_out: &mut Tensor<f32>,
    s_s: &[f32],
    z_s: &[f32],
    x_s: &[f32],
    batch: usize,
    h: usize,
    v0: usize,
    dim: usize,
    value_dim: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) {
    let units = comptime!(LINEAR_ROW_THREADS * LINEAR_COL_THREADS);
    let bv = comptime!(tiles.value_block);
    let tid = UNIT_POS_X as usize;
    let mut idx = tid;
    while idx < comptime!(tiles.dim_pad * tiles.value_block) {
        let d = idx / bv;
        let v = idx % bv;
        if d < dim && v0 + v < value_dim {
            let at = batch * s_out.stride(0)
                + h * s_out.stride(1)
                + d * s_out.stride(2)
                + (v0 + v) * s_out.stride(3);
            s_out[at] = s_s[idx];
        }
        idx += units;
    }
    store_state_vectors(
        z_out, x_out, z_s, x_s, batch, h, v0, dim, value_dim, tid, bv, units, mode,
    );
}
