//! Host-side launchers of the backward kernels: the portable ones (`flash_unit_backward.rs`)
//! and the matrix-unit ones (`flash_mma_backward.rs`).

use burn_backend::{DType, Shape};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use crate::flash_mma_backward::{flash_mma_backward_dkdv_kernel, flash_mma_backward_dq_kernel};
use crate::flash_unit_backward::{flash_unit_backward_dkdv_kernel, flash_unit_backward_dq_kernel};
use crate::launch::{
    aligned_rows, alloc_contiguous, check_dtypes, cube_grid, dims4, heavy_first, is_software_wgpu,
    mma_support, store_vector, trace, tuning_override, BandArgs, Sizes, UnitTiles, Unsupported,
    SOFTWARE_LOOP_BUDGET,
};

/// The gradients `(dq, dk, dv)` of one backward call.
pub type Gradients<R> = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>);

/// Planes per cube of the matrix-unit backward kernels; each owns 16 rows (query rows of the
/// dQ kernel, key rows of the dK/dV kernel), the `m` of `m16n8k16`.
const MMA_BACKWARD_PLANES: usize = 4;

/// Largest head or value dim, padded to 16, of the matrix-unit backward: the dK/dV kernel
/// keeps both gradient rows in f32 registers (`dim_pad / 2 + value_dim_pad / 2` per lane),
/// which past 128 would leave too few registers for the tile's scores (spills).
const MMA_BACKWARD_MAX_DIM: usize = 128;

/// Gradients `(dq, dk, dv)` of exact banded attention with the portable kernels (no matrix
/// units, no atomics: two runs give the same bits).
///
/// `q: [batch, heads, seq_q, head_dim]`, `k: [batch, kv_heads, seq_k, head_dim]`,
/// `v: [batch, kv_heads, seq_k, value_dim]`, `out` and `d_out: [batch, heads, seq_q,
/// value_dim]`, all in one dtype (f32, f16 or bf16), any strides; `lse: [batch, heads,
/// seq_q]` in f32, the forward's row log-sum-exp (`-inf` for rows that see no key: they
/// get zero gradients). `kv_heads` must divide `heads`; `dk` and `dv` sum over the query
/// heads that share a kv head. The gradients come back contiguous in the input dtype
/// (accumulated in f32), in the shapes of `q`, `k` and `v`.
///
/// Declines (`Err`, the caller then runs another path) other dtypes, mismatched shapes,
/// head dims past [`crate::MAX_HEAD_DIM`], grids past CubeCL's limits, and devices whose
/// shared memory cannot hold the smallest tile. On CPU-type WGPU adapters (lavapipe) it
/// also declines calls whose units could run more loop iterations than llvmpipe allows one
/// shader invocation (65535 in all, after which it silently leaves every loop: wrong
/// gradients): at head dim 128 in f32 on lavapipe about 3360 keys per query row and 1664
/// query rows (times the query heads per kv head) per key. `BURN_ATTN_UNIT_NO_CAP=1`
/// lifts that cap, for diagnosis.
pub fn flash_backward_unit<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    d_out: CubeTensor<R>,
    band: BandArgs,
) -> Result<Gradients<R>, Unsupported> {
    let sizes = check_inputs(&q, &k, &v, &out, &lse, &d_out)?;
    let Sizes {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = sizes;

    let client = q.client.clone();
    let dtype = q.dtype;
    let elem = dtype.size();
    let shared = client.properties().hardware.max_shared_memory_size;
    let no_room = || {
        Unsupported::SharedMemory(format!(
            "{shared} bytes for head_dim {dim}, value_dim {value_dim}"
        ))
    };
    let widths = dim + value_dim;
    // dQ kernel (query rows x keys): Q and dO transposed and padded, one buffer for V then
    // K (transposed, padded), dS (f32, padded), and each row's lse and D.
    let dq_tiles = UnitTiles::choose(
        shared,
        |t| {
            (widths * (t.rows + 1) + dim.max(value_dim) * (t.cols + 1)) * elem
                + (t.rows * (t.cols + 1) + 2 * t.rows) * 4
        },
        |t| t.unit_rows() * (2 * t.unit_cols() + t.unit_width(dim)),
        |_| true,
    )
    .ok_or_else(no_room)?;
    // dK/dV kernel (keys x query rows): K, V, Q and dO transposed and padded, P^T and dS^T
    // (f32, padded), and each query row's lse and D.
    let kv_tiles = UnitTiles::choose(
        shared,
        |t| {
            widths * (t.rows + 1 + t.cols + 1) * elem + (2 * t.rows * (t.cols + 1) + 2 * t.cols) * 4
        },
        |t| t.unit_rows() * (2 * t.unit_cols() + t.unit_width(dim) + t.unit_width(value_dim)),
        |_| true,
    )
    .ok_or_else(no_room)?;
    let dq_grid = sizes.grid(dq_tiles.rows)?;
    let kv_grid = cube_grid(seq_k, kv_tiles.rows, batch * kv_heads, "batch*kv_heads")?;

    // llvmpipe ends every loop of an invocation past its iteration budget, which gives wrong
    // gradients with no error: decline what could reach it on software adapters.
    let no_cap = std::env::var("BURN_ATTN_UNIT_NO_CAP").is_ok_and(|v| v == "1");
    if !no_cap && is_software_wgpu(&q.client) {
        let group = heads / kv_heads;
        let loops = backward_loop_iterations(&sizes, group, band, &dq_tiles, &kv_tiles);
        // A small margin for what the count could leave out.
        if loops + 64 > SOFTWARE_LOOP_BUDGET {
            return Err(Unsupported::Size(format!(
                "up to {loops} loop iterations per unit on a software adapter (llvmpipe ends \
                 loops past {SOFTWARE_LOOP_BUDGET}): seq_q {seq_q}, seq_k {seq_k}, head_dim \
                 {dim}, value_dim {value_dim}, {group} query heads per kv head"
            )));
        }
    }
    trace(|| format!("flash_unit_backward tiles dQ {dq_tiles:?}, dK/dV {kv_tiles:?}"));

    let [dq, dk, dv, delta] = alloc_gradients(&q, &sizes);
    let left = sizes.side(band.left);
    let right = sizes.side(band.right);
    let dq_heavy = heavy_first(&band, &dq_grid);
    let kv_heavy = heavy_first(&band, &kv_grid);

    if !sizes.is_empty() {
        flash_unit_backward_dq_kernel::launch::<R>(
            &client,
            dq_grid,
            CubeDim::new_1d(dq_tiles.units() as u32),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            d_out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            band.scale,
            left,
            right,
            dq_heavy,
            dim,
            value_dim,
            dq_tiles.rows,
            dq_tiles.cols,
            dq_tiles.row_threads,
            dq_tiles.col_threads,
            dtype.into(),
        );
    }
    // With seq_q = 0 this still runs and writes zero dK and dV.
    if seq_k * batch * kv_heads > 0 {
        flash_unit_backward_dkdv_kernel::launch::<R>(
            &client,
            kv_grid,
            CubeDim::new_1d(kv_tiles.units() as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            d_out.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            band.scale,
            left,
            right,
            kv_heavy,
            dim,
            value_dim,
            kv_tiles.rows,
            kv_tiles.cols,
            kv_tiles.row_threads,
            kv_tiles.col_threads,
            dtype.into(),
        );
    }
    Ok((dq, dk, dv))
}

/// Gradients `(dq, dk, dv)` of exact banded attention with the matrix-unit kernels
/// (`mma.sync.m16n8k16`; no atomics: two runs give the same bits).
///
/// Same contract as [`flash_backward_unit`]; f16 and bf16 only (`Unsupported::DType`
/// otherwise), only where the runtime is CUDA and reports that instruction with f32
/// accumulation and `ldmatrix` for the dtype (as [`crate::flash_forward_mma`]), and head
/// and value dims up to 128 (`Unsupported::Size` otherwise: the caller then runs the
/// portable kernels). `Unsupported::SharedMemory` where the device cannot hold the smallest
/// tiles: each kernel's own 64 rows plus one streamed tile per stage.
///
/// Staging: both kernels stage with `cp.async` into two buffers of the streamed tile (K/V
/// in the dQ kernel, Q/dO plus lse/D in the dK/dV kernel), as the forward does, where the
/// device reports asynchronous copies and q, k, v and d_out have contiguous 16-byte aligned
/// rows (the forward's rule); otherwise, or with `BURN_ATTN_MMA_SYNC=1` (tuning runs), they
/// stage synchronously into one buffer.
pub fn flash_backward_mma<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    d_out: CubeTensor<R>,
    band: BandArgs,
) -> Result<Gradients<R>, Unsupported> {
    let sizes = check_inputs(&q, &k, &v, &out, &lse, &d_out)?;
    mma_support(&q)?;
    let Sizes {
        batch,
        kv_heads,
        seq_k,
        dim,
        value_dim,
        ..
    } = sizes;
    let dim_pad = dim.div_ceil(16) * 16;
    let value_dim_pad = value_dim.div_ceil(16) * 16;
    let widest = dim_pad.max(value_dim_pad);
    if widest > MMA_BACKWARD_MAX_DIM {
        return Err(Unsupported::Size(format!(
            "head_dim {dim} / value_dim {value_dim} (the matrix-unit backward takes up to \
             {MMA_BACKWARD_MAX_DIM})"
        )));
    }
    let planes = MMA_BACKWARD_PLANES;
    let rows = 16 * planes;
    let dq_grid = sizes.grid(rows)?;
    let kv_grid = cube_grid(seq_k, rows, batch * kv_heads, "batch*kv_heads")?;

    let client = q.client.clone();
    let dtype = q.dtype;
    let elem = dtype.size();
    let shared = client.properties().hardware.max_shared_memory_size;
    // Asynchronous double-buffered staging (the forward's rule): the device's `cp.async`,
    // 16-byte copies of every staged tensor's rows, and no `BURN_ATTN_MMA_SYNC=1`.
    let force_sync = std::env::var("BURN_ATTN_MMA_SYNC").is_ok_and(|v| v == "1");
    let async_copy = !force_sync
        && client.properties().features.copy_async
        && [&q, &k, &v, &d_out].iter().all(|t| aligned_rows(t));
    let stages = if async_copy { 2 } else { 1 };
    // Each kernel stages its cube's own rows (`rows`: Q and dO, or K and V) and `stages`
    // streamed tiles of `block` rows (K and V, or Q and dO), all padded `[row][d_pad + 8]`;
    // the dK/dV kernel adds each streamed tile's lse and D (8 bytes a row). 128 bytes cover
    // the 16-byte alignment of the four tiles and the two 8-byte barriers.
    let smem = |block: usize, per_row: usize| {
        (rows + stages * block) * (dim_pad + 8 + value_dim_pad + 8) * elem
            + stages * block * per_row
            + 128
    };
    // Streamed tiles: 64 rows up to head dim 64; past it 32 keys per dQ tile (fewer live
    // score registers) but 64 queries per dK/dV tile, which measured 8-14% faster at d =
    // 128 (PERFORMANCE.md, "Backward v6"; 64 keys per dQ tile were 2-3% slower); 16 where
    // shared memory is short. `BURN_ATTN_MMA_DQ_BLOCK_K` and `BURN_ATTN_MMA_DKDV_BLOCK_Q`
    // (16, 32 or 64) override the dQ kernel's key tile and the dK/dV kernel's query tile
    // where they fit, for tuning runs.
    let (dq_candidates, dkdv_candidates): (&[usize], &[usize]) = if widest > 64 {
        (&[32, 16], &[64, 32, 16])
    } else {
        (&[64, 32, 16], &[64, 32, 16])
    };
    let pick = |name: &str, per_row: usize, candidates: &[usize]| {
        let forced = tuning_override(name, &[16, 32, 64]);
        if let Some(block) = forced.filter(|&block| smem(block, per_row) > shared) {
            // Said, so that a tuning run does not time the default unawares.
            eprintln!(
                "burn-attn: {name}={block} needs {} bytes of shared memory, the device has \
                 {shared}: using the default tile",
                smem(block, per_row)
            );
        }
        forced
            .into_iter()
            .chain(candidates.iter().copied())
            .find(|&block| smem(block, per_row) <= shared)
            .ok_or_else(|| {
                Unsupported::SharedMemory(format!(
                    "{shared} bytes for head_dim {dim}, value_dim {value_dim}"
                ))
            })
    };
    let block_k = pick("BURN_ATTN_MMA_DQ_BLOCK_K", 0, dq_candidates)?;
    let block_q = pick("BURN_ATTN_MMA_DKDV_BLOCK_Q", 8, dkdv_candidates)?;
    trace(|| {
        format!(
            "flash_mma_backward planes {planes}, dQ block_k {block_k} ({} B shared), dK/dV \
             block_q {block_q} ({} B shared), {} staging",
            smem(block_k, 0),
            smem(block_q, 8),
            if async_copy { "async" } else { "sync" }
        )
    });

    let [dq, dk, dv, delta] = alloc_gradients(&q, &sizes);
    let left = sizes.side(band.left);
    let right = sizes.side(band.right);
    let dq_heavy = heavy_first(&band, &dq_grid);
    let kv_heavy = heavy_first(&band, &kv_grid);

    // SAFETY: every global access of both kernels is guarded by the tensors' own sizes
    // (query rows < seq_q, key rows < seq_k, columns < head/value dim; staging zero-fills
    // past them, outputs are written only inside them) and every shared-memory index is
    // bounded by the comptime tile sizes (`ldmatrix` rows stay below `rows` or `stages *
    // block` rows and `d_pad` columns; lse/D tiles are indexed below `stages * block_q`, and
    // `block_q` is at most the cube's 128 units, as the dK/dV kernel asserts), so the
    // runtime's per-access bounds checks are redundant. The grids match the kernels'
    // comptime plane counts (`planes`). The 16-byte `cp.async` reads of the asynchronous
    // staging stay inside a row because `aligned_rows` demands unit column strides and
    // head/value dims that are multiples of 8.
    unsafe {
        if !sizes.is_empty() {
            flash_mma_backward_dq_kernel::launch_unchecked::<R>(
                &client,
                dq_grid,
                CubeDim::new_2d(32, planes as u32),
                store_vector(dim, elem),
                q.clone().into_tensor_arg(),
                k.clone().into_tensor_arg(),
                v.clone().into_tensor_arg(),
                out.into_tensor_arg(),
                d_out.clone().into_tensor_arg(),
                lse.clone().into_tensor_arg(),
                dq.clone().into_tensor_arg(),
                delta.clone().into_tensor_arg(),
                band.scale,
                left,
                right,
                dq_heavy,
                dim_pad,
                value_dim_pad,
                planes,
                block_k,
                async_copy,
                dtype.into(),
            );
        }
        // With seq_q = 0 this still runs and writes zero dK and dV.
        if seq_k * batch * kv_heads > 0 {
            flash_mma_backward_dkdv_kernel::launch_unchecked::<R>(
                &client,
                kv_grid,
                CubeDim::new_2d(32, planes as u32),
                store_vector(dim, elem),
                store_vector(value_dim, elem),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                d_out.into_tensor_arg(),
                lse.into_tensor_arg(),
                delta.into_tensor_arg(),
                dk.clone().into_tensor_arg(),
                dv.clone().into_tensor_arg(),
                band.scale,
                left,
                right,
                kv_heavy,
                dim_pad,
                value_dim_pad,
                planes,
                block_q,
                async_copy,
                dtype.into(),
            );
        }
    }
    Ok((dq, dk, dv))
}

/// The best backward kernel for the call: the matrix-unit kernels where they apply (unless
/// `BURN_ATTN_NO_MMA=1`), else the portable ones, saying with `BURN_ATTN_TRACE=1` which ran
/// or why one declined. `Err` when none takes the call.
pub fn flash_backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    d_out: CubeTensor<R>,
    band: BandArgs,
) -> Result<Gradients<R>, Unsupported> {
    let shape = q.meta.shape().clone();
    let disabled = std::env::var("BURN_ATTN_NO_MMA").is_ok_and(|v| v == "1");
    if !disabled {
        let mma = flash_backward_mma(
            q.clone(),
            k.clone(),
            v.clone(),
            out.clone(),
            lse.clone(),
            d_out.clone(),
            band,
        );
        match mma {
            Ok(done) => {
                trace(|| format!("flash_mma_backward for q {shape:?}"));
                return Ok(done);
            }
            Err(why) => trace(|| format!("flash_mma_backward declined: {why}")),
        }
    }
    let done = flash_backward_unit(q, k, v, out, lse, d_out, band);
    match &done {
        Ok(_) => trace(|| format!("flash_unit_backward for q {shape:?}")),
        Err(why) => trace(|| format!("flash_unit_backward declined: {why}")),
    }
    done
}

/// The outputs of both backward launchers: `dq`, `dk`, `dv` (contiguous, in `q`'s dtype,
/// in the shapes of `q`, `k` and `v`) and the f32 `D = rowsum(dO * O)` buffer
/// `[batch, heads, seq_q]` the dQ kernel writes for the dK/dV kernel.
fn alloc_gradients<R: CubeRuntime>(q: &CubeTensor<R>, sizes: &Sizes) -> [CubeTensor<R>; 4] {
    let Sizes {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = *sizes;
    let dtype = q.dtype;
    [
        alloc_contiguous(q, Shape::new([batch, heads, seq_q, dim]), dtype),
        alloc_contiguous(q, Shape::new([batch, kv_heads, seq_k, dim]), dtype),
        alloc_contiguous(q, Shape::new([batch, kv_heads, seq_k, value_dim]), dtype),
        alloc_contiguous(q, Shape::new([batch, heads, seq_q]), DType::F32),
    ]
}

/// The checks both backward launchers share: dtypes (q, k, v, out and d_out in one of
/// f32, f16, bf16; lse in f32) and shapes (see [`flash_backward_unit`]). Returns the
/// sizes.
fn check_inputs<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
    out: &CubeTensor<R>,
    lse: &CubeTensor<R>,
    d_out: &CubeTensor<R>,
) -> Result<Sizes, Unsupported> {
    check_dtypes(q, k, v)?;
    if out.dtype != q.dtype || d_out.dtype != q.dtype || lse.dtype != DType::F32 {
        return Err(Unsupported::DType(format!(
            "out {:?}, d_out {:?}, lse {:?} with q {:?} (need out and d_out in the input \
             dtype, lse in f32)",
            out.dtype, d_out.dtype, lse.dtype, q.dtype
        )));
    }
    let sizes = Sizes::check(q, k, v)?;
    let Sizes {
        batch,
        heads,
        seq_q,
        value_dim,
        ..
    } = sizes;
    let row_shape = [batch, heads, seq_q, value_dim];
    // q, k and v agree (Sizes::check); out, d_out and lse must follow q.
    let shapes_ok = dims4(out) == row_shape
        && dims4(d_out) == row_shape
        && lse.meta.shape().as_slice() == [batch, heads, seq_q];
    if !shapes_ok {
        return Err(Unsupported::Size(format!(
            "q {:?}, k {:?}, v {:?}, out {:?}, lse {:?}, d_out {:?} do not match",
            q.meta.shape(),
            k.meta.shape(),
            v.meta.shape(),
            out.meta.shape(),
            lse.meta.shape(),
            d_out.meta.shape()
        )));
    }
    Ok(sizes)
}

/// Loop iterations of one unit of either portable backward kernel, the larger, as llvmpipe
/// counts them (every loop once more than its trips: the exit test; the register-tile loops
/// are unrolled and count nothing).
/// - dQ kernel, per cube of query rows: Q and dO staging, the D loop (a value-dim loop per
///   row the unit takes), then per key tile V staging, the `dP` product over the value
///   dim, K staging, the `S` product over the head dim, the `dQ` product over the keys and
///   the tile loop.
/// - dK/dV kernel, per cube of keys: K and V staging, then per query head and query tile Q
///   and dO staging, the lse/D loop, the `S^T` and `dP^T` products, the `dV` and `dK`
///   products over the tile's rows and the tile loop.
fn backward_loop_iterations(
    sizes: &Sizes,
    group: usize,
    band: BandArgs,
    dq: &UnitTiles,
    kv: &UnitTiles,
) -> usize {
    let Sizes {
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = *sizes;
    let rows_per_unit = |t: &UnitTiles| t.rows.div_ceil(t.units());
    let dq_prologue = dq.staging_loop(dq.rows, dim)
        + dq.staging_loop(dq.rows, value_dim)
        + rows_per_unit(dq) * (value_dim + 1)
        + rows_per_unit(dq)
        + 1;
    let dq_tile = dq.staging_loop(dq.cols, value_dim)
        + (value_dim + 1)
        + dq.staging_loop(dq.cols, dim)
        + (dim + 1)
        + (dq.cols + 1)
        + 1;
    let dq_loops = dq_prologue + 1 + band.cube_span(dq.rows, seq_k).div_ceil(dq.cols) * dq_tile;

    let kv_prologue = kv.staging_loop(kv.rows, dim) + kv.staging_loop(kv.rows, value_dim);
    let kv_tile = kv.staging_loop(kv.cols, dim)
        + kv.staging_loop(kv.cols, value_dim)
        + kv.cols.div_ceil(kv.units())
        + 1
        + (dim + 1)
        + (value_dim + 1)
        + 2 * (kv.cols + 1)
        + 1;
    let per_head = 2 + band.cube_span(kv.rows, seq_q).div_ceil(kv.cols) * kv_tile;
    let kv_loops = kv_prologue + 1 + group * per_head;
    dq_loops.max(kv_loops)
}
