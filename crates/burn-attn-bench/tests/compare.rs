//! The compare path end to end at tiny sizes: every row is produced, exact methods match
//! exact attention, every error is finite, and the allocator counts.

use burn_attn::nn::complexity::Method;
use burn_attn_bench::alloc::CountingAllocator;
use burn_attn_bench::output::{build_report, format_report, write_outputs};
use burn_attn_bench::{format_table, progress_bar, run, Cli, Command, CompareArgs, MemoryMeter};
use clap::Parser;

/// The CPU device (ndarray, which Burn 0.22 deprecates; our default CPU backend).
#[allow(deprecated)]
fn cpu() -> burn::tensor::Device {
    burn::tensor::Device::ndarray()
}

// The same counter as the binary, so the peak column is exercised too.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// The allocator's counters are process-wide: tests that measure take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tiny options through the real command-line parser, so defaults and names are tested;
/// `extra` pairs replace the tiny defaults of the same flag (an empty value: a switch).
fn tiny_args(extra: &[(&str, &str)]) -> CompareArgs {
    let mut flags = vec![
        ("--lengths", "16,32"),
        ("--d-model", "32"),
        ("--heads", "4"),
        ("--repeats", "1"),
        ("--warmup", "0"),
        ("--window", "8"),
        ("--sparse-window", "8"),
        ("--stride", "4"),
        ("--local", "2"),
        ("--block", "8"),
        ("--density", "0.3"),
        ("--chunk", "8"),
        ("--min-window", "4"),
        ("--max-window", "8"),
        ("--ratio", "0.25"),
    ];
    for &(flag, value) in extra {
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some(slot) => slot.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut argv = vec!["burn-attn-bench", "compare", "--no-progress"];
    for (flag, value) in flags {
        argv.push(flag);
        // An empty value marks a switch.
        if !value.is_empty() {
            argv.push(value);
        }
    }
    match Cli::parse_from(argv).command {
        Command::Compare(args) => args,
        other => panic!("expected compare, got {other:?}"),
    }
}

#[test]
fn compare_produces_every_row() {
    let _serial = serial();
    let args = tiny_args(&[]);
    args.validate().unwrap();
    let bar = progress_bar(0, true);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);

    assert_eq!(rows.len(), Method::ALL.len() * 2);
    for &n in &[16, 32] {
        for method in Method::ALL {
            let row = rows
                .iter()
                .find(|r| r.method == method && r.seq_len == n)
                .unwrap_or_else(|| panic!("missing row {method} n={n}"));
            assert!(
                row.max_error.is_finite(),
                "{method} n={n}: {}",
                row.max_error
            );
            assert!(row.median_ms.is_finite() && row.median_ms >= 0.0);
            assert!(
                row.model.compute > 0,
                "{method} n={n}: no predicted compute"
            );
            assert!(row.peak_bytes.is_some(), "allocator not counting");
            if method.is_exact() || (method == Method::Hybrid && row.model.selected.is_exact()) {
                assert!(row.expect_exact);
                assert!(
                    row.max_error < 1e-4,
                    "{method} n={n}: error {} against exact",
                    row.max_error
                );
            }
        }
    }
    // The materialised baseline allocates its n x n scores: more than flash at n = 32.
    let peak = |m: Method| {
        rows.iter()
            .find(|r| r.method == m && r.seq_len == 32)
            .and_then(|r| r.peak_bytes)
            .unwrap()
    };
    assert!(peak(Method::Exact) > 0);

    let table = format_table(&rows);
    assert!(table.contains("peak MiB") && table.contains("struct max"));
    for row in &rows {
        let (max, mean) = (
            row.structured_max_error.unwrap(),
            row.structured_mean_error.unwrap(),
        );
        assert!(max.is_finite() && mean <= max && row.mean_error <= row.max_error);
        if row.expect_exact {
            assert!(
                max < 1e-4,
                "{} n={}: structured error {max}",
                row.method,
                row.seq_len
            );
        }
    }
    // Structured inputs expose what a local pattern misses: the planted long-range copies.
    let structured = |m: Method| {
        rows.iter()
            .find(|r| r.method == m && r.seq_len == 32)
            .and_then(|r| r.structured_max_error)
            .unwrap()
    };
    assert!(structured(Method::SlidingWindow) > 1e-2);
    assert_eq!(
        table.lines().filter(|l| l.starts_with("sparse-")).count(),
        6,
        "{table}"
    );
}

#[test]
fn windows_wider_than_the_sequence_are_exact() {
    let _serial = serial();
    // With every window covering the whole sequence, the windowed methods are exact too.
    let args = tiny_args(&[
        ("--lengths", "16"),
        ("--window", "64"),
        ("--sparse-window", "64"),
        ("--methods", "sparse-local,sliding-window"),
    ]);
    let bar = progress_bar(0, true);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert!(row.max_error < 1e-4, "{}: {}", row.method, row.max_error);
    }
}

#[test]
fn json_round_trips() {
    let _serial = serial();
    let args = tiny_args(&[("--lengths", "16"), ("--methods", "exact,linear")]);
    let bar = progress_bar(0, true);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);
    let report = burn_attn_bench::Report {
        backend: "ndarray".into(),
        memory: MemoryMeter::allocator().description,
        args,
        rows,
        growth: Vec::new(),
    };
    let json = serde_json::to_string(&report).unwrap();
    let back: burn_attn_bench::Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.rows.len(), 2);
    assert_eq!(back.rows[1].method, Method::Linear);
}

#[test]
fn hybrid_switches_regime_with_the_thresholds() {
    let _serial = serial();
    // Thresholds below the tiny lengths: flash at 16, sparse at 24, sliding window at 32.
    let args = tiny_args(&[
        ("--lengths", "16,24,32"),
        ("--hybrid-flash-max", "16"),
        ("--hybrid-sparse-max", "24"),
        ("--methods", "hybrid"),
    ]);
    let bar = progress_bar(0, true);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);
    let selected: Vec<Method> = rows.iter().map(|r| r.model.selected).collect();
    assert_eq!(
        selected,
        [Method::Flash, Method::SparseLocal, Method::SlidingWindow]
    );
    assert!(rows[0].max_error < 1e-4);
    // Windows of 8 at 24 and 32 tokens hide keys, so the hybrid is no longer exact.
    assert!(rows[1].max_error > 1e-4 && rows[2].max_error > 1e-4);
    assert!(format_table(&rows).contains("hybrid(sliding-window)"));
}

/// A fresh directory under the target dir's temp space for one test's files.
fn out_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-attn-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn end_to_end_writes_json_csv_and_both_plots() {
    let _serial = serial();
    let dir = out_dir("e2e");
    let peers = dir.join("peers.json");
    std::fs::create_dir_all(&dir).unwrap();
    // The peer script's format: one SDPA record matching the n = 16 shape (batch 64 / 16,
    // heads 4, head dim 8, f32), one of another length, one backward.
    std::fs::write(
        &peers,
        r#"[{"kind":"sdpa-flash","dtype":"torch.float32","b":4,"h":4,"n":16,"d":8,"causal":false,"ms":0.5,"tflops":1.0},
            {"kind":"sdpa-cudnn","dtype":"torch.float32","b":1,"h":4,"n":64,"d":8,"causal":false,"ms":0.5,"tflops":1.0},
            {"kind":"sdpa-flash-bwd","dtype":"torch.float32","b":4,"h":4,"n":16,"d":8,"causal":false,"ms":0.5,"tflops":1.0},
            {"kind":"flex-window-sym","dtype":"bf16","b":4,"h":4,"n":16,"d":8,"window":8,"ms":0.5,"tflops":1.0}]"#,
    )
    .unwrap();
    let dir_s = dir.to_str().unwrap().to_string();
    let peers_s = peers.to_str().unwrap().to_string();
    let mut args = tiny_args(&[
        ("--out-dir", &dir_s),
        ("--peers", &peers_s),
        ("--methods", "exact,flash,linear,sliding-window"),
        ("--tokens", "64"),
    ]);
    args.resolve().unwrap();
    args.validate().unwrap();
    let bar = progress_bar(0, true);
    let meter = MemoryMeter::allocator();
    let rows = run(&cpu(), &args, &meter, &bar);
    let report = build_report("ndarray".into(), meter.description.clone(), args, rows).unwrap();
    let text = format_report(&report);
    assert!(
        text.contains("growth (n^k)") && text.contains("vs peers"),
        "{text}"
    );
    let flash16 = report
        .rows
        .iter()
        .find(|r| r.method == Method::Flash && r.seq_len == 16)
        .unwrap();
    assert_eq!(flash16.batch, 4);
    assert_eq!(flash16.peers.len(), 1, "{:?}", flash16.peers);
    let core = flash16.core_ms.expect("flash has a core time");
    assert!((flash16.peers[0].ratio - core / 0.5).abs() < 1e-12);
    // The window peer is bf16 and we ran f32: no match; linear has no peer.
    assert!(report
        .rows
        .iter()
        .filter(|r| r.method != Method::Exact && r.method != Method::Flash)
        .all(|r| r.peers.is_empty()));

    let written = write_outputs(&report).unwrap();
    assert_eq!(written.len(), 4, "{written:?}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 8);
    assert_eq!(json["growth"].as_array().unwrap().len(), 4);
    assert!(json["rows"][0]["structured_max_error"].is_number());
    let csv = std::fs::read_to_string(dir.join("compare.csv")).unwrap();
    assert_eq!(csv.lines().count(), 9);
    let png = std::fs::read(dir.join("compare.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "PNG too small: {}", png.len());
    let svg = std::fs::read_to_string(dir.join("compare.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("sliding-window") && svg.contains("median time")
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hybrid_allocates_no_more_than_the_core_it_chose() {
    let _serial = serial();
    // Flash at 16, local sparse at 24, sliding window at 32: the hybrid's allocator peak
    // stays within the standalone module's of the same mechanism (same shapes, same seed).
    let args = tiny_args(&[
        ("--lengths", "16,24,32"),
        ("--hybrid-flash-max", "16"),
        ("--hybrid-sparse-max", "24"),
        ("--methods", "flash,sparse-local,sliding-window,hybrid"),
        ("--no-structured", ""),
    ]);
    let bar = progress_bar(0, true);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);
    for n in [16, 24, 32] {
        let at = |m: Method| {
            rows.iter()
                .find(|r| r.method == m && r.seq_len == n)
                .unwrap()
        };
        let hybrid = at(Method::Hybrid);
        let own = at(hybrid.model.selected);
        let (h, o) = (hybrid.peak_bytes.unwrap(), own.peak_bytes.unwrap());
        // A little slack for bookkeeping (pattern descriptions, thread-local buffers).
        assert!(
            h <= o + o / 10 + 4096,
            "n={n}: hybrid {h} B > {} {o} B",
            own.method
        );
    }
}

#[test]
fn time_limit_stops_rows_and_the_report_lists_them() {
    let _serial = serial();
    // A limit already spent before the first row: no row runs, and the report names every
    // selected (method, length) pair as missing.
    let args = tiny_args(&[("--methods", "flash,linear"), ("--time-limit", "1e-9")]);
    args.validate().unwrap();
    let bar = progress_bar(0, true);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);
    assert!(
        rows.is_empty(),
        "rows ran past the time limit: {}",
        rows.len()
    );
    let missing = burn_attn_bench::run::missing_rows(&args, &rows);
    assert_eq!(
        missing,
        vec![
            (Method::Flash, 16),
            (Method::Linear, 16),
            (Method::Flash, 32),
            (Method::Linear, 32)
        ]
    );
    let report = build_report("ndarray".into(), String::new(), args, rows).unwrap();
    let text = format_report(&report);
    assert!(
        text.contains("not in the table (failed, or past --time-limit): flash n=16, linear n=16, flash n=32, linear n=32"),
        "{text}"
    );

    // A generous limit runs every row.
    let args = tiny_args(&[("--methods", "flash"), ("--time-limit", "1e6")]);
    let rows = run(&cpu(), &args, &MemoryMeter::allocator(), &bar);
    assert_eq!(rows.len(), 2);
    assert!(burn_attn_bench::run::missing_rows(&args, &rows).is_empty());

    // Zero or negative limits are refused with the value named.
    for bad in ["0", "NaN"] {
        let err = tiny_args(&[("--time-limit", bad)]).validate().unwrap_err();
        assert!(err.contains("--time-limit") && err.contains(bad), "{err}");
    }
}

/// A `--peers` file that is missing or not the peer script's JSON is refused before any
/// row is measured, with the path named (a long GPU run must not end without its table).
#[test]
fn unreadable_peers_are_refused_before_measuring() {
    let dir = out_dir("bad-peers");
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("absent.json");
    let garbled = dir.join("garbled.json");
    std::fs::write(&garbled, "{ not the peer format").unwrap();
    for (path, what) in [(&missing, "reading peers"), (&garbled, "parsing peers")] {
        let p = path.to_str().unwrap().to_string();
        let err = tiny_args(&[("--peers", &p)]).validate().unwrap_err();
        assert!(err.contains(what) && err.contains(&p), "{err}");
    }
}

/// The binary exits with failure and names the rows when rows fail (an adaptive window of
/// minimum 0; hybrid thresholds the wrong way round), and succeeds on a valid tiny run.
#[test]
fn the_cli_exits_with_failure_when_rows_fail() {
    let run = |label: &str, extra: &[&str]| {
        let dir = out_dir(&format!("cli-{label}"));
        let dir = dir.to_str().unwrap();
        let mut argv = vec![
            "compare",
            "--no-progress",
            "--lengths",
            "16",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out-dir",
            dir,
        ];
        argv.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_burn-attn-bench"))
            .args(argv)
            .output()
            .unwrap()
    };
    let ok = run("flash", &["--methods", "flash"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for bad in [
        &["--methods", "adaptive-window", "--min-window", "0"][..],
        &[
            "--methods",
            "hybrid",
            "--hybrid-flash-max",
            "64",
            "--hybrid-sparse-max",
            "8",
        ],
    ] {
        let out = run(bad[1], bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{bad:?} exited with success: {stderr}"
        );
        let method = bad[1];
        assert!(
            stderr.contains(&format!("1 rows failed: {method} n=16")),
            "{stderr}"
        );
    }
}
