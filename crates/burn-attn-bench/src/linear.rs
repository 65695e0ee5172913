//! `linear`: causal linear attention's core against our causal flash attention over
//! lengths, forward and training step, beside its peers measured on the same shapes
//! (`scripts/peers/torch_linear.py`: flash-linear-attention's `chunk_linear_attn` and
//! `fused_chunk_linear_attn`, FlashAttention-2 causal), with the crossover length, the
//! growth (the log-log slope of time over length) and one streaming step's time after the
//! shortest and the longest length.
//!
//! ```sh
//! burn-attn-bench linear --backend cuda --dtype bf16 --peers linear.json
//! ```
//! Shapes: batch 2, 16 heads, d = 128, lengths 1024 .. 65536; q and k positive (uniform in
//! [0, 1): the feature map applied outside, on both sides), v normal; normalised. Times are
//! wall clock, the median over `--repeats` samples of `--calls` calls queued back to back
//! (CUDA events on the peers' side); the training step is the forward plus the backward of
//! `sum(out * dO)` for a fixed `dO`.

use burn::tensor::{Distribution, Tensor};
use burn_attn::cores::{
    causal_linear_attention_with, DispatchLog, KernelPolicy, LinearAttentionState, LinearOptions,
    Pass,
};
use burn_attn::{attention, AttentionOptions};
use clap::Args;

use crate::cli::{BackendKind, DType};
use crate::kernel::median_ms;
use crate::peers::{dtype_name, load_peers, PeerRecord};

/// Options of `linear`.
#[derive(Args, Debug, Clone)]
pub struct LinearArgs {
    /// Where the cases run.
    #[arg(long, value_enum, default_value_t = BackendKind::Cuda)]
    pub backend: BackendKind,
    /// Float type of the inputs.
    #[arg(long, value_enum, default_value_t = DType::Bf16)]
    pub dtype: DType,
    /// Batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    /// Head dimension (of q, k and v).
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Sequence lengths, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384,65536"
    )]
    pub lengths: Vec<usize>,
    /// Skip our causal flash attention above this length (its time grows as n^2).
    #[arg(long, default_value_t = 65536)]
    pub flash_up_to: usize,
    /// Samples per case; the median is reported.
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
    /// Calls queued back to back per sample.
    #[arg(long, default_value_t = 5)]
    pub calls: usize,
    /// The peer script's JSON: prints our time over each peer's for each length.
    #[arg(long, value_name = "PATH")]
    pub peers: Option<std::path::PathBuf>,
    /// Write the rows as JSON.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,
}

/// The times of one length: ours forward and training step (and their first calls, with
/// any kernel compilation), our flash's, and who served.
struct Row {
    n: usize,
    linear: (f64, f64),
    first: (f64, f64),
    flash: Option<(f64, f64)>,
    served: String,
}

/// Runs `linear` with `args`.
pub fn linear(args: LinearArgs) -> Result<(), String> {
    if args.calls == 0 || args.repeats == 0 || args.lengths.contains(&0) {
        return Err("--calls, --repeats and every length take at least 1".into());
    }
    let peers = args.peers.as_deref().map(load_peers).transpose()?;
    let device = crate::device::device_for(args.backend, args.dtype)?;
    let train = device.clone().autodiff();
    let (b, h, d) = (args.batch, args.heads, args.head_dim);
    let mut rows = Vec::new();
    for &n in &args.lengths {
        let make = |device: &burn::tensor::Device| {
            let pos = |dist| Tensor::<4>::random([b, h, n, d], dist, device);
            (
                pos(Distribution::Uniform(0.0, 1.0)),
                pos(Distribution::Uniform(0.0, 1.0)),
                pos(Distribution::Normal(0.0, 1.0)),
                pos(Distribution::Normal(0.0, 1.0)),
            )
        };
        let (q, k, v, _) = make(&device);
        let log = DispatchLog::new();
        let options = LinearOptions::new()
            .with_log(log.clone())
            .with_kernel(policy(args.backend));
        let mut forward_call = || {
            let _ = causal_linear_attention_with(q.clone(), k.clone(), v.clone(), None, &options);
        };
        let first_forward = first_call_ms(&device, &mut forward_call);
        let forward = median_ms(&device, args.repeats, args.calls, forward_call);
        let (tq, tk, tv, d_out) = make(&train);
        let (tq, tk, tv) = (tq.require_grad(), tk.require_grad(), tv.require_grad());
        let mut step_call = || {
            let (out, _) =
                causal_linear_attention_with(tq.clone(), tk.clone(), tv.clone(), None, &options);
            let _ = (out * d_out.clone()).sum().backward();
        };
        let first_step = first_call_ms(&train, &mut step_call);
        let step = median_ms(&train, args.repeats, args.calls, step_call);
        let served = served(&log);
        let flash = (n <= args.flash_up_to).then(|| {
            let options = AttentionOptions::new().with_causal(true);
            let forward = median_ms(&device, args.repeats, args.calls, || {
                let _ = attention(q.clone(), k.clone(), v.clone(), &options);
            });
            let step = median_ms(&train, args.repeats, args.calls, || {
                let out = attention(tq.clone(), tk.clone(), tv.clone(), &options);
                let _ = (out * d_out.clone()).sum().backward();
            });
            (forward, step)
        });
        let row = Row {
            n,
            linear: (forward, step),
            first: (first_forward, first_step),
            flash,
            served,
        };
        print_row(&row, &args, peers.as_deref());
        rows.push(row);
    }
    print_growth(&rows);
    let memory = training_memory(&args, &device);
    let step_ms = streaming_steps(&args, &device)?;
    if let Some(path) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "b": b, "h": h, "d": d, "n": r.n, "dtype": args.dtype.name(),
                    "linear_ms": r.linear.0, "linear_step_ms": r.linear.1,
                    "first_ms": r.first.0, "first_step_ms": r.first.1,
                    "flash_ms": r.flash.map(|f| f.0), "flash_step_ms": r.flash.map(|f| f.1),
                    "served": r.served,
                })
            })
            .chain(step_ms.iter().map(
                |(position, ms)| serde_json::json!({ "streaming_position": position, "ms": ms }),
            ))
            .chain(memory)
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The kernel on GPU backends, never a fallback (on CUDA it serves required calls only, for
/// now); the tensor ops on the CPU.
fn policy(backend: BackendKind) -> KernelPolicy {
    if backend == BackendKind::Cpu {
        KernelPolicy::Auto
    } else {
        KernelPolicy::Require
    }
}

/// One call of `f`, synced: its time in ms (the first call of a shape includes compiling
/// its kernels).
fn first_call_ms(device: &burn::tensor::Device, f: &mut impl FnMut()) -> f64 {
    let start = std::time::Instant::now();
    f();
    crate::device::sync(device);
    start.elapsed().as_secs_f64() * 1e3
}

/// The implementations the log recorded, forward then backward.
fn served(log: &DispatchLog) -> String {
    let last = |pass| {
        log.of(pass)
            .last()
            .map_or("-".to_string(), |s| format!("{:?}", s.served))
    };
    format!("{} / {}", last(Pass::Forward), last(Pass::Backward))
}

fn print_row(row: &Row, args: &LinearArgs, peers: Option<&[PeerRecord]>) {
    let (b, h, d, n) = (args.batch, args.heads, args.head_dim, row.n);
    let mut line = format!(
        "causal linear b={b} h={h} d={d} n={n:<6} forward {:>9.3} ms, training step {:>9.3} ms \
         (first calls {:.0} / {:.0} ms) [{}]",
        row.linear.0, row.linear.1, row.first.0, row.first.1, row.served
    );
    if let Some((forward, step)) = row.flash {
        line += &format!(
            " | our causal flash {forward:.3} / {step:.3} ms: linear is {:.2}x / {:.2}x faster",
            forward / row.linear.0,
            step / row.linear.1
        );
    }
    println!("{line}");
    for peer in peers.into_iter().flatten().filter(|p| {
        (p.b, p.h, p.n, p.d) == (b, h, n, d) && dtype_name(&p.dtype) == args.dtype.name()
    }) {
        let (ours, what) = match (peer.kind.ends_with("-fwdbwd"), peer.kind.starts_with("fa2")) {
            (false, false) => (Some(row.linear.0), "our linear forward"),
            (true, false) => (Some(row.linear.1), "our linear training step"),
            (false, true) => (row.flash.map(|f| f.0), "our flash forward"),
            (true, true) => (row.flash.map(|f| f.1), "our flash training step"),
        };
        let mut line = format!("  n={n}: {} {:.3} ms", peer.kind, peer.ms);
        if let Some(ours) = ours {
            line += &format!(", {what} / it = {:.2}", ours / peer.ms);
        }
        if peer.kind.starts_with("fa2") {
            let linear = if peer.kind.ends_with("-fwdbwd") {
                row.linear.1
            } else {
                row.linear.0
            };
            line += &format!(", it / our linear = {:.2}", peer.ms / linear);
        }
        println!("{line}");
    }
}

/// The crossover (the first length where the linear core beats our flash, forward and
/// training step) and the log-log slope of the linear core's time from 4096 up.
fn print_growth(rows: &[Row]) {
    for (what, pick) in [("forward", 0usize), ("training step", 1)] {
        let time = |t: (f64, f64)| if pick == 0 { t.0 } else { t.1 };
        let crossover = rows
            .iter()
            .find(|r| r.flash.is_some_and(|f| time(r.linear) < time(f)))
            .map_or("none measured".to_string(), |r| format!("n = {}", r.n));
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.n >= 4096)
            .map(|r| ((r.n as f64).ln(), time(r.linear).ln()))
            .collect();
        let slope = fit_slope(&points).map_or("-".to_string(), |s| format!("{s:.2}"));
        println!("{what}: linear beats our causal flash from {crossover}; log-log slope of its time over n >= 4096: {slope}");
    }
}

/// The least-squares slope of `y` over `x` (at least two distinct `x`).
fn fit_slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(sxy, sxx), (x, y)| {
        (sxy + (x - mx) * (y - my), sxx + (x - mx) * (x - mx))
    });
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One training step's device memory at the longest length, where the backend has a pool
/// (GPUs): after a pool cleanup with only the inputs (q, k, v and dO, constant-filled)
/// alive, the step runs with its output and gradients kept, and the pool's reserved bytes
/// are read (the pool returns no pages during the call, so this bounds the peak from
/// above). Compared with the tensors the step cannot do without: inputs, output, the
/// three gradients and the f32 divisor per row it saves.
fn training_memory(args: &LinearArgs, device: &burn::tensor::Device) -> Option<serde_json::Value> {
    device.memory_pool_usage()?;
    let reserved = || device.memory_pool_usage().map_or(0, |u| u.bytes_reserved);
    let (b, h, d) = (args.batch, args.heads, args.head_dim);
    let n = args.lengths.iter().copied().max()?;
    let train = device.clone().autodiff();
    let fill = |x: f32| Tensor::<4>::full([b, h, n, d], x, &train);
    let (q, k, v, w) = (fill(0.02), fill(0.01), fill(0.5), fill(1.0));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let elem = q.dtype().size() as u64;
    device.sync().ok()?;
    device.memory_cleanup();
    let before = reserved();
    let options = LinearOptions::new().with_kernel(policy(args.backend));
    let (out, _) = causal_linear_attention_with(q.clone(), k.clone(), v.clone(), None, &options);
    let grads = (out.clone() * w).sum().backward();
    let kept = (out, q.grad(&grads), k.grad(&grads), v.grad(&grads));
    device.sync().ok()?;
    let after = reserved();
    drop(kept);
    // q, k, v, dO, the output, three gradients; the f32 divisor per row.
    let tensors = 8 * (b * h * n * d) as u64 * elem + (b * h * n * 4) as u64;
    let ratio = after as f64 / tensors as f64;
    println!(
        "memory training step b={b} h={h} n={n} d={d} {}: pool {:.1} MiB before, {:.1} MiB \
         after; inputs, output, gradients and divisor {:.1} MiB; ratio {ratio:.2}",
        args.dtype.name(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        tensors as f64 / 1048576.0,
    );
    Some(serde_json::json!({
        "memory_n": n, "reserved_before": before, "reserved_after": after,
        "tensor_bytes": tensors, "ratio": ratio,
    }))
}

/// One token's streaming step against the state of the shortest and of the longest length's
/// earlier tokens. The two positions' samples alternate (one sample of `calls` queued steps
/// each, `repeats` times) so that clock changes during the run fall on both alike.
fn streaming_steps(
    args: &LinearArgs,
    device: &burn::tensor::Device,
) -> Result<Vec<(usize, f64)>, String> {
    let (b, h, d) = (args.batch, args.heads, args.head_dim);
    let options = LinearOptions::new().with_kernel(policy(args.backend));
    let shortest = args.lengths.iter().copied().min().unwrap_or(1);
    let longest = args.lengths.iter().copied().max().unwrap_or(1);
    let rand = |n| Tensor::<4>::random([b, h, n, d], Distribution::Uniform(0.0, 1.0), device);
    let steps: Vec<(usize, LinearAttentionState)> = [shortest, longest]
        .into_iter()
        .map(|position| {
            let (_, state) = causal_linear_attention_with(
                rand(position),
                rand(position),
                rand(position),
                None,
                &options,
            );
            (position, state)
        })
        .collect();
    let (q, k, v) = (rand(1), rand(1), rand(1));
    let step = |state: &LinearAttentionState| {
        let _ = causal_linear_attention_with(
            q.clone(),
            k.clone(),
            v.clone(),
            Some(state.clone()),
            &options,
        );
    };
    let mut samples = vec![Vec::new(); steps.len()];
    for _ in 0..args.repeats.max(1) {
        for ((_, state), times) in steps.iter().zip(&mut samples) {
            times.push(median_ms(device, 1, args.calls, || step(state)));
        }
    }
    let mut times = Vec::new();
    for ((position, _), mut samples) in steps.iter().zip(samples) {
        samples.sort_by(f64::total_cmp);
        let ms = samples[samples.len() / 2];
        println!("streaming step b={b} h={h} d={d}: one token after {position} tokens {ms:.4} ms");
        times.push((*position, ms));
    }
    if let [(_, first), (_, last)] = times[..] {
        println!(
            "streaming step after {longest} / after {shortest} tokens = {:.2}",
            last / first
        );
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_power_law_is_its_exponent() {
        let points: Vec<_> = [1024.0f64, 4096.0, 16384.0]
            .iter()
            .map(|n| (n.ln(), (3.0 * n * n).ln()))
            .collect();
        assert!((fit_slope(&points).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(fit_slope(&points[..1]), None);
    }
}
