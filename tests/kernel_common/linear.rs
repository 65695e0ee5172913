//! Checks of the chunked linear-attention kernel: training through the public cores on a
//! device against autodiff of the quadratic form in f64 on the CPU.

use burn::tensor::{DType, Tensor};
use burn_attn_core::{
    causal_linear_attention_with, linear_attention_with, repeat_kv, DispatchLog, FeatureMap,
    Implementation, KernelPolicy, LinearAttentionState, LinearOptions, Pass,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{max_err, tensor, to_f64, On, Truth};

/// One linear-attention case: shapes, causal or not, normalised or not, the kernel's chunk.
#[derive(Clone, Copy, Debug)]
pub struct LinearCase {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub dim: usize,
    pub value_dim: usize,
    pub causal: bool,
    pub normalise: bool,
    pub kernel_chunk: Option<usize>,
    /// A feature map the call applies (to raw q, k of both signs), or none (q, k positive).
    pub feature_map: Option<FeatureMap>,
}

/// Feature-mapped operands (positive, as every feature map gives) and a loss weight.
struct LinearInputs {
    q: (Vec<f32>, [usize; 4]),
    k: (Vec<f32>, [usize; 4]),
    v: (Vec<f32>, [usize; 4]),
    w: (Vec<f32>, [usize; 4]),
}

fn linear_inputs(case: &LinearCase, seed: u64) -> LinearInputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gen = |shape: [usize; 4], lo: f32, hi: f32| {
        let n = shape.iter().product();
        ((0..n).map(|_| rng.random_range(lo..hi)).collect(), shape)
    };
    let LinearCase {
        batch: b,
        heads: h,
        kv_heads: kvh,
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = *case;
    // Raw queries and keys take both signs where the call maps them.
    let low = if case.feature_map.is_some() {
        -1.5
    } else {
        0.0
    };
    LinearInputs {
        q: gen([b, h, seq_q, dim], low, 1.0),
        k: gen([b, kvh, seq_k, dim], low, 1.0),
        v: gen([b, kvh, seq_k, value_dim], -1.0, 1.0),
        w: gen([b, h, seq_q, value_dim], -1.0, 1.0),
    }
}

const EPS: f64 = 1e-3;

/// Rows `from..to` of every head.
fn rows(t: Tensor<4>, from: usize, to: usize) -> Tensor<4> {
    let [b, h, _, _] = t.dims();
    t.slice([0..b, 0..h, from..to])
}

/// The quadratic form: `(q k^T) v` (causal: lower triangle), divided by the row sums plus
/// `eps` where normalised.
fn quadratic(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, case: &LinearCase) -> Tensor<4> {
    let (q, k) = match case.feature_map {
        Some(map) => (map.apply(q), map.apply(k)),
        None => (q, k),
    };
    let (k, v) = (repeat_kv(k, case.heads), repeat_kv(v, case.heads));
    let mut scores = q.matmul(k.swap_dims(2, 3));
    if case.causal {
        let n = case.seq_q;
        let mask = Tensor::<2>::ones([n, n], (&scores.device(), scores.dtype()))
            .tril(0)
            .reshape([1, 1, n, n]);
        scores = scores * mask;
    }
    let num = scores.clone().matmul(v);
    if case.normalise {
        num / (scores.sum_dim(3) + EPS)
    } else {
        num
    }
}

/// Asserts `got` within `tol` times the largest magnitude of `want` (at least 1) of it.
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: String) {
    let size = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    let err = max_err(got, want);
    assert!(err <= tol * size, "{what}: error {err:e} of {size:e}");
}

/// Output and gradients `[out, dq, dk, dv]` of `sum(out * w)`: ours on `device` (the log
/// records who served), or the quadratic form.
fn linear_training(
    device: &burn::tensor::Device,
    x: &LinearInputs,
    case: &LinearCase,
    ours: Option<&LinearOptions>,
    dtype: DType,
) -> [Vec<f64>; 4] {
    let device = device.clone().autodiff();
    let q = tensor(&x.q, dtype, &device).require_grad();
    let k = tensor(&x.k, dtype, &device).require_grad();
    let v = tensor(&x.v, dtype, &device).require_grad();
    let out = match (ours, case.causal) {
        (Some(o), true) => causal_linear_attention_with(q.clone(), k.clone(), v.clone(), None, o).0,
        (Some(o), false) => linear_attention_with(q.clone(), k.clone(), v.clone(), None, o),
        (None, _) => quadratic(q.clone(), k.clone(), v.clone(), case),
    };
    let grads = (out.clone() * tensor(&x.w, dtype, &device))
        .sum()
        .backward();
    let grad = |t: Tensor<4>| to_f64(t.grad(&grads).expect("gradient"));
    [to_f64(out), grad(q), grad(k), grad(v)]
}

fn options(case: &LinearCase, log: &DispatchLog) -> LinearOptions {
    let options = LinearOptions::new()
        .with_eps(EPS)
        .with_normalise(case.normalise)
        .with_kernel(KernelPolicy::Require)
        .with_log(log.clone());
    let options = match case.kernel_chunk {
        Some(chunk) => options.with_kernel_chunk(chunk),
        None => options,
    };
    match case.feature_map {
        Some(map) => options.with_feature_map(map),
        None => options,
    }
}

/// The cases: causal and not, normalised and not, GQA, batch 2, lengths that chunks do not
/// divide, one row, a value dim of three blocks' columns, a length that runs in segments,
/// each feature map fused into the loads.
pub fn linear_cases() -> Vec<LinearCase> {
    let base = LinearCase {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 77,
        seq_k: 77,
        dim: 24,
        value_dim: 40,
        causal: true,
        normalise: true,
        kernel_chunk: None,
        feature_map: None,
    };
    vec![
        base,
        LinearCase {
            feature_map: Some(FeatureMap::EluPlusOne),
            ..base
        },
        LinearCase {
            feature_map: Some(FeatureMap::Softplus),
            seq_q: 600,
            seq_k: 600,
            heads: 2,
            kv_heads: 1,
            batch: 1,
            dim: 16,
            value_dim: 16,
            ..base
        },
        LinearCase {
            feature_map: Some(FeatureMap::Relu),
            causal: false,
            seq_q: 30,
            seq_k: 41,
            ..base
        },
        LinearCase {
            kernel_chunk: Some(16),
            normalise: false,
            ..base
        },
        LinearCase {
            seq_q: 1,
            seq_k: 1,
            kv_heads: 1,
            ..base
        },
        LinearCase {
            seq_q: 33,
            seq_k: 33,
            dim: 8,
            value_dim: 72,
            kernel_chunk: Some(32),
            ..base
        },
        // Long enough for the causal passes to run in segments on a small grid.
        LinearCase {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            seq_q: 600,
            seq_k: 600,
            dim: 16,
            value_dim: 16,
            ..base
        },
        LinearCase {
            causal: false,
            seq_q: 19,
            seq_k: 45,
            ..base
        },
        LinearCase {
            causal: false,
            normalise: false,
            seq_q: 50,
            seq_k: 3,
            heads: 2,
            kv_heads: 2,
            ..base
        },
    ]
}

/// Cases the matrix-unit kernel takes in bf16 (head dims 64 and 128, value dims a
/// multiple of 64): causal and not, normalised and not, GQA, lengths chunks do not divide,
/// one row, a length that runs in segments, feature maps.
pub fn linear_matrix_cases() -> Vec<LinearCase> {
    let base = LinearCase {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 77,
        seq_k: 77,
        dim: 64,
        value_dim: 64,
        causal: true,
        normalise: true,
        kernel_chunk: None,
        feature_map: None,
    };
    vec![
        base,
        // Segments on a small grid, the state handed from one to the next.
        LinearCase {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            seq_q: 600,
            seq_k: 600,
            dim: 128,
            value_dim: 128,
            feature_map: Some(FeatureMap::EluPlusOne),
            ..base
        },
        LinearCase {
            dim: 128,
            value_dim: 64,
            seq_q: 130,
            seq_k: 130,
            normalise: false,
            ..base
        },
        LinearCase {
            causal: false,
            seq_q: 30,
            seq_k: 41,
            value_dim: 128,
            feature_map: Some(FeatureMap::Relu),
            ..base
        },
        LinearCase {
            seq_q: 1,
            seq_k: 1,
            kv_heads: 1,
            ..base
        },
    ]
}

/// Training through the linear cores on `B`'s device (fused, with autodiff) runs the
/// chunked kernel forward and backward (the log says so) and matches autodiff of the
/// quadratic form in f64 on the CPU within `tol` of the largest value, for every case of
/// [`linear_cases`] in `dtype` (inputs rounded to it on both sides).
pub fn check_linear_training<B: On>(dtype: DType, tol: f64) {
    check_linear_cases::<B>(
        linear_cases(),
        dtype,
        tol,
        [
            Implementation::LinearChunk,
            Implementation::LinearChunkBackward,
        ],
    );
}

/// [`check_linear_training`] for `cases`, served by the implementations `served` (forward,
/// backward).
pub fn check_linear_cases<B: On>(
    cases: Vec<LinearCase>,
    dtype: DType,
    tol: f64,
    served: [Implementation; 2],
) {
    for (at, case) in cases.into_iter().enumerate() {
        let x = linear_inputs(&case, 500 + at as u64);
        let x = LinearInputs {
            q: super::rounded(x.q, dtype),
            k: super::rounded(x.k, dtype),
            v: super::rounded(x.v, dtype),
            w: super::rounded(x.w, dtype),
        };
        let log = DispatchLog::new();
        let got = linear_training(&B::device(), &x, &case, Some(&options(&case, &log)), dtype);
        let want = linear_training(&Truth::device(), &x, &case, None, DType::F64);
        let logged: Vec<_> = log.entries().iter().map(|d| (d.pass, d.served)).collect();
        assert_eq!(
            logged,
            [(Pass::Forward, served[0]), (Pass::Backward, served[1])],
            "case {at}: {case:?}"
        );
        for (name, (g, t)) in ["out", "dq", "dk", "dv"]
            .into_iter()
            .zip(got.iter().zip(&want))
        {
            assert_close(g, t, tol, format!("{dtype:?} case {at} ({case:?}): {name}"));
        }
    }
}

/// Streaming on `B`'s device: a causal call split in two, the second starting from the
/// first's state, and a one-token step from that state equal the whole call (rows and the final state, which equals `sum_j
/// k_j^T v_j` and `sum_j k_j`), and training the second call alone gives the whole call's
/// gradients of its rows' queries, keys and values (the state is a constant).
pub fn check_linear_streaming<B: On>(tol: f64) {
    let case = LinearCase {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: 700,
        seq_k: 700,
        dim: 16,
        value_dim: 24,
        causal: true,
        normalise: true,
        kernel_chunk: Some(16),
        feature_map: None,
    };
    let x = linear_inputs(&case, 77);
    let device = B::device();
    let log = DispatchLog::new();
    let opts = options(&case, &log);
    let (q, k, v) = (
        tensor(&x.q, DType::F32, &device),
        tensor(&x.k, DType::F32, &device),
        tensor(&x.v, DType::F32, &device),
    );
    let (whole, state) = causal_linear_attention_with(q.clone(), k.clone(), v.clone(), None, &opts);
    // The second call runs in segments from the first's state.
    let split = 100;
    let part = |t: &Tensor<4>, from: usize, to: usize| rows(t.clone(), from, to);
    let (first, mid) = causal_linear_attention_with(
        part(&q, 0, split),
        part(&k, 0, split),
        part(&v, 0, split),
        None,
        &opts,
    );
    let n = case.seq_q;
    let (second, last) = causal_linear_attention_with(
        part(&q, split, n),
        part(&k, split, n),
        part(&v, split, n),
        Some(mid.clone()),
        &opts,
    );
    let streamed = Tensor::cat(vec![first, second], 2);
    let err = max_err(&to_f64(streamed), &to_f64(whole.clone()));
    assert!(err <= tol, "streamed rows differ by {err:e}");
    // The unnormalised form carries the same state.
    let unnormalised = opts.clone().with_normalise(false);
    let (_, plain) =
        causal_linear_attention_with(q.clone(), k.clone(), v.clone(), None, &unnormalised);
    // One token's step (the decoding step) from the first call's state.
    let (step, _) = causal_linear_attention_with(
        part(&q, split, split + 1),
        part(&k, split, split + 1),
        part(&v, split, split + 1),
        Some(mid.clone()),
        &opts,
    );
    let err = max_err(&to_f64(step), &to_f64(part(&whole, split, split + 1)));
    assert!(err <= tol, "a one-token step differs by {err:e}");
    // The state's truth in f64 on the CPU (the device's f32 matmul may run on tf32).
    let truth = Truth::device();
    let k_full = repeat_kv(tensor(&x.k, DType::F64, &truth), case.heads);
    let kv_truth = k_full
        .clone()
        .swap_dims(2, 3)
        .matmul(repeat_kv(tensor(&x.v, DType::F64, &truth), case.heads));
    let z_truth = k_full.sum_dim(2).squeeze_dim::<3>(2);
    for (name, got, want) in [
        ("kv", to_f64(last.kv.clone()), to_f64(kv_truth.clone())),
        ("z", to_f64(last.z.clone()), to_f64(z_truth.clone())),
        ("kv (one call)", to_f64(state.kv), to_f64(kv_truth.clone())),
        ("kv (unnormalised)", to_f64(plain.kv), to_f64(kv_truth)),
        ("z (unnormalised)", to_f64(plain.z), to_f64(z_truth.clone())),
    ] {
        assert_close(&got, &want, tol, format!("state {name}"));
    }

    // Training the second call from the first's state: its gradients are the whole call's
    // for its own rows.
    let ad = device.clone().autodiff();
    let lift = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &ad).require_grad();
    let (q2, k2, v2) = (
        lift(part(&q, split, n)),
        lift(part(&k, split, n)),
        lift(part(&v, split, n)),
    );
    let start = LinearAttentionState {
        kv: Tensor::from_data(mid.kv.into_data(), &ad),
        z: Tensor::from_data(mid.z.into_data(), &ad),
    };
    let w = rows(tensor(&x.w, DType::F32, &ad), split, n);
    let (out2, _) =
        causal_linear_attention_with(q2.clone(), k2.clone(), v2.clone(), Some(start), &opts);
    let grads = (out2 * w).sum().backward();
    let got: Vec<Vec<f64>> = [q2, k2, v2]
        .into_iter()
        .map(|t| to_f64(t.grad(&grads).expect("gradient")))
        .collect();
    let truth = Truth::device().autodiff();
    let t = |x: &(Vec<f32>, [usize; 4])| tensor(x, DType::F64, &truth).require_grad();
    let (qt, kt, vt) = (t(&x.q), t(&x.k), t(&x.v));
    // The weight of the whole call's rows, zero on the first call's.
    let [b, h, _, dv] = x.w.1;
    let row_of = |i: usize| (i / dv) % n;
    let second_rows: Vec<f32> = (0..b * h * n * dv)
        .map(|i| if row_of(i) < split { 0.0 } else { x.w.0[i] })
        .collect();
    let wt = tensor(&(second_rows, x.w.1), DType::F64, &truth);
    let out = quadratic(qt.clone(), kt.clone(), vt.clone(), &case);
    let grads = (out * wt).sum().backward();
    let want: Vec<Vec<f64>> = [qt, kt, vt]
        .into_iter()
        .map(|t| to_f64(rows(t.grad(&grads).expect("gradient"), split, n)))
        .collect();
    for (name, (g, w)) in ["dq", "dk", "dv"].into_iter().zip(got.iter().zip(&want)) {
        assert_close(g, w, tol, format!("streamed training {name}"));
    }
    assert!(log.entries().iter().all(|d| matches!(
        d.served,
        Implementation::LinearChunk | Implementation::LinearChunkBackward
    )));
}
