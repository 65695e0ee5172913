//! The FlashAttention backward pass built from Burn tensor ops, tile by tile.
//!
//! From Q, K, V, the output O, the row log-sum-exp and the output gradient dO, it
//! recomputes the probabilities of one `block x block` tile at a time
//! (`P = exp(scale * Q K^T - lse)`) and accumulates
//! `dV += P^T dO`, `dS = P * (dO V^T - rowsum(dO * O))`, `dQ += scale * dS K`,
//! `dK += scale * dS^T Q`: FlashAttention-2's scheme, visiting only the tiles the band can
//! make visible. Nothing of size `seq_q x seq_k` is ever held; extra memory is the
//! gradients plus one tile. No atomics: the sums run in a fixed order, so two runs give
//! the same bits.

use burn::tensor::Tensor;

use crate::error::OrPanic;
use crate::options::AttentionOptions;
use crate::pattern::{KeyPattern, TileCover};
use crate::shape::{repeat_kv, AttentionShape};
use crate::tiled::{accumulation_dtype, hidden_keys, DEFAULT_TILE};

/// Gradients `(dq, dk, dv)` of banded attention, in the inputs' shapes and dtype.
///
/// `lse` is the forward's row log-sum-exp `[batch, heads, seq_q]` (any float dtype; `-inf`
/// for rows that saw no key), `out` and `d_out` are `[batch, heads, seq_q, value_dim]`.
/// f16 and bf16 inputs are computed in f32. With GQA/MQA, `dk` and `dv` sum over the
/// query heads that share a key/value head.
///
/// # Panics
/// When the shapes do not match (callers check them first).
pub fn tiled_band_backward(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    out: Tensor<4>,
    lse: Tensor<3>,
    d_out: Tensor<4>,
    options: &AttentionOptions,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let shape = AttentionShape::of(&q, &k, &v).or_panic();
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        head_dim,
        value_dim,
    } = shape;
    let dtype = q.dtype();
    // Low-precision inputs accumulate their gradients in f32.
    let work = accumulation_dtype(dtype);
    let to_work = |t: Tensor<4>| if t.dtype() == work { t } else { t.cast(work) };
    let (q, k, v, out, d_out) = (
        to_work(q),
        to_work(k),
        to_work(v),
        to_work(out),
        to_work(d_out),
    );
    let lse = if lse.dtype() == work {
        lse
    } else {
        lse.cast(work)
    };
    let device = q.device();

    let pattern = KeyPattern::band(options.window, options.causal);
    let scale = options.scale_for(head_dim);
    let tile = options.tile.unwrap_or(DEFAULT_TILE).max(1);
    let k = repeat_kv(k, heads);
    let v = repeat_kv(v, heads);
    // rowsum(dO * O): the correction term of the softmax gradient, [b, h, seq_q, 1].
    let delta = (d_out.clone() * out).sum_dim(3);
    // Rows that saw no key have lse = -inf; every tile hides all their keys, so any finite
    // shift works for them.
    let lse = lse.unsqueeze_dim::<4>(3);
    let lse = lse
        .clone()
        .mask_fill(lse.equal_elem(f32::NEG_INFINITY), 0.0);

    let key_tiles = seq_k.div_ceil(tile);
    let mut dk_tiles: Vec<Option<Tensor<4>>> = vec![None; key_tiles];
    let mut dv_tiles: Vec<Option<Tensor<4>>> = vec![None; key_tiles];
    let mut dq_blocks = Vec::new();
    let mut start = 0;
    while start < seq_q {
        let rows = start..(start + tile).min(seq_q);
        start = rows.end;
        let nr = rows.len();
        let q_blk = q.clone().slice([0..batch, 0..heads, rows.clone()]);
        let do_blk = d_out.clone().slice([0..batch, 0..heads, rows.clone()]);
        let lse_blk = lse.clone().slice([0..batch, 0..heads, rows.clone()]);
        let delta_blk = delta.clone().slice([0..batch, 0..heads, rows.clone()]);
        let mut dq_blk = Tensor::<4>::zeros([batch, heads, nr, head_dim], &device).cast(work);

        let keys = pattern.key_range(rows.clone(), seq_q, seq_k);
        for (cols, cover) in pattern.visible_tiles(rows.clone(), keys, tile, seq_q, seq_k) {
            let k_blk = k.clone().slice([0..batch, 0..heads, cols.clone()]);
            let v_blk = v.clone().slice([0..batch, 0..heads, cols.clone()]);
            let s = q_blk.clone().matmul(k_blk.clone().swap_dims(2, 3)) * scale;
            let mut p = (s - lse_blk.clone()).exp();
            if cover == TileCover::Partial {
                let visible = pattern.tile_mask(rows.clone(), cols.clone(), seq_q, seq_k, &device);
                p = p.mask_fill(hidden_keys(visible, batch, heads), 0.0);
            }
            let dp = do_blk.clone().matmul(v_blk.swap_dims(2, 3));
            let ds = p.clone() * (dp - delta_blk.clone());
            let j = cols.start / tile;
            let dv_add = p.swap_dims(2, 3).matmul(do_blk.clone());
            let dk_add = ds.clone().swap_dims(2, 3).matmul(q_blk.clone()) * scale;
            dq_blk = dq_blk + ds.matmul(k_blk) * scale;
            dv_tiles[j] = Some(match dv_tiles[j].take() {
                Some(acc) => acc + dv_add,
                None => dv_add,
            });
            dk_tiles[j] = Some(match dk_tiles[j].take() {
                Some(acc) => acc + dk_add,
                None => dk_add,
            });
        }
        dq_blocks.push(dq_blk);
    }

    // Key tiles no row could see get zero gradients.
    let gather = |tiles: Vec<Option<Tensor<4>>>, dim: usize| {
        let parts: Vec<Tensor<4>> = tiles
            .into_iter()
            .enumerate()
            .map(|(j, t)| {
                t.unwrap_or_else(|| {
                    let n = (seq_k - j * tile).min(tile);
                    Tensor::<4>::zeros([batch, heads, n, dim], &device).cast(work)
                })
            })
            .collect();
        if parts.is_empty() {
            Tensor::<4>::zeros([batch, heads, 0, dim], &device).cast(work)
        } else {
            Tensor::cat(parts, 2)
        }
    };
    let dk = sum_groups(gather(dk_tiles, head_dim), kv_heads);
    let dv = sum_groups(gather(dv_tiles, value_dim), kv_heads);
    let dq = if dq_blocks.is_empty() {
        Tensor::<4>::zeros([batch, heads, 0, head_dim], &device).cast(work)
    } else {
        Tensor::cat(dq_blocks, 2)
    };
    let back = |t: Tensor<4>| if t.dtype() == dtype { t } else { t.cast(dtype) };
    (back(dq), back(dk), back(dv))
}

/// Sums `[b, heads, n, d]` over the query heads of each key/value head (the inverse of
/// [`repeat_kv`]).
fn sum_groups(x: Tensor<4>, kv_heads: usize) -> Tensor<4> {
    let [b, heads, n, d] = x.dims();
    if heads == kv_heads {
        return x;
    }
    x.reshape([b, kv_heads, heads / kv_heads, n, d])
        .sum_dim(2)
        .squeeze_dim::<4>(2)
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorCreationOptions, TensorData};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use crate::{attention, reference_attention, AttentionOptions, KeyPattern, Window};

    struct Case {
        heads: usize,
        kv_heads: usize,
        seq_q: usize,
        seq_k: usize,
        dim: usize,
        value_dim: usize,
        options: AttentionOptions,
    }

    fn case(seq_q: usize, seq_k: usize, options: AttentionOptions) -> Case {
        Case {
            heads: 4,
            kv_heads: 4,
            seq_q,
            seq_k,
            dim: 8,
            value_dim: 6,
            options: AttentionOptions {
                tile: Some(16),
                ..options
            },
        }
    }

    /// Gradients of `sum(attention(q, k, v) * w)` for random `w`: ours through the custom
    /// backward, the reference through autodiff of the materialised attention.
    fn gradients(c: &Case, seed: u64) -> [(Vec<f64>, Vec<f64>); 3] {
        let device = Device::ndarray();
        // A local generator: the backend's global one is shared by the tests running in
        // parallel, so it would not give the same inputs twice.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rand = |shape: [usize; 4]| {
            let n = shape.iter().product();
            let data: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            Tensor::<4>::from_data(
                TensorData::new(data, shape),
                TensorCreationOptions::new(device.clone()).with_dtype(DType::F64),
            )
        };
        let q = rand([2, c.heads, c.seq_q, c.dim]);
        let k = rand([2, c.kv_heads, c.seq_k, c.dim]);
        let v = rand([2, c.kv_heads, c.seq_k, c.value_dim]);
        let w = rand([2, c.heads, c.seq_q, c.value_dim]);
        let run = |ours: bool| {
            let q = Tensor::<4>::from_inner(q.clone()).require_grad();
            let k = Tensor::<4>::from_inner(k.clone()).require_grad();
            let v = Tensor::<4>::from_inner(v.clone()).require_grad();
            let out = if ours {
                attention(q.clone(), k.clone(), v.clone(), &c.options)
            } else {
                let pattern = KeyPattern::band(c.options.window, c.options.causal);
                let scale = c.options.scale_for(c.dim);
                reference_attention(q.clone(), k.clone(), v.clone(), &pattern, scale, None, None).0
            };
            let grads = (out * Tensor::from_inner(w.clone())).sum().backward();
            let flat = |t: Tensor<4>| t.grad(&grads).unwrap().into_data().to_vec::<f64>().unwrap();
            [flat(q), flat(k), flat(v)]
        };
        let [oq, ok, ov] = run(true);
        let [rq, rk, rv] = run(false);
        [(oq, rq), (ok, rk), (ov, rv)]
    }

    fn assert_close(c: &Case, seed: u64) {
        for (name, (ours, want)) in ["dq", "dk", "dv"].into_iter().zip(gradients(c, seed)) {
            assert_eq!(ours.len(), want.len(), "{name} size");
            let err = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| {
                    if a.is_nan() || b.is_nan() {
                        f64::INFINITY
                    } else {
                        (a - b).abs()
                    }
                })
                .fold(0.0, f64::max);
            assert!(
                err < 1e-9,
                "{name}: max error {err:e} (seq_q {}, seq_k {}, heads {}/{}, {:?})",
                c.seq_q,
                c.seq_k,
                c.heads,
                c.kv_heads,
                c.options
            );
        }
    }

    #[test]
    fn gradients_match_reference_full_and_causal() {
        let full = AttentionOptions::new();
        let causal = AttentionOptions::new().with_causal(true);
        for (sq, sk) in [(1, 1), (37, 37), (50, 23), (23, 50)] {
            assert_close(&case(sq, sk, full.clone()), 1);
            // seq_q > seq_k causal: the first rows see nothing (zero gradients, no NaN).
            assert_close(&case(sq, sk, causal.clone()), 2);
        }
    }

    #[test]
    fn gradients_match_reference_windows_and_gqa() {
        let windows = [
            Window::new(Some(5), Some(3)),
            Window::new(Some(0), None),
            Window::new(None, Some(0)),
            Window::new(Some(0), Some(0)),
        ];
        for w in windows {
            assert_close(&case(45, 45, AttentionOptions::new().with_window(w)), 3);
            assert_close(
                &case(
                    45,
                    30,
                    AttentionOptions::new().with_window(w).with_causal(true),
                ),
                4,
            );
        }
        for (heads, kv_heads) in [(4, 2), (4, 1)] {
            let mut c = case(33, 40, AttentionOptions::new().with_causal(true));
            c.heads = heads;
            c.kv_heads = kv_heads;
            assert_close(&c, 5);
        }
    }

    #[test]
    fn gradients_are_deterministic() {
        let c = case(70, 70, AttentionOptions::new().with_causal(true));
        let a = gradients(&c, 9);
        let b = gradients(&c, 9);
        for ((x, _), (y, _)) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }
}
