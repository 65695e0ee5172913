//! The tiled online-softmax attention built from Burn tensor ops.
//!
//! This is the FlashAttention algorithm expressed with tensor operations, for backends
//! without a kernel (and for what the kernels do not cover: strided columns, block
//! layouts, key padding, additive biases, dropout). It walks query blocks; for each it
//! visits only the key tiles the [`KeyPattern`] can make visible, keeps a running max and
//! sum per row, and never holds more than a `block_q x block_k` tile of scores. Extra
//! memory is O(seq * block) beyond the inputs and output.

use core::ops::Range;

use burn::tensor::{backend::Backend, Bool, Distribution, Tensor};

use crate::pattern::{KeyPattern, TileCover};
use crate::shape::{repeat_kv, AttentionShape};

/// Default query/key tile of the tensor-op path.
pub const DEFAULT_TILE: usize = 64;

/// An additive bias on the scores of a tile, for mechanisms that weight keys (learned
/// gates, soft window edges). `-inf` hides a key.
pub trait TileBias<B: Backend> {
    /// The bias of queries `rows` x keys `cols`, broadcastable to `[batch, heads, rows, cols]`
    /// (a size-1 batch or head dimension is expanded).
    fn bias(&self, rows: Range<usize>, cols: Range<usize>) -> Tensor<B, 4>;
}

/// Everything the tiled path can apply beyond plain exact attention.
pub struct TiledSpec<'a, B: Backend> {
    /// Which keys each query sees.
    pub pattern: &'a KeyPattern,
    /// Multiplier of `q . k`.
    pub scale: f64,
    /// Query rows per tile (the layout's block size when the pattern has one).
    pub block_q: usize,
    /// Key columns per tile (the layout's block size when the pattern has one).
    pub block_k: usize,
    /// `[batch, seq_k]`, `true` where the key is padding and must be hidden.
    pub key_padding: Option<Tensor<B, 2, Bool>>,
    /// An additive score bias.
    pub bias: Option<&'a dyn TileBias<B>>,
    /// Dropout probability on the attention probabilities, applied only when the backend
    /// tracks gradients (training).
    pub dropout: f64,
}

impl<'a, B: Backend> TiledSpec<'a, B> {
    /// A spec with the pattern's tiles (or [`DEFAULT_TILE`]) and nothing else.
    pub fn new(pattern: &'a KeyPattern, scale: f64) -> Self {
        let (block_q, block_k) = pattern
            .blocks
            .as_ref()
            .map_or((DEFAULT_TILE, DEFAULT_TILE), |b| (b.block_q, b.block_k));
        Self {
            pattern,
            scale,
            block_q,
            block_k,
            key_padding: None,
            bias: None,
            dropout: 0.0,
        }
    }

    /// Sets the tile sizes; ignored when the pattern has a block layout (tiles must match
    /// its blocks).
    pub fn with_tile(mut self, tile: usize) -> Self {
        if self.pattern.blocks.is_none() {
            self.block_q = tile.max(1);
            self.block_k = tile.max(1);
        }
        self
    }
}

/// Output `[batch, heads, seq_q, value_dim]` and row log-sum-exp `[batch, heads, seq_q]`
/// (`-inf` for rows that see no key, whose output is exactly 0).
pub fn tiled_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: &TiledSpec<'_, B>,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let shape = AttentionShape::of(&q, &k, &v).unwrap_or_else(|e| panic!("burn-attn: {e}"));
    let AttentionShape {
        batch,
        heads,
        seq_q,
        seq_k,
        value_dim,
        ..
    } = shape;
    let device = q.device();
    let k = repeat_kv(k, heads);
    let v = repeat_kv(v, heads);
    // Scaling q once is cheaper than scaling every tile of scores.
    let q = q * spec.scale;
    let training = spec.dropout > 0.0 && B::ad_enabled(&device);

    let mut outputs = Vec::new();
    let mut lses = Vec::new();
    let mut start = 0;
    while start < seq_q {
        let rows = start..(start + spec.block_q).min(seq_q);
        start = rows.end;
        let nr = rows.len();
        let q_blk = q.clone().slice([0..batch, 0..heads, rows.clone()]);

        let mut m: Option<Tensor<B, 4>> = None;
        let mut l = Tensor::<B, 4>::zeros([batch, heads, nr, 1], &device);
        let mut acc = Tensor::<B, 4>::zeros([batch, heads, nr, value_dim], &device);

        let keys = spec.pattern.key_range(rows.clone(), seq_q, seq_k);
        // Key tiles are aligned to multiples of block_k so they match block layouts.
        let mut col = keys.start - keys.start % spec.block_k.max(1);
        while col < keys.end {
            let cols = col..(col + spec.block_k).min(seq_k);
            col = cols.end;
            let cover = spec
                .pattern
                .classify(rows.clone(), cols.clone(), seq_q, seq_k);
            if cover == TileCover::Empty {
                continue;
            }
            let nc = cols.len();
            let k_blk = k.clone().slice([0..batch, 0..heads, cols.clone()]);
            let v_blk = v.clone().slice([0..batch, 0..heads, cols.clone()]);
            let mut s = q_blk.clone().matmul(k_blk.swap_dims(2, 3));
            if let Some(bias) = spec.bias {
                s = s + bias
                    .bias(rows.clone(), cols.clone())
                    .expand([batch, heads, nr, nc]);
            }
            let mut hidden: Option<Tensor<B, 4, Bool>> = None;
            if cover == TileCover::Partial {
                let visible =
                    spec.pattern
                        .tile_mask::<B>(rows.clone(), cols.clone(), seq_q, seq_k, &device);
                hidden = Some(
                    visible
                        .bool_not()
                        .reshape([1, 1, nr, nc])
                        .expand([batch, heads, nr, nc]),
                );
            }
            if let Some(pad) = &spec.key_padding {
                let pad = pad
                    .clone()
                    .slice([0..batch, cols.clone()])
                    .reshape([batch, 1, 1, nc])
                    .expand([batch, heads, nr, nc]);
                hidden = Some(match hidden {
                    Some(h) => h.bool_or(pad),
                    None => pad,
                });
            }
            if let Some(h) = hidden {
                s = s.mask_fill(h, f32::NEG_INFINITY);
            }

            // Online softmax: rescale what was accumulated to the new running max. A row
            // whose max is still -inf uses 0 as its shift, so exp gives 0, never NaN.
            let tile_max = s.clone().max_dim(3);
            let m_old = m.take();
            let m_new = match &m_old {
                Some(m_old) => m_old.clone().max_pair(tile_max),
                None => tile_max,
            };
            let shift = safe_shift(m_new.clone());
            let p = (s - shift.clone()).exp();
            if let Some(m_old) = m_old {
                let alpha = (m_old - shift).exp();
                l = l * alpha.clone();
                acc = acc * alpha;
            }
            l = l + p.clone().sum_dim(3);
            let p_drop = if training {
                let keep = p.random_like(Distribution::Bernoulli(1.0 - spec.dropout));
                p.clone() * keep / (1.0 - spec.dropout)
            } else {
                p
            };
            acc = acc + p_drop.matmul(v_blk);
            m = Some(m_new);
        }

        let (out, lse) = match m {
            Some(m) => {
                // l is 0 only where the row saw nothing; acc is 0 there too, so the clamp
                // turns 0/0 into 0.
                let out = acc / l.clone().clamp_min(f32::MIN_POSITIVE);
                let lse = safe_shift(m) + l.log();
                (out, lse)
            }
            None => (
                acc,
                Tensor::<B, 4>::full([batch, heads, nr, 1], f32::NEG_INFINITY, &device),
            ),
        };
        outputs.push(out);
        lses.push(lse);
    }
    if outputs.is_empty() {
        return (
            Tensor::zeros([batch, heads, 0, value_dim], &device),
            Tensor::zeros([batch, heads, 0], &device),
        );
    }
    let out = Tensor::cat(outputs, 2);
    let lse = Tensor::cat(lses, 2).squeeze_dim(3);
    (out, lse)
}

/// The shift used in `exp(s - shift)`: the running max, with `-inf` replaced by 0.
fn safe_shift<B: Backend>(m: Tensor<B, 4>) -> Tensor<B, 4> {
    let empty = m.clone().equal_elem(f32::NEG_INFINITY);
    m.mask_fill(empty, 0.0)
}
