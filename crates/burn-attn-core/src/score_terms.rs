//! Score terms: additive log-weights on the scaled scores that the kernels evaluate per
//! element and differentiate in their backward. A per-key bias (learned sparsity's gate)
//! and a soft window edge from a per-query reach (the adaptive window). The tiled path
//! takes both as one [`TileBias`].

use core::ops::Range;

use burn::tensor::{Int, Tensor};

use crate::shape::AttentionShape;
use crate::tiled::{smallest_normal, TileBias};
use crate::AttentionError;

/// A soft window edge: query `i` (aligned with key `i + seq_k - seq_q`) gives key `j` the
/// weight `w = clamp((reach_i - |j - i - seq_k + seq_q|) / ramp + 1/2, 0, 1)`, so `ln(w)`
/// adds to its score and `w = 0` hides it. Gradients flow to `reach`: the loss moves each
/// query's edge.
#[derive(Debug, Clone)]
pub struct SoftEdge {
    /// Reach of each query, in keys: `[batch or 1, heads or 1, seq_q]`.
    pub reach: Tensor<3>,
    /// Width of the edge in keys (finite, positive): the weight falls from 1 to 0 over
    /// `ramp` keys centred on `reach`.
    pub ramp: f64,
}

/// Checks a score term's shape `[batch or 1, heads or 1, positions]`.
fn check_term(
    what: &'static str,
    dims: [usize; 3],
    shape: &AttentionShape,
    positions: usize,
    side: &str,
) -> Result<(), AttentionError> {
    let fits = (dims[0] == 1 || dims[0] == shape.batch)
        && (dims[1] == 1 || dims[1] == shape.heads)
        && dims[2] == positions;
    if fits {
        Ok(())
    } else {
        Err(AttentionError::Shape {
            what,
            expected: format!(
                "[{} or 1, {} or 1, {positions}] (batch, query heads, {side})",
                shape.batch, shape.heads
            ),
            got: dims.to_vec(),
        })
    }
}

/// Checks the score terms of a call against its shape.
pub(crate) fn check_score_terms(
    key_bias: Option<&Tensor<3>>,
    soft_edge: Option<&SoftEdge>,
    shape: &AttentionShape,
) -> Result<(), AttentionError> {
    if let Some(bias) = key_bias {
        check_term("key bias", bias.dims(), shape, shape.seq_k, "seq_k")?;
    }
    if let Some(edge) = soft_edge {
        check_term(
            "soft edge reach",
            edge.reach.dims(),
            shape,
            shape.seq_q,
            "seq_q",
        )?;
        if !(edge.ramp.is_finite() && edge.ramp > 0.0) {
            return Err(AttentionError::Invalid(format!(
                "soft edge ramp {} (takes a finite width > 0)",
                edge.ramp
            )));
        }
    }
    Ok(())
}

/// The score terms of a call as the tiled path's bias.
pub(crate) struct ScoreTerms<'a> {
    pub key_bias: Option<&'a Tensor<3>>,
    pub soft_edge: Option<&'a SoftEdge>,
    /// `seq_k - seq_q`.
    pub offset: i64,
}

impl TileBias for ScoreTerms<'_> {
    fn bias(&self, rows: Range<usize>, cols: Range<usize>) -> Tensor<4> {
        let (nr, nc) = (rows.len(), cols.len());
        let mut total: Option<Tensor<4>> = None;
        if let Some(bias) = self.key_bias {
            let [b, h, _] = bias.dims();
            let tile = bias.clone().slice([0..b, 0..h, cols.clone()]);
            total = Some(tile.reshape([b, h, 1, nc]));
        }
        if let Some(edge) = self.soft_edge {
            let device = edge.reach.device();
            let [b, h, _] = edge.reach.dims();
            let reach = edge
                .reach
                .clone()
                .slice([0..b, 0..h, rows.clone()])
                .reshape([b, h, nr, 1]);
            let r = Tensor::<1, Int>::arange(rows.start as i64..rows.end as i64, &device)
                .add_scalar(self.offset)
                .reshape([nr, 1])
                .expand([nr, nc]);
            let c = Tensor::<1, Int>::arange(cols.start as i64..cols.end as i64, &device)
                .reshape([1, nc])
                .expand([nr, nc]);
            let distance = (c - r).abs().float().reshape([1, 1, nr, nc]);
            // ln(clamp(raw, 0, 1)) built from masks, so the reach's gradient is 1 / raw on
            // the ramp and exactly 0 inside the window and past it, as the kernels give it.
            let raw = (reach - distance) / edge.ramp + 0.5;
            let (inside, hidden) = (
                raw.clone().greater_equal_elem(1.0),
                raw.clone().lower_equal_elem(0.0),
            );
            let log_weight = raw
                .clone()
                .clamp_min(smallest_normal(raw.dtype()))
                .log()
                .mask_fill(inside, 0.0)
                .mask_fill(hidden, f32::NEG_INFINITY);
            total = Some(match total {
                Some(t) => t + log_weight,
                None => log_weight,
            });
        }
        total.expect("a call with score terms")
    }
}
