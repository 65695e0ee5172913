//! Rotary position embeddings (RoFormer) on the projected queries and keys, through
//! burn-nn's `RotaryEncoding`: each pair of a head's features is rotated by an angle
//! proportional to the token's position, so `q_i . k_j` depends on `i - j` only.
//! Positions are bottom-right aligned as the attention's bands are (the last query sits at
//! the last key's position), so decoding continues at the cache's next position and packed
//! documents see the same relative positions as alone.

use std::ops::Range;
use std::sync::Mutex;

use burn::nn::{RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::{Device, Tensor};
use burn_attn_core::AttentionError;

use crate::projection::Heads;

/// Checks a rotary base: finite and positive, on an even head dim (features rotate in
/// pairs).
pub(crate) fn validate_rotary(theta: Option<f32>, head_dim: usize) -> Result<(), AttentionError> {
    match theta {
        Some(theta) if !(theta.is_finite() && theta > 0.0) => Err(AttentionError::Invalid(
            format!("rotary_theta must be finite and positive, got {theta}"),
        )),
        Some(_) if !head_dim.is_multiple_of(2) => Err(AttentionError::Invalid(format!(
            "rotary embeddings rotate feature pairs: head dim {head_dim} must be even"
        ))),
        _ => Ok(()),
    }
}

/// `x` (`[batch, heads, seq, head_dim]`) rotated as positions `start..start + seq` with
/// base `theta`, in `x`'s dtype, from a held table ([`RotaryTables`]) where one covers them.
pub(crate) fn rotate(x: Tensor<4>, start: usize, theta: f32) -> Tensor<4> {
    let [_, _, seq, dim] = x.dims();
    let held = TABLES.covering(theta, dim, start..start + seq, &x.device());
    rotate_from(&held, x, start)
}

/// `x` rotated as positions from `start` with `table`, a table whose first row is the
/// position it is paired with, covering them.
fn rotate_from((rope, first): &(RotaryEncoding, usize), x: Tensor<4>, start: usize) -> Tensor<4> {
    // burn-nn's tables take the device's default float type.
    let dtype = x.dtype();
    rope.apply(x.cast(rope.freq_complex.dtype()), start - first)
        .cast(dtype)
}

/// burn-nn's table of positions `range` (`shift` moves its first row to `range.start`, so a
/// table at position p costs O(rows * dim), not O(p * dim)); the same values, bit for bit,
/// as the table of every position up to them.
fn table(theta: f32, dim: usize, range: Range<usize>, device: &Device) -> RotaryEncoding {
    let mut rope = RotaryEncodingConfig::new(range.len().max(1), dim)
        .with_theta(theta)
        .init(device);
    if range.start > 0 {
        rope.shift(range.start);
    }
    rope
}

/// Positions a held table spans at least (a decoding step builds one for this many steps).
const HELD_ROWS: usize = 1024;
/// Positions past which a call's table is its own, not held (16 MiB of f32 at head dim 128).
const MAX_HELD_ROWS: usize = 16384;
/// Tables held at once (bases, head dims and devices), the oldest dropped first.
const HELD_TABLES: usize = 4;

/// The rotary tables of every module, shared: per base, head dim and device, burn-nn's
/// table of a run of positions, so calls whose positions it covers (every layer of a
/// model, the queries and keys of one call, the next decoding steps) build none. A call
/// outside a held table's positions replaces it with one from its first position (at least
/// [`HELD_ROWS`] long); calls past [`MAX_HELD_ROWS`] positions build their own.
struct RotaryTables(Mutex<Vec<HeldTable>>);

/// One held table: the positions `first..first + rows` of base `theta` and head dim `dim`
/// on `device`.
struct HeldTable {
    theta: f32,
    dim: usize,
    device: Device,
    first: usize,
    rope: RotaryEncoding,
}

static TABLES: RotaryTables = RotaryTables(Mutex::new(Vec::new()));

impl RotaryTables {
    /// A table of base `theta` and head dim `dim` on `device` that covers the positions
    /// `range`, and the position of its first row.
    fn covering(
        &self,
        theta: f32,
        dim: usize,
        range: Range<usize>,
        device: &Device,
    ) -> (RotaryEncoding, usize) {
        if range.len() > MAX_HELD_ROWS {
            return (table(theta, dim, range.clone(), device), range.start);
        }
        // A panic elsewhere leaves the tables usable: they are only ever replaced whole.
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Device equality may not tell an autodiff device from its inner one.
        let same = |t: &HeldTable| {
            t.theta.to_bits() == theta.to_bits()
                && t.dim == dim
                && &t.device == device
                && t.device.is_autodiff() == device.is_autodiff()
        };
        let end = |t: &HeldTable| t.first + t.rope.freq_complex.dims()[0];
        if let Some(t) = held
            .iter()
            .find(|t| same(t) && t.first <= range.start && range.end <= end(t))
        {
            return (t.rope.clone(), t.first);
        }
        held.retain(|t| !same(t));
        if held.len() == HELD_TABLES {
            held.remove(0);
        }
        let rows = range.len().clamp(HELD_ROWS, MAX_HELD_ROWS);
        let rope = table(theta, dim, range.start..range.start + rows, device);
        held.push(HeldTable {
            theta,
            dim,
            device: device.clone(),
            first: range.start,
            rope: rope.clone(),
        });
        (rope, range.start)
    }
}

/// A call's heads with rotary embeddings (where `theta` is set): queries and keys
/// bottom-right aligned, the keys' positions from `start`.
pub(crate) fn rotate_heads(heads: Heads, theta: Option<f32>, start: usize) -> Heads {
    let Some(theta) = theta else { return heads };
    let (seq_q, seq_k) = (heads.q.dims()[2], heads.k.dims()[2]);
    let q_start = (start + seq_k).saturating_sub(seq_q);
    let k_start = start + seq_q.saturating_sub(seq_k);
    // One table covers both sides' positions.
    let first = q_start.min(k_start);
    let end = (q_start + seq_q).max(k_start + seq_k);
    let dim = heads.q.dims()[3];
    let table = TABLES.covering(theta, dim, first..end, &heads.q.device());
    Heads {
        q: rotate_from(&table, heads.q, q_start),
        k: rotate_from(&table, heads.k, k_start),
        v: heads.v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::cpu;
    use burn::tensor::Distribution;

    /// Rotating from a late position with a table of the call's positions only equals
    /// burn-nn's table of every position up to them, bit for bit.
    #[test]
    fn a_late_start_equals_the_whole_table() {
        let x = Tensor::<4>::random([2, 3, 5, 8], Distribution::Normal(0.0, 1.0), &cpu());
        for start in [0, 3, 7, 1000] {
            let whole = RotaryEncodingConfig::new(start + 5, 8)
                .with_theta(100.0)
                .init(&cpu())
                .apply(x.clone(), start);
            let got = rotate(x.clone(), start, 100.0);
            let differ = whole.not_equal(got).int().sum().into_scalar::<i64>();
            assert_eq!(differ, 0, "start {start}: {differ} elements differ");
        }
    }

    /// Held tables serve the positions they cover (the same tensors), a call outside them
    /// replaces its base's table from its first position, long calls build their own, and
    /// at most `HELD_TABLES` are held; every call's rotation equals burn-nn's whole table's.
    #[test]
    fn held_tables_serve_the_positions_they_cover() {
        let tables = RotaryTables(Mutex::new(Vec::new()));
        let device = cpu();
        let held = || -> Vec<(usize, usize)> {
            let held = tables.0.lock().unwrap();
            held.iter()
                .map(|t| (t.first, t.rope.freq_complex.dims()[0]))
                .collect()
        };
        let x = Tensor::<4>::random([1, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let check = |start: usize| {
            let table = tables.covering(100.0, 8, start..start + 6, &device);
            let got = rotate_from(&table, x.clone(), start);
            let whole = RotaryEncodingConfig::new(start + 6, 8)
                .with_theta(100.0)
                .init(&device)
                .apply(x.clone(), start);
            let differ = whole.not_equal(got).int().sum().into_scalar::<i64>();
            assert_eq!(differ, 0, "start {start}");
            table
        };
        let (first, at) = check(0);
        assert_eq!((held(), at), (vec![(0, HELD_ROWS)], 0));
        // Covered: the held tensor itself.
        let (again, _) = check(HELD_ROWS - 6);
        let same = first
            .freq_complex
            .equal(again.freq_complex)
            .all()
            .into_scalar::<bool>();
        assert!(same);
        assert_eq!(held(), vec![(0, HELD_ROWS)]);
        // Past it: a table from the call's first position replaces it.
        check(HELD_ROWS - 5);
        assert_eq!(held(), vec![(HELD_ROWS - 5, HELD_ROWS)]);
        // A call longer than MAX_HELD_ROWS builds its own.
        let long = tables.covering(100.0, 8, 0..MAX_HELD_ROWS + 1, &device);
        assert_eq!(long.0.freq_complex.dims()[0], MAX_HELD_ROWS + 1);
        assert_eq!(held(), vec![(HELD_ROWS - 5, HELD_ROWS)]);
        // Other bases and head dims are held beside it, the oldest dropped past HELD_TABLES.
        for theta in [10.0, 20.0, 30.0, 40.0] {
            tables.covering(theta, 8, 0..4, &device);
        }
        assert_eq!(held().len(), HELD_TABLES);
        assert!(tables.0.lock().unwrap().iter().all(|t| t.theta != 100.0));
    }
}
