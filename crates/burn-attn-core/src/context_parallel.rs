//! Context-parallel exact attention: one sequence split into contiguous slices, one per
//! peer (a device), each peer computing its own queries' rows.
//!
//! This is the all-gather form (as Llama 3 trained): each peer copies onto its device the
//! keys and values its queries can see — under a causal band its own slice and the earlier
//! ones, under a window only its neighbours' rows inside the window — and runs the
//! attention op on its queries against them. The band is re-expressed for the gathered
//! keys so each peer's call is one ordinary (bottom-right aligned) attention call: its
//! kernels, its masks' tile skipping. Copies and slices are differentiable, so under
//! autodiff each key's and value's gradient flows back to the peer that owns it.
//!
//! What it does not do (yet): the ring form, where key/value blocks travel between
//! neighbours step by step and partial rows merge by log-sum-exp, so a peer never holds
//! more than two blocks; here a causal peer holds every earlier slice's keys and values.

use burn::tensor::{Device, Tensor};

use crate::{try_attention, AttentionError, AttentionOptions, AttentionShape, Window};

/// One peer's contiguous slice of a sequence: its rows of the queries, keys and values
/// (`[batch, heads, rows, head_dim]`, `[batch, kv_heads, rows, head_dim]` and `[batch,
/// kv_heads, rows, value_dim]`), on the peer's device.
#[derive(Debug, Clone)]
pub struct SequenceSlice {
    /// Queries of the slice's rows.
    pub q: Tensor<4>,
    /// Keys of the slice's rows.
    pub k: Tensor<4>,
    /// Values of the slice's rows.
    pub v: Tensor<4>,
}

/// The keys one peer needs: rows `lo..=hi` of the whole sequence, and the band that
/// expresses the global one for a call of its queries against exactly those keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerKeys {
    lo: usize,
    hi: usize,
    window: Window,
}

/// The keys the queries `start..end` of a self-attention over `n` rows see under `band`
/// (the effective window: causal is `right = Some(0)`), and the band of the local call.
///
/// Query `i` sees key `j` iff `i - left <= j <= i + right`. With the keys cut to `lo..=hi`
/// and the local call bottom-right aligned (its offset is `(hi - lo + 1) - (end - start)`),
/// the same pairs are the local band `left' = hi + 1 - end + left`, `right' = end - 1 +
/// right - hi`, both non-negative because `hi >= end - 1` and `hi <= end - 1 + right`.
fn peer_keys(start: usize, end: usize, n: usize, band: Window) -> PeerKeys {
    let lo = band.left.map_or(0, |left| start.saturating_sub(left));
    let hi = band
        .right
        .map_or(n - 1, |right| (end - 1).saturating_add(right).min(n - 1));
    PeerKeys {
        lo,
        hi,
        window: Window::new(
            band.left.map(|left| (hi + 1 - end).saturating_add(left)),
            band.right.map(|right| (end - 1).saturating_add(right) - hi),
        ),
    }
}

/// Context-parallel self-attention over `slices`, the contiguous slices of one sequence in
/// order (slice `p` holds the rows after slice `p - 1`'s; any lengths, each on its peer's
/// device): each peer's output rows `[batch, heads, rows, value_dim]`, on its device, equal
/// to the rows of [`attention`](crate::attention) over the whole sequence with `options`
/// (causal, windows, GQA, scale).
///
/// Each peer copies the key and value rows its queries can see from the slices that hold
/// them onto its own device (under a causal band: its own slice and the earlier ones; under
/// a window: the rows inside it), then runs one attention call. Under autodiff the
/// gradients of those rows return to the slices they came from.
///
/// # Errors
/// With no slice, an empty slice, slices whose queries and keys have different lengths,
/// or whose batch, heads or head dims differ from the first slice's (naming the values),
/// and for invalid options.
pub fn try_context_parallel_attention(
    slices: &[SequenceSlice],
    options: &AttentionOptions,
) -> Result<Vec<Tensor<4>>, AttentionError> {
    let first = slices.first().ok_or_else(|| {
        AttentionError::Invalid("context-parallel attention needs at least one slice".into())
    })?;
    options.validate()?;
    let mut bounds = Vec::with_capacity(slices.len());
    let mut n = 0;
    for (p, slice) in slices.iter().enumerate() {
        AttentionShape::of(&slice.q, &slice.k, &slice.v)?;
        let [rows, rows_k] = [slice.q.dims()[2], slice.k.dims()[2]];
        if rows == 0 || rows != rows_k {
            return Err(AttentionError::Invalid(format!(
                "context-parallel slice {p} has {rows} query rows and {rows_k} key rows: each \
                 slice holds the same (non-empty) rows of the sequence's queries and keys"
            )));
        }
        let dims = |t: &Tensor<4>| {
            let [b, h, _, d] = t.dims();
            [b, h, d]
        };
        for (what, a, b) in [
            ("queries", dims(&slice.q), dims(&first.q)),
            ("keys", dims(&slice.k), dims(&first.k)),
            ("values", dims(&slice.v), dims(&first.v)),
        ] {
            if a != b {
                return Err(AttentionError::Invalid(format!(
                    "context-parallel slice {p}'s {what} are [batch, heads, head_dim] = {a:?}, \
                     slice 0's {b:?}"
                )));
            }
        }
        bounds.push(n..n + rows);
        n += rows;
    }
    let band = options.effective_window();
    let local = AttentionOptions {
        causal: false,
        ..options.clone()
    };
    bounds
        .iter()
        .zip(slices)
        .map(|(rows, slice)| {
            let keys = peer_keys(rows.start, rows.end, n, band);
            let device = slice.q.device();
            let (k, v) = gather(slices, &bounds, keys.lo..keys.hi + 1, &device);
            try_attention(
                slice.q.clone(),
                k,
                v,
                &local.clone().with_window(keys.window),
            )
        })
        .collect()
}

/// [`try_context_parallel_attention`], panicking on its error.
pub fn context_parallel_attention(
    slices: &[SequenceSlice],
    options: &AttentionOptions,
) -> Vec<Tensor<4>> {
    try_context_parallel_attention(slices, options).unwrap_or_else(|err| panic!("burn-attn: {err}"))
}

/// Rows `wanted` of the whole sequence's keys and values, cut from the slices that hold
/// them (slice `p` holds rows `bounds[p]`) and copied onto `device`, in order.
fn gather(
    slices: &[SequenceSlice],
    bounds: &[std::ops::Range<usize>],
    wanted: std::ops::Range<usize>,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for (slice, rows) in slices.iter().zip(bounds) {
        let (from, to) = (wanted.start.max(rows.start), wanted.end.min(rows.end));
        if from >= to {
            continue;
        }
        let (at, len) = (from - rows.start, to - from);
        ks.push(slice.k.clone().narrow(2, at, len).to_device(device));
        vs.push(slice.v.clone().narrow(2, at, len).to_device(device));
    }
    let join = |mut parts: Vec<Tensor<4>>| match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(parts, 2),
    };
    (join(ks), join(vs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention;
    use burn::tensor::TensorData;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The local bands against a brute-force check of every (query, key) pair.
    #[test]
    fn peer_keys_keep_exactly_the_global_pairs() {
        let n = 23;
        for band in [
            Window::FULL,
            Window::new(None, Some(0)),
            Window::new(Some(4), Some(0)),
            Window::new(Some(3), Some(5)),
            Window::new(Some(0), Some(0)),
            Window::new(Some(usize::MAX), Some(2)),
        ] {
            for (start, end) in [(0, 5), (5, 11), (11, 23), (0, 23), (22, 23)] {
                let keys = peer_keys(start, end, n, band);
                let (seq_q, seq_k) = (end - start, keys.hi - keys.lo + 1);
                for i in start..end {
                    for j in 0..n {
                        let global = band.contains(i, j, n, n);
                        let local = (keys.lo..=keys.hi).contains(&j)
                            && keys.window.contains(i - start, j - keys.lo, seq_q, seq_k);
                        assert_eq!(global, local, "{band:?} rows {start}..{end}: ({i}, {j})");
                    }
                }
            }
        }
    }

    fn random(rng: &mut StdRng, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let data: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    /// Outputs and gradients (q, k, v) of slices of lengths `cuts` equal those of one call
    /// over the whole sequence: full, causal, windows, GQA, uneven slices.
    #[test]
    fn slices_equal_the_whole_sequence_forward_and_backward() {
        let device = Device::ndarray().autodiff();
        let mut rng = StdRng::seed_from_u64(11);
        let cases = [
            (AttentionOptions::new(), 2, 2, vec![8, 8, 8]),
            (
                AttentionOptions::new().with_causal(true),
                4,
                2,
                vec![5, 9, 3, 7],
            ),
            (
                AttentionOptions::new().with_window(Window::new(Some(6), Some(3))),
                2,
                1,
                vec![7, 7, 10],
            ),
            (
                AttentionOptions::new()
                    .with_causal(true)
                    .with_window(Window::causal(4)),
                4,
                4,
                vec![3, 3, 3, 3, 3],
            ),
            (AttentionOptions::new().with_causal(true), 2, 2, vec![17]),
        ];
        for (options, heads, kv_heads, cuts) in cases {
            let n: usize = cuts.iter().sum();
            let q = random(&mut rng, [2, heads, n, 8], &device).require_grad();
            let k = random(&mut rng, [2, kv_heads, n, 8], &device).require_grad();
            let v = random(&mut rng, [2, kv_heads, n, 6], &device).require_grad();
            let w = random(&mut rng, [2, heads, n, 6], &device);
            let want = attention(q.clone(), k.clone(), v.clone(), &options);
            let want_grads = (want.clone() * w.clone()).sum().backward();

            let (q2, k2, v2) = (
                q.clone().detach().require_grad(),
                k.clone().detach().require_grad(),
                v.clone().detach().require_grad(),
            );
            let mut slices = Vec::new();
            let mut at = 0;
            for &rows in &cuts {
                slices.push(SequenceSlice {
                    q: q2.clone().narrow(2, at, rows),
                    k: k2.clone().narrow(2, at, rows),
                    v: v2.clone().narrow(2, at, rows),
                });
                at += rows;
            }
            let got = Tensor::cat(context_parallel_attention(&slices, &options), 2);
            let grads = (got.clone() * w).sum().backward();
            let close = |a: Tensor<4>, b: Tensor<4>| (a - b).abs().max().into_scalar::<f32>();
            let what = format!("{options:?} heads {heads}/{kv_heads} slices {cuts:?}");
            assert!(close(got, want) < 1e-5, "{what}: output");
            for (name, a, b) in [("dq", &q2, &q), ("dk", &k2, &k), ("dv", &v2, &v)] {
                let (g, wg) = (a.grad(&grads).unwrap(), b.grad(&want_grads).unwrap());
                assert!(close(g, wg) < 1e-5, "{what}: {name}");
            }
        }
    }

    #[test]
    fn bad_slices_are_named() {
        let device = Device::ndarray();
        let t = |shape: [usize; 4]| Tensor::<4>::zeros(shape, &device);
        let err = |slices: &[SequenceSlice]| {
            try_context_parallel_attention(slices, &AttentionOptions::new())
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("at least one slice"));
        let slice = |rows_q, rows_k, heads| SequenceSlice {
            q: t([1, heads, rows_q, 8]),
            k: t([1, 2, rows_k, 8]),
            v: t([1, 2, rows_k, 8]),
        };
        let e = err(&[slice(4, 3, 2)]);
        assert!(e.contains("slice 0 has 4 query rows and 3 key rows"), "{e}");
        let e = err(&[slice(4, 4, 2), slice(4, 4, 4)]);
        assert!(
            e.contains("slice 1's queries") && e.contains("[1, 4, 8]"),
            "{e}"
        );
    }
}
