//! Coming from burn-nn: a `MultiHeadAttention` becomes a [`FlashAttention`] with the same
//! weights, so a model swaps its attention without retraining.

use burn::nn::attention::MultiHeadAttention;
use burn_attn_core::AttentionError;

use crate::{FlashAttention, FlashAttentionConfig};

impl FlashAttention {
    /// The [`FlashAttention`] that computes what burn-nn's `mha` computes: its query, key,
    /// value and output projections, scale `1 / sqrt(d_k)`, its dropout (with its training
    /// flag), no causal rule or window. Calls map as
    /// `mha.forward(MhaInput::self_attn(x)).context` -> `attn.forward(x)` and
    /// `MhaInput::new(q, k, v).mask_pad(pad)` -> `attn.forward_cross(q, k, v, Some(pad))`
    /// (`true` = padding in both); an `MhaInput` with `mask_attn` maps field for field to
    /// an [`AttentionInput`](crate::AttentionInput) for
    /// [`forward_input`](FlashAttention::forward_input) (for causal or windowed masks prefer
    /// the config's causal rule or window: no mask tensor). The weights are taken from the
    /// module, so load a burn-nn checkpoint into `mha` first. One difference: a query whose
    /// keys are all hidden (by padding or `mask_attn`) gets 0 here, where burn-nn averages
    /// the values with uniform weights.
    ///
    /// # Errors
    /// When `mha` uses quiet softmax, which no implementation here computes.
    pub fn from_burn_nn(mha: MultiHeadAttention) -> Result<Self, AttentionError> {
        if mha.quiet_softmax {
            return Err(AttentionError::Invalid(
                "burn-nn attention with quiet_softmax: burn-attn computes the standard softmax \
                 only"
                    .into(),
            ));
        }
        let device = mha.query.weight.device();
        let mut attn = FlashAttentionConfig::new(mha.d_model, mha.n_heads)
            .with_dropout(mha.dropout.prob)
            .init(&device);
        attn.dropout.training = mha.dropout.training;
        let projection = &mut attn.projection;
        projection.query = mha.query;
        projection.key = mha.key;
        projection.value = mha.value;
        projection.output = mha.output;
        Ok(attn)
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::attention::{MhaInput, MultiHeadAttentionConfig};
    use burn::tensor::{Bool, Tensor, TensorData};

    use super::*;
    use crate::test_util::{cpu, max_abs_diff, randn};

    #[test]
    fn converted_attention_keeps_the_training_flag() {
        use burn::module::Module;
        let mha = MultiHeadAttentionConfig::new(16, 4)
            .with_dropout(0.25)
            .init(&cpu());
        let attn = FlashAttention::from_burn_nn(mha.clone()).unwrap();
        assert_eq!(attn.dropout.prob, 0.25);
        assert!(attn.dropout.training.is_enabled());
        let frozen = FlashAttention::from_burn_nn(mha.freeze()).unwrap();
        assert!(!frozen.dropout.training.is_enabled());
    }

    #[test]
    fn converted_attention_computes_what_burn_nn_computes() {
        let device = cpu();
        let (batch, seq_q, seq_k, d) = (2, 5, 9, 16);
        let mha = MultiHeadAttentionConfig::new(d, 4).init(&device);
        let attn = FlashAttention::from_burn_nn(mha.clone()).unwrap();
        let x = randn([batch, seq_k, d], &device);
        let want = mha.forward(MhaInput::self_attn(x.clone())).context;
        let diff = max_abs_diff(attn.forward(x), want);
        assert!(diff < 1e-5, "self-attention differs by {diff}");

        // Cross-attention with key padding (no row fully padded).
        let (q, kv) = (
            randn([batch, seq_q, d], &device),
            randn([batch, seq_k, d], &device),
        );
        let pad: Vec<bool> = (0..batch * seq_k)
            .map(|i| i % seq_k >= seq_k - 2 - 3 * (i / seq_k))
            .collect();
        let pad = Tensor::<2, Bool>::from_data(TensorData::new(pad, [batch, seq_k]), &device);
        let want = mha
            .forward(MhaInput::new(q.clone(), kv.clone(), kv.clone()).mask_pad(pad.clone()))
            .context;
        let diff = max_abs_diff(
            attn.forward_cross(q.clone(), kv.clone(), kv.clone(), Some(pad.clone())),
            want,
        );
        assert!(diff < 1e-5, "padded cross-attention differs by {diff}");

        // Both masks, as an `MhaInput` maps to an `AttentionInput` (every query keeps a key).
        let hidden: Vec<bool> = (0..batch * seq_q * seq_k)
            .map(|at| (at % seq_k) % 3 == (at / seq_k) % 2 && at % seq_k != 0)
            .collect();
        let mask =
            Tensor::<3, Bool>::from_data(TensorData::new(hidden, [batch, seq_q, seq_k]), &device);
        let want = mha
            .forward(
                MhaInput::new(q.clone(), kv.clone(), kv.clone())
                    .mask_pad(pad.clone())
                    .mask_attn(mask.clone()),
            )
            .context;
        let input = crate::AttentionInput::new(q, kv.clone(), kv)
            .mask_pad(pad)
            .mask_attn(mask);
        let diff = max_abs_diff(attn.forward_input(input), want);
        assert!(diff < 1e-5, "masked cross-attention differs by {diff}");
    }

    #[test]
    fn quiet_softmax_is_refused_by_name() {
        let mha = MultiHeadAttentionConfig::new(8, 2)
            .with_quiet_softmax(true)
            .init(&cpu());
        let err = FlashAttention::from_burn_nn(mha).unwrap_err().to_string();
        assert!(err.contains("quiet_softmax"), "{err}");
    }
}
