//! Attention cores for Burn: the options and key patterns every implementation shares, the
//! plain reference, the tiled tensor-op implementation, and the [`AttentionBackend`]
//! extension through which backends with GPU kernels take over.
//!
//! Layouts: kernel tensors are `[batch, heads, seq, head_dim]`; keys and values may have
//! fewer heads (GQA/MQA) as long as they divide the query heads. When `seq_q != seq_k`,
//! query `i` is aligned with key `i + seq_k - seq_q`.
//!
//! Rows and special values, the same on every path: a query row that sees no key outputs
//! exactly 0 with log-sum-exp `-inf`, whatever its query holds; a NaN in a query row that
//! sees keys makes that row's output, log-sum-exp and query gradient NaN and leaves other
//! rows' outputs as they are (its NaN can also reach the key and value gradients of keys
//! it does not see, through zero weights in the products). A NaN in a key makes NaN the
//! rows that see it; one in a value can also reach rows that do not (zero weights times
//! NaN in the products). The kernels take tensors past `u32::MAX` elements with 64-bit
//! offsets where the device has them (CUDA); elsewhere they decline with a typed reason.
#![warn(missing_docs)]
// The `NdArray` selector of the backend extension names the deprecated burn-ndarray backend.
#![allow(deprecated)]

mod backend;
mod backward;
mod block_mask;
mod block_mask_cache;
mod context_parallel;
mod dispatch;
mod error;
mod feature_map;
mod grouped_rows;
mod linear;
mod masked;
mod merge;
mod options;
mod pattern;
mod reference;
mod score_terms;
mod shape;
mod strided;
#[cfg(test)]
mod test_util;
mod tiled;
mod untracked;

pub use backend::{
    attention, attention_with_lse, pattern_attention, try_attention, try_attention_with_lse,
    try_pattern_attention, AttentionBackend,
};
pub use backward::tiled_band_backward;
pub use block_mask::{BlockCover, BlockGrid, BlockMask};
pub use block_mask_cache::BlockMaskCache;
pub use context_parallel::{
    context_parallel_attention, try_context_parallel_attention,
    try_context_parallel_attention_with, zigzag_chunks, ContextParallelForm, SequenceSlice,
};
pub use dispatch::{
    Decline, Dispatch, DispatchLog, Implementation, KernelPolicy, Pass, Unsupported,
};
pub use error::{ensure, AttentionError, OrPanic};
pub use feature_map::FeatureMap;
pub use linear::{
    causal_linear_attention, causal_linear_attention_with, check_linear_eps, linear_attention,
    linear_attention_with, LinearAttentionState, LinearOptions,
};
pub use masked::{
    block_sparse_kernels, masked_attention, try_masked_attention, AttentionMasks, DocumentIds,
};
pub use options::{aligned, AttentionOptions, ForcedPlan, Window};
pub use pattern::{BlockLayout, KeyPattern, TileCover};
pub use reference::reference_attention;
pub use score_terms::{alibi_slopes, SoftEdge};
pub use shape::{repeat_kv, AttentionShape};
pub use tiled::{smallest_normal, tiled_attention, TileBias, TiledSpec, DEFAULT_TILE};

/// The CubeCL kernels and their launchers (with the `wgpu` or `cuda` feature), for callers
/// that launch them directly (the kernel tests do).
#[cfg(feature = "cube")]
pub use burn_attn_kernels as kernels;
