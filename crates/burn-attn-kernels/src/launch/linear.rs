//! Launches passes of the chunked linear-attention kernel.

use burn_backend::cubecl::dtype_to_elem_type;
use burn_backend::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::buffers::alloc_contiguous;
use super::device::{aligned_rows, device_caps, dims4, precision_of, tensor_span};
use super::forward::address_type;
use crate::kernels::{linear_chunk_kernel, linear_chunk_mma_kernel};
use crate::plan::{
    plan_linear, LinearMode, LinearPlan, LinearSizes, Unsupported, LINEAR_MMA_PLANES,
};
use crate::KERNEL_SOURCE;

/// The f32 state of linear attention per (batch, head): `s: [batch, heads, dim, value_dim]`
/// (`sum_j b_j^T c_j`), `z: [batch, heads, dim]` (`sum_j b_j`, for the normaliser) and `x:
/// [batch, heads, value_dim]` (the per-row scalar's row, `sum_j e_j c_j`).
#[derive(Debug, Clone)]
pub struct LinearState {
    /// `sum_j b_j^T c_j`.
    pub s: CubeTensor,
    /// `sum_j b_j`.
    pub z: CubeTensor,
    /// `sum_j e_j c_j`.
    pub x: CubeTensor,
}

/// The operands of one pass (see `plan::linear`): rows `a` (read where the mode writes
/// rows), keys `b` and values `c` (read where it takes the in-chunk term or updates the
/// state), the per-row scalars `extra` (f32 `[batch, heads, rows]`, where the mode has one)
/// and the starting state.
#[derive(Debug, Clone, Default)]
pub struct LinearOperands {
    /// `[batch, ha, rows, dim]`.
    pub a: Option<CubeTensor>,
    /// `[batch, hb, rows, dim]`.
    pub b: Option<CubeTensor>,
    /// `[batch, hc, rows, value_dim]`.
    pub c: Option<CubeTensor>,
    /// `[batch, he, rows]`, f32.
    pub extra: Option<CubeTensor>,
    /// The starting state (f32).
    pub state: Option<LinearState>,
}

/// What one pass wrote: rows `[batch, heads, rows, value_dim]` (in the operands' dtype) and
/// the normaliser `[batch, heads, rows]` (f32, `den + eps`) where the mode writes rows, the
/// final state where it keeps it.
#[derive(Debug, Clone)]
pub struct LinearPassOutput {
    /// The rows.
    pub out: Option<CubeTensor>,
    /// The normaliser (with `normalise`).
    pub den: Option<CubeTensor>,
    /// The final state.
    pub state: Option<LinearState>,
}

/// Runs one pass of `mode` over `operands` with `heads` grid heads (every operand's and the
/// state's heads divide them), or says why the kernel declines. `chunk` fixes the chunk
/// length where given. With `segment_rows` (a multiple of 64), the rows run in segments
/// of that many, each from its own start state and to its own final state: the state
/// tensors then have `segments * batch` batches, segment-major.
pub fn linear_pass(
    mode: LinearMode,
    operands: LinearOperands,
    heads: usize,
    eps: f32,
    chunk: Option<usize>,
    segment_rows: Option<usize>,
) -> Result<LinearPassOutput, Unsupported> {
    if segment_rows.is_some_and(|rows| rows == 0 || !rows.is_multiple_of(64)) {
        return Err(Unsupported::Shapes(format!(
            "segments of {segment_rows:?} rows (a positive multiple of 64)"
        )));
    }
    let rows = |t: &Option<CubeTensor>| t.as_ref().map(|t| dims4(t)[2]);
    let walked = if mode.reads_rows() {
        rows(&operands.a)
    } else {
        rows(&operands.b)
    };
    let segments = match (segment_rows, walked) {
        (Some(per), Some(rows)) => rows.div_ceil(per).max(1),
        _ => 1,
    };
    if segments > u16::MAX as usize {
        return Err(Unsupported::Grid {
            x: 1,
            y: segments,
            max: u16::MAX as usize,
        });
    }
    let shapes = Shapes::of(&mode, &operands, heads, segments)?;
    let first = [&operands.a, &operands.b, &operands.c]
        .into_iter()
        .flatten()
        .next()
        .ok_or_else(|| Unsupported::Shapes("a linear pass needs a row operand".into()))?
        .clone();
    // One dtype for the operands the pass reads (an absent one stands as the first).
    let precision = precision_of(
        operands.a.as_ref().unwrap_or(&first),
        operands.b.as_ref().unwrap_or(&first),
        operands.c.as_ref().unwrap_or(&first),
    )?;
    let sizes = LinearSizes {
        batch: shapes.batch,
        heads,
        rows: shapes.rows,
        dim: shapes.dim,
        value_dim: shapes.value_dim,
        span: shapes.span,
        aligned_rows: [&operands.a, &operands.b, &operands.c]
            .into_iter()
            .flatten()
            .all(aligned_rows),
    };
    let plan = plan_linear(&sizes, &mode, precision, &device_caps(&first.client), chunk)?;
    log::debug!("burn-attn: linear pass {mode:?}, {plan:?} for {sizes:?}");
    let segment_rows = if segments > 1 {
        segment_rows.unwrap_or(sizes.rows)
    } else {
        sizes.rows.max(1)
    };
    Ok(launch_pass(
        &plan,
        &mode,
        &sizes,
        &first,
        operands,
        eps,
        segment_rows,
        segments,
    ))
}

/// The sizes a pass reads from its operands, checked against each other.
struct Shapes {
    batch: usize,
    rows: usize,
    dim: usize,
    value_dim: usize,
    span: usize,
}

impl Shapes {
    fn of(
        mode: &LinearMode,
        ops: &LinearOperands,
        heads: usize,
        segments: usize,
    ) -> Result<Self, Unsupported> {
        let bad = |what: String| Err(Unsupported::Shapes(what));
        let needed = |t: &Option<CubeTensor>, name: &str, used: bool| match (t, used) {
            (Some(t), true) => Ok(Some(dims4(t))),
            (None, true) => Err(Unsupported::Shapes(format!(
                "the pass needs operand {name}"
            ))),
            _ => Ok(None),
        };
        let a = needed(&ops.a, "a", mode.reads_rows())?;
        let b = needed(&ops.b, "b", mode.reads_keys())?;
        let c = needed(&ops.c, "c", mode.reads_keys())?;
        if mode.state_in != ops.state.is_some() {
            return bad(format!(
                "state given: {}, mode {mode:?}",
                ops.state.is_some()
            ));
        }
        if mode.reads_scalars() != ops.extra.is_some() {
            return bad(format!(
                "scalars given: {}, mode {mode:?}",
                ops.extra.is_some()
            ));
        }
        let row_ops = [a, b, c].into_iter().flatten().collect::<Vec<_>>();
        let [batch, _, rows, _] = row_ops[0];
        let dim = a.or(b).map(|s| s[3]);
        let value_dim = c.map(|s| s[3]);
        let state = ops.state.as_ref().map(|s| dims4(&s.s));
        let dim = dim.or(state.map(|s| s[2])).unwrap_or(0);
        let value_dim = value_dim.or(state.map(|s| s[3])).unwrap_or(0);
        let divides = |h: usize| h > 0 && heads.is_multiple_of(h);
        for s in &row_ops {
            if s[0] != batch || s[2] != rows || !divides(s[1]) {
                return bad(format!(
                    "operands {row_ops:?} need one batch, one length and heads dividing {heads}"
                ));
            }
        }
        if a.is_some_and(|s| s[3] != dim) || b.is_some_and(|s| s[3] != dim) {
            return bad(format!("a {a:?} and b {b:?} need one head dim"));
        }
        if let Some(st) = &ops.state {
            let (s, z, x) = (dims4(&st.s), st.z.meta.shape(), st.x.meta.shape());
            let ok = s[0] == segments * batch
                && divides(s[1])
                && s[2] == dim
                && s[3] == value_dim
                && z.as_slice() == [s[0], s[1], dim]
                && x.as_slice() == [s[0], s[1], value_dim]
                && [&st.s, &st.z, &st.x].iter().all(|t| t.dtype == DType::F32);
            if !ok {
                return bad(format!(
                    "state s {s:?}, z {z:?}, x {x:?} (f32, [{segments} x {batch}, heads dividing \
                     {heads}, {dim}, {value_dim}])"
                ));
            }
        }
        if let Some(e) = &ops.extra {
            let e_shape = e.meta.shape();
            if e_shape.len() != 3
                || e_shape[0] != batch
                || !divides(e_shape[1])
                || e_shape[2] != rows
                || e.dtype != DType::F32
            {
                return bad(format!(
                    "scalars {e_shape:?} (f32, [{batch}, heads, {rows}])"
                ));
            }
        }
        let mut widest = [batch, heads, rows, dim.max(value_dim)]
            .iter()
            .product::<usize>();
        widest = widest.max(segments * batch * heads * dim * value_dim);
        for t in [&ops.a, &ops.b, &ops.c].into_iter().flatten() {
            widest = widest.max(tensor_span(t));
        }
        Ok(Self {
            batch,
            rows,
            dim,
            value_dim,
            span: widest,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_pass(
    plan: &LinearPlan,
    mode: &LinearMode,
    sizes: &LinearSizes,
    like: &CubeTensor,
    ops: LinearOperands,
    eps: f32,
    segment_rows: usize,
    segments: usize,
) -> LinearPassOutput {
    let LinearSizes {
        batch,
        heads,
        rows,
        dim,
        value_dim,
        ..
    } = *sizes;
    let dtype = like.dtype;
    let buffer =
        |shape: &[usize], dtype: DType| alloc_contiguous(like, Shape::from(shape.to_vec()), dtype);
    // Placeholders of each rank, never read or written by a mode that does not use them.
    let rows4 = || buffer(&[1, 1, 1, 1], dtype);
    let f32_4 = || buffer(&[1, 1, 1, 1], DType::F32);
    let f32_3 = || buffer(&[1, 1, 1], DType::F32);
    let out = mode
        .outputs
        .then(|| buffer(&[batch, heads, rows, value_dim], dtype));
    let den = (mode.outputs && mode.normalise).then(|| buffer(&[batch, heads, rows], DType::F32));
    let states = segments * batch;
    let state_out = mode.state_out.then(|| LinearState {
        s: buffer(&[states, heads, dim, value_dim], DType::F32),
        z: buffer(&[states, heads, dim], DType::F32),
        x: buffer(&[states, heads, value_dim], DType::F32),
    });
    let state_in = ops.state.clone();
    let empty = batch * heads == 0 || (rows == 0 && !mode.state_out);
    if !empty {
        let client = like.client.clone();
        let tensor = |t: Option<CubeTensor>, placeholder: &dyn Fn() -> CubeTensor| {
            t.unwrap_or_else(placeholder).into_tensor_arg()
        };
        // The two kernels take the same operands; the matrix kernel's cube is four planes.
        let count = CubeCount::Static(plan.grid.x, plan.grid.y, segments as u32);
        let tensors = [
            tensor(ops.a, &rows4),
            tensor(ops.b, &rows4),
            tensor(ops.c, &rows4),
            tensor(ops.extra, &f32_3),
            tensor(state_in.as_ref().map(|s| s.s.clone()), &f32_4),
            tensor(state_in.as_ref().map(|s| s.z.clone()), &f32_3),
            tensor(state_in.as_ref().map(|s| s.x.clone()), &f32_3),
            tensor(out.clone(), &rows4),
            tensor(den.clone(), &f32_3),
            tensor(state_out.as_ref().map(|s| s.s.clone()), &f32_4),
            tensor(state_out.as_ref().map(|s| s.z.clone()), &f32_3),
            tensor(state_out.as_ref().map(|s| s.x.clone()), &f32_3),
        ];
        let [a, b, c, extra, s_in, z_in, x_in, out_arg, den_arg, s_out, z_out, x_out] = tensors;
        if plan.matrix {
            linear_chunk_mma_kernel::launch(
                &client,
                count,
                CubeDim::new_2d(32, LINEAR_MMA_PLANES as u32),
                address_type(plan.offsets),
                a,
                b,
                c,
                extra,
                s_in,
                z_in,
                x_in,
                out_arg,
                den_arg,
                s_out,
                z_out,
                x_out,
                rows as u32,
                heads as u32,
                segment_rows as u32,
                eps,
                dim,
                value_dim,
                plan.tiles,
                *mode,
                plan.async_copy,
                KERNEL_SOURCE,
                dtype_to_elem_type(dtype),
            );
        } else {
            linear_chunk_kernel::launch(
                &client,
                count,
                CubeDim::new_1d(plan.tiles.units() as u32),
                address_type(plan.offsets),
                a,
                b,
                c,
                extra,
                s_in,
                z_in,
                x_in,
                out_arg,
                den_arg,
                s_out,
                z_out,
                x_out,
                rows as u32,
                heads as u32,
                segment_rows as u32,
                eps,
                dim,
                value_dim,
                plan.tiles,
                *mode,
                KERNEL_SOURCE,
                dtype_to_elem_type(dtype),
            );
        }
    }
    LinearPassOutput {
        out,
        den,
        state: state_out,
    }
}
