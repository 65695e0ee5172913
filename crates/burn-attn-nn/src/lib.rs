//! Burn modules for efficient attention. Every variant shares
//! [`MultiHeadProjection`], has a `#[derive(Config)]`
//! config with `init(&device)`, and `forward(x)` on `[batch, seq, d_model]`. The cores
//! run through [`burn_attn_core`], which picks a GPU kernel where the backend has one.
#![warn(missing_docs)]

pub mod adaptive_window;
pub mod any;
pub mod causal_linear;
pub mod complexity;
mod context_parallel;
pub mod dropout;
pub mod flash;
mod from_burn_nn;
pub mod hybrid;
pub mod input;
pub mod kv_cache;
pub mod learned_sparse;
pub mod linear;
pub mod paged_kv_cache;
pub mod projection;
mod rotary;
pub mod sliding_window;
pub mod sparse;
#[cfg(test)]
mod test_util;

pub use adaptive_window::{AdaptiveSlidingWindowAttention, AdaptiveSlidingWindowAttentionConfig};
pub use any::{AnyAttention, AnyAttentionConfig, DecodeState};
pub use causal_linear::{CausalLinearAttention, CausalLinearAttentionConfig};
pub use complexity::ComplexityModel;
pub use dropout::AttentionDropout;
pub use flash::{FlashAttention, FlashAttentionConfig};
pub use hybrid::{HybridAttention, HybridAttentionConfig, HybridChoice};
pub use input::AttentionInput;
pub use kv_cache::KvCache;
pub use learned_sparse::{LearnedSparseAttention, LearnedSparseAttentionConfig};
pub use linear::{FeatureMap, LinearAttention, LinearAttentionConfig};
pub use paged_kv_cache::{PagedKvCache, SequenceId};
pub use projection::{Heads, MultiHeadProjection, MultiHeadProjectionConfig};
pub use sliding_window::{SlidingWindowAttention, SlidingWindowAttentionConfig};
pub use sparse::{SparseAttention, SparseAttentionConfig, SparsePattern};
