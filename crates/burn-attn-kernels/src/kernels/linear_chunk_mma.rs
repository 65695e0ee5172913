//! The chunked linear-attention kernel on matrix units (`mma.sync.m16n8k16`, bf16, CUDA
//! sm_80+): the same passes as `linear_chunk` (see `plan::linear` for the modes), with
//! every product on the matrix units.
//!
//! One cube of four planes walks the rows of one (batch, head) in chunks of 64, for one
//! block of 64 value columns. The state `S` (`dim x 64`, f32) is updated in the planes'
//! accumulator registers (each plane its `dim / 4` rows), with a bf16 copy in shared memory
//! for the products that read it. A pass that also writes rows keeps `S` in f32 shared
//! memory between updates, so the rows' accumulators never sit beside the state's (held
//! together they spill); a state pass keeps it in registers. Per chunk:
//! 1. stage the chunk's `a`, `b` (row-major) and `c` rows of the value block, each through
//!    the feature map where the mode maps it, and the per-row scalars;
//! 2. rows (`outputs`): each plane's 16 rows of `a S`, plus with `intra` the masked scores
//!    `a b^T` (f32 accumulators, into bf16 `A` fragments) times `c`; normalised by the row's
//!    `a z` plus its masked score sum plus `eps`;
//! 3. state (`update`): `S += b^T c` in the registers, then the bf16 copy, `z` and `x`.
//!
//! The rows' products read the state rounded to bf16 (the scores are rounded the same way
//! before they meet `c`); the state itself, `z` and every sum stay f32.

// A comptime condition around a runtime one stays two `if`s: merged, the comptime part
// would be evaluated at run time.
#![allow(clippy::collapsible_if)]

use cubecl::cmma::MatrixIdent;
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::components::fragments::{acc_get, acc_set, MmaVecAcc, PlaneMma};
use crate::components::linear_chunk::{
    load_state_vectors, map_staged_block, stage_row_scalars, stage_value_block,
    stage_value_block_async, store_state_vectors, update_state_vectors, PassCube, WalkRows,
};
use crate::plan::{LinearExtra, LinearMap, LinearMode, LinearTiles, LINEAR_MMA_PLANES};

/// Elements each unit stages per loop step with plain loads (their loads in flight
/// together): more keeps more registers live beside the state's accumulators, and the
/// kernel spills.
const STAGE_GROUP: usize = 8;

/// Values of one asynchronous copy (16 bytes of bf16).
const COPY: usize = 8;

/// One pass of chunked linear attention on matrix units (see `plan::linear` for the modes).
///
/// Launch with `CubeDim::new_2d(32, 4)` and the grid and operands of
/// [`linear_chunk_kernel`](crate::kernels::linear_chunk_kernel()); `tiles` has chunks of
/// 64 rows, value blocks of 64 columns and `dim_pad == dim`, a multiple of 64 (the plan's
/// matrix tiles), and `value_dim` is a multiple of 64. `out` is contiguous (the launcher
/// allocates it). `async_copy` stages the rows with `cp.async` (contiguous columns,
/// 16-byte aligned rows), else with plain loads.
///
/// Addresses a unit reuses every chunk are its own base plus comptime offsets: computed
/// whole for each element, the compiler keeps them all live across the walk and the
/// kernel spills.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn linear_chunk_mma_kernel<F: Float>(
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
    #[comptime] async_copy: bool,
    #[comptime] _source: u64,
    #[define(F)] _dtype: ElemType,
) {
    let mut mma = PlaneMma::<F>::new();
    let c_vs = mma.def.vector_size(MatrixIdent::Accumulator);
    let c_vecs = mma.def.vectors_per_lane(MatrixIdent::Accumulator);

    let chunk = comptime!(tiles.chunk);
    let bv = comptime!(tiles.value_block);
    let dp = comptime!(tiles.dim_pad);
    let units = comptime!(32 * LINEAR_MMA_PLANES);
    // Rows padded by 8 values (16 bytes): `ldmatrix`'s eight row addresses hit distinct
    // banks.
    let a_stride = comptime!(tiles.dim_pad + 8);
    let c_stride = comptime!(tiles.value_block + 8);
    let key_tiles = comptime!(tiles.chunk / 8);
    let value_tiles = comptime!(tiles.value_block / 8);
    // Row tiles of the state per plane.
    let s_tiles = comptime!(tiles.dim_pad / (16 * LINEAR_MMA_PLANES));
    let has_extra = comptime!(mode.extra != LinearExtra::None);
    let extra_rows = comptime!(mode.extra == LinearExtra::Rows);
    let reverse = comptime!(mode.reverse);

    let lane = UNIT_POS_PLANE as usize;
    let warp = UNIT_POS_Y as usize;
    let tid = warp * 32 + lane;
    let g = lane / 4;
    let q4 = lane % 4;
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
        tiles.chunk * (tiles.dim_pad + 8)
    } else {
        8
    });
    let b_len = comptime!(if mode.reads_keys() {
        tiles.chunk * (tiles.dim_pad + 8)
    } else {
        8
    });
    let c_len = comptime!(if mode.reads_keys() {
        tiles.chunk * (tiles.value_block + 8)
    } else {
        8
    });
    let s_len = comptime!(if mode.outputs {
        tiles.dim_pad * (tiles.value_block + 8)
    } else {
        8
    });
    // Where the state lives between updates: f32 shared memory in a pass that writes rows,
    // else the accumulator registers.
    let home_in_smem = comptime!(mode.outputs && mode.update);
    let home_len = comptime!(if mode.outputs && mode.update {
        tiles.dim_pad * (tiles.value_block + 8)
    } else {
        8
    });
    let mut a_s = Shared::<[F]>::new_aligned_slice(a_len, 16usize);
    let mut b_s = Shared::<[F]>::new_aligned_slice(b_len, 16usize);
    let mut c_s = Shared::<[F]>::new_aligned_slice(c_len, 16usize);
    // The state rounded for the rows' products, `[dim][value_block]`.
    let mut s_f = Shared::<[F]>::new_aligned_slice(s_len, 16usize);
    let mut s_home = Shared::<[f32]>::new_aligned_slice(home_len, 16usize);
    let mut e_s = Shared::<[f32]>::new_slice(chunk);
    let mut z_s = Shared::<[f32]>::new_slice(dp);
    let mut x_s = Shared::<[f32]>::new_slice(bv);

    // The state: this plane's rows `s_row0 ..` of S, in accumulator tiles (s_tile, value
    // tile).
    let s_row0 = warp * 16 * s_tiles;
    let mut s_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(s_tiles * value_tiles * c_vecs));
    let hs = h / (heads / s_in.shape(1));
    #[unroll]
    for mt in 0..s_tiles {
        #[unroll]
        for nt in 0..value_tiles {
            #[unroll]
            for e in 0..4usize {
                let mut x = f32::new(0.0);
                if comptime!(mode.state_in) {
                    let d = s_row0 + mt * 16 + g + 8 * (e / 2);
                    let v = v0 + nt * 8 + 2 * q4 + e % 2;
                    x = s_in[state_batch * s_in.stride(0)
                        + hs * s_in.stride(1)
                        + d * s_in.stride(2)
                        + v * s_in.stride(3)];
                }
                acc_set(&mut s_acc, mt * value_tiles + nt, e, c_vs, x);
            }
        }
    }
    if comptime!(home_in_smem) {
        write_state_tiles::<f32>(&s_acc, &mut s_home, s_row0, g, q4, tiles, c_vs);
    }
    if comptime!(mode.outputs) {
        write_state_tiles::<F>(&s_acc, &mut s_f, s_row0, g, q4, tiles, c_vs);
    }
    load_state_vectors(
        z_in,
        x_in,
        &mut z_s,
        &mut x_s,
        state_batch,
        hs,
        v0,
        dim,
        value_dim,
        tid,
        dp,
        bv,
        units,
        mode,
    );
    let mut zero_s = Shared::<[u32]>::new_slice(1usize);
    if tid == 0 {
        zero_s[0] = 0u32;
    }
    // Initialising the barrier synchronises the cube.
    let copies = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let out_row0 = (batch * heads + h) * rows;

    let mut t0 = start;
    while t0 < end {
        // The unit's indices again, through a zero read from shared memory: derived from the
        // launch's indices alone, the walk's fragment and copy addresses (inline-asm
        // operands, a register each, about 130) are hoisted out of it and the kernel spills.
        let zero = zero_s[0] as usize;
        let lane_c = lane + zero;
        let warp_c = warp + zero;
        let tid_c = warp_c * 32 + lane_c;
        let g_c = lane_c / 4;
        let q4_c = lane_c % 4;
        let s_row0_c = warp_c * 16 * s_tiles;

        // 1. Stage the chunk.
        if comptime!(async_copy) {
            stage_chunk_async::<F>(
                a, b, c, a_rows, b_rows, c_rows, &mut a_s, &mut b_s, &mut c_s, &copies, t0, end,
                v0, tid_c, tiles, mode,
            );
        } else {
            stage_chunk_sync::<F>(
                a, b, c, a_rows, b_rows, c_rows, &mut a_s, &mut b_s, &mut c_s, t0, end, v0, dim,
                value_dim, tid_c, tiles, mode,
            );
        }
        if comptime!(mode.reads_scalars()) {
            stage_row_scalars(
                extra, batch, extra_head, rows, end, &mut e_s, t0, tid_c, chunk, reverse,
            );
        }
        sync_cube();

        // 2. This plane's 16 rows.
        if comptime!(mode.outputs) {
            let r0 = warp_c * 16;
            let mut o_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(value_tiles * c_vecs));
            #[unroll]
            for i in 0..comptime!(value_tiles * c_vecs) {
                o_acc[i] = Vector::new(f32::new(0.0));
            }
            // The masked scores' sums of the lane's rows g and g + 8.
            let mut score_sum = Array::<f32>::new(2usize);
            score_sum[0] = f32::new(0.0);
            score_sum[1] = f32::new(0.0);
            mma.smem_product(
                lane_c,
                &a_s,
                r0 * a_stride,
                &s_f,
                0usize,
                &mut o_acc,
                a_stride,
                false,
                c_stride,
                true,
                comptime!(tiles.dim_pad / 16),
                1usize,
                value_tiles,
            );
            if comptime!(mode.intra) {
                let mut p_acc = Array::<Vector<f32, MmaVecAcc>>::new(comptime!(key_tiles * c_vecs));
                #[unroll]
                for i in 0..comptime!(key_tiles * c_vecs) {
                    p_acc[i] = Vector::new(f32::new(0.0));
                }
                mma.smem_product(
                    lane_c,
                    &a_s,
                    r0 * a_stride,
                    &b_s,
                    0usize,
                    &mut p_acc,
                    a_stride,
                    false,
                    a_stride,
                    false,
                    comptime!(tiles.dim_pad / 16),
                    1usize,
                    key_tiles,
                );
                #[unroll]
                for nt in 0..key_tiles {
                    #[unroll]
                    for e in 0..4usize {
                        let row = r0 + g_c + 8 * (e / 2);
                        let key = nt * 8 + 2 * q4_c + e % 2;
                        let mut score = acc_get(&p_acc, nt, e, c_vs);
                        if comptime!(mode.extra == LinearExtra::Rows) {
                            score += e_s[row];
                        }
                        if comptime!(mode.extra == LinearExtra::Keys) {
                            score += e_s[key];
                        }
                        if key > row {
                            score = f32::new(0.0);
                        }
                        score_sum[e / 2] += score;
                        acc_set(&mut p_acc, nt, e, c_vs, score);
                    }
                }
                mma.acc_b(
                    lane_c,
                    &p_acc,
                    &c_s,
                    0usize,
                    &mut o_acc,
                    c_stride,
                    comptime!(tiles.chunk / 16),
                    value_tiles,
                );
            }
            #[unroll]
            for half in 0..2usize {
                let row = r0 + g_c + 8 * half;
                let mut divisor = f32::new(1.0);
                if comptime!(mode.normalise) {
                    // `a . z` over the quad's four interleaved quarters of the head dim (the
                    // quad reads consecutive words), plus the scores.
                    let mut sum = f32::new(0.0);
                    for i in 0..comptime!(tiles.dim_pad / 4) {
                        let d = 4 * i + q4_c;
                        sum += f32::cast_from(a_s[row * a_stride + d]) * z_s[d];
                    }
                    sum += score_sum[half];
                    sum += plane_shuffle_xor(sum, 1);
                    sum += plane_shuffle_xor(sum, 2);
                    divisor = sum + eps;
                }
                let mut weight = f32::new(0.0);
                if has_extra {
                    weight = f32::new(1.0);
                    if extra_rows {
                        weight = e_s[row];
                    }
                }
                let t = t0 + row;
                if t < end {
                    let at_row = if reverse { rows - 1 - t } else { t };
                    let out_at = (out_row0 + at_row) * value_dim + v0 + 2 * q4_c;
                    #[unroll]
                    for nt in 0..value_tiles {
                        #[unroll]
                        for e2 in 0..2usize {
                            let mut value = acc_get(&o_acc, nt, half * 2 + e2, c_vs);
                            if has_extra {
                                value += weight * x_s[2 * q4_c + comptime!(nt * 8 + e2)];
                            }
                            out[out_at + comptime!(nt * 8 + e2)] = F::cast_from(value / divisor);
                        }
                    }
                    if comptime!(mode.normalise) {
                        if q4_c == 0 && v0 == 0 {
                            let at =
                                batch * den.stride(0) + h * den.stride(1) + at_row * den.stride(2);
                            den[at] = divisor;
                        }
                    }
                }
            }
        }

        // 3. The state takes the chunk (its rounded copy and vectors after every read).
        if comptime!(mode.update) {
            if comptime!(home_in_smem) {
                read_state_tiles(&s_home, &mut s_acc, s_row0_c, g_c, q4_c, tiles, c_vs);
            }
            mma.smem_product(
                lane_c,
                &b_s,
                s_row0_c,
                &c_s,
                0usize,
                &mut s_acc,
                a_stride,
                true,
                c_stride,
                true,
                comptime!(tiles.chunk / 16),
                s_tiles,
                value_tiles,
            );
            if comptime!(home_in_smem) {
                write_state_tiles::<f32>(&s_acc, &mut s_home, s_row0_c, g_c, q4_c, tiles, c_vs);
            }
            sync_cube();
            if comptime!(mode.outputs) {
                write_state_tiles::<F>(&s_acc, &mut s_f, s_row0_c, g_c, q4_c, tiles, c_vs);
            }
            update_state_vectors::<F>(
                &b_s, &c_s, &e_s, &mut z_s, &mut x_s, tid_c, a_stride, 1usize, c_stride, chunk, dp,
                bv, units, mode,
            );
        }
        sync_cube();
        t0 += chunk;
    }

    if comptime!(mode.state_out) {
        if comptime!(home_in_smem) {
            read_state_tiles(&s_home, &mut s_acc, s_row0, g, q4, tiles, c_vs);
        }
        #[unroll]
        for mt in 0..s_tiles {
            #[unroll]
            for nt in 0..value_tiles {
                #[unroll]
                for e in 0..4usize {
                    let d = s_row0 + mt * 16 + g + 8 * (e / 2);
                    let v = v0 + nt * 8 + 2 * q4 + e % 2;
                    let at = state_batch * s_out.stride(0)
                        + h * s_out.stride(1)
                        + d * s_out.stride(2)
                        + v * s_out.stride(3);
                    s_out[at] = acc_get(&s_acc, mt * value_tiles + nt, e, c_vs);
                }
            }
        }
        store_state_vectors(
            z_out,
            x_out,
            &z_s,
            &x_s,
            state_batch,
            h,
            v0,
            dim,
            value_dim,
            tid,
            bv,
            units,
            mode,
        );
    }
}

/// Writes this plane's rows of the state (`s_acc`) as `E` into `dst` (`[dim][value_block]`,
/// rows padded by 8): the f32 home of the state, or its copy rounded for the products.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_state_tiles<E: Float>(
    s_acc: &Array<Vector<f32, MmaVecAcc>>,
    dst: &mut [E],
    s_row0: usize,
    g: usize,
    q4: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] c_vs: usize,
) {
    let value_tiles = comptime!(tiles.value_block / 8);
    let stride = comptime!(tiles.value_block + 8);
    let base = (s_row0 + g) * stride + 2 * q4;
    #[unroll]
    for mt in 0..comptime!(tiles.dim_pad / (16 * LINEAR_MMA_PLANES)) {
        #[unroll]
        for nt in 0..value_tiles {
            #[unroll]
            for e in 0..4usize {
                let offset = comptime!(state_offset(mt, nt, e, stride));
                dst[base + offset] = E::cast_from(acc_get(s_acc, mt * value_tiles + nt, e, c_vs));
            }
        }
    }
}

/// Where accumulator element `e` of state tile (`mt`, `nt`) sits in a `[dim][value_block]`
/// buffer of row `stride`, from the unit's base (see [`write_state_tiles`]).
fn state_offset(mt: usize, nt: usize, e: usize, stride: usize) -> usize {
    (mt * 16 + 8 * (e / 2)) * stride + nt * 8 + e % 2
}

/// Reads this plane's rows of the state from its f32 home `src` into `s_acc` (the layout of
/// [`write_state_tiles`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn read_state_tiles(
    src: &[f32],
    s_acc: &mut Array<Vector<f32, MmaVecAcc>>,
    s_row0: usize,
    g: usize,
    q4: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] c_vs: usize,
) {
    let value_tiles = comptime!(tiles.value_block / 8);
    let stride = comptime!(tiles.value_block + 8);
    let base = (s_row0 + g) * stride + 2 * q4;
    #[unroll]
    for mt in 0..comptime!(tiles.dim_pad / (16 * LINEAR_MMA_PLANES)) {
        #[unroll]
        for nt in 0..value_tiles {
            #[unroll]
            for e in 0..4usize {
                let offset = comptime!(state_offset(mt, nt, e, stride));
                acc_set(s_acc, mt * value_tiles + nt, e, c_vs, src[base + offset]);
            }
        }
    }
}

/// Stages the chunk's operands the mode reads with `cp.async` and waits for them, then
/// maps them in place where the mode maps them (the caller synchronises the cube).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_chunk_async<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a_rows: WalkRows,
    b_rows: WalkRows,
    c_rows: WalkRows,
    a_s: &mut [F],
    b_s: &mut [F],
    c_s: &mut [F],
    copies: &Barrier,
    t0: usize,
    end: usize,
    v0: usize,
    tid: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) {
    let (chunk, dp, bv) = comptime!((tiles.chunk, tiles.dim_pad, tiles.value_block));
    let a_stride = comptime!(tiles.dim_pad + 8);
    let c_stride = comptime!(tiles.value_block + 8);
    let units = comptime!(32 * LINEAR_MMA_PLANES);
    let reverse = comptime!(mode.reverse);
    if comptime!(mode.reads_rows()) {
        stage_value_block_async::<F>(
            a, a_rows, a_s, t0, end, 0usize, tid, chunk, dp, a_stride, units, reverse, COPY,
        );
    }
    if comptime!(mode.reads_keys()) {
        stage_value_block_async::<F>(
            b, b_rows, b_s, t0, end, 0usize, tid, chunk, dp, a_stride, units, reverse, COPY,
        );
        stage_value_block_async::<F>(
            c, c_rows, c_s, t0, end, v0, tid, chunk, bv, c_stride, units, reverse, COPY,
        );
    }
    copies.commit_copy_async();
    copies.arrive_and_wait();
    if comptime!(mode.reads_rows() && mode.map_a && mode.map != LinearMap::Identity) {
        map_staged_block::<F>(
            a_s, t0, end, tid, chunk, dp, a_stride, units, mode.map, COPY,
        );
    }
    if comptime!(mode.reads_keys() && mode.map_b && mode.map != LinearMap::Identity) {
        map_staged_block::<F>(
            b_s, t0, end, tid, chunk, dp, a_stride, units, mode.map, COPY,
        );
    }
    if comptime!(mode.reads_keys() && mode.map_c && mode.map != LinearMap::Identity) {
        map_staged_block::<F>(
            c_s, t0, end, tid, chunk, bv, c_stride, units, mode.map, COPY,
        );
    }
}

/// Stages the chunk's operands the mode reads with plain loads, through the feature map
/// where the mode maps them (the caller synchronises the cube).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_chunk_sync<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a_rows: WalkRows,
    b_rows: WalkRows,
    c_rows: WalkRows,
    a_s: &mut [F],
    b_s: &mut [F],
    c_s: &mut [F],
    t0: usize,
    end: usize,
    v0: usize,
    dim: usize,
    value_dim: usize,
    tid: usize,
    #[comptime] tiles: LinearTiles,
    #[comptime] mode: LinearMode,
) {
    let (chunk, dp, bv) = comptime!((tiles.chunk, tiles.dim_pad, tiles.value_block));
    let a_stride = comptime!(tiles.dim_pad + 8);
    let c_stride = comptime!(tiles.value_block + 8);
    let units = comptime!(32 * LINEAR_MMA_PLANES);
    let reverse = comptime!(mode.reverse);
    if comptime!(mode.reads_rows()) {
        stage_value_block::<F>(
            a,
            a_rows,
            a_s,
            t0,
            end,
            0usize,
            dim,
            tid,
            chunk,
            dp,
            a_stride,
            units,
            reverse,
            mode.map,
            mode.map_a,
            STAGE_GROUP,
        );
    }
    if comptime!(mode.reads_keys()) {
        stage_value_block::<F>(
            b,
            b_rows,
            b_s,
            t0,
            end,
            0usize,
            dim,
            tid,
            chunk,
            dp,
            a_stride,
            units,
            reverse,
            mode.map,
            mode.map_b,
            STAGE_GROUP,
        );
        stage_value_block::<F>(
            c,
            c_rows,
            c_s,
            t0,
            end,
            v0,
            value_dim,
            tid,
            chunk,
            bv,
            c_stride,
            units,
            reverse,
            mode.map,
            mode.map_c,
            STAGE_GROUP,
        );
    }
}
