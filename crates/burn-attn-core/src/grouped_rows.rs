//! Grouped-query calls with few queries that each see every key (decoding one token against
//! its cache, or cross-attention from a few queries) run with the query heads of each
//! key/value head as the rows of one head: `[batch, heads, seq_q, d]` is viewed as `[batch,
//! kv_heads, group * seq_q, d]`. The kernels then read each key/value tile once for the
//! whole group, where they read it once per query head, and launch one cube per group.
//! Every row sees every key, so the result is the same attention.

use burn::tensor::Tensor;

use crate::options::{AttentionOptions, Window};
use crate::shape::AttentionShape;

/// The most packed rows per key/value head: one cube of the forward kernels' query rows.
const MAX_PACKED_ROWS: usize = 64;

/// Whether a call of `shape` under `options` packs: query heads share key/value heads, the
/// packed rows fit one cube, and every query sees every key (the first query reaches the
/// last key, the last query the first key, under bottom-right alignment).
pub(crate) fn packs(shape: &AttentionShape, options: &AttentionOptions) -> bool {
    let AttentionShape {
        heads,
        kv_heads,
        seq_q,
        seq_k,
        ..
    } = *shape;
    let group = heads / kv_heads.max(1);
    if group <= 1 || seq_q == 0 || seq_k == 0 || seq_q * group > MAX_PACKED_ROWS {
        return false;
    }
    let window = options.effective_window();
    window.right.is_none_or(|right| right >= seq_q - 1)
        && window.left.is_none_or(|left| left >= seq_k - 1)
}

/// `attend` on the packed call (no mask: every row sees every key; the call's scale), its
/// output and log-sum-exp viewed back as `[batch, heads, seq_q, ..]`.
pub(crate) fn packed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    shape: &AttentionShape,
    options: &AttentionOptions,
    attend: impl FnOnce(Tensor<4>, Tensor<4>, Tensor<4>, &AttentionOptions) -> (Tensor<4>, Tensor<3>),
) -> (Tensor<4>, Tensor<3>) {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        seq_q,
        head_dim,
        value_dim,
        ..
    } = *shape;
    let rows = heads / kv_heads * seq_q;
    let options = AttentionOptions {
        causal: false,
        window: Window::FULL,
        scale: Some(options.scale_for(head_dim)),
        ..options.clone()
    };
    let q = q.reshape([batch, kv_heads, rows, head_dim]);
    let (out, lse) = attend(q, k, v, &options);
    (
        out.reshape([batch, heads, seq_q, value_dim]),
        lse.reshape([batch, heads, seq_q]),
    )
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use crate::backend::banded_heads;
    use burn::tensor::{Device, TensorData};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn shape(heads: usize, kv_heads: usize, seq_q: usize, seq_k: usize) -> AttentionShape {
        AttentionShape {
            batch: 2,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            head_dim: 8,
            value_dim: 8,
        }
    }

    /// Packs only grouped calls whose queries all see all keys, within one cube of rows.
    #[test]
    fn packs_grouped_calls_that_see_every_key() {
        let causal = AttentionOptions::new().with_causal(true);
        assert!(packs(&shape(8, 2, 1, 100), &causal));
        assert!(!packs(&shape(8, 8, 1, 100), &causal), "no group");
        assert!(
            !packs(&shape(8, 2, 2, 100), &causal),
            "causal rows see different keys"
        );
        assert!(packs(&shape(8, 2, 16, 100), &AttentionOptions::new()));
        assert!(
            !packs(&shape(8, 2, 17, 100), &AttentionOptions::new()),
            "past 64 rows"
        );
        let window = |w: Window| AttentionOptions::new().with_window(w);
        assert!(packs(&shape(8, 2, 1, 100), &window(Window::causal(100))));
        assert!(!packs(&shape(8, 2, 1, 100), &window(Window::causal(99))));
        assert!(packs(
            &shape(8, 2, 3, 100),
            &window(Window::new(Some(99), Some(2)))
        ));
        assert!(!packs(
            &shape(8, 2, 3, 100),
            &window(Window::new(Some(99), Some(1)))
        ));
        assert!(!packs(&shape(8, 2, 0, 100), &causal));
    }

    /// The packed call gives the output and log-sum-exp of the call with its heads as they
    /// are, and the same gradients (seeded inputs, GQA and MQA, one and several queries).
    #[test]
    fn packed_calls_equal_the_unpacked_call() {
        let device = Device::ndarray().autodiff();
        let mut rng = StdRng::seed_from_u64(7);
        let mut rand = |shape: [usize; 4]| {
            let n = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            Tensor::<4>::from_data(TensorData::new(data, shape), &device)
        };
        let cases = [
            (
                shape(8, 2, 1, 37),
                AttentionOptions::new().with_causal(true),
            ),
            (shape(6, 1, 3, 20), AttentionOptions::new()),
            (
                shape(4, 2, 2, 9),
                AttentionOptions::new().with_window(Window::new(Some(8), Some(1))),
            ),
        ];
        for (s, options) in cases {
            assert!(packs(&s, &options), "{s:?}");
            let (q, k, v) = (
                rand([s.batch, s.heads, s.seq_q, 8]).require_grad(),
                rand([s.batch, s.kv_heads, s.seq_k, 8]).require_grad(),
                rand([s.batch, s.kv_heads, s.seq_k, 8]).require_grad(),
            );
            let w = rand([s.batch, s.heads, s.seq_q, 8]);
            let run = |packed_call: bool| {
                let (out, lse) = if packed_call {
                    packed(q.clone(), k.clone(), v.clone(), &s, &options, banded_heads)
                } else {
                    banded_heads(q.clone(), k.clone(), v.clone(), &options)
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                let grad = |t: &Tensor<4>| t.grad(&grads).expect("gradient");
                (out, lse, [grad(&q), grad(&k), grad(&v)])
            };
            let (out, lse, grads) = run(true);
            let (want_out, want_lse, want_grads) = run(false);
            let close = |a: Tensor<4>, b: Tensor<4>| (a - b).abs().max().into_scalar::<f32>();
            assert!(close(out, want_out) < 1e-5, "{s:?}");
            let lse_err = (lse - want_lse).abs().max().into_scalar::<f32>();
            assert!(lse_err < 1e-5, "{s:?}");
            for (g, w) in grads.into_iter().zip(want_grads) {
                assert!(close(g, w) < 1e-5, "{s:?}");
            }
        }
    }
}
