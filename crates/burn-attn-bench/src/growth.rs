//! Growth with the length: least-squares slopes of time and memory in log-log space,
//! beside the complexity model's exponents.

use burn_attn::nn::complexity::Method;
use serde::{Deserialize, Serialize};

use crate::run::Row;

/// The least-squares slope of `ln y` against `ln x`: the exponent `k` of `y ~ c * x^k`.
///
/// Points with a non-positive or non-finite coordinate are ignored; `None` when fewer than
/// two distinct lengths remain.
pub fn loglog_slope(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0 && x.is_finite() && y.is_finite())
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    if logs.len() < 2 {
        return None;
    }
    let n = logs.len() as f64;
    let mx = logs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = logs.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 1e-12).then(|| sxy / sxx)
}

/// The fitted and predicted growth of one method over the measured lengths.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Growth {
    /// The method.
    pub method: Method,
    /// Fitted log-log slope of the median time.
    pub time_slope: Option<f64>,
    /// Fitted log-log slope of the measured memory peak.
    pub memory_slope: Option<f64>,
    /// The same fit on the model's compute over the same lengths (finite-length effects:
    /// a window wider than the sequence is still quadratic there).
    pub model_time_slope: Option<f64>,
    /// The same fit on the model's memory (intermediates plus activations).
    pub model_memory_slope: Option<f64>,
    /// The model's asymptotic time exponent (exact 2, linear and window 1).
    pub time_exponent: f64,
    /// The model's asymptotic memory exponent.
    pub memory_exponent: f64,
}

/// One [`Growth`] per method present in `rows`, in the rows' order.
pub fn growth(rows: &[Row]) -> Vec<Growth> {
    let mut methods: Vec<Method> = Vec::new();
    for row in rows {
        if !methods.contains(&row.method) {
            methods.push(row.method);
        }
    }
    methods
        .into_iter()
        .map(|method| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.method == method).collect();
            let fit = |f: &dyn Fn(&Row) -> Option<f64>| {
                let pts: Vec<(f64, f64)> = mine
                    .iter()
                    .filter_map(|r| f(r).map(|y| (r.seq_len as f64, y)))
                    .collect();
                loglog_slope(&pts)
            };
            let (memory_exponent, time_exponent) = method.exponents();
            Growth {
                method,
                time_slope: fit(&|r| Some(r.median_ms)),
                memory_slope: fit(&|r| r.peak_bytes.map(|b| b as f64)),
                model_time_slope: fit(&|r| Some(r.model.compute as f64)),
                model_memory_slope: fit(&|r| Some((r.model.memory + r.model.activations) as f64)),
                time_exponent,
                memory_exponent,
            }
        })
        .collect()
}

/// The growth table: fitted slopes beside the model's.
pub fn format_growth(growth: &[Growth]) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let mut out = format!(
        "{:<18}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}\n",
        "growth (n^k)", "time fit", "model fit", "model asym", "mem fit", "model fit", "model asym"
    );
    for g in growth {
        out.push_str(&format!(
            "{:<18}  {:>10}  {:>10}  {:>10.1}  {:>10}  {:>10}  {:>10.1}\n",
            g.method.to_string(),
            f(g.time_slope),
            f(g.model_time_slope),
            g.time_exponent,
            f(g.memory_slope),
            f(g.model_memory_slope),
            g.memory_exponent
        ));
    }
    out
}
