//! Host-side launcher of the portable backward kernels (`flash_unit_backward.rs`).

use burn_backend::{DType, Shape};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use crate::flash_unit_backward::{flash_unit_backward_dkdv_kernel, flash_unit_backward_dq_kernel};
use crate::launch::{
    alloc_contiguous, check_dtypes, cube_grid, dims4, is_software_wgpu, trace, BandArgs, Sizes,
    Unsupported,
};

/// The gradients `(dq, dk, dv)` of one backward call.
pub type Gradients<R> = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>);

/// Units per cube of both backward kernels: query rows of the dQ kernel, key rows of the
/// dK/dV kernel.
const BACKWARD_UNITS: usize = 32;

/// Loop iterations one invocation may run on llvmpipe/lavapipe: its compiled shaders count
/// every loop back-edge against one budget per invocation (`LP_MAX_TGSI_LOOP_ITERATIONS`,
/// "shared between every loop") and silently leave all loops once it is spent.
const SOFTWARE_LOOP_BUDGET: usize = 65535;

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
/// gradients); about 160 visible keys, or query rows times query heads per kv head, at
/// head dim 128. `BURN_ATTN_UNIT_NO_CAP=1` lifts that cap, for diagnosis.
pub fn flash_backward_unit<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    d_out: CubeTensor<R>,
    band: BandArgs,
) -> Result<Gradients<R>, Unsupported> {
    check_dtypes(&q, &k, &v)?;
    if out.dtype != q.dtype || d_out.dtype != q.dtype || lse.dtype != DType::F32 {
        return Err(Unsupported::DType(format!(
            "out {:?}, d_out {:?}, lse {:?} with q {:?} (need out and d_out in the input \
             dtype, lse in f32)",
            out.dtype, d_out.dtype, lse.dtype, q.dtype
        )));
    }
    let sizes = Sizes::check(&q, &k, &v)?;
    let Sizes {
        batch,
        heads,
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = sizes;
    let kv_heads = dims4(&k)[1];
    let row_shape = [batch, heads, seq_q, value_dim];
    let shapes_ok = kv_heads > 0
        && heads % kv_heads == 0
        && dims4(&k) == [batch, kv_heads, seq_k, dim]
        && dims4(&v) == [batch, kv_heads, seq_k, value_dim]
        && dims4(&out) == row_shape
        && dims4(&d_out) == row_shape
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

    let dq_grid = sizes.grid(BACKWARD_UNITS)?;
    let kv_grid = cube_grid(seq_k, BACKWARD_UNITS, batch * kv_heads, "batch*kv_heads")?;

    let client = q.client.clone();
    let dtype = q.dtype;
    let elem = dtype.size();
    let shared = client.properties().hardware.max_shared_memory_size;
    // dQ kernel: a K and a V tile of `block_k` keys; dK/dV kernel: a Q and a dO tile of
    // `block_q` rows plus their lse and D. The largest that fits.
    let tile_rows = |extra: usize| {
        [32usize, 16, 8, 4]
            .into_iter()
            .find(|n| n * ((dim + value_dim) * elem + extra) <= shared)
            .ok_or_else(|| {
                Unsupported::SharedMemory(format!(
                    "{shared} bytes for head_dim {dim}, value_dim {value_dim}"
                ))
            })
    };
    let block_k = tile_rows(0)?;
    let block_q = tile_rows(8)?;

    // llvmpipe ends every loop of an invocation past its iteration budget, which gives wrong
    // gradients with no error: decline what could reach it on software adapters.
    let no_cap = std::env::var("BURN_ATTN_UNIT_NO_CAP").is_ok_and(|v| v == "1");
    if !no_cap && is_software_wgpu(&q.client) {
        let loops = loop_iterations(&sizes, heads / kv_heads, band, block_k, block_q);
        // A small margin for the few iterations the estimate leaves out.
        if loops + 256 > SOFTWARE_LOOP_BUDGET {
            return Err(Unsupported::Size(format!(
                "up to {loops} loop iterations per unit on a software adapter (llvmpipe ends \
                 loops past {SOFTWARE_LOOP_BUDGET}): seq_q {seq_q}, seq_k {seq_k}, head_dim \
                 {dim}, value_dim {value_dim}, {} query heads per kv head",
                heads / kv_heads
            )));
        }
    }

    let dq = alloc_contiguous(&q, Shape::new([batch, heads, seq_q, dim]), dtype);
    let dk = alloc_contiguous(&q, Shape::new([batch, kv_heads, seq_k, dim]), dtype);
    let dv = alloc_contiguous(&q, Shape::new([batch, kv_heads, seq_k, value_dim]), dtype);
    let delta = alloc_contiguous(&q, Shape::new([batch, heads, seq_q]), DType::F32);
    let left = sizes.side(band.left);
    let right = sizes.side(band.right);

    if !sizes.is_empty() {
        flash_unit_backward_dq_kernel::launch::<R>(
            &client,
            dq_grid,
            CubeDim::new_1d(BACKWARD_UNITS as u32),
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
            dim,
            value_dim,
            BACKWARD_UNITS,
            block_k,
            dtype.into(),
        );
    }
    // With seq_q = 0 this still runs and writes zero dK and dV.
    if seq_k * batch * kv_heads > 0 {
        flash_unit_backward_dkdv_kernel::launch::<R>(
            &client,
            kv_grid,
            CubeDim::new_1d(BACKWARD_UNITS as u32),
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
            dim,
            value_dim,
            BACKWARD_UNITS,
            block_q,
            dtype.into(),
        );
    }
    Ok((dq, dk, dv))
}

/// The best backward kernel for the call (today the portable one), saying with
/// `BURN_ATTN_TRACE=1` which ran or why it declined. `Err` when none takes the call.
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
    let done = flash_backward_unit(q, k, v, out, lse, d_out, band);
    match &done {
        Ok(_) => trace(|| format!("flash_unit_backward for q {shape:?}")),
        Err(why) => trace(|| format!("flash_unit_backward declined: {why}")),
    }
    done
}

/// An estimate, from above, of the loop iterations of one unit of either backward kernel
/// as llvmpipe counts them (every back-edge of every loop). Rows (keys) in a cube's range
/// cost their three inner loops in full; padding rows of a tile cost a few iterations, as
/// masked-off loops end at once. Loops the shader compiler unrolls (small head dims)
/// lower the real count. Checked on lavapipe at head dims 64 and 128: 160 keys or rows
/// per unit pass, 192 fail (both sides of this estimate).
fn loop_iterations(
    sizes: &Sizes,
    group: usize,
    band: BandArgs,
    block_k: usize,
    block_q: usize,
) -> usize {
    let Sizes {
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = *sizes;
    let units = BACKWARD_UNITS;
    // Rows (keys) a cube of `units` consecutive keys (rows) can see: `left + right + units`.
    let width = |n: usize| match (band.left, band.right) {
        (Some(l), Some(r)) => (l + r + units).min(n),
        _ => n,
    };
    let per_row = 1 + 2 * dim + value_dim;
    let staging = |rows: usize| (rows * dim).div_ceil(units) + (rows * value_dim).div_ceil(units);
    // dQ kernel: the keys of its cube, in tiles of block_k.
    let keys = width(seq_k);
    let dq = 2 * dim
        + value_dim
        + keys.div_ceil(block_k) * (1 + staging(block_k) + 4 * block_k)
        + keys * per_row;
    // dK/dV kernel: the query rows of its cube, in tiles of block_q, per query head.
    let rows = width(seq_q);
    let per_head = 1
        + rows.div_ceil(block_q)
            * (1 + staging(block_q) + 2 * block_q.div_ceil(units) + 4 * block_q)
        + rows * per_row;
    let dkdv = 2 * (dim + value_dim) + group * per_head;
    dq.max(dkdv)
}
