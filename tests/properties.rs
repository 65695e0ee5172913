//! Property tests of the CPU path (`pattern_attention` on `NdArray<f32>`: the tiled band
//! and pattern paths) against the materialised reference in f64, over random shapes,
//! windows, causal rules, strided columns, block layouts, key padding and GQA; and the
//! block-sparse plan (`BlockCover`, `BlockMask`) against the scalar definition; the linear
//! cores against their quadratic form.

use burn::tensor::{Bool, DType, Device, Tensor, TensorCreationOptions, TensorData};
use burn_attn::cores::{pattern_attention, reference_attention, BlockLayout, KeyPattern};
use burn_attn::{AttentionOptions, Window};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The CPU device (ndarray, which Burn 0.22 deprecates; our default CPU backend).
#[allow(deprecated)]
fn cpu() -> Device {
    Device::ndarray()
}

/// One call: sizes, the pattern's parts, padding and the inputs' seed.
#[derive(Debug, Clone)]
struct Call {
    batch: usize,
    kv_heads: usize,
    group: usize,
    seq_q: usize,
    seq_k: usize,
    dim: usize,
    value_dim: usize,
    left: Option<usize>,
    right: Option<usize>,
    causal: bool,
    stride: Option<usize>,
    blocks: Option<(usize, f64, u64)>,
    pad_every: Option<usize>,
    seed: u64,
}

fn calls() -> impl Strategy<Value = Call> {
    (
        (1usize..3, 1usize..3, 1usize..3, 1usize..40, 1usize..40),
        (1usize..17, 1usize..17),
        (
            proptest::option::of(0usize..12),
            proptest::option::of(0usize..12),
            any::<bool>(),
            proptest::option::of(1usize..7),
            proptest::option::of((1usize..9, 0.2f64..1.0, any::<u64>())),
            proptest::option::of(2usize..6),
        ),
        any::<u64>(),
    )
        .prop_map(
            |((batch, kv_heads, group, seq_q, seq_k), (dim, value_dim), pattern, seed)| {
                let (left, right, causal, stride, blocks, pad_every) = pattern;
                Call {
                    batch,
                    kv_heads,
                    group,
                    seq_q,
                    seq_k,
                    dim,
                    value_dim,
                    left,
                    right,
                    causal,
                    stride,
                    blocks,
                    pad_every,
                    seed,
                }
            },
        )
}

/// Seeded values in [-2, 2) of `shape`.
fn values(rng: &mut StdRng, shape: [usize; 4]) -> TensorData {
    let n = shape.iter().product();
    TensorData::new(
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect(),
        shape,
    )
}

fn max_diff(ours: Tensor<4>, truth: Tensor<4>) -> f64 {
    let ours: Vec<f64> = ours.into_data().convert::<f64>().try_to_vec().unwrap();
    let truth: Vec<f64> = truth.into_data().convert::<f64>().try_to_vec().unwrap();
    assert_eq!(ours.len(), truth.len());
    ours.iter()
        .zip(&truth)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

proptest! {
    // No failure files: a failing case prints its inputs, which reproduce it.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cpu_path_matches_the_f64_reference(call in calls()) {
        let mut rng = StdRng::seed_from_u64(call.seed);
        let heads = call.kv_heads * call.group;
        let q = values(&mut rng, [call.batch, heads, call.seq_q, call.dim]);
        let k = values(&mut rng, [call.batch, call.kv_heads, call.seq_k, call.dim]);
        let v = values(&mut rng, [call.batch, call.kv_heads, call.seq_k, call.value_dim]);
        let blocks = call.blocks.map(|(block, density, seed)| {
            BlockLayout::random(call.seq_q, call.seq_k, block, density, seed).unwrap()
        });
        let pattern = KeyPattern {
            window: Window::new(call.left, call.right),
            stride: call.stride,
            causal: call.causal,
            blocks,
        };
        let hide: Option<Vec<bool>> = call
            .pad_every
            .map(|every| (0..call.batch * call.seq_k).map(|i| i % every == 1).collect());
        let mask = |h: &Vec<bool>| TensorData::new(h.clone(), [call.batch, call.seq_k]);
        let options = AttentionOptions::new();
        let scale = 1.0 / (call.dim as f64).sqrt();

        let device = cpu();
        let ours = pattern_attention(
            Tensor::from_data(q.clone(), &device),
            Tensor::from_data(k.clone(), &device),
            Tensor::from_data(v.clone(), &device),
            &pattern,
            &options,
            hide.as_ref().map(|h| Tensor::<2, Bool>::from_data(mask(h), &device)),
            0.0,
        );
        let f64s = TensorCreationOptions::new(device.clone()).with_dtype(DType::F64);
        let (truth, _) = reference_attention(
            Tensor::from_data(q.convert::<f64>(), f64s.clone()),
            Tensor::from_data(k.convert::<f64>(), f64s.clone()),
            Tensor::from_data(v.convert::<f64>(), f64s),
            &pattern,
            scale,
            hide.as_ref().map(|h| Tensor::<2, Bool>::from_data(mask(h), &device)),
            None,
        );
        let err = max_diff(ours, truth);
        prop_assert!(err < 2e-5, "max |ours - f64| = {err} for {call:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The block-sparse plan never lies: a block its cover calls empty has no visible key,
    /// one it calls full has every key visible (padding and document ids included), and the
    /// lists hold exactly the blocks that are not empty.
    #[test]
    fn block_covers_and_lists_are_sound(call in calls()) {
        use burn::tensor::Int;
        use burn_attn::cores::{BlockCover, BlockGrid, BlockMask, TileCover};
        let device = cpu();
        let (batch, seq_q, seq_k) = (call.batch, call.seq_q, call.seq_k);
        let grid = BlockGrid::new(call.dim % 9 + 1, call.value_dim % 9 + 1, seq_q, seq_k).unwrap();
        let blocks = call.blocks.map(|(block, density, seed)| {
            BlockLayout::random(seq_q, seq_k, block, density, seed).unwrap()
        });
        let pattern = KeyPattern {
            window: Window::new(call.left, call.right),
            stride: call.stride,
            causal: call.causal,
            blocks,
        };
        let mut rng = StdRng::seed_from_u64(call.seed);
        let pad: Vec<bool> = (0..batch * seq_k)
            .map(|i| call.pad_every.is_some_and(|every| i % every == 1))
            .collect();
        let docs = |rng: &mut StdRng, len: usize| -> Vec<i64> {
            (0..batch)
                .flat_map(|_| {
                    let mut doc = 0;
                    (0..len).map(|_| { doc += i64::from(rng.random_range(0..5) == 0); doc }).collect::<Vec<_>>()
                })
                .collect()
        };
        let (doc_q, doc_k) = (docs(&mut rng, seq_q), docs(&mut rng, seq_k));
        let ids = |d: &Vec<i64>, len: usize| Tensor::<2, Int>::from_data(TensorData::new(d.clone(), [batch, len]), &device);
        let cover = BlockCover::of_pattern(&pattern, grid, &device)
            .unwrap()
            .intersect(BlockCover::of_key_padding(
                Tensor::<2, Bool>::from_data(TensorData::new(pad.clone(), [batch, seq_k]), &device),
                grid,
            ).unwrap())
            .unwrap()
            .intersect(BlockCover::of_documents(ids(&doc_q, seq_q), ids(&doc_k, seq_k), grid).unwrap())
            .unwrap();
        let covers = cover.to_covers();
        let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
        let mut listed = 0;
        for b in 0..batch {
            for q in 0..qb {
                for k in 0..kb {
                    let rows = q * grid.block_q..((q + 1) * grid.block_q).min(seq_q);
                    let cols = k * grid.block_k..((k + 1) * grid.block_k).min(seq_k);
                    let seen: Vec<bool> = rows
                        .flat_map(|i| cols.clone().map(move |j| (i, j)))
                        .map(|(i, j)| {
                            pattern.visible(i, j, seq_q, seq_k)
                                && !pad[b * seq_k + j]
                                && doc_q[b * seq_q + i] == doc_k[b * seq_k + j]
                        })
                        .collect();
                    let got = covers[(b * qb + q) * kb + k];
                    match got {
                        TileCover::Empty => prop_assert!(seen.iter().all(|s| !s), "empty ({q}, {k}) for {call:?}"),
                        TileCover::Full => prop_assert!(seen.iter().all(|s| *s), "full ({q}, {k}) for {call:?}"),
                        TileCover::Partial => {}
                    }
                    listed += usize::from(got != TileCover::Empty);
                }
            }
        }
        let mask = BlockMask::new(cover);
        let count = |t: Tensor<3, Int>| t.sum().into_scalar::<i64>() as usize;
        prop_assert_eq!(count(mask.partial_count.clone()) + count(mask.full_count.clone()), listed);
        prop_assert_eq!(count(mask.t_partial_count) + count(mask.t_full_count), listed);
    }
}

/// One linear-attention call: sizes, causal or not, normalised or not, a feature map, the
/// tensor ops' chunk, a split of a causal call into two streamed calls, the inputs' seed.
#[derive(Debug, Clone)]
struct LinearCall {
    batch: usize,
    kv_heads: usize,
    group: usize,
    seq: usize,
    seq_k: usize,
    dim: usize,
    value_dim: usize,
    causal: bool,
    normalise: bool,
    map: usize,
    chunk: usize,
    split: usize,
    seed: u64,
}

fn linear_calls() -> impl Strategy<Value = LinearCall> {
    (
        (1usize..3, 1usize..3, 1usize..3, 1usize..40, 1usize..40),
        (1usize..13, 1usize..13),
        (
            any::<bool>(),
            any::<bool>(),
            0usize..4,
            1usize..20,
            0usize..40,
        ),
        any::<u64>(),
    )
        .prop_map(
            |((batch, kv_heads, group, seq, seq_k), (dim, value_dim), rest, seed)| {
                let (causal, normalise, map, chunk, split) = rest;
                LinearCall {
                    batch,
                    kv_heads,
                    group,
                    seq,
                    seq_k: if causal { seq } else { seq_k },
                    dim,
                    value_dim,
                    causal,
                    normalise,
                    map,
                    chunk,
                    split: split % seq,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The linear cores on the CPU (tensor ops, chunked causal form, streamed in two calls)
    /// against the quadratic form in f64, for every feature map, normalised or not.
    #[test]
    fn linear_cores_match_the_quadratic_form(call in linear_calls()) {
        use burn_attn::cores::{
            causal_linear_attention_with, linear_attention_with, repeat_kv, FeatureMap,
            LinearOptions,
        };
        let mut rng = StdRng::seed_from_u64(call.seed);
        let heads = call.kv_heads * call.group;
        let q = values(&mut rng, [call.batch, heads, call.seq, call.dim]);
        let k = values(&mut rng, [call.batch, call.kv_heads, call.seq_k, call.dim]);
        let v = values(&mut rng, [call.batch, call.kv_heads, call.seq_k, call.value_dim]);
        let map = [None, Some(FeatureMap::EluPlusOne), Some(FeatureMap::Relu), Some(FeatureMap::Softplus)][call.map];
        // Without a map the inputs must be positive already.
        let positive = |t: Tensor<4>| if map.is_none() { t.abs() } else { t };
        let eps = 1e-2;
        let mut options = LinearOptions::new()
            .with_eps(eps)
            .with_chunk(call.chunk)
            .with_normalise(call.normalise);
        if let Some(map) = map {
            options = options.with_feature_map(map);
        }
        let device = cpu();
        let t = |data: &TensorData| positive(Tensor::<4>::from_data(data.clone(), &device));
        let (q32, k32, v32) = (t(&q), t(&k), Tensor::<4>::from_data(v.clone(), &device));
        let ours = if call.causal {
            let s = call.split;
            let rows = |x: &Tensor<4>, from: usize, to: usize| {
                let [b, h, _, _] = x.dims();
                x.clone().slice([0..b, 0..h, from..to])
            };
            if s == 0 {
                causal_linear_attention_with(q32, k32, v32, None, &options).0
            } else {
                let (first, state) = causal_linear_attention_with(
                    rows(&q32, 0, s), rows(&k32, 0, s), rows(&v32, 0, s), None, &options);
                let (second, _) = causal_linear_attention_with(
                    rows(&q32, s, call.seq), rows(&k32, s, call.seq), rows(&v32, s, call.seq),
                    Some(state), &options);
                Tensor::cat(vec![first, second], 2)
            }
        } else {
            linear_attention_with(q32, k32, v32, None, &options)
        };

        let f64s = TensorCreationOptions::new(device.clone()).with_dtype(DType::F64);
        let t64 = |data: &TensorData| positive(Tensor::<4>::from_data(data.clone().convert::<f64>(), f64s.clone()));
        let (mut q64, mut k64) = (t64(&q), t64(&k));
        if let Some(map) = map {
            q64 = map.apply(q64);
            k64 = map.apply(k64);
        }
        let v64 = Tensor::<4>::from_data(v.convert::<f64>(), f64s.clone());
        let (k64, v64) = (repeat_kv(k64, heads), repeat_kv(v64, heads));
        let mut scores = q64.matmul(k64.swap_dims(2, 3));
        if call.causal {
            let n = call.seq;
            let lower = Tensor::<2>::ones([n, n], f64s.clone()).tril(0).reshape([1, 1, n, n]);
            scores = scores * lower;
        }
        let num = scores.clone().matmul(v64);
        let truth = if call.normalise { num / (scores.sum_dim(3) + eps) } else { num };
        let size = truth.clone().abs().max().into_scalar::<f64>().max(1.0);
        let err = max_diff(ours, truth);
        prop_assert!(err < 2e-5 * size, "max |ours - f64| = {err} of {size} for {call:?}");
    }
}
