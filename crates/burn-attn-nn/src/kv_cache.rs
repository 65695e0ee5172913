//! The projected keys and values of the tokens decoded so far: what a causal module needs
//! to generate one token (or a few) at a time without projecting the prefix again.

use burn::tensor::Tensor;
use burn_attn_core::{
    try_masked_attention, AttentionError, AttentionMasks, AttentionOptions, KeyPattern,
};

use crate::projection::MultiHeadProjection;
use crate::rotary::rotate_heads;

/// A key/value cache for decoding with [`FlashAttention::forward_cache`] and
/// [`SlidingWindowAttention::forward_cache`]: keys and values `[batch, kv_heads, len,
/// head_dim]` (value width for values), grown by each call's new tokens.
///
/// Three kinds: [`KvCache::new`] keeps every key (memory grows with the sequence: buffers
/// that grow by half when full, so a token's append copies no earlier key on most steps,
/// and hold at most 1.5x the keys);
/// [`KvCache::with_capacity`] allocates `capacity` positions on the first call and writes
/// into them (no reallocation while decoding; a call past the capacity is an error);
/// [`KvCache::rolling`] keeps only the most recent keys a window can still see (a sliding
/// window's cache, constant memory). A cache belongs to one module and one sequence batch:
/// a call whose batch, heads, head dims, dtype or device differ from the cached keys' is an
/// error naming both.
///
/// [`FlashAttention::forward_cache`]: crate::FlashAttention::forward_cache
/// [`SlidingWindowAttention::forward_cache`]: crate::SlidingWindowAttention::forward_cache
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Keys and values held: the whole buffer, `len` of it written (a rolling cache: the
    /// keys themselves).
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
    /// Positions written.
    len: usize,
    /// Tokens appended in total (positions of the sequence so far).
    seen: usize,
    kind: CacheKind,
}

/// How a cache holds its keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum CacheKind {
    /// Every key, in buffers that grow by half when full.
    #[default]
    Growing,
    /// A buffer of this many positions, allocated on the first call.
    Capacity(usize),
    /// The most recent keys only, as many as the module's window needs.
    Rolling,
}

impl KvCache {
    /// An empty cache that keeps every key.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache of `capacity` positions, allocated on the first call.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            kind: CacheKind::Capacity(capacity),
            ..Self::default()
        }
    }

    /// An empty cache that keeps only the keys the module's window can still see.
    pub fn rolling() -> Self {
        Self {
            kind: CacheKind::Rolling,
            ..Self::default()
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the cache keeps only the keys a window still shows ([`KvCache::rolling`]).
    pub fn is_rolling(&self) -> bool {
        matches!(self.kind, CacheKind::Rolling)
    }

    /// Tokens appended since the cache was created or cleared: the position of the next
    /// token.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Drops every key (a new sequence); the kind and capacity stay.
    pub fn clear(&mut self) {
        self.keys = None;
        self.values = None;
        self.len = 0;
        self.seen = 0;
    }

    /// Appends a call's keys and values (`[batch, kv_heads, new, dim]`) and returns every
    /// key and value the call's queries may see: all held ones, or with a rolling cache and
    /// `keep` (keys before a query that its window shows) the last `keep + new`, of which
    /// the cache then keeps the last `keep`.
    pub(crate) fn append(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        keep: Option<usize>,
    ) -> Result<(Tensor<4>, Tensor<4>), AttentionError> {
        let new = k.dims()[2];
        if let (Some(held_k), Some(held_v)) = (&self.keys, &self.values) {
            check_like("keys", held_k, &k)?;
            check_like("values", held_v, &v)?;
        }
        let capacity = match self.kind {
            CacheKind::Capacity(capacity) => Some(capacity),
            CacheKind::Growing => Some(self.grow(new)),
            CacheKind::Rolling => None,
        };
        if let Some(capacity) = capacity {
            let all = self.write(k, v, capacity)?;
            self.seen += new;
            return Ok(all);
        }
        let join = |held: Option<Tensor<4>>, t: Tensor<4>| match held {
            Some(held) => Tensor::cat(vec![held, t], 2),
            None => t,
        };
        let all_k = join(self.keys.take(), k);
        let all_v = join(self.values.take(), v);
        self.seen += new;
        // (A window that keeps no earlier key holds nothing between calls.)
        let (held, out) = match (self.kind, keep) {
            (CacheKind::Rolling, Some(keep)) => (
                (keep > 0).then(|| (last(&all_k, keep), last(&all_v, keep))),
                (last(&all_k, keep + new), last(&all_v, keep + new)),
            ),
            _ => (Some((all_k.clone(), all_v.clone())), (all_k, all_v)),
        };
        self.len = held.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        (self.keys, self.values) = held.unzip();
        Ok(out)
    }

    /// The capacity a growing cache's buffers take for `new` more positions: the held
    /// one where they fit, else the held positions and the new ones, and at least half
    /// more than the held capacity (the held positions copied into the larger buffers),
    /// so that decoding a token at a time copies each key a bounded number of times (as a
    /// `Vec` grows, by less: keys are large). The first call's buffers hold its positions
    /// exactly.
    fn grow(&mut self, new: usize) -> usize {
        let held = self.keys.as_ref().map_or(0, |k| k.dims()[2]);
        if self.len + new <= held {
            return held;
        }
        let capacity = (self.len + new).max(held + held / 2);
        let len = self.len;
        let regrow = |buffer: Option<Tensor<4>>| {
            buffer.map(|buffer| {
                let [b, h, _, d] = buffer.dims();
                Tensor::<4>::zeros([b, h, capacity, d], (&buffer.device(), buffer.dtype()))
                    .slice_assign([0..b, 0..h, 0..len, 0..d], buffer.narrow(2, 0, len))
            })
        };
        self.keys = regrow(self.keys.take());
        self.values = regrow(self.values.take());
        capacity
    }

    /// Writes `k`, `v` after the held positions of a `capacity`-position buffer (allocated
    /// on the first call) and returns the written part.
    fn write(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        capacity: usize,
    ) -> Result<(Tensor<4>, Tensor<4>), AttentionError> {
        let new = k.dims()[2];
        if self.len + new > capacity {
            return Err(AttentionError::Invalid(format!(
                "the key/value cache holds {} of its {capacity} positions; {new} more do not \
                 fit",
                self.len
            )));
        }
        let at = self.len..self.len + new;
        let write = |buffer: Option<Tensor<4>>, t: Tensor<4>| {
            let [b, h, _, d] = t.dims();
            let buffer = buffer.unwrap_or_else(|| {
                Tensor::<4>::zeros([b, h, capacity, d], (&t.device(), t.dtype()))
            });
            buffer.slice_assign([0..b, 0..h, at.clone(), 0..d], t)
        };
        let buffer_k = write(self.keys.take(), k);
        let buffer_v = write(self.values.take(), v);
        self.len += new;
        let out = (
            buffer_k.clone().narrow(2, 0, self.len),
            buffer_v.clone().narrow(2, 0, self.len),
        );
        self.keys = Some(buffer_k);
        self.values = Some(buffer_v);
        Ok(out)
    }
}

/// The last `count` positions of `t` (all of them when it holds fewer; `count` and `t`
/// hold at least one).
fn last(t: &Tensor<4>, count: usize) -> Tensor<4> {
    let len = t.dims()[2];
    let count = count.min(len);
    t.clone().narrow(2, len - count, count)
}

/// Checks that a call's `new` keys or values match the cached ones in everything but length.
fn check_like(what: &str, held: &Tensor<4>, new: &Tensor<4>) -> Result<(), AttentionError> {
    let ([hb, hh, _, hd], [nb, nh, _, nd]) = (held.dims(), new.dims());
    if (hb, hh, hd) != (nb, nh, nd) || held.dtype() != new.dtype() || held.device() != new.device()
    {
        return Err(AttentionError::Invalid(format!(
            "the cached {what} are [{hb}, {hh}, _, {hd}] {:?} on {:?}; this call's are \
             {:?} {:?} on {:?} (a cache serves one module and one batch: clear it for another)",
            held.dtype(),
            held.device(),
            new.dims(),
            new.dtype(),
            new.device()
        )));
    }
    Ok(())
}

/// Decoding through `cache` for the exact modules: projects the new tokens `x` (`[batch,
/// new, d_model]`), appends their keys and values, and attends the new queries over every
/// cached key under `pattern` and `options` (bottom-right aligned: the new tokens are the
/// last positions) and `masks` (dropout, ALiBi; no mask tied to a length), with rotary
/// embeddings of base `rotary` at the tokens' positions (from the cache's). Only causal
/// attention decodes: a later token would change what an
/// earlier one sees.
pub(crate) fn decode(
    projection: &MultiHeadProjection,
    x: Tensor<3>,
    cache: &mut KvCache,
    pattern: &KeyPattern,
    options: &AttentionOptions,
    masks: &AttentionMasks,
    rotary: Option<f32>,
) -> Result<Tensor<3>, AttentionError> {
    require_causal(pattern, options, "a key/value cache")?;
    projection.check_tokens(&x)?;
    let h = rotate_heads(projection.split_self(x), rotary, cache.seen());
    let keep = pattern.window.intersect(options.window).left;
    let (k, v) = cache.append(h.k, h.v, keep)?;
    let out = try_masked_attention(h.q, k, v, pattern, options, masks)?;
    Ok(projection.merge(out))
}

/// Decoding needs causal attention: a later token would change what an earlier one sees.
/// `cache` names the cache in the error.
pub(crate) fn require_causal(
    pattern: &KeyPattern,
    options: &AttentionOptions,
    cache: &str,
) -> Result<(), AttentionError> {
    if pattern.causal || options.causal {
        return Ok(());
    }
    Err(AttentionError::Invalid(format!(
        "decoding with {cache} needs a causal module (causal: true): without it every token \
         sees later ones"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{FlashAttentionConfig, SlidingWindowAttentionConfig};

    /// Feeds `x` (`[batch, seq, d]`) through `step` in chunks of `chunk` tokens and
    /// concatenates the outputs.
    fn decode_all(
        x: &Tensor<3>,
        chunk: usize,
        mut step: impl FnMut(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let [batch, seq, d] = x.dims();
        let outs: Vec<_> = (0..seq)
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(seq);
                step(x.clone().slice([0..batch, start..end, 0..d]))
            })
            .collect();
        Tensor::cat(outs, 1)
    }

    #[test]
    fn decoding_equals_the_full_forward() {
        let x = randn([2, 23, 32], &cpu());
        // Rotary embeddings continue at the cache's position.
        for (window_left, rotary) in [
            (None, None),
            (Some(5), None),
            (None, Some(100.0)),
            (Some(5), Some(100.0)),
            // Each token sees itself only: a rolling cache holds nothing between calls.
            (Some(0), None),
        ] {
            let module = FlashAttentionConfig::new(32, 4)
                .with_n_kv_heads(Some(2))
                .with_causal(true)
                .with_window_left(window_left)
                .with_rotary_theta(rotary)
                .init(&cpu());
            let want = module.forward(x.clone());
            for (kind, chunk) in [
                (KvCache::new(), 1),
                (KvCache::new(), 4),
                (KvCache::with_capacity(23), 3),
                (KvCache::rolling(), 1),
                (KvCache::rolling(), 5),
            ] {
                let mut cache = kind.clone();
                let got = decode_all(&x, chunk, |t| module.forward_cache(t, &mut cache));
                assert_close(got, want.clone(), 1e-5);
                assert_eq!(cache.seen(), 23);
                let held = match (kind.kind, window_left) {
                    (CacheKind::Rolling, Some(left)) => left,
                    _ => 23,
                };
                assert_eq!(cache.len(), held, "{kind:?} window {window_left:?}");
            }
        }
    }

    /// Sparse attention decodes its local (rolling cache) and strided (growing cache)
    /// patterns to the full forward's rows, and refuses a random one or a strided pattern
    /// on a rolling cache, naming why.
    #[test]
    fn sparse_patterns_decode_where_they_can() {
        use crate::{SparseAttentionConfig, SparsePattern};
        let x = randn([2, 41, 32], &cpu());
        let module = |pattern| {
            SparseAttentionConfig::new(32, 4)
                .with_n_kv_heads(Some(2))
                .with_causal(true)
                .with_pattern(pattern)
                .init(&cpu())
        };
        for (pattern, cache) in [
            (SparsePattern::Local { window: 10 }, KvCache::rolling()),
            (SparsePattern::Local { window: 10 }, KvCache::new()),
            (
                SparsePattern::Strided {
                    stride: 8,
                    local: 3,
                },
                KvCache::new(),
            ),
            (
                SparsePattern::Strided {
                    stride: 8,
                    local: 3,
                },
                KvCache::with_capacity(41),
            ),
        ] {
            let m = module(pattern);
            let want = m.forward(x.clone());
            for chunk in [1, 6] {
                let mut cache = cache.clone();
                let got = decode_all(&x, chunk, |t| m.forward_cache(t, &mut cache));
                assert_close(got, want.clone(), 1e-5);
            }
        }
        let err = |pattern, mut cache: KvCache| {
            module(pattern)
                .try_forward_cache(x.clone().slice([0..2, 0..1, 0..32]), &mut cache)
                .unwrap_err()
                .to_string()
        };
        let random = SparsePattern::Random {
            density: 0.3,
            block: 4,
            seed: 1,
        };
        assert!(err(random, KvCache::new()).contains("random"));
        let strided = SparsePattern::Strided {
            stride: 8,
            local: 3,
        };
        assert!(err(strided, KvCache::rolling()).contains("rolling"));
    }

    #[test]
    fn a_rolling_window_cache_stays_bounded() {
        let module = SlidingWindowAttentionConfig::new(32, 4)
            .with_window(6)
            .with_causal(true)
            .with_rotary_theta(Some(100.0))
            .init(&cpu());
        let x = randn([1, 40, 32], &cpu());
        let want = module.forward(x.clone());
        let mut cache = KvCache::rolling();
        let got = decode_all(&x, 1, |t| {
            let out = module.forward_cache(t, &mut cache);
            assert!(cache.len() <= 5, "the cache holds {} keys", cache.len());
            out
        });
        assert_close(got, want, 1e-5);
    }

    /// A growing cache's buffers hold the first call's keys exactly, then grow by half (or
    /// to the call's keys) when an append does not fit, and every call sees exactly the
    /// keys appended so far.
    #[test]
    fn a_growing_cache_grows_its_buffers_by_half() {
        let mut cache = KvCache::new();
        let capacity = |c: &KvCache| c.keys.as_ref().map(|k| k.dims()[2]);
        let kv = |n: usize, at: usize| {
            Tensor::<1, burn::tensor::Int>::arange(at as i64..(at + n) as i64, &cpu())
                .float()
                .reshape([1, 1, n, 1])
                .expand([2, 3, n, 4])
        };
        let mut seen = 0;
        for (new, want_capacity) in [(10, 10), (1, 15), (9, 22), (1, 22), (25, 46)] {
            let (k, v) = cache
                .append(kv(new, seen), kv(new, seen) * 2.0, None)
                .unwrap();
            seen += new;
            assert_eq!(capacity(&cache), Some(want_capacity), "after {seen} keys");
            assert_eq!((cache.len(), k.dims()[2], v.dims()[2]), (seen, seen, seen));
            assert_close(k.clone(), kv(seen, 0), 0.0);
            assert_close(v, kv(seen, 0) * 2.0, 0.0);
        }
    }

    #[test]
    fn bad_calls_are_named() {
        let causal = FlashAttentionConfig::new(16, 2)
            .with_causal(true)
            .init(&cpu());
        let full = FlashAttentionConfig::new(16, 2).init(&cpu());
        let err = full
            .try_forward_cache(randn([1, 2, 16], &cpu()), &mut KvCache::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("causal"), "{err}");

        let mut cache = KvCache::with_capacity(4);
        causal.forward_cache(randn([1, 3, 16], &cpu()), &mut cache);
        let err = causal
            .try_forward_cache(randn([1, 2, 16], &cpu()), &mut cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 of its 4 positions; 2 more"), "{err}");

        let mut cache = KvCache::new();
        causal.forward_cache(randn([1, 3, 16], &cpu()), &mut cache);
        let err = causal
            .try_forward_cache(randn([2, 1, 16], &cpu()), &mut cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[1, 2, _, 8]") && err.contains("[2, 2, 1, 8]"),
            "{err}"
        );
        cache.clear();
        assert!(cache.is_empty() && cache.seen() == 0);
        causal.forward_cache(randn([2, 1, 16], &cpu()), &mut cache);
        assert_eq!(cache.len(), 1);

        // Keys of another dtype than the held ones (a module cast to f64 mid-sequence).
        let k = randn([2, 2, 1, 8], &cpu()).cast(burn::tensor::DType::F64);
        let err = cache.append(k.clone(), k, None).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("F64"), "{err}");
        assert_eq!(
            (cache.len(), cache.seen()),
            (1, 1),
            "a refused call appends nothing"
        );
    }
}
