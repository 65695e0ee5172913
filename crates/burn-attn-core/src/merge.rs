//! Rows of attention computed in parts (key blocks, or key sets), merged by their
//! log-sum-exp: the output of the union is each part's output weighted by `exp(lse_part -
//! lse_union)`.

use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor};

/// Output rows merged over the parts so far, in f32: the output `[batch, heads, rows,
/// value_dim]` and the row log-sum-exp (`-inf` where no part reached a row yet).
pub(crate) struct MergedRows {
    out: Tensor<4>,
    lse: Tensor<3>,
}

impl MergedRows {
    /// No part yet, for the rows of `q` and the width of `v`.
    pub(crate) fn new(q: &Tensor<4>, v: &Tensor<4>) -> Self {
        let [batch, heads, rows, _] = q.dims();
        let value_dim = v.dims()[3];
        let device = q.device();
        Self {
            out: Tensor::<4>::zeros([batch, heads, rows, value_dim], &device).cast(DType::F32),
            lse: Tensor::<3>::full([batch, heads, rows], f32::NEG_INFINITY, &device)
                .cast(DType::F32),
        }
    }

    /// Merges a part over the rows `at..` (its call's output and log-sum-exp).
    pub(crate) fn add(&mut self, at: usize, out: Tensor<4>, lse: Tensor<3>) {
        let [batch, heads, rows, value_dim] = out.dims();
        let span = at..at + rows;
        let old_out = self.out.clone().narrow(2, at, rows);
        let old_lse = self.lse.clone().narrow(2, at, rows);
        let (out, lse) = merge(old_out, old_lse, out, lse);
        self.out = self
            .out
            .clone()
            .slice_assign([0..batch, 0..heads, span.clone(), 0..value_dim], out);
        self.lse = self
            .lse
            .clone()
            .slice_assign([0..batch, 0..heads, span], lse);
    }

    /// Merges a part over the rows `rows` (in that order; each row once).
    pub(crate) fn add_rows(&mut self, rows: Tensor<1, Int>, out: Tensor<4>, lse: Tensor<3>) {
        let old_out = self.out.clone().select(2, rows.clone());
        let old_lse = self.lse.clone().select(2, rows.clone());
        let (out, lse) = merge(old_out, old_lse, out, lse);
        self.out = self
            .out
            .clone()
            .select_assign(2, rows.clone(), out, IndexingUpdateOp::Assign);
        self.lse = self
            .lse
            .clone()
            .select_assign(2, rows, lse, IndexingUpdateOp::Assign);
    }

    /// The merged output in `dtype` and the log-sum-exp in f32.
    pub(crate) fn finish(self, dtype: DType) -> (Tensor<4>, Tensor<3>) {
        (self.out.cast(dtype), self.lse)
    }
}

/// Two parts of the same rows merged (f32 out): rows neither part reached keep `-inf` and a
/// zero output.
fn merge(
    old_out: Tensor<4>,
    old_lse: Tensor<3>,
    out: Tensor<4>,
    lse: Tensor<3>,
) -> (Tensor<4>, Tensor<3>) {
    let (out, lse) = (out.cast(DType::F32), lse.cast(DType::F32));
    let top = old_lse.clone().max_pair(lse.clone());
    let top = top
        .clone()
        .mask_fill(top.equal_elem(f32::NEG_INFINITY), 0.0);
    let (w_old, w_new) = ((old_lse - top.clone()).exp(), (lse - top.clone()).exp());
    let sum = w_old.clone() + w_new.clone();
    let new_lse = top + sum.clone().log();
    let sum = sum.clone().mask_fill(sum.equal_elem(0.0), 1.0);
    let weight = |w: Tensor<3>| (w / sum.clone()).unsqueeze_dim::<4>(3);
    (old_out * weight(w_old) + out * weight(w_new), new_lse)
}
