//! Peer timings from `scripts/peers/torch_attention.py` and `scripts/peers/flex_masks.py`
//! (their JSON output), matched to our rows by shape and dtype.

use std::path::Path;

use burn_attn::nn::complexity::Method;
use serde::{Deserialize, Serialize};

use crate::cli::CompareArgs;
use crate::run::Row;

/// One record of the peer script's JSON list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRecord {
    /// `sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient`, `sdpa-math`, `*-bwd`,
    /// `flex-window-sym`, `flex-window-causal`.
    pub kind: String,
    /// `torch.bfloat16`, `torch.float16`, `torch.float32` or `bf16`.
    pub dtype: String,
    /// Batch.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Sequence length.
    pub n: usize,
    /// Head dimension.
    pub d: usize,
    /// Causal (SDPA records).
    #[serde(default)]
    pub causal: Option<bool>,
    /// Total window (flex records).
    #[serde(default)]
    pub window: Option<usize>,
    /// Median milliseconds.
    pub ms: f64,
    /// Visible (query, key) pairs per (batch, head), counted from the mask (mask records).
    #[serde(default)]
    pub visible_pairs: Option<f64>,
    /// Key/value heads (decode records; `n` is then the cache length).
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// New queries per sequence (decode records).
    #[serde(default)]
    pub new: Option<usize>,
    /// Bytes read and written (the `copy` record of the device's copy bandwidth).
    #[serde(default)]
    pub bytes: Option<f64>,
}

/// Our time over one peer's, for a matching row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRatio {
    /// The peer's kind (`sdpa-cudnn`, `flex-window-sym`, ...).
    pub kind: String,
    /// The peer's median milliseconds.
    pub peer_ms: f64,
    /// Our core's median (the module's when no core time) over the peer's: above 1 we
    /// are slower.
    pub ratio: f64,
}

/// Reads the peer script's JSON.
pub fn load_peers(path: &Path) -> Result<Vec<PeerRecord>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading peers {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parsing peers {}: {e}", path.display()))
}

pub(crate) fn dtype_name(peer: &str) -> &str {
    match peer {
        "torch.bfloat16" | "bf16" | "bfloat16" => "bf16",
        "torch.float16" | "f16" | "float16" => "f16",
        "torch.float32" | "f32" | "float32" => "f32",
        other => other,
    }
}

/// The peers time the attention kernel alone, so the ratio uses the row's core time (no
/// projections) when it has one.
///
/// Fills each row's `peers` with the forward peers of the same shape and dtype: exact
/// methods (and the hybrid while it runs flash) against non-causal SDPA, the sliding window
/// (and the hybrid in that regime) against FlexAttention's symmetric window of the same
/// size.
pub fn attach_peers(rows: &mut [Row], args: &CompareArgs, peers: &[PeerRecord]) {
    for row in rows {
        let core = if row.method == Method::Hybrid {
            row.model.selected
        } else {
            row.method
        };
        row.peers = peers
            .iter()
            .filter(|p| {
                p.b == args.batch_for(row.seq_len)
                    && p.h == args.heads
                    && p.n == row.seq_len
                    && p.d == args.head_dim()
                    && dtype_name(&p.dtype) == args.dtype.name()
                    && !p.kind.ends_with("-bwd")
            })
            .filter(|p| match core {
                Method::Exact | Method::Flash => {
                    p.kind.starts_with("sdpa-") && p.causal != Some(true)
                }
                Method::SlidingWindow => {
                    p.kind == "flex-window-sym" && p.window == Some(args.window)
                }
                _ => false,
            })
            .map(|p| PeerRatio {
                kind: p.kind.clone(),
                peer_ms: p.ms,
                ratio: row.core_ms.unwrap_or(row.median_ms) / p.ms,
            })
            .collect();
    }
}
