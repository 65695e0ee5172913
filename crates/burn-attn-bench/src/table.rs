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
allocator peak: host bytes allocated above the live baseline during one forward (counting \
global allocator; GPU memory is not seen).
model MiB: complexity model, attention intermediates plus Q/K/V/output activations in f32 \
(it counts one n x n matrix for exact; the materialised baseline holds a few).
GFLOP/s: the model's attention FLOPs (FlashAttention count) over the median time.
max |err| vs exact: against materialised exact attention with the same weights (causal \
exact for causal-linear); exact methods should be ~1e-7.";

/// Formats the comparison table.
///
/// Columns: method, sequence length, median ms, measured GFLOP/s (model FLOPs of the
/// attention core over the median time), allocator peak in MiB (host bytes allocated above
/// the baseline during one forward), the model's memory (attention intermediates plus the
/// Q/K/V/output activations, f32) in MiB, the model's attention GFLOP, and the max absolute
/// error against exact attention with the same weights.
pub fn format_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let header = [
        "method",
        "seq",
        "median ms",
        "GFLOP/s",
        "allocator peak MiB",
        "model MiB",
        "model GFLOP",
        "max |err| vs exact",
    ];
    let widths = [22, 6, 10, 8, 18, 10, 11, 18];
    let line = |cells: [String; 8]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<w$}");
            } else {
                let _ = write!(s, "  {c:>w$}");
            }
        }
        s.push('\n');
        s
    };
    out.push_str(&line(header.map(String::from)));
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    out.push('\n');
    let mut last_len = None;
    for row in rows {
        // A blank line between lengths keeps the long table readable.
        if last_len.is_some_and(|l| l != row.seq_len) {
            out.push('\n');
        }
        last_len = Some(row.seq_len);
        let model_bytes = (row.model.memory + row.model.activations) * 4;
        let gflops = row.model.compute as f64 / (row.median_ms * 1e-3) / 1e9;
        out.push_str(&line([
            label(row),
            row.seq_len.to_string(),
            format!("{:.3}", row.median_ms),
            format!("{gflops:.2}"),
            row.peak_bytes
                .map_or("n/a".into(), |b| format!("{:.3}", b as f64 / MIB)),
            format!("{:.3}", model_bytes as f64 / MIB),
            format!("{:.4}", row.model.compute as f64 / 1e9),
            format!("{:.2e}", row.max_error),
        ]));
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
