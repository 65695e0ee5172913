//! Context-parallel exact attention: one sequence split into contiguous slices, one per
//! peer (a device), each peer computing its own queries' rows.
//!
//! Two forms ([`ContextParallelForm`]):
//! - **Ring** (the default): key/value blocks visit the peers one at a time, each visit one
//!   attention call of the peer's queries that see the block, and the partial rows merge by
//!   their log-sum-exp. A peer holds its own slice, its merged rows, the visiting block
//!   and the next one (copied before the current one is computed), so the sequence that
//!   fits grows with the number of peers. The backward revisits the blocks: each block's
//!   share of the gradients is the op's backward against that block with the merged rows'
//!   output and log-sum-exp ([`AttentionBackend::banded_attention_block_tap`]), and its dK/dV
//!   return to the block's owner.
//! - **All-gather** (as Llama 3 trained): each peer copies onto its device every key and value
//!   row its queries can see and runs one call; fewer, larger calls, but a causal peer holds
//!   every earlier slice's keys and values.
//!
//! Either way each call is one ordinary (bottom-right aligned) attention call with the band
//! re-expressed for the keys it is given, so the calls keep the kernels and their tile
//! skipping, and a causal band or a window skips the blocks it hides.
//!
//! [`AttentionBackend::banded_attention_block_tap`]: crate::AttentionBackend::banded_attention_block_tap

use std::ops::Range;

use burn::tensor::{Device, Tensor};

use crate::backend::block_tap;
use crate::merge::MergedRows;
use crate::untracked::untracked;

use crate::error::OrPanic;
use crate::{
    try_attention, try_attention_with_lse, AttentionError, AttentionOptions, AttentionShape, Window,
};

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

/// How context-parallel attention moves keys and values between peers: the ring form
/// (blocks visit the peers one at a time) or the all-gather form (each peer gathers every
/// row it sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextParallelForm {
    /// Key/value blocks visit the peers one at a time; partial rows merge by log-sum-exp (in
    /// f32). A peer holds its slice and at most two visiting blocks at a time. On backends that this
    /// crate's backend extension does not serve, calls run [`ContextParallelForm::AllGather`].
    #[default]
    Ring,
    /// Each peer gathers every key and value row its queries see and runs one call.
    AllGather,
}

/// Context-parallel self-attention over `slices`, the contiguous slices of one sequence in
/// order (slice `p` holds the rows after slice `p - 1`'s; any lengths, each on its peer's
/// device), in the default [`ContextParallelForm::Ring`]: each peer's output rows `[batch,
/// heads, rows, value_dim]`, on its device, equal to the rows of
/// [`attention`](crate::attention) over the whole sequence with `options` (causal, windows,
/// GQA, scale). Under autodiff the gradients of every slice's keys and values return to that
/// slice's device.
///
/// # Errors
/// With no slice, an empty slice, slices whose queries and keys have different lengths,
/// or whose batch, heads or head dims differ from the first slice's (naming the values),
/// and for invalid options.
pub fn try_context_parallel_attention(
    slices: &[SequenceSlice],
    options: &AttentionOptions,
) -> Result<Vec<Tensor<4>>, AttentionError> {
    try_context_parallel_attention_with(slices, options, ContextParallelForm::default())
}

/// [`try_context_parallel_attention`] in the given `form`.
///
/// # Errors
/// As [`try_context_parallel_attention`].
pub fn try_context_parallel_attention_with(
    slices: &[SequenceSlice],
    options: &AttentionOptions,
    form: ContextParallelForm,
) -> Result<Vec<Tensor<4>>, AttentionError> {
    let bounds = slice_bounds(slices)?;
    options.validate()?;
    let layout = Layout {
        bounds,
        band: options.effective_window(),
        local: AttentionOptions {
            causal: false,
            ..options.clone()
        },
    };
    let ring =
        form == ContextParallelForm::Ring && crate::backend::extension_serves_tensor(&slices[0].q);
    if ring {
        ring_attention(slices, &layout)
    } else {
        all_gather_attention(slices, &layout)
    }
}

/// [`try_context_parallel_attention`], panicking on its error.
pub fn context_parallel_attention(
    slices: &[SequenceSlice],
    options: &AttentionOptions,
) -> Vec<Tensor<4>> {
    try_context_parallel_attention(slices, options).or_panic()
}

/// The zigzag layout that balances causal context parallelism over `peers`: the `n` rows
/// cut into `2 * peers` contiguous chunks as even as the length allows, in sequence order,
/// each with the peer that holds it. Chunk `c` goes to peer `min(c, 2 * peers - 1 - c)`, so
/// every peer holds one early and one late chunk and the same number of causal (query, key)
/// pairs (exactly when `2 * peers` divides `n`). Pass the chunks in order, each on its
/// peer's device, as the slices of [`try_context_parallel_attention`]: a peer's two chunks
/// are two slices, and keys a peer owns visit it without a copy.
///
/// # Errors
/// With no peer, or fewer rows than chunks.
pub fn zigzag_chunks(n: usize, peers: usize) -> Result<Vec<(Range<usize>, usize)>, AttentionError> {
    let chunks = peers.saturating_mul(2);
    if peers == 0 || n < chunks {
        return Err(AttentionError::Invalid(format!(
            "the zigzag layout cuts {n} rows into 2 x {peers} peers = {chunks} non-empty \
             chunks: it needs at least one peer and {chunks} rows"
        )));
    }
    Ok((0..chunks)
        .map(|c| (c * n / chunks..(c + 1) * n / chunks, c.min(chunks - 1 - c)))
        .collect())
}

/// The rows of the whole sequence each slice holds, after checking the slices agree.
fn slice_bounds(slices: &[SequenceSlice]) -> Result<Vec<Range<usize>>, AttentionError> {
    let first = slices.first().ok_or_else(|| {
        AttentionError::Invalid("context-parallel attention needs at least one slice".into())
    })?;
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
    Ok(bounds)
}

/// The checked slicing of one call: each slice's rows, the global band and the options of
/// the local calls (their band set per call).
struct Layout {
    bounds: Vec<Range<usize>>,
    band: Window,
    local: AttentionOptions,
}

impl Layout {
    fn len(&self) -> usize {
        self.bounds.last().map_or(0, |rows| rows.end)
    }
}

/// The all-gather form: one call per peer against every key row it sees.
fn all_gather_attention(
    slices: &[SequenceSlice],
    layout: &Layout,
) -> Result<Vec<Tensor<4>>, AttentionError> {
    let n = layout.len();
    layout
        .bounds
        .iter()
        .zip(slices)
        .map(|(rows, slice)| {
            // Every query sees its own key, so the visit of the whole sequence keeps them all.
            let keys = visit(0, rows, &(0..n), layout.band).expect("a query sees its own key");
            let device = slice.q.device();
            let (k, v) = gather(slices, &layout.bounds, keys.keys, &device);
            try_attention(
                slice.q.clone(),
                k,
                v,
                &layout.local.clone().with_window(keys.window),
            )
        })
        .collect()
}

/// One block's visit to a peer: the peer's query rows that see the block, the block's key
/// rows they see (both global), and the band of their call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Visit {
    block: usize,
    queries: Range<usize>,
    keys: Range<usize>,
    window: Window,
}

/// The visit of the keys `block_rows` to the queries `rows` under `band`, or `None` when
/// the band hides every pair: the queries cut to those that see a key of the block, the
/// keys to those one of them sees, and the band of their (bottom-right aligned) call. The
/// all-gather form takes the visit of the whole sequence.
fn visit(
    block: usize,
    rows: &Range<usize>,
    block_rows: &Range<usize>,
    band: Window,
) -> Option<Visit> {
    // Query i sees key j iff i - left <= j <= i + right.
    let first_key = band.left.map_or(0, |left| rows.start.saturating_sub(left));
    let last_key = band
        .right
        .map_or(usize::MAX, |right| (rows.end - 1).saturating_add(right));
    let (a, c) = (
        block_rows.start.max(first_key),
        (block_rows.end - 1).min(last_key),
    );
    if a > c {
        return None;
    }
    let q_start = band
        .right
        .map_or(rows.start, |right| rows.start.max(a.saturating_sub(right)));
    let q_end = band.left.map_or(rows.end, |left| {
        rows.end.min(c.saturating_add(left).saturating_add(1))
    });
    let lo = band
        .left
        .map_or(a, |left| a.max(q_start.saturating_sub(left)));
    let hi = band
        .right
        .map_or(c, |right| c.min((q_end - 1).saturating_add(right)));
    // With queries q_start.. and keys lo..=hi, bottom-right aligned, query i's diagonal is
    // key i + shift: the band's sides move by the shift, and stay non-negative because every
    // kept query sees a kept key.
    let shift = (hi + 1) as i128 - q_end as i128;
    let side = |width: usize, by: i128| usize::try_from(width as i128 + by).unwrap_or(usize::MAX);
    Some(Visit {
        block,
        queries: q_start..q_end,
        keys: lo..hi + 1,
        window: Window::new(
            band.left.map(|left| side(left, shift)),
            band.right.map(|right| side(right, -shift)),
        ),
    })
}

/// The ring form: every peer's visits in ring order (its own block first, then the earlier
/// ones, wrapping around), merged by log-sum-exp, then the gradient taps of the visits.
fn ring_attention(
    slices: &[SequenceSlice],
    layout: &Layout,
) -> Result<Vec<Tensor<4>>, AttentionError> {
    let peers = slices.len();
    let visits: Vec<Vec<Visit>> = (0..peers)
        .map(|p| {
            (0..peers)
                .filter_map(|step| {
                    let block = (p + peers - step) % peers;
                    visit(block, &layout.bounds[p], &layout.bounds[block], layout.band)
                })
                .collect()
        })
        .collect();
    let mut merged: Vec<MergedRows> = slices.iter().map(|s| MergedRows::new(&s.q, &s.v)).collect();
    // Step by step, every peer computing against its visiting block; each peer's next
    // block is copied before its current one is computed.
    let mut in_flight: Vec<Option<(Tensor<4>, Tensor<4>)>> = (0..peers)
        .map(|p| {
            visits[p]
                .first()
                .map(|v| fetch(slices, layout, v, &slices[p].q.device()))
        })
        .collect();
    for step in 0..peers {
        for p in 0..peers {
            let Some(visit) = visits[p].get(step) else {
                continue;
            };
            let (k, v) = in_flight[p].take().expect("the visit's block was fetched");
            in_flight[p] = visits[p]
                .get(step + 1)
                .map(|next| fetch(slices, layout, next, &slices[p].q.device()));
            let start = layout.bounds[p].start;
            let q = untracked(slices[p].q.clone()).narrow(
                2,
                visit.queries.start - start,
                visit.queries.len(),
            );
            let options = layout.local.clone().with_window(visit.window);
            let (out, lse) = try_attention_with_lse(q, k, v, &options)?;
            merged[p].add(visit.queries.start - start, out, lse);
        }
    }
    // Without a graph to record (inference) the merged rows are the result.
    let tracked = slices
        .iter()
        .any(|s| s.q.is_tracked() || s.k.is_tracked() || s.v.is_tracked());
    Ok(merged
        .into_iter()
        .enumerate()
        .map(|(p, rows)| {
            let (out, lse) = rows.finish(slices[p].q.dtype());
            // Values only: the taps carry the gradients.
            let (out, lse) = (untracked(out), untracked(lse));
            if !tracked {
                return out;
            }
            let start = layout.bounds[p].start;
            // The output's value is the merged rows; the taps give it each visit's gradients.
            visits[p].iter().fold(out.clone(), |carried, visit| {
                let (at, len) = (visit.queries.start - start, visit.queries.len());
                let owner = &slices[visit.block];
                let owned = layout.bounds[visit.block].start;
                let (k_at, k_len) = (visit.keys.start - owned, visit.keys.len());
                block_tap(
                    carried,
                    slices[p].q.clone().narrow(2, at, len),
                    owner.k.clone().narrow(2, k_at, k_len),
                    owner.v.clone().narrow(2, k_at, k_len),
                    out.clone().narrow(2, at, len),
                    lse.clone().narrow(2, at, len),
                    at,
                    layout.local.clone().with_window(visit.window),
                )
            })
        })
        .collect())
}

/// A visit's keys and values, copied (without their graph: the taps return their
/// gradients) onto the visited peer's `device`.
fn fetch(
    slices: &[SequenceSlice],
    layout: &Layout,
    visit: &Visit,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let owner = &slices[visit.block];
    let at = visit.keys.start - layout.bounds[visit.block].start;
    let rows = |t: &Tensor<4>| {
        untracked(t.clone())
            .narrow(2, at, visit.keys.len())
            .to_device(device)
    };
    (rows(&owner.k), rows(&owner.v))
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
    use crate::test_util::{max_abs_diff, uniform};
    use rand::{rngs::StdRng, SeedableRng};

    /// Each visit's local band against every (query, key) pair of its peer and block: the
    /// visits keep exactly the global pairs, and skip only blocks without one.
    #[test]
    fn visits_keep_exactly_the_global_pairs() {
        let n = 23;
        let blocks = [0..5, 5..11, 11..19, 19..23, 0..23];
        for band in [
            Window::FULL,
            Window::new(None, Some(0)),
            Window::new(Some(4), Some(0)),
            Window::new(Some(3), Some(5)),
            Window::new(Some(0), Some(0)),
            Window::new(Some(7), Some(1)),
            Window::new(Some(usize::MAX), Some(2)),
        ] {
            for rows in &blocks {
                for (b, block) in blocks.iter().enumerate() {
                    let any = rows
                        .clone()
                        .any(|i| block.clone().any(|j| band.contains(i, j, n, n)));
                    let Some(visit) = visit(b, rows, block, band) else {
                        assert!(!any, "{band:?} rows {rows:?} block {block:?} skipped");
                        continue;
                    };
                    let (seq_q, seq_k) = (visit.queries.len(), visit.keys.len());
                    for i in rows.clone() {
                        for j in block.clone() {
                            let global = band.contains(i, j, n, n);
                            let local = visit.queries.contains(&i)
                                && visit.keys.contains(&j)
                                && visit.window.contains(
                                    i - visit.queries.start,
                                    j - visit.keys.start,
                                    seq_q,
                                    seq_k,
                                );
                            assert_eq!(global, local, "{band:?} {visit:?}: ({i}, {j})");
                        }
                    }
                }
            }
        }
    }

    /// Every peer of the zigzag layout holds the same causal pairs when the chunks divide
    /// the length, and within a chunk's rows of pairs otherwise; bad layouts are named.
    #[test]
    fn zigzag_chunks_balance_causal_pairs() {
        for (n, peers) in [(24, 3), (17, 2), (100, 4), (8, 4), (5, 1)] {
            let chunks = zigzag_chunks(n, peers).unwrap();
            assert_eq!(chunks.len(), 2 * peers);
            assert_eq!(chunks.first().unwrap().0.start, 0);
            assert_eq!(chunks.last().unwrap().0.end, n);
            let mut pairs = vec![0usize; peers];
            for (i, (rows, peer)) in chunks.iter().enumerate() {
                assert!(!rows.is_empty());
                if i > 0 {
                    assert_eq!(chunks[i - 1].0.end, rows.start);
                }
                pairs[*peer] += rows.clone().map(|r| r + 1).sum::<usize>();
            }
            let (lo, hi) = (pairs.iter().min().unwrap(), pairs.iter().max().unwrap());
            if n % (2 * peers) == 0 {
                assert_eq!(lo, hi, "n {n} peers {peers}: {pairs:?}");
            } else {
                assert!(hi - lo <= 2 * n, "n {n} peers {peers}: {pairs:?}");
            }
        }
        for (n, peers) in [(5, 3), (4, 0)] {
            let err = zigzag_chunks(n, peers).unwrap_err().to_string();
            assert!(err.contains(&format!("{n} rows")), "{err}");
        }
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
            (
                AttentionOptions::new().with_window(Window::new(Some(2), Some(5))),
                2,
                2,
                vec![4, 6, 5, 1],
            ),
        ];
        for (options, heads, kv_heads, cuts) in cases {
            let n: usize = cuts.iter().sum();
            let q = uniform(&mut rng, [2, heads, n, 8], &device).require_grad();
            let k = uniform(&mut rng, [2, kv_heads, n, 8], &device).require_grad();
            let v = uniform(&mut rng, [2, kv_heads, n, 6], &device).require_grad();
            let w = uniform(&mut rng, [2, heads, n, 6], &device);
            let want = attention(q.clone(), k.clone(), v.clone(), &options);
            let want_grads = (want.clone() * w.clone()).sum().backward();

            for form in [ContextParallelForm::Ring, ContextParallelForm::AllGather] {
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
                let got = try_context_parallel_attention_with(&slices, &options, form).unwrap();
                let got = Tensor::cat(got, 2);
                let grads = (got.clone() * w.clone()).sum().backward();
                let what = format!("{form:?} {options:?} heads {heads}/{kv_heads} slices {cuts:?}");
                let err = max_abs_diff(got, want.clone());
                assert!(err < 1e-5, "{what}: output {err}");
                for (name, a, b) in [("dq", &q2, &q), ("dk", &k2, &k), ("dv", &v2, &v)] {
                    let (g, wg) = (a.grad(&grads).unwrap(), b.grad(&want_grads).unwrap());
                    let err = max_abs_diff(g, wg);
                    assert!(err < 1e-5, "{what}: {name} {err}");
                }
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
