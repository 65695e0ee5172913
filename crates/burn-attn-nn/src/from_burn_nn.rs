//! Coming from burn-nn: a `MultiHeadAttention` becomes a [`FlashAttention`] with the same
//! weights, so a model swaps its attention without retraining; its checkpoints load with
//! renamed keys.

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

    /// The renames that load a checkpoint saved with burn-nn's `MultiHeadAttention` at the
    /// module path `path` (`"encoder.layers.0.attn"`; `""` for the attention itself) into
    /// the same model with a [`FlashAttention`] there: regex patterns and replacements for
    /// burn-store's `KeyRemapper::from_patterns`, then `store.remap(remapper)` and
    /// `model.load_from(&mut store)`. The projections move under `projection`
    /// (`attn.query.weight` -> `attn.projection.query.weight`); the weights and their
    /// meaning are unchanged, as in [`from_burn_nn`](Self::from_burn_nn).
    pub fn burn_nn_key_patterns(path: &str) -> Vec<(String, String)> {
        // Module paths are identifiers and indices joined by dots.
        let (from, to) = match path {
            "" => (String::new(), String::new()),
            path => (
                format!("{}\\.", path.replace('.', "\\.")),
                format!("{path}."),
            ),
        };
        vec![(
            format!("^{from}(query|key|value|output)\\."),
            format!("{to}projection.${{1}}."),
        )]
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::attention::{MhaInput, MultiHeadAttentionConfig};
    use burn::tensor::{Bool, Tensor, TensorData};

    use super::*;
    use crate::test_util::{cpu, max_abs_diff, randn};

    /// A checkpoint of a model holding burn-nn's attention loads into the same model
    /// holding a `FlashAttention`, every weight applied and none left over, with the same
    /// outputs.
    #[test]
    fn burn_nn_checkpoints_load_with_the_key_patterns() {
        use burn::module::Module;
        use burn::nn::attention::MultiHeadAttention;
        use burn_store::{KeyRemapper, ModuleSnapshot, SafetensorsStore};

        #[derive(Module, Debug)]
        struct Layer<A> {
            attn: A,
        }
        #[derive(Module, Debug)]
        struct Model<A> {
            layers: Vec<Layer<A>>,
        }

        let device = cpu();
        let layer = || Layer {
            attn: MultiHeadAttentionConfig::new(16, 4).init(&device),
        };
        let old: Model<MultiHeadAttention> = Model {
            layers: vec![layer(), layer()],
        };
        let mut store = SafetensorsStore::from_bytes(None);
        old.save_into(&mut store).unwrap();
        let bytes = store.get_bytes().unwrap();

        let fresh = || Layer {
            attn: FlashAttentionConfig::new(16, 4).init(&device),
        };
        let mut new: Model<FlashAttention> = Model {
            layers: vec![fresh(), fresh()],
        };
        let patterns: Vec<_> = (0..2)
            .flat_map(|i| FlashAttention::burn_nn_key_patterns(&format!("layers.{i}.attn")))
            .collect();
        let remapper = KeyRemapper::from_patterns(patterns).unwrap();
        let mut store = SafetensorsStore::from_bytes(Some(bytes)).remap(remapper);
        let result = new.load_from(&mut store).unwrap();
        assert!(
            result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty(),
            "{result:?}"
        );
        let x = randn([2, 7, 16], &device);
        for (old, new) in old.layers.iter().zip(&new.layers) {
            let want = old.attn.forward(MhaInput::self_attn(x.clone())).context;
            let diff = max_abs_diff(new.attn.forward(x.clone()), want);
            assert!(diff < 1e-5, "loaded attention differs by {diff}");
        }
        assert_eq!(
            FlashAttention::burn_nn_key_patterns(""),
            vec![(
                "^(query|key|value|output)\\.".to_string(),
                "projection.${1}.".to_string()
            )]
        );
    }

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
