//! The portable FlashAttention forward kernel (v2): no matrix units, register tiles.
//!
//! One cube of `row_threads x col_threads` units handles `block_q` query rows of one
//! (batch, head). Its Q block stays in shared memory for the whole pass; for every key
//! tile of the rows' band (tiles outside it are never loaded) the cube stages K, computes
//! the `block_q x block_k` scores with each unit owning a small register tile of them
//! (`block_q / row_threads` rows by `block_k / col_threads` keys, rows and keys strided by
//! the thread grid so that shared-memory reads hit distinct banks), reduces the row
//! maxima through shared memory, writes the probabilities to shared memory, stages V in
//! the buffer K used, and accumulates `P V` into each unit's register tile of the output
//! (its rows by `value_dim / col_threads` strided columns). Every unit keeps the running
//! maximum of its rows (the same in every unit of a row, read from the same partials) and
//! its own part of the row sums, added up once at the end. Tiles wholly inside the band of
//! every row of the cube take a path without the per-element mask.
//!
//! Compared with v1 (one unit per query row with the row's accumulator in a
//! function-local array, in git history), every value a unit reads from shared memory
//! feeds several multiply-adds, the register tiles are indexed by constants only (loops
//! over them are unrolled), and a cube has 128 units instead of 32.
//!
//! All band arithmetic is in `i32`: key `j` is visible to query `i` iff
//! `i + offset - left <= j <= i + offset + right` and `0 <= j < seq_k`, with
//! `offset = seq_k - seq_q` and unbounded sides encoded by the launch as `seq_q + seq_k`.

use cubecl::prelude::*;

use crate::components::band::BandBounds;
use crate::components::register_tile::tile_product;
use crate::components::schedule::CubeHead;
use crate::components::softmax::NEG_BIG;
use crate::components::staging::stage_rows;

/// The softmax part of one key tile for one unit: scales (and with `masked`, masks) its
/// `rq x rk` scores `s`, publishes their row maxima in `partial`, waits for the cube,
/// moves the running maxima `m` of its rows, rescales its output tile `o` and row sums `l`,
/// and writes its probabilities to `p_tile`. The caller syncs before reading `p_tile`.
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
                let j = t0 + (tx + b * col_threads) as i32;
                if j < lo0 + shift || j > hi0 + shift || j >= seq_k {
                    x = f32::new(NEG_BIG);
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
            p_tile[p_row + tx + b * col_threads] = p;
        }
        l[a] = l_row;
    }
}

/// FlashAttention forward without matrix units.
///
/// Launch with `CubeDim::new_1d(row_threads * col_threads)` and
/// `CubeCount::Static(ceil(seq_q / block_q), batch * heads, 1)`; `row_threads` must divide
/// `block_q` and `col_threads` must divide `block_k`. `out` is `[b, h, seq_q, value_dim]`
/// in the input dtype, `lse` is `[b, h, seq_q]` in f32. `neg_inf` must be
/// `f32::NEG_INFINITY` (passed at run time because WGSL has no infinite literal).
///
/// `heavy_first`: heads per group of the heavy-first cube order (0: the natural order;
/// see `schedule::cube_block`). Any value computes the same result.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn flash_unit_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    left: i32,
    right: i32,
    heavy_first: u32,
    neg_inf: f32,
    #[comptime] dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] row_threads: usize,
    #[comptime] col_threads: usize,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let rq = comptime!(block_q / row_threads);
    let rk = comptime!(block_k / col_threads);
    let rv = comptime!(value_dim.div_ceil(col_threads));
    let units = comptime!(row_threads * col_threads);
    let q_stride = comptime!(block_q + 1);
    let k_stride = comptime!(block_k + 1);

    let cube = CubeHead::query_major(q, k, heavy_first);
    let (b, h, kvh) = (cube.batch, cube.head, cube.kv_head);
    let (seq_q, seq_k, offset) = (cube.seq_q, cube.seq_k, cube.offset);
    let ty = UNIT_POS_X as usize / col_threads;
    let tx = UNIT_POS_X as usize % col_threads;

    let r0 = cube.block * block_q;
    // The keys the cube's rows see (its one plane is the whole cube).
    let bounds = BandBounds::new(r0, r0, seq_q, seq_k, offset, left, right, block_q, block_q);
    // The band of this unit's first row (row r0 + ty; its a-th row is row_threads further),
    // and the union of the band over the cube's rows (contiguous: both edges grow with
    // the row).
    let row0 = (r0 + ty) as i32;
    let lo0 = row0 + offset - left;
    let hi0 = row0 + offset + right;

    let mut q_t = Shared::<[F]>::new_slice(comptime!(dim * q_stride));
    // K (transposed) and then V (row-major) of the current tile, one after the other.
    let mut kv =
        Shared::<[F]>::new_slice(comptime!(usize::max(dim * k_stride, block_k * value_dim)));
    let mut p_tile = Shared::<[f32]>::new_slice(comptime!(block_q * k_stride));
    // Per (row, column thread): partial row maxima, and at the end partial row sums.
    let mut partial = Shared::<[f32]>::new_slice(comptime!(block_q * col_threads));

    let q_base = b * q.stride(0) + h * q.stride(1);
    let k_base = b * k.stride(0) + kvh * k.stride(1);
    let v_base = b * v.stride(0) + kvh * v.stride(1);
    stage_rows::<F>(q, &mut q_t, q_base, r0, seq_q, dim, block_q, units, true);

    let mut s = Array::<f32>::new(comptime!(rq * rk));
    let mut o = Array::<f32>::new(comptime!(rq * rv));
    let mut m = Array::<f32>::new(rq);
    let mut l = Array::<f32>::new(rq);
    #[unroll]
    for i in 0..comptime!(rq * rv) {
        o[i] = f32::new(0.0);
    }
    #[unroll]
    for a in 0..rq {
        m[a] = f32::new(NEG_BIG);
        l[a] = f32::new(0.0);
    }

    let mut t0 = bounds.start;
    while t0 < bounds.end {
        stage_rows::<F>(
            k,
            &mut kv,
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
            &mut s,
            &q_t,
            &kv,
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

        let tile_full = bounds.tile_unmasked(t0, t0 + block_k as i32 - 1, seq_k);
        // Both variants sync once inside (after the maxima), after which K is dead.
        if tile_full {
            softmax_tile(
                &mut s,
                &mut o,
                &mut m,
                &mut l,
                &mut partial,
                &mut p_tile,
                scale,
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
            );
        } else {
            softmax_tile(
                &mut s,
                &mut o,
                &mut m,
                &mut l,
                &mut partial,
                &mut p_tile,
                scale,
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
            );
        }
        stage_rows::<F>(
            v,
            &mut kv,
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
            &mut o,
            &p_tile,
            &kv,
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
        t0 += block_k as i32;
    }

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
