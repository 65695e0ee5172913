//! The comparison itself, generic over the backend: build each variant, time it, measure
//! its memory peak and its error against exact attention with the same weights, on random
//! and on structured inputs.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_attn::cores::{causal_linear_attention, linear_attention, KeyPattern};
use burn_attn::nn::complexity::{Cost, Method};
use burn_attn::nn::linear::FeatureMap;
use burn_attn::nn::projection::Heads;
use burn_attn::{pattern_attention, AttentionOptions};
use burn_attn::{
    AdaptiveSlidingWindowAttention, AdaptiveSlidingWindowAttentionConfig, CausalLinearAttention,
    CausalLinearAttentionConfig, FlashAttention, FlashAttentionConfig, HybridAttention,
    HybridAttentionConfig, LearnedSparseAttention, LearnedSparseAttentionConfig, LinearAttention,
    LinearAttentionConfig, MultiHeadProjection, SlidingWindowAttention,
    SlidingWindowAttentionConfig, SparseAttention, SparseAttentionConfig, SparsePattern,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::alloc::PeakWindow;
use crate::cli::CompareArgs;
use crate::device::sync;
use crate::peers::PeerRatio;

/// Device memory usage as the backend's memory pool reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceMemory {
    /// Bytes handed out to live tensors.
    pub in_use: u64,
    /// Bytes the pool holds from the device (in use or free for reuse).
    pub reserved: u64,
}

/// How `compare` measures memory: the host allocator (CPU) or the device memory pool.
pub struct MemoryMeter {
    /// What the peak column means, printed in the header and saved in the report.
    pub description: String,
    /// Reads the device pool's usage; `None` measures the host allocator instead.
    pub sample: Option<Box<dyn Fn() -> DeviceMemory>>,
    /// Returns free pool pages to the device, so that reserved growth shows a peak.
    pub cleanup: Option<Box<dyn Fn()>>,
}

impl MemoryMeter {
    /// The host allocator: bytes allocated above the live baseline during one forward.
    pub fn allocator() -> Self {
        Self {
            description: "host allocator peak: bytes allocated above the live baseline during \
                one forward (counting global allocator)"
                .into(),
            sample: None,
            cleanup: None,
        }
    }

    /// Measures `f` (one synced forward) and returns its output and its memory peak.
    fn measure<T>(&self, f: impl FnOnce() -> T) -> (T, Option<u64>) {
        match &self.sample {
            None => {
                let window = PeakWindow::start();
                let out = f();
                (out, window.peak_above_baseline())
            }
            Some(sample) => {
                if let Some(cleanup) = &self.cleanup {
                    cleanup();
                }
                let before = sample();
                let out = f();
                let after = sample();
                // No peak counter in the pool: the pool's growth during the forward (after
                // a cleanup) bounds the peak from below, and the output is still alive.
                let grown = after.reserved.saturating_sub(before.reserved);
                let live = after.in_use.saturating_sub(before.in_use);
                (out, Some(grown.max(live)))
            }
        }
    }
}

/// One measured row of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The method.
    pub method: Method,
    /// Sequence length.
    pub seq_len: usize,
    /// Batch size of this row (differs per length with `--tokens`).
    #[serde(default)]
    pub batch: usize,
    /// Median wall time of one forward pass, in milliseconds.
    pub median_ms: f64,
    /// Fastest forward pass, in milliseconds.
    pub min_ms: f64,
    /// Median time of the attention core alone (on pre-projected Q/K/V, no projections;
    /// the linear cores on feature-mapped Q and K), for flash, sparse, sliding window,
    /// hybrid, linear and causal linear: what the peers' kernels compute.
    #[serde(default)]
    pub core_ms: Option<f64>,
    /// Median time of a training step of the whole module (forward and backward of
    /// `sum(out * w)`), with `--train`.
    #[serde(default)]
    pub train_ms: Option<f64>,
    /// Memory peak of one forward pass in bytes, as the report's `memory` describes it
    /// (`None` when the counting allocator is not registered).
    pub peak_bytes: Option<u64>,
    /// Largest absolute difference from exact attention with the same weights (causal
    /// exact attention for the causal linear row), on random normal inputs.
    pub max_error: f64,
    /// Mean absolute difference from exact attention, on random normal inputs.
    #[serde(default)]
    pub mean_error: f64,
    /// Largest absolute difference from exact attention on structured inputs (see
    /// [`structured_input`]); `None` when skipped.
    #[serde(default)]
    pub structured_max_error: Option<f64>,
    /// Mean absolute difference from exact attention on structured inputs.
    #[serde(default)]
    pub structured_mean_error: Option<f64>,
    /// Our median time over each matching peer's (from `--peers`).
    #[serde(default)]
    pub peers: Vec<PeerRatio>,
    /// Whether the row's output must equal exact attention (exact, flash, and the hybrid
    /// while it runs flash).
    pub expect_exact: bool,
    /// The complexity model's prediction for this row.
    pub model: Cost,
}

/// Everything `compare` produced: the options, the backend and the rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// What the rows' `peak_bytes` measure.
    #[serde(default)]
    pub memory: String,
    /// The options the rows were run with.
    pub args: CompareArgs,
    /// One row per method and length.
    pub rows: Vec<Row>,
    /// Fitted growth of time and memory per method, beside the model's exponents.
    #[serde(default)]
    pub growth: Vec<crate::growth::Growth>,
}

/// A built module of any variant, so the loop can treat them alike.
enum Variant {
    // The baseline: plain materialised exact attention through these projections.
    Exact(FlashAttention),
    Flash(FlashAttention),
    Sparse(SparseAttention),
    LearnedSparse(LearnedSparseAttention),
    Linear(LinearAttention),
    CausalLinear(CausalLinearAttention),
    Sliding(SlidingWindowAttention),
    Adaptive(AdaptiveSlidingWindowAttention),
    Hybrid(HybridAttention),
}

impl Variant {
    fn build(method: Method, args: &CompareArgs, device: &Device) -> Self {
        let (d, h) = (args.d_model, args.heads);
        let sparse = |pattern: SparsePattern| {
            Variant::Sparse(
                SparseAttentionConfig::new(d, h)
                    .with_pattern(pattern)
                    .init(device),
            )
        };
        match method {
            Method::Exact => Variant::Exact(FlashAttentionConfig::new(d, h).init(device)),
            Method::Flash => Variant::Flash(FlashAttentionConfig::new(d, h).init(device)),
            Method::SparseLocal => sparse(SparsePattern::Local {
                window: args.sparse_window,
            }),
            Method::SparseStrided => sparse(SparsePattern::Strided {
                stride: args.stride,
                local: args.local,
            }),
            Method::SparseRandom => sparse(SparsePattern::Random {
                density: args.density,
                block: args.block,
                seed: args.seed,
            }),
            Method::LearnedSparse => Variant::LearnedSparse(
                LearnedSparseAttentionConfig::new(d, h)
                    .with_ratio(args.ratio)
                    .init(device),
            ),
            Method::Linear => Variant::Linear(LinearAttentionConfig::new(d, h).init(device)),
            Method::CausalLinear => Variant::CausalLinear(
                CausalLinearAttentionConfig::new(d, h)
                    .with_chunk_size(args.chunk)
                    .init(device),
            ),
            Method::SlidingWindow => Variant::Sliding(
                SlidingWindowAttentionConfig::new(d, h)
                    .with_window(args.window)
                    .init(device),
            ),
            Method::AdaptiveWindow => Variant::Adaptive(
                AdaptiveSlidingWindowAttentionConfig::new(d, h)
                    .with_min_window(args.min_window)
                    .with_max_window(args.max_window)
                    .init(device),
            ),
            // The same regimes and patterns as the model's hybrid, from the options, or
            // everything from the calibrated profile.
            Method::Hybrid => {
                let config = HybridAttentionConfig::new(d, h)
                    .with_flash_max_len(args.hybrid_flash_max)
                    .with_sparse_max_len(args.hybrid_sparse_max)
                    .with_sparse_pattern(SparsePattern::Local {
                        window: args.sparse_window,
                    })
                    .with_window(args.window);
                let config = match &args.hybrid_profile {
                    Some(path) => config
                        .with_profile_file(path)
                        .unwrap_or_else(|e| panic!("hybrid profile {}: {e}", path.display())),
                    None => config,
                };
                Variant::Hybrid(config.init(device))
            }
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Variant::Exact(m) => m.projection().exact(x, false),
            Variant::Flash(m) => m.forward(x),
            Variant::Sparse(m) => m.forward(x),
            Variant::LearnedSparse(m) => m.forward(x),
            Variant::Linear(m) => m.forward(x),
            Variant::CausalLinear(m) => m.forward(x),
            Variant::Sliding(m) => m.forward(x),
            Variant::Adaptive(m) => m.forward(x),
            Variant::Hybrid(m) => m.forward(x),
        }
    }

    fn projection(&self) -> &MultiHeadProjection {
        match self {
            Variant::Exact(m) | Variant::Flash(m) => m.projection(),
            Variant::Sparse(m) => m.projection(),
            Variant::LearnedSparse(m) => m.projection(),
            Variant::Linear(m) => m.projection(),
            Variant::CausalLinear(m) => m.projection(),
            Variant::Sliding(m) => m.projection(),
            Variant::Adaptive(m) => m.projection(),
            Variant::Hybrid(m) => m.projection(),
        }
    }

    fn projection_mut(&mut self) -> &mut MultiHeadProjection {
        match self {
            Variant::Exact(m) | Variant::Flash(m) => &mut m.projection,
            Variant::Sparse(m) => &mut m.projection,
            Variant::LearnedSparse(m) => &mut m.projection,
            Variant::Linear(m) => &mut m.projection,
            Variant::CausalLinear(m) => &mut m.projection,
            Variant::Sliding(m) => &mut m.projection,
            Variant::Adaptive(m) => &mut m.projection,
            Variant::Hybrid(m) => &mut m.projection,
        }
    }

    /// The core the module runs at length `n`, where it has one to time alone.
    fn core(&self, n: usize) -> Option<Core> {
        let pattern = |pattern, options| Some(Core::Pattern(Box::new((pattern, options))));
        match self {
            Variant::Flash(m) => pattern(KeyPattern::default(), m.options()),
            // With the module's block-sparse plan cache, as its forward runs.
            Variant::Sparse(m) => pattern(
                m.key_pattern(n, n),
                AttentionOptions::new().with_block_mask_cache(m.block_masks.clone()),
            ),
            Variant::Sliding(m) => pattern(
                KeyPattern::band(m.band(), m.causal),
                AttentionOptions::new(),
            ),
            Variant::Hybrid(m) => pattern(m.key_pattern(n), AttentionOptions::new()),
            Variant::Linear(m) => Some(Core::Linear {
                map: m.feature_map,
                eps: m.eps,
            }),
            Variant::CausalLinear(m) => Some(Core::CausalLinear {
                map: m.feature_map,
                eps: m.eps,
                chunk: m.chunk_size,
            }),
            _ => None,
        }
    }

    /// Whether the reference is causal exact attention.
    fn causal(&self) -> bool {
        matches!(self, Variant::CausalLinear(_))
    }
}

/// An attention core timed alone, on the module's own projections of the input.
enum Core {
    /// `pattern_attention` with these options.
    Pattern(Box<(KeyPattern, AttentionOptions)>),
    /// `linear_attention` on feature-mapped queries and keys.
    Linear { map: FeatureMap, eps: f64 },
    /// `causal_linear_attention` on feature-mapped queries and keys.
    CausalLinear {
        map: FeatureMap,
        eps: f64,
        chunk: usize,
    },
}

impl Core {
    /// The core on projected heads: the linear cores take their feature map's outputs
    /// (applied once, outside the timing, as the peers' kernels take them).
    fn runner(self, h: Heads) -> Box<dyn Fn() -> Tensor<4>> {
        match self {
            Core::Pattern(call) => Box::new(move || {
                let (pattern, options) = &*call;
                pattern_attention(
                    h.q.clone(),
                    h.k.clone(),
                    h.v.clone(),
                    pattern,
                    options,
                    None,
                    0.0,
                )
            }),
            Core::Linear { map, eps } => {
                let (q, k) = (map.apply(h.q), map.apply(h.k));
                Box::new(move || linear_attention(q.clone(), k.clone(), h.v.clone(), eps, None))
            }
            Core::CausalLinear { map, eps, chunk } => {
                let (q, k) = (map.apply(h.q), map.apply(h.k));
                Box::new(move || {
                    causal_linear_attention(q.clone(), k.clone(), h.v.clone(), chunk, eps, None).0
                })
            }
        }
    }
}

/// Runs `forward` and waits for the device, so timings include the work on GPUs.
fn forward_synced(variant: &Variant, x: &Tensor<3>, device: &Device) -> Tensor<3> {
    let out = variant.forward(x.clone());
    sync(device);
    out
}

/// The median of `times` (the mean of the middle two for an even count).
pub fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    let n = times.len();
    if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    }
}

/// A progress bar over `total` rows on stderr, hidden when asked or not on a terminal.
pub fn progress_bar(total: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} rows, {elapsed} [{msg}]")
            .expect("valid template"),
    );
    bar
}

/// Inputs with real attention structure, `[batch, n, d_model]`, scaled by `gain`.
///
/// Random inputs make attention nearly uniform, which flatters approximations. Here each
/// token is a first-order autoregressive sequence along the length (correlation 0.9 with its
/// neighbour: local structure), and `max(1, n / 32)` tokens are exact copies of tokens at
/// least `n / 4` positions away (a few strong long-range matches). With the query and key
/// projections tied (as `compare` does for these inputs), a copy's key matches its source's
/// query as strongly as the token itself, so local patterns miss mass that exact attention
/// puts far away, and linear attention blurs the sharp peaks.
pub fn structured_input(batch: usize, n: usize, d_model: usize, gain: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = move || {
        // Box-Muller from two uniforms.
        let u1: f32 = rng.random::<f32>().max(1e-7);
        let u2: f32 = rng.random::<f32>();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let rho = 0.9f32;
    let innovation = (1.0 - rho * rho).sqrt();
    let mut x = vec![0f32; batch * n * d_model];
    for b in 0..batch {
        let base = b * n * d_model;
        for i in 0..n {
            for c in 0..d_model {
                let prev = if i == 0 {
                    normal()
                } else {
                    x[base + (i - 1) * d_model + c]
                };
                x[base + i * d_model + c] = rho * prev + innovation * normal();
            }
        }
        let mut pick = StdRng::seed_from_u64(seed ^ 0x5eed ^ b as u64);
        if n >= 8 {
            for _ in 0..(n / 32).max(1) {
                let src = pick.random_range(0..n);
                let far = n / 4;
                let dst = if src + far < n {
                    pick.random_range(src + far..n)
                } else {
                    pick.random_range(0..=src - far)
                };
                x.copy_within(
                    base + src * d_model..base + (src + 1) * d_model,
                    base + dst * d_model,
                );
            }
        }
    }
    x.iter_mut().for_each(|v| *v *= gain);
    x
}

/// Wall milliseconds of `repeats` calls of `f` (each must sync the device itself).
fn timed_ms(repeats: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// Max and mean absolute difference.
fn errors(out: Tensor<3>, reference: Tensor<3>) -> (f64, f64) {
    // Reduce in f32 whatever the backend's float type, so the mean does not round away.
    let diff = (out - reference).abs().cast(burn::tensor::FloatDType::F32);
    let max = diff.clone().max().into_scalar::<f64>();
    let mean = diff.mean().into_scalar::<f64>();
    (max, mean)
}

/// The median time of a training step of `method`'s module at length `n` (built on the
/// autodiff device with the same seed): forward and backward of `sum(out * w)`, synced.
fn train_step_ms(method: Method, n: usize, args: &CompareArgs, device: &Device) -> f64 {
    let device = device.clone().autodiff();
    device.seed(args.seed ^ (n as u64).rotate_left(17) ^ method as u64);
    let variant = Variant::build(method, args, &device);
    let shape = [args.batch_for(n), n, args.d_model];
    let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
    let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let step = || {
        let grads = (variant.forward(x.clone()) * w.clone()).sum().backward();
        sync(&device);
        drop(grads);
    };
    for _ in 0..args.warmup.max(1) {
        step();
    }
    median(timed_ms(args.repeats, step))
}

/// Measures one method at one length.
fn measure(
    method: Method,
    n: usize,
    args: &CompareArgs,
    device: &Device,
    meter: &MemoryMeter,
) -> Row {
    device.seed(args.seed ^ (n as u64).rotate_left(17) ^ method as u64);
    let mut variant = Variant::build(method, args, device);
    let batch = args.batch_for(n);
    let x = Tensor::<3>::random(
        [batch, n, args.d_model],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let reference = variant.projection().exact(x.clone(), variant.causal());

    for _ in 0..args.warmup {
        drop(forward_synced(&variant, &x, device));
    }
    // One forward under the memory window, on its own so timing does not pay for it.
    let (out, peak_bytes) = meter.measure(|| forward_synced(&variant, &x, device));
    let (max_error, mean_error) = errors(out, reference);

    let times = timed_ms(args.repeats, || drop(forward_synced(&variant, &x, device)));
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);

    let core_ms = variant.core(n).map(|core| {
        let run = core.runner(variant.projection().split_self(x.clone()));
        let core = || {
            let out = run();
            sync(device);
            out
        };
        drop(core());
        median(timed_ms(args.repeats, || drop(core())))
    });

    let train_ms = args.train.then(|| train_step_ms(method, n, args, device));

    let (structured_max_error, structured_mean_error) = if args.no_structured {
        (None, None)
    } else {
        // Tied query/key projections: a retrieval-like head on inputs with structure.
        let projection = variant.projection_mut();
        projection.key = projection.query.clone();
        let data = structured_input(batch, n, args.d_model, 3.0, args.seed ^ n as u64);
        let xs = Tensor::<3>::from_data(TensorData::new(data, [batch, n, args.d_model]), device);
        let reference = variant.projection().exact(xs.clone(), variant.causal());
        let (max, mean) = errors(variant.forward(xs), reference);
        (Some(max), Some(mean))
    };

    let model = args.model().with_batch(batch).cost(method, n);
    Row {
        method,
        seq_len: n,
        batch,
        median_ms: median(times),
        min_ms,
        core_ms,
        train_ms,
        peak_bytes,
        max_error,
        mean_error,
        structured_max_error,
        structured_mean_error,
        peers: Vec::new(),
        expect_exact: model.selected.is_exact(),
        model,
    }
}

/// Runs every selected method at every length on `device`, advancing `bar` per row.
pub fn run(
    device: &Device,
    args: &CompareArgs,
    meter: &MemoryMeter,
    bar: &ProgressBar,
) -> Vec<Row> {
    let methods = args.selected_methods();
    let mut rows = Vec::with_capacity(methods.len() * args.lengths.len());
    let start = std::time::Instant::now();
    let mut not_run = 0;
    for &n in &args.lengths {
        for &method in &methods {
            if args
                .time_limit
                .is_some_and(|limit| start.elapsed().as_secs_f64() >= limit)
            {
                not_run += 1;
                bar.inc(1);
                continue;
            }
            bar.set_message(format!("{method} n={n}"));
            // A method that fails at a size (out of memory, an unsupported shape) loses its
            // row, not the whole table.
            let row = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                measure(method, n, args, device, meter)
            }));
            match row {
                Ok(row) => {
                    // Without a visible bar (logs, CI, remote runs), one line per row shows
                    // progress and keeps partial results if the run is cut short.
                    if bar.is_hidden() {
                        eprintln!(
                            "{method} n={n} batch={}: {:.3} ms, core {}, max err {:.2e}",
                            row.batch,
                            row.median_ms,
                            row.core_ms.map_or("-".into(), |t| format!("{t:.3} ms")),
                            row.max_error
                        );
                    }
                    rows.push(row)
                }
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    // The device too: an allocation failure names only the bytes asked.
                    bar.println(format!(
                        "{method} n={n} on {device:?}: failed, row skipped: {msg}"
                    ));
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if not_run > 0 {
        eprintln!(
            "--time-limit reached after {:.0} s: {not_run} of {} rows not run",
            start.elapsed().as_secs_f64(),
            methods.len() * args.lengths.len()
        );
    }
    rows
}

/// The selected (method, length) pairs without a row: failed, or not started before
/// `--time-limit`.
pub fn missing_rows(args: &CompareArgs, rows: &[Row]) -> Vec<(Method, usize)> {
    args.lengths
        .iter()
        .flat_map(|&n| args.selected_methods().into_iter().map(move |m| (m, n)))
        .filter(|&(m, n)| !rows.iter().any(|r| r.method == m && r.seq_len == n))
        .collect()
}

/// The backend's name for the report.
pub fn backend_name(device: &Device) -> String {
    use burn::backend::{Backend, Dispatch};
    Dispatch::name(device.as_dispatch())
}
