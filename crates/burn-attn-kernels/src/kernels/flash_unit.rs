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
use crate::components::schedule::CubeHead;
use crate::components::softmax::NEG_BIG;
use crate::components::staging::stage_rows;
use crate::components::unit_forward::{attend_key_tile, write_unit_rows};

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
///
/// Key splits: cube `z` of a grid `splits` deep sees only keys `z * split_keys .. (z + 1) *
/// split_keys` and writes its partial rows (normalised over those keys, with their lse) to
/// batch `z * batch + b` of `out` and `lse` (`[splits * batch, ..]`), for
/// `merge_key_splits_kernel`. One split: `split_keys >= seq_k`, a grid 1 deep.
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
    split_keys: i32,
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
    // The softmax step's per-score rule flags and score terms, which only block-sparse
    // calls use.
    let no_hide = Array::<u32>::new(1usize);
    let no_bias = Array::<f32>::new(1usize);
    #[unroll]
    for i in 0..comptime!(rq * rv) {
        o[i] = f32::new(0.0);
    }
    #[unroll]
    for a in 0..rq {
        m[a] = f32::new(NEG_BIG);
        l[a] = f32::new(0.0);
    }

    // This cube's split of the keys: keys past its end count as past the sequence.
    let split = CUBE_POS_Z as i32;
    let split_end = min(bounds.end, (split + 1) * split_keys);
    let keys_end = min(seq_k as i32, split_end) as usize;
    let mut t0 = max(bounds.start, split * split_keys);
    while t0 < split_end {
        let masked = !bounds.tile_unmasked(t0, t0 + block_k as i32 - 1, keys_end);
        attend_key_tile::<F>(
            k,
            v,
            &q_t,
            &mut kv,
            &mut p_tile,
            &mut partial,
            &mut s,
            &mut o,
            &mut m,
            &mut l,
            &no_hide,
            &no_bias,
            k_base,
            v_base,
            t0,
            masked,
            lo0,
            hi0,
            keys_end,
            scale,
            1.0f32,
            dim,
            value_dim,
            block_q,
            block_k,
            row_threads,
            col_threads,
            false,
            false,
            1.0f32,
            false,
        );
        t0 += block_k as i32;
    }

    write_unit_rows::<F>(
        out,
        lse,
        &o,
        &m,
        &l,
        &mut partial,
        CUBE_POS_Z as usize * q.shape(0) + b,
        h,
        r0,
        seq_q,
        neg_inf,
        value_dim,
        rq,
        rv,
        row_threads,
        col_threads,
    );
}
