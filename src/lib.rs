//! # burn-attn
//!
//! Efficient attention mechanisms for [Burn](https://burn.dev) as drop-in modules:
//! exact attention with the FlashAttention algorithm, fixed-pattern and learned sparse
//! attention, linear and causal linear attention, sliding-window and adaptive-window
//! attention, and a hybrid that picks the mechanism by sequence length.
//!
//! Every module is a Burn module (no backend type parameter: the device says where it
//! runs), has a `#[derive(Config)]` config with `init(&device)`, and takes `[batch, seq,
//! d_model]`. Backends are compiled in by cargo feature (`ndarray`, the default; `flex`;
//! `wgpu`, `vulkan`, `metal`; `cuda`); on devices with a GPU kernel the exact cores run it,
//! elsewhere a tiled tensor-op implementation.
//!
//! ```
//! use burn::tensor::{Device, Distribution, Tensor};
//! use burn_attn::{FlashAttentionConfig, SlidingWindowAttentionConfig};
//!
//! # #[allow(deprecated)]
//! let device = Device::ndarray();
//! let attn = FlashAttentionConfig::new(64, 4).with_causal(true).init(&device);
//! let x = Tensor::<3>::random([2, 10, 64], Distribution::Normal(0.0, 1.0), &device);
//! let y = attn.forward(x.clone());
//! assert_eq!(y.dims(), [2, 10, 64]);
//!
//! let local = SlidingWindowAttentionConfig::new(64, 4).with_window(4).init(&device);
//! assert_eq!(local.forward(x).dims(), [2, 10, 64]);
//! ```
#![warn(missing_docs)]

/// The attention cores: options, key patterns, reference, tiled path and the backend op.
pub use burn_attn_core as cores;
/// The modules, one per mechanism, and the complexity model.
pub use burn_attn_nn as nn;

pub use burn_attn_core::{
    attention, masked_attention, pattern_attention, try_attention, try_masked_attention,
    try_pattern_attention, AttentionBackend, AttentionError, AttentionMasks, AttentionOptions,
    DocumentIds, LinearAttentionState, SoftEdge, Window,
};
pub use burn_attn_nn::{
    AdaptiveSlidingWindowAttention, AdaptiveSlidingWindowAttentionConfig, AnyAttention,
    AnyAttentionConfig, AttentionDropout, AttentionInput, CausalLinearAttention,
    CausalLinearAttentionConfig, ComplexityModel, DecodeState, FeatureMap, FlashAttention,
    FlashAttentionConfig, HybridAttention, HybridAttentionConfig, HybridChoice, KvCache,
    LearnedSparseAttention, LearnedSparseAttentionConfig, LinearAttention, LinearAttentionConfig,
    MultiHeadProjection, MultiHeadProjectionConfig, PagedKvCache, SequenceId,
    SlidingWindowAttention, SlidingWindowAttentionConfig, SparseAttention, SparseAttentionConfig,
    SparsePattern,
};
