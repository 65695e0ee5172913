//! A paged key/value cache: the keys and values of many sequences of different lengths in
//! one pool of fixed-size pages, each sequence holding a block table of its pages, so a
//! server decodes them in one call and frees a finished sequence's pages for the next.

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};
use burn_attn_core::{
    try_masked_attention, AttentionError, AttentionMasks, AttentionOptions, KeyPattern,
};

use crate::kv_cache::require_causal;
use crate::projection::MultiHeadProjection;
use crate::rotary::rotate;

/// One sequence of a [`PagedKvCache`], from [`PagedKvCache::add_sequence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SequenceId(usize);

/// A paged key/value cache for decoding many sequences of different lengths in one call
/// ([`FlashAttention::forward_paged`](crate::FlashAttention::forward_paged)).
///
/// The keys and values of every sequence live in one pool of `pages` pages of `page_size`
/// positions (`[kv_heads, pages * page_size, head_dim]`, allocated on the first call, in the
/// keys' dtype and device). Each sequence holds the list of its pages (its block table) and
/// takes a new page when its last one is full; [`PagedKvCache::remove_sequence`] returns
/// them to the pool. A call that needs more pages than are free is an error naming both
/// counts, and changes nothing.
///
/// Each call gathers its sequences' keys into one `[batch, kv_heads, longest, head_dim]`
/// tensor, shorter sequences padded at the front and their padding hidden by a key-padding
/// mask, and attends over it: a copy of the batch's keys and values per call, then the
/// attention kernels (with the padding mask, the block-sparse ones on the GPU).
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    page_size: usize,
    pages: usize,
    pool: Option<Pool>,
    /// Pages no sequence holds, taken from the end.
    free: Vec<usize>,
    /// By [`SequenceId`]; `None` once removed.
    sequences: Vec<Option<Sequence>>,
}

/// The pool's keys and values, `[kv_heads, pages * page_size, dim]`.
#[derive(Debug, Clone)]
struct Pool {
    keys: Tensor<3>,
    values: Tensor<3>,
}

/// One sequence's block table and length.
#[derive(Debug, Clone, Default)]
struct Sequence {
    pages: Vec<usize>,
    len: usize,
}

/// What a call attends over: its sequences' keys and values gathered from the pool
/// (`[batch, kv_heads, longest, dim]`, shorter sequences padded at the front) and the mask
/// of that padding (`[batch, longest]`, `true` where padded; `None` when every sequence is
/// as long as the longest).
pub(crate) struct PagedKeys {
    pub keys: Tensor<4>,
    pub values: Tensor<4>,
    pub padding: Option<Tensor<2, Bool>>,
}

impl PagedKvCache {
    /// An empty cache of `pages` pages of `page_size` positions each (both at least 1; the
    /// pool's positions are indexed in 32 bits on every backend).
    pub fn new(pages: usize, page_size: usize) -> Result<Self, AttentionError> {
        if pages == 0 || page_size == 0 || pages.saturating_mul(page_size) > i32::MAX as usize {
            return Err(AttentionError::Invalid(format!(
                "a paged cache needs at least one page of at least one position and at most \
                 {} positions in all, got {pages} pages of {page_size}",
                i32::MAX
            )));
        }
        Ok(Self {
            page_size,
            pages,
            pool: None,
            free: (0..pages).rev().collect(),
            sequences: Vec::new(),
        })
    }

    /// Positions per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages no sequence holds.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SequenceId {
        self.sequences.push(Some(Sequence::default()));
        SequenceId(self.sequences.len() - 1)
    }

    /// Removes a sequence and returns its pages to the pool.
    pub fn remove_sequence(&mut self, id: SequenceId) -> Result<(), AttentionError> {
        self.sequence(id)?;
        let sequence = self.sequences[id.0].take().expect("checked above");
        self.free.extend(sequence.pages.iter().rev());
        Ok(())
    }

    /// Tokens a sequence holds (the position of its next token), `None` for an id this
    /// cache never gave or has removed.
    pub fn sequence_len(&self, id: SequenceId) -> Option<usize> {
        self.sequences.get(id.0)?.as_ref().map(|s| s.len)
    }

    fn sequence(&self, id: SequenceId) -> Result<&Sequence, AttentionError> {
        self.sequences
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                AttentionError::Invalid(format!(
                    "sequence {} is not in this paged cache (never added, or removed)",
                    id.0
                ))
            })
    }

    /// The lengths of `ids`' sequences, checked: every id held, none twice.
    pub(crate) fn lengths(&self, ids: &[SequenceId]) -> Result<Vec<usize>, AttentionError> {
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(AttentionError::Invalid(format!(
                    "sequence {} appears twice in one call",
                    id.0
                )));
            }
        }
        ids.iter().map(|&id| Ok(self.sequence(id)?.len)).collect()
    }

    /// An error naming the counts when `new` more tokens for each of `ids` (whose lengths
    /// [`PagedKvCache::lengths`] gave) need more pages than are free.
    pub(crate) fn check_room(
        &self,
        ids: &[SequenceId],
        lengths: &[usize],
        new: usize,
    ) -> Result<(), AttentionError> {
        let needed: usize = lengths
            .iter()
            .zip(ids)
            .map(|(&len, &id)| {
                let held = self.sequences[id.0].as_ref().map_or(0, |s| s.pages.len());
                (len + new).div_ceil(self.page_size).saturating_sub(held)
            })
            .sum();
        if needed > self.free.len() {
            return Err(AttentionError::Invalid(format!(
                "the paged cache has {} free pages of {}; this call needs {needed} more",
                self.free.len(),
                self.page_size
            )));
        }
        Ok(())
    }

    /// Appends a call's keys and values (`[batch, kv_heads, new, dim]`, row `b` to sequence
    /// `ids[b]`) and returns every key and value of those sequences ([`PagedKeys`]).
    pub(crate) fn append(
        &mut self,
        ids: &[SequenceId],
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<PagedKeys, AttentionError> {
        let [batch, kv_heads, new, dim] = k.dims();
        let value_dim = v.dims()[3];
        if ids.len() != batch || v.dims()[..3] != [batch, kv_heads, new] {
            return Err(AttentionError::Invalid(format!(
                "{} sequence ids for keys {:?} and values {:?} (one id per batch row)",
                ids.len(),
                k.dims(),
                v.dims()
            )));
        }
        let lengths = self.lengths(ids)?;
        if let Some(pool) = &self.pool {
            check_pool("keys", &pool.keys, &k)?;
            check_pool("values", &pool.values, &v)?;
        }
        self.check_room(ids, &lengths, new)?;
        for (&len, &id) in lengths.iter().zip(ids) {
            let pages = (len + new).div_ceil(self.page_size);
            let sequence = self.sequences[id.0].as_mut().expect("checked above");
            while sequence.pages.len() < pages {
                sequence.pages.push(self.free.pop().expect("counted above"));
            }
            sequence.len = len + new;
        }

        // The new tokens' slots, batch-major as the flattened rows below.
        let written: Vec<i64> = ids
            .iter()
            .zip(&lengths)
            .flat_map(|(&id, &len)| (len..len + new).map(move |t| (id, t)))
            .map(|(id, t)| self.slot(id, t))
            .collect();
        // The call's block tables (`[batch, pages of the longest]`, short ones repeating
        // their first page) and front padding, from which the device derives every slot.
        let longest = lengths.iter().map(|len| len + new).max().unwrap_or(0);
        let table_width = longest.div_ceil(self.page_size);
        let table: Vec<i64> = ids
            .iter()
            .flat_map(|&id| {
                let pages = &self.sequences[id.0].as_ref().expect("held").pages;
                (0..table_width).map(move |i| *pages.get(i).unwrap_or(&pages[0]) as i64)
            })
            .collect();
        let pads: Vec<i64> = lengths
            .iter()
            .map(|len| (longest - (len + new)) as i64)
            .collect();
        let padded = pads.iter().any(|&pad| pad > 0);

        let device = k.device();
        let slots = self.pages * self.page_size;
        let pool = self.pool.get_or_insert_with(|| Pool {
            keys: Tensor::zeros([kv_heads, slots, dim], (&device, k.dtype())),
            values: Tensor::zeros([kv_heads, slots, value_dim], (&device, v.dtype())),
        });
        let written = index_tensor(written, &device);
        let rows = |t: Tensor<4>| {
            let d = t.dims()[3];
            t.swap_dims(0, 1).reshape([kv_heads, batch * new, d])
        };
        pool.keys =
            pool.keys
                .clone()
                .select_assign(1, written.clone(), rows(k), IndexingUpdateOp::Assign);
        pool.values =
            pool.values
                .clone()
                .select_assign(1, written, rows(v), IndexingUpdateOp::Assign);

        // Key `j` of row `b` is position `j - pad_b` of its sequence (position 0 where
        // padded, hidden by the mask).
        let columns = Tensor::<1, Int>::arange(0..longest as i64, &device)
            .reshape([1, longest])
            .expand([batch, longest]);
        let pads = Tensor::<2, Int>::from_data(TensorData::new(pads, [batch, 1]), &device)
            .expand([batch, longest]);
        let positions = (columns.clone() - pads.clone()).clamp_min(0);
        let table =
            Tensor::<2, Int>::from_data(TensorData::new(table, [batch, table_width]), &device);
        let gathered = (table.gather(1, positions.clone().div_scalar(self.page_size as i64))
            * self.page_size as i64
            + positions.remainder_scalar(self.page_size as i64))
        .reshape([batch * longest]);
        let heads = |pool: &Tensor<3>| {
            let d = pool.dims()[2];
            pool.clone()
                .select(1, gathered.clone())
                .reshape([kv_heads, batch, longest, d])
                .swap_dims(0, 1)
        };
        Ok(PagedKeys {
            keys: heads(&pool.keys),
            values: heads(&pool.values),
            padding: padded.then(|| columns.lower(pads)),
        })
    }

    /// The pool slot of position `t` of sequence `id` (which holds its page).
    fn slot(&self, id: SequenceId, t: usize) -> i64 {
        let sequence = self.sequences[id.0].as_ref().expect("a held sequence");
        (sequence.pages[t / self.page_size] * self.page_size + t % self.page_size) as i64
    }
}

/// Pool slots as an index tensor on `device`.
fn index_tensor(indices: Vec<i64>, device: &burn::tensor::Device) -> Tensor<1, Int> {
    let len = indices.len();
    Tensor::<1, Int>::from_data(TensorData::new(indices, [len]), device)
}

/// Checks that a call's keys or values match the pool in heads, dim, dtype and device.
fn check_pool(what: &str, pool: &Tensor<3>, new: &Tensor<4>) -> Result<(), AttentionError> {
    let ([ph, _, pd], [_, nh, _, nd]) = (pool.dims(), new.dims());
    if (ph, pd) != (nh, nd) || pool.dtype() != new.dtype() || pool.device() != new.device() {
        return Err(AttentionError::Invalid(format!(
            "the paged cache's {what} have {ph} heads of {pd} {:?} on {:?}; this call's are \
             {:?} {:?} on {:?} (a cache serves one module)",
            pool.dtype(),
            pool.device(),
            new.dims(),
            new.dtype(),
            new.device()
        )));
    }
    Ok(())
}

/// Decoding through a paged cache for the exact modules: projects the new tokens `x`
/// (`[batch, new, d_model]`, row `b` of sequence `ids[b]`), rotates them at each sequence's
/// own positions (base `rotary`), appends their keys and values and attends the new queries
/// over their sequences' keys under `pattern`, `options` and `masks`, bottom-right aligned
/// (the shorter sequences' front padding hidden). Only causal attention decodes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_paged(
    projection: &MultiHeadProjection,
    x: Tensor<3>,
    cache: &mut PagedKvCache,
    ids: &[SequenceId],
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &AttentionMasks,
    rotary: Option<f32>,
) -> Result<Tensor<3>, AttentionError> {
    require_causal(pattern, options, "a paged cache")?;
    if masks.key_padding.is_some() || masks.documents.is_some() || masks.attention_mask.is_some() {
        return Err(AttentionError::Invalid(
            "a paged cache masks its own padding: masks tied to a length do not apply".into(),
        ));
    }
    projection.check_tokens(&x)?;
    if x.dims()[0] != ids.len() {
        return Err(AttentionError::Invalid(format!(
            "{} sequence ids for input {:?} (one id per batch row)",
            ids.len(),
            x.dims()
        )));
    }
    let starts = cache.lengths(ids)?;
    let h = projection.split_self(x);
    let (q, k) = match rotary {
        Some(theta) => (
            rotate_rows(h.q, &starts, theta),
            rotate_rows(h.k, &starts, theta),
        ),
        None => (h.q, h.k),
    };
    let paged = cache.append(ids, k, h.v)?;
    let masks = AttentionMasks {
        key_padding: paged.padding,
        ..masks.clone()
    };
    let out = try_masked_attention(q, paged.keys, paged.values, pattern, options, &masks)?;
    Ok(projection.merge(out))
}

/// [`decode_paged`] where sequences may need different patterns: `pattern_of(len)` gives the
/// pattern of a sequence of `len` tokens after the call and the key of its group (rows of
/// one key share one call, so the key must tell apart patterns that front padding would
/// change). Rows come back in input order; the room for every row is checked before any
/// call, so an error leaves the cache unchanged (the patterns' errors too).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_paged_grouped<K: PartialEq>(
    projection: &MultiHeadProjection,
    x: Tensor<3>,
    cache: &mut PagedKvCache,
    ids: &[SequenceId],
    options: &AttentionOptions,
    masks: &AttentionMasks,
    rotary: Option<f32>,
    pattern_of: impl Fn(usize) -> Result<(K, KeyPattern), AttentionError>,
) -> Result<Tensor<3>, AttentionError> {
    projection.check_tokens(&x)?;
    let [batch, new, _] = x.dims();
    if batch != ids.len() {
        return Err(AttentionError::Invalid(format!(
            "{} sequence ids for input {:?} (one id per batch row)",
            ids.len(),
            x.dims()
        )));
    }
    let lengths = cache.lengths(ids)?;
    cache.check_room(ids, &lengths, new)?;
    let mut calls: Vec<(K, KeyPattern, Vec<usize>)> = Vec::new();
    for (row, &len) in lengths.iter().enumerate() {
        let (key, pattern) = pattern_of(len + new)?;
        match calls.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, _, rows)) => rows.push(row),
            None => calls.push((key, pattern, vec![row])),
        }
    }
    if let [(_, pattern, _)] = &calls[..] {
        return decode_paged(projection, x, cache, ids, pattern, options, masks, rotary);
    }
    let device = x.device();
    let index = |rows: &[usize]| {
        let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let n = rows.len();
        Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device)
    };
    let mut order: Vec<usize> = Vec::with_capacity(batch);
    let mut parts = Vec::with_capacity(calls.len());
    for (_, pattern, rows) in &calls {
        let call_ids: Vec<SequenceId> = rows.iter().map(|&r| ids[r]).collect();
        let rows_x = x.clone().select(0, index(rows));
        parts.push(decode_paged(
            projection, rows_x, cache, &call_ids, pattern, options, masks, rotary,
        )?);
        order.extend(rows);
    }
    // Row `order[i]` of the input is row `i` of the calls' outputs in turn.
    let mut back = vec![0usize; batch];
    for (i, &row) in order.iter().enumerate() {
        back[row] = i;
    }
    Ok(Tensor::cat(parts, 0).select(0, index(&back)))
}

/// `x` (`[batch, heads, new, dim]`) rotated with row `b` at positions `starts[b]..`.
fn rotate_rows(x: Tensor<4>, starts: &[usize], theta: f32) -> Tensor<4> {
    if starts.windows(2).all(|w| w[0] == w[1]) {
        return rotate(x, starts.first().copied().unwrap_or(0), theta);
    }
    let rows = starts
        .iter()
        .enumerate()
        .map(|(b, &start)| rotate(x.clone().narrow(0, b, 1), start, theta))
        .collect();
    Tensor::cat(rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{FlashAttention, FlashAttentionConfig};

    fn module(window_left: Option<usize>, rotary: Option<f32>, alibi: bool) -> FlashAttention {
        FlashAttentionConfig::new(32, 4)
            .with_n_kv_heads(Some(2))
            .with_causal(true)
            .with_window_left(window_left)
            .with_rotary_theta(rotary)
            .with_alibi(alibi)
            .init(&cpu())
    }

    /// Three sequences of different lengths, each filled alone, then decoded together one
    /// token at a time: every row equals its sequence's full causal forward.
    #[test]
    fn paged_decoding_equals_each_sequence_alone() {
        let prompts = [7, 3, 12];
        // One token a call, then three together (front padding under several new rows).
        let (steps, together) = (5, 3);
        let xs: Vec<_> = prompts
            .iter()
            .map(|&p| randn([1, p + steps + together, 32], &cpu()))
            .collect();
        for (window_left, rotary, alibi) in [
            (None, None, false),
            (None, Some(100.0), false),
            (Some(4), Some(100.0), false),
            (None, None, true),
        ] {
            let m = module(window_left, rotary, alibi);
            let mut cache = PagedKvCache::new(16, 4).unwrap();
            let ids: Vec<_> = prompts.iter().map(|_| cache.add_sequence()).collect();
            let mut got: Vec<Vec<Tensor<3>>> = vec![Vec::new(); prompts.len()];
            for (s, &p) in prompts.iter().enumerate() {
                let prompt = xs[s].clone().slice([0..1, 0..p, 0..32]);
                got[s].push(m.forward_paged(prompt, &mut cache, &[ids[s]]));
            }
            for step in 0..steps {
                let x = Tensor::cat(
                    prompts
                        .iter()
                        .enumerate()
                        .map(|(s, &p)| xs[s].clone().slice([0..1, p + step..p + step + 1, 0..32]))
                        .collect(),
                    0,
                );
                let out = m.forward_paged(x, &mut cache, &ids);
                for (s, rows) in got.iter_mut().enumerate() {
                    rows.push(out.clone().narrow(0, s, 1));
                }
            }
            let x = Tensor::cat(
                prompts
                    .iter()
                    .enumerate()
                    .map(|(s, &p)| {
                        xs[s]
                            .clone()
                            .slice([0..1, p + steps..p + steps + together, 0..32])
                    })
                    .collect(),
                0,
            );
            let out = m.forward_paged(x, &mut cache, &ids);
            for (s, rows) in got.iter_mut().enumerate() {
                rows.push(out.clone().narrow(0, s, 1));
            }
            for (s, rows) in got.into_iter().enumerate() {
                let want = m.forward(xs[s].clone());
                assert_close(Tensor::cat(rows, 1), want, 1e-5);
                assert_eq!(
                    cache.sequence_len(ids[s]),
                    Some(prompts[s] + steps + together)
                );
            }
            // 15, 11 and 20 positions: 4 + 3 + 5 pages of 4.
            assert_eq!(cache.free_pages(), 16 - 12);
        }
    }

    /// Two sequences (13 and 9 tokens; prompts of 10 and 6, then 3 tokens each together)
    /// through `forward`, pages of 3: each sequence's rows.
    fn decode_two(
        xs: &[Tensor<3>; 2],
        forward: &dyn Fn(Tensor<3>, &mut PagedKvCache, &[SequenceId]) -> Tensor<3>,
    ) -> [Tensor<3>; 2] {
        let mut cache = PagedKvCache::new(8, 3).unwrap();
        let ids = [cache.add_sequence(), cache.add_sequence()];
        let mut rows = [Vec::new(), Vec::new()];
        for (s, prompt) in [(0, 10), (1, 6)] {
            let x = xs[s].clone().slice([0..1, 0..prompt, 0..32]);
            rows[s].push(forward(x, &mut cache, &[ids[s]]));
        }
        for step in 0..3 {
            let x = Tensor::cat(
                vec![
                    xs[0].clone().slice([0..1, 10 + step..11 + step, 0..32]),
                    xs[1].clone().slice([0..1, 6 + step..7 + step, 0..32]),
                ],
                0,
            );
            let out = forward(x, &mut cache, &ids);
            rows[0].push(out.clone().narrow(0, 0, 1));
            rows[1].push(out.narrow(0, 1, 1));
        }
        rows.map(|r| Tensor::cat(r, 1))
    }

    /// A sliding window decodes through pages, directly and as `AnyAttention`; a mechanism
    /// that cannot is named.
    #[test]
    fn sliding_window_and_any_decode_through_pages() {
        use crate::{AnyAttentionConfig, SlidingWindowAttentionConfig, SparseAttentionConfig};
        let config = SlidingWindowAttentionConfig::new(32, 4)
            .with_window(6)
            .with_causal(true)
            .with_rotary_theta(Some(100.0));
        let window = config.clone().init(&cpu());
        // Initialised on its own: other weights than `window`'s.
        let any = AnyAttentionConfig::SlidingWindow(config).init(&cpu());
        let xs = [randn([1, 13, 32], &cpu()), randn([1, 9, 32], &cpu())];
        let direct = decode_two(&xs, &|x, c, ids| window.forward_paged(x, c, ids));
        let through_any = decode_two(&xs, &|x, c, ids| any.forward_paged(x, c, ids));
        for s in 0..2 {
            assert_close(direct[s].clone(), window.forward(xs[s].clone()), 1e-5);
            assert_close(through_any[s].clone(), any.forward(xs[s].clone()), 1e-5);
        }
        let sparse = AnyAttentionConfig::Sparse(
            SparseAttentionConfig::new(32, 4)
                .with_causal(true)
                .with_pattern(crate::SparsePattern::Random {
                    density: 0.5,
                    block: 4,
                    seed: 2,
                }),
        )
        .init(&cpu());
        let mut cache = PagedKvCache::new(8, 3).unwrap();
        let id = cache.add_sequence();
        let err = sparse
            .try_forward_paged(randn([1, 2, 32], &cpu()), &mut cache, &[id])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("random sparse pattern does not decode with a paged cache"),
            "{err}"
        );
    }

    /// Too few pages is an error that changes nothing; a removed sequence's pages serve the
    /// next one; bad ids and batches are named.
    #[test]
    fn pages_are_counted_reused_and_checked() {
        let m = module(None, Some(100.0), false);
        let mut cache = PagedKvCache::new(3, 4).unwrap();
        let a = cache.add_sequence();
        let b = cache.add_sequence();
        m.forward_paged(randn([1, 8, 32], &cpu()), &mut cache, &[a]);
        assert_eq!(cache.free_pages(), 1);
        let x = randn([1, 6, 32], &cpu());
        let err = m
            .try_forward_paged(x.clone(), &mut cache, &[b])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 free pages of 4; this call needs 2 more"),
            "{err}"
        );
        assert_eq!(cache.sequence_len(b), Some(0));
        assert_eq!(cache.free_pages(), 1);

        cache.remove_sequence(a).unwrap();
        assert_eq!(cache.free_pages(), 3);
        assert_eq!(cache.sequence_len(a), None);
        let got = m.forward_paged(x.clone(), &mut cache, &[b]);
        assert_close(got, m.forward(x), 1e-5);

        let name = |result: Result<Tensor<3>, AttentionError>| result.unwrap_err().to_string();
        let one = randn([1, 1, 32], &cpu());
        let err = name(m.try_forward_paged(one.clone(), &mut cache, &[a]));
        assert!(err.contains("not in this paged cache"), "{err}");
        let c = cache.add_sequence();
        let err = name(m.try_forward_paged(randn([2, 1, 32], &cpu()), &mut cache, &[c, c]));
        assert!(err.contains("appears twice"), "{err}");
        let err = name(m.try_forward_paged(one.clone(), &mut cache, &[b, c]));
        assert!(
            err.contains("2 sequence ids") && err.contains("one id per batch row"),
            "{err}"
        );
        let full = FlashAttentionConfig::new(32, 4).init(&cpu());
        let err = name(full.try_forward_paged(one, &mut cache, &[c]));
        assert!(err.contains("causal"), "{err}");
        // No new token, no sequence, another width: errors, the cache unchanged.
        for (x, ids) in [
            (randn([1, 0, 32], &cpu()), vec![c]),
            (randn([0, 1, 32], &cpu()), vec![]),
            (randn([1, 1, 16], &cpu()), vec![c]),
        ] {
            let dims = x.dims();
            let err = name(m.try_forward_paged(x, &mut cache, &ids));
            assert!(
                err.contains("one new token") && err.contains(&format!("{:?}", dims.to_vec())),
                "{err}"
            );
            let hybrid = crate::HybridAttentionConfig::new(32, 4)
                .with_causal(true)
                .init(&cpu());
            let err = name(hybrid.try_forward_paged(randn(dims, &cpu()), &mut cache, &ids));
            assert!(err.contains("one new token"), "{err}");
            assert_eq!(cache.sequence_len(c), Some(0));
        }
        for (pages, size) in [(0, 4), (4, 0), (1 << 20, 1 << 12)] {
            let err = PagedKvCache::new(pages, size).unwrap_err().to_string();
            assert!(
                err.contains(&format!("got {pages} pages of {size}")),
                "{err}"
            );
        }
    }
}
