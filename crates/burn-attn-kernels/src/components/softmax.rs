//! The online-softmax step of the matrix-unit forward (`flash_mma`, with either of its products):
//! one key tile's scores, in a plane's accumulator registers, turned into probabilities
//! while the running row maxima, row sums and output accumulators are updated (lazily:
//! a maximum moves only past [`MAX_LAG`], and the outputs are rescaled only then).
//!
//! Both kernels hold scores in the `m16n8` accumulator layout (lane `l`: `g = l / 4`,
//! `t = l % 4`; element `e` at row `g + 8 * (e / 2)`, key `2 * t + e % 2` of its 8-key
//! tile), so one step serves both; each row's state is kept per "half" (`2 * mt + e / 2`:
//! row tile `mt`, upper or lower 8 rows).

use cubecl::prelude::*;

use super::exp::softmax_exp;
use super::fragments::{acc_get, acc_set, MmaVecAcc};

/// A finite stand-in for `-inf` as the running maximum: keeps every `exp` argument finite
/// (WGSL rejects infinite literals, and `-inf - -inf` would be NaN).
pub(crate) const NEG_BIG: f32 = -3.0e38;

/// The lse given to rows without probabilities (no visible key, or padding):
/// `exp(s - DEAD_LSE)` underflows to exactly 0 for every finite score `s`.
pub(crate) const DEAD_LSE: f32 = 3.0e38;

/// A row's lse as the kernels use it: [`DEAD_LSE`] where the forward saw no key (`-inf`);
/// a NaN stays NaN, so the row's gradients are NaN rather than 0.
#[cube]
pub(crate) fn live_lse(lse: f32) -> f32 {
    let mut l = lse;
    if lse < f32::new(NEG_BIG) {
        l = f32::new(DEAD_LSE);
    }
    l
}

/// Whether a row of lse `lse` (as the forward stored it, or `NEG_BIG` for a padding row)
/// has probabilities: not for `-inf` or padding, but for NaN (its gradients are NaN).
#[cube]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN compares false, and must count as true
pub(crate) fn has_probabilities(lse: f32) -> bool {
    !(lse <= f32::new(NEG_BIG))
}

/// The band as one plane's lanes see it, fixed for the whole pass: which tiles need no
/// mask, and what the per-element mask needs for the others.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub(crate) struct TileBand {
    /// Every row of the plane is a real query row (`< seq_q`).
    pub plane_full: bool,
    /// The first key every row of the plane sees.
    pub full_lo: i32,
    /// The last key every row of the plane sees (before the sequence end).
    pub full_hi: i32,
    /// This lane's first row (accumulator elements 0 and 1 of row tile 0).
    pub row_a: i32,
    /// The lane's column group (`lane % 4`).
    pub t: usize,
    /// `seq_k - seq_q` (bottom-right alignment).
    pub offset: i32,
    /// Keys visible left of the diagonal.
    pub left: i32,
    /// Keys visible right of the diagonal.
    pub right: i32,
    /// Keys of the sequence.
    pub seq_k: usize,
}

/// The first of the two flag bits (hidden, then dropped) of accumulator element `e` of
/// accumulator tile `tile` in a lane's flag words.
#[cube]
pub(crate) fn flag_bit(tile: usize, e: usize) -> usize {
    2 * (tile * 4 + e)
}

/// How far (in natural-log units of the scaled scores) a row's running maximum may trail
/// the largest score it has seen before the row is rescaled: probabilities stay at most
/// `e^8` (about 2981), far inside the range of f16, bf16 and f32, while a row whose
/// maximum creeps up by small steps (the common case after its first tiles) skips the
/// rescale of its output accumulators. The result is the same softmax: the sums and the
/// outputs carry the same stale maximum, and the log-sum-exp adds it back.
pub(crate) const MAX_LAG: f32 = 8.0;

/// Scales and masks the scores of the key tile that starts at key `t0` (`s_acc`, `m_tiles
/// * k_tiles` accumulator tiles), updates the running maxima `m_row` and sums `l_row`,
/// rescales `o_acc` (`m_tiles * v_tiles` tiles) where a maximum moved, and leaves `P =
/// exp(S - m)` in `s_acc`, masked keys 0 (exactly with `ptx_exp`, PTX's approximation,
/// which CUDA targets take; a subnormal at most elsewhere). `scale` must be positive (the launchers' options are validated): the
/// maximum of the raw scores is taken before scaling.
///
/// Two paths, chosen once per tile: a tile that every row of the plane sees whole
/// (unmasked: most tiles of a long band) takes each row's maximum of the raw
/// scores and computes `exp(s * scale - m)` with one fused multiply-add per score; a
/// tile on the band's edge scales every score and sets masked ones to `NEG_BIG` first (the
/// same exponential then takes a factor of 1). Masked scores' exponentials underflow to 0 against
/// any row maximum a finite score can produce. A row that has seen no visible key yet
/// still has `m = NEG_BIG`: it subtracts 0 instead, so its masked scores give
/// `exp(NEG_BIG) = 0` too (subtracting `NEG_BIG` would give `exp(0) = 1`). That choice is
/// made once per row, not per score.
///
/// A row's maximum only moves when the tile's maximum exceeds it by more than
/// [`MAX_LAG`] (always for the first visible key: `NEG_BIG + MAX_LAG == NEG_BIG`), and the
/// output accumulators are rescaled only when some row of the plane moved (one vote).
///
/// With `use_hide` (comptime), a `masked` tile also masks the scores whose hidden bit is
/// set in `hide` (the lane's accumulator element `e` of tile `(mt, kt)` has bits
/// [`flag_bit`]`(mt * k_tiles + kt, e)` and the next one, hidden and dropped, 32 per word):
/// the block-sparse kernels' element rules; with `use_bias` too, the masked tile's scaled
/// scores take a tanh softcap (`use_softcap`), then the lane's `bias` terms (element `e` of tile `(mt, kt)` at `4 * (mt * k_tiles
/// + kt) + e`), the block-sparse kernels' score terms.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn online_softmax_tile(
    s_acc: &mut Array<Vector<f32, MmaVecAcc>>,
    o_acc: &mut Array<Vector<f32, MmaVecAcc>>,
    m_row: &mut Array<f32>,
    l_row: &mut Array<f32>,
    scale: f32,
    band: TileBand,
    t0: i32,
    hide: &Array<u32>,
    masked: bool,
    bias: &Array<f32>,
    softcap: f32,
    #[comptime] m_tiles: usize,
    #[comptime] k_tiles: usize,
    #[comptime] v_tiles: usize,
    #[comptime] c_vs: usize,
    #[comptime] ptx_exp: bool,
    #[comptime] use_hide: bool,
    #[comptime] use_bias: bool,
    #[comptime] use_softcap: bool,
) {
    let halves = comptime!(2 * m_tiles);
    let tile_hi = t0 + comptime!(k_tiles as i32 * 8) - 1;
    let mut unmasked = band.plane_full
        && tile_hi < band.seq_k as i32
        && t0 >= band.full_lo
        && tile_hi <= band.full_hi;
    if use_hide {
        unmasked = unmasked && !masked;
    }
    // Per half: the tile's row maximum, then what the row's scores subtract; the rescale.
    let mut row_max = Array::<f32>::new(halves);
    let mut alpha = Array::<f32>::new(halves);
    #[unroll]
    for hf in 0..halves {
        row_max[hf] = f32::new(NEG_BIG);
    }
    if unmasked {
        // The raw scores' row maxima, scaled once per row.
        #[unroll]
        for mt in 0..m_tiles {
            #[unroll]
            for kt in 0..k_tiles {
                #[unroll]
                for e in 0..4usize {
                    let half = 2 * mt + e / 2;
                    let s = acc_get(&*s_acc, mt * k_tiles + kt, e, c_vs);
                    row_max[half] = f32::max(row_max[half], s);
                }
            }
        }
        #[unroll]
        for hf in 0..halves {
            row_max[hf] *= scale;
        }
    } else {
        // Scale, mask, and the tile's row maxima.
        #[unroll]
        for mt in 0..m_tiles {
            #[unroll]
            for kt in 0..k_tiles {
                let tile = mt * k_tiles + kt;
                #[unroll]
                for e in 0..4usize {
                    let mut s = acc_get(&*s_acc, tile, e, c_vs) * scale;
                    let row = band.row_a + (16 * mt + 8 * (e / 2)) as i32;
                    let j = t0 + (kt * 8 + 2 * band.t + e % 2) as i32;
                    if j < row + band.offset - band.left
                        || j > row + band.offset + band.right
                        || j >= band.seq_k as i32
                    {
                        s = f32::new(NEG_BIG);
                    }
                    // Nested: `use_hide` is comptime, and the bits exist only with it.
                    #[allow(clippy::collapsible_if)]
                    if use_hide {
                        if masked {
                            if use_softcap {
                                s = softcap * f32::tanh(s / softcap);
                            }
                            if use_bias {
                                s += bias[tile * 4 + e];
                            }
                            let at = flag_bit(tile, e);
                            if (hide[at / 32] >> (at % 32) as u32) & 1 != 0 {
                                s = f32::new(NEG_BIG);
                            }
                        }
                    }
                    acc_set(s_acc, tile, e, c_vs, s);
                    let half = 2 * mt + e / 2;
                    row_max[half] = f32::max(row_max[half], s);
                }
            }
        }
    }
    let mut moved = false;
    #[unroll]
    for hf in 0..halves {
        // The four lanes of a group hold the same two rows.
        let mut tm = row_max[hf];
        tm = f32::max(tm, plane_shuffle_xor(tm, 1));
        tm = f32::max(tm, plane_shuffle_xor(tm, 2));
        let m_old = m_row[hf];
        let mut m_new = m_old;
        if tm > m_old + f32::new(MAX_LAG) {
            m_new = tm;
        }
        moved = moved || m_new != m_old;
        // exp(NEG_BIG - finite) underflows to 0: the first visible key resets sums.
        alpha[hf] = softmax_exp(m_old - m_new, ptx_exp);
        m_row[hf] = m_new;
        l_row[hf] *= alpha[hf];
        // What the row's scores subtract (the scratch maxima are done with): see above.
        row_max[hf] = m_new;
        if m_new <= f32::new(NEG_BIG) {
            row_max[hf] = f32::new(0.0);
        }
    }
    if plane_any(moved) {
        #[unroll]
        for mt in 0..m_tiles {
            #[unroll]
            for vt in 0..v_tiles {
                #[unroll]
                for e in 0..4usize {
                    let tile = mt * v_tiles + vt;
                    let o = acc_get(&*o_acc, tile, e, c_vs) * alpha[2 * mt + e / 2];
                    acc_set(o_acc, tile, e, c_vs, o);
                }
            }
        }
    }
    // P = exp(s * scale - m), one fused multiply-add and one exponential per score: an
    // unmasked tile still holds raw scores, an edge tile already scaled ones (factor 1).
    let factor = select(unmasked, scale, f32::new(1.0));
    #[unroll]
    for mt in 0..m_tiles {
        #[unroll]
        for kt in 0..k_tiles {
            let tile = mt * k_tiles + kt;
            #[unroll]
            for e in 0..4usize {
                let half = 2 * mt + e / 2;
                let s = acc_get(&*s_acc, tile, e, c_vs);
                let p = softmax_exp(fma(s, factor, -row_max[half]), ptx_exp);
                l_row[half] += p;
                acc_set(s_acc, tile, e, c_vs, p);
            }
        }
    }
}

/// Rows of one row tile of the probe's plane and keys of its tiles (two `n8` tiles).
pub(crate) const PROBE_ROW_TILE: usize = 16;
pub(crate) const PROBE_KEYS: usize = 16;

/// Binds the accumulator vector size where no matrix-unit definition does (the probe).
#[cube]
#[allow(unused_variables)]
fn register_acc_size(#[comptime] vs: usize) {
    intrinsic!(|scope| {
        scope.register_size::<MmaVecAcc>(vs);
    });
}

/// Test support for [`online_softmax_probe`](crate::launch::online_softmax_probe): one plane of 32 lanes with `m_tiles` row
/// tiles (16 rows each, as the forward kernels' planes) lays `tiles` tiles of raw scores
/// (`scores`, `[tiles, rows, 16]`: row, key of the tile) out in the `m16n8` accumulator
/// layout, runs the kernels' `online_softmax_tile` on each, and writes after each tile the
/// probabilities (`probs`, same shape) and each row's maximum, sum (reduced over the row's
/// four lanes, as the kernels' epilogues do) and output scale (the product of the
/// rescalings an output accumulator that started at 1 received) to `state`, `[tiles,
/// rows, 3]`. Needs no matrix unit, so it runs on every runtime with plane shuffles;
/// `ptx_exp` (CUDA only) as the kernels take it.
#[cube(launch, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
pub fn online_softmax_probe_kernel(
    scores: &Tensor<f32>,
    probs: &mut Tensor<f32>,
    state: &mut Tensor<f32>,
    scale: f32,
    offset: i32,
    left: i32,
    right: i32,
    seq_k: u32,
    #[comptime] tiles: usize,
    #[comptime] m_tiles: usize,
    #[comptime] c_vs: usize,
    #[comptime] ptx_exp: bool,
) {
    register_acc_size(c_vs);
    let k_tiles = comptime!(PROBE_KEYS / 8);
    let rows = comptime!(PROBE_ROW_TILE * m_tiles);
    let halves = comptime!(2 * m_tiles);
    let per_tile = comptime!(4 / c_vs);
    let lane = UNIT_POS as usize;
    let g = lane / 4;
    let t = lane % 4;
    let seq_k = seq_k as usize;
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(m_tiles * k_tiles * per_tile));
    let mut o_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(m_tiles * per_tile));
    let mut m_row = Array::<f32>::new(halves);
    let mut l_row = Array::<f32>::new(halves);
    #[unroll]
    for hf in 0..halves {
        m_row[hf] = f32::new(NEG_BIG);
        l_row[hf] = f32::new(0.0);
    }
    #[unroll]
    for mt in 0..m_tiles {
        #[unroll]
        for e in 0..4usize {
            acc_set(&mut o_acc, mt, e, c_vs, f32::new(1.0));
        }
    }
    // The plane's band as the kernels build it (all its rows are real here).
    let band = TileBand {
        plane_full: true,
        full_lo: (rows as i32 - 1) + offset - left,
        full_hi: offset + right,
        row_a: g as i32,
        t,
        offset,
        left,
        right,
        seq_k,
    };
    let no_hide = Array::<u32>::new(1usize);
    let no_bias = Array::<f32>::new(1usize);
    for tile in 0..tiles {
        let t0 = (tile * PROBE_KEYS) as i32;
        #[unroll]
        for mt in 0..m_tiles {
            #[unroll]
            for kt in 0..k_tiles {
                #[unroll]
                for e in 0..4usize {
                    let row = 16 * mt + g + 8 * (e / 2);
                    let key = kt * 8 + 2 * t + e % 2;
                    let at = (tile * rows + row) * PROBE_KEYS + key;
                    acc_set(&mut s_acc, mt * k_tiles + kt, e, c_vs, scores[at]);
                }
            }
        }
        online_softmax_tile(
            &mut s_acc, &mut o_acc, &mut m_row, &mut l_row, scale, band, t0, &no_hide, false,
            &no_bias, 1.0f32, m_tiles, k_tiles, 1usize, c_vs, ptx_exp, false, false, false,
        );
        #[unroll]
        for mt in 0..m_tiles {
            #[unroll]
            for kt in 0..k_tiles {
                #[unroll]
                for e in 0..4usize {
                    let row = 16 * mt + g + 8 * (e / 2);
                    let key = kt * 8 + 2 * t + e % 2;
                    let at = (tile * rows + row) * PROBE_KEYS + key;
                    probs[at] = acc_get(&s_acc, mt * k_tiles + kt, e, c_vs);
                }
            }
        }
        #[unroll]
        for hf in 0..halves {
            let mut l = l_row[hf];
            l += plane_shuffle_xor(l, 1);
            l += plane_shuffle_xor(l, 2);
            if t == 0 {
                // Half `hf` is row tile `hf / 2`, upper or lower 8 rows.
                let at = (tile * rows + 16 * (hf / 2) + g + 8 * (hf % 2)) * 3;
                state[at] = m_row[hf];
                state[at + 1] = l;
                state[at + 2] = acc_get(&o_acc, hf / 2, 2 * (hf % 2), c_vs);
            }
        }
    }
}
