//! Forward-attention benchmark: our exact/window core against Burn's own
//! `module::attention` on the same backend, same shapes, same run.
//!
//! ```sh
//! cargo bench --bench attention_forward --features cuda -- --backend cuda --dtype bf16
//! cargo bench --bench attention_forward -- --backend cpu --quick      # CPU sanity run
//! ```
//! Prints one line per case and, with `--json PATH`, writes the results. TFLOP/s use
//! FlashAttention's count: `4*b*h*n*n*d`, half of it causal, the visible band for windows.

use std::time::Instant;

use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Distribution, Tensor};
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

fn suite(quick: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    let (lengths, heads): (&[usize], usize) = if quick {
        (&[256, 512], 4)
    } else {
        (&[1024, 4096, 16384], 16)
    };
    let tokens = if quick { 1024 } else { 32768 };
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

fn median_ms<B: Backend>(device: &B::Device, repeats: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    B::sync(device).unwrap();
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            B::sync(device).unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn run<B: AttentionBackend>(device: &B::Device, args: &Args) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for case in suite(args.quick) {
        let q_shape = [case.batch, case.heads, case.seq, case.head_dim];
        let rand = || Tensor::<B, 4>::random(q_shape, Distribution::Normal(0.0, 1.0), device);
        let (q, k, v) = (rand(), rand(), rand());
        let opts = case.options();
        let ours = median_ms::<B>(device, args.repeats, || {
            let _ = attention(q.clone(), k.clone(), v.clone(), &opts);
        });
        // Burn's fused attention has no window option: only full and causal compare.
        let burn = (case.window.is_none() && !args.skip_burn).then(|| {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: case.causal,
            };
            median_ms::<B>(device, args.repeats, || {
                let _ = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
            })
        });
        let tflops = |ms: f64| case.flops() / ms / 1e9;
        let mut line = format!(
            "{:<44} ours {:>9.3} ms {:>7.1} TFLOP/s",
            case.label(),
            ours,
            tflops(ours)
        );
        if let Some(b) = burn {
            line += &format!(
                " | burn {:>9.3} ms {:>7.1} TFLOP/s | x{:.2}",
                b,
                tflops(b),
                b / ours
            );
        }
        println!("{line}");
        rows.push(serde_json::json!({
            "case": case.label(), "b": case.batch, "h": case.heads, "n": case.seq,
            "d": case.head_dim, "causal": case.causal, "window": case.window,
            "dtype": args.dtype, "backend": args.backend,
            "ours_ms": ours, "ours_tflops": tflops(ours),
            "burn_ms": burn, "burn_tflops": burn.map(tflops),
        }));
    }
    rows
}

struct Args {
    backend: String,
    dtype: String,
    quick: bool,
    skip_burn: bool,
    repeats: usize,
    json: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        backend: "cpu".into(),
        dtype: "f32".into(),
        quick: false,
        skip_burn: false,
        repeats: 20,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => args.backend = it.next().expect("--backend cpu|wgpu|cuda"),
            "--dtype" => args.dtype = it.next().expect("--dtype f32|f16|bf16"),
            "--quick" => args.quick = true,
            "--skip-burn" => args.skip_burn = true,
            "--repeats" => {
                args.repeats = it.next().and_then(|r| r.parse().ok()).expect("--repeats N")
            }
            "--json" => args.json = it.next(),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other:?}; see the file's header for usage"),
        }
    }
    args
}

#[allow(unused_macros)] // used only with the gpu features
macro_rules! dispatch_dtype {
    ($backend:ident, $args:expr, $device:expr) => {
        match $args.dtype.as_str() {
            "f32" => run::<$backend<f32>>(&$device, &$args),
            "f16" => run::<$backend<burn::tensor::f16>>(&$device, &$args),
            "bf16" => run::<$backend<burn::tensor::bf16>>(&$device, &$args),
            other => panic!("unknown dtype {other}"),
        }
    };
}

fn main() {
    let args = parse_args();
    let rows = match args.backend.as_str() {
        "cpu" => {
            type Cpu<F> = burn::backend::NdArray<F>;
            assert_eq!(args.dtype, "f32", "the CPU backend runs f32");
            run::<Cpu<f32>>(&Default::default(), &args)
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use burn::backend::Cuda;
            dispatch_dtype!(Cuda, args, Default::default())
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use burn::backend::Wgpu;
            dispatch_dtype!(Wgpu, args, Default::default())
        }
        other => panic!("backend {other} is not compiled in (features: cuda, wgpu)"),
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        println!("wrote {path}");
    }
}
