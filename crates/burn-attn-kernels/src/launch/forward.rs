//! Launches a forward plan.

use burn_backend::cubecl::dtype_to_elem_type;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::buffers::alloc_outputs;
use super::device::{device_caps, forward_problem};
use crate::components::products::{ForwardProducts, Ldmatrix16, Tf32Lanes};
use crate::kernels::{flash_mma_kernel, flash_unit_kernel, merge_key_splits_kernel};
use crate::plan::{
    plan_forward, BandArgs, ForcedPlan, ForwardKernel, ForwardPlan, Grid, MmaPlan, Offsets,
    Problem, Sizes, UnitPlan, Unsupported,
};
use crate::KERNEL_SOURCE;

/// The forward's output `[batch, heads, seq_q, value_dim]` (input dtype) and row
/// log-sum-exp `[batch, heads, seq_q]` (f32; `-inf` with a zero output row where no key is
/// visible).
pub type ForwardOutput = (CubeTensor, CubeTensor);

pub(crate) fn cube_count(grid: Grid) -> CubeCount {
    CubeCount::Static(grid.x, grid.y, 1)
}

/// CubeCL's address type for the plan's offset width.
pub(crate) fn address_type(offsets: Offsets) -> AddressType {
    match offsets {
        Offsets::U32 => AddressType::U32,
        Offsets::U64 => AddressType::U64,
    }
}

/// Runs `plan` (made by [`plan_forward`] for `problem`, the problem of these tensors).
///
/// # Safety
/// The kernels launch without per-access bounds checks: `problem` must be
/// [`forward_problem`](super::forward_problem) of `q`, `k`, `v` (sizes, and whether their
/// rows allow 16-byte copies) and `plan` must come from [`plan_forward`] for it.
pub unsafe fn launch_forward(
    plan: &ForwardPlan,
    problem: &Problem,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
) -> ForwardOutput {
    let (out, lse) = alloc_outputs(&q, &problem.sizes);
    if problem.sizes.is_empty() {
        return (out, lse);
    }
    match plan {
        ForwardPlan::Mma(plan) => launch_mma::<Ldmatrix16>(plan, problem, q, k, v, &out, &lse),
        ForwardPlan::Tf32(plan) => launch_mma::<Tf32Lanes>(plan, problem, q, k, v, &out, &lse),
        ForwardPlan::Unit(plan) => launch_unit(plan, problem, q, k, v, &out, &lse),
    }
    (out, lse)
}

/// Plans and launches `kernel` for one call, or says why it declines: for tests and
/// benchmarks that pick a kernel (the attention op's dispatch lives in `burn-attn-core`).
pub fn flash_forward_with(
    kernel: ForwardKernel,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    band: BandArgs,
    forced: &ForcedPlan,
) -> Result<ForwardOutput, Unsupported> {
    let problem = forward_problem(&q, &k, &v, band)?;
    let plan = plan_forward(kernel, &problem, &device_caps(&q.client), forced)?;
    log::debug!("burn-attn: {plan:?} for {:?}", problem.sizes);
    // SAFETY: the plan and problem were made for these tensors just above.
    Ok(unsafe { launch_forward(&plan, &problem, q, k, v) })
}

fn launch_unit(
    plan: &UnitPlan,
    problem: &Problem,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    out: &CubeTensor,
    lse: &CubeTensor,
) {
    let (sizes, band, tiles) = (&problem.sizes, &problem.band, &plan.tiles);
    let dtype = q.dtype;
    let client = q.client.clone();
    let splits = plan.key_splits;
    let (parts, part_lse) = split_outputs(&q, sizes, out, lse, splits);
    let Grid { x, y } = plan.grid;
    flash_unit_kernel::launch(
        &client,
        CubeCount::Static(x, y, splits as u32),
        CubeDim::new_1d(tiles.units() as u32),
        address_type(plan.offsets),
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        parts.clone().into_tensor_arg(),
        part_lse.clone().into_tensor_arg(),
        band.scale,
        sizes.side(band.left),
        sizes.side(band.right),
        plan.heavy_first,
        f32::NEG_INFINITY,
        plan.split_keys.min(i32::MAX as usize) as i32,
        sizes.dim,
        sizes.value_dim,
        tiles.rows,
        tiles.cols,
        tiles.row_threads,
        tiles.col_threads,
        KERNEL_SOURCE,
        dtype_to_elem_type(dtype),
    );
    merge_splits(
        &client,
        plan.offsets,
        sizes,
        [parts, part_lse],
        [out, lse],
        splits,
    );
}

/// Where a forward with `splits` key splits writes: `out` and `lse` themselves, or partial
/// outputs of `splits * batch` rows' batches (split-major) for [`merge_splits`].
fn split_outputs(
    q: &CubeTensor,
    sizes: &Sizes,
    out: &CubeTensor,
    lse: &CubeTensor,
    splits: usize,
) -> (CubeTensor, CubeTensor) {
    if splits > 1 {
        let split_sizes = Sizes {
            batch: splits * sizes.batch,
            ..*sizes
        };
        alloc_outputs(q, &split_sizes)
    } else {
        (out.clone(), lse.clone())
    }
}

/// Merges the partial outputs of [`split_outputs`] into `out` and `lse` by their
/// log-sum-exp (nothing to do with one split).
fn merge_splits(
    client: &cubecl::client::Client,
    offsets: Offsets,
    sizes: &Sizes,
    [parts, part_lse]: [CubeTensor; 2],
    [out, lse]: [&CubeTensor; 2],
    splits: usize,
) {
    if splits <= 1 {
        return;
    }
    let elements = (sizes.batch * sizes.heads * sizes.seq_q * sizes.value_dim) as u32;
    let units = 256u32;
    merge_key_splits_kernel::launch(
        client,
        CubeCount::Static(elements.div_ceil(units), 1, 1),
        CubeDim::new_1d(units),
        address_type(offsets),
        parts.into_tensor_arg(),
        part_lse.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        splits as u32,
        f32::NEG_INFINITY,
        dtype_to_elem_type(out.dtype),
    );
}

/// Launches the matrix-unit forward with the products `P` (the plan's dtype family).
#[allow(clippy::too_many_arguments)]
fn launch_mma<P: ForwardProducts>(
    plan: &MmaPlan,
    problem: &Problem,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    out: &CubeTensor,
    lse: &CubeTensor,
) {
    let (sizes, band) = (&problem.sizes, &problem.band);
    let client = q.client.clone();
    let dtype = q.dtype;
    let splits = plan.key_splits;
    let (parts, part_lse) = split_outputs(&q, sizes, out, lse, splits);
    let Grid { x, y } = plan.grid;
    // Shared-memory rows are padded by 16 bytes, and `cp.async` copies 16 bytes.
    let row_pad = 16 / dtype.size();
    // SAFETY: every global access of the kernel is guarded by the tensor's own sizes (rows
    // < seq_q, keys < seq_k, columns < head/value dim) and shared-memory indices are bounded
    // by the comptime tile sizes, so the runtime's per-access bounds checks are redundant.
    // The 16-byte `cp.async` reads stay inside a row because the plan stages asynchronously
    // only with unit column strides and head/value dims that are multiples of 16 bytes; the
    // output's `N`-value stores likewise, `out` being contiguous and `N` dividing its rows.
    unsafe {
        flash_mma_kernel::launch_unchecked::<P>(
            &client,
            CubeCount::Static(x, y, splits as u32),
            CubeDim::new_2d(32, plan.planes as u32),
            address_type(plan.offsets),
            plan.out_vector,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            parts.clone().into_tensor_arg(),
            part_lse.clone().into_tensor_arg(),
            band.scale,
            sizes.side(band.left),
            sizes.side(band.right),
            plan.heavy_first,
            f32::NEG_INFINITY,
            plan.split_keys.min(i32::MAX as usize) as i32,
            plan.dim_pad,
            plan.value_dim_pad,
            plan.planes,
            plan.row_tiles,
            plan.block_k,
            row_pad,
            plan.async_copy,
            KERNEL_SOURCE,
            dtype_to_elem_type(dtype),
        );
    }
    merge_splits(
        &client,
        plan.offsets,
        sizes,
        [parts, part_lse],
        [out, lse],
        splits,
    );
}
