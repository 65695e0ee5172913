//! `decode`: the attention of one decoding step, new queries against a key/value cache
//! with grouped heads, beside PyTorch's decode paths on the same shapes
//! (`scripts/peers/torch_decode.py`: SDPA with `enable_gqa`, FlexAttention) and the time
//! to read the cache once at the device's measured copy bandwidth.
//!
//! ```sh
//! burn-attn-bench decode --backend cuda --dtype bf16 --peers decode.json
//! ```
//! Cases (`--cases NEW:CACHE,..`): batch 8, 32 query heads over 8 key/value heads, d = 128,
//! one new token against caches of 4096, 32768 and 131072 keys and 16 new tokens against
//! 32768. Every new query sees the whole cache on both sides (one new token: the causal
//! call of a decoding step; 16 new tokens: a non-causal call, as the peer's, so both count
//! the same keys). Times are wall clock, the median over `--repeats` samples of `--calls`
//! calls queued back to back (CUDA events on the peers' side).

use burn::tensor::{Distribution, Tensor};
use burn_attn::cores::{DispatchLog, Pass};
use burn_attn::{attention, AttentionOptions};
use clap::Args;

use crate::cli::{BackendKind, DType};
use crate::kernel::median_ms;
use crate::peers::{dtype_name, load_peers};

/// Options of `decode`.
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Where the cases run.
    #[arg(long, value_enum, default_value_t = BackendKind::Cuda)]
    pub backend: BackendKind,
    /// Float type of the inputs.
    #[arg(long, value_enum, default_value_t = DType::Bf16)]
    pub dtype: DType,
    /// Batch (sequences decoded together).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    /// Key/value heads (divides the query heads).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Cases as `NEW:CACHE` (new tokens, cached keys), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1:4096,1:32768,1:131072,16:32768"
    )]
    pub cases: Vec<String>,
    /// Samples per case; the median is reported.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Calls queued back to back per sample.
    #[arg(long, default_value_t = 10)]
    pub calls: usize,
    /// The peer script's JSON: prints our time over each peer's for each case.
    #[arg(long, value_name = "PATH")]
    pub peers: Option<std::path::PathBuf>,
    /// Write the rows as JSON.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,
    /// Forced kernel plan (tuning runs: `--plan-key-splits 16`).
    #[command(flatten)]
    pub plan: crate::kernel::PlanArgs,
}

/// `NEW:CACHE` as numbers.
fn parse_case(text: &str) -> Result<(usize, usize), String> {
    let parsed = text
        .split_once(':')
        .and_then(|(new, cache)| Some((new.trim().parse().ok()?, cache.trim().parse().ok()?)));
    match parsed {
        Some((new, cache)) if new > 0 && cache >= new => Ok((new, cache)),
        _ => Err(format!(
            "--cases takes NEW:CACHE pairs with 0 < NEW <= CACHE, got {text:?}"
        )),
    }
}

/// Runs `decode` with `args`.
pub fn decode(args: DecodeArgs) -> Result<(), String> {
    if args.calls == 0 || args.repeats == 0 {
        return Err("--calls and --repeats take at least 1".into());
    }
    let (b, h, kvh, d) = (args.batch, args.heads, args.kv_heads, args.head_dim);
    if kvh == 0 || h % kvh != 0 {
        return Err(format!(
            "--kv-heads {kvh} must divide --heads {h} (query heads per key/value head)"
        ));
    }
    let cases = args
        .cases
        .iter()
        .map(|c| parse_case(c))
        .collect::<Result<Vec<_>, _>>()?;
    let peers = args.peers.as_deref().map(load_peers).transpose()?;
    let device = crate::device::device_for(args.backend, args.dtype)?;
    // The device's copy bandwidth, from the peer script (read plus write bytes over time).
    let copy = peers.as_ref().and_then(|peers| {
        peers
            .iter()
            .find(|p| p.kind == "copy")
            .and_then(|p| Some(p.bytes? / (p.ms * 1e-3)))
    });
    let mut rows = Vec::new();
    for (new, cache) in cases {
        let rand = |heads: usize, n: usize| {
            Tensor::<4>::random([b, heads, n, d], Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (rand(h, new), rand(kvh, cache), rand(kvh, cache));
        let log = DispatchLog::new();
        let mut options = AttentionOptions::new()
            .with_causal(new == 1)
            .with_log(log.clone());
        let forced = args.plan.forced();
        if !forced.is_default() {
            options = options.with_forced_plan(forced);
        }
        let ms = median_ms(&device, args.repeats, args.calls, || {
            let _ = attention(q.clone(), k.clone(), v.clone(), &options);
        });
        let cache_bytes = (2 * b * kvh * cache * d) as f64 * args.dtype.bytes() as f64;
        let served = log
            .of(Pass::Forward)
            .last()
            .map_or("-".to_string(), |s| format!("{:?}", s.served));
        let mut line = format!(
            "decode b={b} h={h}/{kvh} d={d} new={new:<3} cache={cache:<7} {ms:>8.4} ms, cache \
             read {:>6.2} TB/s [{served}]",
            cache_bytes / (ms * 1e-3) / 1e12
        );
        if let Some(bandwidth) = copy {
            let read_ms = cache_bytes / bandwidth * 1e3;
            line += &format!(
                " | cache once at copy bandwidth {read_ms:.4} ms: ours / that = {:.2}",
                ms / read_ms
            );
        }
        println!("{line}");
        for peer in peers.iter().flatten().filter(|p| {
            p.kind.starts_with("decode-")
                && (p.b, p.h, p.n, p.d) == (b, h, cache, d)
                && p.kv_heads == Some(kvh)
                && p.new == Some(new)
                && dtype_name(&p.dtype) == args.dtype.name()
        }) {
            println!(
                "  new={new} cache={cache}: ours / {} = {:.2} ({:.4} ms)",
                peer.kind,
                ms / peer.ms,
                peer.ms
            );
        }
        rows.push(serde_json::json!({
            "b": b, "h": h, "kv_heads": kvh, "d": d, "new": new, "cache": cache,
            "dtype": args.dtype.name(), "ms": ms, "cache_bytes": cache_bytes, "served": served,
        }));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_parse_or_name_the_bad_text() {
        assert_eq!(parse_case("16:32768"), Ok((16, 32768)));
        assert!(parse_case("0:10").unwrap_err().contains("\"0:10\""));
        assert!(parse_case("20:10").is_err());
        assert!(parse_case("1x10").is_err());
    }
}
