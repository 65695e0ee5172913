//! `calibrate`: where each core becomes faster than flash on this device, turned into
//! hybrid thresholds and saved as a [`HybridProfile`].

use burn::config::Config;
use burn::tensor::Device;
use burn_attn::nn::complexity::Method;
use burn_attn::nn::hybrid::{HybridCrossover, HybridMeasurement, HybridProfile};
use burn_attn::SparsePattern;
use indicatif::ProgressBar;

use crate::cli::CalibrateArgs;
use crate::run::{backend_name, run, MemoryMeter};

/// The smallest length from which `method` stays faster than `baseline` over every longer
/// measured length; `None` when it is not faster at the longest.
///
/// Both lists are `(length, median ms)`; only lengths present in both count. Between the
/// last length where it was slower and the first where it is faster, the crossing is
/// interpolated linearly in `ln(length)` on `ln(time ratio)`.
pub fn crossover(method: &[(usize, f64)], baseline: &[(usize, f64)]) -> Option<usize> {
    let mut pairs: Vec<(usize, f64)> = method
        .iter()
        .filter_map(|&(n, t)| {
            baseline
                .iter()
                .find(|b| b.0 == n)
                .map(|b| (n, (t / b.1).ln()))
        })
        .collect();
    pairs.sort_by_key(|p| p.0);
    let first_faster = pairs
        .iter()
        .rposition(|p| p.1 >= 0.0)
        .map_or(0, |slower| slower + 1);
    if first_faster >= pairs.len() {
        return None;
    }
    if first_faster == 0 {
        return Some(pairs[0].0);
    }
    let (n0, r0) = pairs[first_faster - 1];
    let (n1, r1) = pairs[first_faster];
    let f = r0 / (r0 - r1);
    let ln = (n0 as f64).ln() + f * ((n1 as f64).ln() - (n0 as f64).ln());
    Some((ln.exp().ceil() as usize).clamp(n0 + 1, n1))
}

/// Hybrid thresholds from timings of flash, the sparse core and the sliding window:
/// `(flash_max_len, sparse_max_len, crossovers)`.
///
/// Flash runs until the first core becomes faster than it; the sparse regime runs only when
/// sparse overtakes flash before the window does, until the window overtakes sparse. A core
/// that never becomes faster within the measured lengths never takes over (`usize::MAX`):
/// flash is exact, so the hybrid stays exact where the measurements give no reason not to.
pub fn thresholds(
    measured: &[HybridMeasurement],
    sparse: Method,
) -> (usize, usize, Vec<HybridCrossover>) {
    let times = |m: Method| -> Vec<(usize, f64)> {
        measured
            .iter()
            .filter(|r| r.method == m.name())
            .map(|r| (r.seq_len, r.median_ms))
            .collect()
    };
    let (flash, sp, win) = (
        times(Method::Flash),
        times(sparse),
        times(Method::SlidingWindow),
    );
    let c_sparse = crossover(&sp, &flash);
    let c_window = crossover(&win, &flash);
    let crossovers = vec![
        HybridCrossover {
            method: sparse.name().into(),
            faster_than_flash_from: c_sparse,
        },
        HybridCrossover {
            method: Method::SlidingWindow.name().into(),
            faster_than_flash_from: c_window,
        },
    ];
    let sparse_first = match (c_sparse, c_window) {
        (Some(s), Some(w)) => s < w,
        (Some(_), None) => true,
        _ => false,
    };
    let (flash_max, sparse_max) = if sparse_first {
        let flash_max = c_sparse.unwrap() - 1;
        let sparse_max = crossover(&win, &sp).map_or(usize::MAX, |c| (c - 1).max(flash_max));
        (flash_max, sparse_max)
    } else {
        let flash_max = c_window.map_or(usize::MAX, |c| c - 1);
        (flash_max, flash_max)
    };
    (flash_max, sparse_max, crossovers)
}

/// Measures flash, the sparse core and the sliding window at `--lengths` on `device` and
/// returns the profile.
pub fn calibrate(
    device: &Device,
    args: &CalibrateArgs,
    meter: &MemoryMeter,
    bar: &ProgressBar,
) -> Result<HybridProfile, String> {
    let c = &args.compare;
    let pattern = match args.sparse {
        Method::SparseLocal => SparsePattern::Local {
            window: c.sparse_window,
        },
        Method::SparseStrided => SparsePattern::Strided {
            stride: c.stride,
            local: c.local,
        },
        Method::SparseRandom => SparsePattern::Random {
            density: c.density,
            block: c.block,
            seed: c.seed,
        },
        other => return Err(format!("--sparse must be a sparse pattern, not {other}")),
    };
    let mut compare = c.clone();
    compare.methods = vec![Method::Flash, args.sparse, Method::SlidingWindow];
    compare.no_structured = true;
    let rows = run(device, &compare, meter, bar);
    let measured: Vec<HybridMeasurement> = rows
        .iter()
        .map(|r| HybridMeasurement {
            method: r.method.name().into(),
            seq_len: r.seq_len,
            median_ms: r.median_ms,
        })
        .collect();
    let (flash_max, sparse_max, crossovers) = thresholds(&measured, args.sparse);
    Ok(HybridProfile::new(
        backend_name(device),
        c.dtype.name().into(),
        c.d_model,
        c.heads,
        c.batch,
        flash_max,
        sparse_max,
        pattern,
        c.window,
        crossovers,
        measured,
    ))
}

/// A readable summary of a profile.
pub fn format_profile(profile: &HybridProfile) -> String {
    let lim = |v: usize| {
        if v == usize::MAX {
            "never (beyond the measured lengths)".to_string()
        } else {
            v.to_string()
        }
    };
    let mut out = format!(
        "hybrid profile for {} ({}, d_model {}, heads {}, batch {}):\n",
        profile.device, profile.dtype, profile.d_model, profile.n_heads, profile.batch
    );
    for c in &profile.crossovers {
        out.push_str(&format!(
            "  {} faster than flash from n = {}\n",
            c.method,
            c.faster_than_flash_from
                .map_or("never (within the measured lengths)".into(), |n| n
                    .to_string())
        ));
    }
    out.push_str(&format!(
        "  flash up to {}, sparse up to {}, sliding window beyond\n",
        lim(profile.flash_max_len),
        lim(profile.sparse_max_len)
    ));
    out
}

/// Saves the profile as JSON.
pub fn save_profile(profile: &HybridProfile, path: &std::path::Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    profile
        .save(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}
