//! Strided columns without visiting every key block: a band plus global columns (`j %
//! stride == 0`) runs as the band's call plus calls over the gathered columns, merged by
//! their log-sum-exp.
//!
//! Outside the band, the columns a query sees are a prefix of the gathered columns (left of
//! the band) or, without the causal rule, a suffix (right of it), one column longer every
//! `stride` queries. So the queries of one phase (rows `p, p + stride, ...`) see a band of
//! the gathered columns: row `k` of phase `p` sees columns `t <= k + e_p` on the left and
//! `t >= k + f_p` on the right. Phases with the same rows and offset run as one call, their
//! rows stacked as extra heads (next to their own head, which keeps grouped-query heads
//! together), at most a few calls per side. Every call is a plain band, so it runs the band
//! kernels with their tile skipping; with key padding (gathered with the columns) or
//! dropout (a seed per call), the block-sparse kernels over the band.
//!
//! Gradients: each call's share is a gradient tap (the op's backward against that call's
//! keys with the merged rows' output and log-sum-exp, with the call's own mask and dropout
//! seed), as in context parallelism's ring.

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::backend::block_tap;
use crate::merge::MergedRows;
use crate::untracked::untracked;
use crate::{try_attention_with_lse, AttentionError, AttentionOptions, KeyPattern, Window};

/// One call over gathered columns: the query rows it serves (phase-major: every row of
/// the first phase, then the next), stacked as `phases` heads per head of `rows` rows
/// each, the columns it reads (`columns.start * stride ..`), and its band.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ColumnCall {
    phases: Vec<usize>,
    rows: usize,
    columns: std::ops::Range<usize>,
    window: Window,
}

impl ColumnCall {
    /// The query rows, phase-major.
    fn row_index(&self, stride: usize) -> Vec<i64> {
        self.phases
            .iter()
            .flat_map(|&p| (0..self.rows).map(move |k| (p + k * stride) as i64))
            .collect()
    }

    /// The key rows of the gathered columns.
    fn key_index(&self, stride: usize) -> Vec<i64> {
        self.columns.clone().map(|t| (t * stride) as i64).collect()
    }
}

/// The column calls of `seq_q` queries over `seq_k` keys with columns every `stride` keys
/// (at most `seq_k`) outside `band` (the pattern's band, already cut by its causal rule;
/// `causal` hides the columns right of the band).
fn column_calls(
    seq_q: usize,
    seq_k: usize,
    stride: usize,
    band: Window,
    causal: bool,
) -> Vec<ColumnCall> {
    let s = stride as i64;
    // A side of `seq_q + seq_k` already reaches every key: wider ones bound nothing more,
    // and would overflow the arithmetic below.
    let reach = seq_q + seq_k;
    let side = |side: Option<usize>| side.map(|w| w.min(reach) as i64);
    let offset = seq_k as i64 - seq_q as i64;
    let columns = seq_k.div_ceil(stride) as i64;
    let mut calls: Vec<(bool, i64, ColumnCall)> = Vec::new();
    let mut add = |side: bool, key: i64, phase: usize, call: ColumnCall| match calls
        .iter_mut()
        .find(|(sd, k, c)| *sd == side && *k == key && c.rows == call.rows)
    {
        Some((_, _, c)) => c.phases.push(phase),
        None => calls.push((side, key, call)),
    };
    for phase in 0..stride.min(seq_q) {
        let rows = (seq_q - phase).div_ceil(stride) as i64;
        let a = phase as i64 + offset;
        // Left of the band: row k sees t * s <= a + k s - left - 1, so t <= e + k.
        if let Some(left) = side(band.left) {
            let e = (a - left - 1).div_euclid(s);
            let keys = columns.min(e + rows);
            if keys > 0 {
                add(
                    false,
                    e,
                    phase,
                    ColumnCall {
                        phases: vec![phase],
                        rows: rows as usize,
                        columns: 0..keys as usize,
                        // Bottom-right aligned: row k's diagonal is t = k + keys - rows.
                        window: Window::new(None, Some((e + rows - keys) as usize)),
                    },
                );
            }
        }
        // Right of the band: row k sees t * s >= a + k s + right + 1, so t >= f + k.
        if let Some(right) = side(band.right) {
            if causal {
                continue;
            }
            let f = -(-(a + right + 1)).div_euclid(s);
            let seen = rows.min(columns - f);
            if seen > 0 {
                let first = f.max(0);
                add(
                    true,
                    f,
                    phase,
                    ColumnCall {
                        phases: vec![phase],
                        rows: seen as usize,
                        columns: first as usize..columns as usize,
                        window: Window::new(Some((columns - seen - f) as usize), None),
                    },
                );
            }
        }
    }
    calls.into_iter().map(|(_, _, call)| call).collect()
}

/// Whether [`strided_attention`] serves `pattern` (columns, no block layout) on lengths
/// that have rows and keys.
pub(crate) fn splits(pattern: &KeyPattern, seq_q: usize, seq_k: usize) -> bool {
    pattern.stride.is_some() && pattern.blocks.is_none() && seq_q > 0 && seq_k > 0
}

/// The masks the calls of a split carry, each on the block-sparse kernels: key padding
/// (`[batch, seq_k]`, gathered with the columns) and dropout in training (a seed per
/// call, which its tap's backward reuses). `Default`: none, the calls run the band
/// kernels.
#[derive(Debug, Clone, Default)]
pub(crate) struct SplitMasks {
    pub key_padding: Option<Tensor<2, Bool>>,
    pub dropout: Option<f64>,
}

impl SplitMasks {
    fn any(&self) -> bool {
        self.key_padding.is_some() || self.dropout.is_some()
    }
}

/// One call of a split as it runs: on the band kernels (the window in its options), or,
/// where it is planned with masks, on the block-sparse kernels.
struct SplitCall {
    options: AttentionOptions,
    #[cfg(feature = "cube")]
    masked: Option<Box<crate::backend::sparse::PreparedSparseCall>>,
}

impl SplitCall {
    fn band(options: AttentionOptions) -> Self {
        Self {
            options,
            #[cfg(feature = "cube")]
            masked: None,
        }
    }

    fn forward(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>), AttentionError> {
        #[cfg(feature = "cube")]
        if let Some(call) = &self.masked {
            return Ok(call.forward(q, k, v));
        }
        try_attention_with_lse(q, k, v, &self.options)
    }

    fn tap(
        &self,
        carried: Tensor<4>,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        out: Tensor<4>,
        lse: Tensor<3>,
    ) -> Tensor<4> {
        #[cfg(feature = "cube")]
        if let Some(call) = &self.masked {
            return call.tap(carried, q, k, v, out, lse);
        }
        block_tap(carried, q, k, v, out, lse, 0, self.options.clone())
    }
}

/// Whether calls with masks may take the block-sparse kernels: a CubeCL device, and
/// kernels allowed.
fn masked_calls_possible(q: &Tensor<4>, options: &AttentionOptions) -> bool {
    #[cfg(feature = "cube")]
    return options.kernel != crate::KernelPolicy::Tiled
        && crate::block_sparse_kernels(&q.device());
    #[cfg(not(feature = "cube"))]
    {
        let _ = (q, options);
        false
    }
}

/// A call over `window` with the key padding `padding` and `dropout`, planned for the
/// block-sparse kernels (`None` where they decline it).
#[cfg(feature = "cube")]
fn masked_call(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    window: Window,
    options: &AttentionOptions,
    padding: Option<Tensor<2, Bool>>,
    dropout: Option<f64>,
) -> Option<crate::backend::sparse::PreparedSparseCall> {
    let call_masks = crate::AttentionMasks {
        key_padding: padding,
        dropout: dropout.unwrap_or(0.0),
        ..Default::default()
    };
    crate::backend::sparse::PreparedSparseCall::new(
        q,
        k,
        v,
        &KeyPattern::band(window, false),
        options,
        &call_masks,
        dropout,
    )
    .ok()
}

/// Attention over a band plus strided columns (`pattern`, its causal rule and window
/// already merged with `options`'), as the band call and the column calls merged by their
/// log-sum-exp (see the module docs), under `masks`. `Ok(None)` where the masks need the
/// block-sparse kernels and they decline a call (the caller takes another path).
pub(crate) fn strided_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &SplitMasks,
) -> Result<Option<Tensor<4>>, AttentionError> {
    let [batch, heads, seq_q, dim] = q.dims();
    let [_, _, seq_k, _] = k.dims();
    let stride = pattern.stride_within(seq_k).expect("a strided pattern");
    let value_dim = v.dims()[3];
    let band = if pattern.causal {
        pattern.window.intersect(Window::new(None, Some(0)))
    } else {
        pattern.window
    };
    // With masks, each call's band plan is held in the options' cache (one per window).
    let call_options = |window: Window| AttentionOptions {
        causal: false,
        window,
        ..options.clone()
    };
    // Masks need the block-sparse kernels: nothing is gathered for a call they cannot take.
    if masks.any() && !masked_calls_possible(&q, options) {
        return Ok(None);
    }
    let device = q.device();
    let index = |rows: Vec<i64>| {
        let n = rows.len();
        Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device)
    };
    let calls = column_calls(seq_q, seq_k, stride, band, pattern.causal);
    if calls.is_empty() {
        // The band shows every column a query may see: one call.
        if !masks.any() {
            return crate::try_attention(q, k, v, &call_options(band)).map(Some);
        }
        #[cfg(feature = "cube")]
        return Ok(masked_call(
            &q,
            &k,
            &v,
            band,
            &call_options(band),
            masks.key_padding.clone(),
            masks.dropout,
        )
        .map(|call| call.forward(q, k, v).0));
    }
    // Each call's query rows and key rows, uploaded once for the forward and the taps.
    let indices: Vec<(Tensor<1, Int>, Tensor<1, Int>)> = calls
        .iter()
        .map(|call| (index(call.row_index(stride)), index(call.key_index(stride))))
        .collect();
    // A column call's inputs: queries gathered by row and stacked, phases as heads.
    let gathered = |call: &ColumnCall,
                    (rows, keys): &(Tensor<1, Int>, Tensor<1, Int>),
                    q: &Tensor<4>,
                    k: &Tensor<4>,
                    v: &Tensor<4>| {
        let g = call.phases.len();
        (
            q.clone()
                .select(2, rows.clone())
                .reshape([batch, heads * g, call.rows, dim]),
            k.clone().select(2, keys.clone()),
            v.clone().select(2, keys.clone()),
        )
    };

    let (dq, dk, dv) = (
        untracked(q.clone()),
        untracked(k.clone()),
        untracked(v.clone()),
    );
    // The band call, then the column calls, each with its inputs (untracked).
    let mut inputs = vec![(dq.clone(), dk.clone(), dv.clone())];
    inputs.extend(
        calls
            .iter()
            .zip(&indices)
            .map(|(call, at)| gathered(call, at, &dq, &dk, &dv)),
    );
    let windows: Vec<Window> = [band]
        .into_iter()
        .chain(calls.iter().map(|c| c.window))
        .collect();
    let runners: Vec<SplitCall> = if masks.any() {
        #[cfg(feature = "cube")]
        {
            let mut runners = Vec::with_capacity(windows.len());
            for (at, (&window, (cq, ck, cv))) in windows.iter().zip(&inputs).enumerate() {
                // The column calls' padding: their gathered keys'.
                let padding = masks.key_padding.as_ref().map(|pad| match at {
                    0 => pad.clone(),
                    _ => pad.clone().select(1, indices[at - 1].1.clone()),
                });
                let options = call_options(window);
                match masked_call(cq, ck, cv, window, &options, padding, masks.dropout) {
                    Some(call) => runners.push(SplitCall {
                        options,
                        masked: Some(Box::new(call)),
                    }),
                    None => return Ok(None),
                }
            }
            runners
        }
        #[cfg(not(feature = "cube"))]
        return Ok(None);
    } else {
        windows
            .iter()
            .map(|&w| SplitCall::band(call_options(w)))
            .collect()
    };

    let mut merged = MergedRows::new(&q, &v);
    for (at, (runner, (cq, ck, cv))) in runners.iter().zip(inputs).enumerate() {
        let (out, lse) = runner.forward(cq, ck, cv)?;
        if at == 0 {
            merged.add(0, out, lse);
        } else {
            let (call, rows) = (&calls[at - 1], &indices[at - 1].0);
            let n = call.phases.len() * call.rows;
            merged.add_rows(
                rows.clone(),
                out.reshape([batch, heads, n, value_dim]),
                lse.reshape([batch, heads, n]),
            );
        }
    }
    let (out, lse) = merged.finish(q.dtype());
    // Values only: the taps carry the gradients.
    let (out, lse) = (untracked(out), untracked(lse));
    if !(q.is_tracked() || k.is_tracked() || v.is_tracked()) {
        return Ok(Some(out));
    }
    // The value is the merged rows; each call's tap adds its share of the gradients.
    let mut carried = runners[0].tap(
        out.clone(),
        q.clone(),
        k.clone(),
        v.clone(),
        out.clone(),
        lse.clone(),
    );
    for ((call, at), runner) in calls.iter().zip(&indices).zip(&runners[1..]) {
        let (cq, ck, cv) = gathered(call, at, &q, &k, &v);
        let rows = at.0.clone();
        let g = call.phases.len();
        let stacked = |t: Tensor<4>| t.reshape([batch, heads * g, call.rows, value_dim]);
        let share = runner.tap(
            Tensor::<4>::zeros([batch, heads * g, call.rows, value_dim], &device).cast(q.dtype()),
            cq,
            ck,
            cv,
            stacked(out.clone().select(2, rows.clone())),
            lse.clone()
                .select(2, rows.clone())
                .reshape([batch, heads * g, call.rows]),
        );
        let share = share.reshape([batch, heads, g * call.rows, value_dim]);
        carried = carried.select_assign(2, rows, share, IndexingUpdateOp::Add);
    }
    Ok(Some(carried))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, uniform};
    use crate::{pattern_attention, reference_attention, DispatchLog, Pass};
    use burn::tensor::Device;
    use rand::{rngs::StdRng, SeedableRng};

    /// Every (query, key) pair the pattern shows is in exactly one call (the band or one
    /// column call), and no call shows another pair.
    #[test]
    fn calls_cover_each_visible_pair_once() {
        let cases = [
            (37, 37, 5, Window::new(Some(3), Some(3)), false),
            (40, 40, 4, Window::new(Some(6), Some(9)), true),
            (29, 45, 7, Window::new(Some(2), Some(9)), false),
            (45, 29, 3, Window::new(Some(2), Some(2)), true),
            (33, 33, 1, Window::new(Some(2), Some(2)), false),
            (50, 50, 8, Window::new(None, Some(3)), false),
            (50, 50, 8, Window::new(Some(3), None), false),
            (31, 31, 6, Window::new(Some(0), Some(0)), true),
            (20, 60, 16, Window::new(Some(4), Some(4)), true),
            (3, 70, 64, Window::new(Some(1), Some(1)), false),
            // Strides and sides past any length (only column 0; a side reaching every key).
            (4, 4, usize::MAX, Window::new(Some(1), Some(1)), false),
            (
                16,
                16,
                4,
                Window::new(Some(2), Some(i64::MAX as usize)),
                false,
            ),
            (
                8,
                4,
                2,
                Window::new(Some(i64::MAX as usize), Some(1)),
                false,
            ),
            (
                9,
                9,
                3,
                Window::new(Some(usize::MAX), Some(usize::MAX - 1)),
                false,
            ),
        ];
        for (seq_q, seq_k, stride, window, causal) in cases {
            let stride = stride.min(seq_k);
            let pattern = KeyPattern {
                window,
                stride: Some(stride),
                causal,
                blocks: None,
            };
            let band = if causal {
                window.intersect(Window::new(None, Some(0)))
            } else {
                window
            };
            let calls = column_calls(seq_q, seq_k, stride, band, causal);
            let what = format!("{seq_q}x{seq_k} stride {stride} {window:?} causal {causal}");
            let mut seen = vec![0u32; seq_q * seq_k];
            for i in 0..seq_q {
                for j in 0..seq_k {
                    seen[i * seq_k + j] += u32::from(band.contains(i, j, seq_q, seq_k));
                }
            }
            for call in &calls {
                let keys = call.key_index(stride);
                for &p in &call.phases {
                    for r in 0..call.rows {
                        let i = p + r * stride;
                        assert!(i < seq_q, "{what}: {call:?} row {i}");
                        for (t, &j) in keys.iter().enumerate() {
                            if call.window.contains(r, t, call.rows, keys.len()) {
                                seen[i * seq_k + j as usize] += 1;
                            }
                        }
                    }
                }
            }
            for i in 0..seq_q {
                for j in 0..seq_k {
                    let want = u32::from(pattern.visible(i, j, seq_q, seq_k));
                    assert_eq!(seen[i * seq_k + j], want, "{what}: ({i}, {j}) in {calls:?}");
                }
            }
        }
    }

    /// Strided patterns through `pattern_attention` (split into calls) against autodiff of
    /// the materialised reference: outputs and dq/dk/dv, GQA, cross lengths, both sides.
    #[test]
    fn split_calls_equal_the_reference_forward_and_backward() {
        let device = Device::ndarray().autodiff();
        let mut rng = StdRng::seed_from_u64(5);
        let cases = [
            (37, 37, 5, Window::new(Some(3), Some(3)), false, 4, 2),
            (40, 40, 4, Window::new(Some(6), Some(0)), true, 2, 2),
            (29, 45, 7, Window::new(Some(2), Some(9)), false, 2, 1),
            (45, 29, 3, Window::new(Some(2), Some(2)), true, 2, 2),
            (50, 50, 8, Window::new(None, Some(3)), false, 2, 2),
            // No column outside the band: one call.
            (20, 20, 4, Window::new(None, Some(0)), true, 2, 2),
            // A stride and a side past any length.
            (
                16,
                16,
                usize::MAX,
                Window::new(Some(2), Some(i64::MAX as usize)),
                false,
                2,
                2,
            ),
            (
                17,
                17,
                5,
                Window::new(Some(usize::MAX), Some(1)),
                false,
                2,
                1,
            ),
        ];
        for (seq_q, seq_k, stride, window, causal, heads, kv_heads) in cases {
            let pattern = KeyPattern {
                window,
                stride: Some(stride),
                causal,
                blocks: None,
            };
            let q = uniform(&mut rng, [2, heads, seq_q, 8], &device).require_grad();
            let k = uniform(&mut rng, [2, kv_heads, seq_k, 8], &device).require_grad();
            let v = uniform(&mut rng, [2, kv_heads, seq_k, 6], &device).require_grad();
            let w = uniform(&mut rng, [2, heads, seq_q, 6], &device);
            let log = DispatchLog::new();
            let options = AttentionOptions::new().with_log(log.clone());
            let got = pattern_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                &pattern,
                &options,
                None,
                0.0,
            );
            let grads = (got.clone() * w.clone()).sum().backward();
            let calls = log.of(Pass::Forward).len();
            let backward = log.of(Pass::Backward).len();
            let (q2, k2, v2) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
                v.clone().detach().require_grad(),
            );
            let (want, _) = reference_attention(
                q2.clone(),
                k2.clone(),
                v2.clone(),
                &pattern,
                1.0 / 8f64.sqrt(),
                None,
                None,
            );
            let want_grads = (want.clone() * w).sum().backward();
            let what = format!("{seq_q}x{seq_k} stride {stride} {window:?} causal {causal}");
            let band = if causal {
                window.intersect(Window::new(None, Some(0)))
            } else {
                window
            };
            let expected = 1 + column_calls(seq_q, seq_k, stride.min(seq_k), band, causal).len();
            assert_eq!((calls, backward), (expected, expected), "{what}: calls");
            let err = max_abs_diff(got, want);
            assert!(err < 1e-5, "{what}: output {err}");
            for (name, a, b) in [("dq", &q, &q2), ("dk", &k, &k2), ("dv", &v, &v2)] {
                let err = max_abs_diff(a.grad(&grads).unwrap(), b.grad(&want_grads).unwrap());
                assert!(err < 1e-5, "{what}: {name} {err}");
            }
        }
    }
}
