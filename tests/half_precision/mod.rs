//! The tensor-op cores with half-precision inputs on a device whose default float is f32,
//! as a mixed-precision model calls them: whatever the cores create (states, masks, chunk
//! sums) follows the inputs' dtype, the output keeps it, and it matches the f32 call to
//! that dtype's precision. Shared by the CPU (Flex: f16 and bf16), WGPU (f16) and CUDA
//! (f16 and bf16) test files.

use burn::tensor::{Bool, DType, Device, Distribution, Tensor, TensorData};
use burn_attn_core::{
    causal_linear_attention, linear_attention, masked_attention, pattern_attention,
    reference_attention, AttentionMasks, AttentionOptions, KernelPolicy, KeyPattern,
    LinearAttentionState, SoftEdge, Window,
};

/// Checks every core on `device` with inputs cast to `dtype`, to `tol` of the f32 call;
/// the score terms run under each of `policies` (`Require` where the device has the
/// block-sparse kernels).
pub fn check_half_precision_cores(
    device: &Device,
    dtype: DType,
    tol: f32,
    policies: &[KernelPolicy],
) {
    device.seed(3);
    let shape = [2, 2, 37, 16];
    let positive = || Tensor::<4>::random(shape, Distribution::Uniform(0.1, 1.0), device);
    let (q, k, v) = (positive(), positive(), positive());
    let half = |t: &Tensor<4>| t.clone().cast(dtype);
    let check = |what: &str, low: Tensor<4>, full: Tensor<4>| {
        assert_eq!(low.dtype(), dtype, "{what}");
        let err: f32 = (low.cast(DType::F32) - full)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(err < tol, "{what}: max |{dtype:?} - f32| = {err}");
    };

    // Each part names itself first, so a run that stops shows where.
    let part = |what: &str| eprintln!("half precision {dtype:?}: {what}");

    // Chunked causal form, with zero padding of the last chunk and the carried state.
    part("causal linear");
    let (low, _) = causal_linear_attention(half(&q), half(&k), half(&v), 8, 1e-3, None);
    let (full, _) = causal_linear_attention(q.clone(), k.clone(), v.clone(), 8, 1e-3, None);
    check("causal linear", low, full.clone());
    // Streaming: the second half after the first's state, given in f32 and in `dtype`.
    let halves = |t: &Tensor<4>| (t.clone().narrow(2, 0, 20), t.clone().narrow(2, 20, 17));
    let ((q1, q2), (k1, k2), (v1, v2)) = (halves(&q), halves(&k), halves(&v));
    let (_, state) = causal_linear_attention(half(&q1), half(&k1), half(&v1), 8, 1e-3, None);
    let cast_state = LinearAttentionState {
        kv: state.kv.clone().cast(dtype),
        z: state.z.clone().cast(dtype),
    };
    for (what, state) in [("f32 state", state), ("low-precision state", cast_state)] {
        let (low, _) =
            causal_linear_attention(half(&q2), half(&k2), half(&v2), 8, 1e-3, Some(state));
        check(
            &format!("causal linear after a {what}"),
            low,
            full.clone().narrow(2, 20, 17),
        );
    }

    // Non-causal form with a key padding mask.
    part("linear");
    let hide: Vec<bool> = (0..2 * 37).map(|i| i % 7 == 3).collect();
    let pad = || Tensor::<2, Bool>::from_data(TensorData::new(hide.clone(), [2, 37]), device);
    let low = linear_attention(half(&q), half(&k), half(&v), 1e-3, Some(pad()));
    let full = linear_attention(q.clone(), k.clone(), v.clone(), 1e-3, Some(pad()));
    check("linear, key padding", low, full);

    // The tiled softmax path: strided columns around a band, with key padding.
    part("strided + padding");
    let pattern = KeyPattern {
        window: Window::new(Some(3), Some(3)),
        stride: Some(5),
        ..KeyPattern::default()
    };
    let options = AttentionOptions::new();
    let tiled = |q, k, v| pattern_attention(q, k, v, &pattern, &options, Some(pad()), 0.0);
    let low = tiled(half(&q), half(&k), half(&v));
    let full = tiled(q.clone(), k.clone(), v.clone());
    check("tiled softmax, strided + padding", low, full);

    // Score terms in f32 beside low-precision inputs (a key bias, a soft edge, ALiBi, a
    // softcap).
    let terms = AttentionMasks {
        key_bias: Some(Tensor::<3>::random(
            [2, 2, 37],
            Distribution::Uniform(-1.0, 0.0),
            device,
        )),
        soft_edge: Some(SoftEdge {
            reach: Tensor::<3>::random([2, 1, 37], Distribution::Uniform(2.0, 9.0), device),
            ramp: 2.0,
        }),
        alibi: Some(vec![0.25, 0.0625]),
        softcap: Some(2.0),
        ..AttentionMasks::default()
    };
    let band = KeyPattern::band(Window::symmetric(12), false);
    for &policy in policies {
        part(&format!("score terms, {policy:?}"));
        let options = AttentionOptions::new().with_kernel(policy);
        let run = |q, k, v| masked_attention(q, k, v, &band, &options, &terms);
        let low = run(half(&q), half(&k), half(&v));
        let full = run(q.clone(), k.clone(), v.clone());
        check(&format!("score terms, {policy:?}"), low, full);
    }

    // The materialised reference, with rows that see no key (exactly 0, not 0 / 0).
    part("reference");
    let band = KeyPattern::band(Window::new(Some(2), Some(0)), false);
    let short = |t: Tensor<4>| t.slice([0..2, 0..2, 0..5]);
    let reference = |q, k, v| reference_attention(q, short(k), short(v), &band, 0.25, None, None);
    let (low, lse) = reference(half(&q), half(&k), half(&v));
    let (full, _) = reference(q.clone(), k.clone(), v.clone());
    // Query i sees keys i - 34 ..= i - 32: rows 0..32 see none.
    let dead = low
        .clone()
        .slice([0..2, 0..2, 0..32])
        .abs()
        .max()
        .cast(DType::F32);
    assert_eq!(dead.into_scalar::<f32>(), 0.0, "rows that see no key");
    let dead_lse = lse.slice([0..2, 0..2, 0..32]).cast(DType::F32).into_data();
    let dead_lse = dead_lse.try_to_vec::<f32>().unwrap();
    assert!(
        dead_lse.iter().all(|&l| l == f32::NEG_INFINITY),
        "{dead_lse:?}"
    );
    check("reference", low, full);
}
