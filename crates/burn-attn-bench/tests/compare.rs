//! The compare path end to end at tiny sizes: every row is produced, exact methods match
//! exact attention, every error is finite, and the allocator counts.

use burn_attn::nn::complexity::Method;
use burn_attn_bench::alloc::CountingAllocator;
use burn_attn_bench::{format_table, progress_bar, run, Cli, Command, CompareArgs};
use clap::Parser;

// The same counter as the binary, so the peak column is exercised too.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Tiny options through the real command-line parser, so defaults and names are tested;
/// `extra` pairs replace the tiny defaults of the same flag.
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
        argv.push(value);
    }
    match Cli::parse_from(argv).command {
        Command::Compare(args) => args,
        other => panic!("expected compare, got {other:?}"),
    }
}

#[test]
fn compare_produces_every_row() {
    let args = tiny_args(&[]);
    args.validate().unwrap();
    let bar = progress_bar(0, true);
    let rows = run::<burn::backend::NdArray<f32>>(&Default::default(), &args, &bar);

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
    assert!(table.contains("allocator peak"));
    assert_eq!(
        table.lines().filter(|l| l.starts_with("sparse-")).count(),
        6,
        "{table}"
    );
}

#[test]
fn windows_wider_than_the_sequence_are_exact() {
    // With every window covering the whole sequence, the windowed methods are exact too.
    let args = tiny_args(&[
        ("--lengths", "16"),
        ("--window", "64"),
        ("--sparse-window", "64"),
        ("--methods", "sparse-local,sliding-window"),
    ]);
    let bar = progress_bar(0, true);
    let rows = run::<burn::backend::NdArray<f32>>(&Default::default(), &args, &bar);
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert!(row.max_error < 1e-4, "{}: {}", row.method, row.max_error);
    }
}

#[test]
fn json_round_trips() {
    let args = tiny_args(&[("--lengths", "16"), ("--methods", "exact,linear")]);
    let bar = progress_bar(0, true);
    let rows = run::<burn::backend::NdArray<f32>>(&Default::default(), &args, &bar);
    let report = burn_attn_bench::Report {
        backend: "ndarray".into(),
        args,
        rows,
    };
    let json = serde_json::to_string(&report).unwrap();
    let back: burn_attn_bench::Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.rows.len(), 2);
    assert_eq!(back.rows[1].method, Method::Linear);
}

#[test]
fn hybrid_switches_regime_with_the_thresholds() {
    // Thresholds below the tiny lengths: flash at 16, sparse at 24, sliding window at 32.
    let args = tiny_args(&[
        ("--lengths", "16,24,32"),
        ("--hybrid-flash-max", "16"),
        ("--hybrid-sparse-max", "24"),
        ("--methods", "hybrid"),
    ]);
    let bar = progress_bar(0, true);
    let rows = run::<burn::backend::NdArray<f32>>(&Default::default(), &args, &bar);
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
