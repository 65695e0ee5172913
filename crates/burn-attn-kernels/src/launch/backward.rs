//! Launches a backward plan: the dQ kernel (which also writes `D = rowsum(dO * O)`), then
//! the dK/dV kernel.

use burn_backend::cubecl::dtype_to_elem_type;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::buffers::alloc_gradients;
use super::device::{backward_problem, device_caps};
use super::forward::{address_type, cube_count};
use crate::kernels::{
    flash_mma_backward_dkdv_kernel, flash_mma_backward_dq_kernel, flash_unit_backward_dkdv_kernel,
    flash_unit_backward_dq_kernel,
};
use crate::plan::{
    plan_backward, BackwardKernel, BackwardPlan, BandArgs, ForcedPlan, MmaBackwardPlan, Problem,
    UnitBackwardPlan, Unsupported,
};
use crate::KERNEL_SOURCE;

/// The gradients `(dq, dk, dv)` of one backward call: contiguous, in the inputs' dtype
/// (accumulated in f32), in the shapes of `q`, `k` and `v`; with GQA/MQA `dk` and `dv` sum
/// over the query heads sharing a kv head.
pub type Gradients = (CubeTensor, CubeTensor, CubeTensor);

/// The tensors of one backward call: the forward's inputs, output and row log-sum-exp (f32),
/// and the output's gradient.
pub struct BackwardInputs {
    /// `[batch, heads, seq_q, head_dim]`.
    pub q: CubeTensor,
    /// `[batch, kv_heads, seq_k, head_dim]`.
    pub k: CubeTensor,
    /// `[batch, kv_heads, seq_k, value_dim]`.
    pub v: CubeTensor,
    /// The forward's output, `[batch, heads, seq_q, value_dim]`.
    pub out: CubeTensor,
    /// The forward's row log-sum-exp, `[batch, heads, seq_q]` in f32 (`-inf` for rows that
    /// see no key: they get zero gradients).
    pub lse: CubeTensor,
    /// The gradient of `out`.
    pub d_out: CubeTensor,
}

impl BackwardInputs {
    /// The plans' view of the call.
    pub fn problem(&self, band: BandArgs) -> Result<Problem, Unsupported> {
        backward_problem(
            &self.q,
            &self.k,
            &self.v,
            &self.out,
            &self.lse,
            &self.d_out,
            band,
        )
    }
}

/// Runs `plan` (made by [`plan_backward`] for `problem`, the problem of these tensors).
/// No atomics: two runs give the same bits.
///
/// # Safety
/// The kernels launch without per-access bounds checks: `problem` must be
/// [`BackwardInputs::problem`] of `inputs` and `plan` must come from [`plan_backward`] for
/// it.
pub unsafe fn launch_backward(
    plan: &BackwardPlan,
    problem: &Problem,
    inputs: BackwardInputs,
) -> Gradients {
    let [dq, dk, dv, delta] = alloc_gradients(&inputs.q, &problem.sizes);
    let outputs = [&dq, &dk, &dv, &delta];
    match plan {
        BackwardPlan::Mma(plan) => launch_mma_backward(plan, problem, inputs, outputs),
        BackwardPlan::Unit(plan) => launch_unit_backward(plan, problem, inputs, outputs),
    }
    (dq, dk, dv)
}

/// Plans and launches `kernel` for one call, or says why it declines: for tests and
/// benchmarks that pick a kernel (the attention op's dispatch lives in `burn-attn-core`).
pub fn flash_backward_with(
    kernel: BackwardKernel,
    inputs: BackwardInputs,
    band: BandArgs,
    forced: &ForcedPlan,
) -> Result<Gradients, Unsupported> {
    let problem = inputs.problem(band)?;
    let plan = plan_backward(kernel, &problem, &device_caps(&inputs.q.client), forced)?;
    log::debug!("burn-attn: {plan:?} for {:?}", problem.sizes);
    // SAFETY: the plan and problem were made for these inputs just above.
    Ok(unsafe { launch_backward(&plan, &problem, inputs) })
}

/// Whether the dQ kernel has rows to write and the dK/dV kernel keys (with `seq_q = 0` it
/// still runs and writes zero dK and dV).
fn launches(problem: &Problem) -> (bool, bool) {
    let s = &problem.sizes;
    (!s.is_empty(), s.seq_k * s.batch * s.kv_heads > 0)
}

fn launch_unit_backward(
    plan: &UnitBackwardPlan,
    problem: &Problem,
    inputs: BackwardInputs,
    [dq, dk, dv, delta]: [&CubeTensor; 4],
) {
    let BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        d_out,
    } = inputs;
    let (sizes, band) = (&problem.sizes, &problem.band);
    let client = q.client.clone();
    let dtype = q.dtype;
    let (left, right) = (sizes.side(band.left), sizes.side(band.right));
    let (run_dq, run_kv) = launches(problem);
    let (dq_t, kv_t) = (&plan.dq_tiles, &plan.kv_tiles);
    if run_dq {
        flash_unit_backward_dq_kernel::launch(
            &client,
            cube_count(plan.dq_grid),
            CubeDim::new_1d(dq_t.units() as u32),
            address_type(plan.offsets),
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
            plan.dq_heavy_first,
            sizes.dim,
            sizes.value_dim,
            dq_t.rows,
            dq_t.cols,
            dq_t.row_threads,
            dq_t.col_threads,
            KERNEL_SOURCE,
            dtype_to_elem_type(dtype),
        );
    }
    if run_kv {
        flash_unit_backward_dkdv_kernel::launch(
            &client,
            cube_count(plan.kv_grid),
            CubeDim::new_1d(kv_t.units() as u32),
            address_type(plan.offsets),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            d_out.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            band.scale,
            left,
            right,
            plan.kv_heavy_first,
            sizes.dim,
            sizes.value_dim,
            kv_t.rows,
            kv_t.cols,
            kv_t.row_threads,
            kv_t.col_threads,
            KERNEL_SOURCE,
            dtype_to_elem_type(dtype),
        );
    }
}

fn launch_mma_backward(
    plan: &MmaBackwardPlan,
    problem: &Problem,
    inputs: BackwardInputs,
    [dq, dk, dv, delta]: [&CubeTensor; 4],
) {
    let BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        d_out,
    } = inputs;
    let (sizes, band) = (&problem.sizes, &problem.band);
    let client = q.client.clone();
    let dtype = q.dtype;
    let (left, right) = (sizes.side(band.left), sizes.side(band.right));
    let (run_dq, run_kv) = launches(problem);
    // SAFETY: every global access of both kernels is guarded by the tensors' own sizes
    // (query rows < seq_q, key rows < seq_k, columns < head/value dim; staging zero-fills
    // past them, outputs are written only inside them) and every shared-memory index is
    // bounded by the comptime tile sizes (`ldmatrix` rows stay below the cube's rows or
    // `stages * block` rows and `d_pad` columns; lse/D tiles are indexed below `stages *
    // block_q`, and `block_q` is at most the cube's 128 units, as the dK/dV kernel
    // asserts), so the runtime's per-access bounds checks are redundant. The grids match
    // the kernels' comptime plane counts. The 16-byte `cp.async` reads of the asynchronous
    // staging stay inside a row because the plan stages asynchronously only with unit
    // column strides and head/value dims that are multiples of 8.
    unsafe {
        if run_dq {
            flash_mma_backward_dq_kernel::launch_unchecked(
                &client,
                cube_count(plan.dq_grid),
                CubeDim::new_2d(32, plan.planes as u32),
                address_type(plan.offsets),
                plan.dim_vector,
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
                plan.dq_heavy_first,
                plan.dim_pad,
                plan.value_dim_pad,
                plan.planes,
                plan.dq_row_tiles,
                plan.block_k,
                plan.async_copy,
                KERNEL_SOURCE,
                dtype_to_elem_type(dtype),
            );
        }
        if run_kv {
            flash_mma_backward_dkdv_kernel::launch_unchecked(
                &client,
                cube_count(plan.kv_grid),
                CubeDim::new_2d(32, plan.planes as u32),
                address_type(plan.offsets),
                plan.dim_vector,
                plan.value_dim_vector,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                d_out.into_tensor_arg(),
                lse.into_tensor_arg(),
                delta.clone().into_tensor_arg(),
                dk.clone().into_tensor_arg(),
                dv.clone().into_tensor_arg(),
                band.scale,
                left,
                right,
                plan.kv_heavy_first,
                plan.dim_pad,
                plan.value_dim_pad,
                plan.planes,
                plan.block_q,
                plan.async_copy,
                KERNEL_SOURCE,
                dtype_to_elem_type(dtype),
            );
        }
    }
}
