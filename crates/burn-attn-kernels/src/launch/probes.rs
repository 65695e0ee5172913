//! Test support: host launchers of the components' probe kernels, which run one component
//! (the online-softmax step, the cube order) on its own so tests can check it against the
//! host.

use burn_backend::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::buffers::alloc_contiguous;
use super::device::device_caps;
use crate::components::schedule::cube_order_probe_kernel;
use crate::components::softmax::{online_softmax_probe_kernel, PROBE_KEYS, PROBE_ROW_TILE};
use crate::plan::RuntimeKind;

/// Test support: runs [`online_softmax_probe_kernel`](crate::online_softmax_probe_kernel()) (one plane) on `scores`
/// (`[tiles, rows, 16]` f32, contiguous; `rows` 16 or 32: one or two row tiles) with the
/// band `offset`/`left`/`right` over `seq_k` keys and accumulator vectors of
/// `vector_size` (1, 2 or 4) floats; returns the probabilities after each tile and each
/// row's `[maximum, sum, output scale]` (`[tiles, rows, 3]`).
///
/// # Panics
/// When `scores` is not `[tiles, 16 or 32, 16]` f32 or `vector_size` does not divide 4.
#[allow(clippy::too_many_arguments)]
pub fn online_softmax_probe(
    scores: CubeTensor,
    scale: f32,
    offset: i32,
    left: i32,
    right: i32,
    seq_k: u32,
    vector_size: usize,
) -> (CubeTensor, CubeTensor) {
    let dims = scores.meta.shape().to_vec();
    assert!(
        dims.len() == 3 && matches!(dims[1], 16 | 32) && dims[2] == PROBE_KEYS,
        "scores must be [tiles, 16 or 32, {PROBE_KEYS}], got {dims:?}"
    );
    assert_eq!(scores.dtype, DType::F32, "scores must be f32");
    assert!(
        matches!(vector_size, 1 | 2 | 4),
        "vector_size {vector_size} must divide 4"
    );
    let (tiles, rows) = (dims[0], dims[1]);
    let probs = alloc_contiguous(&scores, Shape::new([tiles, rows, PROBE_KEYS]), DType::F32);
    let state = alloc_contiguous(&scores, Shape::new([tiles, rows, 3]), DType::F32);
    let client = scores.client.clone();
    let ptx_exp = device_caps(&client).runtime == RuntimeKind::Cuda;
    online_softmax_probe_kernel::launch(
        &client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(32),
        scores.into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        state.clone().into_tensor_arg(),
        scale,
        offset,
        left,
        right,
        seq_k,
        tiles,
        rows / PROBE_ROW_TILE,
        vector_size,
        ptx_exp,
    );
    (probs, state)
}

/// Test support: the heavy-first order of a `blocks` x `heads` grid as the kernels compute
/// it (`group` and `heaviest_last` as the kernels' `cube_block` takes them), on `like`'s
/// device: an f32 tensor `[blocks * heads, 2]` holding, at each launch index, the block and
/// the head that cube computes.
///
/// # Panics
/// When `blocks` or `heads` is 0 or past 65535 (the grid's limit).
pub fn cube_order_probe(
    like: &CubeTensor,
    blocks: usize,
    heads: usize,
    group: u32,
    heaviest_last: bool,
) -> CubeTensor {
    assert!(
        (1..=u16::MAX as usize).contains(&blocks) && (1..=u16::MAX as usize).contains(&heads),
        "blocks {blocks} and heads {heads} must be 1 to 65535"
    );
    let order = alloc_contiguous(like, Shape::new([blocks * heads, 2]), DType::F32);
    cube_order_probe_kernel::launch(
        &like.client,
        CubeCount::Static(blocks as u32, heads as u32, 1),
        CubeDim::new_1d(32),
        order.clone().into_tensor_arg(),
        group,
        heaviest_last,
    );
    order
}
