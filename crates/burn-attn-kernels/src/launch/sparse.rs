//! Launches the block-sparse portable forward: the plan's tiles, the lists and rules a
//! caller built for them (burn-attn-core's `BlockMask`), checked against the call.

use burn_backend::cubecl::dtype_to_elem_type;
use burn_backend::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::buffers::{alloc_contiguous, alloc_outputs};
use super::device::{device_caps, forward_problem};
use super::forward::{address_type, cube_count, ForwardOutput};
use crate::components::element_rules::{ElementRulesLaunch, RuleSet};
use crate::kernels::flash_unit_sparse_kernel;
use crate::plan::{
    plan_forward, BandArgs, ForcedPlan, ForwardKernel, ForwardPlan, Problem, UnitPlan, Unsupported,
};
use crate::KERNEL_SOURCE;

/// The visited key blocks of each query block, on a grid of `block_q x block_k` blocks:
/// i32 tensors `[batch or 1, heads or 1, q_blocks]` (counts) and `[batch or 1, heads or 1,
/// q_blocks, k_blocks]` (block indices, the first `count` meaningful).
#[derive(Debug, Clone)]
pub struct BlockLists {
    /// Query rows per block.
    pub block_q: usize,
    /// Keys per block.
    pub block_k: usize,
    /// Partially visible key blocks per query block.
    pub partial_count: CubeTensor,
    /// Their indices.
    pub partial_index: CubeTensor,
    /// Fully visible key blocks per query block.
    pub full_count: CubeTensor,
    /// Their indices.
    pub full_index: CubeTensor,
}

/// The element rules of partially visible blocks (the scalar definition is burn-attn-core's
/// `KeyPattern::visible` with key padding and document ids).
#[derive(Debug, Clone, Default)]
pub struct SparseRules {
    /// Keys visible before the aligned position (`None`: all).
    pub left: Option<usize>,
    /// Keys visible after it (`None`: all).
    pub right: Option<usize>,
    /// Keys after the aligned position hidden, strided columns included.
    pub causal: bool,
    /// Keys `j % stride == 0` visible besides the band.
    pub stride: Option<usize>,
    /// A block layout: active flags `[q_blocks * k_blocks]` (i32, row-major), with its block
    /// rows and columns.
    pub layout: Option<(CubeTensor, usize, usize)>,
    /// Key padding `[batch, seq_k]` (i32, nonzero where hidden).
    pub padding: Option<CubeTensor>,
    /// Document ids `[batch, seq_q]` and `[batch, seq_k]` (i32).
    pub documents: Option<(CubeTensor, CubeTensor)>,
}

/// The query rows and keys of the sparse forward's tiles for `q`, `k`, `v`: build the lists
/// on blocks of these or of multiples of them.
pub fn sparse_forward_blocks(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    forced: &ForcedPlan,
) -> Result<(usize, usize), Unsupported> {
    let (plan, _) = sparse_plan(q, k, v, 1.0, forced)?;
    Ok((plan.tiles.rows, plan.tiles.cols))
}

fn sparse_plan(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    scale: f32,
    forced: &ForcedPlan,
) -> Result<(UnitPlan, Problem), Unsupported> {
    let band = BandArgs {
        scale,
        left: None,
        right: None,
    };
    let problem = forward_problem(q, k, v, band)?;
    match plan_forward(
        ForwardKernel::Unit,
        &problem,
        &device_caps(&q.client),
        forced,
    )? {
        ForwardPlan::Unit(plan) => Ok((plan, problem)),
        other => unreachable!("the portable plan is {other:?}"),
    }
}

/// The block-sparse portable forward of one call: `q`, `k`, `v` as `flash_forward_with`,
/// `lists` on blocks that [`sparse_forward_blocks`]'s tiles divide, `rules` for its partial
/// blocks.
///
/// # Errors
/// When the portable plan declines the call, or the lists or rule tensors do not fit it
/// (grid, shapes, i32 dtype), naming the values.
pub fn flash_forward_sparse(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    scale: f32,
    lists: &BlockLists,
    rules: &SparseRules,
    forced: &ForcedPlan,
) -> Result<ForwardOutput, Unsupported> {
    let (plan, problem) = sparse_plan(&q, &k, &v, scale, forced)?;
    let sizes = problem.sizes;
    let tiles = plan.tiles;
    if lists.block_q == 0
        || lists.block_k == 0
        || !lists.block_q.is_multiple_of(tiles.rows)
        || !lists.block_k.is_multiple_of(tiles.cols)
    {
        return Err(Unsupported::Shapes(format!(
            "block lists on {} x {} blocks; the portable plan takes {} x {} tiles, which must \
             divide them",
            lists.block_q, lists.block_k, tiles.rows, tiles.cols
        )));
    }
    let (q_blocks, k_blocks) = (
        sizes.seq_q.div_ceil(lists.block_q),
        sizes.seq_k.div_ceil(lists.block_k),
    );
    let fits = |t: &CubeTensor, last: &[usize]| {
        let dims = t.meta.shape().as_slice().to_vec();
        t.dtype == DType::I32
            && dims.len() == 2 + last.len()
            && (dims[0] == 1 || dims[0] == sizes.batch)
            && (dims[1] == 1 || dims[1] == sizes.heads)
            && dims[2..] == *last
    };
    for (name, t, last) in [
        ("partial_count", &lists.partial_count, &[q_blocks][..]),
        (
            "partial_index",
            &lists.partial_index,
            &[q_blocks, k_blocks][..],
        ),
        ("full_count", &lists.full_count, &[q_blocks][..]),
        ("full_index", &lists.full_index, &[q_blocks, k_blocks][..]),
    ] {
        if !fits(t, last) {
            return Err(Unsupported::Shapes(format!(
                "{name} is {:?} {:?}; expected i32 [batch or 1, heads or 1, {last:?}] for \
                 batch {}, heads {}",
                t.dtype,
                t.meta.shape().as_slice(),
                sizes.batch,
                sizes.heads
            )));
        }
    }
    let i32_rows = |name: &str, t: &CubeTensor, rows: usize, cols: usize| {
        let dims = t.meta.shape().as_slice().to_vec();
        if t.dtype != DType::I32 || dims != [rows, cols] {
            return Err(Unsupported::Shapes(format!(
                "{name} is {:?} {dims:?}; expected i32 [{rows}, {cols}]",
                t.dtype
            )));
        }
        Ok(())
    };
    if let Some(pad) = &rules.padding {
        i32_rows("key padding", pad, sizes.batch, sizes.seq_k)?;
    }
    if let Some((dq, dk)) = &rules.documents {
        i32_rows("query document ids", dq, sizes.batch, sizes.seq_q)?;
        i32_rows("key document ids", dk, sizes.batch, sizes.seq_k)?;
    }
    let mut layout_blocks = (1, 1, 1);
    if let Some((active, lq, lk)) = &rules.layout {
        let (rows, cols) = (sizes.seq_q.div_ceil(*lq), sizes.seq_k.div_ceil(*lk));
        // Row-major active flags, flat (a leading 1 is the same buffer).
        let (n, dims) = (rows * cols, active.meta.shape().as_slice().to_vec());
        if active.dtype != DType::I32 || (dims != [n] && dims != [1, n]) {
            return Err(Unsupported::Shapes(format!(
                "block layout is {:?} {dims:?}; expected i32 [{n}] ({rows} x {cols} blocks of \
                 {lq} x {lk})",
                active.dtype
            )));
        }
        layout_blocks = (*lq as u32, *lk as u32, cols as u32);
    }
    if rules.stride == Some(0) {
        return Err(Unsupported::Shapes("a stride of 0".into()));
    }

    let (out, lse) = alloc_outputs(&q, &sizes);
    if sizes.is_empty() {
        return Ok((out, lse));
    }
    let set = RuleSet {
        stride: rules.stride.is_some(),
        layout: rules.layout.is_some(),
        padding: rules.padding.is_some(),
        documents: rules.documents.is_some(),
    };
    // Rule tensors a call does not have: a 1-element placeholder the kernel never reads.
    let placeholder = alloc_contiguous(&q, Shape::new([1]), DType::I32);
    let or_placeholder = |t: Option<&CubeTensor>| t.cloned().unwrap_or_else(|| placeholder.clone());
    let documents = rules.documents.as_ref();
    let element_rules = ElementRulesLaunch::new(
        sizes.seq_k as i32 - sizes.seq_q as i32,
        sizes.side(rules.left),
        sizes.side(rules.right),
        if rules.causal { 0 } else { sizes.side(None) },
        rules.stride.map_or(0, |s| s.min(i32::MAX as usize) as i32),
        layout_blocks.0,
        layout_blocks.1,
        layout_blocks.2,
    );
    let dtype = q.dtype;
    flash_unit_sparse_kernel::launch(
        &q.client.clone(),
        cube_count(plan.grid),
        CubeDim::new_1d(tiles.units() as u32),
        address_type(plan.offsets),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        lists.partial_count.clone().into_tensor_arg(),
        lists.partial_index.clone().into_tensor_arg(),
        lists.full_count.clone().into_tensor_arg(),
        lists.full_index.clone().into_tensor_arg(),
        or_placeholder(rules.layout.as_ref().map(|l| &l.0)).into_tensor_arg(),
        or_placeholder(rules.padding.as_ref()).into_tensor_arg(),
        or_placeholder(documents.map(|d| &d.0)).into_tensor_arg(),
        or_placeholder(documents.map(|d| &d.1)).into_tensor_arg(),
        element_rules,
        (lists.block_q / tiles.rows) as u32,
        (lists.block_k / tiles.cols) as u32,
        scale,
        f32::NEG_INFINITY,
        set,
        sizes.dim,
        sizes.value_dim,
        tiles.rows,
        tiles.cols,
        tiles.row_threads,
        tiles.col_threads,
        KERNEL_SOURCE,
        dtype_to_elem_type(dtype),
    );
    Ok((out, lse))
}
