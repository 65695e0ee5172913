//! The problem a plan is made for: sizes, dtype, band and layout of one call, checked
//! against what every kernel takes.

use super::{DeviceCaps, Unsupported};

/// Largest head (or value) dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// The largest grid axis CubeCL launches.
const MAX_GRID_AXIS: usize = u16::MAX as usize;

/// The inputs' float type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl Precision {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::BF16 => 2,
        }
    }
}

/// The band and scale of one banded attention call, already resolved by the caller: the
/// window intersected with the causal rule, `None` = unbounded side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandArgs {
    /// Multiplier of `q . k`.
    pub scale: f32,
    /// Visible keys before the aligned query position (`None`: all).
    pub left: Option<usize>,
    /// Visible keys after the aligned query position (`None`: all).
    pub right: Option<usize>,
}

impl BandArgs {
    /// Keys a cube of `rows` consecutive query rows can see (or query rows that can see a
    /// cube of `rows` consecutive keys): its rows' bands together, at most `n`.
    pub fn cube_span(&self, rows: usize, n: usize) -> usize {
        match (self.left, self.right) {
            (Some(l), Some(r)) => l.saturating_add(r).saturating_add(rows).min(n),
            _ => n,
        }
    }

    /// Keys one row sees at most (`usize::MAX` when a side is unbounded).
    pub fn row_keys(&self) -> usize {
        match (self.left, self.right) {
            (Some(left), Some(right)) => left.saturating_add(right).saturating_add(1),
            _ => usize::MAX,
        }
    }

    /// Keys a row of `seq_k` keys sees on average, roughly (a causal or one-sided band
    /// half the keys, a two-sided band its width; the clipping at the ends is ignored).
    pub fn mean_row_keys(&self, seq_k: usize) -> usize {
        match (self.left, self.right) {
            (None, None) => seq_k,
            (Some(_), Some(_)) => self.row_keys().min(seq_k),
            _ => seq_k.div_ceil(2),
        }
    }

    /// Whether a row block's cost grows with its index (no left bound, a right bound:
    /// causal), the case the heavy-first order is for.
    pub fn is_causal_like(&self) -> bool {
        self.left.is_none() && self.right.is_some()
    }
}

/// The sizes of a call, checked against what every kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Batch.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Query rows.
    pub seq_q: usize,
    /// Keys.
    pub seq_k: usize,
    /// Head dim of q and k.
    pub dim: usize,
    /// Head dim of v.
    pub value_dim: usize,
}

impl Sizes {
    /// Checks the shapes `q: [batch, heads, seq_q, dim]`, `k: [batch, kv_heads, seq_k,
    /// dim]`, `v: [batch, kv_heads, seq_k, value_dim]`.
    pub fn check(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<Self, Unsupported> {
        let [batch, heads, seq_q, dim] = q;
        let [k_batch, kv_heads, seq_k, k_dim] = k;
        let [v_batch, v_heads, v_seq, value_dim] = v;
        let kv_ok = kv_heads > 0 && heads.is_multiple_of(kv_heads) && v_heads == kv_heads;
        if k_batch != batch || v_batch != batch || k_dim != dim || v_seq != seq_k || !kv_ok {
            return Err(Unsupported::Shapes(format!(
                "q {q:?}, k {k:?}, v {v:?} do not match (k and v need q's batch, one kv head \
                 count dividing q's heads and one length; k needs q's head dim)"
            )));
        }
        if dim == 0 || dim > MAX_HEAD_DIM || value_dim == 0 || value_dim > MAX_HEAD_DIM {
            return Err(Unsupported::HeadDim {
                dim,
                value_dim,
                max: MAX_HEAD_DIM,
            });
        }
        // Band arithmetic is i32 in the kernels; unbounded sides become seq_q + seq_k.
        let max = (i32::MAX / 4) as usize - 1;
        if seq_q + seq_k > max {
            return Err(Unsupported::Length {
                total: seq_q + seq_k,
                max,
            });
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            dim,
            value_dim,
        })
    }

    /// No output rows (nothing to launch).
    pub fn is_empty(&self) -> bool {
        self.batch * self.heads * self.seq_q == 0
    }

    /// What an unbounded band side becomes in the kernels' i32 arithmetic.
    pub fn unbounded(&self) -> usize {
        self.seq_q + self.seq_k
    }

    /// A band side as the kernels take it: `None` (unbounded) becomes [`Sizes::unbounded`].
    pub fn side(&self, side: Option<usize>) -> i32 {
        side.unwrap_or(self.unbounded()).min(self.unbounded()) as i32
    }

    /// One cube per `block_q` query rows and per (batch, head).
    pub fn query_grid(&self, block_q: usize) -> Result<Grid, Unsupported> {
        Grid::new(self.seq_q, block_q, self.batch * self.heads)
    }

    /// One cube per `block_k` keys and per (batch, kv head).
    pub fn key_grid(&self, block_k: usize) -> Result<Grid, Unsupported> {
        Grid::new(self.seq_k, block_k, self.batch * self.kv_heads)
    }
}

/// A launch grid: `x` cubes along the rows (query rows or keys), `y` along the heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Cubes along the rows.
    pub x: u32,
    /// Cubes along `batch * heads` (or `batch * kv_heads`).
    pub y: u32,
}

impl Grid {
    /// `ceil(rows / block) x y` cubes, within CubeCL's grid limits.
    pub fn new(rows: usize, block: usize, y: usize) -> Result<Self, Unsupported> {
        let x = rows.div_ceil(block);
        if x > MAX_GRID_AXIS || y > MAX_GRID_AXIS {
            return Err(Unsupported::Grid {
                x,
                y,
                max: MAX_GRID_AXIS,
            });
        }
        Ok(Self {
            x: x as u32,
            y: y as u32,
        })
    }
}

/// The width of the kernels' element offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Offsets {
    /// 32-bit offsets: every tensor of the call spans at most `u32::MAX` elements.
    U32,
    /// 64-bit offsets, for tensors past `u32::MAX` elements (slower index arithmetic).
    U64,
}

impl Offsets {
    /// Whether `cp.async` staging compiles at these offsets: CubeCL's bounds-checked
    /// `cp.async` passes the source size in an address-wide register, which ptxas rejects
    /// under 64-bit addressing (calls past 2^32 elements stage with plain loads).
    pub fn take_async_copy(self) -> bool {
        self == Offsets::U32
    }
}

/// One call as the plans see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    /// Checked sizes.
    pub sizes: Sizes,
    /// The inputs' dtype (one for all).
    pub precision: Precision,
    /// Band and scale.
    pub band: BandArgs,
    /// Whether every staged tensor's rows can be copied in 16-byte pieces (contiguous
    /// columns; row, head and batch strides and offset multiples of 16 bytes).
    pub aligned_rows: bool,
    /// Elements spanned by the largest tensor the call reads or writes: one past the
    /// highest element offset a kernel computes (strided views included).
    pub span: usize,
}

impl Problem {
    /// Whether the backward's other tensors follow this (forward) problem: `out` and
    /// `d_out` `[batch, heads, seq_q, value_dim]`, `lse` `[batch, heads, seq_q]`.
    pub fn check_backward_shapes(
        &self,
        out: &[usize],
        lse: &[usize],
        d_out: &[usize],
    ) -> Result<(), Unsupported> {
        let Sizes {
            batch,
            heads,
            seq_q,
            value_dim,
            ..
        } = self.sizes;
        let rows = [batch, heads, seq_q, value_dim];
        if out == rows && d_out == rows && lse == &rows[..3] {
            Ok(())
        } else {
            Err(Unsupported::Shapes(format!(
                "out {out:?}, lse {lse:?}, d_out {d_out:?} do not follow the inputs' rows \
                 {rows:?}"
            )))
        }
    }

    /// The problem of contiguous tensors of these shapes in one dtype (what a call's
    /// metadata says before its buffers exist: fused backends decide from it, and a launch
    /// whose tensors are laid out otherwise makes them contiguous where this problem's plan
    /// would not take them).
    pub fn contiguous(
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        precision: Precision,
        band: BandArgs,
    ) -> Result<Problem, Unsupported> {
        let sizes = Sizes::check(q, k, v)?;
        let chunk = 16 / precision.size();
        let out_rows = [sizes.batch, sizes.heads, sizes.seq_q, sizes.value_dim];
        Ok(Problem {
            sizes,
            precision,
            band,
            aligned_rows: sizes.dim.is_multiple_of(chunk) && sizes.value_dim.is_multiple_of(chunk),
            span: [q, k, v, out_rows]
                .iter()
                .map(|shape| shape.iter().product::<usize>())
                .max()
                .unwrap_or(0),
        })
    }

    /// The offsets the kernels index this call with on `caps`: 32-bit where every tensor
    /// fits them, else 64-bit where the device has them, else why not.
    pub fn offsets(&self, caps: &DeviceCaps) -> Result<Offsets, Unsupported> {
        let max = u32::MAX as usize;
        if self.span <= max {
            Ok(Offsets::U32)
        } else if caps.offsets_64 {
            Ok(Offsets::U64)
        } else {
            Err(Unsupported::Offsets {
                span: self.span,
                max,
                runtime: caps.runtime_name,
            })
        }
    }
}

/// Elements a tensor of `shape` and `strides` spans: one past its highest element offset
/// (0 when empty).
pub fn span(shape: &[usize], strides: &[usize]) -> usize {
    if shape.contains(&0) {
        return 0;
    }
    shape
        .iter()
        .zip(strides)
        .map(|(&n, &stride)| (n - 1).saturating_mul(stride))
        .fold(1usize, usize::saturating_add)
}
