//! Score terms: additive log-weights on the scaled scores that the kernels evaluate per
//! element and differentiate in their backward. A per-key bias (learned sparsity's gate)
//! and a soft window edge from a per-query reach (the adaptive window), and ALiBi (a
//! constant per-head slope times the distance). The tiled path takes them as one
//! [`TileBias`].

use core::ops::Range;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

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

/// ALiBi's slopes for `heads` heads (Press et al.): `2^(-8h/n)` for `h = 1..=n` when `n`
/// is a power of two; otherwise those of the largest power of two below, then every
/// other slope of twice that many, as many as are missing.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let powers = |n: usize| -> Vec<f32> {
        (1..=n)
            .map(|h| 2f64.powf(-8.0 * h as f64 / n as f64) as f32)
            .collect()
    };
    if heads == 0 {
        return Vec::new();
    }
    let base = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let mut slopes = powers(base);
    slopes.extend(powers(2 * base).into_iter().step_by(2).take(heads - base));
    slopes
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
    alibi: Option<&[f32]>,
    shape: &AttentionShape,
) -> Result<(), AttentionError> {
    if let Some(slopes) = alibi {
        if slopes.len() != shape.heads || slopes.iter().any(|s| !s.is_finite()) {
            return Err(AttentionError::Invalid(format!(
                "ALiBi slopes {slopes:?}: expected {} finite values, one per query head",
                shape.heads
            )));
        }
    }
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
        let ramp = edge.ramp as f32;
        if !(ramp.is_finite() && ramp > 0.0) {
            return Err(AttentionError::Invalid(format!(
                "soft edge ramp {} (takes a width finite and > 0 in f32)",
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
    pub alibi: Option<&'a [f32]>,
    /// A bias on every score, `[batch or 1, heads or 1, seq_q, seq_k]`.
    pub score_bias: Option<&'a Tensor<4>>,
    /// `seq_k - seq_q`.
    pub offset: i64,
    pub device: Device,
}

impl ScoreTerms<'_> {
    /// Whether the call has any term.
    pub(crate) fn any(&self) -> bool {
        self.key_bias.is_some()
            || self.soft_edge.is_some()
            || self.alibi.is_some()
            || self.score_bias.is_some()
    }

    /// `|j - i - offset|` for queries `rows` and keys `cols`, `[1, 1, rows, cols]`.
    fn distance(&self, rows: &Range<usize>, cols: &Range<usize>) -> Tensor<4> {
        let (nr, nc) = (rows.len(), cols.len());
        let r = Tensor::<1, Int>::arange(rows.start as i64..rows.end as i64, &self.device)
            .add_scalar(self.offset)
            .reshape([nr, 1])
            .expand([nr, nc]);
        let c = Tensor::<1, Int>::arange(cols.start as i64..cols.end as i64, &self.device)
            .reshape([1, nc])
            .expand([nr, nc]);
        (c - r)
            .abs()
            .float()
            .cast(DType::F32)
            .reshape([1, 1, nr, nc])
    }
}

impl TileBias for ScoreTerms<'_> {
    /// The terms' sum in f32 (the caller casts it to the scores' dtype): each term is
    /// brought to f32 before they meet, since the inputs' dtype and the backend's default
    /// float type (the distances, the slopes) may differ.
    fn bias(&self, rows: Range<usize>, cols: Range<usize>) -> Tensor<4> {
        let (nr, nc) = (rows.len(), cols.len());
        let mut terms = Vec::new();
        if let Some(bias) = self.key_bias {
            let [b, h, _] = bias.dims();
            let tile = bias.clone().slice([0..b, 0..h, cols.clone()]);
            terms.push(tile.cast(DType::F32).reshape([b, h, 1, nc]));
        }
        if let Some(edge) = self.soft_edge {
            let [b, h, _] = edge.reach.dims();
            let reach = edge
                .reach
                .clone()
                .slice([0..b, 0..h, rows.clone()])
                .cast(DType::F32)
                .reshape([b, h, nr, 1]);
            // ln(clamp(raw, 0, 1)) built from masks, so the reach's gradient is 1 / raw on
            // the ramp and exactly 0 inside the window and past it, as the kernels give it.
            let raw = (reach - self.distance(&rows, &cols)) / edge.ramp + 0.5;
            let (inside, hidden) = (
                raw.clone().greater_equal_elem(1.0),
                raw.clone().lower_equal_elem(0.0),
            );
            terms.push(
                raw.clone()
                    .clamp_min(smallest_normal(raw.dtype()))
                    .log()
                    .mask_fill(inside, 0.0)
                    .mask_fill(hidden, f32::NEG_INFINITY),
            );
        }
        if let Some(slopes) = self.alibi {
            let heads = slopes.len();
            let slopes = Tensor::<1>::from_data(
                TensorData::new(slopes.to_vec(), [heads]),
                (&self.device, DType::F32),
            )
            .reshape([1, heads, 1, 1]);
            terms.push(-(slopes * self.distance(&rows, &cols)));
        }
        if let Some(bias) = self.score_bias {
            let [b, h, _, _] = bias.dims();
            terms.push(
                bias.clone()
                    .slice([0..b, 0..h, rows, cols])
                    .cast(DType::F32),
            );
        }
        terms
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("a call with score terms")
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::tensor::{activation::softmax, Device, TensorData};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use crate::{masked_attention, AttentionMasks, AttentionOptions, KeyPattern};

    use super::*;

    /// Inputs in another dtype than the backend's default float (f64 on ndarray, as f16/bf16
    /// on a GPU whose default is f32) with every term: the same rows as the f32 call.
    #[test]
    fn terms_follow_the_inputs_dtype() {
        let device = Device::ndarray();
        let mut rng = StdRng::seed_from_u64(3);
        let mut rand = |shape: Vec<usize>, lo: f32, hi: f32| {
            let n = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
            TensorData::new(data, shape)
        };
        let (b, h, sq, sk, d) = (2, 2, 6, 9, 4);
        let (q, k, v) = (
            rand(vec![b, h, sq, d], -1.0, 1.0),
            rand(vec![b, h, sk, d], -1.0, 1.0),
            rand(vec![b, h, sk, d], -1.0, 1.0),
        );
        let (key_bias, reach) = (
            rand(vec![b, h, sk], -1.0, 0.0),
            rand(vec![b, 1, sq], 2.0, 6.0),
        );
        let run = |dtype: DType| {
            let t4 = |x: &TensorData| Tensor::<4>::from_data(x.clone(), &device).cast(dtype);
            let t3 = |x: &TensorData| Tensor::<3>::from_data(x.clone(), &device).cast(dtype);
            let masks = AttentionMasks {
                key_bias: Some(t3(&key_bias)),
                soft_edge: Some(SoftEdge {
                    reach: t3(&reach),
                    ramp: 2.0,
                }),
                alibi: Some(alibi_slopes(h)),
                ..AttentionMasks::default()
            };
            let options = AttentionOptions {
                tile: Some(4),
                ..AttentionOptions::new()
            };
            let out = masked_attention(
                t4(&q),
                t4(&k),
                t4(&v),
                &KeyPattern::default(),
                &options,
                &masks,
            );
            assert_eq!(out.dtype(), dtype);
            out.cast(DType::F32)
        };
        let err = (run(DType::F64) - run(DType::F32))
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(err < 1e-5, "f64 inputs differ from f32 by {err}");
    }

    /// A score bias (broadcast over the batch, `-inf` hiding one key of every query) equals
    /// the materialised `softmax(scale * q k^T + bias) v`, output and gradients of q, k, v
    /// and the bias, on seeded inputs, through the tiled path with a tile smaller than the
    /// sequence.
    #[test]
    fn a_score_bias_equals_the_materialised_reference() {
        let device = Device::ndarray().autodiff();
        let mut rng = StdRng::seed_from_u64(11);
        let mut rand = |shape: [usize; 4]| {
            let n = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
            Tensor::<4>::from_data(TensorData::new(data, shape), &device)
        };
        let (b, h, sq, sk, d) = (2, 3, 7, 9, 4);
        let (q, k, v) = (
            rand([b, h, sq, d]),
            rand([b, h, sk, d]),
            rand([b, h, sk, d]),
        );
        let w = rand([b, h, sq, d]);
        let hidden = Tensor::<4>::from_data(
            TensorData::new(
                (0..h * sq * sk)
                    .map(|at| if at % sk == 4 { f32::NEG_INFINITY } else { 0.0 })
                    .collect::<Vec<_>>(),
                [1, h, sq, sk],
            ),
            &device,
        );
        let bias = rand([1, h, sq, sk]) + hidden;
        let scale = 0.5;
        let run = |ours: bool| {
            let (q, k, v, bias) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
                bias.clone().require_grad(),
            );
            let out = if ours {
                let masks = AttentionMasks {
                    score_bias: Some(bias.clone()),
                    ..AttentionMasks::default()
                };
                let options = AttentionOptions {
                    tile: Some(4),
                    ..AttentionOptions::new().with_scale(scale)
                };
                masked_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    &KeyPattern::default(),
                    &options,
                    &masks,
                )
            } else {
                let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale + bias.clone();
                softmax(scores, 3).matmul(v.clone())
            };
            let grads = (out.clone() * w.clone()).sum().backward();
            let grad = |t: &Tensor<4>| t.grad(&grads).expect("gradient");
            [out, grad(&q), grad(&k), grad(&v), grad(&bias)]
        };
        let (got, want) = (run(true), run(false));
        for (name, (g, w)) in ["out", "dq", "dk", "dv", "d bias"]
            .iter()
            .zip(got.into_iter().zip(want))
        {
            let err = (g - w).abs().max().into_scalar::<f32>();
            assert!(err < 1e-5, "{name}: {err}");
        }
    }
}
