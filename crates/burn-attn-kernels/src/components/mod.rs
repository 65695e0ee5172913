//! The pieces the kernels are written with, one concept per file:
//! - `band`: which columns (keys, or queries in the transposed pass) a cube's rows and a
//!   plane's rows see, and which tiles need no mask;
//! - `schedule`: which block and head a cube serves (`CubeHead`, the heavy-first order);
//! - `staging`: row tiles of a head copied into shared memory (`StageTile`, the one
//!   comptime tile config; `HeadRows`, where the head's rows are), and `pipeline`: the
//!   double-buffered `cp.async` tile pair of a loop, or plain loads into one buffer;
//! - `fragments` (matrix-unit registers, the backward's products) and `products` (the
//!   forward's two products, per dtype family); `mma_forward`: the matrix-unit forwards'
//!   key-tile step;
//! - `softmax`: the online-softmax step on accumulator registers (`exp`: its exponential,
//!   PTX's approximation on CUDA); `epilogue`: rows out;
//! - `register_tile`: the portable kernels' per-unit register tiles; `unit_forward` and
//!   `unit_backward`: the portable forwards' and backwards' tile steps and epilogues;
//! - `key_blocks`: the blocks a block visits under a block-sparse plan (key blocks of a
//!   query block, or the transposed lists), and `element_rules`: which keys of a partially
//!   visible block each query sees, and which probabilities dropout drops;
//! - `linear_chunk`: the chunked linear-attention pass's row walk (forward or reversed)
//!   and staging.
//!
//! No plans; the only launches are the probe kernels that test the softmax step and the
//! schedule on their own.

pub(crate) mod band;
pub mod element_rules;
pub(crate) mod epilogue;
pub(crate) mod exp;
pub(crate) mod fragments;
pub(crate) mod key_blocks;
pub(crate) mod linear_chunk;
pub(crate) mod mma_backward;
pub(crate) mod mma_forward;
pub(crate) mod pipeline;
pub mod products;
pub(crate) mod register_tile;
pub(crate) mod schedule;
pub(crate) mod softmax;
pub(crate) mod staging;
pub(crate) mod unit_backward;
pub(crate) mod unit_forward;
