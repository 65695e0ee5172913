//! The kernel test grid and checks shared by the WGPU and CUDA kernel tests.
#![allow(dead_code)]

use burn::backend::Cube;
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_attn_core::kernels::launch::flash_forward_with;
use burn_attn_core::kernels::plan::{BandArgs, ForcedPlan, ForwardKernel};
use burn_attn_core::kernels::{cube_order_probe, online_softmax_probe, CubeBackend, CubeTensor};
use burn_attn_core::AttentionBackend;
use burn_attn_core::{
    attention_with_lse, reference_attention, AttentionOptions, BlockLayout, Decline, DispatchLog,
    Implementation, KernelPolicy, KeyPattern, Pass, Unsupported, Window,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod linear;
pub use linear::*;

/// Where a check runs: the device its tensors are created on (a test binary names one
/// per backend it checks).
pub trait On {
    /// The device.
    fn device() -> Device;
}

/// The truth: the materialised reference in f64 on the CPU.
pub struct Truth;

impl On for Truth {
    #[allow(deprecated)]
    fn device() -> Device {
        Device::ndarray()
    }
}

/// The op's backward on the CubeCL backend, called directly (as `Autodiff` calls it):
/// `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn op_backward(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    out: Tensor<4>,
    lse: Tensor<3>,
    d_out: Tensor<4>,
    options: AttentionOptions,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    fn prim<const D: usize>(t: Tensor<D>) -> burn::backend::tensor::FloatTensor<Cube> {
        t.try_into_primitive::<Cube>().expect("a CubeCL tensor")
    }
    let (dq, dk, dv) = Cube::banded_attention_backward(
        prim(q),
        prim(k),
        prim(v),
        prim(out),
        prim(lse),
        prim(d_out),
        options,
    );
    let back = |t| Tensor::<4>::from_primitive::<Cube>(t);
    (back(dq), back(dk), back(dv))
}

/// A high-level tensor on a CubeCL device as the kernels' launchers take it.
pub fn cube_primitive<const D: usize>(t: Tensor<D>) -> CubeTensor {
    let fused = t.try_into_primitive::<Cube>().expect("a CubeCL tensor");
    fused
        .client
        .clone()
        .resolve_tensor_float::<CubeBackend>(fused)
}

/// The values of a launcher's (contiguous) output, as f64.
pub fn cube_to_f64(t: CubeTensor) -> Vec<f64> {
    let dtype = t.dtype;
    let bytes = t.client.read_one(t.handle).expect("the output reads back");
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| burn::tensor::f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| burn::tensor::bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        other => panic!("a launcher output in {other:?}"),
    }
}

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
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch;
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

pub fn tensor(x: &(Vec<f32>, [usize; 4]), dtype: DType, device: &Device) -> Tensor<4> {
    let t = Tensor::<4>::from_data(TensorData::new(x.0.clone(), x.1), device);
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

pub fn to_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    let t = if t.dtype() == DType::F64 {
        t
    } else {
        t.cast(DType::F32)
    };
    t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()
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
    let device = Truth::device();
    let pattern = KeyPattern::band(case.window, case.causal);
    let scale = 1.0 / (case.dim as f64).sqrt();
    let (o, l) = reference_attention(
        tensor(&x.q, DType::F64, &device),
        tensor(&x.k, DType::F64, &device),
        tensor(&x.v, DType::F64, &device),
        &pattern,
        scale,
        None,
        None,
    );
    (to_f64(o), to_f64(l))
}

/// Runs a kernel (through `attention_with_lse`, which must not fall back to the tiled
/// tensor ops) on `B`'s device in `dtype`.
pub fn kernel<B: On>(case: &Case, x: &Inputs, dtype: DType) -> (Vec<f64>, Vec<f64>, DType) {
    let device = B::device();
    let log = DispatchLog::new();
    let options = case
        .options()
        .with_kernel(KernelPolicy::Require)
        .with_log(log.clone());
    let (o, l) = attention_with_lse(
        tensor(&x.q, dtype, &device),
        tensor(&x.k, dtype, &device),
        tensor(&x.v, dtype, &device),
        &options,
    );
    assert_eq!(o.dtype(), dtype, "output keeps the input dtype");
    let lse_dtype = l.dtype();
    let (o, l) = (to_f64(o), to_f64(l));
    let served = log.of(Pass::Forward);
    assert!(
        served.len() == 1 && served[0].served.is_kernel(),
        "{case:?}: {served:?}"
    );
    (o, l, lse_dtype)
}

/// The reference computed on the GPU backend in a low precision.
pub fn low_precision_reference<B: On>(
    case: &Case,
    x: &Inputs,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>) {
    let device = B::device();
    let pattern = KeyPattern::band(case.window, case.causal);
    let scale = 1.0 / (case.dim as f64).sqrt();
    let (o, l) = reference_attention(
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

pub fn check_f32<B: On>(case: Case) {
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

pub fn check_low<B: On>(case: Case, dtype: DType) {
    check_low_against::<B>(case, dtype, false)
}

/// [`check_low`] with the low-precision reference run on the host
/// ([`host_low_precision_reference`]): on CUDA, Burn's own kernels compile and tune per
/// shape, which costs about a minute per case of the grid.
pub fn check_low_host<B: On>(case: Case, dtype: DType) {
    check_low_against::<B>(case, dtype, true)
}

fn check_low_against<B: On>(case: Case, dtype: DType, host_reference: bool) {
    let x = inputs(&case, 11 + case.seq_k as u64 * 17 + case.dim as u64);
    let start = std::time::Instant::now();
    let (to, tl) = truth(&case, &x);
    let truth_s = start.elapsed().as_secs_f64();
    let (ko, kl, lse_dtype) = kernel::<B>(&case, &x, dtype);
    let kernel_s = start.elapsed().as_secs_f64() - truth_s;
    assert_eq!(lse_dtype, DType::F32, "lse is f32");
    let (ro, rl) = if host_reference {
        host_low_precision_reference(&case, &x, dtype)
    } else {
        low_precision_reference::<B>(&case, &x, dtype)
    };
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

/// Rounds `x` to `dtype` (f16 or bf16) and back.
fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => burn::tensor::f16::from_f32(x).to_f32(),
        DType::BF16 => burn::tensor::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `t`'s values rounded to `dtype` (kept as f32), so that the host truth sees the inputs the
/// device sees.
fn rounded(t: (Vec<f32>, [usize; 4]), dtype: DType) -> (Vec<f32>, [usize; 4]) {
    (t.0.iter().map(|&x| round_to(x, dtype)).collect(), t.1)
}

/// [`rounded`] on each of q, k and v.
fn rounded_inputs(x: Inputs, dtype: DType) -> Inputs {
    Inputs {
        q: rounded(x.q, dtype),
        k: rounded(x.k, dtype),
        v: rounded(x.v, dtype),
    }
}

/// Rows of the materialised reference (`reference_attention`) evaluated on the host in
/// `dtype`: inputs rounded to it, every tensor op's result rounded as the op would store it
/// (matmuls and sums accumulate in f32 and round once, as GPU kernels do). Shared by the
/// forward and backward host references.
struct LowPrecisionRows<'a> {
    case: &'a Case,
    x: &'a Inputs,
    dtype: DType,
    scale: f32,
    visible: Vec<bool>,
}

impl<'a> LowPrecisionRows<'a> {
    fn new(case: &'a Case, x: &'a Inputs, dtype: DType) -> Self {
        let (seq_q, seq_k) = (case.seq_q, case.seq_k);
        let pattern = KeyPattern::band(case.window, case.causal);
        let visible = if seq_q > 0 && seq_k > 0 {
            pattern
                .tile_mask(0..seq_q, 0..seq_k, seq_q, seq_k, &Truth::device())
                .into_data()
                .try_to_vec::<bool>()
                .expect("bool mask")
        } else {
            Vec::new()
        };
        let scale = round_to((1.0 / (case.dim as f64).sqrt()) as f32, dtype);
        Self {
            case,
            x,
            dtype,
            scale,
            visible,
        }
    }

    fn r(&self, v: f32) -> f32 {
        round_to(v, self.dtype)
    }

    /// Element `c` of row `j` of kv head `kvh` of batch `b` of `k` or `v`, rounded.
    fn kv(&self, t: &(Vec<f32>, [usize; 4]), b: usize, kvh: usize, j: usize, c: usize) -> f32 {
        let [_, kv_heads, seq_k, width] = t.1;
        self.r(t.0[((b * kv_heads + kvh) * seq_k + j) * width + c])
    }

    /// Element `c` of query row `i` of head `h` of a `[b, h, seq_q, width]` tensor, rounded.
    fn row(&self, t: &(Vec<f32>, [usize; 4]), b: usize, h: usize, i: usize, c: usize) -> f32 {
        let [_, heads, seq_q, width] = t.1;
        self.r(t.0[((b * heads + h) * seq_q + i) * width + c])
    }

    /// The forward of every row: the output `P V` (P through `round_p` where it enters the
    /// product, the sum accumulated in f32 and rounded once) and the lse, as the host
    /// references return them.
    fn forward(&self, round_p: impl Fn(f32) -> f32) -> (Vec<f64>, Vec<f64>) {
        let Case {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            value_dim,
            ..
        } = *self.case;
        let mut out = vec![0f64; batch * heads * seq_q * value_dim];
        let mut lse = vec![0f64; batch * heads * seq_q];
        let group = heads / kv_heads;
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..seq_q {
                    let (p, row_lse) = self.probabilities(b, h, i);
                    let p: Vec<f32> = p.into_iter().map(&round_p).collect();
                    let oi = ((b * heads + h) * seq_q + i) * value_dim;
                    for c in 0..value_dim {
                        let acc: f32 = (0..seq_k)
                            .map(|j| p[j] * self.kv(&self.x.v, b, h / group, j, c))
                            .sum();
                        out[oi + c] = self.r(acc) as f64;
                    }
                    lse[(b * heads + h) * seq_q + i] = row_lse as f64;
                }
            }
        }
        (out, lse)
    }

    /// The probabilities of query row `i` of head `h` (0 where masked) and its lse.
    fn probabilities(&self, b: usize, h: usize, i: usize) -> (Vec<f32>, f32) {
        let case = self.case;
        let kvh = h / (case.heads / case.kv_heads);
        let s: Vec<f32> = (0..case.seq_k)
            .map(|j| {
                if self.visible[i * case.seq_k + j] {
                    let dot: f32 = (0..case.dim)
                        .map(|c| self.row(&self.x.q, b, h, i, c) * self.kv(&self.x.k, b, kvh, j, c))
                        .sum();
                    self.r(self.r(dot) * self.scale)
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mut m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            m = 0.0;
        }
        let w: Vec<f32> = s.iter().map(|&sj| self.r(self.r(sj - m).exp())).collect();
        let sum = self.r(w.iter().sum::<f32>());
        let p = w
            .iter()
            .map(|&wj| self.r(wj / sum.max(f32::MIN_POSITIVE)))
            .collect();
        (p, self.r(m + self.r(sum.ln())))
    }
}

/// The materialised reference (`reference_attention`) evaluated on the host in `dtype`:
/// inputs rounded to it, and every tensor op's result rounded as the op would store it
/// (matmuls and sums accumulate in f32 and round once, as GPU kernels do).
pub fn host_low_precision_reference(case: &Case, x: &Inputs, dtype: DType) -> (Vec<f64>, Vec<f64>) {
    LowPrecisionRows::new(case, x, dtype).forward(|p| p)
}

/// Rounds `x` to tf32 as `cvt.rna.tf32.f32` does: the 13 low mantissa bits rounded to
/// nearest, ties away from zero (adding half a tf32 ulp to the magnitude bits, then
/// truncating).
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & !0x1fff)
}

/// The materialised reference with tf32 products, evaluated on the host: Q, K and V rounded
/// to tf32 ([`round_tf32`]), scores and sums in f32, the probabilities rounded to tf32 where
/// they enter `P V` (accumulated in f32): what attention with tf32 matmuls computes
/// (PyTorch's `allow_tf32`). The low-precision reference of the tf32 kernel's test.
pub fn host_tf32_reference(case: &Case, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let round = |t: &(Vec<f32>, [usize; 4])| (t.0.iter().map(|&v| round_tf32(v)).collect(), t.1);
    let xr = Inputs {
        q: round(&x.q),
        k: round(&x.k),
        v: round(&x.v),
    };
    // In f32 the rows round nothing themselves: the inputs are already tf32.
    LowPrecisionRows::new(case, &xr, DType::F32).forward(round_tf32)
}

/// Runs one forward launcher directly on the CubeCL primitives of `B`'s device (no dispatch, no
/// environment switch) in f32, the queries a strided view as in the backward checks.
/// Returns the inputs, the f64 truth and the kernel's output and lse, or why the launcher
/// declined.
#[allow(clippy::type_complexity)]
pub fn run_forward_launcher<B>(
    case: &Case,
    seed: u64,
    kernel: ForwardKernel,
) -> Result<(Inputs, [Vec<f64>; 2], [Vec<f64>; 2]), Unsupported>
where
    B: On,
{
    let x = inputs(case, seed);
    let device = B::device();
    let q = tensor(&seq_major(&x.q), DType::F32, &device).swap_dims(1, 2);
    let k = tensor(&x.k, DType::F32, &device);
    let v = tensor(&x.v, DType::F32, &device);
    let options = case.options();
    let window = options.effective_window();
    let band = BandArgs {
        scale: options.scale_for(case.dim) as f32,
        left: window.left,
        right: window.right,
    };
    let forced = ForcedPlan::default();
    let (out, lse) = flash_forward_with(
        kernel,
        cube_primitive(q),
        cube_primitive(k),
        cube_primitive(v),
        band,
        &forced,
    )?;
    let (ko, kl) = (cube_to_f64(out), cube_to_f64(lse));
    let (to, tl) = truth(case, &x);
    Ok((x, [to, tl], [ko, kl]))
}

/// The tf32 forward (run by [`run_forward_launcher`]) against the f64 truth: its output and
/// lse errors within 3x those of the host tf32 reference ([`host_tf32_reference`]), with a floor of 1e-3. Panics
/// when the launcher declines.
pub fn check_tf32_kernel<B>(case: Case)
where
    B: On,
{
    let seed = 13 + case.seq_q as u64 * 19 + case.dim as u64;
    let (x, [to, tl], [ko, kl]) = run_forward_launcher::<B>(&case, seed, ForwardKernel::Tf32)
        .unwrap_or_else(|e| panic!("{case:?}: the tf32 kernel declined: {e}"));
    let (ro, rl) = host_tf32_reference(&case, &x);
    let (eo, el) = (max_err(&ko, &to), max_err(&kl, &tl));
    let (reo, rel) = (max_err(&ro, &to), max_err(&rl, &tl));
    eprintln!("tf32 {case:?}: out err {eo:e} (ref {reo:e}), lse err {el:e} (ref {rel:e})");
    let floor = 1e-3;
    assert!(
        eo <= 3.0 * reo.max(floor),
        "{case:?} tf32: kernel out err {eo:e} > 3x reference err {reo:e}"
    );
    assert!(
        el <= 3.0 * rel.max(floor),
        "{case:?} tf32: kernel lse err {el:e} > 3x reference err {rel:e}"
    );
}

/// Gradients of `sum(reference_attention(q, k, v) * w)` evaluated on the host in `dtype`,
/// op by op as autodiff of the materialised reference runs them, each result rounded:
/// `dV = P^T dO`, `dP = dO V^T`, softmax's `dS = P (dP - rowsum(P dP))`, the scale, then
/// `dQ = dS K` and `dK = dS^T Q` (matmuls accumulate in f32 and round once; dK and dV sum
/// the query heads of a kv head in f32). The low-precision reference of the backward tests:
/// Burn's own low-precision autodiff compiles and tunes per shape on the device.
pub fn host_low_precision_gradients(
    case: &Case,
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    dtype: DType,
) -> [Vec<f64>; 3] {
    let rows = LowPrecisionRows::new(case, x, dtype);
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
    let group = heads / kv_heads;
    let mut dq = vec![0f32; batch * heads * seq_q * dim];
    let mut dk = vec![0f32; batch * kv_heads * seq_k * dim];
    let mut dv = vec![0f32; batch * kv_heads * seq_k * value_dim];
    for b in 0..batch {
        for h in 0..heads {
            let kvh = h / group;
            // Per row: P, then the scaled dS (0 where masked).
            let mut p_all = Vec::with_capacity(seq_q);
            let mut g_all = Vec::with_capacity(seq_q);
            for i in 0..seq_q {
                let (p, _) = rows.probabilities(b, h, i);
                let dp: Vec<f32> = (0..seq_k)
                    .map(|j| {
                        let dot: f32 = (0..value_dim)
                            .map(|c| rows.row(w, b, h, i, c) * rows.kv(&x.v, b, kvh, j, c))
                            .sum();
                        rows.r(dot)
                    })
                    .collect();
                let d = rows.r(p.iter().zip(&dp).map(|(&a, &c)| rows.r(a * c)).sum::<f32>());
                let g: Vec<f32> = p
                    .iter()
                    .zip(&dp)
                    .map(|(&pj, &dpj)| rows.r(rows.r(pj * rows.r(dpj - d)) * rows.scale))
                    .collect();
                p_all.push(p);
                g_all.push(g);
            }
            for i in 0..seq_q {
                for c in 0..dim {
                    let acc: f32 = (0..seq_k)
                        .map(|j| g_all[i][j] * rows.kv(&x.k, b, kvh, j, c))
                        .sum();
                    dq[((b * heads + h) * seq_q + i) * dim + c] = rows.r(acc);
                }
            }
            for j in 0..seq_k {
                for c in 0..dim {
                    let acc: f32 = (0..seq_q)
                        .map(|i| g_all[i][j] * rows.row(&x.q, b, h, i, c))
                        .sum();
                    dk[((b * kv_heads + kvh) * seq_k + j) * dim + c] += rows.r(acc);
                }
                for c in 0..value_dim {
                    let acc: f32 = (0..seq_q)
                        .map(|i| p_all[i][j] * rows.row(w, b, h, i, c))
                        .sum();
                    dv[((b * kv_heads + kvh) * seq_k + j) * value_dim + c] += rows.r(acc);
                }
            }
        }
    }
    let round = |t: Vec<f32>| t.into_iter().map(|v| rows.r(v) as f64).collect();
    [round(dq), round(dk), round(dv)]
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
    // Grouped calls whose every query sees every key run each group's query heads as rows
    // of one head: one decoded token against its cache, three queries over all keys.
    cases.push(Case::new(1, 97, 64).gqa(8, 2).causal().batch(2));
    cases.push(Case::new(3, 50, 32).gqa(6, 1));
    // Value dim differing from the head dim.
    let mut c = Case::new(40, 40, 32).causal();
    c.value_dim = 80;
    cases.push(c);
    // Odd head and value dims (register tiles with idle columns).
    let mut c = Case::new(50, 70, 17).window(Some(30), Some(4));
    c.value_dim = 24;
    cases.push(c);
    let mut c = Case::new(33, 40, 200).causal();
    c.value_dim = 40;
    cases.push(c);
    // Large logits.
    cases.push(Case::new(64, 64, 64).gain(30.0));
    cases.push(Case::new(64, 64, 64).gain(30.0).causal());
    // Batches above 1 (batch and head offsets), with GQA and a window.
    cases.push(Case::new(33, 33, 64).gqa(4, 2).causal().batch(3));
    cases.push(Case::new(97, 60, 32).window(Some(7), Some(2)).batch(2));
    cases
}

/// Whether two results hold the same bits, element by element.
pub fn same_bits(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Gradients of `sum(attention(q, k, v) * w)` with respect to q, k, v.
fn attention_gradients<B>(
    case: &Case,
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    ours: bool,
) -> [Vec<f64>; 3]
where
    B: On,
{
    attention_gradients_in::<B>(case, x, w, ours, DType::F32)
}

/// [`attention_gradients`] with the inputs and `w` in `dtype`.
fn attention_gradients_in<B>(
    case: &Case,
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    ours: bool,
    dtype: DType,
) -> [Vec<f64>; 3]
where
    B: On,
{
    let device = B::device().autodiff();
    let q = tensor(&x.q, dtype, &device).require_grad();
    let k = tensor(&x.k, dtype, &device).require_grad();
    let v = tensor(&x.v, dtype, &device).require_grad();
    let out = if ours {
        burn_attn_core::attention(q.clone(), k.clone(), v.clone(), &case.options())
    } else {
        let pattern = KeyPattern::band(case.window, case.causal);
        let scale = 1.0 / (case.dim as f64).sqrt();
        reference_attention(q.clone(), k.clone(), v.clone(), &pattern, scale, None, None).0
    };
    let grads = (out * tensor(w, dtype, &device)).sum().backward();
    let flat = |t: Tensor<4>| to_f64(t.grad(&grads).expect("gradient"));
    [flat(q), flat(k), flat(v)]
}

/// Training through the op on `B`'s device with autodiff (forward kernel, backward kernels from the saved
/// O and lse, or their tiled fallbacks) against autodiff of the materialised reference in
/// f64 on the CPU.
pub fn check_gradients<B>(case: Case)
where
    B: On,
{
    let x = inputs(&case, 23 + case.seq_q as u64 * 7 + case.dim as u64);
    let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
    let w = uniform(&mut StdRng::seed_from_u64(99), shape, 1.0);
    let got = attention_gradients::<B>(&case, &x, &w, true);
    let want = attention_gradients_in::<Truth>(&case, &x, &w, false, DType::F64);
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
        // A decoded token of a grouped call (its heads packed as rows).
        Case::new(1, 97, 64).gqa(8, 2).causal(),
    ]
}

/// `[b, h, s, d]` data laid out as `[b, s, h, d]`.
fn seq_major(x: &(Vec<f32>, [usize; 4])) -> (Vec<f32>, [usize; 4]) {
    let [b, h, s, d] = x.1;
    let mut data = vec![0.0; x.0.len()];
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                let from = ((bi * h + hi) * s + si) * d;
                let to = ((bi * s + si) * h + hi) * d;
                data[to..to + d].copy_from_slice(&x.0[from..from + d]);
            }
        }
    }
    (data, [b, s, h, d])
}

/// The backward kernels' gradients for `case` on `B`'s device: the
/// forward (kernel) gives O and lse, then the op's backward runs on `d_out = w` (the
/// matrix-unit kernels for f16/bf16 on CUDA, the portable ones otherwise). `Err` with the
/// last kernel's reason when every backward kernel declines.
fn kernel_backward<B>(
    case: &Case,
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    dtype: DType,
    forced: &ForcedPlan,
) -> Result<[Vec<f64>; 3], Unsupported>
where
    B: On,
{
    let device = B::device();
    // Queries as a strided view of a [b, seq, h, d] buffer (the kernels take any strides).
    let q = tensor(&seq_major(&x.q), dtype, &device).swap_dims(1, 2);
    let k = tensor(&x.k, dtype, &device);
    let v = tensor(&x.v, dtype, &device);
    let options = case.options();
    let (out, lse) = attention_with_lse(q.clone(), k.clone(), v.clone(), &options);
    let d_out = tensor(w, dtype, &device);
    let log = DispatchLog::new();
    let mut options = options.with_log(log.clone());
    if !forced.is_default() {
        options = options.with_forced_plan(*forced);
    }
    let (dq, dk, dv) = op_backward(q, k, v, out, lse, d_out, options);
    let dispatch = log.of(Pass::Backward).pop().expect("the backward ran");
    if !forced.is_default() {
        assert_eq!(
            dispatch.served,
            Implementation::FlashMmaBackward,
            "{case:?}: {forced:?} asked, {dispatch:?}"
        );
    }
    if dispatch.served == Implementation::Tiled {
        return match dispatch.declined.last() {
            Some((_, Decline::Kernel(why))) => Err(why.clone()),
            other => panic!("{case:?}: no kernel tried: {other:?}"),
        };
    }
    let back = |t: Tensor<4>| {
        assert_eq!(t.dtype(), dtype, "gradients keep the input dtype");
        to_f64(t)
    };
    Ok([back(dq), back(dk), back(dv)])
}

/// The backward kernels (the op's backward dispatch, called directly on the CubeCL
/// device of `B`) against autodiff of the materialised reference in f64: f32 to an absolute
/// bound; f16/bf16 within 3x the error of the reference's gradients computed in the same
/// low precision on the device (DESIGN.md). Also runs the kernels twice and requires the
/// same bits.
pub fn check_backward_kernel<B>(case: Case, dtype: DType)
where
    B: On,
{
    check_backward_kernel_against::<B>(case, dtype, false, &ForcedPlan::default())
        .unwrap_or_else(|e| panic!("{case:?} {dtype:?}: backward kernel declined: {e}"))
}

/// [`check_backward_kernel_host`] under a forced plan of the matrix-unit backward, which
/// must serve the call.
pub fn check_backward_kernel_forced<B>(case: Case, dtype: DType, forced: &ForcedPlan)
where
    B: On,
{
    check_backward_kernel_against::<B>(case, dtype, true, forced)
        .unwrap_or_else(|e| panic!("{case:?} {dtype:?}: {forced:?} declined: {e}"))
}

/// [`check_backward_kernel`] with the host-evaluated low-precision reference
/// ([`host_low_precision_gradients`]) instead of Burn's low-precision autodiff on `B`'s device.
pub fn check_backward_kernel_host<B>(case: Case, dtype: DType)
where
    B: On,
{
    check_backward_kernel_against::<B>(case, dtype, true, &ForcedPlan::default())
        .unwrap_or_else(|e| panic!("{case:?} {dtype:?}: backward kernel declined: {e}"))
}

/// [`check_backward_kernel`] for a call the launchers may decline: `Err(why)` when they do
/// (nothing checked), else the same checks.
pub fn check_backward_kernel_if_taken<B>(case: Case, dtype: DType) -> Result<(), Unsupported>
where
    B: On,
{
    check_backward_kernel_against::<B>(case, dtype, false, &ForcedPlan::default())
}

fn check_backward_kernel_against<B>(
    case: Case,
    dtype: DType,
    host_reference: bool,
    forced: &ForcedPlan,
) -> Result<(), Unsupported>
where
    B: On,
{
    let x = inputs(
        &case,
        31 + case.seq_q as u64 * 5 + case.seq_k as u64 + case.dim as u64,
    );
    let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
    let w = uniform(&mut StdRng::seed_from_u64(77), shape, 1.0);
    let got = kernel_backward::<B>(&case, &x, &w, dtype, forced)?;
    let again = kernel_backward::<B>(&case, &x, &w, dtype, forced)?;
    let want = attention_gradients_in::<Truth>(&case, &x, &w, false, DType::F64);
    let low_ref = (dtype != DType::F32).then(|| {
        if host_reference {
            host_low_precision_gradients(&case, &x, &w, dtype)
        } else {
            attention_gradients_in::<B>(&case, &x, &w, false, dtype)
        }
    });
    for (n, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
        assert!(
            same_bits(&got[n], &again[n]),
            "{case:?} {dtype:?}: {name} differs between two runs"
        );
        let err = max_err(&got[n], &want[n]);
        match &low_ref {
            None => {
                let bound = 4.0 * f32_bound(&case);
                eprintln!("backward kernel {case:?} {name}: err {err:e} (bound {bound:e})");
                assert!(err <= bound, "{case:?}: {name} err {err:e} > {bound:e}");
            }
            Some(low) => {
                let ref_err = max_err(&low[n], &want[n]);
                let floor = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
                eprintln!(
                    "backward kernel {case:?} {dtype:?} {name}: err {err:e} (reference in \
                     {dtype:?}: {ref_err:e})"
                );
                assert!(
                    err <= 3.0 * ref_err.max(floor),
                    "{case:?} {dtype:?}: {name} err {err:e} > 3x reference err {ref_err:e}"
                );
            }
        }
    }
    Ok(())
}

/// The backward kernel grid: tails, seq_q != seq_k, head dims 32/64/80/256, every band kind,
/// GQA ratios 1, 2 and 8.
pub fn backward_grid() -> Vec<Case> {
    vec![
        Case::new(1, 1, 32),
        Case::new(1, 17, 64).causal(),
        Case::new(17, 1, 32).causal(),
        Case::new(17, 64, 80),
        Case::new(64, 17, 64).causal(),
        Case::new(97, 64, 32).window(Some(7), Some(2)),
        Case::new(64, 97, 64).window(Some(20), Some(0)).causal(),
        Case::new(97, 97, 80).causal().gqa(4, 2),
        Case::new(33, 64, 64).gqa(8, 1),
        Case::new(64, 64, 32)
            .window(Some(5), Some(9))
            .gqa(8, 1)
            .causal(),
        Case::new(40, 3, 32).causal(),
        Case::new(33, 40, 64).causal().gqa(4, 2).batch(2),
        // The widest head dim (the portable kernels' smallest tiles on 32 KiB devices).
        Case::new(20, 24, 256).causal(),
    ]
}

/// One band for [`check_online_softmax_probe`]: 16 or 32 query rows against `tiles` tiles
/// of 16 keys (`seq_k` of them real), key `j` visible to row `i` iff `i + offset - left <=
/// j <= i + offset + right`.
#[derive(Clone, Copy, Debug)]
pub struct ProbeBand {
    pub tiles: usize,
    pub seq_k: u32,
    pub offset: i32,
    pub left: i32,
    pub right: i32,
    pub scale: f32,
    /// Scores are uniform in `[-gain, gain]` before the scale, plus `ramp * tile`.
    pub gain: f32,
    /// How much each tile's raw scores rise over the previous tile's: rows' maxima move
    /// by more than the kernels' lag (a rescale) or by less (stale maxima, `p > 1`).
    pub ramp: f32,
}

/// The bands the probe runs: every tile visible (the unmasked path), causal, a tail tile,
/// rows whose first tiles hold no visible key (their maximum is still the sentinel when a
/// masked tile arrives), rows that never see a key, and large logits.
pub fn probe_bands() -> Vec<ProbeBand> {
    let band = |tiles, seq_k, offset, left, right, scale, gain, ramp| ProbeBand {
        tiles,
        seq_k,
        offset,
        left,
        right,
        scale,
        gain,
        ramp,
    };
    const ALL: i32 = 1 << 20;
    vec![
        band(3, 48, 0, ALL, ALL, 0.125, 4.0, 0.0),
        band(3, 48, 32, ALL, 0, 0.125, 4.0, 0.0),
        band(3, 40, 24, ALL, ALL, 0.3, 4.0, 0.0),
        band(4, 64, 20, 0, 12, 0.25, 4.0, 0.0),
        band(3, 48, -24, ALL, 0, 0.125, 4.0, 0.0),
        band(2, 32, 0, 5, 5, 1.0, 60.0, 0.0),
        // Maxima rising past the lag every tile, and by less than it (stale maxima).
        band(4, 64, 0, ALL, ALL, 0.5, 4.0, 20.0),
        band(5, 80, 0, ALL, ALL, 0.5, 4.0, 6.0),
        band(4, 64, 48, ALL, 0, 0.5, 4.0, 6.0),
    ]
}

/// The host's online softmax of `rows` query rows over the probe's tiles, in f64, with the
/// kernels' sentinel semantics: per tile the probabilities `exp(s * scale - m)` (0 where
/// masked) and per row `[m, l, output scale]`, `m` staying at `-3e38` while a row has seen
/// no key and moving only when a tile's maximum exceeds it by more than 8 (the kernels'
/// lazy rescale).
pub fn host_online_softmax(band: &ProbeBand, rows: usize, scores: &[f32]) -> (Vec<f64>, Vec<f64>) {
    const NEG_BIG: f64 = -3.0e38;
    // The kernels' `MAX_LAG`.
    const MAX_LAG: f64 = 8.0;
    let mut probs = vec![0.0; band.tiles * rows * 16];
    let mut state = vec![0.0; band.tiles * rows * 3];
    for row in 0..rows {
        let (mut m, mut l, mut o) = (NEG_BIG, 0.0f64, 1.0f64);
        for tile in 0..band.tiles {
            let visible = |key: usize| {
                let (i, j) = (row as i64, (tile * 16 + key) as i64);
                let (offset, left, right) =
                    (band.offset as i64, band.left as i64, band.right as i64);
                j >= i + offset - left && j <= i + offset + right && j < band.seq_k as i64
            };
            let s = |key: usize| scores[(tile * rows + row) * 16 + key] as f64 * band.scale as f64;
            let tile_max = (0..16)
                .filter(|&c| visible(c))
                .map(s)
                .fold(NEG_BIG, f64::max);
            // A row's maximum moves only past the kernels' lag (always for its first key).
            let m_new = if tile_max > m + MAX_LAG { tile_max } else { m };
            // 1 while the maximum stays (also at the sentinel), 0 when the first key arrives.
            let alpha = (m - m_new).exp();
            l *= alpha;
            o *= alpha;
            for key in 0..16 {
                let p = if visible(key) {
                    (s(key) - m_new).exp()
                } else {
                    0.0
                };
                probs[(tile * rows + row) * 16 + key] = p;
                l += p;
            }
            m = m_new;
            state[(tile * rows + row) * 3..][..3].copy_from_slice(&[m, l, o]);
        }
    }
    (probs, state)
}

/// The matrix-unit forwards' online-softmax step (`online_softmax_tile`, shared by
/// both of `flash_mma`'s products), run on `B` through its probe kernel with one and two row
/// tiles and accumulator vectors of 1, 2 and 4 floats, against [`host_online_softmax`]:
/// probabilities within 2e-6 absolute plus 2e-5 relative (f32 exponentials), sums and
/// output scales 2e-5 relative, maxima 1e-6 relative (f32 rounding of the scaled score;
/// the sentinel within that too).
pub fn check_online_softmax_probe<B>()
where
    B: On,
{
    let device = B::device();
    for (n, band) in probe_bands().into_iter().enumerate() {
        for rows in [16usize, 32] {
            let mut rng = StdRng::seed_from_u64(7 + n as u64 + rows as u64);
            let scores: Vec<f32> = (0..band.tiles * rows * 16)
                .map(|i| {
                    rng.random_range(-band.gain..band.gain) + band.ramp * (i / (rows * 16)) as f32
                })
                .collect();
            let (want_p, want_s) = host_online_softmax(&band, rows, &scores);
            for vs in [1usize, 2, 4] {
                let t = Tensor::<3>::from_data(
                    TensorData::new(scores.clone(), [band.tiles, rows, 16]),
                    &device,
                );
                let (p, st) = online_softmax_probe(
                    cube_primitive(t),
                    band.scale,
                    band.offset,
                    band.left,
                    band.right,
                    band.seq_k,
                    vs,
                );
                let (got_p, got_s) = (cube_to_f64(p), cube_to_f64(st));
                for (i, (g, w)) in got_p.iter().zip(&want_p).enumerate() {
                    assert!(
                        (g - w).abs() <= 2e-6 + 2e-5 * w.abs(),
                        "{band:?} rows {rows} vector {vs}: probability {i} (tile {}, row {}, \
                         key {}) {g} vs {w}",
                        i / (rows * 16),
                        i / 16 % rows,
                        i % 16
                    );
                }
                for (i, (g, w)) in got_s.iter().zip(&want_s).enumerate() {
                    let what = ["maximum", "sum", "output scale"][i % 3];
                    let tol = if i % 3 == 0 {
                        1e-6 * w.abs().max(1.0)
                    } else {
                        2e-5 * w.abs().max(1e-30)
                    };
                    assert!(
                        (g - w).abs() <= tol,
                        "{band:?} rows {rows} vector {vs}: {what} of row {} after tile {}: \
                         {g} vs {w}",
                        i / 3 % rows,
                        i / (3 * rows)
                    );
                }
            }
        }
    }
}

/// The heavy-first cube order as the kernels compute it (`cube_order_probe`) against the
/// order written out here: the natural order (group 0), groups that divide the heads, a
/// smaller last group, one group wider than the heads, one block per head; query blocks
/// (heaviest last) and key blocks (heaviest first). Each expected order is a permutation
/// of the grid's (block, head) pairs by construction, so equality shows the kernels'
/// mapping takes every pair exactly once.
pub fn check_cube_order<B>()
where
    B: On,
{
    let device = B::device();
    let like = cube_primitive(Tensor::<1>::zeros([1], &device));
    for (blocks, heads, group) in [
        (8, 16, 0),
        (8, 16, 4),
        (5, 7, 3),
        (3, 5, 8),
        (1, 9, 2),
        (17, 12, 5),
    ] {
        for heaviest_last in [true, false] {
            let mut want = Vec::new();
            if group == 0 {
                for head in 0..heads {
                    for block in 0..blocks {
                        want.extend([block as f64, head as f64]);
                    }
                }
            } else {
                for first in (0..heads).step_by(group) {
                    for step in 0..blocks {
                        let block = if heaviest_last {
                            blocks - 1 - step
                        } else {
                            step
                        };
                        for head in first..(first + group).min(heads) {
                            want.extend([block as f64, head as f64]);
                        }
                    }
                }
            }
            let got = cube_to_f64(cube_order_probe(
                &like,
                blocks,
                heads,
                group as u32,
                heaviest_last,
            ));
            assert_eq!(
                got, want,
                "cube order of {blocks} blocks x {heads} heads, groups of {group}, \
                 heaviest_last {heaviest_last}: (block, head) per launch index"
            );
        }
    }
}

/// The dispatch log through `B`'s device (fused, as users get it) with autodiff:
/// one entry per executed pass, recorded when the op runs; the forward served by
/// `forward`, the backward by a kernel; `KernelPolicy::Tiled` served by the tiled tensor
/// ops with its reason; with tf32 allowed, f32 served by `tf32_forward`.
pub fn check_dispatch<B: On>(forward: Implementation, tf32_forward: Implementation) {
    let case = Case::new(33, 40, 32).causal().gqa(4, 2);
    let x = inputs(&case, 3);
    let device = B::device().autodiff();
    let log = DispatchLog::new();
    let options = case.options().with_log(log.clone());
    let q = tensor(&x.q, DType::F32, &device).require_grad();
    let k = tensor(&x.k, DType::F32, &device).require_grad();
    let v = tensor(&x.v, DType::F32, &device).require_grad();
    let out = burn_attn_core::attention(q.clone(), k.clone(), v.clone(), &options);
    let grads = out.sum().backward();
    let _ = to_f64(q.grad(&grads).expect("dq"));
    let entries = log.entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(
        (entries[0].pass, entries[0].served),
        (Pass::Forward, forward)
    );
    assert_eq!(entries[1].pass, Pass::Backward);
    assert!(entries[1].served.is_kernel(), "{:?}", entries[1]);

    let log = DispatchLog::new();
    let tiled = case
        .options()
        .with_kernel(KernelPolicy::Tiled)
        .with_log(log.clone());
    let (qi, ki, vi) = (q.clone().inner(), k.clone().inner(), v.clone().inner());
    let _ = to_f64(burn_attn_core::attention(
        qi.clone(),
        ki.clone(),
        vi.clone(),
        &tiled,
    ));
    let entries = log.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].served, Implementation::Tiled);
    assert_eq!(
        entries[0].declined,
        vec![
            (Implementation::FlashMma, Decline::TiledRequested),
            (Implementation::FlashUnit, Decline::TiledRequested)
        ]
    );

    let log = DispatchLog::new();
    let tf32 = case.options().with_tf32(true).with_log(log.clone());
    let _ = to_f64(burn_attn_core::attention(qi, ki, vi, &tf32));
    let entries = log.entries();
    assert_eq!(entries[0].served, tf32_forward, "{entries:?}");
}

/// Queries for the NaN rule: 40 rows aligned to the last of 24 keys, causal, so rows 0..16
/// see no key; query head 0 gets a NaN in row 20 (which sees keys 0..4) and in row 3
/// (which sees none).
fn nan_rule_case() -> (Case, Inputs, Inputs) {
    let case = Case::new(40, 24, 32).causal();
    let clean = inputs(&case, 21);
    let mut q = clean.q.clone();
    q.0[NAN_ROW * case.dim + 7] = f32::NAN;
    q.0[DEAD_NAN_ROW * case.dim + 5] = f32::NAN;
    let poisoned = Inputs {
        q,
        k: clean.k.clone(),
        v: clean.v.clone(),
    };
    (case, clean, poisoned)
}

/// The output weights of the NaN rule's backward (`dO`).
fn nan_rule_weights(case: &Case) -> (Vec<f32>, [usize; 4]) {
    let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
    uniform(&mut StdRng::seed_from_u64(78), shape, 1.0)
}

/// The query row of [`nan_rule_case`] that sees keys and holds a NaN.
const NAN_ROW: usize = 20;
/// The query row of [`nan_rule_case`] that sees no key and holds a NaN.
const DEAD_NAN_ROW: usize = 3;

/// Checks rows of width `width` (`[batch * heads, rows, width]` flattened) of a call with
/// the NaN inputs against the same call without: row [`NAN_ROW`] of the first head is all
/// NaN, every other row has the clean call's bits.
fn assert_only_nan_row(name: &str, got: &[f64], clean: &[f64], rows: usize, width: usize) {
    assert_eq!(got.len(), clean.len());
    for (r, (g, c)) in got.chunks(width).zip(clean.chunks(width)).enumerate() {
        if r == NAN_ROW {
            assert!(g.iter().all(|x| x.is_nan()), "{name} row {r}: {g:?}");
        } else {
            assert!(
                same_bits(g, c),
                "{name} row {} of head {}: {g:?} vs {c:?}",
                r % rows,
                r / rows
            );
        }
    }
}

/// The NaN rule (DESIGN.md) through the kernels of `B`, forward and backward: a NaN in a
/// query row makes that row's output, log-sum-exp and dQ row NaN (never a silent 0) and
/// leaves every other row's output, log-sum-exp and dQ bits as they are without it; the
/// row that sees no key stays 0 with log-sum-exp `-inf`, and zero dQ, though its query
/// holds a NaN.
pub fn check_nan_rows<B>(dtype: DType)
where
    B: On,
{
    let (case, clean, poisoned) = nan_rule_case();
    let (o, l, _) = kernel::<B>(&case, &clean, dtype);
    let (o_nan, l_nan, _) = kernel::<B>(&case, &poisoned, dtype);
    assert_only_nan_row("output", &o_nan, &o, case.seq_q, case.value_dim);
    assert_only_nan_row("lse", &l_nan, &l, case.seq_q, 1);
    assert_eq!(l_nan[DEAD_NAN_ROW], f64::NEG_INFINITY);
    let w = nan_rule_weights(&case);
    let backward = |x| {
        kernel_backward::<B>(&case, x, &w, dtype, &ForcedPlan::default())
            .unwrap_or_else(|e| panic!("{dtype:?}: backward kernel declined: {e}"))
    };
    let [dq, ..] = backward(&clean);
    let [dq_nan, ..] = backward(&poisoned);
    assert_only_nan_row("dq", &dq_nan, &dq, case.seq_q, case.dim);
}

/// The block mask of a pattern, key padding and document ids built on `B`'s device: its
/// lists, read back, in the order `[partial, full, transposed partial, transposed full]`
/// (counts then indices).
fn block_mask_lists(device: &Device) -> Vec<Vec<i64>> {
    use burn::tensor::{Bool, Int};
    use burn_attn_core::{BlockCover, BlockGrid, BlockLayout, BlockMask};
    let (batch, seq) = (3, 150);
    let grid = BlockGrid::new(16, 8, seq, seq).unwrap();
    let pattern = KeyPattern {
        window: Window::symmetric(40),
        stride: Some(32),
        causal: true,
        blocks: Some(BlockLayout::random(seq, seq, 8, 0.9, 5).unwrap()),
    };
    let pad: Vec<bool> = (0..batch * seq)
        .map(|i| i % seq >= seq - 20 * (i / seq))
        .collect();
    let docs: Vec<i64> = (0..batch * seq)
        .map(|i| ((i % seq) / (30 + 7 * (i / seq))) as i64)
        .collect();
    let padding = Tensor::<2, Bool>::from_data(TensorData::new(pad, [batch, seq]), device);
    let docs = Tensor::<2, Int>::from_data(TensorData::new(docs, [batch, seq]), device);
    let cover = BlockCover::of_pattern(&pattern, grid, device)
        .unwrap()
        .intersect(BlockCover::of_key_padding(padding, grid).unwrap())
        .unwrap()
        .intersect(BlockCover::of_documents(docs.clone(), docs, grid).unwrap())
        .unwrap();
    let mask = BlockMask::new(cover);
    let ints = |data: TensorData| data.convert::<i64>().try_to_vec::<i64>().unwrap();
    vec![
        ints(mask.partial_count.into_data()),
        ints(mask.partial_index.into_data()),
        ints(mask.full_count.into_data()),
        ints(mask.full_index.into_data()),
        ints(mask.t_partial_count.into_data()),
        ints(mask.t_partial_index.into_data()),
        ints(mask.t_full_count.into_data()),
        ints(mask.t_full_index.into_data()),
    ]
}

/// The block mask builds with device ops on `B` exactly as on the CPU (the CPU build is
/// checked against the scalar definition in burn-attn-core's tests).
pub fn check_block_mask_on_device<B: On>() {
    let got = block_mask_lists(&B::device());
    let want = block_mask_lists(&Truth::device());
    assert_eq!(got, want);
    // The case is not degenerate: some blocks of each kind are listed.
    assert!(want[0].iter().sum::<i64>() > 0 && want[2].iter().sum::<i64>() > 0);
}

/// An Int tensor on a CubeCL device as i32, as the kernels' launchers take it.
pub fn cube_int_primitive<const D: usize>(t: Tensor<D, burn::tensor::Int>) -> CubeTensor {
    let fused = t
        .cast(burn::tensor::IntDType::I32)
        .try_into_primitive::<Cube>()
        .expect("a CubeCL tensor");
    fused
        .client
        .clone()
        .resolve_tensor_int::<CubeBackend>(fused)
}

/// The host truth of attention where `visible(b, i, j)` says which keys query `i` of batch
/// `b` sees (f64; rows that see nothing are 0 with lse -inf), flattened.
struct MaskedTruth {
    out: Vec<f64>,
    lse: Vec<f64>,
    /// `(dq, dk, dv)` for the output gradient given.
    grads: [Vec<f64>; 3],
    /// The score terms' gradients per batch and query head (`[b, h, n]`): the key bias's
    /// (the logits' gradient summed per key) and the reach's (summed per query, times the
    /// term's slope).
    term_grads: [Vec<f64>; 2],
}

/// Score-term data of the tests: a per-key bias per batch and head (`[batch, heads, n]`,
/// `-inf` on some keys) and a reach per query shared by the heads (`[batch, n]`), both
/// hashed from the position.
fn score_term_data(batch: usize, heads: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let key_bias = (0..batch * heads * n)
        .map(|at| {
            let (bh, j) = (at / n, at % n);
            if (j * 3 + bh) % 13 == 0 {
                f32::NEG_INFINITY
            } else {
                ((bh * 3 + j * 5) % 17) as f32 / 8.0 - 1.5
            }
        })
        .collect();
    let reach = (0..batch * n)
        .map(|at| 3.0 + ((at / n * 5 + at % n * 7) % 11) as f32 * 1.3)
        .collect();
    (key_bias, reach)
}

/// The score terms of query `i`, key `j` of self-attention as the kernels define them, in
/// f64: a key bias (`-inf` hides the key), a soft edge (the query's reach and the ramp)
/// and an ALiBi slope; `(bias, slope)` as [`Terms`] returns, `None` where a term hides the
/// key.
fn term_truth(
    key_bias: Option<f32>,
    edge: Option<(f32, f64)>,
    alibi: Option<f32>,
    i: usize,
    j: usize,
) -> Option<(f64, f64)> {
    let (mut bias, mut slope) = (0.0, 0.0);
    if let Some(m) = alibi {
        bias -= m as f64 * (j as f64 - i as f64).abs();
    }
    if let Some(kb) = key_bias {
        if kb == f32::NEG_INFINITY {
            return None;
        }
        bias += kb as f64;
    }
    if let Some((reach, ramp)) = edge {
        let distance = (j as f64 - i as f64).abs();
        let w = ((reach as f64 - distance) / ramp + 0.5).min(1.0);
        if w <= 1e-30 {
            return None;
        }
        bias += w.ln();
        slope = if w < 1.0 { 1.0 / (ramp * w) } else { 0.0 };
    }
    Some((bias, slope))
}

/// A call's score terms as the truth takes them: `(bias, slope)` of element `(b, h, i, j)`
/// (added to the scaled score; its derivative by the query's reach), `None` where a term
/// hides the key.
type Terms<'a> = &'a dyn Fn(usize, usize, usize, usize) -> Option<(f64, f64)>;

/// [`MaskedTruth`] of `x` under `visible`, with gradients for `d_out` (`[b, h, n, d]`);
/// with `dropout` (probability, seed), probabilities dropped by the kernels' hash
/// (`plan::dropout_hash`) leave the output and the kept ones are scaled by `1 / (1 - p)`.
fn masked_truth(
    x: &Inputs,
    case: &Case,
    visible: &dyn Fn(usize, usize, usize) -> bool,
    d_out: &(Vec<f32>, [usize; 4]),
    dropout: Option<(f64, u32)>,
    terms: Option<Terms>,
    softcap: Option<f64>,
) -> MaskedTruth {
    use burn_attn_core::kernels::plan::{dropout_hash, dropout_threshold};
    let (b, h, kvh, n, d) = (case.batch, case.heads, case.kv_heads, case.seq_q, case.dim);
    assert_eq!(
        (case.seq_k, case.value_dim),
        (n, d),
        "self-attention, value dim = head dim"
    );
    let scale = 1.0 / (d as f64).sqrt();
    let at = |t: &(Vec<f32>, [usize; 4]), i0: usize, i1: usize, i2: usize, i3: usize| {
        let [_, s1, s2, s3] = t.1;
        t.0[((i0 * s1 + i1) * s2 + i2) * s3 + i3] as f64
    };
    let (mut out, mut lse) = (vec![0.0; b * h * n * d], vec![f64::NEG_INFINITY; b * h * n]);
    let mut dq = vec![0.0; b * h * n * d];
    let (mut dk, mut dv) = (vec![0.0; b * kvh * n * d], vec![0.0; b * kvh * n * d]);
    let (mut d_bias, mut d_reach) = (vec![0.0; b * h * n], vec![0.0; b * h * n]);
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / (h / kvh);
            for i in 0..n {
                // (key, score, the bias's slope by the reach, the softcap's derivative)
                let scores: Vec<(usize, f64, f64, f64)> = (0..n)
                    .filter(|&j| visible(bi, i, j))
                    .filter_map(|j| {
                        let (bias, slope) = match terms {
                            Some(terms) => terms(bi, hi, i, j)?,
                            None => (0.0, 0.0),
                        };
                        let dot = (0..d)
                            .map(|c| at(&x.q, bi, hi, i, c) * at(&x.k, bi, kh, j, c))
                            .sum::<f64>();
                        let (score, d_cap) = match softcap {
                            Some(cap) => {
                                let t = (dot * scale / cap).tanh();
                                (cap * t, 1.0 - t * t)
                            }
                            None => (dot * scale, 1.0),
                        };
                        Some((j, score + bias, slope, d_cap))
                    })
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s.1 - m).exp()).sum();
                let row = (bi * h + hi) * n + i;
                lse[row] = m + sum.ln();
                let p: Vec<(usize, f64, f64, f64)> = scores
                    .iter()
                    .map(|&(j, s, slope, d_cap)| (j, (s - m).exp() / sum, slope, d_cap))
                    .collect();
                // The factor each probability takes in the output: 0 if dropped, else
                // 1 / (1 - p).
                let keep = |j: usize| match dropout {
                    None => 1.0,
                    Some((prob, seed)) => {
                        let pair = (bi * h + hi) as u32;
                        if dropout_hash(seed, pair, i as u32, j as u32) < dropout_threshold(prob) {
                            0.0
                        } else {
                            1.0 / (1.0 - prob)
                        }
                    }
                };
                for c in 0..d {
                    out[row * d + c] = p
                        .iter()
                        .map(|&(j, pj, _, _)| pj * keep(j) * at(&x.v, bi, kh, j, c))
                        .sum();
                }
                // dP_j = dO . V_j, D = dO . O, dS_j = P_j (dP_j - D).
                let d_row: f64 = (0..d)
                    .map(|c| at(d_out, bi, hi, i, c) * out[row * d + c])
                    .sum();
                for &(j, pj, slope, d_cap) in &p {
                    let key = (bi * kvh + kh) * n + j;
                    let dp: f64 = (0..d)
                        .map(|c| at(d_out, bi, hi, i, c) * at(&x.v, bi, kh, j, c))
                        .sum();
                    let d_logit = pj * (dp * keep(j) - d_row);
                    d_bias[(bi * h + hi) * n + j] += d_logit;
                    d_reach[row] += d_logit * slope;
                    let ds = d_logit * d_cap * scale;
                    for c in 0..d {
                        dv[key * d + c] += pj * keep(j) * at(d_out, bi, hi, i, c);
                        dq[row * d + c] += ds * at(&x.k, bi, kh, j, c);
                        dk[key * d + c] += ds * at(&x.q, bi, hi, i, c);
                    }
                }
            }
        }
    }
    MaskedTruth {
        out,
        lse,
        grads: [dq, dk, dv],
        term_grads: [d_bias, d_reach],
    }
}

/// The block-sparse forward and backward kernels on `B` in `dtype` against the host truth
/// on the same (rounded) inputs, for patterns (band, causal, strided columns, block
/// layouts), key padding, document ids and score terms (a per-key bias with `-inf` keys, a
/// soft edge from a per-query reach shared by the heads) alone and combined, batch 2 with
/// GQA and an odd length; empty rows are 0 with lse -inf and get zero gradients; the score
/// terms' gradients per batch and query head. f32 to 1e-4; f16/bf16
/// (the matrix-unit forward on CUDA) within the rounding of probabilities and outputs to
/// the dtype: 2e-3 (f16) or 1.6e-2 (bf16), relative to the largest gradient for gradients.
/// `backward`: the backward kernels the plans must pick for `dtype` on `B` (calls without
/// score terms or dropout).
pub fn check_sparse_kernels<B: On>(
    dtype: DType,
    backward: burn_attn_core::kernels::plan::BackwardKernel,
) {
    check_sparse_kernels_part::<B>(dtype, backward, 0, 1);
}

/// Part `part` of `parts` of [`check_sparse_kernels`]: every `parts`-th case from the
/// `part`-th (each case compiles its own kernels; parts run in separate processes compile
/// in parallel).
pub fn check_sparse_kernels_part<B: On>(
    dtype: DType,
    backward: burn_attn_core::kernels::plan::BackwardKernel,
    part: usize,
    parts: usize,
) {
    use burn::tensor::{Bool, Int};
    use burn_attn_core::kernels::launch::{
        flash_backward_sparse, flash_forward_sparse, sparse_blocks, BackwardInputs, BlockLists,
        SparseRules,
    };
    use burn_attn_core::{BlockCover, BlockGrid, BlockLayout, BlockMask};
    let device = B::device();
    // Cases in the order of the loops below; this part checks every `parts`-th.
    let mut case_at = 0usize;
    let case = Case {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 77,
        seq_k: 77,
        dim: 32,
        value_dim: 32,
        causal: false,
        window: Window::FULL,
        q_gain: 1.0,
    };
    let x = rounded_inputs(inputs(&case, 21), dtype);
    let d_out = rounded(inputs(&case, 22).q, dtype);
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    };
    let (n, batch) = (case.seq_q, case.batch);
    let q = tensor(&x.q, dtype, &device);
    let k = tensor(&x.k, dtype, &device);
    let v = tensor(&x.v, dtype, &device);
    let g = tensor(&d_out, dtype, &device);
    let forced = ForcedPlan::default();
    let (block_q, block_k) = sparse_blocks(
        &cube_primitive(q.clone()),
        &cube_primitive(k.clone()),
        &cube_primitive(v.clone()),
        &forced,
    )
    .unwrap();
    let heads = case.heads;
    // Score terms, with its ramp.
    let (key_bias, reach) = score_term_data(batch, heads, n);
    let ramp = 4.0f32;
    let alibi: Vec<f32> = (0..heads).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
    let softcap = 1.5f32;
    let term_of = |with: u8, b: usize, h: usize, i: usize, j: usize| {
        term_truth(
            (with & 1 != 0).then(|| key_bias[(b * heads + h) * n + j]),
            (with & 2 != 0).then(|| (reach[b * n + i], ramp as f64)),
            (with & 4 != 0).then(|| alibi[h]),
            i,
            j,
        )
    };
    // Lists on the kernel's tiles, and on blocks of two by three of them.
    for (block_q, block_k) in [(block_q, block_k), (2 * block_q, 3 * block_k)] {
        let grid = BlockGrid::new(block_q, block_k, n, n).unwrap();
        let pad: Vec<bool> = (0..batch * n)
            .map(|i| i % n >= n - 9 - 20 * (i / n))
            .collect();
        let docs: Vec<i64> = (0..batch * n)
            .map(|i| ((i % n) / (25 + 11 * (i / n))) as i64)
            .collect();
        let layout = BlockLayout::random(n, n, 8, 0.4, 3).unwrap();
        let patterns = [
            KeyPattern::band(Window::symmetric(20), false),
            KeyPattern {
                window: Window::new(Some(6), Some(0)),
                stride: Some(16),
                causal: true,
                blocks: None,
            },
            KeyPattern {
                blocks: Some(layout.clone()),
                ..KeyPattern::default()
            },
            KeyPattern {
                window: Window::new(Some(30), Some(5)),
                causal: true,
                stride: Some(7),
                blocks: Some(layout),
            },
        ];
        for (p_at, pattern) in patterns.iter().enumerate() {
            // Every rule alone on the band; the others with none or all of padding and
            // documents, the last also with dropout (each set of rules is a kernel to
            // compile).
            // Score terms (bit 0: key bias, bit 1: soft edge, bit 2: ALiBi, bit 3: a
            // softcap) alone on the band, the first two with padding and dropout, ALiBi
            // with a key bias, a softcap with a soft edge, padding and dropout.
            let masks: &[(bool, bool, bool, u8)] = match p_at {
                0 => &[
                    (false, false, false, 0),
                    (true, false, false, 0),
                    (false, true, false, 0),
                    (true, true, false, 0),
                    (false, false, true, 0),
                    (false, false, false, 1),
                    (false, false, false, 2),
                    (true, false, true, 3),
                    (false, false, false, 4 | 1),
                    (true, false, true, 8 | 2),
                ],
                3 => &[
                    (false, false, false, 0),
                    (true, true, false, 0),
                    (true, true, true, 0),
                ],
                _ => &[(false, false, false, 0), (true, true, false, 0)],
            };
            for &(with_pad, with_docs, with_drop, with_terms) in masks {
                let this_part = case_at % parts == part;
                case_at += 1;
                if !this_part {
                    continue;
                }
                let mut cover = BlockCover::of_pattern(pattern, grid, &device).unwrap();
                let mut rules = SparseRules {
                    left: pattern.window.left,
                    right: pattern.window.right,
                    causal: pattern.causal,
                    stride: pattern.stride,
                    ..SparseRules::default()
                };
                if let Some(l) = &pattern.blocks {
                    let active: Vec<i64> = l.active.iter().map(|&a| i64::from(a)).collect();
                    let active = Tensor::<1, Int>::from_data(
                        TensorData::new(active, [l.active.len()]),
                        &device,
                    );
                    rules.layout = Some((cube_int_primitive(active), l.block_q, l.block_k));
                }
                if with_pad {
                    let padding = Tensor::<2, Bool>::from_data(
                        TensorData::new(pad.clone(), [batch, n]),
                        &device,
                    );
                    cover = cover
                        .intersect(BlockCover::of_key_padding(padding.clone(), grid).unwrap())
                        .unwrap();
                    rules.padding = Some(cube_int_primitive(padding.int()));
                }
                if with_docs {
                    let ids = Tensor::<2, Int>::from_data(
                        TensorData::new(docs.clone(), [batch, n]),
                        &device,
                    );
                    cover = cover
                        .intersect(
                            BlockCover::of_documents(ids.clone(), ids.clone(), grid).unwrap(),
                        )
                        .unwrap();
                    rules.documents =
                        Some((cube_int_primitive(ids.clone()), cube_int_primitive(ids)));
                }
                if with_terms & 1 != 0 {
                    let bias = Tensor::<3>::from_data(
                        TensorData::new(key_bias.clone(), [batch, heads, n]),
                        &device,
                    );
                    let hidden = bias.clone().equal_elem(f32::NEG_INFINITY);
                    cover = cover
                        .intersect(BlockCover::of_hidden_keys(hidden, grid).unwrap())
                        .unwrap();
                    rules.key_bias = Some(cube_primitive(bias));
                }
                if with_terms & 2 != 0 {
                    let reach = Tensor::<3>::from_data(
                        TensorData::new(reach.clone(), [batch, 1, n]),
                        &device,
                    );
                    rules.soft_edge = Some((cube_primitive(reach), ramp));
                }
                if with_terms & 4 != 0 {
                    rules.alibi = Some(alibi.clone());
                }
                if with_terms & 8 != 0 {
                    rules.softcap = Some(softcap);
                }
                let dropout = with_drop.then_some((0.3, 0x00c0_ffee_u32));
                if let Some((p, seed)) = dropout {
                    let seed = Tensor::<1, Int>::from_data(
                        TensorData::new(vec![seed as i64], [1]),
                        &device,
                    );
                    rules.dropout = Some((p, cube_int_primitive(seed)));
                }
                let mask = BlockMask::new(cover);
                let lists = BlockLists {
                    block_q,
                    block_k,
                    partial_count: cube_int_primitive(mask.partial_count),
                    partial_index: cube_int_primitive(mask.partial_index),
                    full_count: cube_int_primitive(mask.full_count),
                    full_index: cube_int_primitive(mask.full_index),
                    t_partial_count: cube_int_primitive(mask.t_partial_count),
                    t_partial_index: cube_int_primitive(mask.t_partial_index),
                    t_full_count: cube_int_primitive(mask.t_full_count),
                    t_full_index: cube_int_primitive(mask.t_full_index),
                };
                let scale = 1.0 / (case.dim as f32).sqrt();
                let (out, lse) = flash_forward_sparse(
                    cube_primitive(q.clone()),
                    cube_primitive(k.clone()),
                    cube_primitive(v.clone()),
                    scale,
                    &lists,
                    &rules,
                    &forced,
                )
                .unwrap();
                let visible = |b: usize, i: usize, j: usize| {
                    pattern.visible(i, j, n, n)
                        && !(with_pad && pad[b * n + j])
                        && !(with_docs && docs[b * n + i] != docs[b * n + j])
                };
                let terms =
                    |b: usize, h: usize, i: usize, j: usize| term_of(with_terms, b, h, i, j);
                let want = masked_truth(
                    &x,
                    &case,
                    &visible,
                    &d_out,
                    dropout,
                    (with_terms != 0).then_some(&terms as Terms),
                    (with_terms & 8 != 0).then_some(softcap as f64),
                );
                let (got_out, got_lse) = (cube_to_f64(out.clone()), cube_to_f64(lse.clone()));
                let what = format!(
                    "{dtype:?} blocks {block_q} x {block_k}, pattern {p_at}, padding {with_pad}, \
                     documents {with_docs}, dropout {with_drop}, score terms {with_terms}"
                );
                let err = max_err(&got_out, &want.out);
                assert!(err < tol, "{what}: output error {err}");
                // Rows that see no key: lse exactly -inf and output exactly 0.
                let value_dim = case.value_dim;
                for (row, (g, w)) in got_lse.iter().zip(&want.lse).enumerate() {
                    if *w == f64::NEG_INFINITY {
                        let out_row = &got_out[row * value_dim..(row + 1) * value_dim];
                        assert!(
                            *g == f64::NEG_INFINITY && out_row.iter().all(|&o| o == 0.0),
                            "{what}: row {row} sees no key, got lse {g} and output {out_row:?}"
                        );
                    } else {
                        assert!((g - w).abs() < tol, "{what}: row {row} lse {g}, want {w}");
                    }
                }
                let grads = flash_backward_sparse(
                    BackwardInputs {
                        q: cube_primitive(q.clone()),
                        k: cube_primitive(k.clone()),
                        v: cube_primitive(v.clone()),
                        out,
                        lse,
                        d_out: cube_primitive(g.clone()),
                    },
                    scale,
                    &lists,
                    &rules,
                    &forced,
                )
                .unwrap();
                assert_eq!(grads.kernel, backward, "{what}: backward kernels");
                let (dq, dk, dv) = grads.qkv;
                let mut checks = vec![("dq", dq, &want.grads[0]), ("dk", dk, &want.grads[1])];
                checks.push(("dv", dv, &want.grads[2]));
                assert_eq!(grads.key_bias.is_some(), with_terms & 1 != 0, "{what}");
                assert_eq!(grads.reach.is_some(), with_terms & 2 != 0, "{what}");
                checks.extend(grads.key_bias.map(|g| ("key bias", g, &want.term_grads[0])));
                checks.extend(grads.reach.map(|g| ("reach", g, &want.term_grads[1])));
                for (name, got, want) in checks {
                    let err = max_err(&cube_to_f64(got), want);
                    let size = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
                    assert!(
                        err < tol * size,
                        "{what}: {name} error {err} (largest {size})"
                    );
                }
            }
        }
    }
}

/// Calls from several threads on one device give the same bits as the same calls made
/// one after another: one thread per case, each its own shape, so the kernels and plans
/// differ too.
pub fn check_concurrent_calls<B: On>(dtype: DType) {
    let cases = [
        Case::new(97, 97, 64).causal(),
        Case::new(33, 47, 32).gqa(4, 2),
        Case::new(130, 130, 64).window(Some(5), Some(9)).batch(2),
        Case::new(40, 3, 32).causal(),
    ];
    let inputs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| inputs(c, 20 + i as u64))
        .collect();
    let serial: Vec<_> = cases
        .iter()
        .zip(&inputs)
        .map(|(c, x)| kernel::<B>(c, x, dtype))
        .collect();
    let concurrent: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .zip(&inputs)
            .map(|(c, x)| scope.spawn(move || kernel::<B>(c, x, dtype)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a call"))
            .collect()
    });
    for (i, ((o1, l1, _), (o2, l2, _))) in serial.iter().zip(&concurrent).enumerate() {
        assert!(
            same_bits(o1, o2),
            "{dtype:?} case {i}: output differs from the serial call"
        );
        assert!(
            same_bits(l1, l2),
            "{dtype:?} case {i}: lse differs from the serial call"
        );
    }
}

/// The forward output and `(dq, dk, dv)` of `pattern_attention` with autodiff on
/// `device` (in `dtype`), for the loss `sum(out * w)`.
fn pattern_training(
    device: &Device,
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    pattern: &KeyPattern,
    padding: Option<&(Vec<bool>, [usize; 2])>,
    ours: Option<&AttentionOptions>,
    dtype: DType,
) -> [Vec<f64>; 4] {
    use burn::tensor::Bool;
    let device = device.clone().autodiff();
    let q = tensor(&x.q, dtype, &device).require_grad();
    let k = tensor(&x.k, dtype, &device).require_grad();
    let v = tensor(&x.v, dtype, &device).require_grad();
    let pad = padding
        .map(|(p, dims)| Tensor::<2, Bool>::from_data(TensorData::new(p.clone(), *dims), &device));
    let out = match ours {
        Some(options) => burn_attn_core::pattern_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            pattern,
            options,
            pad,
            0.0,
        ),
        None => {
            let scale = 1.0 / (x.q.1[3] as f64).sqrt();
            reference_attention(q.clone(), k.clone(), v.clone(), pattern, scale, pad, None).0
        }
    };
    let grads = (out.clone() * tensor(w, dtype, &device)).sum().backward();
    let flat = |t: Tensor<4>| to_f64(t.grad(&grads).expect("gradient"));
    [to_f64(out), flat(q), flat(k), flat(v)]
}

/// Training through `pattern_attention` on `B`'s device (fused, with autodiff): strided
/// columns, block layouts and key padding run the block-sparse kernels forward and
/// backward (the dispatch log says so), and their output and gradients match autodiff of
/// the materialised reference in f64 on the CPU; batch 2, GQA, odd lengths, a cross-length
/// call and rows that see no key. In `dtype` (inputs rounded to it on both sides), served
/// by the `served` forward and backward kernels.
pub fn check_sparse_training<B: On>(dtype: DType, served: (Implementation, Implementation)) {
    let base = Case {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 77,
        seq_k: 77,
        dim: 32,
        value_dim: 32,
        causal: false,
        window: Window::FULL,
        q_gain: 1.0,
    };
    let cross = Case { seq_q: 40, ..base };
    let (n, batch) = (base.seq_k, base.batch);
    // Batch 1 pads its first 12 keys: under the causal rule its first rows see nothing.
    let padding: (Vec<bool>, [usize; 2]) = (
        (0..batch * n)
            .map(|i| if i < n { i % n >= n - 15 } else { i % n < 12 })
            .collect(),
        [batch, n],
    );
    let strided = KeyPattern {
        window: Window::new(Some(6), Some(0)),
        stride: Some(16),
        causal: true,
        blocks: None,
    };
    let random = |seq_q| KeyPattern {
        blocks: Some(BlockLayout::random(seq_q, n, 8, 0.4, 3).unwrap()),
        ..KeyPattern::default()
    };
    let cases = [
        (base, random(n), Some(&padding)),
        (
            base,
            KeyPattern::band(Window::symmetric(20), false),
            Some(&padding),
        ),
        (base, strided, Some(&padding)),
        (cross, random(cross.seq_q), None),
    ];
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    for (at, (case, pattern, pad)) in cases.into_iter().enumerate() {
        let x = rounded_inputs(inputs(&case, 31 + at as u64), dtype);
        let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
        let w = rounded(uniform(&mut StdRng::seed_from_u64(98), shape, 1.0), dtype);
        let log = DispatchLog::new();
        let options = AttentionOptions::default()
            .with_log(log.clone())
            .with_kernel(KernelPolicy::Require);
        let got = pattern_training(&B::device(), &x, &w, &pattern, pad, Some(&options), dtype);
        let want = pattern_training(&Truth::device(), &x, &w, &pattern, pad, None, DType::F64);
        // Strided columns split into band calls (their padding gathered).
        let calls = (pattern.stride.is_none()).then_some(1);
        assert_calls_served(&log, served, calls, &format!("case {at}"));
        assert_training_close(&got, &want, tol, &format!("{dtype:?} case {at}"));
    }
}

/// That `log` shows `calls` forward entries served by `served.0` and as many backward
/// entries served by `served.1` (`None`: more than one of each).
#[track_caller]
fn assert_calls_served(
    log: &DispatchLog,
    served: (Implementation, Implementation),
    calls: Option<usize>,
    what: &str,
) {
    let entries = log.entries();
    let forward = entries.iter().filter(|d| d.pass == Pass::Forward).count();
    let each_served = entries.iter().all(|d| {
        d.served
            == if d.pass == Pass::Forward {
                served.0
            } else {
                served.1
            }
    });
    let count = calls.map_or(forward >= 2, |calls| forward == calls);
    assert!(
        count && each_served && entries.len() == 2 * forward,
        "{what}: {entries:?}"
    );
}

/// Training with dropout through `pattern_attention` on `B`'s device runs the
/// block-sparse kernels forward and backward (the mask itself is checked against the host
/// in [`check_sparse_kernels`]): two calls draw two seeds (their outputs differ where the
/// call without dropout is one output), every value is finite, and the mean output stays
/// that of the call without dropout (kept probabilities are scaled by `1 / (1 - p)`).
pub fn check_dropout_training<B: On>() {
    let case = Case::new(96, 96, 32).gqa(4, 2).batch(2);
    let x = inputs(&case, 41);
    let device = B::device().autodiff();
    let log = DispatchLog::new();
    let options = AttentionOptions::default()
        .with_log(log.clone())
        .with_kernel(KernelPolicy::Require);
    let pattern = KeyPattern::band(Window::symmetric(40), false);
    let run = |dropout: f64| {
        let q = tensor(&x.q, DType::F32, &device).require_grad();
        let k = tensor(&x.k, DType::F32, &device).require_grad();
        let v = tensor(&x.v, DType::F32, &device).require_grad();
        let out = burn_attn_core::pattern_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &pattern,
            &options,
            None,
            dropout,
        );
        let grads = out.clone().sum().backward();
        let dq = to_f64(q.grad(&grads).expect("dq"));
        (to_f64(out), dq)
    };
    let (plain, _) = run(0.0);
    log.clear();
    let (first, dq) = run(0.25);
    let (second, _) = run(0.25);
    let served: Vec<_> = log.entries().iter().map(|d| (d.pass, d.served)).collect();
    assert_eq!(
        served,
        [
            (Pass::Forward, Implementation::FlashUnitSparse),
            (Pass::Backward, Implementation::FlashUnitSparseBackward),
            (Pass::Forward, Implementation::FlashUnitSparse),
            (Pass::Backward, Implementation::FlashUnitSparseBackward),
        ]
    );
    assert!(first
        .iter()
        .chain(&second)
        .chain(&dq)
        .all(|v| v.is_finite()));
    assert!(max_err(&first, &plain) > 1e-2, "dropout changed nothing");
    assert!(max_err(&first, &second) > 1e-2, "two calls drew one mask");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let spread = plain.iter().map(|v| v.abs()).sum::<f64>() / plain.len() as f64;
    assert!(
        (mean(&first) - mean(&plain)).abs() < 0.1 * spread,
        "mean output {} against {} without dropout",
        mean(&first),
        mean(&plain)
    );
}

/// Calls without keys or queries under a block-sparse mask take the tiled ops (no block
/// to list) and give their empty or zero rows, as the band op does.
pub fn check_empty_masked_calls<B: On>() {
    use burn::tensor::Bool;
    let device = B::device();
    let pattern = KeyPattern {
        stride: Some(4),
        ..KeyPattern::band(Window::symmetric(4), false)
    };
    for (seq_q, seq_k) in [(5, 0), (0, 5)] {
        let q = Tensor::<4>::ones([1, 2, seq_q, 8], &device);
        let kv = Tensor::<4>::ones([1, 2, seq_k, 8], &device);
        let pad = Tensor::<2, Bool>::empty([1, seq_k], &device);
        let log = DispatchLog::new();
        let options = AttentionOptions::default().with_log(log.clone());
        let out = burn_attn_core::pattern_attention(
            q,
            kv.clone(),
            kv,
            &pattern,
            &options,
            (seq_k > 0).then_some(pad),
            0.0,
        );
        assert_eq!(out.dims(), [1, 2, seq_q, 8]);
        assert!(to_f64(out).iter().all(|&x| x == 0.0));
        assert_eq!(log.entries()[0].served, Implementation::Tiled);
    }
}

/// A block-mask cache in the options serves repeated calls of one pattern and length with
/// the plan of the first (the same bits as building it anew, also under key padding on
/// top of the cached pattern); a block layout's plan is replaced when the length changes,
/// a positional pattern's serves shorter calls and decoding steps from a part of it.
pub fn check_block_mask_cache<B: On>() {
    use burn::tensor::Bool;
    use burn_attn_core::BlockMaskCache;
    let device = B::device();
    let cache = BlockMaskCache::new();
    let cached = AttentionOptions::default().with_block_mask_cache(cache.clone());
    let fresh = AttentionOptions::default();
    let run_on = |device: &Device, n: usize, padded: bool, options: &AttentionOptions| {
        let case = Case::new(n, n, 32).gqa(4, 2);
        let x = inputs(&case, 61);
        let pattern = KeyPattern {
            blocks: Some(BlockLayout::random(n, n, 16, 0.4, 9).unwrap()),
            ..KeyPattern::default()
        };
        let pad = padded.then(|| {
            let flags: Vec<bool> = (0..n).map(|j| j % 5 == 0).collect();
            Tensor::<2, Bool>::from_data(TensorData::new(flags, [1, n]), device)
        });
        to_f64(burn_attn_core::pattern_attention(
            tensor(&x.q, DType::F32, device),
            tensor(&x.k, DType::F32, device),
            tensor(&x.v, DType::F32, device),
            &pattern,
            options,
            pad,
            0.0,
        ))
    };
    let run =
        |n: usize, padded: bool, options: &AttentionOptions| run_on(&device, n, padded, options);
    assert!(cache.held_grid().is_none());
    let first = run(77, false, &cached);
    let grid = cache.held_grid().expect("the first call fills the cache");
    assert_eq!((grid.seq_q, grid.seq_k), (77, 77));
    assert_eq!(run(77, false, &cached), first);
    assert_eq!(run(77, false, &fresh), first);
    assert_eq!(run(77, true, &cached), run(77, true, &fresh));
    let shorter = run(50, false, &cached);
    let grid = cache.held_grid().expect("held");
    assert_eq!((grid.seq_q, grid.seq_k), (50, 50));
    assert_eq!(shorter, run(50, false, &fresh));
    // A module that trains and then evaluates: the plan of an autodiff call is not served
    // to a plain one, nor the other way round.
    let trained = run_on(&device.clone().autodiff(), 50, false, &cached);
    assert_eq!(trained, shorter);
    assert_eq!(run(50, false, &cached), shorter);
    cache.clear();
    assert!(cache.held_grid().is_none());

    // A pattern of positions alone (a causal window; key padding on top takes it to the
    // block-sparse kernels): shorter calls and decoding steps (a few queries against a
    // growing cache) are served by a part of the held plan, which grows when a call
    // outgrows it; each result is the fresh plan's. (The parts of strided covers are
    // checked against the exact cover on the CPU.)
    let pattern = KeyPattern::band(Window::causal(20), true);
    let step = |seq_q: usize, seq_k: usize| {
        let case = Case::new(seq_q, seq_k, 32).gqa(4, 2).batch(2);
        let x = inputs(&case, 62 + seq_k as u64);
        let flags: Vec<bool> = (0..2 * seq_k).map(|j| j % 7 == 3).collect();
        let pad = Tensor::<2, Bool>::from_data(TensorData::new(flags, [2, seq_k]), &device);
        let attend = |options: &AttentionOptions| {
            let log = DispatchLog::new();
            let options = options
                .clone()
                .with_log(log.clone())
                .with_kernel(KernelPolicy::Require);
            let out = to_f64(burn_attn_core::pattern_attention(
                tensor(&x.q, DType::F32, &device),
                tensor(&x.k, DType::F32, &device),
                tensor(&x.v, DType::F32, &device),
                &pattern,
                &options,
                Some(pad.clone()),
                0.0,
            ));
            let served = log.entries()[0].served;
            assert!(
                matches!(
                    served,
                    Implementation::FlashUnitSparse | Implementation::FlashMmaSparse
                ),
                "{seq_q} x {seq_k}: {served:?}"
            );
            out
        };
        let err = max_err(&attend(&cached), &attend(&fresh));
        assert!(err < 1e-6, "{seq_q} queries x {seq_k} keys: {err}");
        let held = cache.held_grid().expect("held");
        (held.seq_q, held.seq_k)
    };
    assert_eq!(step(77, 77), (77, 77));
    assert_eq!(step(40, 40), (77, 77));
    for seq_k in [60, 61, 76, 77] {
        assert_eq!(step(1, seq_k), (77, 77));
    }
    assert_eq!(step(5, 70), (77, 77));
    // Grown for the next steps: more keys, and only the last rows they read.
    let (rows, keys) = step(1, 78);
    assert!(keys > 78 && rows == keys - 77, "grown to {rows} x {keys}");
    assert_eq!(step(3, keys), (rows, keys));
    cache.clear();
}

/// Lists with indices outside the key blocks (not built by `BlockMask`: negative, or far
/// past the keys) give the result of the lists without them: such entries name tiles the
/// kernels skip, never a wrapped tile start.
pub fn check_invalid_list_indices<B: On>() {
    use burn::tensor::Int;
    use burn_attn_core::kernels::launch::SparseRules;
    use burn_attn_core::kernels::launch::{flash_forward_sparse, sparse_blocks, BlockLists};
    use burn_attn_core::{BlockCover, BlockGrid, BlockMask};
    let device = B::device();
    let case = Case::new(150, 150, 32);
    let x = inputs(&case, 71);
    let (q, k, v) = (
        tensor(&x.q, DType::F32, &device),
        tensor(&x.k, DType::F32, &device),
        tensor(&x.v, DType::F32, &device),
    );
    let forced = ForcedPlan::default();
    let prim = |t: &Tensor<4>| cube_primitive(t.clone());
    let (block_q, block_k) = sparse_blocks(&prim(&q), &prim(&k), &prim(&v), &forced).unwrap();
    let grid = BlockGrid::new(block_q, block_k, 150, 150).unwrap();
    let pattern = KeyPattern::band(Window::symmetric(8), false);
    let mask = BlockMask::new(BlockCover::of_pattern(&pattern, grid, &device).unwrap());
    let ints = |t: TensorData| t.convert::<i64>().try_to_vec::<i64>().unwrap();
    let [_, _, qb, kb] = mask.full_index.dims();
    let rules = SparseRules {
        left: Some(4),
        right: Some(4),
        ..SparseRules::default()
    };
    // The mask's lists on blocks of `block_q` query rows, with these full lists.
    let lists =
        |block_q: usize, full_count: Tensor<3, Int>, full_index: Tensor<4, Int>| BlockLists {
            block_q,
            block_k,
            partial_count: cube_int_primitive(mask.partial_count.clone()),
            partial_index: cube_int_primitive(mask.partial_index.clone()),
            full_count: cube_int_primitive(full_count),
            full_index: cube_int_primitive(full_index),
            t_partial_count: cube_int_primitive(mask.t_partial_count.clone()),
            t_partial_index: cube_int_primitive(mask.t_partial_index.clone()),
            t_full_count: cube_int_primitive(mask.t_full_count.clone()),
            t_full_index: cube_int_primitive(mask.t_full_index.clone()),
        };
    let scale = 1.0 / (case.dim as f32).sqrt();
    let run = |full_count: Vec<i64>, full_index: Vec<i64>| {
        let lists = lists(
            block_q,
            Tensor::<3, Int>::from_data(TensorData::new(full_count, [1, 1, qb]), &device),
            Tensor::<4, Int>::from_data(TensorData::new(full_index, [1, 1, qb, kb]), &device),
        );
        let (out, _) =
            flash_forward_sparse(prim(&q), prim(&k), prim(&v), scale, &lists, &rules, &forced)
                .unwrap();
        cube_to_f64(out)
    };
    let (counts, indices) = (
        ints(mask.full_count.clone().into_data()),
        ints(mask.full_index.clone().into_data()),
    );
    let partial = ints(mask.partial_count.clone().into_data());
    let want = run(counts.clone(), indices.clone());
    // Each query block's full list gains one bad entry where it has room.
    let (mut bad_counts, mut bad_indices) = (counts.clone(), indices);
    let mut added = 0;
    for row in 0..qb {
        let used = (partial[row] + counts[row]) as usize;
        if used < kb {
            bad_indices[row * kb + counts[row] as usize] = if row % 2 == 0 { -1 } else { 1 << 30 };
            bad_counts[row] += 1;
            added += 1;
        }
    }
    assert!(added > 0, "no query block has room for an extra entry");
    assert_eq!(run(bad_counts, bad_indices), want);

    // Blocks past any length (the kernels walk their tiles at i32 positions), and a layout
    // of empty blocks: errors naming them.
    let mask_lists = |block_q| lists(block_q, mask.full_count.clone(), mask.full_index.clone());
    let huge = block_q << 32;
    let err = flash_forward_sparse(
        prim(&q),
        prim(&k),
        prim(&v),
        scale,
        &mask_lists(huge),
        &rules,
        &forced,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(err.contains(&format!("{huge} x {block_k} blocks")), "{err}");
    let empty_blocks = SparseRules {
        layout: Some((
            cube_int_primitive(Tensor::<1, Int>::from_data(
                TensorData::new(vec![1i64], [1]),
                &device,
            )),
            0,
            4,
        )),
        ..rules.clone()
    };
    let err = flash_forward_sparse(
        prim(&q),
        prim(&k),
        prim(&v),
        scale,
        &mask_lists(block_q),
        &empty_blocks,
        &forced,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(err.contains("block layout of 0 x 4 blocks"), "{err}");
}

/// Options that log the dispatch and, with `served`, require a kernel.
fn logged_options(
    served: Option<(Implementation, Implementation)>,
) -> (AttentionOptions, DispatchLog) {
    let log = DispatchLog::new();
    let mut options = AttentionOptions::default().with_log(log.clone());
    if served.is_some() {
        options = options.with_kernel(KernelPolicy::Require);
    }
    (options, log)
}

/// That `log` shows the forward and backward `served` names (when given).
fn assert_served(log: &DispatchLog, served: Option<(Implementation, Implementation)>, what: &str) {
    if let Some((forward, backward)) = served {
        let entries: Vec<_> = log.entries().iter().map(|d| (d.pass, d.served)).collect();
        assert_eq!(
            entries,
            [(Pass::Forward, forward), (Pass::Backward, backward)],
            "{what}"
        );
    }
}

/// One training step through `masked_attention` on `device` (f32, autodiff) for the loss
/// `sum(out * w)`: the output, `dq`, `dk`, `dv` flattened as f64, and the gradients (for
/// the masks' own tensors).
fn masked_training_step(
    x: &Inputs,
    w: &(Vec<f32>, [usize; 4]),
    device: &Device,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &burn_attn_core::AttentionMasks,
) -> ([Vec<f64>; 4], burn::tensor::Gradients) {
    let q = tensor(&x.q, DType::F32, device).require_grad();
    let k = tensor(&x.k, DType::F32, device).require_grad();
    let v = tensor(&x.v, DType::F32, device).require_grad();
    let out =
        burn_attn_core::masked_attention(q.clone(), k.clone(), v.clone(), pattern, options, masks);
    let grads = (out.clone() * tensor(w, DType::F32, device))
        .sum()
        .backward();
    let flat = |t: &Tensor<4>| to_f64(t.grad(&grads).expect("gradient"));
    let got = [to_f64(out), flat(&q), flat(&k), flat(&v)];
    (got, grads)
}

/// Training through `masked_attention` on `B`'s device with the masks `masks` builds on a
/// device (the call's own rule, `hides(b, i, j)`), combined per variant `(causal, padded)`
/// with the causal rule and the key padding `pad` (`[batch, seq_k]`), against the host
/// truth in f64: output and gradients to 1e-4. `served`, where given, names the forward and
/// backward implementations the dispatch log must show (the block-sparse kernels on GPUs).
fn check_masked_training<B: On>(
    case: Case,
    variants: &[(bool, bool)],
    masks: &dyn Fn(&Device) -> burn_attn_core::AttentionMasks,
    hides: &dyn Fn(usize, usize, usize) -> bool,
    pad: &[bool],
    served: Option<(Implementation, Implementation)>,
) {
    use burn::tensor::Bool;
    let (n, batch) = (case.seq_k, case.batch);
    let x = inputs(&case, 51 + n as u64);
    let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
    let w = uniform(&mut StdRng::seed_from_u64(97), shape, 1.0);
    let device = B::device().autodiff();
    for &(causal, with_pad) in variants {
        let (options, log) = logged_options(served);
        let mut call_masks = masks(&device);
        call_masks.key_padding = with_pad.then(|| {
            Tensor::<2, Bool>::from_data(TensorData::new(pad.to_vec(), [batch, n]), &device)
        });
        let pattern = KeyPattern::band(Window::FULL, causal);
        let (got, _) = masked_training_step(&x, &w, &device, &pattern, &options, &call_masks);
        let visible = |b: usize, i: usize, j: usize| {
            !(hides(b, i, j) || (causal && j > i) || (with_pad && pad[b * n + j]))
        };
        let want = masked_truth(&x, &case, &visible, &w, None, None, None);
        let want = [&want.out, &want.grads[0], &want.grads[1], &want.grads[2]];
        let what = format!("causal {causal}, padding {with_pad}");
        for (name, (g, t)) in ["out", "dq", "dk", "dv"]
            .into_iter()
            .zip(got.iter().zip(want))
        {
            let err = max_err(g, t);
            assert!(err < 1e-4, "{what}: {name} error {err:e}");
        }
        assert_served(&log, served, &what);
    }
}

/// [`check_masked_training`] with document ids (packed sequences): alone, with the causal
/// rule and with key padding, then the first two again; batch 2, GQA, odd length. One set
/// of ids serves every call, as a model's layers share a batch's: on the kernels (`served`)
/// the ids hold one grid's plan, whose cover and lists the later calls reuse.
pub fn check_document_training<B: On>(served: Option<(Implementation, Implementation)>) {
    use burn::tensor::Int;
    use burn_attn_core::{AttentionMasks, DocumentIds};
    let case = Case::new(77, 77, 32).gqa(4, 2).batch(2);
    let (n, batch) = (case.seq_q, case.batch);
    let docs: Vec<i64> = (0..batch * n)
        .map(|i| ((i % n) / (20 + 9 * (i / n))) as i64)
        .collect();
    let pad: Vec<bool> = (0..batch * n).map(|i| i % n >= n - 7).collect();
    let ids = DocumentIds::self_attention(Tensor::<2, Int>::from_data(
        TensorData::new(docs.clone(), [batch, n]),
        &B::device().autodiff(),
    ));
    let masks = |_: &Device| AttentionMasks {
        documents: Some(ids.clone()),
        ..AttentionMasks::default()
    };
    let hides = |b: usize, i: usize, j: usize| docs[b * n + i] != docs[b * n + j];
    let variants = [
        (false, false),
        (true, false),
        (true, true),
        (false, false),
        (true, false),
    ];
    check_masked_training::<B>(case, &variants, &masks, &hides, &pad, served);
    assert_eq!(ids.held_plans(), usize::from(served.is_some()));
}

/// [`check_masked_training`] with a dense attention mask that hides whole blocks, shows
/// whole blocks and hides scattered pairs elsewhere, different per batch row: alone, with
/// the causal rule and with key padding.
pub fn check_attention_mask_training<B: On>(served: Option<(Implementation, Implementation)>) {
    use burn::tensor::Bool;
    use burn_attn_core::AttentionMasks;
    let case = Case::new(150, 150, 32).gqa(4, 2).batch(2);
    let (n, batch) = (case.seq_q, case.batch);
    let hides = |b: usize, i: usize, j: usize| {
        if i < 64 && j < 64 {
            true
        } else if i >= 64 && j >= 64 {
            false
        } else {
            (i * 7 + j * 13 + b * 5) % 10 < 3
        }
    };
    let flags: Vec<bool> = (0..batch * n * n)
        .map(|at| hides(at / (n * n), (at / n) % n, at % n))
        .collect();
    let pad: Vec<bool> = (0..batch * n).map(|i| i % n >= n - 9).collect();
    let masks = |device: &Device| AttentionMasks {
        attention_mask: Some(Tensor::<3, Bool>::from_data(
            TensorData::new(flags.clone(), [batch, n, n]),
            device,
        )),
        ..AttentionMasks::default()
    };
    let variants = [(false, false), (true, false), (false, true)];
    check_masked_training::<B>(case, &variants, &masks, &hides, &pad, served);
}

/// Training through `masked_attention` on `B`'s device with score terms: a per-key bias
/// per batch and head (`-inf` on some keys) and a soft edge whose reach is shared by the
/// heads (`[batch, 1, seq]`, as the adaptive window's), alone and together with key padding
/// and a window, ALiBi slopes under a causal window, and a softcap with a key bias and
/// padding, against the host truth in f64: output, `dq`, `dk`, `dv` and the terms'
/// gradients to 1e-4 of the largest. `served` as [`check_masked_training`]'s.
pub fn check_score_term_training<B: On>(served: Option<(Implementation, Implementation)>) {
    use burn::tensor::Bool;
    use burn_attn_core::{AttentionMasks, SoftEdge};
    let case = Case::new(77, 77, 32).gqa(4, 2).batch(2);
    let (n, batch, heads) = (case.seq_q, case.batch, case.heads);
    let x = inputs(&case, 61);
    let w = uniform(
        &mut StdRng::seed_from_u64(98),
        [batch, heads, n, case.value_dim],
        1.0,
    );
    let (key_bias, reach) = score_term_data(batch, heads, n);
    let pad: Vec<bool> = (0..batch * n).map(|i| i % n >= n - 8).collect();
    let ramp = 3.0;
    let device = B::device().autodiff();
    let slopes: Vec<f32> = (0..heads).map(|h| 0.25 * (h + 1) as f32).collect();
    // (key bias, soft edge, ALiBi, softcap, padding, window)
    for (with_bias, with_edge, with_alibi, softcap, with_pad, window) in [
        (true, false, false, None, false, Window::FULL),
        (false, true, false, None, false, Window::symmetric(20)),
        (true, true, false, None, true, Window::symmetric(20)),
        (
            false,
            false,
            true,
            None,
            false,
            Window::new(Some(30), Some(0)),
        ),
        (true, false, false, Some(0.8), true, Window::FULL),
    ] {
        let (options, log) = logged_options(served);
        let bias_t = Tensor::<3>::from_data(
            TensorData::new(key_bias.clone(), [batch, heads, n]),
            &device,
        )
        .require_grad();
        let reach_t =
            Tensor::<3>::from_data(TensorData::new(reach.clone(), [batch, 1, n]), &device)
                .require_grad();
        let masks = AttentionMasks {
            key_bias: with_bias.then(|| bias_t.clone()),
            soft_edge: with_edge.then(|| SoftEdge {
                reach: reach_t.clone(),
                ramp,
            }),
            alibi: with_alibi.then(|| slopes.clone()),
            softcap,
            key_padding: with_pad.then(|| {
                Tensor::<2, Bool>::from_data(TensorData::new(pad.clone(), [batch, n]), &device)
            }),
            ..AttentionMasks::default()
        };
        let pattern = KeyPattern::band(window, false);
        let (got, grads) = masked_training_step(&x, &w, &device, &pattern, &options, &masks);
        let flat3 = |t: &Tensor<3>| {
            let g = t.grad(&grads).expect("a score term's gradient");
            let dims = g.dims();
            to_f64(g.reshape([1, dims[0], dims[1], dims[2]]))
        };
        let what = format!(
            "{:?}: key bias {with_bias}, soft edge {with_edge}, ALiBi {with_alibi}, softcap \
             {softcap:?}, padding {with_pad}",
            B::device()
        );
        let visible = |b: usize, i: usize, j: usize| {
            pattern.visible(i, j, n, n) && !(with_pad && pad[b * n + j])
        };
        let terms = |b: usize, h: usize, i: usize, j: usize| {
            term_truth(
                with_bias.then(|| key_bias[(b * heads + h) * n + j]),
                with_edge.then(|| (reach[b * n + i], ramp)),
                with_alibi.then(|| slopes[h]),
                i,
                j,
            )
        };
        let want = masked_truth(&x, &case, &visible, &w, None, Some(&terms), softcap);
        // The reach is shared by the heads: its gradient sums theirs.
        let reach_want: Vec<f64> = (0..batch * n)
            .map(|at| {
                (0..heads)
                    .map(|h| want.term_grads[1][(at / n * heads + h) * n + at % n])
                    .sum()
            })
            .collect();
        let [out, dq, dk, dv] = got;
        let mut checks = vec![
            ("out", out, want.out.clone()),
            ("dq", dq, want.grads[0].clone()),
            ("dk", dk, want.grads[1].clone()),
            ("dv", dv, want.grads[2].clone()),
        ];
        if with_bias {
            checks.push(("key bias", flat3(&bias_t), want.term_grads[0].clone()));
        }
        if with_edge {
            checks.push(("reach", flat3(&reach_t), reach_want));
        }
        for (name, got, want) in checks {
            let err = max_err(&got, &want);
            let size = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
            assert!(
                err < 1e-4 * size,
                "{what}: {name} error {err:e} (largest {size})"
            );
        }
        assert_served(&log, served, &what);
    }
}

/// Decoding with a key/value cache on `B`'s device (the kernels take one or a few query
/// rows against the cached keys, bottom-right aligned) gives the full forward's rows:
/// `FlashAttention` causal with GQA and a window over a growing cache, token by token and
/// in chunks, and over a paged cache holding sequences of different lengths (pages of 16
/// and of 5); MQA over a preallocated cache, 16 tokens a step, and a paged one;
/// `SlidingWindowAttention` over a rolling one.
/// `tol`: the largest difference allowed between the decoded and the full forward's rows
/// (the projections' matmuls run at other shapes in the two: on CUDA Burn's f32 matmul
/// takes tf32 tensor cores, about 5e-4 relative).
pub fn check_cached_decoding<B: On>(tol: f32) {
    use burn_attn::{FlashAttentionConfig, KvCache, PagedKvCache, SlidingWindowAttentionConfig};
    let device = B::device();
    device.seed(17);
    let x = Tensor::<3>::random(
        [2, 70, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let decode = |chunk: usize, step: &mut dyn FnMut(Tensor<3>) -> Tensor<3>| {
        let outs: Vec<_> = (0..70)
            .step_by(chunk)
            .map(|s| step(x.clone().slice([0..2, s..(s + chunk).min(70), 0..64])))
            .collect();
        Tensor::cat(outs, 1)
    };
    let flash = FlashAttentionConfig::new(64, 4)
        .with_n_kv_heads(Some(2))
        .with_causal(true)
        .with_window_left(Some(24))
        .init(&device);
    let window = SlidingWindowAttentionConfig::new(64, 4)
        .with_window(16)
        .with_causal(true)
        .init(&device);
    let close = |got: Tensor<3>, want: Tensor<3>, what: &str| {
        let err: f32 = (got - want).abs().max().into_scalar();
        assert!(err < tol, "{what}: error {err:e}");
    };
    for chunk in [1, 5] {
        let mut cache = KvCache::new();
        let got = decode(chunk, &mut |t| flash.forward_cache(t, &mut cache));
        close(got, flash.forward(x.clone()), "flash");
        let mut cache = KvCache::rolling();
        let got = decode(chunk, &mut |t| window.forward_cache(t, &mut cache));
        close(got, window.forward(x.clone()), "sliding window");
        assert_eq!(cache.len(), 15);
    }
    // One key/value head for all four query heads, 16 tokens a step into a preallocated
    // cache.
    let mqa = FlashAttentionConfig::new(64, 4)
        .with_n_kv_heads(Some(1))
        .with_causal(true)
        .init(&device);
    let mut cache = KvCache::with_capacity(70);
    let got = decode(16, &mut |t| mqa.forward_cache(t, &mut cache));
    close(got, mqa.forward(x.clone()), "MQA, 16 tokens a step");
    // A paged cache: the two rows as sequences of 70 and 41 tokens, each prompt filled
    // alone, then 31 tokens of each decoded together (the shorter one's keys padded at the
    // front); pages of 16 with two key/value heads, of 5 (not a power of two) with one.
    for (module, pages, page_size) in [(&flash, 16, 16), (&mqa, 40, 5)] {
        let mut cache = PagedKvCache::new(pages, page_size).unwrap();
        let ids = [cache.add_sequence(), cache.add_sequence()];
        let (lens, steps) = ([70, 41], 31);
        let row =
            |b: usize, range: std::ops::Range<usize>| x.clone().slice([b..b + 1, range, 0..64]);
        let mut outs: Vec<Vec<Tensor<3>>> = (0..2)
            .map(|b| vec![module.forward_paged(row(b, 0..lens[b] - steps), &mut cache, &[ids[b]])])
            .collect();
        for step in (0..steps).rev() {
            let x = Tensor::cat(
                (0..2)
                    .map(|b| row(b, lens[b] - step - 1..lens[b] - step))
                    .collect(),
                0,
            );
            let out = module.forward_paged(x, &mut cache, &ids);
            for (b, rows) in outs.iter_mut().enumerate() {
                rows.push(out.clone().narrow(0, b, 1));
            }
        }
        for (b, rows) in outs.into_iter().enumerate() {
            close(
                Tensor::cat(rows, 1),
                module.forward(row(b, 0..lens[b])),
                &format!("paged, pages of {page_size}"),
            );
        }
    }
}

/// The modules whose GPU path differs from the CPU's give the CPU's results on `B`'s
/// device: `LearnedSparseAttention` (the kernels' key-bias formulation against the CPU's
/// gathered keys) and `AdaptiveSlidingWindowAttention` (the soft edge as a kernel term),
/// forward outputs and the gate's and predictor's gradients, to `tol` of the largest (the
/// projections' matmuls differ by device: on CUDA Burn's f32 matmul takes tf32 tensor
/// cores, about 5e-4 relative).
pub fn check_score_term_modules<B: On>(tol: f32) {
    use burn::module::{Module, Param};
    use burn_attn::{AdaptiveSlidingWindowAttentionConfig, LearnedSparseAttentionConfig};
    let gpu = B::device().autodiff();
    let cpu = Truth::device().autodiff();
    let shape = [2, 90, 64];
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i as f32) * 0.731).sin())
        .collect();
    let input =
        |device: &Device| Tensor::<3>::from_data(TensorData::new(values.clone(), shape), device);
    let close = |got: Tensor<2>, want: Tensor<2>, what: &str| {
        let size: f32 = want.clone().abs().max().into_scalar();
        let err: f32 = (got.to_device(&Truth::device()) - want)
            .abs()
            .max()
            .into_scalar();
        assert!(
            err <= tol * size.max(1.0),
            "{what}: error {err:e} (largest {size})"
        );
    };
    // The module on the CPU and forked to the GPU: outputs, then the gradient of
    // `weight` for the loss `sum(out^2)`.
    fn same_on_both<M: Module>(
        module: M,
        forward: impl Fn(&M, Tensor<3>) -> Tensor<3>,
        weight: impl Fn(&M) -> &Param<Tensor<2>>,
        devices: (&Device, &Device),
        input: &dyn Fn(&Device) -> Tensor<3>,
        close: &dyn Fn(Tensor<2>, Tensor<2>, &str),
        what: &str,
    ) {
        let (cpu, gpu) = devices;
        let on_gpu = module.clone().fork(gpu);
        let flat = |t: Tensor<3>| {
            let [a, b, c] = t.dims();
            t.reshape([a * b, c])
        };
        let (out_cpu, out_gpu) = (forward(&module, input(cpu)), forward(&on_gpu, input(gpu)));
        close(
            flat(out_gpu.clone()),
            flat(out_cpu.clone()),
            &format!("{what} output"),
        );
        let g_cpu = out_cpu.powi_scalar(2).sum().backward();
        let g_gpu = out_gpu.powi_scalar(2).sum().backward();
        close(
            weight(&on_gpu).grad(&g_gpu).expect("a gradient"),
            weight(&module).grad(&g_cpu).expect("a gradient"),
            &format!("{what} gradient"),
        );
    }

    let learned = LearnedSparseAttentionConfig::new(64, 4)
        .with_n_kv_heads(Some(2))
        .with_ratio(0.3)
        .with_block(16)
        .init(&cpu);
    same_on_both(
        learned,
        |m, x| m.forward(x),
        |m| &m.gate.weight,
        (&cpu, &gpu),
        &input,
        &close,
        "learned sparse gate",
    );
    let adaptive = AdaptiveSlidingWindowAttentionConfig::new(64, 4)
        .with_min_window(4)
        .with_max_window(24)
        .with_ramp(3.0)
        .with_causal(true)
        .init(&cpu);
    same_on_both(
        adaptive,
        |m, x| m.forward(x),
        |m| &m.predictor.weight,
        (&cpu, &gpu),
        &input,
        &close,
        "adaptive window predictor",
    );
}

/// The portable forward with its keys split (forced: 1, 3 and 7 splits; the cubes of each
/// split write partial rows that a second kernel merges by their log-sum-exp) gives the
/// output and lse of the unsplit call: a decoded token of a grouped call, causal rows over
/// more keys, a window whose splits mostly see nothing, rows that see no key at all, a
/// batch above 1. With `lse` `-inf` rows compared as such.
///
/// In `dtype` on the kernel `served` (the portable one where `served` is `FlashUnit`; the
/// split rows are then within `tol` of the unsplit ones).
pub fn check_key_splits<B: On>(dtype: DType, served: burn_attn_core::Implementation, tol: f64) {
    use burn_attn_core::kernels::plan::ForcedPlan;
    let device = B::device();
    let cases = [
        Case::new(1, 300, 32).gqa(8, 2).causal().batch(2),
        Case::new(17, 97, 64).causal(),
        Case::new(97, 97, 32).window(Some(7), Some(2)),
        Case::new(40, 3, 32).causal(),
    ];
    for (at, case) in cases.iter().enumerate() {
        let mut x = inputs(case, 60 + at as u64);
        if at == 0 {
            // A NaN in the first query row: that row is NaN, output and lse, split or not.
            x.q.0[0] = f32::NAN;
        }
        let row = case.value_dim;
        let run = |splits: usize| {
            let log = DispatchLog::new();
            let options = case
                .options()
                .with_kernel(KernelPolicy::Require)
                .with_log(log.clone())
                .with_forced_plan(ForcedPlan {
                    key_splits: Some(splits),
                    no_matrix_units: served == burn_attn_core::Implementation::FlashUnit,
                    ..ForcedPlan::default()
                });
            let (o, l) = attention_with_lse(
                tensor(&x.q, dtype, &device),
                tensor(&x.k, dtype, &device),
                tensor(&x.v, dtype, &device),
                &options,
            );
            let logged = log.of(Pass::Forward);
            assert_eq!(logged[0].served, served, "{case:?}");
            (to_f64(o), to_f64(l))
        };
        let (want_o, want_l) = run(1);
        for splits in [3, 7] {
            let (mut o, mut l) = run(splits);
            if at == 0 {
                assert!(
                    o[..row].iter().chain(&l[..1]).all(|v| v.is_nan()),
                    "{splits} splits"
                );
                assert!(want_o[..row].iter().all(|v| v.is_nan()));
                // The other rows compare below.
                o.drain(..row);
                l.drain(..1);
            }
            let (want_o, want_l) = if at == 0 {
                (&want_o[row..], &want_l[1..])
            } else {
                (&want_o[..], &want_l[..])
            };
            let err = max_err(&o, want_o);
            assert!(err < tol, "{case:?}, {splits} splits: output error {err:e}");
            assert!(
                l.iter()
                    .zip(want_l)
                    .all(|(g, w)| (g.is_infinite() && w.is_infinite()) || (g - w).abs() < tol),
                "{case:?}, {splits} splits: lse differs"
            );
        }
    }
}

/// Context-parallel attention in its ring form on `B`'s device (every peer on it) gives one
/// call's output and gradients over the whole sequence, computed on the host in f64; every
/// block visit runs `served` forward and backward (one forward per visit, one backward per
/// visit's gradient tap).
pub fn check_context_parallel<B: On>(dtype: DType, served: (Implementation, Implementation)) {
    use burn_attn_core::{try_context_parallel_attention_with, ContextParallelForm, SequenceSlice};
    let n = 300;
    let cuts = [96, 120, 84];
    let case = Case::new(n, n, 64).gqa(4, 2).batch(2);
    let x = rounded_inputs(inputs(&case, 61), dtype);
    let shape = [case.batch, case.heads, n, case.value_dim];
    let w = rounded(uniform(&mut StdRng::seed_from_u64(62), shape, 1.0), dtype);
    let bands = [
        (Window::FULL, true, 6),
        (Window::causal(100), true, 5),
        (Window::new(Some(40), Some(30)), false, 7),
    ];
    for (window, causal, visits) in bands {
        let run = |device: Device, dtype: DType, options: AttentionOptions, split: bool| {
            let device = device.autodiff();
            let q = tensor(&x.q, dtype, &device).require_grad();
            let k = tensor(&x.k, dtype, &device).require_grad();
            let v = tensor(&x.v, dtype, &device).require_grad();
            let out = if split {
                let mut at = 0;
                let slices: Vec<SequenceSlice> = cuts
                    .iter()
                    .map(|&rows| {
                        let slice = SequenceSlice {
                            q: q.clone().narrow(2, at, rows),
                            k: k.clone().narrow(2, at, rows),
                            v: v.clone().narrow(2, at, rows),
                        };
                        at += rows;
                        slice
                    })
                    .collect();
                let outs = try_context_parallel_attention_with(
                    &slices,
                    &options,
                    ContextParallelForm::Ring,
                )
                .unwrap();
                Tensor::cat(outs, 2)
            } else {
                burn_attn_core::attention(q.clone(), k.clone(), v.clone(), &options)
            };
            let grads = (out.clone() * tensor(&w, dtype, &device)).sum().backward();
            let grad = |t: &Tensor<4>| to_f64(t.grad(&grads).expect("gradient"));
            [to_f64(out), grad(&q), grad(&k), grad(&v)]
        };
        let band = AttentionOptions::default()
            .with_causal(causal)
            .with_window(window);
        let log = DispatchLog::new();
        let options = band
            .clone()
            .with_log(log.clone())
            .with_kernel(KernelPolicy::Require);
        let got = run(B::device(), dtype, options, true);
        let want = run(Truth::device(), DType::F64, band, false);
        let entries = log.entries();
        let count = |pass: Pass, implementation| {
            entries
                .iter()
                .filter(|d| d.pass == pass && d.served == implementation)
                .count()
        };
        assert_eq!(
            (
                count(Pass::Forward, served.0),
                count(Pass::Backward, served.1),
                entries.len()
            ),
            (visits, visits, 2 * visits),
            "{window:?} causal {causal}: {entries:?}"
        );
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        assert_training_close(
            &got,
            &want,
            tol,
            &format!("{dtype:?} {window:?} causal {causal}"),
        );
    }
}

/// Strided columns without masks run as the band call plus calls over the gathered
/// columns (`strided` in the core): on `B`'s device every one of them, forward and
/// backward, is served by `served`, and training matches autodiff of the materialised
/// reference in f64 on the CPU (causal and two-sided, GQA, cross lengths, batch 2).
pub fn check_strided_split<B: On>(
    dtype: DType,
    served: (Implementation, Implementation),
    masked: (Implementation, Implementation),
) {
    let cases = [
        (
            Case::new(150, 150, 64).gqa(4, 2).batch(2),
            Window::new(Some(6), Some(0)),
            16,
            true,
        ),
        (
            Case::new(97, 130, 64).gqa(4, 2).batch(2),
            Window::symmetric(20),
            8,
            false,
        ),
        (
            Case::new(200, 200, 32).batch(2),
            Window::new(Some(3), Some(40)),
            7,
            false,
        ),
    ];
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    for (at, (case, window, stride, causal)) in cases.into_iter().enumerate() {
        let pattern = KeyPattern {
            window,
            stride: Some(stride),
            causal,
            blocks: None,
        };
        let x = rounded_inputs(inputs(&case, 71 + at as u64), dtype);
        let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
        let w = rounded(uniform(&mut StdRng::seed_from_u64(72), shape, 1.0), dtype);
        // Without masks on the band kernels; with key padding (every 5th key of batch 0,
        // the last third of batch 1's) on the block-sparse kernels.
        let n = case.seq_k;
        let padding: (Vec<bool>, [usize; 2]) = (
            (0..2 * n)
                .map(|i| {
                    if i < n {
                        i % 5 == 2
                    } else {
                        i % n >= n - n / 3
                    }
                })
                .collect(),
            [2, n],
        );
        for (pad, served) in [(None, served), (Some(&padding), masked)] {
            let log = DispatchLog::new();
            let options = AttentionOptions::default()
                .with_log(log.clone())
                .with_kernel(KernelPolicy::Require);
            let got = pattern_training(&B::device(), &x, &w, &pattern, pad, Some(&options), dtype);
            let want = pattern_training(&Truth::device(), &x, &w, &pattern, pad, None, DType::F64);
            let what = format!("{dtype:?} case {at}, padding {}", pad.is_some());
            assert_calls_served(&log, served, None, &what);
            assert_training_close(&got, &want, tol, &what);
        }
    }
    if dtype == DType::F32 {
        check_strided_dropout::<B>(masked);
    }
}

/// Strided columns with dropout in training split into calls on the block-sparse kernels
/// (`served`), each drawing its own seed. Within one training step (no reseeding, which
/// tests running beside it would disturb), two identities hold only where each call's tap
/// regenerates its forward's mask: `sum(dv * v)` equals the loss `sum(out * w)` (linear in
/// v), and dk sums to zero over the keys. Dropout changes the output and keeps its mean.
fn check_strided_dropout<B: On>(served: (Implementation, Implementation)) {
    let case = Case::new(96, 96, 32).gqa(4, 2).batch(2);
    let pattern = KeyPattern {
        window: Window::symmetric(10),
        stride: Some(8),
        causal: false,
        blocks: None,
    };
    let x = inputs(&case, 73);
    let shape = [case.batch, case.heads, case.seq_q, case.value_dim];
    let w = uniform(&mut StdRng::seed_from_u64(74), shape, 1.0);
    let device = B::device().autodiff();
    let log = DispatchLog::new();
    let options = AttentionOptions::default()
        .with_log(log.clone())
        .with_kernel(KernelPolicy::Require);
    // The loss and, where asked, its gradients.
    let loss = |dropout: f64, grads: bool| {
        let [q, k, v] = [&x.q, &x.k, &x.v].map(|t| tensor(t, DType::F32, &device).require_grad());
        let out = burn_attn_core::pattern_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &pattern,
            &options,
            None,
            dropout,
        );
        let mean = f64::from(out.clone().mean().into_scalar::<f32>());
        let spread = f64::from(out.clone().abs().mean().into_scalar::<f32>());
        let loss = (out * tensor(&w, DType::F32, &device)).sum();
        let value = f64::from(loss.clone().into_scalar::<f32>());
        let grads = grads.then(|| {
            let g = loss.backward();
            [q, k, v].map(|t| to_f64(t.grad(&g).expect("gradient")))
        });
        (value, grads, (mean, spread))
    };
    let (plain, _, (plain_mean, spread)) = loss(0.0, false);
    log.clear();
    let (dropped, grads, (dropped_mean, _)) = loss(0.25, true);
    assert_calls_served(&log, served, None, "strided dropout");
    assert!((dropped - plain).abs() > 1e-3, "dropout changed nothing");
    // Kept probabilities scaled by 1 / (1 - p): the mean output stays.
    assert!(
        (dropped_mean - plain_mean).abs() < 0.1 * spread,
        "mean output {dropped_mean} against {plain_mean} without dropout"
    );
    let [_, dk, dv] = grads.expect("gradients");
    // With its masks fixed the loss is linear in v: sum(dv * v) is the loss itself, so
    // the taps' dv used the forward's masks.
    let euler: f64 = dv.iter().zip(&x.v.0).map(|(g, &v)| g * f64::from(v)).sum();
    let size: f64 = dv
        .iter()
        .zip(&x.v.0)
        .map(|(g, &v)| (g * f64::from(v)).abs())
        .sum();
    assert!(
        (euler - dropped).abs() < 1e-4 * size,
        "sum(dv * v) {euler} against the loss {dropped}"
    );
    // Moving every key by one vector moves each row's scores by a constant, which the
    // softmax ignores: dk sums to zero over the keys of each batch and key/value head
    // (each row's dS sums to zero only where the taps' masks are the forward's).
    let [batch, kv_heads, n, d] = x.k.1;
    for b in 0..batch * kv_heads {
        for f in 0..d {
            let column = (0..n).map(|j| dk[(b * n + j) * d + f]);
            let (sum, size) = column.fold((0.0, 0.0), |(s, a), g| (s + g, a + g.abs()));
            assert!(
                sum.abs() < 1e-3 * size.max(1e-6),
                "dk sums to {sum} over the keys (batch-head {b}, feature {f}, size {size})"
            );
        }
    }
}

/// Output and dq/dk/dv (`got` against `want`, in that order) each within `tol` times the
/// largest magnitude of the truth (at least 1).
#[track_caller]
pub fn assert_training_close(got: &[Vec<f64>], want: &[Vec<f64>], tol: f64, what: &str) {
    for (name, (g, t)) in ["out", "dq", "dk", "dv"]
        .into_iter()
        .zip(got.iter().zip(want))
    {
        let err = max_err(g, t);
        let size = t.iter().fold(1.0f64, |m, w| m.max(w.abs()));
        assert!(
            err < tol * size,
            "{what}: {name} error {err:e} (largest {size:e})"
        );
    }
}
