//! The modules' context-parallel forward: one sequence's slices on their peers' devices,
//! projected on each peer and attended through the core's context-parallel attention.

use burn::module::Module;
use burn::tensor::Tensor;
use burn_attn_core::{
    try_context_parallel_attention, AttentionError, AttentionOptions, SequenceSlice,
};

use crate::projection::MultiHeadProjection;
use crate::rotary::rotate_heads;

/// Projects each slice (`[batch, rows, d_model]`, in order) on its own device with a copy
/// of `projection` there (`Module::to_device` keeps the autodiff graph, so the weights'
/// gradients return to `projection`'s), applies rotary embeddings of base `rotary` at the
/// slice's positions, attends through [`try_context_parallel_attention`] with `options` and
/// merges each peer's heads on its device.
pub(crate) fn attend_context_parallel(
    projection: &MultiHeadProjection,
    slices: Vec<Tensor<3>>,
    options: &AttentionOptions,
    rotary: Option<f32>,
) -> Result<Vec<Tensor<3>>, AttentionError> {
    let mut start = 0;
    let (mut projections, mut parts) = (Vec::new(), Vec::new());
    for x in slices {
        let projection = projection.clone().to_device(&x.device());
        let rows = x.dims()[1];
        let h = rotate_heads(projection.split_self(x), rotary, start);
        start += rows;
        projections.push(projection);
        parts.push(SequenceSlice {
            q: h.q,
            k: h.k,
            v: h.v,
        });
    }
    let outs = try_context_parallel_attention(&parts, options)?;
    Ok(projections
        .into_iter()
        .zip(outs)
        .map(|(projection, out)| projection.merge(out))
        .collect())
}

/// The error of a module with score terms or dropout, which the context-parallel core does
/// not take yet; `what` names the module's values.
pub(crate) fn unsupported_masks(what: String) -> AttentionError {
    AttentionError::Invalid(format!(
        "context-parallel attention takes no ALiBi, softcap or dropout yet (this module: {what})"
    ))
}
