//! Attention cores for Burn: the options and key patterns every implementation shares, the
//! plain reference, the tiled tensor-op implementation, and the [`AttentionBackend`]
//! extension through which backends with GPU kernels take over.
//!
//! Layouts: kernel tensors are `[batch, heads, seq, head_dim]`; keys and values may have
//! fewer heads (GQA/MQA) as long as they divide the query heads. When `seq_q != seq_k`,
//! query `i` is aligned with key `i + seq_k - seq_q`.
#![warn(missing_docs)]

mod backend;
mod backward;
mod dispatch;
mod error;
mod linear;
mod options;
mod pattern;
mod reference;
mod shape;
mod tiled;

pub use backend::{
    attention, attention_with_lse, pattern_attention, try_attention, try_attention_with_lse,
    try_pattern_attention, AttentionBackend,
};
pub use backward::tiled_band_backward;
pub use dispatch::{
    Decline, Dispatch, DispatchLog, Implementation, KernelPolicy, Pass, Unsupported,
};
pub use error::{ensure, AttentionError};
pub use linear::{
    causal_linear_attention, check_linear_eps, linear_attention, LinearAttentionState,
};
pub use options::{aligned, AttentionOptions, ForcedPlan, Window};
pub use pattern::{BlockLayout, KeyPattern, TileCover};
pub use reference::reference_attention;
pub use shape::{repeat_kv, AttentionShape};
pub use tiled::{tiled_attention, TileBias, TiledSpec, DEFAULT_TILE};

/// The CubeCL kernels and their launchers (with the `wgpu` or `cuda` feature), for callers
/// that launch them directly (the kernel tests do).
#[cfg(feature = "cube")]
pub use burn_attn_kernels as kernels;
