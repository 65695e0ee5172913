//! Forward-attention benchmark: our exact/window core against Burn's own
//! `module::attention` (its fused kernel) and `attention_fallback` (materialised) on the
//! same backend, same shapes, same run.
//!
//! ```sh
//! cargo bench --bench attention_forward --features cuda -- --backend cuda --dtype bf16
//! cargo bench --bench attention_forward --features cuda -- --backend cuda --memory
//! cargo bench --bench attention_forward -- --backend cpu --quick      # CPU sanity run
//! cargo bench --bench attention_forward --features cuda -- --backend cuda --backward
//! ```
//! Prints one line per case and, with `--json PATH`, writes the results. TFLOP/s use
//! FlashAttention's count: `4*b*h*n*n*d`, half of it causal, the visible band for windows.
//! `--only TEXT` keeps the cases whose label contains TEXT; `--memory` runs the long
//! sequence memory case instead (GPU backends: device pool bytes after one forward);
//! `--skip-burn` drops Burn's kernels, which otherwise run up to n = 4096 (`--burn-all`:
//! at every length). `--backward` times training steps instead: forward plus backward
//! through `Autodiff<B>` (gradients of `sum(out * w)` for Q, K and V), reporting the
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
//! `--backend cuda-unfused` runs Burn's CUDA backend without its fusion stream
//! (`CubeBackend` itself), so that single-call times can be compared with and without it.

use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::{attention as burn_attention, attention_fallback};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use burn_attn::{attention, AttentionBackend, AttentionOptions, Window};

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
    fn options(&self) -> AttentionOptions {
        let window = self.window.map_or(Window::FULL, Window::symmetric);
        AttentionOptions::new()
            .with_causal(self.causal)
            .with_window(window)
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
fn median_ms<B: Backend>(
    device: &B::Device,
    repeats: usize,
    calls: usize,
    mut f: impl FnMut(),
) -> f64 {
    let warm = Instant::now();
    let mut runs = 0;
    while runs < 3 || warm.elapsed().as_secs_f64() < 0.2 {
        f();
        B::sync(device).unwrap();
        runs += 1;
    }
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            B::sync(device).unwrap();
            start.elapsed().as_secs_f64() * 1e3 / calls as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Whether Burn's materialised attention runs for the case: full or causal only, and its
/// scores need b*h*n*n floats, so only up to n = 4096.
fn runs_materialised(case: &Case, args: &Args) -> bool {
    case.window.is_none() && !args.skip_burn && case.seq <= 4096 && burn_fits(case, args)
}

/// Whether Burn's fused attention is wanted for the case, buffer limits aside: it has no
/// window option (full and causal only), and it autotunes per shape and runs at ~5
/// TFLOP/s past n = 4096 (its peer numbers stop there too), so only up to there unless
/// `--burn-all`.
fn wants_burn_fused(case: &Case, args: &Args) -> bool {
    case.window.is_none() && !args.skip_burn && (case.seq <= 4096 || args.burn_all)
}

/// WGPU's largest buffer (wgpu's default `max_buffer_size` is 256 MiB; adapters raise it
/// to about 2 GiB, and an allocation past it aborts the process).
const WGPU_MAX_BUFFER: usize = 1 << 31;

/// Whether Burn's kernels, which hold the `b*h*n*n` scores in f32, can run the case on the
/// backend (the limit is WGPU's buffer size).
fn burn_fits(case: &Case, args: &Args) -> bool {
    args.backend != "wgpu" || score_bytes(case) < WGPU_MAX_BUFFER
}

fn score_bytes(case: &Case) -> usize {
    case.batch * case.heads * case.seq * case.seq * 4
}

/// Says so when Burn's kernels are left out of a case for WGPU's buffer limit (only for
/// cases they would otherwise run).
fn note_burn_skipped(case: &Case, args: &Args) {
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
fn selected_cases(args: &Args) -> Vec<Case> {
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
fn burn_materialised<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    case: &Case,
) -> Tensor<B, 4> {
    attention_fallback(
        q.clone(),
        k.clone(),
        v.clone(),
        None,
        None,
        case.burn_options(),
    )
}

fn run<B: AttentionBackend>(device: &B::Device, args: &Args) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let cases = selected_cases(args);
    for case in cases {
        note_burn_skipped(&case, args);
        let q_shape = [case.batch, case.heads, case.seq, case.head_dim];
        let rand = || Tensor::<B, 4>::random(q_shape, Distribution::Normal(0.0, 1.0), device);
        let (q, k, v) = (rand(), rand(), rand());
        let opts = case.options();
        let ours = median_ms::<B>(device, args.repeats, args.calls, || {
            let _ = attention(q.clone(), k.clone(), v.clone(), &opts);
        });
        let materialised = runs_materialised(&case, args).then(|| {
            median_ms::<B>(device, args.repeats, args.calls, || {
                let _ = burn_materialised(&q, &k, &v, &case);
            })
        });
        let burn_fused = wants_burn_fused(&case, args) && burn_fits(&case, args);
        let burn = burn_fused.then(|| {
            median_ms::<B>(device, args.repeats, args.calls, || {
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
            "dtype": args.dtype, "backend": args.backend,
            "ours_ms": ours, "ours_tflops": tflops(ours),
            "burn_ms": burn, "burn_tflops": burn.map(tflops),
            "materialised_ms": materialised, "materialised_tflops": materialised.map(tflops),
        }));
    }
    rows
}

/// Training-step timings (`--backward`): the forward alone, then forward plus backward
/// through `Autodiff<B>`; the backward is their difference.
fn run_backward<B: AutodiffBackend + AttentionBackend>(
    device: &B::Device,
    args: &Args,
) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let cases = selected_cases(args);
    for case in cases {
        note_burn_skipped(&case, args);
        let q_shape = [case.batch, case.heads, case.seq, case.head_dim];
        let rand = || Tensor::<B, 4>::random(q_shape, Distribution::Normal(0.0, 1.0), device);
        let (q, k, v, w) = (rand(), rand(), rand(), rand());
        let opts = case.options();
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
        let forward = median_ms::<B>(device, args.repeats, args.calls, || {
            let _ = attention(q.clone(), k.clone(), v.clone(), &opts);
        });
        let ours = median_ms::<B>(device, args.repeats, args.calls, || step(false)) - forward;
        let materialised = runs_materialised(&case, args).then(|| {
            let fwd = median_ms::<B>(device, args.repeats, args.calls, || {
                let _ = burn_materialised(&q, &k, &v, &case);
            });
            median_ms::<B>(device, args.repeats, args.calls, || step(true)) - fwd
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
            "dtype": args.dtype, "backend": args.backend, "forward_ms": forward,
            "ours_ms": ours, "ours_tflops": tflops(ours),
            "materialised_ms": materialised, "materialised_tflops": materialised.map(tflops),
        }));
    }
    rows
}

struct Args {
    backend: String,
    dtype: String,
    quick: bool,
    skip_burn: bool,
    burn_all: bool,
    repeats: usize,
    calls: usize,
    json: Option<String>,
    only: Option<String>,
    memory: bool,
    memory_seq: Option<usize>,
    backward: bool,
    tokens: Option<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        backend: "cpu".into(),
        dtype: "f32".into(),
        quick: false,
        skip_burn: false,
        burn_all: false,
        repeats: 20,
        calls: 1,
        json: None,
        only: None,
        memory: false,
        memory_seq: None,
        backward: false,
        tokens: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => args.backend = it.next().expect("--backend cpu|wgpu|cuda|cuda-unfused"),
            "--dtype" => args.dtype = it.next().expect("--dtype f32|f16|bf16"),
            "--quick" => args.quick = true,
            "--skip-burn" => args.skip_burn = true,
            "--burn-all" => args.burn_all = true,
            "--repeats" => {
                args.repeats = it.next().and_then(|r| r.parse().ok()).expect("--repeats N")
            }
            "--calls" => {
                args.calls = it
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|&k| k > 0)
                    .expect("--calls K (K >= 1)")
            }
            "--json" => args.json = it.next(),
            "--only" => args.only = it.next(),
            "--memory" => args.memory = true,
            "--memory-seq" => {
                args.memory_seq = Some(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--memory-seq N"),
                )
            }
            "--backward" => args.backward = true,
            "--tokens" => {
                args.tokens = Some(it.next().and_then(|n| n.parse().ok()).expect("--tokens N"))
            }
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other:?}; see the file's header for usage"),
        }
    }
    args
}

/// The device pool of a CubeCL runtime: frees unused pages, then reports bytes reserved.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
struct Pool<R: burn::cubecl::Runtime>(burn::cubecl::client::ComputeClient<R>);

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<R: burn::cubecl::Runtime> Pool<R> {
    fn cleanup(&self) {
        self.0.memory_cleanup();
    }
    fn reserved(&self) -> u64 {
        self.0.memory_usage().map_or(0, |u| u.bytes_reserved)
    }
    /// Bytes of live allocations (no padding, no free pages).
    fn in_use(&self) -> u64 {
        self.0.memory_usage().map_or(0, |u| u.bytes_in_use)
    }
}

/// The memory targets' cases: b = 1, h = 16, d = 128; one forward at n = 65536, or with
/// `--backward` one training step (forward and backward of `sum(out * w)`) at n = 32768.
///
/// The inputs are constant-filled (memory does not depend on the values; random
/// generation leaves pages of f32 intermediates in the pool). After a pool cleanup with
/// only the inputs alive, the call runs and the pool's reserved bytes are read with its
/// outputs (and gradients) alive: the pool returns no pages during the call, so that
/// reading bounds the peak from above (up to page rounding). The live bytes (`in use`)
/// before and after are printed too.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn memory_case<B: AutodiffBackend + AttentionBackend, R: burn::cubecl::Runtime>(
    device: &B::Device,
    pool: &Pool<R>,
    args: &Args,
) -> Vec<serde_json::Value> {
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
        let fill = |x: f32| Tensor::<B, 4>::full([b, h, n, d], x, device);
        let (q, k, v) = (fill(0.02), fill(0.01), fill(0.5));
        let w = args.backward.then(|| fill(1.0));
        let elem = q.dtype().size() as u64;
        B::sync(device).unwrap();
        pool.cleanup();
        let before = pool.reserved();
        let in_use_before = pool.in_use();
        let opts = AttentionOptions::new().with_causal(causal);
        let start = Instant::now();
        // Keep what the call returns alive while the pool is read.
        let kept = match &w {
            None => {
                let (o, lse) = attention_with_lse(q.clone(), k.clone(), v.clone(), &opts);
                (Some((o, lse)), None)
            }
            Some(w) => {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = attention(q.clone(), k.clone(), v.clone(), &opts);
                let grads = (out * w.clone()).sum().backward();
                (None, Some((q.grad(&grads), k.grad(&grads), v.grad(&grads))))
            }
        };
        B::sync(device).unwrap();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let after = pool.reserved();
        let in_use_after = pool.in_use();
        // Forward: Q, K, V, O and the f32 lse. Training: Q, K, V, O, their four gradients
        // (dO = w) and the lse.
        let tensors_n = if args.backward { 8 } else { 4 };
        let tensors = (tensors_n * b * h * n * d) as u64 * elem + (b * h * n * 4) as u64;
        let ratio = after as f64 / tensors as f64;
        let what = if args.backward {
            "training step"
        } else {
            "forward"
        };
        println!(
            "memory {what} b={b} h={h} n={n} d={d} causal={causal} {}: pool {:.1} MiB before, \
             {:.1} MiB after ({ms:.1} ms, first call); in use {:.1} MiB before, {:.1} MiB \
             after; tensors {:.1} MiB; reserved ratio {ratio:.3}, in-use ratio {:.3}",
            args.dtype,
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
            "causal": causal, "dtype": args.dtype, "backend": args.backend,
            "reserved_before": before, "reserved_after": after, "tensor_bytes": tensors,
            "ratio": ratio, "in_use_before": in_use_before, "in_use_after": in_use_after,
        }));
    }
    rows
}

#[allow(unused_macros)] // used only with the gpu features
macro_rules! dispatch_dtype {
    ($backend:ident, $runtime:ty, $args:expr, $device:expr) => {{
        use burn::backend::Autodiff;
        let device = $device;
        let pool = Pool::<$runtime>(<$runtime as burn::cubecl::Runtime>::client(&device));
        macro_rules! with_float {
            ($f:ty) => {
                match ($args.memory, $args.backward) {
                    (true, _) => {
                        memory_case::<Autodiff<$backend<$f>>, $runtime>(&device, &pool, &$args)
                    }
                    (false, true) => run_backward::<Autodiff<$backend<$f>>>(&device, &$args),
                    (false, false) => run::<$backend<$f>>(&device, &$args),
                }
            };
        }
        match $args.dtype.as_str() {
            "f32" => with_float!(f32),
            "f16" => with_float!(burn::tensor::f16),
            "bf16" => with_float!(burn::tensor::bf16),
            other => panic!("unknown dtype {other}"),
        }
    }};
}

fn main() {
    let args = parse_args();
    let rows = match args.backend.as_str() {
        "cpu" => {
            type Cpu<F> = burn::backend::NdArray<F>;
            assert_eq!(args.dtype, "f32", "the CPU backend runs f32");
            assert!(!args.memory, "--memory reads a GPU device pool");
            if args.backward {
                run_backward::<burn::backend::Autodiff<Cpu<f32>>>(&Default::default(), &args)
            } else {
                run::<Cpu<f32>>(&Default::default(), &args)
            }
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use burn::backend::Cuda;
            type Runtime = burn::cubecl::cuda::CudaRuntime;
            dispatch_dtype!(
                Cuda,
                Runtime,
                args,
                burn::backend::cuda::CudaDevice::default()
            )
        }
        #[cfg(feature = "cuda")]
        "cuda-unfused" => {
            // Burn's CUDA backend without its fusion stream (what `Cuda` is with Burn's
            // `fusion` feature off): beside `cuda` at `--calls 1`, it tells how much of a
            // single call's time beyond its kernel the fusion stream takes.
            type Runtime = burn::cubecl::cuda::CudaRuntime;
            type CudaUnfused<F> = burn_attn::cores::kernels::CubeBackend<Runtime, F, i32, u8>;
            dispatch_dtype!(
                CudaUnfused,
                Runtime,
                args,
                burn::backend::cuda::CudaDevice::default()
            )
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use burn::backend::Wgpu;
            type Runtime = burn::cubecl::wgpu::WgpuRuntime;
            dispatch_dtype!(
                Wgpu,
                Runtime,
                args,
                burn::backend::wgpu::WgpuDevice::default()
            )
        }
        other => panic!(
            "backend {other} is not compiled in (features: cuda, wgpu; cuda-unfused with cuda)"
        ),
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        println!("wrote {path}");
    }
}
