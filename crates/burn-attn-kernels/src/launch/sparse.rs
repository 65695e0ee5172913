//! Launches the block-sparse kernels, forward and backward (matrix units where the plans
//! take the call, portable otherwise): the plans' tiles, the lists and rules a caller built
//! for them (burn-attn-core's `BlockMask`), checked against the call.

use burn_backend::cubecl::dtype_to_elem_type;
use burn_backend::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::backward::{BackwardInputs, Gradients};
use super::buffers::{alloc_contiguous, alloc_gradients, alloc_outputs};
use super::device::{device_caps, forward_problem, tensor_span};
use super::forward::{address_type, cube_count, ForwardOutput};
use crate::components::element_rules::{ElementRulesLaunch, RuleSet};
use crate::components::products::Ldmatrix16;
use crate::kernels::{
    flash_mma_sparse_backward_dkdv_kernel, flash_mma_sparse_backward_dq_kernel,
    flash_mma_sparse_kernel, flash_unit_sparse_backward_dkdv_kernel,
    flash_unit_sparse_backward_dq_kernel, flash_unit_sparse_kernel,
};
use crate::plan::{
    dropout_threshold, plan_sparse, BackwardKernel, BandArgs, ForcedPlan, MmaBackwardPlan, Problem,
    Sizes, SparseBackward, SparseForward, SparsePlan, UnitBackwardPlan, Unsupported,
    MMA_ROWS_PER_TILE,
};
use crate::KERNEL_SOURCE;

/// The visited key blocks of each query block, on a grid of `block_q x block_k` blocks:
/// i32 tensors `[batch or 1, heads or 1, q_blocks]` (counts) and `[batch or 1, heads or 1,
/// q_blocks, k_blocks]` (block indices, the first `count` meaningful); and transposed, the
/// query blocks that visit each key block (`[.., k_blocks]`, `[.., k_blocks, q_blocks]`),
/// which only the backward reads.
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
    /// Query blocks that see each key block partially.
    pub t_partial_count: CubeTensor,
    /// Their indices.
    pub t_partial_index: CubeTensor,
    /// Query blocks that see each key block whole.
    pub t_full_count: CubeTensor,
    /// Their indices.
    pub t_full_index: CubeTensor,
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
    /// Attention dropout: the probability of dropping (in `(0, 1)`) and a 1-element i32
    /// seed tensor (forward and backward must get the same seed).
    pub dropout: Option<(f64, CubeTensor)>,
    /// A dense mask `[batch, seq_q, seq_k]` (i32, nonzero where hidden).
    pub dense: Option<CubeTensor>,
    /// A score bias per key, `[batch or 1, heads or 1, seq_k]` (f32), added to the scaled
    /// scores of every visible element; the backward returns its gradient.
    pub key_bias: Option<CubeTensor>,
    /// A soft window edge: each query's reach `[batch or 1, heads or 1, seq_q]` (f32) and
    /// the ramp width (keys, positive). Key `j` of query `i` has weight `clamp((reach_i -
    /// |j - (i + seq_k - seq_q)|) / ramp + 1/2, 0, 1)`: `ln(weight)` adds to its score, and
    /// a weight of 0 hides it. The backward returns the reach's gradient.
    pub soft_edge: Option<(CubeTensor, f32)>,
    /// ALiBi slopes, one per query head: `-slope_h * |j - (i + seq_k - seq_q)|` adds to the
    /// scaled scores (a constant: no gradient).
    pub alibi: Option<Vec<f32>>,
    /// A tanh softcap: the scaled scores become `softcap * tanh(s / softcap)` before the
    /// other terms (finite, positive).
    pub softcap: Option<f32>,
}

/// The gradients of a block-sparse call: `(dq, dk, dv)`, and where the call has them, the
/// key bias's and the reach's (f32, `[batch, heads, seq_k]` and `[batch, heads, seq_q]`,
/// per query head: sum over a broadcast dimension).
#[derive(Debug, Clone)]
pub struct SparseGradients {
    /// Query, key and value gradients.
    pub qkv: Gradients,
    /// The key bias's gradient.
    pub key_bias: Option<CubeTensor>,
    /// The reach's gradient.
    pub reach: Option<CubeTensor>,
    /// The kernels that computed them.
    pub kernel: BackwardKernel,
}

/// The smallest block sizes `(block_q, block_k)` a block-sparse call of `q`, `k`, `v` can
/// take lists on (multiples of these serve too): [`plan_sparse`]'s grid.
pub fn sparse_blocks(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    forced: &ForcedPlan,
) -> Result<(usize, usize), Unsupported> {
    let (plan, _) = sparse_plan(q, k, v, 1.0, None, forced)?;
    Ok((plan.block_q, plan.block_k))
}

/// The problem of a call (no band: the rules carry it) and its plan.
fn sparse_plan(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    scale: f32,
    call: Option<(&BlockLists, &SparseRules)>,
    forced: &ForcedPlan,
) -> Result<(SparsePlan, Problem), Unsupported> {
    let band = BandArgs {
        scale,
        left: None,
        right: None,
    };
    let mut problem = forward_problem(q, k, v, band)?;
    if let Some((lists, rules)) = call {
        // The lists and rule tensors are indexed with the same offsets.
        problem.span = problem.span.max(rule_span(lists, rules, &problem.sizes));
    }
    let plan = plan_sparse(&problem, &device_caps(&q.client), forced)?;
    Ok((plan, problem))
}

/// The rule tensors and launch values of one call, checked against its sizes; absent
/// tensors are 1-element placeholders the kernels never read.
struct RuleArgs {
    set: RuleSet,
    /// `ElementRules`' values: offset, left, right, causal right, stride; layout rows,
    /// columns and key blocks.
    positions: [i32; 5],
    layout_blocks: (u32, u32, u32),
    /// Dropout's threshold and keep scale.
    dropout: (u32, f32),
    heads: u32,
    layout: CubeTensor,
    padding: CubeTensor,
    doc_q: CubeTensor,
    doc_k: CubeTensor,
    dense: CubeTensor,
    seed: CubeTensor,
    /// f32 score terms (placeholders where absent) and the ramp.
    key_bias: CubeTensor,
    reach: CubeTensor,
    slopes: CubeTensor,
    ramp: f32,
    softcap: f32,
}

impl RuleArgs {
    fn new(rules: &SparseRules, sizes: &Sizes, like: &CubeTensor) -> Result<Self, Unsupported> {
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
        if let Some(dense) = &rules.dense {
            let dims = dense.meta.shape().as_slice().to_vec();
            if dense.dtype != DType::I32 || dims != [sizes.batch, sizes.seq_q, sizes.seq_k] {
                return Err(Unsupported::Shapes(format!(
                    "dense mask is {:?} {dims:?}; expected i32 [{}, {}, {}]",
                    dense.dtype, sizes.batch, sizes.seq_q, sizes.seq_k
                )));
            }
        }
        let mut layout_blocks = (1, 1, 1);
        if let Some((active, lq, lk)) = &rules.layout {
            // Blocks past the sequence are the sequence's own size (one block).
            let fit = |block: usize, n: usize| (block > 0).then(|| block.min(n.max(1)));
            let (Some(lq), Some(lk)) = (fit(*lq, sizes.seq_q), fit(*lk, sizes.seq_k)) else {
                return Err(Unsupported::Shapes(format!(
                    "block layout of {lq} x {lk} blocks (takes sizes of at least 1)"
                )));
            };
            let (lq, lk) = (&lq, &lk);
            let (rows, cols) = (sizes.seq_q.div_ceil(*lq), sizes.seq_k.div_ceil(*lk));
            // Row-major active flags, flat (a leading 1 is the same buffer).
            let (n, dims) = (rows * cols, active.meta.shape().as_slice().to_vec());
            if active.dtype != DType::I32 || (dims != [n] && dims != [1, n]) {
                return Err(Unsupported::Shapes(format!(
                    "block layout is {:?} {dims:?}; expected i32 [{n}] ({rows} x {cols} blocks \
                     of {lq} x {lk})",
                    active.dtype
                )));
            }
            layout_blocks = (*lq as u32, *lk as u32, cols as u32);
        }
        if rules.stride == Some(0) {
            return Err(Unsupported::Shapes("a stride of 0".into()));
        }
        let mut dropout = (0, 1.0);
        if let Some((p, seed)) = &rules.dropout {
            if !(*p > 0.0 && *p < 1.0) {
                return Err(Unsupported::Shapes(format!(
                    "dropout {p} (takes 0 < p < 1)"
                )));
            }
            let dims = seed.meta.shape().as_slice().to_vec();
            if seed.dtype != DType::I32 || dims != [1] {
                return Err(Unsupported::Shapes(format!(
                    "dropout seed is {:?} {dims:?}; expected i32 [1]",
                    seed.dtype
                )));
            }
            dropout = (dropout_threshold(*p), (1.0 / (1.0 - p)) as f32);
        }
        let term = |name: &str, t: &CubeTensor, positions: usize| {
            let dims = t.meta.shape().as_slice().to_vec();
            let fits = dims.len() == 3
                && (dims[0] == 1 || dims[0] == sizes.batch)
                && (dims[1] == 1 || dims[1] == sizes.heads)
                && dims[2] == positions;
            if t.dtype != DType::F32 || !fits {
                return Err(Unsupported::Shapes(format!(
                    "{name} is {:?} {dims:?}; expected f32 [batch or 1, heads or 1, {positions}] \
                     for batch {}, heads {}",
                    t.dtype, sizes.batch, sizes.heads
                )));
            }
            Ok(())
        };
        if let Some(bias) = &rules.key_bias {
            term("key bias", bias, sizes.seq_k)?;
        }
        let mut ramp = 1.0;
        if let Some((reach, width)) = &rules.soft_edge {
            term("reach", reach, sizes.seq_q)?;
            if !(width.is_finite() && *width > 0.0) {
                return Err(Unsupported::Shapes(format!(
                    "soft edge ramp {width} (takes a finite width > 0)"
                )));
            }
            ramp = *width;
        }
        if let Some(cap) = rules.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(Unsupported::Shapes(format!(
                    "softcap {cap} (takes a finite value > 0)"
                )));
            }
        }
        let slopes = match &rules.alibi {
            Some(slopes) => {
                if slopes.len() != sizes.heads || slopes.iter().any(|s| !s.is_finite()) {
                    return Err(Unsupported::Shapes(format!(
                        "ALiBi slopes {slopes:?}: expected {} finite values (one per query head)",
                        sizes.heads
                    )));
                }
                let bytes: Vec<u8> = slopes.iter().flat_map(|s| s.to_le_bytes()).collect();
                let handle = like.client.create_from_slice(&bytes);
                CubeTensor::new_contiguous(
                    like.client.clone(),
                    like.device.clone(),
                    Shape::new([slopes.len()]),
                    handle,
                    DType::F32,
                )
            }
            None => alloc_contiguous(like, Shape::new([1]), DType::F32),
        };
        let placeholder = alloc_contiguous(like, Shape::new([1]), DType::I32);
        let f32_placeholder = alloc_contiguous(like, Shape::new([1, 1, 1]), DType::F32);
        let or_placeholder =
            |t: Option<&CubeTensor>| t.cloned().unwrap_or_else(|| placeholder.clone());
        let documents = rules.documents.as_ref();
        Ok(Self {
            set: RuleSet {
                stride: rules.stride.is_some(),
                layout: rules.layout.is_some(),
                padding: rules.padding.is_some(),
                documents: rules.documents.is_some(),
                dropout: rules.dropout.is_some(),
                dense: rules.dense.is_some(),
                key_bias: rules.key_bias.is_some(),
                soft_edge: rules.soft_edge.is_some(),
                alibi: rules.alibi.is_some(),
                softcap: rules.softcap.is_some(),
            },
            positions: [
                sizes.seq_k as i32 - sizes.seq_q as i32,
                sizes.side(rules.left),
                sizes.side(rules.right),
                if rules.causal { 0 } else { sizes.side(None) },
                rules.stride.map_or(0, |s| s.min(i32::MAX as usize) as i32),
            ],
            layout_blocks,
            dropout,
            heads: sizes.heads as u32,
            seed: or_placeholder(rules.dropout.as_ref().map(|d| &d.1)),
            // The kernels index the flags flat.
            layout: rules
                .layout
                .as_ref()
                .map_or_else(|| placeholder.clone(), |l| into_contiguous(l.0.clone())),
            padding: or_placeholder(rules.padding.as_ref()),
            doc_q: or_placeholder(documents.map(|d| &d.0)),
            doc_k: or_placeholder(documents.map(|d| &d.1)),
            dense: or_placeholder(rules.dense.as_ref()),
            key_bias: rules
                .key_bias
                .clone()
                .unwrap_or_else(|| f32_placeholder.clone()),
            reach: rules
                .soft_edge
                .as_ref()
                .map_or(f32_placeholder, |e| e.0.clone()),
            slopes,
            ramp,
            softcap: rules.softcap.unwrap_or(1.0),
        })
    }
}

impl RuleArgs {
    /// The kernels' `ElementRules` argument.
    fn element_rules(&self) -> ElementRulesLaunch {
        let [offset, left, right, causal_right, stride] = self.positions;
        let (rows, cols, k_blocks) = self.layout_blocks;
        let (threshold, keep_scale) = self.dropout;
        ElementRulesLaunch::new(
            offset,
            left,
            right,
            causal_right,
            stride,
            rows,
            cols,
            k_blocks,
            threshold,
            keep_scale,
            self.heads,
            self.ramp,
            self.softcap,
        )
    }
}

/// Elements spanned by the largest tensor of a call's lists and rules, and by the score
/// terms' gradients (`[batch, heads, seq]` in f32), which the plans' offset width must
/// cover beside q, k, v and the outputs.
fn rule_span(lists: &BlockLists, rules: &SparseRules, sizes: &Sizes) -> usize {
    let mut tensors = vec![
        &lists.partial_count,
        &lists.partial_index,
        &lists.full_count,
        &lists.full_index,
        &lists.t_partial_count,
        &lists.t_partial_index,
        &lists.t_full_count,
        &lists.t_full_index,
    ];
    tensors.extend(rules.layout.as_ref().map(|(t, _, _)| t));
    tensors.extend(rules.padding.as_ref());
    tensors.extend(rules.documents.iter().flat_map(|(q, k)| [q, k]));
    tensors.extend(rules.dense.as_ref());
    tensors.extend(rules.key_bias.as_ref());
    tensors.extend(rules.soft_edge.as_ref().map(|(t, _)| t));
    let grads = sizes.batch * sizes.heads * sizes.seq_q.max(sizes.seq_k);
    tensors
        .into_iter()
        .map(|t| tensor_span(t).max(t.meta.shape().iter().product()))
        .fold(grads, usize::max)
}

/// Checks that `lists` are on blocks the kernels' `tiles` (query rows x keys, per kernel)
/// divide and have the shapes of the call.
fn check_lists(
    lists: &BlockLists,
    sizes: &Sizes,
    tiles: &[(usize, usize)],
) -> Result<(), Unsupported> {
    if lists.block_q == 0
        || lists.block_k == 0
        || tiles.iter().any(|&(rows, cols)| {
            !lists.block_q.is_multiple_of(rows) || !lists.block_k.is_multiple_of(cols)
        })
    {
        return Err(Unsupported::Shapes(format!(
            "block lists on {} x {} blocks; the plans take tiles (query rows x keys) {tiles:?}, \
             which must divide them",
            lists.block_q, lists.block_k
        )));
    }
    // The kernels walk every tile of a listed block, past the sequence too (the plan's
    // blocks are its largest tile, beyond short sequences), with i32 positions: a block
    // index out of range reads as the block after the last, whose tiles end at
    // `seq.next_multiple_of(block) + block`. Blocks of more than 2^20 tiles are refused
    // too: a cube walks each tile of a listed block.
    let walkable = |n: usize, block: usize, tile: usize| {
        n.max(1)
            .next_multiple_of(block)
            .checked_add(block)
            .is_some_and(|end| end <= i32::MAX as usize)
            && block / tile <= 1 << 20
    };
    let (tile_q, tile_k) = tiles.iter().fold((usize::MAX, usize::MAX), |(q, k), t| {
        (q.min(t.0), k.min(t.1))
    });
    if !walkable(sizes.seq_q, lists.block_q, tile_q)
        || !walkable(sizes.seq_k, lists.block_k, tile_k)
    {
        return Err(Unsupported::Shapes(format!(
            "block lists on {} x {} blocks for {} x {} (query rows x keys) with tiles \
             {tiles:?}: the tiles walked must stay within i32 positions and 2^20 per block",
            lists.block_q, lists.block_k, sizes.seq_q, sizes.seq_k
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
    let (rows, pairs, cols, t_pairs) = (
        [q_blocks],
        [q_blocks, k_blocks],
        [k_blocks],
        [k_blocks, q_blocks],
    );
    for (name, t, last) in [
        ("partial_count", &lists.partial_count, &rows[..]),
        ("partial_index", &lists.partial_index, &pairs[..]),
        ("full_count", &lists.full_count, &rows[..]),
        ("full_index", &lists.full_index, &pairs[..]),
        ("t_partial_count", &lists.t_partial_count, &cols[..]),
        ("t_partial_index", &lists.t_partial_index, &t_pairs[..]),
        ("t_full_count", &lists.t_full_count, &cols[..]),
        ("t_full_index", &lists.t_full_index, &t_pairs[..]),
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
    Ok(())
}

/// The block-sparse forward of one call (`flash_mma_sparse` where the matrix-unit plan
/// takes it, `flash_unit_sparse` otherwise): `q`, `k`, `v` as `flash_forward_with`, `lists`
/// on blocks of [`sparse_blocks`] (or multiples), `rules` for its partial blocks.
///
/// # Errors
/// When the plans decline the call, or the lists or rule tensors do not fit it (grid,
/// shapes, i32 dtype), naming the values.
pub fn flash_forward_sparse(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    scale: f32,
    lists: &BlockLists,
    rules: &SparseRules,
    forced: &ForcedPlan,
) -> Result<ForwardOutput, Unsupported> {
    let (plan, problem) = sparse_plan(&q, &k, &v, scale, Some((lists, rules)), forced)?;
    let sizes = problem.sizes;
    let (tile_q, tile_k) = plan.forward.tile();
    check_lists(lists, &sizes, &[(tile_q, tile_k)])?;
    let args = RuleArgs::new(rules, &sizes, &q)?;
    let (out, lse) = alloc_outputs(&q, &sizes);
    if sizes.is_empty() {
        return Ok((out, lse));
    }
    let dtype = q.dtype;
    let element_rules = args.element_rules();
    let (q_tiles, k_tiles) = (
        (lists.block_q / tile_q) as u32,
        (lists.block_k / tile_k) as u32,
    );
    let tensor = |t: &CubeTensor| t.clone().into_tensor_arg();
    match plan.forward {
        SparseForward::Unit(plan) => {
            let tiles = plan.tiles;
            flash_unit_sparse_kernel::launch(
                &q.client.clone(),
                cube_count(plan.grid),
                CubeDim::new_1d(tiles.units() as u32),
                address_type(plan.offsets),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                tensor(&out),
                tensor(&lse),
                tensor(&lists.partial_count),
                tensor(&lists.partial_index),
                tensor(&lists.full_count),
                tensor(&lists.full_index),
                tensor(&args.layout),
                tensor(&args.padding),
                tensor(&args.doc_q),
                tensor(&args.doc_k),
                tensor(&args.dense),
                tensor(&args.seed),
                tensor(&args.key_bias),
                tensor(&args.reach),
                tensor(&args.slopes),
                element_rules,
                q_tiles,
                k_tiles,
                scale,
                f32::NEG_INFINITY,
                args.set,
                sizes.dim,
                sizes.value_dim,
                tiles.rows,
                tiles.cols,
                tiles.row_threads,
                tiles.col_threads,
                KERNEL_SOURCE,
                dtype_to_elem_type(dtype),
            );
        }
        SparseForward::Mma(plan) => {
            let client = q.client.clone();
            // SAFETY: as `flash_mma_kernel`'s launch (`launch::forward`): every global
            // access is guarded by the tensors' own sizes (rows < seq_q, keys < seq_k,
            // columns < head/value dim), shared-memory indices by the comptime tiles, and
            // the plan stages asynchronously and stores `N` values only where rows allow.
            // The lists' reads are bounded by their shapes (counts cut at the key blocks,
            // `components::key_blocks`) and checked above; the rule tensors' reads by
            // `i < seq_q`, `j < seq_k` and their checked shapes.
            unsafe {
                flash_mma_sparse_kernel::launch_unchecked::<Ldmatrix16>(
                    &client,
                    cube_count(plan.grid),
                    CubeDim::new_2d(32, plan.planes as u32),
                    address_type(plan.offsets),
                    plan.out_vector,
                    q.into_tensor_arg(),
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    tensor(&out),
                    tensor(&lse),
                    tensor(&lists.partial_count),
                    tensor(&lists.partial_index),
                    tensor(&lists.full_count),
                    tensor(&lists.full_index),
                    tensor(&args.layout),
                    tensor(&args.padding),
                    tensor(&args.doc_q),
                    tensor(&args.doc_k),
                    tensor(&args.dense),
                    tensor(&args.seed),
                    tensor(&args.key_bias),
                    tensor(&args.reach),
                    tensor(&args.slopes),
                    element_rules,
                    q_tiles,
                    k_tiles,
                    scale,
                    sizes.side(None),
                    f32::NEG_INFINITY,
                    args.set,
                    plan.dim_pad,
                    plan.value_dim_pad,
                    plan.planes,
                    plan.row_tiles,
                    plan.block_k,
                    16 / dtype.size(),
                    plan.async_copy,
                    KERNEL_SOURCE,
                    dtype_to_elem_type(dtype),
                );
            }
        }
    }
    Ok((out, lse))
}

/// The block-sparse backward of one call (`flash_mma_sparse_backward` where the
/// matrix-unit plan takes it, `flash_unit_sparse_backward` otherwise): the gradients of
/// [`flash_forward_sparse`] with the same `scale`, `lists` (their transposed lists too) and
/// `rules`, from its inputs, output, f32 lse and the output's gradient, with the score
/// terms' gradients where the call has them. No atomics: two runs give the same bits.
///
/// # Errors
/// As [`flash_forward_sparse`], and when `out`, `lse` or `d_out` do not fit the inputs.
pub fn flash_backward_sparse(
    inputs: BackwardInputs,
    scale: f32,
    lists: &BlockLists,
    rules: &SparseRules,
    forced: &ForcedPlan,
) -> Result<SparseGradients, Unsupported> {
    let band = BandArgs {
        scale,
        left: None,
        right: None,
    };
    let mut problem = inputs.problem(band)?;
    let sizes = problem.sizes;
    // The lists and rule tensors are indexed with the same offsets.
    problem.span = problem.span.max(rule_span(lists, rules, &sizes));
    let args = RuleArgs::new(rules, &sizes, &inputs.q)?;
    let plan = plan_sparse(&problem, &device_caps(&inputs.q.client), forced)?.backward;
    check_lists(lists, &sizes, &plan.tiles())?;
    let [dq, dk, dv, delta] = alloc_gradients(&inputs.q, &sizes);
    // Per query head; the kernels write every position, except in an empty call (zeros).
    let term_grad = |present: bool, positions: usize| {
        let shape = Shape::new(if present {
            [sizes.batch, sizes.heads, positions]
        } else {
            [1, 1, 1]
        });
        if sizes.is_empty() {
            let q = &inputs.q;
            zeros_client(q.client.clone(), q.device.clone(), shape, DType::F32)
        } else {
            alloc_contiguous(&inputs.q, shape, DType::F32)
        }
    };
    let outputs = SparseOutputs {
        dq: dq.clone(),
        dk: dk.clone(),
        dv: dv.clone(),
        delta,
        d_key_bias: term_grad(rules.key_bias.is_some(), sizes.seq_k),
        d_reach: term_grad(rules.soft_edge.is_some(), sizes.seq_q),
    };
    // The dQ kernel runs where there are query rows; the dK/dV kernel where there are keys
    // (with no query rows it writes zero dK and dV).
    let runs = (
        !sizes.is_empty(),
        sizes.seq_k * sizes.batch * sizes.kv_heads > 0,
    );
    let kernel = match plan {
        SparseBackward::Unit(plan) => {
            launch_unit_backward(&plan, &sizes, inputs, scale, lists, &args, &outputs, runs);
            BackwardKernel::Unit
        }
        SparseBackward::Mma(plan) => {
            launch_mma_backward(&plan, inputs, scale, lists, &args, &outputs, runs);
            BackwardKernel::Mma
        }
    };
    Ok(SparseGradients {
        qkv: (dq, dk, dv),
        key_bias: rules.key_bias.is_some().then_some(outputs.d_key_bias),
        reach: rules.soft_edge.is_some().then_some(outputs.d_reach),
        kernel,
    })
}

/// The buffers a block-sparse backward writes.
struct SparseOutputs {
    dq: CubeTensor,
    dk: CubeTensor,
    dv: CubeTensor,
    /// `D = rowsum(dO * O)`, from the dQ kernel to the dK/dV kernel.
    delta: CubeTensor,
    d_key_bias: CubeTensor,
    d_reach: CubeTensor,
}

#[allow(clippy::too_many_arguments)]
fn launch_unit_backward(
    plan: &UnitBackwardPlan,
    sizes: &Sizes,
    inputs: BackwardInputs,
    scale: f32,
    lists: &BlockLists,
    args: &RuleArgs,
    outputs: &SparseOutputs,
    (run_dq, run_kv): (bool, bool),
) {
    let BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        d_out,
    } = inputs;
    let client = q.client.clone();
    let elem = dtype_to_elem_type(q.dtype);
    let (dq_t, kv_t) = (plan.dq_tiles, plan.kv_tiles);
    let tensor = |t: &CubeTensor| t.clone().into_tensor_arg();
    if run_dq {
        flash_unit_sparse_backward_dq_kernel::launch(
            &client,
            cube_count(plan.dq_grid),
            CubeDim::new_1d(dq_t.units() as u32),
            address_type(plan.offsets),
            tensor(&q),
            tensor(&k),
            tensor(&v),
            out.into_tensor_arg(),
            tensor(&d_out),
            tensor(&lse),
            tensor(&outputs.dq),
            tensor(&outputs.delta),
            tensor(&lists.partial_count),
            tensor(&lists.partial_index),
            tensor(&lists.full_count),
            tensor(&lists.full_index),
            tensor(&args.layout),
            tensor(&args.padding),
            tensor(&args.doc_q),
            tensor(&args.doc_k),
            tensor(&args.dense),
            tensor(&args.seed),
            tensor(&args.key_bias),
            tensor(&args.reach),
            tensor(&args.slopes),
            tensor(&outputs.d_reach),
            args.element_rules(),
            (lists.block_q / dq_t.rows) as u32,
            (lists.block_k / dq_t.cols) as u32,
            scale,
            args.set,
            sizes.dim,
            sizes.value_dim,
            dq_t.rows,
            dq_t.cols,
            dq_t.row_threads,
            dq_t.col_threads,
            KERNEL_SOURCE,
            elem,
        );
    }
    if run_kv {
        flash_unit_sparse_backward_dkdv_kernel::launch(
            &client,
            cube_count(plan.kv_grid),
            CubeDim::new_1d(kv_t.units() as u32),
            address_type(plan.offsets),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            d_out.into_tensor_arg(),
            lse.into_tensor_arg(),
            tensor(&outputs.delta),
            tensor(&outputs.dk),
            tensor(&outputs.dv),
            tensor(&lists.t_partial_count),
            tensor(&lists.t_partial_index),
            tensor(&lists.t_full_count),
            tensor(&lists.t_full_index),
            tensor(&args.layout),
            tensor(&args.padding),
            tensor(&args.doc_q),
            tensor(&args.doc_k),
            tensor(&args.dense),
            tensor(&args.seed),
            tensor(&args.key_bias),
            tensor(&args.reach),
            tensor(&args.slopes),
            tensor(&outputs.d_key_bias),
            args.element_rules(),
            (lists.block_q / kv_t.cols) as u32,
            (lists.block_k / kv_t.rows) as u32,
            scale,
            args.set,
            sizes.dim,
            sizes.value_dim,
            kv_t.rows,
            kv_t.cols,
            kv_t.row_threads,
            kv_t.col_threads,
            KERNEL_SOURCE,
            elem,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_mma_backward(
    plan: &MmaBackwardPlan,
    inputs: BackwardInputs,
    scale: f32,
    lists: &BlockLists,
    args: &RuleArgs,
    outputs: &SparseOutputs,
    (run_dq, run_kv): (bool, bool),
) {
    let BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        d_out,
    } = inputs;
    // The block-sparse dQ kernel takes one 16-row tile per plane (`plan_sparse` forces it).
    assert_eq!(
        plan.dq_row_tiles, 1,
        "block-sparse dQ with {} row tiles",
        plan.dq_row_tiles
    );
    let client = q.client.clone();
    let elem = dtype_to_elem_type(q.dtype);
    let rows = MMA_ROWS_PER_TILE * plan.planes;
    let tensor = |t: &CubeTensor| t.clone().into_tensor_arg();
    // SAFETY: as the dense matrix-unit backward's launch (`launch::backward`): every global
    // access is guarded by the tensors' own sizes (query rows < seq_q, keys < seq_k, columns
    // < head/value dim; staging zero-fills past them, outputs are written only inside them),
    // shared-memory indices by the comptime tiles, and the plan stages asynchronously only
    // with unit column strides and head/value dims that are multiples of 8. The lists'
    // reads are bounded by their shapes (counts cut at the blocks, `components::key_blocks`)
    // and checked above; the rule tensors' reads by `i < seq_q`, `j < seq_k` and their
    // checked shapes; the score terms' gradients are written at `[b, h, position]` of
    // buffers of `[batch, heads, positions]` where the call has them.
    unsafe {
        if run_dq {
            flash_mma_sparse_backward_dq_kernel::launch_unchecked(
                &client,
                cube_count(plan.dq_grid),
                CubeDim::new_2d(32, plan.planes as u32),
                address_type(plan.offsets),
                plan.dim_vector,
                tensor(&q),
                tensor(&k),
                tensor(&v),
                out.into_tensor_arg(),
                tensor(&d_out),
                tensor(&lse),
                tensor(&outputs.dq),
                tensor(&outputs.delta),
                tensor(&lists.partial_count),
                tensor(&lists.partial_index),
                tensor(&lists.full_count),
                tensor(&lists.full_index),
                tensor(&args.layout),
                tensor(&args.padding),
                tensor(&args.doc_q),
                tensor(&args.doc_k),
                tensor(&args.dense),
                tensor(&args.seed),
                tensor(&args.key_bias),
                tensor(&args.reach),
                tensor(&args.slopes),
                tensor(&outputs.d_reach),
                args.element_rules(),
                (lists.block_q / rows) as u32,
                (lists.block_k / plan.block_k) as u32,
                scale,
                args.set,
                plan.dim_pad,
                plan.value_dim_pad,
                plan.planes,
                plan.block_k,
                KERNEL_SOURCE,
                elem,
            );
        }
        if run_kv {
            flash_mma_sparse_backward_dkdv_kernel::launch_unchecked(
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
                tensor(&outputs.delta),
                tensor(&outputs.dk),
                tensor(&outputs.dv),
                tensor(&lists.t_partial_count),
                tensor(&lists.t_partial_index),
                tensor(&lists.t_full_count),
                tensor(&lists.t_full_index),
                tensor(&args.layout),
                tensor(&args.padding),
                tensor(&args.doc_q),
                tensor(&args.doc_k),
                tensor(&args.dense),
                tensor(&args.seed),
                tensor(&args.key_bias),
                tensor(&args.reach),
                tensor(&args.slopes),
                tensor(&outputs.d_key_bias),
                args.element_rules(),
                (lists.block_q / plan.block_q) as u32,
                (lists.block_k / rows) as u32,
                scale,
                args.set,
                plan.dim_pad,
                plan.value_dim_pad,
                plan.planes,
                plan.block_q,
                KERNEL_SOURCE,
                elem,
            );
        }
    }
}
