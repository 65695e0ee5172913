//! The tiled online-softmax attention built from Burn tensor ops.
//!
//! This is the FlashAttention algorithm expressed with tensor operations, for backends
//! without a kernel (and for what the kernels do not cover: strided columns, block
//! layouts, key padding, additive biases, dropout). It walks query blocks; for each it
//! visits only the key tiles the [`KeyPattern`] can make visible, keeps a running max and
//! sum per row, and never holds more than a `block_q x block_k` tile of scores. Extra
//! memory is O(seq * block) beyond the inputs and output.

use core::ops::Range;

use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData};

use crate::error::OrPanic;
use crate::pattern::{tile_span, KeyPattern, TileCover};
use crate::shape::{repeat_kv, AttentionShape};

/// Default query/key tile of the tensor-op path.
pub const DEFAULT_TILE: usize = 64;

/// An additive bias on the scores of a tile, for mechanisms that weight keys (learned
/// gates, soft window edges). `-inf` hides a key.
pub trait TileBias {
    /// The bias of queries `rows` x keys `cols`, broadcastable to `[batch, heads, rows, cols]`
    /// (a size-1 batch or head dimension is expanded).
    fn bias(&self, rows: Range<usize>, cols: Range<usize>) -> Tensor<4>;
}

/// Everything the tiled path can apply beyond plain exact attention.
pub struct TiledSpec<'a> {
    /// Which keys each query sees.
    pub pattern: &'a KeyPattern,
    /// Multiplier of `q . k`.
    pub scale: f64,
    /// Query rows per tile (the layout's block size when the pattern has one).
    pub block_q: usize,
    /// Key columns per tile (the layout's block size when the pattern has one).
    pub block_k: usize,
    /// `[batch, seq_k]`, `true` where the key is padding and must be hidden.
    pub key_padding: Option<Tensor<2, Bool>>,
    /// Document ids `[batch, seq_q]` and `[batch, seq_k]`: a query sees only keys of its
    /// own document.
    pub documents: Option<(Tensor<2, Int>, Tensor<2, Int>)>,
    /// `[batch, seq_q, seq_k]`, `true` where the query must not see the key.
    pub attention_mask: Option<Tensor<3, Bool>>,
    /// An additive score bias.
    pub bias: Option<&'a dyn TileBias>,
    /// Dropout probability on the attention probabilities, applied only when the backend
    /// tracks gradients (training).
    pub dropout: f64,
    /// A tanh softcap of the scaled scores, `softcap * tanh(s / softcap)`, before the bias.
    pub softcap: Option<f64>,
}

impl<'a> TiledSpec<'a> {
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
            documents: None,
            attention_mask: None,
            bias: None,
            dropout: 0.0,
            softcap: None,
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
/// (`-inf` for rows that see no key, whose output is exactly 0). The softmax state and the
/// log-sum-exp are kept in f32 for f16/bf16 inputs (their own dtype otherwise), as in the
/// kernels; the products run in the inputs' dtype, so the scores are rounded to it before
/// the exponential (the kernels keep them in f32), and the output is returned in it.
pub fn tiled_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    spec: &TiledSpec<'_>,
) -> (Tensor<4>, Tensor<3>) {
    let shape = AttentionShape::of(&q, &k, &v).or_panic();
    let AttentionShape {
        batch,
        heads,
        seq_q,
        seq_k,
        value_dim,
        ..
    } = shape;
    let device = q.device();
    // What this path creates takes the inputs' dtype or the accumulation dtype, never the
    // backend's default float (f16/bf16 inputs on a backend whose default is f32).
    let dtype = q.dtype();
    let work = accumulation_dtype(dtype);
    let k = repeat_kv(k, heads);
    let v = repeat_kv(v, heads);
    // Scaling q once is cheaper than scaling every tile of scores.
    let q = q * spec.scale;
    let dropout = if device.is_autodiff() {
        spec.dropout
    } else {
        0.0
    };
    let pattern = spec.pattern;
    // Strided columns are gathered into extra tiles instead of visiting every key tile
    // (each of which holds a strided column); biases and block layouts are per tile range,
    // so those patterns keep the plain walk.
    let gather_strided =
        pattern.stride.is_some() && pattern.blocks.is_none() && spec.bias.is_none();

    let mut outputs = Vec::new();
    let mut lses = Vec::new();
    let mut start = 0;
    while start < seq_q {
        let rows = start..(start + spec.block_q).min(seq_q);
        start = rows.end;
        let nr = rows.len();
        let q_blk = q.clone().slice([0..batch, 0..heads, rows.clone()]);
        let mut state = RowState::new([batch, heads, nr, value_dim], (&device, work));

        let keys = if gather_strided {
            pattern.band_key_range(rows.clone(), seq_q, seq_k)
        } else {
            pattern.key_range(rows.clone(), seq_q, seq_k)
        };
        let tiles = pattern.visible_tiles(rows.clone(), keys.clone(), spec.block_k, seq_q, seq_k);
        for (cols, cover) in tiles {
            let nc = cols.len();
            let k_blk = k.clone().slice([0..batch, 0..heads, cols.clone()]);
            let v_blk = v.clone().slice([0..batch, 0..heads, cols.clone()]);
            let s = q_blk.clone().matmul(k_blk.swap_dims(2, 3)).cast(work);
            let mut s = softcapped(s, spec.softcap);
            // A bias's -inf entries hide their keys like a mask (the masked fill keeps an
            // empty row's infinite output gradient from meeting a zero probability).
            let mut bias_hidden = None;
            if let Some(bias) = spec.bias {
                let bias = bias
                    .bias(rows.clone(), cols.clone())
                    .cast(work)
                    .expand([batch, heads, nr, nc]);
                let hidden = bias.clone().equal_elem(f32::NEG_INFINITY);
                s = s + bias.mask_fill(hidden.clone(), 0.0);
                bias_hidden = Some(hidden);
            }
            let pattern_hidden = (cover == TileCover::Partial).then(|| {
                let visible = pattern.tile_mask(rows.clone(), cols.clone(), seq_q, seq_k, &device);
                hidden_keys(visible, batch, heads)
            });
            let keys = TileKeys::Range(cols.clone());
            let hidden = either_hidden(
                either_hidden(pattern_hidden, bias_hidden),
                masks_hidden(spec, &rows, &keys, heads),
            );
            state.update(s, hidden, v_blk, dropout);
        }

        if gather_strided {
            let covered = tile_span(keys, spec.block_k, seq_k);
            let extra = pattern.strided_columns_outside(rows.clone(), covered, seq_q, seq_k);
            for chunk in extra.chunks(spec.block_k.max(1)) {
                let nc = chunk.len();
                let idx: Vec<i64> = chunk.iter().map(|&c| c as i64).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [nc]), &device);
                let k_blk = k.clone().select(2, idx.clone());
                let v_blk = v.clone().select(2, idx.clone());
                let s = q_blk.clone().matmul(k_blk.swap_dims(2, 3)).cast(work);
                let s = softcapped(s, spec.softcap);
                let visible = pattern.columns_mask(rows.clone(), chunk, seq_q, seq_k, &device);
                let pattern_hidden = Some(hidden_keys(visible, batch, heads));
                let keys = TileKeys::Gathered(&idx);
                let hidden = either_hidden(pattern_hidden, masks_hidden(spec, &rows, &keys, heads));
                state.update(s, hidden, v_blk, dropout);
            }
        }

        let (out, lse) = state.finish();
        outputs.push(out);
        lses.push(lse);
    }
    if outputs.is_empty() {
        return (
            Tensor::zeros([batch, heads, 0, value_dim], (&device, dtype)),
            Tensor::zeros([batch, heads, 0], (&device, work)),
        );
    }
    let out = Tensor::cat(outputs, 2).cast(dtype);
    let lse = Tensor::cat(lses, 2).squeeze_dim(3);
    (out, lse)
}

/// The dtype the softmax state and gradients accumulate in: f32 for f16/bf16 (whose sums
/// overflow or stall over long rows), the dtype itself otherwise.
pub(crate) fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Scaled scores through a tanh softcap, where there is one.
fn softcapped(s: Tensor<4>, softcap: Option<f64>) -> Tensor<4> {
    match softcap {
        Some(cap) => s.div_scalar(cap).tanh().mul_scalar(cap),
        None => s,
    }
}

/// The key columns of a tile: a range of keys, or keys gathered by index.
enum TileKeys<'a> {
    Range(Range<usize>),
    Gathered(&'a Tensor<1, Int>),
}

impl TileKeys<'_> {
    /// `t`'s entries at these keys along `dim`.
    fn take<const D: usize, K: burn::tensor::kind::Basic>(
        &self,
        t: Tensor<D, K>,
        dim: usize,
    ) -> Tensor<D, K> {
        match self {
            TileKeys::Range(cols) => t.narrow(dim, cols.start, cols.len()),
            TileKeys::Gathered(idx) => t.select(dim, (*idx).clone()),
        }
    }
}

/// The positions of the tile (query `rows` x `keys`) that the call's masks hide (key
/// padding, other documents, the attention mask), `[batch, heads, rows, cols]`; `None`
/// where the call has none of them.
fn masks_hidden(
    spec: &TiledSpec,
    rows: &Range<usize>,
    keys: &TileKeys,
    heads: usize,
) -> Option<Tensor<4, Bool>> {
    let nr = rows.len();
    let to_heads = |t: Tensor<4, Bool>| {
        let [batch, _, _, nc] = t.dims();
        t.expand([batch, heads, nr, nc])
    };
    let padding = spec.key_padding.as_ref().map(|pad| {
        let pad = keys.take(pad.clone(), 1);
        let [batch, nc] = pad.dims();
        to_heads(pad.reshape([batch, 1, 1, nc]))
    });
    let documents = spec.documents.as_ref().map(|(doc_q, doc_k)| {
        let doc_q = doc_q.clone().narrow(1, rows.start, nr);
        let doc_k = keys.take(doc_k.clone(), 1);
        let ([batch, _], [_, nc]) = (doc_q.dims(), doc_k.dims());
        let rows = doc_q.reshape([batch, 1, nr, 1]).expand([batch, 1, nr, nc]);
        to_heads(rows.not_equal(doc_k.reshape([batch, 1, 1, nc]).expand([batch, 1, nr, nc])))
    });
    let attention = spec.attention_mask.as_ref().map(|mask| {
        let tile = keys.take(mask.clone().narrow(1, rows.start, nr), 2);
        let [batch, _, nc] = tile.dims();
        to_heads(tile.reshape([batch, 1, nr, nc]))
    });
    [padding, documents, attention]
        .into_iter()
        .fold(None, either_hidden)
}

/// Positions hidden by either of two masks.
fn either_hidden(
    a: Option<Tensor<4, Bool>>,
    b: Option<Tensor<4, Bool>>,
) -> Option<Tensor<4, Bool>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.bool_or(b)),
        (a, b) => a.or(b),
    }
}

/// `[batch, heads, rows, cols]`, `true` where the `[rows, cols]` mask `visible` hides the
/// key (the form `mask_fill` takes).
pub(crate) fn hidden_keys(visible: Tensor<2, Bool>, batch: usize, heads: usize) -> Tensor<4, Bool> {
    let [nr, nc] = visible.dims();
    visible
        .bool_not()
        .reshape([1, 1, nr, nc])
        .expand([batch, heads, nr, nc])
}

/// The running softmax state of one block of query rows.
struct RowState {
    /// Running row max (`None` before the first tile).
    max: Option<Tensor<4>>,
    /// Running sum of `exp(s - max)`, `[b, h, rows, 1]`.
    sum: Tensor<4>,
    /// Running `sum exp(s - max) v`, `[b, h, rows, value_dim]`.
    acc: Tensor<4>,
}

impl RowState {
    /// The state before any tile, in `dtype` (the accumulation dtype).
    fn new(acc_shape: [usize; 4], (device, dtype): (&Device, DType)) -> Self {
        let [b, h, rows, _] = acc_shape;
        Self {
            max: None,
            sum: Tensor::zeros([b, h, rows, 1], (device, dtype)),
            acc: Tensor::zeros(acc_shape, (device, dtype)),
        }
    }

    /// Folds in one tile of scores `s` (in the state's dtype; `hidden` set to `-inf`) with
    /// its values `v` (in the inputs' dtype, the product's).
    fn update(
        &mut self,
        s: Tensor<4>,
        hidden: Option<Tensor<4, Bool>>,
        v: Tensor<4>,
        dropout: f64,
    ) {
        let s = match hidden {
            Some(h) => s.mask_fill(h, f32::NEG_INFINITY),
            None => s,
        };
        // Rescale what was accumulated to the new running max. A row whose max is still
        // -inf uses 0 as its shift, so exp gives 0, never NaN.
        let tile_max = s.clone().max_dim(3);
        let old = self.max.take();
        let max = match &old {
            Some(old) => old.clone().max_pair(tile_max),
            None => tile_max,
        };
        let shift = safe_shift(max.clone());
        let p = (s - shift.clone()).exp();
        if let Some(old) = old {
            let alpha = (old - shift).exp();
            self.sum = self.sum.clone() * alpha.clone();
            self.acc = self.acc.clone() * alpha;
        }
        self.sum = self.sum.clone() + p.clone().sum_dim(3);
        // Dropout on the probabilities leaves the normaliser as it is.
        let p = if dropout > 0.0 {
            let keep = p.random_like(Distribution::Bernoulli(1.0 - dropout));
            p * keep / (1.0 - dropout)
        } else {
            p
        };
        let work = p.dtype();
        self.acc = self.acc.clone() + p.cast(v.dtype()).matmul(v).cast(work);
        self.max = Some(max);
    }

    /// The normalised output and the log-sum-exp, `[b, h, rows, 1]`.
    fn finish(self) -> (Tensor<4>, Tensor<4>) {
        match self.max {
            Some(max) => {
                // The sum is 0 only where the row saw nothing; acc is 0 there too, so the
                // clamp turns 0/0 into 0.
                let tiny = smallest_normal(self.sum.dtype());
                let out = self.acc / self.sum.clone().clamp_min(tiny);
                (out, safe_shift(max) + self.sum.log())
            }
            None => {
                let lse = self.sum.clone().full_like(f32::NEG_INFINITY);
                (self.acc, lse)
            }
        }
    }
}

/// The smallest positive normal value of a float dtype, for clamps that must not round to 0
/// (`f32::MIN_POSITIVE` is 0 in f16, which turns an empty row's 0 / 0 into NaN and a
/// clamped `log`'s gradient into infinity).
pub fn smallest_normal(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 6.103_515_6e-5,
        _ => f32::MIN_POSITIVE,
    }
}

/// The shift used in `exp(s - shift)`: the running max, with `-inf` replaced by 0.
fn safe_shift(m: Tensor<4>) -> Tensor<4> {
    let empty = m.clone().equal_elem(f32::NEG_INFINITY);
    m.mask_fill(empty, 0.0)
}
