//! `masks`: the attention op under the masks block-sparse attention serves (windows,
//! strided columns, random block layouts, key padding, document ids), forward and training
//! step, beside FlexAttention's records of the same masks (`scripts/peers/flex_masks.py`);
//! and the dense call with ALiBi or a softcap, whose cost over the plain kernel is the
//! measure (no peer rows).
//!
//! ```sh
//! burn-attn-bench masks --backend cuda --dtype bf16 --peers flex.json
//! ```
//! Every case is b = 2, h = 16, n = 16384, d = 128 by default. Each mask is defined here and
//! in the peer script the same way, element for element (the random layouts from one
//! shared hash, [`random_layout`]), and the visible (query, key) pairs are counted from the
//! mask on both sides: a ratio compares the same work. Each case builds the pattern's
//! block-sparse plan once (a `BlockMaskCache`), as the peer builds its block mask once;
//! the document ids hold theirs after the first call, as a model's layers share a batch's
//! ids; key padding's cover and lists are built per call on our side. Times are wall clock, the median
//! over `--repeats` samples of `--calls` calls queued back to back (CUDA events on the
//! peer's side); the backward is the training step minus the forward.

use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use burn_attn::cores::{alibi_slopes, BlockLayout, BlockMaskCache, DispatchLog, KeyPattern, Pass};
use burn_attn::{masked_attention, AttentionMasks, AttentionOptions, DocumentIds, Window};
use clap::Args;

use crate::cli::{BackendKind, DType};
use crate::kernel::median_ms;
use crate::peers::{dtype_name, load_peers, PeerRecord};

/// Options of `masks`.
#[derive(Args, Debug, Clone)]
pub struct MasksArgs {
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
    /// Sequence length (queries and keys).
    #[arg(long, default_value_t = 16384)]
    pub seq: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Samples per case; the median is reported.
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
    /// Calls queued back to back per sample.
    #[arg(long, default_value_t = 10)]
    pub calls: usize,
    /// Keep the cases whose name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Time training steps too (forward and backward of `sum(out * w)`).
    #[arg(long)]
    pub backward: bool,
    /// The peer script's JSON: prints our time over the peer's for each case.
    #[arg(long, value_name = "PATH")]
    pub peers: Option<std::path::PathBuf>,
    /// Write the rows as JSON.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,
}

/// Keys per block of the random layouts (FlexAttention's block size).
const LAYOUT_BLOCK: usize = 128;
/// Seed of the random layouts' hash.
const LAYOUT_SEED: u64 = 0x5eed;

/// One mask case.
struct MaskCase {
    name: String,
    pattern: KeyPattern,
    /// Keys of each batch row from this one on are padding.
    valid_keys: Option<usize>,
    /// Document id of every position (packed sequences; the same for every batch row).
    documents: Option<Vec<i64>>,
    /// Score modifiers on every score (no key hidden): ALiBi, a softcap.
    modifiers: ScoreModifiers,
}

/// Score modifiers of a case (they change scores, hide nothing).
#[derive(Clone, Copy, Default)]
struct ScoreModifiers {
    /// ALiBi with Press et al.'s slopes.
    alibi: bool,
    /// A tanh softcap.
    softcap: Option<f64>,
}

/// SplitMix64: the random layouts' hash, written the same way in the peer script.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A layout of `LAYOUT_BLOCK`-square blocks over `n x n`, block `(r, c)` active when the
/// hash of `seed ^ (r * blocks + c)` falls below `density` (as a fraction of 2^53).
pub fn random_layout(n: usize, density: f64) -> BlockLayout {
    let blocks = n.div_ceil(LAYOUT_BLOCK);
    let active = (0..blocks * blocks)
        .map(|at| {
            let u = (splitmix64(LAYOUT_SEED ^ at as u64) >> 11) as f64 / (1u64 << 53) as f64;
            u < density
        })
        .collect();
    BlockLayout {
        block_q: LAYOUT_BLOCK,
        block_k: LAYOUT_BLOCK,
        q_blocks: blocks,
        k_blocks: blocks,
        active,
    }
}

/// The cases, named as the peer script names them.
fn cases(n: usize) -> Vec<MaskCase> {
    let plain = |name: &str, pattern: KeyPattern| MaskCase {
        name: name.to_string(),
        pattern,
        valid_keys: None,
        documents: None,
        modifiers: ScoreModifiers::default(),
    };
    // |i - j| <= 64, or j a multiple of 64.
    let strided = KeyPattern {
        window: Window::new(Some(64), Some(64)),
        stride: Some(64),
        causal: false,
        blocks: None,
    };
    let mut cases = vec![
        plain("full", KeyPattern::default()),
        // The 1024 most recent keys (i - 1023 ..= i).
        plain(
            "causal-window-1024",
            KeyPattern::band(Window::causal(1024), true),
        ),
        // |i - j| <= 512.
        plain(
            "window-sym-512",
            KeyPattern::band(Window::new(Some(512), Some(512)), false),
        ),
        plain("strided-64-local-128", strided.clone()),
    ];
    for density in [0.05, 0.1, 0.25, 0.5] {
        cases.push(plain(
            &format!("block-random-{density}"),
            KeyPattern {
                blocks: Some(random_layout(n, density)),
                ..KeyPattern::default()
            },
        ));
    }
    // The last 30% of every row's keys are padding.
    cases.push(MaskCase {
        name: "key-padding-30".into(),
        pattern: KeyPattern::default(),
        valid_keys: Some(n - 3 * n / 10),
        documents: None,
        modifiers: ScoreModifiers::default(),
    });
    // The strided case with the same padding (band calls on the block-sparse kernels).
    cases.push(MaskCase {
        name: "strided-64-local-128-padding-30".into(),
        valid_keys: Some(n - 3 * n / 10),
        ..plain("", strided.clone())
    });
    cases.push(MaskCase {
        name: "documents-8".into(),
        pattern: KeyPattern::default(),
        valid_keys: None,
        documents: Some(document_ids(n, 8)),
        modifiers: ScoreModifiers::default(),
    });
    // Score modifiers on the dense call: their cost over the plain kernel (no peer rows).
    for (name, modifiers) in [
        (
            "alibi",
            ScoreModifiers {
                alibi: true,
                softcap: None,
            },
        ),
        (
            "softcap-30",
            ScoreModifiers {
                alibi: false,
                softcap: Some(30.0),
            },
        ),
    ] {
        cases.push(MaskCase {
            modifiers,
            ..plain(name, KeyPattern::default())
        });
    }
    cases
}

/// The document id of every position of `n`, `documents` runs of hashed lengths summing
/// to `n`: weights `1 + splitmix64(LAYOUT_SEED + 1 + k) % 1000`, document `k` ending at
/// `n * (w_0 + .. + w_k) / (w_0 + .. + w_last)` (integer division), as the peer script.
pub fn document_ids(n: usize, documents: u64) -> Vec<i64> {
    let weights: Vec<u64> = (0..documents)
        .map(|k| 1 + splitmix64(LAYOUT_SEED + 1 + k) % 1000)
        .collect();
    let total: u64 = weights.iter().sum();
    let ends: Vec<usize> = weights
        .iter()
        .scan(0, |sum, w| {
            *sum += w;
            Some((n as u64 * *sum / total) as usize)
        })
        .collect();
    (0..n)
        .map(|p| {
            ends.iter()
                .position(|&end| p < end)
                .unwrap_or(ends.len() - 1) as i64
        })
        .collect()
}

/// Visible (query, key) pairs of one (batch, head) under the case's mask.
fn visible_pairs(case: &MaskCase, n: usize) -> f64 {
    let keys = case.valid_keys.unwrap_or(n);
    let count: usize = (0..n)
        .map(|i| {
            (0..keys)
                .filter(|&j| {
                    case.pattern.visible(i, j, n, n)
                        && case.documents.as_ref().is_none_or(|d| d[i] == d[j])
                })
                .count()
        })
        .sum();
    count as f64
}

/// Runs `masks` with `args`.
pub fn masks(args: MasksArgs) -> Result<(), String> {
    if args.calls == 0 || args.repeats == 0 {
        return Err("--calls and --repeats take at least 1".into());
    }
    let peers = args.peers.as_deref().map(load_peers).transpose()?;
    let device = crate::device::device_for(args.backend, args.dtype)?;
    let (b, h, n, d) = (args.batch, args.heads, args.seq, args.head_dim);
    let mut rows = Vec::new();
    let mut dense_ms = None;
    for case in cases(n) {
        if args
            .only
            .as_ref()
            .is_some_and(|only| !case.name.contains(only.as_str()) && case.name != "full")
        {
            continue;
        }
        let pairs = visible_pairs(&case, n);
        let device = if args.backward {
            device.clone().autodiff()
        } else {
            device.clone()
        };
        let rand = || Tensor::<4>::random([b, h, n, d], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, w) = (rand(), rand(), rand(), rand());
        let padding = case.valid_keys.map(|valid| {
            let flags: Vec<bool> = (0..b * n).map(|at| at % n >= valid).collect();
            Tensor::<2, Bool>::from_data(TensorData::new(flags, [b, n]), &device)
        });
        let documents = case.documents.as_ref().map(|ids| {
            let ids: Vec<i64> = (0..b).flat_map(|_| ids.iter().copied()).collect();
            // Checked once, as a model checks a batch's ids for all its layers.
            DocumentIds::self_attention(Tensor::<2, Int>::from_data(
                TensorData::new(ids, [b, n]),
                &device,
            ))
            .checked()
            .expect("the bench's ids do not decrease")
        });
        let masks = AttentionMasks {
            key_padding: padding,
            documents,
            alibi: case.modifiers.alibi.then(|| alibi_slopes(h)),
            softcap: case.modifiers.softcap,
            ..AttentionMasks::default()
        };
        let log = DispatchLog::new();
        // The pattern's plan is built once, as FlexAttention's block mask is (the peer
        // builds it outside its timed calls). The document ids hold their plan after the
        // first call; key padding's is built per call (on the device, reading nothing back).
        let options = AttentionOptions::default()
            .with_log(log.clone())
            .with_block_mask_cache(BlockMaskCache::new());
        let call = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| {
            masked_attention(q, k, v, &case.pattern, &options, &masks)
        };
        let forward = median_ms(&device, args.repeats, args.calls, || {
            let _ = call(q.clone(), k.clone(), v.clone());
        });
        let backward = args.backward.then(|| {
            let step = median_ms(&device, args.repeats, args.calls, || {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = call(q.clone(), k.clone(), v.clone());
                let grads = (out * w.clone()).sum().backward();
                let _ = (q.grad(&grads), k.grad(&grads), v.grad(&grads));
            });
            step - forward
        });
        let served = |pass| {
            log.of(pass)
                .last()
                .map_or("-".to_string(), |d| format!("{:?}", d.served))
        };
        let fraction = pairs / (n * n) as f64;
        if case.name == "full" {
            dense_ms = Some(forward);
        }
        let tflops = |ms: f64, factor: f64| factor * 4.0 * (b * h * d) as f64 * pairs / ms / 1e9;
        let mut line = format!(
            "{:<22} visible {:>6.2}% forward {:>8.3} ms {:>6.1} TFLOP/s",
            case.name,
            100.0 * fraction,
            forward,
            tflops(forward, 1.0)
        );
        if let Some(ms) = backward {
            line += &format!(" | backward {ms:>8.3} ms {:>6.1} TFLOP/s", tflops(ms, 2.5));
        }
        if let Some(dense) = dense_ms.filter(|_| case.name != "full") {
            line += &format!(
                " | forward / (visible x dense) {:.2}",
                forward / (fraction * dense)
            );
        }
        line += &format!(
            " [{} / {}]",
            served(Pass::Forward),
            if args.backward {
                served(Pass::Backward)
            } else {
                "-".into()
            }
        );
        println!("{line}");
        if let Some(peers) = &peers {
            for (pass, ours) in [("", Some(forward)), ("-bwd", backward)] {
                let Some(ours) = ours else { continue };
                for peer in matching(peers, &case.name, pass, &args) {
                    let peer_pairs = peer.visible_pairs.unwrap_or(f64::NAN);
                    // A ratio compares the same work only: the masks must show as many pairs.
                    if peer_pairs == pairs {
                        println!(
                            "  {}{pass}: ours / {} = {:.2} (visible pairs {pairs:.0} on both sides)",
                            case.name,
                            peer.kind,
                            ours / peer.ms
                        );
                    } else {
                        println!(
                            "  {}{pass}: no ratio to {}: visible pairs differ (ours {pairs:.0}, \
                             peer {peer_pairs:.0})",
                            case.name, peer.kind
                        );
                    }
                }
            }
        }
        rows.push(serde_json::json!({
            "case": case.name, "b": b, "h": h, "n": n, "d": d, "dtype": args.dtype.name(),
            "visible_pairs": pairs, "forward_ms": forward, "backward_ms": backward,
            "served_forward": served(Pass::Forward), "served_backward": served(Pass::Backward),
        }));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The peer's records of a case (`pass`: "" forward, "-bwd" backward) on the same shape.
fn matching<'a>(
    peers: &'a [PeerRecord],
    name: &str,
    pass: &str,
    args: &MasksArgs,
) -> Vec<&'a PeerRecord> {
    peers
        .iter()
        .filter(|p| {
            p.kind == format!("flex-{name}{pass}")
                && (p.b, p.h, p.n, p.d) == (args.batch, args.heads, args.seq, args.head_dim)
                && dtype_name(&p.dtype) == args.dtype.name()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first positions of the 8 documents of 16384 positions, as the peer script
    /// computes them.
    const DOCUMENT_STARTS: [usize; 8] = [0, 4575, 8192, 11293, 11901, 12603, 14230, 14931];

    /// The layouts' hash, the active blocks at each density and the documents, as the
    /// peer script computes them (`scripts/peers/flex_masks.py`, values printed by its
    /// functions).
    #[test]
    fn random_layouts_match_the_peer_script() {
        let hashes: Vec<u64> = (0..3).map(|at| splitmix64(LAYOUT_SEED ^ at)).collect();
        assert_eq!(
            hashes,
            [
                0x09f1_fd9d_03f0_a9b4,
                0xbe3f_90b2_0967_4eec,
                0x3ac7_a8cc_f709_f1cb
            ]
        );
        for (density, active) in [(0.05, 838), (0.1, 1652), (0.25, 4189), (0.5, 8281)] {
            let layout = random_layout(16384, density);
            assert_eq!(layout.active.iter().filter(|&&a| a).count(), active);
        }
        // The first position of each document.
        let ids = document_ids(16384, 8);
        let starts: Vec<usize> = (0..8)
            .map(|d| ids.iter().position(|&id| id == d).unwrap())
            .collect();
        assert_eq!(starts, DOCUMENT_STARTS);
    }
}
