//! The steps the portable forwards (`flash_unit`, `flash_unit_sparse`) share: one key
//! tile's pass (stage K, scores, online softmax, stage V, `P V`) over a unit's register
//! tiles, and the epilogue. The kernels differ only in which tiles they visit.

use cubecl::prelude::*;

use super::register_tile::tile_product;
use super::softmax::NEG_BIG;
use super::staging::stage_rows;

/// One key tile, the one starting at key `t0`, for the whole cube: stages K (transposed,
/// into `kv`), computes each unit's `rq x rk` scores `s` against the staged Q (`q_t`),
/// takes the softmax step (`masked`: with the per-element mask of [`softmax_tile`], plus
/// the `hide` flags with `use_hide`: the hidden bit (1) masks the score, the dropped bit (2) drops its
/// probability from `P V`, whose kept probabilities are scaled by `keep_scale`; with
/// `use_bias` the `bias` terms add to the scaled scores, after a tanh softcap with
/// `use_softcap`), stages V
/// into `kv` and adds `P V` into the output tiles `o`. `block_q` rows per cube; every unit calls it with the same `t0` and `masked`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_key_tile<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    q_t: &[F],
    kv: &mut [F],
    p_tile: &mut [f32],
    partial: &mut [f32],
    s: &mut Array<f32>,
    o: &mut Array<f32>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    hide: &Array<u32>,
    bias: &Array<f32>,
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
    softcap: f32,
    #[comptime] use_softcap: bool,
) {
    let rq = comptime!(block_q / row_threads);
    let rk = comptime!(block_k / col_threads);
    let rv = comptime!(value_dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let q_stride = comptime!(block_q + 1);
    let k_stride = comptime!(block_k + 1);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;

    stage_rows::<F>(
        k,
        kv,
        k_base,
        usize::cast_from(t0),
        seq_k,
        dim,
        block_k,
        units,
        true,
    );
    sync_cube();

    // Scores: s[a][b] = q[row a] . k[key b], with rows ty + a * row_threads and keys
    // tx + b * col_threads of the tile.
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

    // Both variants sync once inside (after the maxima), after which K is dead.
    if masked {
        softmax_tile(
            s,
            o,
            m,
            l,
            partial,
            p_tile,
            scale,
            keep_scale,
            t0,
            lo0,
            hi0,
            seq_k as i32,
            rq,
            rk,
            rv,
            row_threads,
            col_threads,
            block_k,
            true,
            hide,
            use_hide,
            bias,
            use_bias,
            softcap,
            use_softcap,
        );
    } else {
        softmax_tile(
            s,
            o,
            m,
            l,
            partial,
            p_tile,
            scale,
            keep_scale,
            t0,
            lo0,
            hi0,
            seq_k as i32,
            rq,
            rk,
            rv,
            row_threads,
            col_threads,
            block_k,
            false,
            hide,
            false,
            bias,
            false,
            softcap,
            false,
        );
    }
    stage_rows::<F>(
        v,
        kv,
        v_base,
        usize::cast_from(t0),
        seq_k,
        value_dim,
        block_k,
        units,
        false,
    );
    sync_cube();

    // O += P V over the tile's keys (zeros past seq_k, with p = 0 there too).
    tile_product::<f32, F>(
        o,
        &*p_tile,
        &*kv,
        ty,
        tx,
        block_k,
        1usize,
        k_stride,
        value_dim,
        1usize,
        rq,
        row_threads,
        rv,
        col_threads,
        value_dim,
        false,
    );
    sync_cube();
}

/// The softmax part of one key tile for one unit: scales (and with `masked`, masks: the
/// band `lo0..=hi0` shifted per row, keys past `seq_k`, and with `use_hide` the scores
/// whose `hide` flags hold the hidden bit (1)) its `rq x rk` scores `s`, publishes their row maxima
/// in `partial`, waits for the cube, moves the running maxima `m` of its rows, rescales
/// its output tile `o` and row sums `l`, and writes its probabilities to `p_tile` (with
/// `masked` and `use_hide`: 0 where the flags hold the dropped bit (2), the others times
/// `keep_scale`; the row sums take them undropped; with `masked` and `use_bias` the
/// `bias` terms add to the scaled scores). The caller syncs before reading `p_tile`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_tile(
    s: &mut Array<f32>,
    o: &mut Array<f32>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    partial: &mut [f32],
    p_tile: &mut [f32],
    scale: f32,
    keep_scale: f32,
    t0: i32,
    lo0: i32,
    hi0: i32,
    seq_k: i32,
    #[comptime] rq: usize,
    #[comptime] rk: usize,
    #[comptime] rv: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] block_k: usize,
    #[comptime] masked: bool,
    hide: &Array<u32>,
    #[comptime] use_hide: bool,
    bias: &Array<f32>,
    #[comptime] use_bias: bool,
    softcap: f32,
    #[comptime] use_softcap: bool,
) {
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    #[unroll]
    for a in 0..rq {
        // The unit's a-th row is `a * row_threads` below its first, and so is its band.
        let shift = (a * row_threads) as i32;
        let mut mx = f32::new(NEG_BIG);
        #[unroll]
        for b in 0..rk {
            let mut x = s[a * rk + b] * scale;
            if masked {
                #[allow(clippy::collapsible_if)]
                if use_softcap {
                    x = softcap * f32::tanh(x / softcap);
                }
                #[allow(clippy::collapsible_if)]
                if use_bias {
                    x += bias[a * rk + b];
                }
                let j = t0 + (tx + b * col_threads) as i32;
                if j < lo0 + shift || j > hi0 + shift || j >= seq_k {
                    x = f32::new(NEG_BIG);
                }
                // Nested: `use_hide` is comptime, and the flags exist only with it.
                #[allow(clippy::collapsible_if)]
                if use_hide {
                    if hide[a * rk + b] & 1u32 != 0 {
                        x = f32::new(NEG_BIG);
                    }
                }
            }
            s[a * rk + b] = x;
            mx = f32::max(mx, x);
        }
        partial[(ty + a * row_threads) * col_threads + tx] = mx;
    }
    sync_cube();
    #[unroll]
    for a in 0..rq {
        let prow = (ty + a * row_threads) * col_threads;
        let mut m_tile = f32::new(NEG_BIG);
        #[unroll]
        for c in 0..col_threads {
            m_tile = f32::max(m_tile, partial[prow + c]);
        }
        let m_old = m[a];
        let m_new = f32::max(m_old, m_tile);
        // exp(NEG_BIG - finite) underflows to 0: the first visible key resets the sums.
        let alpha = f32::exp(m_old - m_new);
        m[a] = m_new;
        let mut l_row = l[a] * alpha;
        #[unroll]
        for e in 0..rv {
            o[a * rv + e] *= alpha;
        }
        let p_row = (ty + a * row_threads) * (block_k + 1);
        #[unroll]
        for b in 0..rk {
            let x = s[a * rk + b];
            let mut p = f32::exp(x - m_new);
            if masked {
                // Masked keys hold NEG_BIG; while the row has seen no key m_new is NEG_BIG
                // too and exp would give 1, so zero them explicitly.
                if x <= f32::new(NEG_BIG) {
                    p = f32::new(0.0);
                }
            }
            l_row += p;
            if masked {
                #[allow(clippy::collapsible_if)]
                if use_hide {
                    p *= select(hide[a * rk + b] & 2u32 != 0, 0.0f32, keep_scale);
                }
            }
            p_tile[p_row + tx + b * col_threads] = p;
        }
        l[a] = l_row;
    }
}

/// The epilogue of the portable forwards: adds up each row's sum from its units' parts
/// (through `partial`), and writes the rows `r0 + ty + a * row_threads` (below `seq_q`) of
/// `out` (`o / l`, exactly 0 where the row saw no key) and `lse` (`m + ln l`, `neg_inf`
/// where it saw none) of `(b, h)`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_unit_rows<F: Float>(
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    o: &Array<f32>,
    m: &Array<f32>,
    l: &Array<f32>,
    partial: &mut [f32],
    b: usize,
    h: usize,
    r0: usize,
    seq_q: usize,
    neg_inf: f32,
    #[comptime] value_dim: usize,
    #[comptime] rq: usize,
    #[comptime] rv: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
) {
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;
    // Row sums: each unit holds the part of its columns' keys; add them up.
    #[unroll]
    for a in 0..rq {
        partial[(ty + a * row_threads) * col_threads + tx] = l[a];
    }
    sync_cube();
    #[unroll]
    for a in 0..rq {
        let row = r0 + ty + a * row_threads;
        if row < seq_q {
            let prow = (ty + a * row_threads) * col_threads;
            let mut l_row = f32::new(0.0);
            #[unroll]
            for c in 0..col_threads {
                l_row += partial[prow + c];
            }
            let o_base = b * out.stride(0) + h * out.stride(1) + row * out.stride(2);
            // 0 exactly where the row saw no key; NaN where what it sees holds a NaN.
            let dead = l_row == f32::new(0.0);
            let mut inv = f32::new(0.0);
            if !dead {
                inv = f32::new(1.0) / l_row;
            }
            #[unroll]
            for e in 0..rv {
                let col = tx + e * col_threads;
                if col < value_dim {
                    let at = o_base + col * out.stride(3);
                    out[at] = F::cast_from(o[a * rv + e] * inv);
                }
            }
            if tx == 0 {
                let lse_idx = b * lse.stride(0) + h * lse.stride(1) + row * lse.stride(2);
                if dead {
                    lse[lse_idx] = neg_inf;
                } else {
                    lse[lse_idx] = m[a] + f32::ln(l_row);
                }
            }
        }
    }
}
