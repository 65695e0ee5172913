//! The kernel test grid and checks shared by the WGPU and CUDA kernel tests.
#![allow(dead_code)]

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_attn_core::{
    attention_with_lse, reference_attention, AttentionOptions, KeyPattern, Window,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The truth: the materialised reference in f64 on the CPU.
type Truth = NdArray<f64>;

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub dim: usize,
    pub value_dim: usize,
    pub causal: bool,
    pub window: Window,
    /// Multiplies q (large logits when big).
    pub q_gain: f32,
}

impl Case {
    pub fn new(seq_q: usize, seq_k: usize, dim: usize) -> Self {
        Self {
            batch: 1,
            heads: 2,
            kv_heads: 2,
            seq_q,
            seq_k,
            dim,
            value_dim: dim,
            causal: false,
            window: Window::FULL,
            q_gain: 1.0,
        }
    }
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }
    pub fn window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window = Window::new(left, right);
        self
    }
    pub fn gqa(mut self, heads: usize, kv_heads: usize) -> Self {
        self.heads = heads;
        self.kv_heads = kv_heads;
        self
    }
    pub fn gain(mut self, g: f32) -> Self {
        self.q_gain = g;
        self
    }
    pub fn options(&self) -> AttentionOptions {
        AttentionOptions::new()
            .with_causal(self.causal)
            .with_window(self.window)
    }
}

pub struct Inputs {
    pub q: (Vec<f32>, [usize; 4]),
    pub k: (Vec<f32>, [usize; 4]),
    pub v: (Vec<f32>, [usize; 4]),
}

/// Uniform values in `[-gain, gain)` of `shape`.
fn uniform(rng: &mut StdRng, shape: [usize; 4], gain: f32) -> (Vec<f32>, [usize; 4]) {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * gain)
        .collect();
    (data, shape)
}

pub fn inputs(case: &Case, seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gen = |shape: [usize; 4], gain: f32| uniform(&mut rng, shape, gain);
    let Case {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        dim,
        value_dim,
        ..
    } = *case;
    Inputs {
        q: gen([batch, heads, seq_q, dim], case.q_gain),
        k: gen([batch, kv_heads, seq_k, dim], 1.0),
        v: gen([batch, kv_heads, seq_k, value_dim], 1.0),
    }
}

pub fn tensor<B: Backend>(
    x: &(Vec<f32>, [usize; 4]),
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 4> {
    let t = Tensor::<B, 4>::from_data(TensorData::new(x.0.clone(), x.1), device);
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

pub fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .unwrap()
}

/// Max absolute difference, where both `-inf` counts as equal and NaN as infinitely wrong.
pub fn max_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g == w {
                0.0
            } else if g.is_nan() || w.is_nan() || g.is_infinite() || w.is_infinite() {
                f64::INFINITY
            } else {
                (g - w).abs()
            }
        })
        .fold(0.0, f64::max)
}

pub fn truth(case: &Case, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let device = Default::default();
    let pattern = KeyPattern::band(case.window, case.causal);
    let scale = 1.0 / (case.dim as f64).sqrt();
    let (o, l) = reference_attention::<Truth>(
        tensor(&x.q, DType::F32, &device),
        tensor(&x.k, DType::F32, &device),
        tensor(&x.v, DType::F32, &device),
        &pattern,
        scale,
        None,
        None,
    );
    (to_f64(o), to_f64(l))
}

/// Runs the kernel (through `attention_with_lse`) on backend `B` in `dtype`.
pub fn kernel<B: burn_attn_core::AttentionBackend>(
    case: &Case,
    x: &Inputs,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>, DType) {
    let device = Default::default();
    let (o, l) = attention_with_lse::<B>(
        tensor(&x.q, dtype, &device),
        tensor(&x.k, dtype, &device),
        tensor(&x.v, dtype, &device),
        &case.options(),
    );
    assert_eq!(o.dtype(), dtype, "output keeps the input dtype");
    let lse_dtype = l.dtype();
    (to_f64(o), to_f64(l), lse_dtype)
}

/// The reference computed on the GPU backend in a low precision.
pub fn low_precision_reference<B: Backend>(
    case: &Case,
    x: &Inputs,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>) {
    let device = Default::default();
    let pattern = KeyPattern::band(case.window, case.causal);
    let scale = 1.0 / (case.dim as f64).sqrt();
    let (o, l) = reference_attention::<B>(
        tensor(&x.q, dtype, &device),
        tensor(&x.k, dtype, &device),
        tensor(&x.v, dtype, &device),
        &pattern,
        scale,
        None,
        None,
    );
    (to_f64(o), to_f64(l))
}

/// f32 tolerance: accumulation error grows with the dot length and the logit size.
pub fn f32_bound(case: &Case) -> f64 {
    2e-5 * (1.0 + (case.dim as f64).sqrt() / 4.0) * case.q_gain.max(1.0) as f64
}

pub fn check_f32<B: burn_attn_core::AttentionBackend>(case: Case) {
    let x = inputs(&case, 7 + case.seq_q as u64 * 31 + case.dim as u64);
    let (to, tl) = truth(&case, &x);
    let (ko, kl, lse_dtype) = kernel::<B>(&case, &x, DType::F32);
    assert_eq!(lse_dtype, DType::F32, "lse is f32");
    let (eo, el) = (max_err(&ko, &to), max_err(&kl, &tl));
    let bound = f32_bound(&case);
    eprintln!("f32 {case:?}: out err {eo:e}, lse err {el:e}");
    assert!(
        eo <= bound && el <= bound * 4.0,
        "{case:?}: out err {eo:e}, lse err {el:e}, bound {bound:e}"
    );
}

pub fn check_low<B: burn_attn_core::AttentionBackend>(case: Case, dtype: DType) {
    let x = inputs(&case, 11 + case.seq_k as u64 * 17 + case.dim as u64);
    let start = std::time::Instant::now();
    let (to, tl) = truth(&case, &x);
    let truth_s = start.elapsed().as_secs_f64();
    let (ko, kl, lse_dtype) = kernel::<B>(&case, &x, dtype);
    let kernel_s = start.elapsed().as_secs_f64() - truth_s;
    assert_eq!(lse_dtype, DType::F32, "lse is f32");
    let (ro, rl) = low_precision_reference::<B>(&case, &x, dtype);
    let reference_s = start.elapsed().as_secs_f64() - truth_s - kernel_s;
    eprintln!("  time: truth {truth_s:.2} s, kernel {kernel_s:.2} s, reference {reference_s:.2} s");
    let (eo, el) = (max_err(&ko, &to), max_err(&kl, &tl));
    let (reo, rel) = (max_err(&ro, &to), max_err(&rl, &tl));
    eprintln!("{dtype:?} {case:?}: out err {eo:e} (ref {reo:e}), lse err {el:e} (ref {rel:e})");
    // A floor for cases where the low-precision reference happens to be nearly exact.
    let floor = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
    assert!(
        eo <= 2.0 * reo.max(floor),
        "{case:?} {dtype:?}: kernel out err {eo:e} > 2x reference err {reo:e}"
    );
    // The kernel's lse is f32 while the reference's is rounded to the low precision.
    assert!(
        el <= 2.0 * rel.max(floor) + f32_bound(&case) * 4.0,
        "{case:?} {dtype:?}: kernel lse err {el:e} > 2x reference err {rel:e}"
    );
}

pub fn grid() -> Vec<Case> {
    let mut cases = Vec::new();
    // Head dims, full and causal.
    for dim in [8, 32, 64, 80, 96, 128, 256] {
        cases.push(Case::new(64, 64, dim));
        cases.push(Case::new(65, 65, dim).causal());
    }
    // Tails and odd lengths.
    for seq in [1, 17, 97, 128, 255] {
        cases.push(Case::new(seq, seq, 64));
        cases.push(Case::new(seq, seq, 64).causal());
    }
    // seq_q != seq_k: bottom-right alignment, fully masked rows when seq_q > seq_k causal.
    cases.push(Case::new(17, 97, 64).causal());
    cases.push(Case::new(97, 17, 64).causal());
    cases.push(Case::new(97, 17, 32));
    cases.push(Case::new(40, 3, 32).causal());
    // Windows: zero sides, both sides, with causal.
    cases.push(Case::new(97, 97, 64).window(Some(0), None));
    cases.push(Case::new(97, 97, 64).window(None, Some(0)));
    cases.push(Case::new(97, 97, 64).window(Some(0), Some(0)));
    cases.push(Case::new(130, 130, 64).window(Some(5), Some(9)));
    cases.push(Case::new(130, 130, 64).window(Some(40), Some(3)).causal());
    cases.push(Case::new(50, 120, 32).window(Some(7), Some(2)));
    cases.push(Case::new(120, 50, 32).window(Some(7), Some(2)));
    cases.push(Case::new(100, 100, 32).window(Some(3), Some(3)).causal());
    // GQA / MQA.
    cases.push(Case::new(33, 33, 64).gqa(4, 2).causal());
    cases.push(Case::new(33, 47, 64).gqa(8, 1));
    // Value dim differing from the head dim.
    let mut c = Case::new(40, 40, 32).causal();
    c.value_dim = 80;
    cases.push(c);
    // Large logits.
    cases.push(Case::new(64, 64, 64).gain(30.0));
    cases.push(Case::new(64, 64, 64).gain(30.0).causal());
    cases
}

/// Gradients of `sum(attention(q, k, v) * w)` with respect to q, k, v.
fn attention_gradients<B>(
    case: &Case,
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    ours: bool,
) -> [Vec<f64>; 3]
where
    B: burn::tensor::backend::AutodiffBackend + burn_attn_core::AttentionBackend,
{
    let device = Default::default();
    let q = tensor::<B>(&x.q, DType::F32, &device).require_grad();
    let k = tensor::<B>(&x.k, DType::F32, &device).require_grad();
    let v = tensor::<B>(&x.v, DType::F32, &device).require_grad();
    let out = if ours {
        burn_attn_core::attention(q.clone(), k.clone(), v.clone(), &case.options())
    } else {
        let pattern = KeyPattern::band(case.window, case.causal);
        let scale = 1.0 / (case.dim as f64).sqrt();
        reference_attention(q.clone(), k.clone(), v.clone(), &pattern, scale, None, None).0
    };
    let grads = (out * tensor::<B>(w, DType::F32, &device)).sum().backward();
    let flat = |t: Tensor<B, 4>| {
        let g = t.grad(&grads).expect("gradient");
        g.into_data().convert::<f64>().to_vec::<f64>().unwrap()
    };
    [flat(q), flat(k), flat(v)]
}

/// Training through the op on backend `B` (forward kernel, tiled backward from the saved O
/// and lse) against autodiff of the materialised reference in f64 on the CPU.
pub fn check_gradients<B>(case: Case)
where
    B: burn::tensor::backend::AutodiffBackend + burn_attn_core::AttentionBackend,
{
    let x = inputs(&case, 23 + case.seq_q as u64 * 7 + case.dim as u64);
    let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
    let w = uniform(&mut StdRng::seed_from_u64(99), shape, 1.0);
    let got = attention_gradients::<B>(&case, &x, &w, true);
    let want = attention_gradients::<burn::backend::Autodiff<Truth>>(&case, &x, &w, false);
    let bound = 4.0 * f32_bound(&case);
    for (name, (g, t)) in ["dq", "dk", "dv"].into_iter().zip(got.iter().zip(&want)) {
        let err = max_err(g, t);
        eprintln!("grad {case:?} {name}: err {err:e}");
        assert!(err <= bound, "{case:?}: {name} err {err:e} > {bound:e}");
    }
}

pub fn gradient_grid() -> Vec<Case> {
    vec![
        Case::new(65, 65, 64).causal(),
        Case::new(64, 64, 32),
        Case::new(97, 17, 32).causal(),
        Case::new(33, 47, 64).gqa(8, 1),
        Case::new(130, 130, 64).window(Some(40), Some(3)).causal(),
    ]
}
