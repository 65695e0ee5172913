//! The printed table: one line per method and length, measurement beside prediction.

use std::fmt::Write as _;

use burn_attn::nn::complexity::{ComplexityModel, Method};

use crate::run::Row;

const MIB: f64 = 1024.0 * 1024.0;

/// The method's label: the hybrid also names the regime it ran.
fn label(row: &Row) -> String {
    if row.method == Method::Hybrid {
        format!("hybrid({})", row.model.selected)
    } else {
        row.method.to_string()
    }
}

/// What the columns mean, printed under the table.
pub const LEGEND: &str = "\
peak MiB: see the header (host allocator on the CPU, device memory pool on GPUs).
model MiB: complexity model, attention intermediates plus Q/K/V/output activations in f32 \
(it counts one n x n matrix for exact; the materialised baseline holds a few).
median ms: the whole module (projections included); core ms: the attention core alone on \
pre-projected Q/K/V (the linear cores on feature-mapped Q and K), what the peers time; \
train ms: a training step of the whole module, forward and backward (--train).
GFLOP/s: the model's attention FLOPs (FlashAttention count) over the core time (the median \
when there is none).
err max/mean: |output - exact| on random normal inputs, against materialised exact \
attention with the same weights (causal exact for causal-linear); exact methods ~1e-7 \
(f32). Random inputs make attention nearly uniform, which flatters approximations.
struct max/mean: the same on structured inputs (local correlation plus planted long-range \
copies, query/key projections tied): what an approximation misses when attention is \
sharp and far-reaching.
vs peers: our core time over each peer's (--peers), same shape and dtype; > 1 = slower.";

/// Formats the comparison table.
///
/// Columns: method, sequence length, median ms, measured GFLOP/s (model FLOPs of the
/// attention core over the median time), measured peak MiB, the model's memory (attention
/// intermediates plus the Q/K/V/output activations, f32) in MiB, the model's attention
/// GFLOP, max and mean absolute error against exact attention on random inputs, the same on
/// structured inputs, and our time over each matching peer's.
pub fn format_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let has_peers = rows.iter().any(|r| !r.peers.is_empty());
    let mut header = vec![
        "method",
        "seq",
        "median ms",
        "core ms",
        "train ms",
        "GFLOP/s",
        "peak MiB",
        "model MiB",
        "model GFLOP",
        "err max",
        "err mean",
        "struct max",
        "struct mean",
    ];
    let mut widths = vec![22, 6, 10, 9, 9, 9, 10, 10, 11, 9, 9, 10, 11];
    if has_peers {
        header.push("vs peers (ours/peer)");
        widths.push(20);
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<w$}");
            } else if i == 13 {
                let _ = write!(s, "  {c}");
            } else {
                let _ = write!(s, "  {c:>w$}");
            }
        }
        s.push('\n');
        s
    };
    out.push_str(&line(header.iter().map(|h| h.to_string()).collect()));
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    out.push('\n');
    let e = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2e}"));
    let mut last_len = None;
    for row in rows {
        // A blank line between lengths keeps the long table readable.
        if last_len.is_some_and(|l| l != row.seq_len) {
            out.push('\n');
        }
        last_len = Some(row.seq_len);
        let model_bytes = (row.model.memory + row.model.activations) * 4;
        let gflops = row.model.compute as f64 / (row.core_ms.unwrap_or(row.median_ms) * 1e-3) / 1e9;
        let mut cells = vec![
            label(row),
            row.seq_len.to_string(),
            format!("{:.3}", row.median_ms),
            row.core_ms.map_or("-".into(), |t| format!("{t:.3}")),
            row.train_ms.map_or("-".into(), |t| format!("{t:.3}")),
            format!("{gflops:.2}"),
            row.peak_bytes
                .map_or("n/a".into(), |b| format!("{:.3}", b as f64 / MIB)),
            format!("{:.3}", model_bytes as f64 / MIB),
            format!("{:.4}", row.model.compute as f64 / 1e9),
            e(Some(row.max_error)),
            e(Some(row.mean_error)),
            e(row.structured_max_error),
            e(row.structured_mean_error),
        ];
        if has_peers {
            cells.push(
                row.peers
                    .iter()
                    .map(|p| format!("{} {:.2}x", p.kind.trim_start_matches("sdpa-"), p.ratio))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        out.push_str(&line(cells));
    }
    out
}

/// The results as CSV, one line per row (errors and peers as extra columns).
pub fn format_csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "method,selected,seq_len,batch,median_ms,min_ms,core_ms,train_ms,peak_bytes,max_error,mean_error,\
         structured_max_error,structured_mean_error,model_memory_elems,model_activation_elems,\
         model_flops,peers\n",
    );
    let o = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:e}"));
    for r in rows {
        let peers: Vec<String> = r
            .peers
            .iter()
            .map(|p| format!("{}={:.4}", p.kind, p.ratio))
            .collect();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{:e},{:e},{},{},{},{},{},{}",
            r.method,
            r.model.selected,
            r.seq_len,
            r.batch,
            r.median_ms,
            r.min_ms,
            r.core_ms.map_or(String::new(), |t| t.to_string()),
            r.train_ms.map_or(String::new(), |t| t.to_string()),
            r.peak_bytes.map_or(String::new(), |b| b.to_string()),
            r.max_error,
            r.mean_error,
            o(r.structured_max_error),
            o(r.structured_mean_error),
            r.model.memory,
            r.model.activations,
            r.model.compute,
            peers.join(";")
        );
    }
    out
}

/// The `model` subcommand's output: every method's prediction per length, then the seed's
/// relative-memory table.
pub fn format_model(model: &ComplexityModel, lengths: &[usize]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Complexity model: batch {}, d_model {}, heads {} (memory in f32 elements of attention \
         intermediates; compute in FlashAttention FLOPs of the attention core)",
        model.batch, model.d_model, model.heads
    );
    let _ = writeln!(
        out,
        "{:<22}  {:>7}  {:>14}  {:>14}  {:>11}  {:>6}  {:>6}",
        "method", "seq", "memory", "GFLOP", "params", "mem n^", "time n^"
    );
    for &n in lengths {
        for cost in model.compare(n) {
            let name = if cost.method == Method::Hybrid {
                format!("hybrid({})", cost.selected)
            } else {
                cost.method.to_string()
            };
            let _ = writeln!(
                out,
                "{:<22}  {:>7}  {:>14}  {:>14.3}  {:>11}  {:>6.1}  {:>6.1}",
                name,
                n,
                cost.memory,
                cost.compute as f64 / 1e9,
                cost.parameters,
                cost.memory_exponent,
                cost.time_exponent
            );
        }
        out.push('\n');
    }
    let rows = burn_attn::nn::complexity::relative_memory_table(lengths, model.d_model);
    out.push_str(&burn_attn::nn::complexity::format_relative_memory_table(
        &rows,
    ));
    out
}
