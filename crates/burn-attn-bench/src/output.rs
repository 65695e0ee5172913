//! What `compare` prints and writes: header, table, legend and growth on the terminal;
//! JSON, CSV and plots in the output directory.

use std::path::PathBuf;

use crate::growth::{format_growth, growth};
use crate::peers::{attach_peers, load_peers};
use crate::run::{Report, Row};
use crate::table::{format_csv, format_table, LEGEND};
use crate::CompareArgs;

/// Assembles the report: peers attached (when `--peers` is given) and growth fitted.
pub fn build_report(
    backend: String,
    memory: String,
    args: CompareArgs,
    mut rows: Vec<Row>,
) -> Result<Report, String> {
    if let Some(path) = &args.peers {
        let peers = load_peers(path)?;
        attach_peers(&mut rows, &args, &peers);
    }
    let growth = growth(&rows);
    Ok(Report {
        backend,
        memory,
        args,
        rows,
        growth,
    })
}

/// The terminal output: header, table, legend and the growth table.
pub fn format_report(report: &Report) -> String {
    let a = &report.args;
    let mut out = format!(
        "burn-attn compare on {} ({}; batch {}, d_model {}, heads {}, head dim {}; median of {} \
         after {} warm-up{})\npeak memory = {}\nmodel = complexity model (f32 elements)\n",
        report.backend,
        a.dtype.name(),
        a.tokens
            .map_or(a.batch.to_string(), |t| format!("max(1, {t} / n)")),
        a.d_model,
        a.heads,
        a.head_dim(),
        a.repeats,
        a.warmup,
        if matches!(a.backend, crate::BackendKind::Cpu) {
            ""
        } else {
            ", device synced"
        },
        report.memory,
    );
    out.push_str(&format_table(&report.rows));
    let missing = crate::run::missing_rows(a, &report.rows);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|(m, n)| format!("{m} n={n}")).collect();
        out.push_str(&format!(
            "not in the table (failed, or past --time-limit): {}\n",
            list.join(", ")
        ));
    }
    out.push('\n');
    out.push_str(LEGEND);
    out.push_str("\n\n");
    out.push_str(&format_growth(&report.growth));
    out.push_str(
        "fit: least-squares slope of ln(time) and ln(peak) against ln(n) over the measured \
         lengths; model fit: the same on the model's FLOPs and memory; model asym: the \
         asymptotic exponent (window, stride, density, ratio and chunk fixed). Small lengths \
         are dominated by fixed costs, so measured slopes sit below the asymptote.\n",
    );
    out
}

/// Writes `compare.json`, `compare.csv` and (unless `--no-plots`) `compare.png` and
/// `compare.svg` into `--out-dir`, and the JSON to `--json` when given; returns the paths.
pub fn write_outputs(report: &Report) -> Result<Vec<PathBuf>, String> {
    let dir = &report.args.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    let mut written = Vec::new();
    let mut write = |path: PathBuf, text: &str| -> Result<(), String> {
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        written.push(path);
        Ok(())
    };
    write(dir.join("compare.json"), &json)?;
    write(dir.join("compare.csv"), &format_csv(&report.rows))?;
    if let Some(path) = &report.args.json {
        write(path.clone(), &json)?;
    }
    if !report.args.no_plots {
        written.extend(crate::plots::write_plots(report, dir, "compare")?);
    }
    Ok(written)
}
