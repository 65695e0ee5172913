//! Calibration on the CPU writes a profile that the hybrid loads and obeys; thresholds and
//! slopes from synthetic timings with known answers.

use burn::config::Config;
use burn_attn::nn::complexity::{ComplexityModel, Method};
use burn_attn::nn::hybrid::{HybridMeasurement, HybridProfile};
use burn_attn::{HybridAttentionConfig, HybridChoice};
use burn_attn_bench::calibrate::{calibrate, crossover, save_profile, thresholds};
use burn_attn_bench::growth::{growth, loglog_slope};
use burn_attn_bench::{progress_bar, run, Cli, Command, MemoryMeter, Row};
use clap::Parser;

/// The CPU device (ndarray, which Burn 0.22 deprecates; our default CPU backend).
#[allow(deprecated)]
fn cpu() -> burn::tensor::Device {
    burn::tensor::Device::ndarray()
}

#[test]
fn slopes_recover_known_exponents() {
    for k in [0.5, 1.0, 2.0, 3.0] {
        let pts: Vec<(f64, f64)> = [64.0, 128.0, 256.0, 1024.0]
            .iter()
            .map(|&n: &f64| (n, 0.37 * n.powf(k)))
            .collect();
        assert!((loglog_slope(&pts).unwrap() - k).abs() < 1e-9, "k = {k}");
    }
    // Noise of a few percent barely moves a fit over a wide range.
    let noisy = [(128.0, 1.03), (256.0, 3.9), (512.0, 16.4), (1024.0, 63.0)];
    assert!((loglog_slope(&noisy).unwrap() - 2.0).abs() < 0.05);
    assert_eq!(loglog_slope(&[(128.0, 1.0)]), None);
    assert_eq!(loglog_slope(&[(128.0, 1.0), (128.0, 2.0)]), None);

    // Through `growth`, on rows with synthetic quadratic and linear timings and memory.
    let model = ComplexityModel::new(32, 4);
    let rows: Vec<Row> = [Method::Exact, Method::Linear]
        .into_iter()
        .flat_map(|m| {
            [128usize, 256, 512, 1024].map(|n| {
                let k = if m == Method::Exact { 2 } else { 1 };
                Row {
                    method: m,
                    seq_len: n,
                    batch: 1,
                    median_ms: 1e-4 * (n as f64).powi(k),
                    min_ms: 0.0,
                    core_ms: None,
                    train_ms: None,
                    peak_bytes: Some(8 * (n as u64).pow(k as u32)),
                    max_error: 0.0,
                    mean_error: 0.0,
                    structured_max_error: None,
                    structured_mean_error: None,
                    peers: Vec::new(),
                    expect_exact: true,
                    model: model.cost(m, n),
                }
            })
        })
        .collect();
    let g = growth(&rows);
    assert_eq!(g.len(), 2);
    assert!((g[0].time_slope.unwrap() - 2.0).abs() < 1e-9);
    assert!((g[0].memory_slope.unwrap() - 2.0).abs() < 1e-9);
    assert!((g[1].time_slope.unwrap() - 1.0).abs() < 1e-9);
    assert_eq!((g[0].time_exponent, g[1].time_exponent), (2.0, 1.0));
    assert!((g[0].model_time_slope.unwrap() - 2.0).abs() < 1e-9);
}

fn m(method: &str, seq_len: usize, median_ms: f64) -> HybridMeasurement {
    HybridMeasurement {
        method: method.into(),
        seq_len,
        median_ms,
    }
}

#[test]
fn thresholds_from_synthetic_timings() {
    // flash ~ n^2, sparse ~ n (crosses flash between 512 and 1024), window ~ n but slower
    // than sparse until it crosses it between 2048 and 4096.
    let lengths = [256usize, 512, 1024, 2048, 4096];
    let mut measured = Vec::new();
    for &n in &lengths {
        let x = n as f64 / 1024.0;
        measured.push(m("flash", n, x * x));
        measured.push(m("sparse-local", n, 0.8 * x));
        measured.push(m(
            "sliding-window",
            n,
            if n >= 4096 { 0.7 * x } else { 1.2 * x },
        ));
    }
    let (flash_max, sparse_max, crossovers) = thresholds(&measured, Method::SparseLocal);
    assert!((512..1024).contains(&flash_max), "{flash_max}");
    assert!((2048..4096).contains(&sparse_max), "{sparse_max}");
    assert_eq!(crossovers.len(), 2);
    // Exactly interpolated: ratio 0.8/x crosses 1 at x = 0.8, n = 819.2.
    assert_eq!(
        crossover(&[(512, 0.4), (1024, 0.8)], &[(512, 0.25), (1024, 1.0)]),
        Some(820)
    );
    // Never faster: flash everywhere.
    let slow: Vec<HybridMeasurement> = lengths
        .iter()
        .flat_map(|&n| {
            [
                m("flash", n, 1.0),
                m("sparse-local", n, 2.0),
                m("sliding-window", n, 3.0),
            ]
        })
        .collect();
    assert_eq!(thresholds(&slow, Method::SparseLocal).0, usize::MAX);
    // Faster only at the shortest length does not count.
    assert_eq!(
        crossover(&[(1, 0.5), (2, 2.0)], &[(1, 1.0), (2, 1.0)]),
        None
    );
}

#[test]
fn calibration_writes_a_profile_the_hybrid_obeys() {
    let dir = std::env::temp_dir().join(format!("burn-attn-bench-cal-{}", std::process::id()));
    let path = dir.join("profile.json");
    let argv = [
        "burn-attn-bench",
        "calibrate",
        "--no-progress",
        "--lengths",
        "16,32,64",
        "--d-model",
        "32",
        "--heads",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--window",
        "8",
        "--sparse-window",
        "8",
        "--profile",
        path.to_str().unwrap(),
    ];
    let args = match Cli::parse_from(argv).command {
        Command::Calibrate(a) => a,
        other => panic!("expected calibrate, got {other:?}"),
    };
    let bar = progress_bar(0, true);
    let profile = calibrate(&cpu(), &args, &MemoryMeter::allocator(), &bar).unwrap();
    assert_eq!(profile.measured.len(), 9);
    assert!(profile.flash_max_len <= profile.sparse_max_len);
    save_profile(&profile, &path).unwrap();
    let loaded = HybridProfile::load(&path).unwrap();
    // Times may lose an ulp through JSON; everything else comes back as it was.
    assert_eq!(
        (
            loaded.flash_max_len,
            loaded.sparse_max_len,
            &loaded.crossovers,
            &loaded.device
        ),
        (
            profile.flash_max_len,
            profile.sparse_max_len,
            &profile.crossovers,
            &profile.device
        )
    );
    for (a, b) in loaded.measured.iter().zip(&profile.measured) {
        assert!((a.median_ms - b.median_ms).abs() <= 1e-12 * b.median_ms.max(1.0));
    }

    // The hybrid built from the file obeys it.
    let config = HybridAttentionConfig::new(32, 4)
        .with_profile_file(&path)
        .unwrap();
    let module = config.init(&cpu());
    for n in [1usize, 16, 17, 32, 33, 64, 65, 10_000] {
        let want = if n <= loaded.flash_max_len {
            HybridChoice::Flash
        } else if n <= loaded.sparse_max_len {
            HybridChoice::Sparse
        } else {
            HybridChoice::SlidingWindow
        };
        assert_eq!(module.choose(n), want, "n = {n}, profile {loaded:?}");
    }

    // And `compare --hybrid-profile` runs the hybrid from it, with the model in step.
    let argv = [
        "burn-attn-bench",
        "compare",
        "--no-progress",
        "--no-structured",
        "--lengths",
        "16,64",
        "--d-model",
        "32",
        "--heads",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--methods",
        "hybrid",
        "--hybrid-profile",
        path.to_str().unwrap(),
    ];
    let mut compare = match Cli::parse_from(argv).command {
        Command::Compare(a) => a,
        other => panic!("expected compare, got {other:?}"),
    };
    compare.resolve().unwrap();
    assert_eq!(compare.hybrid_flash_max, loaded.flash_max_len);
    let rows = run(&cpu(), &compare, &MemoryMeter::allocator(), &bar);
    for row in rows {
        let want = match module.choose(row.seq_len) {
            HybridChoice::Flash => Method::Flash,
            HybridChoice::Sparse => Method::SparseLocal,
            HybridChoice::SlidingWindow => Method::SlidingWindow,
        };
        assert_eq!(row.model.selected, want);
        if want == Method::Flash {
            assert!(row.max_error < 1e-4);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
