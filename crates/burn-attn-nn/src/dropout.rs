//! Dropout on the attention probabilities, switched like burn-nn's `Dropout`.

use burn::module::{Flag, Module, Param};
use burn_attn_core::AttentionError;

/// Dropout on the attention probabilities: the modules' `dropout` field. The attention
/// core drops with probability [`prob`](Self::prob) on autodiff devices only; `training`
/// switches it off there too, as burn-nn's `Dropout` does: a module frozen in place
/// ([`Module::freeze`]) or made for validation ([`Module::valid`]) attends without
/// dropout. Records omit the flag (Burn's rule for flags), so checkpoints are unchanged.
#[derive(Module, Debug)]
pub struct AttentionDropout {
    /// Probability of dropping each attention weight while training, in `[0, 1)`.
    pub prob: f64,
    /// Whether the module behaves as during training.
    pub training: Param<Flag>,
}

impl AttentionDropout {
    /// Dropout with probability `prob`, training.
    pub fn new(prob: f64) -> Self {
        Self {
            prob,
            training: Param::from_bool(true),
        }
    }

    /// The probability the module passes to the core: [`prob`](Self::prob) while
    /// training, else `0`.
    pub fn active(&self) -> f64 {
        if self.training.is_enabled() {
            self.prob
        } else {
            0.0
        }
    }
}

/// Checks a dropout probability.
pub(crate) fn validate_dropout(dropout: f64) -> Result<(), AttentionError> {
    if !(0.0..1.0).contains(&dropout) {
        return Err(AttentionError::Invalid(format!(
            "dropout must be in [0, 1), got {dropout}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::*;
    use burn::tensor::Tensor;

    /// On an autodiff device `module` drops (its output differs from `without`'s, the same
    /// module with no dropout); frozen or validated it does not (the same output); unfrozen
    /// it drops again.
    fn check<M: Module + Clone>(
        name: &str,
        module: M,
        without: impl Fn(&M) -> M,
        forward: impl Fn(&M, Tensor<3>) -> Tensor<3>,
    ) {
        let x = randn([2, 24, 16], &cpu_ad());
        let want = forward(&without(&module), x.clone());
        let dropped = max_abs_diff(forward(&module, x.clone()), want.clone());
        assert!(dropped > 1e-3, "{name}: training drops nothing ({dropped})");
        let frozen = module.clone().freeze();
        let diff = max_abs_diff(forward(&frozen, x.clone()), want.clone());
        assert!(diff < 1e-6, "{name}: the frozen module drops ({diff})");
        let diff = max_abs_diff(forward(&frozen.unfreeze(), x.clone()), want.clone());
        assert!(
            diff > 1e-3,
            "{name}: the unfrozen module drops nothing ({diff})"
        );
        // Moved back to the autodiff device, where the core would drop: the flag holds.
        let valid = module.valid().to_device(&cpu_ad());
        let diff = max_abs_diff(forward(&valid, x), want);
        assert!(diff < 1e-6, "{name}: the validation module drops ({diff})");
    }

    fn none() -> AttentionDropout {
        AttentionDropout::new(0.0)
    }

    #[test]
    fn frozen_and_validated_modules_attend_without_dropout() {
        let device = cpu_ad();
        check(
            "flash",
            FlashAttentionConfig::new(16, 4)
                .with_dropout(0.5)
                .init(&device),
            |m| FlashAttention {
                dropout: none(),
                ..m.clone()
            },
            |m, x| m.forward(x),
        );
        check(
            "sliding window",
            SlidingWindowAttentionConfig::new(16, 4)
                .with_dropout(0.5)
                .init(&device),
            |m| SlidingWindowAttention {
                dropout: none(),
                ..m.clone()
            },
            |m, x| m.forward(x),
        );
        check(
            "sparse",
            SparseAttentionConfig::new(16, 4)
                .with_dropout(0.5)
                .init(&device),
            |m| SparseAttention {
                dropout: none(),
                ..m.clone()
            },
            |m, x| m.forward(x),
        );
        check(
            "learned sparse",
            LearnedSparseAttentionConfig::new(16, 4)
                .with_dropout(0.5)
                .init(&device),
            |m| LearnedSparseAttention {
                dropout: none(),
                ..m.clone()
            },
            |m, x| m.forward(x),
        );
        check(
            "adaptive window",
            AdaptiveSlidingWindowAttentionConfig::new(16, 4)
                .with_dropout(0.5)
                .init(&device),
            |m| AdaptiveSlidingWindowAttention {
                dropout: none(),
                ..m.clone()
            },
            |m, x| m.forward(x),
        );
        check(
            "hybrid",
            HybridAttentionConfig::new(16, 4)
                .with_dropout(0.5)
                .init(&device),
            |m| HybridAttention {
                dropout: none(),
                ..m.clone()
            },
            |m, x| m.forward(x),
        );
    }
}
