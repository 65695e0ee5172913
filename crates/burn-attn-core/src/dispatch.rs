//! Which implementation served an attention call, and why the others declined.
//!
//! The core alone decides: the matrix-unit kernel where it takes the call, then (for f32,
//! when asked) the tf32 kernel, then the portable kernel, then the tiled tensor ops. A
//! caller that wants to know passes a [`DispatchLog`] in the options; every call made
//! with those options appends one [`Dispatch`] per pass when the op actually executes
//! (under Burn's fusion stream that is when the stream runs, not when the call returns),
//! so a log is per call site and safe to use from several threads. Backends without
//! kernels record the tiled ops with no declines. `pattern_attention` calls whose mask the
//! band kernels cannot evaluate (strided columns, block layouts, key padding, dropout in
//! training) record their forward when called: served by a block-sparse kernel on CubeCL
//! devices (its backward is recorded when it executes), otherwise by the tiled ops with the
//! mask as the band kernels' reason and the block-sparse kernels' own; a tiled forward's
//! backward is Burn's autodiff of the tensor ops and is not recorded.

use std::sync::{Arc, Mutex};

pub use burn_attn_kernels::plan::Unsupported;

/// An implementation of the attention op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Implementation {
    /// The matrix-unit forward (`mma.sync.m16n8k16`, f16/bf16, CUDA sm_80+).
    FlashMma,
    /// The matrix-unit forward on tf32 products (f32 inputs, CUDA sm_80+, opt-in).
    FlashTf32,
    /// The portable forward kernel (every CubeCL runtime and dtype).
    FlashUnit,
    /// The matrix-unit backward kernels (dQ; dK/dV).
    FlashMmaBackward,
    /// The portable backward kernels (dQ; dK/dV).
    FlashUnitBackward,
    /// The block-sparse matrix-unit forward (f16/bf16, CUDA sm_80+; strided columns, block
    /// layouts, key padding, document ids, dropout).
    FlashMmaSparse,
    /// The block-sparse portable forward (every CubeCL runtime and dtype).
    FlashUnitSparse,
    /// The block-sparse matrix-unit backward kernels (dQ; dK/dV; f16/bf16, CUDA sm_80+).
    FlashMmaSparseBackward,
    /// The block-sparse portable backward kernels (dQ; dK/dV).
    FlashUnitSparseBackward,
    /// The chunked linear-attention kernel (portable; forward).
    LinearChunk,
    /// The chunked linear-attention kernel's backward passes (portable).
    LinearChunkBackward,
    /// The chunked linear-attention kernel on matrix units (bf16, CUDA sm_80+, head dims 64
    /// and 128, value dims a multiple of 64; forward).
    LinearChunkMma,
    /// The backward passes, all on the matrix-unit kernel.
    LinearChunkMmaBackward,
    /// The tiled tensor-op implementation (every backend; for linear attention, its
    /// tensor ops).
    Tiled,
}

impl Implementation {
    /// Whether this is one of the GPU kernels (not the tiled tensor ops).
    pub fn is_kernel(self) -> bool {
        self != Implementation::Tiled
    }
}

/// Why an implementation did not serve a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decline {
    /// The options ask for the tiled tensor ops ([`KernelPolicy::Tiled`]).
    TiledRequested,
    /// The kernel's plan declined the call.
    Kernel(Unsupported),
    /// The call's mask has rules no kernel evaluates yet (named).
    Mask(&'static str),
}

impl core::fmt::Display for Decline {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Decline::TiledRequested => write!(f, "the options ask for the tiled tensor ops"),
            Decline::Kernel(why) => write!(f, "{why}"),
            Decline::Mask(what) => write!(f, "no kernel evaluates {what}"),
        }
    }
}

/// Which implementations may serve a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum KernelPolicy {
    /// A kernel where one takes the call, the tiled tensor ops otherwise.
    #[default]
    Auto,
    /// A kernel or a panic naming every kernel's reason to decline, raised where the op
    /// executes (for tests and benchmarks that must not time a fallback); under Burn's
    /// fusion stream that is inside the stream, at the next read or sync.
    Require,
    /// The tiled tensor ops (comparisons, and ruling the kernels out when debugging).
    Tiled,
}

/// The forward or backward pass of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// The forward (output and log-sum-exp).
    Forward,
    /// The backward (gradients of Q, K and V).
    Backward,
}

/// Implementations that declined a pass, in the order they were tried, with their reasons.
pub(crate) type Declines = Vec<(Implementation, Decline)>;

/// One executed pass: what served it and why the implementations tried before declined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// Forward or backward.
    pub pass: Pass,
    /// The implementation that ran.
    pub served: Implementation,
    /// The implementations tried first, in order, with their reasons.
    pub declined: Vec<(Implementation, Decline)>,
}

impl core::fmt::Display for Dispatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}: {:?}", self.pass, self.served)?;
        for (imp, why) in &self.declined {
            write!(f, "; {imp:?} declined: {why}")?;
        }
        Ok(())
    }
}

/// A record of the dispatches of the calls made with the options that hold it; clones
/// share one record.
#[derive(Debug, Clone, Default)]
pub struct DispatchLog(Arc<Mutex<Vec<Dispatch>>>);

impl DispatchLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every dispatch recorded so far, oldest first.
    pub fn entries(&self) -> Vec<Dispatch> {
        self.0.lock().expect("dispatch log lock").clone()
    }

    /// The dispatches of `pass`, oldest first.
    pub fn of(&self, pass: Pass) -> Vec<Dispatch> {
        self.entries()
            .into_iter()
            .filter(|d| d.pass == pass)
            .collect()
    }

    /// Forgets the recorded dispatches.
    pub fn clear(&self) {
        self.0.lock().expect("dispatch log lock").clear();
    }

    pub(crate) fn record(&self, dispatch: Dispatch) {
        self.0.lock().expect("dispatch log lock").push(dispatch);
    }
}

/// Logs share identity, not contents: two options are equal when they write to one log.
impl PartialEq for DispatchLog {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Records `dispatch` in the options' log (if any) and traces it.
pub(crate) fn report(log: Option<&DispatchLog>, dispatch: Dispatch) {
    log::debug!("burn-attn: {dispatch}");
    if let Some(log) = log {
        log.record(dispatch);
    }
}

/// Serves a call with the tiled tensor ops after `declined`: records the dispatch, or
/// panics when the options require a kernel.
pub(crate) fn serve_tiled<T>(
    pass: Pass,
    options: &crate::AttentionOptions,
    declined: Declines,
    run: impl FnOnce() -> T,
) -> T {
    serve_tiled_with(pass, options.kernel, options.log.as_ref(), declined, run)
}

/// [`serve_tiled`] for a call's kernel policy and log.
pub(crate) fn serve_tiled_with<T>(
    pass: Pass,
    policy: KernelPolicy,
    log: Option<&DispatchLog>,
    declined: Declines,
    run: impl FnOnce() -> T,
) -> T {
    let dispatch = Dispatch {
        pass,
        served: Implementation::Tiled,
        declined,
    };
    if policy == KernelPolicy::Require {
        let reasons = if dispatch.declined.is_empty() {
            "the backend has no attention kernels".to_string()
        } else {
            dispatch.to_string()
        };
        panic!("burn-attn: a kernel is required and none takes the call ({reasons})");
    }
    report(log, dispatch);
    run()
}
