//! The comparison itself, generic over the backend: build each variant, time it, measure
//! its allocator peak and its error against exact attention with the same weights.

use std::time::Instant;

use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
use burn_attn::nn::complexity::{Cost, Method};
use burn_attn::{
    AdaptiveSlidingWindowAttention, AdaptiveSlidingWindowAttentionConfig, AttentionBackend,
    CausalLinearAttention, CausalLinearAttentionConfig, FlashAttention, FlashAttentionConfig,
    HybridAttention, HybridAttentionConfig, LearnedSparseAttention, LearnedSparseAttentionConfig,
    LinearAttention, LinearAttentionConfig, MultiHeadProjection, SlidingWindowAttention,
    SlidingWindowAttentionConfig, SparseAttention, SparseAttentionConfig, SparsePattern,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::alloc::PeakWindow;
use crate::cli::CompareArgs;

/// One measured row of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The method.
    pub method: Method,
    /// Sequence length.
    pub seq_len: usize,
    /// Median wall time of one forward pass, in milliseconds.
    pub median_ms: f64,
    /// Fastest forward pass, in milliseconds.
    pub min_ms: f64,
    /// Bytes allocated above the live baseline during one forward pass (host allocator;
    /// `None` when the counting allocator is not registered).
    pub peak_bytes: Option<u64>,
    /// Largest absolute difference from exact attention with the same weights (causal
    /// exact attention for the causal linear row).
    pub max_error: f64,
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
    /// The options the rows were run with.
    pub args: CompareArgs,
    /// One row per method and length.
    pub rows: Vec<Row>,
}

/// A built module of any variant, so the loop can treat them alike.
enum Variant<B: AttentionBackend> {
    // The baseline: plain materialised exact attention through these projections.
    Exact(FlashAttention<B>),
    Flash(FlashAttention<B>),
    Sparse(SparseAttention<B>),
    LearnedSparse(LearnedSparseAttention<B>),
    Linear(LinearAttention<B>),
    CausalLinear(CausalLinearAttention<B>),
    Sliding(SlidingWindowAttention<B>),
    Adaptive(AdaptiveSlidingWindowAttention<B>),
    Hybrid(HybridAttention<B>),
}

impl<B: AttentionBackend> Variant<B> {
    fn build(method: Method, args: &CompareArgs, device: &B::Device) -> Self {
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
            // The same regimes and patterns as the model's hybrid, from the options.
            Method::Hybrid => Variant::Hybrid(
                HybridAttentionConfig::new(d, h)
                    .with_flash_max_len(args.hybrid_flash_max)
                    .with_sparse_max_len(args.hybrid_sparse_max)
                    .with_sparse_pattern(SparsePattern::Local {
                        window: args.sparse_window,
                    })
                    .with_window(args.window)
                    .init(device),
            ),
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
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

    fn projection(&self) -> &MultiHeadProjection<B> {
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

    /// Whether the reference is causal exact attention.
    fn causal(&self) -> bool {
        matches!(self, Variant::CausalLinear(_))
    }
}

/// Runs `forward` and waits for the device, so timings include the work on GPUs.
fn forward_synced<B: AttentionBackend>(
    variant: &Variant<B>,
    x: &Tensor<B, 3>,
    device: &B::Device,
) -> Tensor<B, 3> {
    let out = variant.forward(x.clone());
    // A failed sync only means the timing is off; the error check below still reads back.
    let _ = B::sync(device);
    out
}

fn median(mut times: Vec<f64>) -> f64 {
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

/// Measures one method at one length.
fn measure<B: AttentionBackend>(
    method: Method,
    n: usize,
    args: &CompareArgs,
    device: &B::Device,
) -> Row {
    B::seed(
        device,
        args.seed ^ (n as u64).rotate_left(17) ^ method as u64,
    );
    let variant = Variant::<B>::build(method, args, device);
    let x = Tensor::<B, 3>::random(
        [args.batch, n, args.d_model],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let reference = variant.projection().exact(x.clone(), variant.causal());

    for _ in 0..args.warmup {
        drop(forward_synced(&variant, &x, device));
    }
    // One forward under the allocator window, on its own so timing does not pay for it.
    let window = PeakWindow::start();
    let out = forward_synced(&variant, &x, device);
    let peak_bytes = window.peak_above_baseline();

    let max_error = (out - reference).abs().max().into_scalar().elem::<f64>();

    let times: Vec<f64> = (0..args.repeats)
        .map(|_| {
            let start = Instant::now();
            drop(forward_synced(&variant, &x, device));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    let model = args.model().cost(method, n);
    Row {
        method,
        seq_len: n,
        median_ms: median(times),
        min_ms,
        peak_bytes,
        max_error,
        expect_exact: model.selected.is_exact(),
        model,
    }
}

/// Runs every selected method at every length on backend `B`, advancing `bar` per row.
pub fn run<B: AttentionBackend>(
    device: &B::Device,
    args: &CompareArgs,
    bar: &ProgressBar,
) -> Vec<Row> {
    let methods = args.selected_methods();
    let mut rows = Vec::with_capacity(methods.len() * args.lengths.len());
    for &n in &args.lengths {
        for &method in &methods {
            bar.set_message(format!("{method} n={n}"));
            rows.push(measure::<B>(method, n, args, device));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    rows
}

/// The backend's name for the report.
pub fn backend_name<B: Backend>(device: &B::Device) -> String {
    B::name(device)
}
