//! The plots: time, memory and error against length, log-log, as PNG and SVG.
//!
//! Text is drawn with DejaVu Sans Mono, bundled in `assets/` and registered with plotters'
//! `ab_glyph` font registry, so plotting needs no system fonts.

use std::path::Path;
use std::sync::Once;

use burn_attn::nn::complexity::Method;
use plotters::coord::combinators::{BindKeyPoints, LogCoord};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::run::{Report, Row};

/// DejaVu Sans Mono (Bitstream Vera license, `assets/DejaVu-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the bundled font under the family the plots use (once per process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            eprintln!("warning: the bundled plot font did not load; labels may be missing");
        }
    });
}

/// Writes `<stem>.png` and `<stem>.svg` (three panels: time, memory, error) into `dir`;
/// returns the two paths.
pub fn write_plots(
    report: &Report,
    dir: &Path,
    stem: &str,
) -> Result<[std::path::PathBuf; 2], String> {
    register_font();
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let size = (1800, 640);
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(root, report).map_err(|e| format!("drawing {}: {e}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(root, report).map_err(|e| format!("drawing {}: {e}", svg.display()))?;
    }
    Ok([png, svg])
}

/// The label of a method in the legend.
fn name(method: Method) -> String {
    method.to_string()
}

/// Geometric bounds of positive values, widened a little so the lines stay off the frame.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return 1e-3..1.0;
    }
    let (lo, hi) = if hi / lo < 10.0 {
        (lo / 2.0, hi * 2.0)
    } else {
        (lo / 1.3, hi * 1.3)
    };
    lo..hi
}

/// Axis labels: plain numbers in the readable range, scientific outside it.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if (0.01..1e5).contains(&a) {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

/// One panel: for each method, `value(row)` against the length.
type Series = (Method, Vec<(f64, f64)>);

fn series(rows: &[Row], methods: &[Method], value: &dyn Fn(&Row) -> Option<f64>) -> Vec<Series> {
    methods
        .iter()
        .map(|&m| {
            let pts = rows
                .iter()
                .filter(|r| r.method == m)
                .filter_map(|r| value(r).map(|v| (r.seq_len as f64, v)))
                .filter(|(_, v)| *v > 0.0 && v.is_finite())
                .collect();
            (m, pts)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    x_range: std::ops::Range<f64>,
    lengths: &[f64],
    solid: &[Series],
    dashed: &[Series],
    legend: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let y_range = log_range(
        solid
            .iter()
            .chain(dashed)
            .flat_map(|(_, p)| p.iter().map(|q| q.1)),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(
            // The measured lengths label the x axis (a log axis over less than a decade
            // would otherwise carry a single label).
            LogCoord::from(x_range.log_scale()).with_key_points(lengths.to_vec()),
            y_range.log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("sequence length")
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&tick)
        .label_style((FAMILY, 14))
        .draw()?;
    for (i, (method, pts)) in solid.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = color.stroke_width(2);
        let drawn = chart.draw_series(LineSeries::new(pts.iter().copied(), style))?;
        if legend {
            drawn.label(name(*method)).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    for (i, (method, pts)) in dashed.iter().enumerate() {
        let _ = method;
        let color = Palette99::pick(i).to_rgba();
        chart.draw_series(DashedLineSeries::new(
            pts.iter().copied(),
            6,
            4,
            color.stroke_width(2),
        ))?;
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "burn-attn compare: {} {}, batch {}, heads {}, head dim {}",
            report.backend,
            report.args.dtype.name(),
            report
                .args
                .tokens
                .map_or(report.args.batch.to_string(), |t| format!("{t}/n")),
            report.args.heads,
            report.args.head_dim()
        ),
        (FAMILY, 24),
    )?;
    let rows = &report.rows;
    let mut methods: Vec<Method> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let x_range = {
        let (lo, hi) = rows.iter().fold((f64::INFINITY, 1f64), |(lo, hi), r| {
            (lo.min(r.seq_len as f64), hi.max(r.seq_len as f64))
        });
        (lo.min(hi) / 1.15)..(hi * 1.15)
    };
    let mut lengths: Vec<f64> = rows.iter().map(|r| r.seq_len as f64).collect();
    lengths.sort_by(f64::total_cmp);
    lengths.dedup();
    let panels = root.split_evenly((1, 3));
    let time = series(rows, &methods, &|r| Some(r.median_ms));
    panel(
        &panels[0],
        "median time",
        "ms",
        x_range.clone(),
        &lengths,
        &time,
        &[],
        true,
    )?;
    let memory = series(rows, &methods, &|r| {
        r.peak_bytes.map(|b| b as f64 / (1024.0 * 1024.0))
    });
    let mem_title = if report.memory.contains("device") {
        "peak memory (device pool)"
    } else {
        "peak memory (host allocator)"
    };
    panel(
        &panels[1],
        mem_title,
        "MiB",
        x_range.clone(),
        &lengths,
        &memory,
        &[],
        false,
    )?;
    // Exact methods sit at rounding level; clamp so zeros still show on the log axis.
    let err = series(rows, &methods, &|r| Some(r.max_error.max(1e-9)));
    let structured = series(rows, &methods, &|r| {
        r.structured_max_error.map(|e| e.max(1e-9))
    });
    panel(
        &panels[2],
        "max |err| vs exact (dashed: structured)",
        "max abs error",
        x_range,
        &lengths,
        &err,
        &structured,
        false,
    )?;
    root.present()?;
    Ok(())
}
