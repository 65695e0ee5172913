//! The input of a module call with masks, as burn-nn's `MhaInput` takes it: query, key and
//! value with an optional key padding mask and an optional attention mask.

use burn::tensor::{Bool, Tensor};
use burn_attn_core::AttentionMasks;

/// Query, key and value (`[batch, seq, d_model]`) with burn-nn's two masks, for
/// [`FlashAttention::forward_input`](crate::FlashAttention::forward_input) and
/// [`SlidingWindowAttention::forward_input`](crate::SlidingWindowAttention::forward_input):
/// a burn-nn `MhaInput` maps field for field. One difference: a query every key of which
/// is masked gets 0 here, where burn-nn averages the values.
#[derive(Debug, Clone)]
pub struct AttentionInput {
    /// `[batch, seq_q, d_model]`.
    pub query: Tensor<3>,
    /// `[batch, seq_k, d_model]`.
    pub key: Tensor<3>,
    /// `[batch, seq_k, d_model]`.
    pub value: Tensor<3>,
    /// `[batch, seq_k]`, `true` where the key is padding.
    pub mask_pad: Option<Tensor<2, Bool>>,
    /// `[batch, seq_q, seq_k]`, `true` where the query must not see the key.
    pub mask_attn: Option<Tensor<3, Bool>>,
}

impl AttentionInput {
    /// Self-attention of `x` (`[batch, seq, d_model]`).
    pub fn self_attn(x: Tensor<3>) -> Self {
        Self::new(x.clone(), x.clone(), x)
    }

    /// Attention of `query` over `key` and `value`.
    pub fn new(query: Tensor<3>, key: Tensor<3>, value: Tensor<3>) -> Self {
        Self {
            query,
            key,
            value,
            mask_pad: None,
            mask_attn: None,
        }
    }

    /// With a key padding mask.
    pub fn mask_pad(mut self, mask_pad: Tensor<2, Bool>) -> Self {
        self.mask_pad = Some(mask_pad);
        self
    }

    /// With an attention mask.
    pub fn mask_attn(mut self, mask_attn: Tensor<3, Bool>) -> Self {
        self.mask_attn = Some(mask_attn);
        self
    }

    /// The masks of the core call, with `dropout`.
    pub(crate) fn masks(&self, dropout: f64) -> AttentionMasks {
        AttentionMasks {
            key_padding: self.mask_pad.clone(),
            attention_mask: self.mask_attn.clone(),
            dropout,
            ..AttentionMasks::default()
        }
    }
}
