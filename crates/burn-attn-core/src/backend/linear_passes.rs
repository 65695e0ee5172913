//! The passes one linear-attention call runs, forward and backward: their modes, and the
//! sizes each is planned at. One description serves both the plan that decides whether the
//! kernel takes the call (`linear_kernel::plan_call`) and the composition that runs it
//! (`linear_cube`), so the two cannot drift apart.

use burn_attn_kernels::plan::{LinearExtra, LinearMap, LinearMode, LinearSizes};

use super::linear_kernel::LinearCall;
use crate::shape::AttentionShape;

/// The causal call's passes: the forward, and the backward's `dq` (forward direction),
/// `dk` and `dv` (reversed).
pub(crate) struct CausalPasses {
    pub forward: LinearMode,
    pub dq: LinearMode,
    pub dk: LinearMode,
    pub dv: LinearMode,
}

/// The non-causal call's passes: the forward's state and apply passes, and a state and an
/// apply pass for each of the backward's `dq`, `dk` and `dv`.
pub(crate) struct FullPasses {
    pub state: LinearMode,
    pub apply: LinearMode,
    pub dq_state: LinearMode,
    pub dq_apply: LinearMode,
    pub dk_state: LinearMode,
    pub dk_apply: LinearMode,
    pub dv_state: LinearMode,
    pub dv_apply: LinearMode,
}

/// Where a planned pass belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Forward,
    Backward,
}

impl LinearCall {
    /// The feature map as the kernel applies it.
    pub(crate) fn map(&self) -> LinearMap {
        self.options
            .feature_map
            .map_or(LinearMap::Identity, |map| map.kernel_map())
    }

    /// The mode with the normaliser's scalar (`extra`) where the call normalises.
    fn with_extra(&self, mode: LinearMode, extra: LinearExtra) -> LinearMode {
        LinearMode {
            extra: if self.options.normalise {
                extra
            } else {
                LinearExtra::None
            },
            ..mode
        }
    }

    /// The causal call's passes. The feature map applies to the operands that are `q` or
    /// `k`: `a`, `b` forward; `c` in `dq` and `dk`; `a`, `b` in `dv`.
    pub(crate) fn causal_passes(&self) -> CausalPasses {
        let map = self.map();
        let reversed = |mode: LinearMode| LinearMode {
            reverse: true,
            ..mode
        };
        CausalPasses {
            forward: LinearMode {
                state_in: self.state_in,
                state_out: true,
                ..LinearMode::causal(self.options.normalise)
            }
            .mapped(map, true, true, false),
            dq: LinearMode {
                state_in: self.state_in,
                ..self.with_extra(LinearMode::causal(false), LinearExtra::Rows)
            }
            .mapped(map, false, false, true),
            dk: reversed(self.with_extra(LinearMode::causal(false), LinearExtra::Keys))
                .mapped(map, false, false, true),
            dv: reversed(LinearMode::causal(false)).mapped(map, true, true, false),
        }
    }

    /// The non-causal call's passes (the feature map as in [`Self::causal_passes`]).
    pub(crate) fn full_passes(&self) -> FullPasses {
        let map = self.map();
        let normalise = self.options.normalise;
        FullPasses {
            state: LinearMode::state(normalise).mapped(map, false, true, false),
            apply: LinearMode::apply(normalise).mapped(map, true, false, false),
            dq_state: self
                .with_extra(LinearMode::state(false), LinearExtra::Rows)
                .mapped(map, false, false, true),
            dq_apply: self.with_extra(LinearMode::apply(false), LinearExtra::Rows),
            dk_state: self
                .with_extra(LinearMode::state(false), LinearExtra::Keys)
                .mapped(map, false, false, true),
            dk_apply: self.with_extra(LinearMode::apply(false), LinearExtra::Keys),
            dv_state: LinearMode::state(false).mapped(map, false, true, false),
            dv_apply: LinearMode::apply(false).mapped(map, true, false, false),
        }
    }

    /// Every pass of the call on `shape`, with the sizes it is planned at (grid heads: the
    /// queries', an upper bound of the launches').
    pub(crate) fn planned_passes(
        &self,
        shape: &AttentionShape,
    ) -> Vec<(Direction, LinearSizes, LinearMode)> {
        let AttentionShape {
            batch,
            heads,
            seq_q,
            seq_k,
            head_dim: d,
            value_dim: dv,
            ..
        } = *shape;
        let sizes = |rows: usize, dim: usize, value_dim: usize| LinearSizes {
            batch,
            heads,
            rows,
            dim,
            value_dim,
            span: batch * heads * seq_q.max(seq_k) * d.max(dv),
            // The staging does not change whether the kernel serves.
            aligned_rows: false,
        };
        use Direction::{Backward, Forward};
        if self.causal {
            let p = self.causal_passes();
            vec![
                (Forward, sizes(seq_q, d, dv), p.forward),
                (Backward, sizes(seq_q, dv, d), p.dq),
                (Backward, sizes(seq_q, dv, d), p.dk),
                (Backward, sizes(seq_q, d, dv), p.dv),
            ]
        } else {
            let p = self.full_passes();
            vec![
                (Forward, sizes(seq_k, d, dv), p.state),
                (Forward, sizes(seq_q, d, dv), p.apply),
                (Backward, sizes(seq_k, dv, d), p.dq_state),
                (Backward, sizes(seq_q, dv, d), p.dq_apply),
                (Backward, sizes(seq_q, dv, d), p.dk_state),
                (Backward, sizes(seq_k, dv, d), p.dk_apply),
                (Backward, sizes(seq_q, d, dv), p.dv_state),
                (Backward, sizes(seq_k, d, dv), p.dv_apply),
            ]
        }
    }
}
