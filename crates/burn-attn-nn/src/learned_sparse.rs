//! Learned sparsity: a trained gate chooses, per head, the blocks of keys every query
//! attends to.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_attn_core::{
    block_sparse_kernels, ensure, masked_attention, repeat_kv, AttentionError, AttentionMasks,
    AttentionOptions, KeyPattern,
};

use crate::dropout::{validate_dropout, AttentionDropout};
use crate::flash::projection_config;
use crate::projection::{validate_heads, MultiHeadProjection};

/// Configuration of [`LearnedSparseAttention`].
#[derive(Config, Debug)]
pub struct LearnedSparseAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads; must divide `d_model`.
    pub n_heads: usize,
    /// Key/value heads (GQA/MQA). Default: `None` (= `n_heads`).
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Whether the linears have a bias. Default: `true`.
    #[config(default = true)]
    pub bias: bool,
    /// Dropout on the attention probabilities while training. Default: `0.0`.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Fraction of key blocks kept per head: the top `ceil(ratio * blocks)` blocks by
    /// pooled gate score (at least 1). In `(0, 1]`. Default: `0.1`, as the seed.
    #[config(default = 0.1)]
    pub ratio: f64,
    /// Keys per selection block (at least 1): the gate's scores are averaged over each
    /// block and whole blocks are kept, so the GPU kernels skip the others tile by tile.
    /// `1` selects single keys (per-key top-k). Default: `64`.
    #[config(default = 64)]
    pub block: usize,
}

impl LearnedSparseAttentionConfig {
    /// Checks the configuration; the error names the values.
    pub fn validate(&self) -> Result<(), AttentionError> {
        validate_heads(self.d_model, self.n_heads, self.n_kv_heads)?;
        validate_dropout(self.dropout)?;
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(AttentionError::OutOfUnitRange {
                what: "ratio",
                value: self.ratio,
            });
        }
        if self.block == 0 {
            return Err(AttentionError::ZeroSize {
                what: "selection block",
            });
        }
        Ok(())
    }

    /// Builds the module.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails.
    pub fn init(&self, device: &Device) -> LearnedSparseAttention {
        ensure(self.validate());
        LearnedSparseAttention {
            projection: projection_config(self.d_model, self.n_heads, self.n_kv_heads, self.bias)
                .init(device),
            gate: LinearConfig::new(self.d_model, self.n_heads)
                .with_bias(self.bias)
                .init(device),
            ratio: self.ratio,
            block: self.block,
            dropout: AttentionDropout::new(self.dropout),
        }
    }
}

/// The most (block, block) comparisons [`LearnedSparseAttention`]'s ranking holds at once
/// (over every batch and head).
const RANK_PAIRS: usize = 1 << 24;

/// `bias` with `-inf` on the padding keys (`[batch, heads, seq_k]`, `true` = padding).
fn hide(bias: Tensor<3>, padding: Option<Tensor<3, Bool>>) -> Tensor<3> {
    match padding {
        Some(pad) => bias.mask_fill(pad, f32::NEG_INFINITY),
        None => bias,
    }
}

/// Attention over the key blocks a trained gate selects (MoBA/NSA-style block selection).
///
/// The gate scores every key per head; the scores are averaged over blocks of `block`
/// keys, each head keeps its top `ceil(ratio * blocks)` blocks (of its unpadded keys) for
/// every query, and `log_sigmoid(score)` is added to the kept keys' logits so the gate is
/// trained by the loss. Keys are selected (never query rows), so no row is left empty unless every key
/// it could see is padding. Not causal: the selection looks at every key.
///
/// On CubeCL devices the gate's bias (`-inf` on the keys left out) is a score term of the
/// block-sparse kernels: they visit only the selected blocks and return the bias's
/// gradient from their backward. On the CPU the selected keys are gathered and the tiled
/// ops attend to them: the same result, at O(n * ratio * n) either way.
#[derive(Module, Debug)]
pub struct LearnedSparseAttention {
    /// The shared projections.
    pub projection: MultiHeadProjection,
    /// Key scores per head: `d_model -> n_heads`.
    pub gate: Linear,
    /// Fraction of key blocks kept.
    pub ratio: f64,
    /// Keys per selection block.
    pub block: usize,
    /// Dropout on probabilities while training.
    pub dropout: AttentionDropout,
}

impl LearnedSparseAttention {
    /// How many key blocks are kept out of the `ceil(seq_k / block)` blocks of `seq_k` keys.
    pub fn selected_blocks(&self, seq_k: usize) -> usize {
        self.kept_of(seq_k.div_ceil(self.block))
    }

    /// How many of `blocks` blocks are kept.
    fn kept_of(&self, blocks: usize) -> usize {
        ((self.ratio * blocks as f64).ceil() as usize).clamp(1, blocks.max(1))
    }

    /// Self-attention: `[batch, seq, d_model] -> [batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_cross(x.clone(), x.clone(), x, None)
    }

    /// The key blocks each head keeps, `[batch, heads, kept]` (block indices, best first),
    /// from the gate's scores `[batch, heads, seq_k]`: a block's score is the mean over its
    /// keys that are not padding (`padding`, `[batch, heads, seq_k]`, `true` = padding);
    /// blocks of padding only rank last, and equal scores rank by block index. A padded
    /// row keeps its share of the blocks that hold a key that is not padding (so a
    /// right-padded sequence attends as it does alone); its entries past that count are
    /// `ceil(seq_k / block)`, no block.
    pub fn select_blocks(
        &self,
        gate_scores: Tensor<3>,
        padding: Option<Tensor<3, Bool>>,
    ) -> Tensor<3, Int> {
        let [batch, heads, seq_k] = gate_scores.dims();
        let blocks = seq_k.div_ceil(self.block);
        let (ranks, counts) = self.block_ranks(gate_scores, padding);
        let device = ranks.device();
        let shape = [batch, heads, blocks];
        let index = Tensor::<1, Int>::arange(0..blocks as i64, &device)
            .reshape([1, 1, blocks])
            .expand(shape);
        // The ranks are a permutation of each row's blocks: block `i` goes to place
        // `ranks[i]`.
        let order = Tensor::<3, Int>::zeros(shape, &device).scatter(
            2,
            ranks,
            index.clone(),
            burn::tensor::IndexingUpdateOp::Add,
        );
        let kept = self.selected_blocks(seq_k);
        let order = order.slice([0..batch, 0..heads, 0..kept]);
        let rank = index.slice([0..batch, 0..heads, 0..kept]);
        let past = rank.greater_equal(counts.expand([batch, heads, kept]));
        order.mask_fill(past, blocks as i64)
    }

    /// Each key block's place in its row's order by pooled gate score (`[batch, heads,
    /// blocks]`, 0 = best; ties by block index) and how many blocks each row keeps
    /// (`[batch, heads, 1]`; see [`select_blocks`](Self::select_blocks)). Device ops only,
    /// no sort (a sort reads back to the host on the GPU backends): a block's place is the
    /// count of blocks ahead of it.
    fn block_ranks(
        &self,
        gate_scores: Tensor<3>,
        padding: Option<Tensor<3, Bool>>,
    ) -> (Tensor<3, Int>, Tensor<3, Int>) {
        let [batch, heads, seq_k] = gate_scores.dims();
        let blocks = seq_k.div_ceil(self.block);
        let tail = blocks * self.block - seq_k;
        let scores = gate_scores.detach();
        let device = scores.device();
        let has_padding = padding.is_some();
        let valid = match padding {
            Some(pad) => pad.bool_not().float(),
            None => scores.ones_like(),
        };
        let per_block = |t: Tensor<3>| {
            t.pad([(0, tail)], burn::tensor::ops::PadMode::Constant(0.0))
                .reshape([batch, heads, blocks, self.block])
                .sum_dim(3)
                .reshape([batch, heads, blocks])
        };
        let count = per_block(valid.clone());
        let pooled = (per_block(scores * valid) / count.clone().clamp_min(1.0))
            .mask_fill(count.clone().equal_elem(0.0), f32::NEG_INFINITY);
        // Block `j` is ahead of block `i` when its score is higher, or equal with a lower
        // index. The comparisons are made for a chunk of blocks `i` at a time, so that at
        // most `RANK_PAIRS` of them are held (long sequences have many blocks).
        let index = Tensor::<1, Int>::arange(0..blocks as i64, &device);
        let chunk = (RANK_PAIRS / (batch * heads * blocks).max(1)).clamp(1, blocks.max(1));
        let ranks: Vec<Tensor<3, Int>> = (0..blocks)
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(blocks);
                let pairs = [batch, heads, end - start, blocks];
                let own = pooled
                    .clone()
                    .slice([0..batch, 0..heads, start..end])
                    .reshape([batch, heads, end - start, 1])
                    .expand(pairs);
                let other = pooled
                    .clone()
                    .reshape([batch, heads, 1, blocks])
                    .expand(pairs);
                let earlier = index
                    .clone()
                    .reshape([1, 1, 1, blocks])
                    .lower(
                        index
                            .clone()
                            .slice(start..end)
                            .reshape([1, 1, end - start, 1])
                            .expand([1, 1, end - start, blocks]),
                    )
                    .expand(pairs);
                let ahead = other
                    .clone()
                    .greater(own.clone())
                    .bool_or(other.equal(own).bool_and(earlier));
                ahead.int().sum_dim(3).reshape([batch, heads, end - start])
            })
            .collect();
        let ranks = if ranks.is_empty() {
            Tensor::zeros([batch, heads, 0], &device)
        } else {
            Tensor::cat(ranks, 2)
        };
        let kept = self.selected_blocks(seq_k);
        if !has_padding {
            return (ranks, Tensor::full([batch, heads, 1], kept as i64, &device));
        }
        // Each row's count, looked up by its blocks that hold a key in a host table (the
        // same rounding as `selected_blocks`).
        let table: Vec<i64> = (0..=blocks).map(|n| self.kept_of(n) as i64).collect();
        let table = Tensor::<1, Int>::from_data(TensorData::new(table, [blocks + 1]), &device);
        let real_blocks = count.greater_elem(0.0).int().sum_dim(2);
        let counts = table
            .select(0, real_blocks.reshape([batch * heads]))
            .reshape([batch, heads, 1]);
        (ranks, counts)
    }

    /// Attention of `query` over the selected keys of `key`/`value`, with an optional
    /// `[batch, seq_k]` key padding mask (`true` = padding; padding is always hidden).
    pub fn forward_cross(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_padding: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        // The projection checks the inputs' shapes before the gate reads the keys.
        let h = self.projection.split(query, key.clone(), value);
        let [batch, heads, _, _] = h.q.dims();
        let seq_k = h.k.dims()[2];
        let gate_scores = self.gate.forward(key).swap_dims(1, 2); // [b, heads, seq_k]
        let padding = key_padding.map(|pad| {
            ensure(if pad.dims() == [batch, seq_k] {
                Ok(())
            } else {
                Err(AttentionError::Shape {
                    what: "key padding mask",
                    expected: format!("[{batch}, {seq_k}] (batch, seq_k)"),
                    got: pad.dims().to_vec(),
                })
            });
            pad.reshape([batch, 1, seq_k]).expand([batch, heads, seq_k])
        });
        let bias = log_sigmoid(gate_scores.clone());
        let out = if block_sparse_kernels(&h.q.device()) {
            let (ranks, counts) = self.block_ranks(gate_scores, padding.clone());
            self.attend_masked(h.q, h.k, h.v, hide(bias, padding), ranks, counts)
        } else {
            let kept = self.select_blocks(gate_scores, padding.clone());
            self.attend_gathered(h.q, h.k, h.v, hide(bias, padding), kept)
        };
        self.projection.merge(out)
    }

    /// The kernels' formulation: the gate's bias over every key, `-inf` on the keys of
    /// blocks left out (ranked at or past their row's count; the kernels skip their tiles),
    /// through [`masked_attention`].
    fn attend_masked(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<3>,
        ranks: Tensor<3, Int>,
        counts: Tensor<3, Int>,
    ) -> Tensor<4> {
        let [batch, heads, seq_k] = bias.dims();
        let blocks = ranks.dims()[2];
        let left_out = ranks
            .greater_equal(counts.expand([batch, heads, blocks]))
            .reshape([batch, heads, blocks, 1])
            .expand([batch, heads, blocks, self.block])
            .reshape([batch, heads, blocks * self.block])
            .slice([0..batch, 0..heads, 0..seq_k]);
        self.attend(q, k, v, bias.mask_fill(left_out, f32::NEG_INFINITY))
    }

    /// The CPU's formulation: the keys of the kept blocks gathered (positions past the end
    /// hidden), attended with the gate's bias on them (the tiled ops visit those only).
    fn attend_gathered(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<3>,
        kept: Tensor<3, Int>,
    ) -> Tensor<4> {
        let [batch, heads, seq_k] = bias.dims();
        let (kept_n, block) = (kept.dims()[2], self.block);
        let n_sel = kept_n * block;
        let positions = (kept
            .mul_scalar(block as i64)
            .reshape([batch, heads, kept_n, 1])
            .expand([batch, heads, kept_n, block])
            + Tensor::<1, Int>::arange(0..block as i64, &bias.device())
                .reshape([1, 1, 1, block])
                .expand([batch, heads, kept_n, block]))
        .reshape([batch, heads, n_sel]);
        let past_end = positions.clone().greater_equal_elem(seq_k as i64);
        let positions = positions.clamp_max(seq_k as i64 - 1);
        let gather_rows = |x: Tensor<4>| {
            let width = x.dims()[3];
            let idx = positions
                .clone()
                .reshape([batch, heads, n_sel, 1])
                .expand([batch, heads, n_sel, width]);
            repeat_kv(x, heads).gather(2, idx)
        };
        let (k_sel, v_sel) = (gather_rows(k), gather_rows(v));
        let bias = bias
            .gather(2, positions)
            .mask_fill(past_end, f32::NEG_INFINITY);
        self.attend(q, k_sel, v_sel, bias)
    }

    /// Attention of `q` over `k`, `v` with the gate's `bias` on every key.
    fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<3>) -> Tensor<4> {
        let masks = AttentionMasks {
            key_bias: Some(bias),
            dropout: self.dropout.active(),
            ..AttentionMasks::default()
        };
        let pattern = KeyPattern::default();
        masked_attention(q, k, v, &pattern, &AttentionOptions::new(), &masks)
    }

    /// The shared projections (for exact baselines with the same weights).
    pub fn projection(&self) -> &MultiHeadProjection {
        &self.projection
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;
    use burn_attn_core::reference_attention;

    /// The same selection written the plain way, on the host: per head, the blocks'
    /// mean gate scores, the top blocks kept, and a dense bias over all keys (`-inf` off
    /// the kept blocks, the gate's log-sigmoid on them).
    fn dense_reference(module: &LearnedSparseAttention, x: Tensor<3>) -> Tensor<3> {
        let scores = module.gate.forward(x.clone()).swap_dims(1, 2); // [b, h, n]
        let [b, heads, n] = scores.dims();
        let values: Vec<f32> = scores.clone().into_data().try_to_vec().unwrap();
        let (block, keep) = (module.block, module.selected_blocks(n));
        let blocks = n.div_ceil(block);
        let mut bias = vec![f32::NEG_INFINITY; b * heads * n];
        for bh in 0..b * heads {
            let row = &values[bh * n..(bh + 1) * n];
            let mut means: Vec<(usize, f32)> = (0..blocks)
                .map(|k| {
                    let keys = &row[k * block..((k + 1) * block).min(n)];
                    (k, keys.iter().sum::<f32>() / keys.len() as f32)
                })
                .collect();
            means.sort_by(|a, c| c.1.total_cmp(&a.1));
            for &(k, _) in &means[..keep] {
                for j in k * block..((k + 1) * block).min(n) {
                    let s = row[j] as f64;
                    bias[bh * n + j] = (-(1.0 + (-s).exp()).ln()) as f32;
                }
            }
        }
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [b, heads, 1, n]), &x.device());
        biased_reference(module, x, bias)
    }

    /// The module's self-attention of `x` materialised with `bias` (`[batch, heads, 1,
    /// seq]`) on every query's scores.
    fn biased_reference(
        module: &LearnedSparseAttention,
        x: Tensor<3>,
        bias: Tensor<4>,
    ) -> Tensor<3> {
        let h = module.projection().split_self(x);
        let scale = 1.0 / (h.q.dims()[3] as f64).sqrt();
        let (out, _) = reference_attention(
            h.q,
            h.k,
            h.v,
            &KeyPattern::default(),
            scale,
            None,
            Some(bias),
        );
        module.projection().merge(out)
    }

    #[test]
    fn equals_dense_block_top_k_reference() {
        for (ratio, block, seq, kv) in [
            (0.1, 8, 97, None),
            (0.5, 4, 17, Some(2)),
            (0.3, 1, 23, None),
            (1.0, 4, 9, None),
            (0.01, 64, 1, None),
        ] {
            let module = LearnedSparseAttentionConfig::new(32, 4)
                .with_ratio(ratio)
                .with_block(block)
                .with_n_kv_heads(kv)
                .init(&cpu());
            let x = randn([2, seq, 32], &cpu());
            let got = module.forward(x.clone());
            assert_finite(got.clone());
            assert_close(got, dense_reference(&module, x), 2e-5);
        }
    }

    /// The kernels' formulation (a bias over every key) and the tiled ops' (gathered keys)
    /// agree, with padding and a last block past the end.
    #[test]
    fn masked_and_gathered_formulations_agree() {
        let module = LearnedSparseAttentionConfig::new(32, 4)
            .with_ratio(0.4)
            .with_block(8)
            .with_n_kv_heads(Some(2))
            .init(&cpu());
        let (q, kv) = (randn([2, 13, 32], &cpu()), randn([2, 45, 32], &cpu()));
        let gate_scores = module.gate.forward(kv.clone()).swap_dims(1, 2);
        let pad = Tensor::<1, Int>::arange(0..45, &cpu())
            .reshape([1, 45])
            .greater_equal_elem(39)
            .reshape([1, 1, 45])
            .expand([2, 4, 45]);
        let kept = module.select_blocks(gate_scores.clone(), Some(pad.clone()));
        let (ranks, counts) = module.block_ranks(gate_scores.clone(), Some(pad.clone()));
        let bias = hide(log_sigmoid(gate_scores), Some(pad));
        let h = module.projection.split(q, kv.clone(), kv);
        let masked = module.attend_masked(
            h.q.clone(),
            h.k.clone(),
            h.v.clone(),
            bias.clone(),
            ranks,
            counts,
        );
        let gathered = module.attend_gathered(h.q, h.k, h.v, bias, kept);
        assert_finite(masked.clone());
        assert_close(masked, gathered, 1e-5);
    }

    fn ints(t: Tensor<3, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap()
    }

    /// Blocks rank by pooled score on the device, equal scores by block index, blocks of
    /// padding only last, and a padded row keeps its share of its own blocks.
    #[test]
    fn blocks_rank_by_score_then_index() {
        let module = LearnedSparseAttentionConfig::new(16, 1)
            .with_ratio(0.5)
            .with_block(2)
            .init(&cpu());
        // Pooled scores of the 6 blocks: 1, 3, 1, 3, -2, 3; the last block is padding in
        // the second row, whose 5 real blocks keep 3.
        let scores: Vec<f32> = [1.0f32, 3.0, 1.0, 3.0, -2.0, 3.0]
            .iter()
            .flat_map(|&s| [s - 0.5, s + 0.5])
            .collect();
        let scores = Tensor::<1>::from_data(TensorData::new(scores, [12]), &cpu())
            .reshape([1, 1, 12])
            .expand([2, 1, 12]);
        let flags: Vec<bool> = (0..24).map(|i| i >= 22).collect();
        let pad = Tensor::<3, Bool>::from_data(TensorData::new(flags, [2, 1, 12]), &cpu());
        let kept = ints(module.select_blocks(scores.clone(), Some(pad)));
        assert_eq!(kept, [1, 3, 5, 1, 3, 0]);
        let kept = ints(module.select_blocks(scores, None));
        assert_eq!(kept, [1, 3, 5, 1, 3, 5]);
    }

    /// Many blocks are ranked a chunk at a time, in the order a sort gives.
    #[test]
    fn ranking_in_chunks_matches_a_sort() {
        let module = LearnedSparseAttentionConfig::new(16, 1)
            .with_ratio(1.0)
            .with_block(1)
            .init(&cpu());
        let n = 4200; // 4200^2 comparisons: two chunks
        assert!(n * n > RANK_PAIRS && n * n <= 2 * RANK_PAIRS);
        // Few distinct values, scattered, so that ties occur across the chunks.
        let scores: Vec<f32> = (0..n).map(|i| ((i * 7919) % 50) as f32).collect();
        let mut want: Vec<i64> = (0..n as i64).collect();
        want.sort_by(|&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        });
        let scores =
            Tensor::<1>::from_data(TensorData::new(scores, [n]), &cpu()).reshape([1, 1, n]);
        let kept = ints(module.select_blocks(scores, None));
        assert_eq!(kept, want);
    }

    #[test]
    fn padding_is_never_attended() {
        let module = LearnedSparseAttentionConfig::new(16, 2)
            .with_ratio(1.0)
            .init(&cpu());
        let q = randn([1, 5, 16], &cpu());
        let kv = randn([1, 10, 16], &cpu());
        let pad = Tensor::<1, Int>::arange(0..10, &cpu())
            .reshape([1, 10])
            .greater_equal_elem(6);
        let got = module.forward_cross(q.clone(), kv.clone(), kv.clone(), Some(pad));
        // With ratio 1 and padding hidden, changing the padded keys changes nothing.
        let kv2 = Tensor::cat(
            vec![kv.clone().slice([0..1, 0..6]), randn([1, 4, 16], &cpu())],
            1,
        );
        let pad = Tensor::<1, Int>::arange(0..10, &cpu())
            .reshape([1, 10])
            .greater_equal_elem(6);
        let again = module.forward_cross(q, kv2.clone(), kv2, Some(pad));
        assert_close(got, again, 1e-5);
    }

    /// A right-padded sequence keeps the blocks it keeps alone (the count of its own
    /// length, not the padded one's), so its rows equal its forward alone.
    #[test]
    fn padded_sequences_attend_as_alone() {
        let module = LearnedSparseAttentionConfig::new(16, 2)
            .with_ratio(0.25)
            .with_block(2)
            .init(&cpu());
        let (seq, len) = (24, 9);
        let x = randn([2, seq, 16], &cpu());
        // Row 0 unpadded, row 1 padded past `len`.
        let pad_from = |n: usize| {
            Tensor::<1, Int>::arange(0..seq as i64, &cpu())
                .reshape([1, seq])
                .greater_equal_elem(n as i64)
        };
        let pad = Tensor::cat(vec![pad_from(seq), pad_from(len)], 0);
        let padded = module.forward_cross(x.clone(), x.clone(), x.clone(), Some(pad));
        let short = x.clone().slice([1..2, 0..len]);
        let alone = module.forward_cross(short.clone(), short.clone(), short, None);
        assert_close(padded.clone().slice([1..2, 0..len]), alone, 1e-5);
        // The unpadded row is its own forward alone too.
        let first = x.narrow(0, 0, 1);
        let alone = module.forward_cross(first.clone(), first.clone(), first, None);
        assert_close(padded.narrow(0, 0, 1), alone, 1e-5);
    }

    /// With left padding the keys span more blocks than their count fills: ratio 1 still
    /// keeps every block that holds a key (the dense attention with the gate's bias).
    #[test]
    fn ratio_one_keeps_every_block_with_a_key_under_left_padding() {
        let module = LearnedSparseAttentionConfig::new(16, 2)
            .with_ratio(1.0)
            .with_block(2)
            .init(&cpu());
        let seq = 11;
        let x = randn([1, seq, 16], &cpu());
        let pad = Tensor::<1, Int>::arange(0..seq as i64, &cpu())
            .reshape([1, seq])
            .lower_elem(1);
        let got = module.forward_cross(x.clone(), x.clone(), x.clone(), Some(pad.clone()));
        let gate = module.gate.forward(x.clone()).swap_dims(1, 2); // [1, heads, seq]
        let bias = log_sigmoid(gate)
            .mask_fill(
                pad.reshape([1, 1, seq]).expand([1, 2, seq]),
                f32::NEG_INFINITY,
            )
            .reshape([1, 2, 1, seq]);
        assert_close(got, biased_reference(&module, x, bias), 1e-5);
    }

    /// Keys of another width are the projection's named error, before the gate reads them.
    #[test]
    fn keys_of_another_width_are_named() {
        let module = LearnedSparseAttentionConfig::new(16, 2).init(&cpu());
        let q = randn([2, 3, 16], &cpu());
        let wide = randn([2, 4, 12], &cpu());
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            module.forward_cross(q.clone(), wide.clone(), wide.clone(), None)
        }))
        .unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("key input") && msg.contains("[2, 4, 12]"),
            "{msg}"
        );
    }

    #[test]
    fn gate_receives_gradient_and_loss_falls() {
        let config = LearnedSparseAttentionConfig::new(16, 2).with_ratio(0.3);
        let module = config.init(&cpu_ad());
        let x = randn([2, 12, 16], &cpu_ad());
        let grads = module.forward(x).powi_scalar(2).sum().backward();
        let g = module
            .gate
            .weight
            .grad(&grads)
            .expect("gate has a gradient");
        let norm: f32 = g.abs().sum().into_scalar();
        assert!(norm > 0.0, "gate gradient is zero");

        let module = config.init(&cpu_ad());
        let (first, last) = train_steps(module, |m, x| m.forward(x), [2, 12, 16], 8);
        assert!(last < first, "loss did not fall: {first} -> {last}");
    }

    #[test]
    fn round_trips_and_rejects_bad_ratio() {
        let config = LearnedSparseAttentionConfig::new(16, 2);
        let module = config.init(&cpu());
        let x = randn([1, 9, 16], &cpu());
        let want = module.forward(x.clone());
        let loaded = record_round_trip(module, config.init(&cpu()));
        assert_close(loaded.forward(x), want, 0.0);
        for bad in [0.0, 1.5, -0.1] {
            let err = config
                .clone()
                .with_ratio(bad)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&bad.to_string()), "{err}");
        }
    }

    #[test]
    fn bias_false_leaves_every_linear_without_a_bias() {
        for bias in [true, false] {
            let module = LearnedSparseAttentionConfig::new(16, 2)
                .with_bias(bias)
                .init(&cpu());
            let p = &module.projection;
            for (name, linear) in [
                ("gate", &module.gate),
                ("query", &p.query),
                ("output", &p.output),
            ] {
                assert_eq!(linear.bias.is_some(), bias, "{name} with bias = {bias}");
            }
        }
    }
}
