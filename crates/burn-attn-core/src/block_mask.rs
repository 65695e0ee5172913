//! The block-sparse plan of a call: which key blocks each query block visits, fully or
//! partially visible, and the transposed lists (which query blocks visit each key block)
//! for a backward that walks keys. A kernel visits only listed blocks, skips the element
//! rule on full ones and applies it on partial ones.
//!
//! Built in two steps, both with tensor ops on the device (no per-element host loop): a
//! [`BlockCover`] says for every (query block, key block) whether it is empty, partial or
//! full under one rule (a [`KeyPattern`], key padding, document ids), covers of several
//! rules combine with [`BlockCover::intersect`], and [`BlockMask::new`] turns the result
//! into per-block lists.
//!
//! Covers are conservative where rules combine: a block reported empty has no visible key
//! and one reported full has every key (below `seq_k`) visible, but a combination of
//! partial covers stays partial even where the elements happen to be all or none visible.
//! A kernel that applies every rule on partial blocks computes the exact result.

use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::AttentionError;
use crate::options::{aligned, Window};
use crate::pattern::{BlockLayout, KeyPattern, TileCover};

/// The code of [`TileCover::Empty`] in cover tensors; the codes are ordered so that the
/// intersection of two covers is their minimum and the union their maximum.
const EMPTY: i64 = 0;
/// The code of [`TileCover::Partial`].
const PARTIAL: i64 = 1;
/// The code of [`TileCover::Full`].
const FULL: i64 = 2;

/// The block grid a cover or mask is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGrid {
    /// Query rows per block.
    pub block_q: usize,
    /// Key columns per block.
    pub block_k: usize,
    /// Query rows of the call (the last block may be shorter).
    pub seq_q: usize,
    /// Keys of the call (the last block may be shorter).
    pub seq_k: usize,
}

impl BlockGrid {
    /// A grid of `block_q x block_k` blocks over `seq_q` queries and `seq_k` keys.
    ///
    /// # Errors
    /// When a block size or a length is 0.
    pub fn new(
        block_q: usize,
        block_k: usize,
        seq_q: usize,
        seq_k: usize,
    ) -> Result<Self, AttentionError> {
        for (what, value) in [
            ("block_q", block_q),
            ("block_k", block_k),
            ("seq_q", seq_q),
            ("seq_k", seq_k),
        ] {
            if value == 0 {
                return Err(AttentionError::ZeroSize { what });
            }
        }
        // Block arithmetic runs on the device's integers, which are 32-bit on WGPU.
        if seq_q + seq_k > i32::MAX as usize / 2 {
            return Err(AttentionError::Invalid(format!(
                "block masks index positions with 32-bit integers: seq_q {seq_q} + seq_k \
                 {seq_k} must stay below {}",
                i32::MAX / 2
            )));
        }
        Ok(Self {
            block_q,
            block_k,
            seq_q,
            seq_k,
        })
    }

    /// Query blocks: `ceil(seq_q / block_q)`.
    pub fn q_blocks(&self) -> usize {
        self.seq_q.div_ceil(self.block_q)
    }

    /// Key blocks: `ceil(seq_k / block_k)`.
    pub fn k_blocks(&self) -> usize {
        self.seq_k.div_ceil(self.block_k)
    }

    /// First and last position of every block of `block` rows over `len`, `[blocks]` each.
    fn block_edges(block: usize, len: usize, device: &Device) -> (Tensor<1, Int>, Tensor<1, Int>) {
        let blocks = len.div_ceil(block) as i64;
        let first = Tensor::<1, Int>::arange(0..blocks, device).mul_scalar(block as i64);
        let last = first
            .clone()
            .add_scalar(block as i64 - 1)
            .clamp_max(len as i64 - 1);
        (first, last)
    }

    /// The first and last query row and key of every block.
    fn edges(&self, device: &Device) -> BlockEdges {
        let (q_first, q_last) = Self::block_edges(self.block_q, self.seq_q, device);
        let (k_first, k_last) = Self::block_edges(self.block_k, self.seq_k, device);
        BlockEdges {
            q_first,
            q_last,
            k_first,
            k_last,
        }
    }
}

/// First and last query row (`[q_blocks]`) and key (`[k_blocks]`) of every block of a grid.
struct BlockEdges {
    q_first: Tensor<1, Int>,
    q_last: Tensor<1, Int>,
    k_first: Tensor<1, Int>,
    k_last: Tensor<1, Int>,
}

/// For every (query block, key block) of a [`BlockGrid`], whether no key, some keys or
/// every key (below `seq_k`) of the block is visible to every query of the block, under
/// one rule or an intersection of rules.
#[derive(Debug, Clone)]
pub struct BlockCover {
    grid: BlockGrid,
    /// `[batch or 1, heads or 1, q_blocks, k_blocks]`: the cover codes.
    codes: Tensor<4, Int>,
}

impl BlockCover {
    /// The grid the cover is on.
    pub fn grid(&self) -> BlockGrid {
        self.grid
    }

    /// The cover of a [`KeyPattern`] (band, causal rule, strided columns, block layout);
    /// `[1, 1, q_blocks, k_blocks]`.
    ///
    /// # Errors
    /// When the pattern does not validate for the grid's lengths.
    pub fn of_pattern(
        pattern: &KeyPattern,
        grid: BlockGrid,
        device: &Device,
    ) -> Result<Self, AttentionError> {
        pattern.validate(grid.seq_q, grid.seq_k)?;
        let edges = grid.edges(device);
        let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
        let offset = aligned(0, grid.seq_q, grid.seq_k);
        // Differences j - (i + offset) over each block: the band rules are bounds on them.
        let min_diff = edges.k_first.clone().reshape([1, kb]).expand([qb, kb])
            - edges
                .q_last
                .clone()
                .reshape([qb, 1])
                .add_scalar(offset)
                .expand([qb, kb]);
        let max_diff = edges.k_last.clone().reshape([1, kb]).expand([qb, kb])
            - edges
                .q_first
                .clone()
                .reshape([qb, 1])
                .add_scalar(offset)
                .expand([qb, kb]);
        let unbounded = (grid.seq_q + grid.seq_k) as i64;
        let band = |w: Window| {
            let lo = w
                .left
                .map_or(-unbounded, |l| -(l.min(unbounded as usize) as i64));
            let hi = w
                .right
                .map_or(unbounded, |r| r.min(unbounded as usize) as i64);
            let empty = max_diff
                .clone()
                .lower_elem(lo)
                .bool_or(min_diff.clone().greater_elem(hi));
            let full = min_diff
                .clone()
                .greater_equal_elem(lo)
                .bool_and(max_diff.clone().lower_equal_elem(hi));
            codes_of(empty, full)
        };
        let mut codes = band(pattern.window);
        if let Some(stride) = pattern.stride_within(grid.seq_k) {
            let s = stride as i64;
            // Whether the block holds a multiple of the stride: its first one from the
            // block's first key is at or before the block's last key.
            let first_multiple = edges
                .k_first
                .clone()
                .add_scalar(s - 1)
                .div_scalar(s)
                .mul_scalar(s);
            let holds = first_multiple.lower_equal(edges.k_last.clone());
            let strided = if stride == 1 {
                Tensor::<1, Int>::full([kb], FULL, device)
            } else {
                holds.int().mul_scalar(PARTIAL)
            };
            codes = codes.max_pair(strided.reshape([1, kb]).expand([qb, kb]));
        }
        if pattern.causal {
            codes = codes.min_pair(band(Window::new(None, Some(0))));
        }
        if let Some(layout) = &pattern.blocks {
            codes = codes.min_pair(layout_codes(layout, grid, &edges, device));
        }
        Ok(Self {
            grid,
            codes: codes.reshape([1, 1, qb, kb]),
        })
    }

    /// The cover of a key padding mask (`[batch, seq_k]`, `true` where the key is padding
    /// and hidden from every query); `[batch, 1, q_blocks, k_blocks]`.
    ///
    /// # Errors
    /// When `padding` is not `[batch, seq_k]` for the grid's `seq_k`.
    pub fn of_key_padding(
        padding: Tensor<2, Bool>,
        grid: BlockGrid,
    ) -> Result<Self, AttentionError> {
        let [batch, seq_k] = padding.dims();
        if seq_k != grid.seq_k {
            return Err(AttentionError::Invalid(format!(
                "key padding of shape [{batch}, {seq_k}] for seq_k {}: expected [batch, {}]",
                grid.seq_k, grid.seq_k
            )));
        }
        Self::of_hidden_keys(padding.reshape([batch, 1, seq_k]), grid)
    }

    /// The cover of keys hidden per batch and head (`[batch or 1, heads or 1, seq_k]`,
    /// `true` where every query of that batch and head must not see the key: padding, or
    /// keys a learned selection leaves out); `[batch or 1, heads or 1, q_blocks, k_blocks]`.
    ///
    /// # Errors
    /// When the last dimension is not the grid's `seq_k`.
    pub fn of_hidden_keys(
        hidden: Tensor<3, Bool>,
        grid: BlockGrid,
    ) -> Result<Self, AttentionError> {
        let [batch, heads, seq_k] = hidden.dims();
        if seq_k != grid.seq_k {
            return Err(AttentionError::Invalid(format!(
                "hidden keys of shape [{batch}, {heads}, {seq_k}] for seq_k {}: expected \
                 [batch, heads, {}]",
                grid.seq_k, grid.seq_k
            )));
        }
        let (qb, kb, bk) = (grid.q_blocks(), grid.k_blocks(), grid.block_k);
        let tail = kb * bk - seq_k;
        // Keys past seq_k are outside the call: they count neither way.
        let visible = hidden
            .bool_not()
            .int()
            .pad([(0, tail)], burn::tensor::ops::PadMode::Constant(0.0))
            .reshape([batch, heads, kb, bk])
            .sum_dim(3)
            .reshape([batch, heads, kb]);
        let device = visible.device();
        let (k_first, k_last) = BlockGrid::block_edges(bk, seq_k, &device);
        let real = (k_last - k_first)
            .add_scalar(1)
            .reshape([1, 1, kb])
            .expand([batch, heads, kb]);
        let codes = codes_of(visible.clone().equal_elem(0), visible.equal(real));
        Ok(Self {
            grid,
            codes: codes
                .reshape([batch, heads, 1, kb])
                .expand([batch, heads, qb, kb]),
        })
    }

    /// The cover of a dense attention mask (`[batch, seq_q, seq_k]`, `true` where query `i`
    /// must not see key `j`); `[batch, 1, q_blocks, k_blocks]`. Counts each block's visible
    /// pairs: none is empty, all (inside the call) is full.
    ///
    /// # Errors
    /// When `mask` is not `[batch, seq_q, seq_k]` for the grid's lengths.
    pub fn of_attention_mask(
        mask: Tensor<3, Bool>,
        grid: BlockGrid,
    ) -> Result<Self, AttentionError> {
        let [batch, seq_q, seq_k] = mask.dims();
        if (seq_q, seq_k) != (grid.seq_q, grid.seq_k) {
            return Err(AttentionError::Invalid(format!(
                "attention mask of shape [{batch}, {seq_q}, {seq_k}] for seq_q {} and seq_k {}: \
                 expected [batch, {}, {}]",
                grid.seq_q, grid.seq_k, grid.seq_q, grid.seq_k
            )));
        }
        let (qb, kb, bq, bk) = (grid.q_blocks(), grid.k_blocks(), grid.block_q, grid.block_k);
        // Pairs past the call's lengths count neither way.
        let visible = mask
            .bool_not()
            .int()
            .pad(
                [(0, qb * bq - seq_q), (0, kb * bk - seq_k)],
                burn::tensor::ops::PadMode::Constant(0.0),
            )
            .reshape([batch, qb, bq, kb, bk])
            .sum_dim(4)
            .sum_dim(2)
            .reshape([batch, qb, kb]);
        let device = visible.device();
        let edges = grid.edges(&device);
        let rows = (edges.q_last - edges.q_first).add_scalar(1);
        let cols = (edges.k_last - edges.k_first).add_scalar(1);
        let real = rows.reshape([1, qb, 1]).expand([batch, qb, kb])
            * cols.reshape([1, 1, kb]).expand([batch, qb, kb]);
        let codes = codes_of(visible.clone().equal_elem(0), visible.equal(real));
        Ok(Self {
            grid,
            codes: codes.reshape([batch, 1, qb, kb]),
        })
    }

    /// The cover of document ids (packed sequences): query `i` sees key `j` only when
    /// `doc_q[b, i] == doc_k[b, j]`. Ids must not decrease along a sequence (documents are
    /// contiguous runs). `doc_q` is `[batch, seq_q]`, `doc_k` `[batch, seq_k]` (the same
    /// tensor for self-attention); the cover is `[batch, 1, q_blocks, k_blocks]`.
    ///
    /// # Errors
    /// When the shapes do not match the grid or each other, or ids decrease (naming the
    /// first such position).
    pub fn of_documents(
        doc_q: Tensor<2, Int>,
        doc_k: Tensor<2, Int>,
        grid: BlockGrid,
    ) -> Result<Self, AttentionError> {
        let ([bq, sq], [bk_batch, sk]) = (doc_q.dims(), doc_k.dims());
        if bq != bk_batch || sq != grid.seq_q || sk != grid.seq_k {
            return Err(AttentionError::Invalid(format!(
                "document ids of shapes [{bq}, {sq}] (queries) and [{bk_batch}, {sk}] (keys) \
                 for seq_q {} and seq_k {}: expected [batch, {}] and [batch, {}]",
                grid.seq_q, grid.seq_k, grid.seq_q, grid.seq_k
            )));
        }
        check_documents_order(&doc_q, &doc_k)?;
        Ok(Self::of_sorted_documents(doc_q, doc_k, grid))
    }

    /// [`BlockCover::of_documents`] of ids already checked against the grid and the order.
    pub(crate) fn of_sorted_documents(
        doc_q: Tensor<2, Int>,
        doc_k: Tensor<2, Int>,
        grid: BlockGrid,
    ) -> Self {
        let [bq, _] = doc_q.dims();
        let (q_min, q_max) = block_extremes(doc_q, grid.block_q);
        let (k_min, k_max) = block_extremes(doc_k, grid.block_k);
        let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
        let rows = |t: Tensor<2, Int>| t.reshape([bq, qb, 1]).expand([bq, qb, kb]);
        let cols = |t: Tensor<2, Int>| t.reshape([bq, 1, kb]).expand([bq, qb, kb]);
        // Sorted ids: disjoint ranges share no document; one document on both sides is full.
        let empty = rows(q_max.clone())
            .lower(cols(k_min.clone()))
            .bool_or(cols(k_max.clone()).lower(rows(q_min.clone())));
        let full = rows(q_min.clone())
            .equal(rows(q_max))
            .bool_and(cols(k_min.clone()).equal(cols(k_max)))
            .bool_and(rows(q_min).equal(cols(k_min)));
        Self {
            grid,
            codes: codes_of(empty, full).reshape([bq, 1, qb, kb]),
        }
    }

    /// The cover of the intersection of two rules (a key is visible when both let it
    /// be). Batch and head dimensions of size 1 broadcast.
    ///
    /// # Errors
    /// When the grids differ or the batch or head dimensions do not broadcast.
    pub fn intersect(self, other: BlockCover) -> Result<Self, AttentionError> {
        if self.grid != other.grid {
            return Err(AttentionError::Invalid(format!(
                "block covers on different grids: {:?} and {:?}",
                self.grid, other.grid
            )));
        }
        let ([b1, h1, qb, kb], [b2, h2, ..]) = (self.codes.dims(), other.codes.dims());
        let joint = |a: usize, b: usize, what: &str| match (a, b) {
            _ if a == b || b == 1 => Ok(a),
            (1, _) => Ok(b),
            _ => Err(AttentionError::Invalid(format!(
                "block covers with {what} {a} and {b} do not broadcast"
            ))),
        };
        let shape = [joint(b1, b2, "batch")?, joint(h1, h2, "heads")?, qb, kb];
        Ok(Self {
            grid: self.grid,
            codes: self.codes.expand(shape).min_pair(other.codes.expand(shape)),
        })
    }

    /// The cover of a call of `seq_q` queries and `seq_k` keys inside the lengths the cover
    /// was built for, under a rule of positions alone (a [`KeyPattern`] without a block
    /// layout: bands, the causal rule and strided columns see only a query's aligned
    /// position and a key's index). The call's keys are the cover's first `seq_k`; its
    /// query `i` sits at key position `i + seq_k - seq_q`, which is the cover's query row
    /// `i + r0` with `r0 = (seq_k - seq_q) - (built seq_k - built seq_q)`. A module builds
    /// its pattern's cover once and serves shorter calls and decoding steps (a few queries
    /// against a growing cache) with it.
    ///
    /// Sound: a call block inside one built block keeps its code (a block empty or full
    /// for the longer lengths is so for any part of it), a call block across two built
    /// blocks (`r0` not a multiple of `block_q`) is empty or full only where both are, and
    /// is partial otherwise.
    ///
    /// # Errors
    /// When a length is 0, `seq_k` exceeds the built one, or `r0` is negative (the call's
    /// first query would sit before the cover's first row).
    pub fn part(&self, seq_q: usize, seq_k: usize) -> Result<Self, AttentionError> {
        let g = self.grid;
        let r0 = (seq_k as i64 - seq_q as i64) - (g.seq_k as i64 - g.seq_q as i64);
        if seq_q == 0 || seq_k == 0 || seq_k > g.seq_k || r0 < 0 {
            return Err(AttentionError::Invalid(format!(
                "a block cover built for seq_q {}, seq_k {} serves calls of at most seq_k {} \
                 whose queries sit at its rows (seq_k - seq_q at least {}), not seq_q \
                 {seq_q}, seq_k {seq_k}",
                g.seq_q,
                g.seq_k,
                g.seq_k,
                g.seq_k as i64 - g.seq_q as i64
            )));
        }
        let r0 = r0 as usize;
        let grid = BlockGrid::new(g.block_q, g.block_k, seq_q, seq_k)?;
        let [b, h, built_qb, _] = self.codes.dims();
        let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
        let first = r0 / g.block_q;
        let rows = |from: usize| {
            self.codes
                .clone()
                .slice([0..b, 0..h, from..from + qb, 0..kb])
        };
        let codes = if r0.is_multiple_of(g.block_q) {
            rows(first)
        } else {
            // Call block `r` holds rows of built blocks `first + r` and `first + r + 1`;
            // past the built rows, the last call block holds rows of one built block only.
            let upper = rows(first);
            let lower = if first + qb < built_qb {
                rows(first + 1)
            } else if qb > 1 {
                let last = upper.clone().slice([0..b, 0..h, qb - 1..qb, 0..kb]);
                Tensor::cat(
                    vec![upper.clone().slice([0..b, 0..h, 1..qb, 0..kb]), last],
                    2,
                )
            } else {
                upper.clone()
            };
            let same = upper.clone().equal(lower);
            Tensor::<4, Int>::full(upper.dims(), PARTIAL, &upper.device()).mask_where(same, upper)
        };
        Ok(Self { grid, codes })
    }

    /// The cover codes, `[batch or 1, heads or 1, q_blocks, k_blocks]`, as
    /// [`TileCover`]s read back to the host (for tests and tools).
    pub fn to_covers(&self) -> Vec<TileCover> {
        codes_to_covers(self.codes.clone())
    }

    /// The dimensions of the cover: `[batch or 1, heads or 1, q_blocks, k_blocks]`.
    pub fn dims(&self) -> [usize; 4] {
        self.codes.dims()
    }
}

/// The per-block lists a kernel walks: for each (batch, head, query block) the key blocks
/// with some visible key, split into partially visible (the element rules apply) and fully
/// visible (they do not), each in increasing order; and the same transposed, for each key
/// block the query blocks that visit it. Batch and head dimensions are 1 where the cover's
/// are (the rule is the same for every batch or head).
#[derive(Debug, Clone)]
pub struct BlockMask {
    grid: BlockGrid,
    /// Per query block: `[b, h, q_blocks]` counts and `[b, h, q_blocks, k_blocks]` key
    /// blocks (the first `count` entries; the other key blocks follow, in order).
    pub partial_count: Tensor<3, Int>,
    /// The partially visible key blocks of each query block.
    pub partial_index: Tensor<4, Int>,
    /// How many key blocks each query block sees whole.
    pub full_count: Tensor<3, Int>,
    /// The fully visible key blocks of each query block.
    pub full_index: Tensor<4, Int>,
    /// Per key block: `[b, h, k_blocks]` counts of query blocks that see it partially.
    pub t_partial_count: Tensor<3, Int>,
    /// `[b, h, k_blocks, q_blocks]`: those query blocks.
    pub t_partial_index: Tensor<4, Int>,
    /// Per key block: counts of query blocks that see it whole.
    pub t_full_count: Tensor<3, Int>,
    /// Those query blocks.
    pub t_full_index: Tensor<4, Int>,
}

impl BlockMask {
    /// The lists in `dtype` (the kernels read i32: a plan kept across calls is cast once).
    pub(crate) fn cast(self, dtype: burn::tensor::IntDType) -> Self {
        Self {
            grid: self.grid,
            partial_count: self.partial_count.cast(dtype),
            partial_index: self.partial_index.cast(dtype),
            full_count: self.full_count.cast(dtype),
            full_index: self.full_index.cast(dtype),
            t_partial_count: self.t_partial_count.cast(dtype),
            t_partial_index: self.t_partial_index.cast(dtype),
            t_full_count: self.t_full_count.cast(dtype),
            t_full_index: self.t_full_index.cast(dtype),
        }
    }

    /// The lists of `cover`.
    pub fn new(cover: BlockCover) -> Self {
        let (partial_count, partial_index) = lists(cover.codes.clone(), PARTIAL);
        let (full_count, full_index) = lists(cover.codes.clone(), FULL);
        let transposed = cover.codes.swap_dims(2, 3);
        let (t_partial_count, t_partial_index) = lists(transposed.clone(), PARTIAL);
        let (t_full_count, t_full_index) = lists(transposed, FULL);
        Self {
            grid: cover.grid,
            partial_count,
            partial_index,
            full_count,
            full_index,
            t_partial_count,
            t_partial_index,
            t_full_count,
            t_full_index,
        }
    }

    /// The grid the mask is on.
    pub fn grid(&self) -> BlockGrid {
        self.grid
    }

    /// Checks that the mask serves a call of `batch` x `heads` over `seq_q` queries and
    /// `seq_k` keys: the lengths it was built for, and batch and head dimensions that are
    /// the call's or 1.
    ///
    /// # Errors
    /// Naming the mask's and the call's values.
    pub fn check(
        &self,
        batch: usize,
        heads: usize,
        seq_q: usize,
        seq_k: usize,
    ) -> Result<(), AttentionError> {
        let [mb, mh, ..] = self.partial_index.dims();
        let fits = |m: usize, n: usize| m == n || m == 1;
        if (self.grid.seq_q, self.grid.seq_k) != (seq_q, seq_k)
            || !fits(mb, batch)
            || !fits(mh, heads)
        {
            return Err(AttentionError::Invalid(format!(
                "block mask built for batch {mb}, heads {mh}, seq_q {}, seq_k {} used for \
                 batch {batch}, heads {heads}, seq_q {seq_q}, seq_k {seq_k}",
                self.grid.seq_q, self.grid.seq_k
            )));
        }
        Ok(())
    }

    /// The fraction of (query block, key block) pairs visited (partial or full), over
    /// every batch and head of the mask: the work a block-sparse kernel does relative to
    /// dense attention. Reads back to the host.
    pub fn visited_fraction(&self) -> f64 {
        let [b, h, qb, kb] = self.partial_index.dims();
        let visited = (self.partial_count.clone() + self.full_count.clone())
            .sum()
            .into_scalar::<i64>();
        visited as f64 / (b * h * qb * kb) as f64
    }
}

/// Codes from the two exclusive conditions: empty, else full, else partial.
fn codes_of<const D: usize>(empty: Tensor<D, Bool>, full: Tensor<D, Bool>) -> Tensor<D, Int> {
    let partial = empty.clone().bool_or(full.clone()).bool_not();
    full.int().mul_scalar(FULL) + partial.int().mul_scalar(PARTIAL)
}

/// Reads codes back as covers, in row-major order.
fn codes_to_covers<const D: usize>(codes: Tensor<D, Int>) -> Vec<TileCover> {
    codes
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|c| match c {
            EMPTY => TileCover::Empty,
            PARTIAL => TileCover::Partial,
            _ => TileCover::Full,
        })
        .collect()
}

/// The cover of a block layout on the grid: a grid block is empty when every layout block
/// it overlaps is inactive and full when every one is active. Counts active layout blocks
/// over each grid block's rectangle with a 2-D prefix sum.
fn layout_codes(
    layout: &BlockLayout,
    grid: BlockGrid,
    edges: &BlockEdges,
    device: &Device,
) -> Tensor<2, Int> {
    let (lq, lk) = (layout.q_blocks, layout.k_blocks);
    let active: Vec<i64> = layout.active.iter().map(|&a| i64::from(a)).collect();
    let active = Tensor::<2, Int>::from_data(TensorData::new(active, [lq, lk]), device);
    // prefix[r][c]: active blocks in layout rows < r and columns < c.
    let prefix = active
        .cumsum(0)
        .cumsum(1)
        .pad([(1, 0), (1, 0)], burn::tensor::ops::PadMode::Constant(0.0))
        .reshape([(lq + 1) * (lk + 1)]);
    let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
    let layout_block = |pos: &Tensor<1, Int>, size: usize| pos.clone().div_scalar(size as i64);
    let r0 = layout_block(&edges.q_first, layout.block_q);
    let r1 = layout_block(&edges.q_last, layout.block_q).add_scalar(1);
    let c0 = layout_block(&edges.k_first, layout.block_k);
    let c1 = layout_block(&edges.k_last, layout.block_k).add_scalar(1);
    let row = |r: Tensor<1, Int>| {
        r.mul_scalar((lk + 1) as i64)
            .reshape([qb, 1])
            .expand([qb, kb])
    };
    let col = |c: Tensor<1, Int>| c.reshape([1, kb]).expand([qb, kb]);
    let at = |index: Tensor<2, Int>| {
        prefix
            .clone()
            .select(0, index.reshape([qb * kb]))
            .reshape([qb, kb])
    };
    let count = at(row(r1.clone()) + col(c1.clone()))
        - at(row(r0.clone()) + col(c1.clone()))
        - at(row(r1.clone()) + col(c0.clone()))
        + at(row(r0.clone()) + col(c0.clone()));
    let area =
        (r1 - r0).reshape([qb, 1]).expand([qb, kb]) * (c1 - c0).reshape([1, kb]).expand([qb, kb]);
    codes_of(count.clone().equal_elem(0), count.equal(area))
}

/// Per block of `block` positions along the last dim of `ids` (`[batch, len]`), the
/// smallest and largest id, `[batch, blocks]` each.
fn block_extremes(ids: Tensor<2, Int>, block: usize) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let [batch, len] = ids.dims();
    let blocks = len.div_ceil(block);
    // Repeating the last id leaves the last block's extremes as they are.
    let padded = ids
        .pad(
            [(0, blocks * block - len)],
            burn::tensor::ops::PadMode::Edge,
        )
        .reshape([batch, blocks, block]);
    (
        padded.clone().min_dim(2).reshape([batch, blocks]),
        padded.max_dim(2).reshape([batch, blocks]),
    )
}

/// An error naming the first position where the query or key document ids decrease
/// along a sequence. One value is read back when both are in order (a call's only sync).
pub(crate) fn check_documents_order(
    doc_q: &Tensor<2, Int>,
    doc_k: &Tensor<2, Int>,
) -> Result<(), AttentionError> {
    let decreases = |ids: &Tensor<2, Int>| {
        let [batch, len] = ids.dims();
        (len >= 2).then(|| {
            let step =
                ids.clone().slice([0..batch, 1..len]) - ids.clone().slice([0..batch, 0..len - 1]);
            step.lower_elem(0).int()
        })
    };
    let (dq, dk) = (decreases(doc_q), decreases(doc_k));
    let total = [&dq, &dk]
        .into_iter()
        .flatten()
        .map(|d| d.clone().sum())
        .reduce(|a, b| a + b);
    if total.is_none_or(|t| t.into_scalar::<i64>() == 0) {
        return Ok(());
    }
    for (side, ids, decreases) in [("query", doc_q, dq), ("key", doc_k, dk)] {
        let Some(decreases) = decreases else { continue };
        let [batch, len] = ids.dims();
        if decreases.clone().sum().into_scalar::<i64>() == 0 {
            continue;
        }
        let first = decreases
            .reshape([batch * (len - 1)])
            .argmax(0)
            .into_scalar::<i64>() as usize;
        let (b, i) = (first / (len - 1), first % (len - 1));
        let values = ids
            .clone()
            .slice([b..b + 1, i..i + 2])
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("int data");
        return Err(AttentionError::Invalid(format!(
            "{side} document ids must not decrease along a sequence: batch {b}, positions {i} \
             and {} hold {} then {}",
            i + 1,
            values[0],
            values[1]
        )));
    }
    Ok(())
}

/// For each row of `codes` (`[b, h, rows, cols]`), how many entries hold `code` and their
/// column indices in increasing order (then the other columns, also in order). Device ops
/// only (Burn's sort reads back to the host): each column's place in the list is a running
/// count, and the columns are scattered to their places.
fn lists(codes: Tensor<4, Int>, code: i64) -> (Tensor<3, Int>, Tensor<4, Int>) {
    let [b, h, rows, cols] = codes.dims();
    let shape = [b, h, rows, cols];
    let hit = codes.equal_elem(code);
    let hits = hit.clone().int();
    let before = hits.clone().cumsum(3) - hits.clone();
    let count = hits.clone().sum_dim(3);
    let column = Tensor::<1, Int>::arange(0..cols as i64, &hit.device())
        .reshape([1, 1, 1, cols])
        .expand(shape);
    // Column c after `before` hits holds place `before` if it is a hit, else the count plus
    // the misses before it (c - before).
    let miss_place = count.clone().expand(shape) + column.clone() - before.clone();
    let place = miss_place.mask_where(hit, before);
    let index = Tensor::<4, Int>::zeros(shape, &column.device()).scatter(
        3,
        place,
        column,
        IndexingUpdateOp::Add,
    );
    (count.reshape([b, h, rows]), index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The exact cover of the elements `visible(i, j)` of block `(qb, kb)`.
    fn exact(
        grid: BlockGrid,
        qb: usize,
        kb: usize,
        visible: impl Fn(usize, usize) -> bool,
    ) -> TileCover {
        let rows = qb * grid.block_q..((qb + 1) * grid.block_q).min(grid.seq_q);
        let cols = kb * grid.block_k..((kb + 1) * grid.block_k).min(grid.seq_k);
        let seen: Vec<bool> = rows
            .flat_map(|i| cols.clone().map(move |j| (i, j)))
            .map(|(i, j)| visible(i, j))
            .collect();
        match (seen.iter().any(|v| *v), seen.iter().all(|v| *v)) {
            (false, _) => TileCover::Empty,
            (true, true) => TileCover::Full,
            (true, false) => TileCover::Partial,
        }
    }

    /// Asserts `got` is sound against `want` (an empty or full cover is exactly that),
    /// and equal to it when `tight`.
    fn assert_cover(got: TileCover, want: TileCover, tight: bool, what: &str) {
        if tight {
            assert_eq!(got, want, "{what}");
        } else if got != TileCover::Partial {
            assert_eq!(
                got, want,
                "{what}: a conservative cover must be partial or exact"
            );
        }
    }

    fn patterns(seq_q: usize, seq_k: usize) -> Vec<(KeyPattern, bool)> {
        let band = |w, causal| (KeyPattern::band(w, causal), true);
        vec![
            band(Window::FULL, false),
            band(Window::FULL, true),
            band(Window::symmetric(6), false),
            band(Window::new(Some(0), Some(3)), true),
            band(Window::new(Some(4), Some(0)), false),
            band(Window::new(Some(usize::MAX), None), true),
            (
                KeyPattern {
                    window: Window::symmetric(4),
                    stride: Some(5),
                    causal: true,
                    blocks: None,
                },
                false,
            ),
            (
                KeyPattern {
                    window: Window::new(Some(0), Some(0)),
                    stride: Some(1),
                    ..KeyPattern::default()
                },
                true,
            ),
            // A stride past any length: column 0 only.
            (
                KeyPattern {
                    window: Window::new(Some(1), Some(1)),
                    stride: Some(usize::MAX),
                    ..KeyPattern::default()
                },
                false,
            ),
            (
                KeyPattern {
                    blocks: Some(BlockLayout::random(seq_q, seq_k, 4, 0.3, 7).unwrap()),
                    ..KeyPattern::default()
                },
                false,
            ),
            (
                KeyPattern {
                    causal: true,
                    blocks: Some(BlockLayout::random(seq_q, seq_k, 3, 0.5, 1).unwrap()),
                    ..KeyPattern::default()
                },
                false,
            ),
        ]
    }

    #[test]
    fn pattern_covers_match_the_scalar_definition() {
        let device = Device::ndarray();
        let mut decided = 0;
        for (seq_q, seq_k) in [(13, 13), (5, 17), (17, 5), (1, 9), (40, 40)] {
            for (block_q, block_k) in [(4, 4), (3, 5), (8, 2), (16, 16)] {
                let grid = BlockGrid::new(block_q, block_k, seq_q, seq_k).unwrap();
                for (pattern, tight) in patterns(seq_q, seq_k) {
                    let cover = BlockCover::of_pattern(&pattern, grid, &device).unwrap();
                    assert_eq!(cover.dims(), [1, 1, grid.q_blocks(), grid.k_blocks()]);
                    for (at, got) in cover.to_covers().into_iter().enumerate() {
                        let (qb, kb) = (at / grid.k_blocks(), at % grid.k_blocks());
                        let want = exact(grid, qb, kb, |i, j| pattern.visible(i, j, seq_q, seq_k));
                        let what = format!("{pattern:?} {grid:?} block ({qb}, {kb})");
                        assert_cover(got, want, tight, &what);
                        decided += usize::from(got != TileCover::Partial);
                    }
                }
            }
        }
        assert!(decided > 1000, "only {decided} blocks decided");
    }

    #[test]
    fn key_padding_cover_is_exact() {
        let device = Device::ndarray();
        let mut rng = StdRng::seed_from_u64(3);
        let (batch, seq_q, seq_k) = (3, 6, 19);
        // Runs of padding long enough to make blocks wholly padded or wholly kept.
        let pad: Vec<bool> = (0..batch * seq_k)
            .map(|i| (i / 5 + rng.random_range(0..2)) % 2 == 0)
            .collect();
        let padding =
            Tensor::<2, Bool>::from_data(TensorData::new(pad.clone(), [batch, seq_k]), &device);
        for block_k in [1, 4, 5, 19, 32] {
            let grid = BlockGrid::new(4, block_k, seq_q, seq_k).unwrap();
            let cover = BlockCover::of_key_padding(padding.clone(), grid).unwrap();
            let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
            assert_eq!(cover.dims(), [batch, 1, qb, kb]);
            for (at, got) in cover.to_covers().into_iter().enumerate() {
                let (b, q, k) = (at / (qb * kb), at / kb % qb, at % kb);
                let want = exact(grid, q, k, |_, j| !pad[b * seq_k + j]);
                assert_eq!(got, want, "block_k {block_k}, batch {b}, block ({q}, {k})");
            }
        }
    }

    /// Sorted random document ids, `[batch, len]`.
    fn documents(batch: usize, len: usize, seed: u64) -> Vec<i64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..batch)
            .flat_map(|_| {
                let mut doc = 0;
                (0..len)
                    .map(|_| {
                        doc += i64::from(rng.random_range(0..6) == 0);
                        doc
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn document_covers_match_the_scalar_definition() {
        let device = Device::ndarray();
        let (batch, seq) = (2, 37);
        let ids = documents(batch, seq, 11);
        let docs = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [batch, seq]), &device);
        let mut decided = 0;
        for (block_q, block_k) in [(4, 4), (3, 8), (16, 5)] {
            let grid = BlockGrid::new(block_q, block_k, seq, seq).unwrap();
            let cover = BlockCover::of_documents(docs.clone(), docs.clone(), grid).unwrap();
            let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
            for (at, got) in cover.to_covers().into_iter().enumerate() {
                let (b, q, k) = (at / (qb * kb), at / kb % qb, at % kb);
                let want = exact(grid, q, k, |i, j| ids[b * seq + i] == ids[b * seq + j]);
                assert_cover(
                    got,
                    want,
                    false,
                    &format!("{grid:?} batch {b} block ({q}, {k})"),
                );
                decided += usize::from(got != TileCover::Partial);
            }
        }
        assert!(decided > 100, "only {decided} blocks decided");
    }

    #[test]
    fn mask_lists_follow_the_intersected_cover() {
        let device = Device::ndarray();
        let (batch, seq) = (2, 29);
        let grid = BlockGrid::new(4, 3, seq, seq).unwrap();
        let pattern = KeyPattern::band(Window::symmetric(8), true);
        let pad: Vec<bool> = (0..batch * seq)
            .map(|i| i % seq >= 20 + i / seq * 4)
            .collect();
        let padding = Tensor::<2, Bool>::from_data(TensorData::new(pad, [batch, seq]), &device);
        let cover = BlockCover::of_pattern(&pattern, grid, &device)
            .unwrap()
            .intersect(BlockCover::of_key_padding(padding, grid).unwrap())
            .unwrap();
        let (qb, kb) = (grid.q_blocks(), grid.k_blocks());
        assert_eq!(cover.dims(), [batch, 1, qb, kb]);
        let covers = cover.to_covers();
        let mask = BlockMask::new(cover);
        let ints = |t: Tensor<3, Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let ints4 = |t: Tensor<4, Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let lists = [
            (
                mask.partial_count.clone(),
                mask.partial_index.clone(),
                TileCover::Partial,
                false,
            ),
            (
                mask.full_count.clone(),
                mask.full_index.clone(),
                TileCover::Full,
                false,
            ),
            (
                mask.t_partial_count.clone(),
                mask.t_partial_index.clone(),
                TileCover::Partial,
                true,
            ),
            (
                mask.t_full_count.clone(),
                mask.t_full_index.clone(),
                TileCover::Full,
                true,
            ),
        ];
        let mut visited = 0;
        for (count, index, kind, transposed) in lists {
            let (rows, cols) = if transposed { (kb, qb) } else { (qb, kb) };
            let (count, index) = (ints(count), ints4(index));
            for b in 0..batch {
                for r in 0..rows {
                    let want: Vec<i64> = (0..cols)
                        .filter(|&c| {
                            let (q, k) = if transposed { (c, r) } else { (r, c) };
                            covers[(b * qb + q) * kb + k] == kind
                        })
                        .map(|c| c as i64)
                        .collect();
                    let n = count[b * rows + r] as usize;
                    assert_eq!(n, want.len());
                    // The listed blocks, then the others, each in order.
                    let rest = (0..cols as i64).filter(|c| !want.contains(c));
                    let want: Vec<i64> = want.iter().copied().chain(rest).collect();
                    let row = &index[(b * rows + r) * cols..(b * rows + r + 1) * cols];
                    assert_eq!(
                        row,
                        &want[..],
                        "{kind:?} transposed {transposed} batch {b} row {r}"
                    );
                    visited += usize::from(!transposed) * n;
                }
            }
        }
        let fraction = visited as f64 / (batch * qb * kb) as f64;
        assert!(fraction > 0.1 && fraction < 0.9, "{fraction}");
        assert!((mask.visited_fraction() - fraction).abs() < 1e-12);
        // Per-batch lists serve their batch only; a head dimension of 1 serves any heads.
        mask.check(batch, 5, seq, seq).unwrap();
        let err = mask.check(3, 1, seq, seq).unwrap_err().to_string();
        assert!(err.contains("batch 2") && err.contains("batch 3"), "{err}");
        let err = mask.check(batch, 1, seq, seq + 1).unwrap_err().to_string();
        assert!(
            err.contains("seq_k 29") && err.contains("seq_k 30"),
            "{err}"
        );
    }

    /// Parts of a cover serve shorter calls and decoding steps (a few queries against a
    /// growing cache) soundly, whatever their rows' offset in the built blocks.
    #[test]
    fn parts_serve_shorter_calls_and_decoding_steps() {
        let device = Device::ndarray();
        let block = 4;
        for (long_q, long_k) in [(40, 40), (30, 41)] {
            for (pattern, _) in patterns(long_q, long_k) {
                if pattern.blocks.is_some() {
                    continue; // layouts are built for their lengths
                }
                let grid = BlockGrid::new(block, block, long_q, long_k).unwrap();
                let cover = BlockCover::of_pattern(&pattern, grid, &device).unwrap();
                let whole = cover.part(long_q, long_k).unwrap();
                assert_eq!(whole.to_covers(), cover.to_covers());
                let offset = long_k - long_q;
                let calls = [
                    (1, 1),
                    (7, 7),
                    (13, 13),
                    (1, 29),
                    (3, 22),
                    (16, 37),
                    (5, 41),
                ];
                for (seq_q, seq_k) in calls {
                    if seq_k > long_k || seq_k < seq_q + offset {
                        assert!(cover.part(seq_q, seq_k).is_err(), "{seq_q} {seq_k}");
                        continue;
                    }
                    let part = cover.part(seq_q, seq_k).unwrap();
                    let own = BlockGrid::new(block, block, seq_q, seq_k).unwrap();
                    assert_eq!(part.grid(), own);
                    for (at, got) in part.to_covers().into_iter().enumerate() {
                        let (qb, kb) = (at / own.k_blocks(), at % own.k_blocks());
                        let want = exact(own, qb, kb, |i, j| pattern.visible(i, j, seq_q, seq_k));
                        let what = format!("{pattern:?} call {seq_q} x {seq_k} ({qb}, {kb})");
                        assert_cover(got, want, false, &what);
                    }
                }
            }
        }
        let cover = BlockCover::of_pattern(
            &KeyPattern::default(),
            BlockGrid::new(4, 4, 9, 12).unwrap(),
            &device,
        )
        .unwrap();
        assert!(cover.part(6, 9).is_ok());
        assert!(cover.part(1, 12).is_ok());
        let err = cover.part(6, 6).unwrap_err().to_string();
        assert!(err.contains("seq_k - seq_q at least 3"), "{err}");
        assert!(cover.part(10, 13).is_err());
        assert!(cover.part(0, 5).is_err());
    }

    #[test]
    fn bad_inputs_are_named() {
        let device = Device::ndarray();
        let err = BlockGrid::new(0, 4, 8, 8).unwrap_err().to_string();
        assert!(err.contains("block_q"), "{err}");
        let grid = BlockGrid::new(4, 4, 8, 8).unwrap();
        let padding = Tensor::<2, Bool>::full([2, 7], false, &device);
        let err = BlockCover::of_key_padding(padding, grid)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 7]") && err.contains("seq_k 8"), "{err}");
        let docs = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 0, 1, 1, 2, 1, 2, 2], [1, 8]),
            &device,
        );
        let err = BlockCover::of_documents(docs.clone(), docs, grid)
            .unwrap_err()
            .to_string();
        assert!(err.contains("positions 4 and 5 hold 2 then 1"), "{err}");
        let stride0 = KeyPattern {
            stride: Some(0),
            ..KeyPattern::default()
        };
        assert!(BlockCover::of_pattern(&stride0, grid, &device).is_err());
        let other = BlockGrid::new(4, 2, 8, 8).unwrap();
        let a = BlockCover::of_pattern(&KeyPattern::default(), grid, &device).unwrap();
        let b = BlockCover::of_pattern(&KeyPattern::default(), other, &device).unwrap();
        assert!(a
            .intersect(b)
            .unwrap_err()
            .to_string()
            .contains("different grids"));
    }
}
