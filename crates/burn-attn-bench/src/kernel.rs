//! `kernel`: the attention op against Burn's own `module::attention` (its fused kernel)
//! and `attention_fallback` (materialised) on the same backend, same shapes, same run.
//!
//! ```sh
//! burn-attn-bench kernel --backend cuda --dtype bf16            # forward
//! burn-attn-bench kernel --backend cuda --dtype bf16 --backward # training step
//! burn-attn-bench kernel --backend cuda --memory                # long-sequence memory
//! burn-attn-bench kernel --quick                                # CPU sanity run
//! ```
//! Prints one line per case and, with `--json PATH`, writes the results. TFLOP/s use
//! FlashAttention's count: `4*b*h*n*n*d`, half of it causal, the visible band for windows.
//! `--only TEXT` keeps the cases whose label contains TEXT; `--memory` runs the long
//! sequence memory case instead (GPU backends: device pool bytes after one forward);
//! `--skip-burn` drops Burn's kernels, which otherwise run up to n = 4096 (`--burn-all`:
//! at every length). `--backward` times training steps instead: forward plus backward
//! through `Autodiff` (gradients of `sum(out * w)` for Q, K and V), reporting the
//! backward alone (step minus forward) with the backward count `2.5x` the forward's, and
//! Burn's materialised attention trained the same way as the peer; with `--memory` it
//! runs one training step at n = 32768. `--memory-seq N` changes the memory case's length.
//! `--tokens N` sets the tokens of the full and causal cases (batch = N / n; default
//! 32768; the window cases keep b = 2). On `wgpu` Burn's kernels are skipped, with a
//! note, where their `b*h*n*n` f32 scores reach 2 GiB: WGPU refuses such buffers (2 GiB
//! exactly was refused on the H200), and the failed allocation takes the process down.
//! `--calls K` times K calls back to back per sample (median of the per-call means): the
//! host's work for one call then overlaps the GPU's for the previous ones, where the
//! default (K = 1) also counts each call's host work and launch before its kernel.
//! `--peers PATH` reads the peer script's JSON
//! (`scripts/peers/torch_attention.py`) and prints our time over each matching peer's.
//! `--plan-*` options force kernel tiles and schedule (tuning runs; a forced choice the
//! call cannot run makes the run fail rather than time another plan), `--tf32` lets f32
//! run on the matrix units with tf32 products.

use std::time::Instant;

use burn::tensor::module::{attention as burn_attention, attention_fallback};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Int, Tensor};
use burn_attn::cores::{ForcedPlan, KernelPolicy, KeyPattern};
use burn_attn::{attention, masked_attention, AttentionMasks, AttentionOptions, Window};
use clap::{Args, ValueEnum};

use crate::cli::DType;
use crate::peers::{dtype_name, load_peers, PeerRecord};

/// One benchmark case.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    seq: usize,
    head_dim: usize,
    causal: bool,
    window: Option<usize>,
}

impl Case {
    /// The case's band: a symmetric window of `w` sees `w + 1` keys (`|i - j| <= w / 2`), a
    /// causal one `w` keys (`0 <= i - j < w`), as FlexAttention's masks in the peer script.
    fn options(&self) -> AttentionOptions {
        let window = match (self.window, self.causal) {
            (None, _) => Window::FULL,
            (Some(w), false) => Window::symmetric(w),
            (Some(w), true) => Window::causal(w),
        };
        AttentionOptions::new()
            .with_causal(self.causal)
            .with_window(window)
    }

    /// The options of our calls: the case's band, the run's tf32 choice and forced plan;
    /// a kernel is required (a fallback would be timed as ours otherwise), except on the
    /// CPU, which has none.
    fn run_options(&self, args: &KernelArgs) -> AttentionOptions {
        let mut options = self.options().with_tf32(args.tf32);
        if args.backend != KernelBackend::Cpu {
            options = options.with_kernel(KernelPolicy::Require);
        }
        let forced = args.plan.forced();
        if !forced.is_default() {
            options = options.with_forced_plan(forced);
        }
        options
    }

    /// Visible (query, key) pairs, summed exactly over rows.
    fn pairs(&self) -> f64 {
        let n = self.seq as i64;
        let w = self.options().effective_window();
        (0..n)
            .map(|i| {
                let lo = w.left.map_or(0, |l| (i - l as i64).max(0));
                let hi = w.right.map_or(n - 1, |r| (i + r as i64).min(n - 1));
                (hi - lo + 1).max(0) as f64
            })
            .sum()
    }

    /// Burn's options for the same case (its attention has no window option).
    fn burn_options(&self) -> AttentionModuleOptions {
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: self.causal,
        }
    }

    fn flops(&self) -> f64 {
        4.0 * (self.batch * self.heads * self.head_dim) as f64 * self.pairs()
    }

    fn label(&self) -> String {
        let mask = match (self.causal, self.window) {
            (c, Some(w)) => format!("{}window {w}", if c { "causal " } else { "" }),
            (true, None) => "causal".into(),
            (false, None) => "full".into(),
        };
        format!(
            "b={} h={} n={} d={} {mask}",
            self.batch, self.heads, self.seq, self.head_dim
        )
    }
}

fn suite(quick: bool, tokens: Option<usize>) -> Vec<Case> {
    let mut cases = Vec::new();
    let (lengths, heads): (&[usize], usize) = if quick {
        (&[256, 512], 4)
    } else {
        (&[1024, 4096, 16384], 16)
    };
    let tokens = tokens.unwrap_or(if quick { 1024 } else { 32768 });
    for &seq in lengths {
        for causal in [false, true] {
            cases.push(Case {
                batch: (tokens / seq).max(1),
                heads,
                seq,
                head_dim: if quick { 64 } else { 128 },
                causal,
                window: None,
            });
        }
    }
    if !quick {
        for (causal, w) in [(false, 1024), (false, 256), (true, 1024)] {
            cases.push(Case {
                batch: 2,
                heads: 16,
                seq: 16384,
                head_dim: 128,
                causal,
                window: Some(w),
            });
        }
    }
    cases
}

/// A throughput with three significant digits (GPU rates are tens to hundreds of
/// TFLOP/s, CPU rates thousandths).
fn rate(tflops: f64) -> String {
    if tflops >= 10.0 {
        format!("{tflops:.1}")
    } else {
        format!("{tflops:.3}")
    }
}

/// One peer's column of a printed row: its time, rate, and its time over ours.
fn peer_column(name: &str, ms: f64, tflops: f64, ours: f64) -> String {
    format!(
        " | {name} {:>9.3} ms {:>7} TFLOP/s | x{:.2}",
        ms,
        rate(tflops),
        ms / ours
    )
}

/// Median wall time of `f` over `repeats` synchronised samples of `calls` back-to-back
/// runs each (per run), after a warm-up of at least three runs and 200 ms: a GPU that was
/// idle (or compiling) runs its first milliseconds at lower clocks, which moved
/// one-millisecond cases by 13% between runs of one binary.
pub(crate) fn median_ms(device: &Device, repeats: usize, calls: usize, mut f: impl FnMut()) -> f64 {
    let warm = Instant::now();
    let mut runs = 0;
    while runs < 3 || warm.elapsed().as_secs_f64() < 0.2 {
        f();
        crate::device::sync(device);
        runs += 1;
    }
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            crate::device::sync(device);
            start.elapsed().as_secs_f64() * 1e3 / calls as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Whether Burn's materialised attention runs for the case: full or causal only, and its
/// scores need b*h*n*n floats, so only up to n = 4096.
fn runs_materialised(case: &Case, args: &KernelArgs) -> bool {
    case.window.is_none() && !args.skip_burn && case.seq <= 4096 && burn_fits(case, args)
}

/// Whether Burn's fused attention is wanted for the case, buffer limits aside: it has no
/// window option (full and causal only), and it autotunes per shape and runs at ~5
/// TFLOP/s past n = 4096 (its peer numbers stop there too), so only up to there unless
/// `--burn-all`.
fn wants_burn_fused(case: &Case, args: &KernelArgs) -> bool {
    case.window.is_none() && !args.skip_burn && (case.seq <= 4096 || args.burn_all)
}

/// WGPU's largest buffer (wgpu's default `max_buffer_size` is 256 MiB; adapters raise it
/// to about 2 GiB, and an allocation past it aborts the process).
const WGPU_MAX_BUFFER: usize = 1 << 31;

/// Whether Burn's kernels, which hold the `b*h*n*n` scores in f32, can run the case on the
/// backend (the limit is WGPU's buffer size).
fn burn_fits(case: &Case, args: &KernelArgs) -> bool {
    args.backend != KernelBackend::Wgpu || score_bytes(case) < WGPU_MAX_BUFFER
}

fn score_bytes(case: &Case) -> usize {
    case.batch * case.heads * case.seq * case.seq * 4
}

/// Says so when Burn's kernels are left out of a case for WGPU's buffer limit (only for
/// cases they would otherwise run).
fn note_burn_skipped(case: &Case, args: &KernelArgs) {
    if wants_burn_fused(case, args) && !burn_fits(case, args) {
        eprintln!(
            "{}: Burn's kernels skipped: their scores take {:.1} GiB, at or past WGPU's {} GiB buffer limit (fewer --tokens fit)",
            case.label(),
            score_bytes(case) as f64 / (1u64 << 30) as f64,
            WGPU_MAX_BUFFER >> 30
        );
    }
}

/// The suite's cases whose label contains `--only`'s text (all without it).
fn selected_cases(args: &KernelArgs) -> Vec<Case> {
    suite(args.quick, args.tokens)
        .into_iter()
        .filter(|c| {
            args.only
                .as_ref()
                .is_none_or(|o| c.label().contains(o.as_str()))
        })
        .collect()
}

/// Burn's materialised attention (`attention_fallback`) of the case.
fn burn_materialised(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, case: &Case) -> Tensor<4> {
    attention_fallback(
        q.clone(),
        k.clone(),
        v.clone(),
        None,
        None,
        case.burn_options(),
    )
}

fn run(device: &Device, args: &KernelArgs) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let cases = selected_cases(args);
    for case in cases {
        note_burn_skipped(&case, args);
        let q_shape = [case.batch, case.heads, case.seq, case.head_dim];
        let rand = || Tensor::<4>::random(q_shape, Distribution::Normal(0.0, 1.0), device);
        let (q, k, v) = (rand(), rand(), rand());
        let opts = case.run_options(args);
        let ours = median_ms(device, args.repeats, args.calls, || {
            let _ = attention(q.clone(), k.clone(), v.clone(), &opts);
        });
        let materialised = runs_materialised(&case, args).then(|| {
            median_ms(device, args.repeats, args.calls, || {
                let _ = burn_materialised(&q, &k, &v, &case);
            })
        });
        let burn_fused = wants_burn_fused(&case, args) && burn_fits(&case, args);
        let burn = burn_fused.then(|| {
            median_ms(device, args.repeats, args.calls, || {
                let _ = burn_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    None,
                    case.burn_options(),
                );
            })
        });
        let tflops = |ms: f64| case.flops() / ms / 1e9;
        let mut line = format!(
            "{:<44} ours {:>9.3} ms {:>7} TFLOP/s",
            case.label(),
            ours,
            rate(tflops(ours))
        );
        if let Some(b) = burn {
            line += &peer_column("burn", b, tflops(b), ours);
        }
        if let Some(m) = materialised {
            line += &peer_column("materialised", m, tflops(m), ours);
        }
        println!("{line}");
        rows.push(serde_json::json!({
            "case": case.label(), "b": case.batch, "h": case.heads, "n": case.seq,
            "d": case.head_dim, "causal": case.causal, "window": case.window,
            "dtype": args.dtype.name(), "backend": args.backend.name(),
            "ours_ms": ours, "ours_tflops": tflops(ours),
            "burn_ms": burn, "burn_tflops": burn.map(tflops),
            "materialised_ms": materialised, "materialised_tflops": materialised.map(tflops),
        }));
    }
    rows
}

/// Training-step timings (`--backward`): the forward alone, then forward plus backward
/// through `Autodiff`; the backward is their difference.
fn run_backward(device: &Device, args: &KernelArgs) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let cases = selected_cases(args);
    for case in cases {
        note_burn_skipped(&case, args);
        let q_shape = [case.batch, case.heads, case.seq, case.head_dim];
        let rand = || Tensor::<4>::random(q_shape, Distribution::Normal(0.0, 1.0), device);
        let (q, k, v, w) = (rand(), rand(), rand(), rand());
        let opts = case.run_options(args);
        // One training step of ours (`materialised = false`) or of Burn's materialised
        // attention: the gradients of sum(out * w) for q, k and v.
        let step = |materialised: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let out = if materialised {
                burn_materialised(&q, &k, &v, &case)
            } else {
                attention(q.clone(), k.clone(), v.clone(), &opts)
            };
            let grads = (out * w.clone()).sum().backward();
            let _ = (q.grad(&grads), k.grad(&grads), v.grad(&grads));
        };
        let forward = median_ms(device, args.repeats, args.calls, || {
            let _ = attention(q.clone(), k.clone(), v.clone(), &opts);
        });
        let ours = median_ms(device, args.repeats, args.calls, || step(false)) - forward;
        let materialised = runs_materialised(&case, args).then(|| {
            let fwd = median_ms(device, args.repeats, args.calls, || {
                let _ = burn_materialised(&q, &k, &v, &case);
            });
            median_ms(device, args.repeats, args.calls, || step(true)) - fwd
        });
        // DESIGN.md's count: the backward is 2.5x the forward's FLOPs.
        let tflops = |ms: f64| 2.5 * case.flops() / ms.max(1e-6) / 1e9;
        let mut line = format!(
            "{:<44} backward ours {:>9.3} ms {:>7} TFLOP/s (forward {:.3} ms)",
            case.label(),
            ours,
            rate(tflops(ours)),
            forward
        );
        if let Some(m) = materialised {
            line += &peer_column("materialised", m, tflops(m), ours);
        }
        println!("{line}");
        rows.push(serde_json::json!({
            "case": case.label(), "pass": "backward", "b": case.batch, "h": case.heads,
            "n": case.seq, "d": case.head_dim, "causal": case.causal, "window": case.window,
            "dtype": args.dtype.name(), "backend": args.backend.name(), "forward_ms": forward,
            "ours_ms": ours, "ours_tflops": tflops(ours),
            "materialised_ms": materialised, "materialised_tflops": materialised.map(tflops),
        }));
    }
    rows
}

/// The memory targets' cases: b = 1, h = 16, d = 128; one forward at n = 65536, or with
/// `--backward` one training step (forward and backward of `sum(out * w)`) at n = 32768;
/// with `--memory-masks` under key padding (the last 30% of keys) and dropout 0.1.
///
/// The inputs are constant-filled (memory does not depend on the values; random
/// generation leaves pages of f32 intermediates in the pool). After a pool cleanup with
/// only the inputs alive, the call runs and the pool's reserved bytes are read with its
/// outputs (and gradients) alive: the pool returns no pages during the call, so that
/// reading bounds the peak from above (up to page rounding). The live bytes (`in use`)
/// before and after are printed too.
fn memory_case(device: &Device, args: &KernelArgs) -> Vec<serde_json::Value> {
    let reserved = || device.memory_pool_usage().map_or(0, |u| u.bytes_reserved);
    // Bytes of live allocations (no padding, no free pages).
    let in_use = || device.memory_pool_usage().map_or(0, |u| u.bytes_in_use);
    use burn_attn::cores::attention_with_lse;
    let default_seq = if args.backward { 32768 } else { 65536 };
    let (b, h, n, d) = (
        1usize,
        16usize,
        args.memory_seq.unwrap_or(default_seq),
        128usize,
    );
    let mut rows = Vec::new();
    for causal in [false, true] {
        let fill = |x: f32| Tensor::<4>::full([b, h, n, d], x, device);
        let (q, k, v) = (fill(0.02), fill(0.01), fill(0.5));
        let w = args.backward.then(|| fill(1.0));
        let elem = q.dtype().size() as u64;
        crate::device::sync(device);
        device.memory_cleanup();
        let before = reserved();
        let in_use_before = in_use();
        let opts = AttentionOptions::new()
            .with_causal(causal)
            .with_tf32(args.tf32)
            .with_kernel(KernelPolicy::Require)
            .with_forced_plan(args.plan.forced());
        let masks = args.memory_masks.then(|| AttentionMasks {
            key_padding: Some(
                Tensor::<1, Int>::arange(0..n as i64, device)
                    .reshape([1, n])
                    .greater_equal_elem((n - 3 * n / 10) as i64),
            ),
            dropout: if args.backward { 0.1 } else { 0.0 },
            ..AttentionMasks::default()
        });
        let call = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| match &masks {
            Some(masks) => masked_attention(q, k, v, &KeyPattern::default(), &opts, masks),
            None => attention(q, k, v, &opts),
        };
        let start = Instant::now();
        // Keep what the call returns alive while the pool is read.
        let kept = match &w {
            None if masks.is_some() => (Some((call(q.clone(), k.clone(), v.clone()), None)), None),
            None => {
                let (o, lse) = attention_with_lse(q.clone(), k.clone(), v.clone(), &opts);
                (Some((o, Some(lse))), None)
            }
            Some(w) => {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = call(q.clone(), k.clone(), v.clone());
                let grads = (out * w.clone()).sum().backward();
                (None, Some((q.grad(&grads), k.grad(&grads), v.grad(&grads))))
            }
        };
        crate::device::sync(device);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let after = reserved();
        let in_use_after = in_use();
        // Forward: Q, K, V, O and the f32 lse. Training: Q, K, V, O, their four gradients
        // (dO = w) and the lse.
        let tensors_n = if args.backward { 8 } else { 4 };
        let tensors = (tensors_n * b * h * n * d) as u64 * elem + (b * h * n * 4) as u64;
        let ratio = after as f64 / tensors as f64;
        let what = match (args.backward, args.memory_masks) {
            (true, false) => "training step",
            (true, true) => "training step, padding 30%, dropout 0.1",
            (false, false) => "forward",
            (false, true) => "forward, padding 30%",
        };
        println!(
            "memory {what} b={b} h={h} n={n} d={d} causal={causal} {}: pool {:.1} MiB before, \
             {:.1} MiB after ({ms:.1} ms, first call); in use {:.1} MiB before, {:.1} MiB \
             after; tensors {:.1} MiB; reserved ratio {ratio:.3}, in-use ratio {:.3}",
            args.dtype.name(),
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            in_use_before as f64 / 1048576.0,
            in_use_after as f64 / 1048576.0,
            tensors as f64 / 1048576.0,
            in_use_after as f64 / tensors as f64,
        );
        drop(kept);
        rows.push(serde_json::json!({
            "case": format!("memory {what}"), "b": b, "h": h, "n": n, "d": d,
            "causal": causal, "dtype": args.dtype.name(), "backend": args.backend.name(),
            "reserved_before": before, "reserved_after": after, "tensor_bytes": tensors,
            "ratio": ratio, "in_use_before": in_use_before, "in_use_after": in_use_after,
        }));
    }
    rows
}

/// Where `kernel` runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelBackend {
    /// The CPU backend (`Device::ndarray()`, f32): the tiled tensor ops, for a sanity run.
    Cpu,
    /// Burn's `Wgpu` backend (feature `wgpu`).
    Wgpu,
    /// Burn's `Cuda` backend (feature `cuda`).
    Cuda,
}

impl KernelBackend {
    /// The name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KernelBackend::Cpu => "cpu",
            KernelBackend::Wgpu => "wgpu",
            KernelBackend::Cuda => "cuda",
        }
    }
}

/// Forced kernel tiles and schedule (tuning runs): see `ForcedPlan`.
#[derive(Args, Debug, Clone, Default)]
pub struct PlanArgs {
    /// Planes per cube of the matrix-unit forward (2, 4, 8).
    #[arg(long)]
    pub plan_mma_planes: Option<usize>,
    /// Query rows per plane of the matrix-unit forward (16, 32).
    #[arg(long)]
    pub plan_mma_rows: Option<usize>,
    /// Keys per tile of the matrix-unit forward (16, 32, 64).
    #[arg(long)]
    pub plan_mma_block_k: Option<usize>,
    /// Query rows per plane of the tf32 forward (16, 32).
    #[arg(long)]
    pub plan_tf32_rows: Option<usize>,
    /// Keys per tile of the tf32 forward (8, 16, 32, 64).
    #[arg(long)]
    pub plan_tf32_block_k: Option<usize>,
    /// Synchronous staging in the matrix-unit kernels.
    #[arg(long)]
    pub plan_sync_staging: bool,
    /// Query rows per cube of the portable forward (8, 16, 32, 64).
    #[arg(long)]
    pub plan_unit_block_q: Option<usize>,
    /// Keys per tile of the portable forward (8, 16, 32, 64).
    #[arg(long)]
    pub plan_unit_block_k: Option<usize>,
    /// Shared memory of the portable kernels' tiles, KiB (32 to 192).
    #[arg(long)]
    pub plan_unit_shared_kib: Option<usize>,
    /// Heads per group of the heavy-first order, 0 for the natural order.
    #[arg(long)]
    pub plan_heavy_first: Option<u32>,
    /// Leave the matrix-unit kernels out (the portable kernels serve f16/bf16 too).
    #[arg(long)]
    pub plan_no_matrix_units: bool,
    /// Keys per tile of the matrix-unit dQ kernel (16, 32, 64).
    #[arg(long)]
    pub plan_dq_block_k: Option<usize>,
    /// Query rows per tile of the matrix-unit dK/dV kernel (16, 32, 64).
    #[arg(long)]
    pub plan_dkdv_block_q: Option<usize>,
    /// Query rows per plane of the matrix-unit dQ kernel (16, 32).
    #[arg(long)]
    pub plan_dq_rows: Option<usize>,
    /// Key splits of the portable forward (1 to 64; 1: none).
    #[arg(long)]
    pub plan_key_splits: Option<usize>,
}

impl PlanArgs {
    /// The forced plan these options describe.
    pub fn forced(&self) -> ForcedPlan {
        ForcedPlan {
            mma_planes: self.plan_mma_planes,
            mma_rows: self.plan_mma_rows,
            mma_block_k: self.plan_mma_block_k,
            tf32_rows: self.plan_tf32_rows,
            tf32_block_k: self.plan_tf32_block_k,
            sync_staging: self.plan_sync_staging,
            unit_block_q: self.plan_unit_block_q,
            unit_block_k: self.plan_unit_block_k,
            unit_shared_kib: self.plan_unit_shared_kib,
            heavy_first: self.plan_heavy_first,
            dq_block_k: self.plan_dq_block_k,
            dq_rows: self.plan_dq_rows,
            dkdv_block_q: self.plan_dkdv_block_q,
            key_splits: self.plan_key_splits,
            no_matrix_units: self.plan_no_matrix_units,
            lift_loop_cap: false,
        }
    }
}

/// Options of `kernel`.
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Where the cases run.
    #[arg(long, value_enum, default_value_t = KernelBackend::Cpu)]
    pub backend: KernelBackend,
    /// Float type of the inputs.
    #[arg(long, value_enum, default_value_t = DType::F32)]
    pub dtype: DType,
    /// Small cases (n = 256, 512; h = 4, d = 64): a sanity run.
    #[arg(long)]
    pub quick: bool,
    /// Leave Burn's attention kernels out.
    #[arg(long)]
    pub skip_burn: bool,
    /// Run Burn's fused attention at every length (by default up to n = 4096).
    #[arg(long)]
    pub burn_all: bool,
    /// Timed samples per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Calls back to back per sample.
    #[arg(long, default_value_t = 1)]
    pub calls: usize,
    /// Write the rows as JSON.
    #[arg(long, value_name = "PATH")]
    pub json: Option<String>,
    /// Keep the cases whose label contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// The long-sequence memory case instead of the timings (GPU backends).
    #[arg(long)]
    pub memory: bool,
    /// Length of the memory case.
    #[arg(long)]
    pub memory_seq: Option<usize>,
    /// The memory case under masks: 30% of the keys padded and, with `--backward`,
    /// attention dropout 0.1 (the block-sparse kernels).
    #[arg(long)]
    pub memory_masks: bool,
    /// Time training steps (backward) instead of forwards.
    #[arg(long)]
    pub backward: bool,
    /// Tokens of the full and causal cases (batch = tokens / n).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Let f32 run on the matrix units with tf32 products.
    #[arg(long)]
    pub tf32: bool,
    /// The peer script's JSON: prints our time over each matching peer's.
    #[arg(long, value_name = "PATH")]
    pub peers: Option<std::path::PathBuf>,
    /// Forced kernel plan (tuning runs).
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// The peer records that do the same work as a row: SDPA's kernels for full and causal
/// (`-bwd` records for the backward), FlexAttention's window records for windows.
fn matching_peers<'a>(
    row: &serde_json::Value,
    peers: &'a [PeerRecord],
    backward: bool,
) -> Vec<&'a PeerRecord> {
    let get = |key: &str| row[key].as_u64().map(|v| v as usize);
    let window = get("window");
    let causal = row["causal"].as_bool();
    peers
        .iter()
        .filter(|p| {
            let same_shape = Some(p.b) == get("b")
                && Some(p.h) == get("h")
                && Some(p.n) == get("n")
                && Some(p.d) == get("d")
                && Some(dtype_name(&p.dtype)) == row["dtype"].as_str();
            let same_mask = match window {
                Some(w) => {
                    p.window == Some(w)
                        && p.kind.contains(if causal == Some(true) {
                            "causal"
                        } else {
                            "sym"
                        })
                }
                None => p.window.is_none() && p.causal == causal && p.kind.starts_with("sdpa"),
            };
            same_shape && same_mask && p.kind.ends_with("-bwd") == backward
        })
        .collect()
}

/// Prints our time over each matching peer's.
fn print_peer_ratios(rows: &[serde_json::Value], peers: &[PeerRecord], backward: bool) {
    for row in rows {
        let Some(ours) = row["ours_ms"].as_f64() else {
            continue;
        };
        for peer in matching_peers(row, peers, backward) {
            println!(
                "{:<44} ours {ours:>9.3} ms | {} {:>9.3} ms | ours / peer {:.2}",
                row["case"].as_str().unwrap_or(""),
                peer.kind,
                peer.ms,
                ours / peer.ms
            );
        }
    }
}

/// Runs `kernel` with `args`.
pub fn kernel(args: KernelArgs) -> Result<(), String> {
    if args.calls == 0 || args.repeats == 0 {
        return Err("--calls and --repeats take at least 1".into());
    }
    let peers = args.peers.as_deref().map(load_peers).transpose()?;
    let backend = match args.backend {
        KernelBackend::Cpu => crate::cli::BackendKind::Cpu,
        KernelBackend::Wgpu => crate::cli::BackendKind::Wgpu,
        KernelBackend::Cuda => crate::cli::BackendKind::Cuda,
    };
    let device = crate::device::device_for(backend, args.dtype)?;
    let rows = match (args.memory, args.backward) {
        (true, _) if args.backend == KernelBackend::Cpu => {
            return Err("--memory reads a GPU device pool".into())
        }
        (true, true) => memory_case(&device.autodiff(), &args),
        (true, false) => memory_case(&device, &args),
        (false, true) => run_backward(&device.autodiff(), &args),
        (false, false) => run(&device, &args),
    };
    if let Some(peers) = &peers {
        print_peer_ratios(&rows, peers, args.backward);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap())
            .map_err(|e| format!("writing {path}: {e}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
