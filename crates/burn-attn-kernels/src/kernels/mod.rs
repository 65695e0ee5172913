//! The kernels, each a sequence of named steps built from `components`: the matrix-unit
//! forward (`flash_mma`: f16/bf16, or f32 on tf32 products, by its products), the portable
//! forward (`flash_unit`), their block-sparse forms (`flash_mma_sparse`,
//! `flash_unit_sparse`), and the backward pairs (dQ; dK/dV) of both families, dense and
//! block-sparse; and the chunked linear-attention pass (`linear_chunk`, portable; `linear_chunk_mma`, on
//! matrix units).

mod flash_mma;
mod flash_mma_backward;
mod flash_mma_sparse;
mod flash_mma_sparse_backward;
mod flash_unit;
mod flash_unit_backward;
mod flash_unit_sparse;
mod flash_unit_sparse_backward;
mod linear_chunk;
mod linear_chunk_mma;
mod merge_key_splits;

pub use crate::components::products::{ForwardProducts, Ldmatrix16, Tf32Lanes};
pub use flash_mma::flash_mma_kernel;
pub use flash_mma_backward::{flash_mma_backward_dkdv_kernel, flash_mma_backward_dq_kernel};
pub use flash_mma_sparse::flash_mma_sparse_kernel;
pub use flash_mma_sparse_backward::{
    flash_mma_sparse_backward_dkdv_kernel, flash_mma_sparse_backward_dq_kernel,
};
pub use flash_unit::flash_unit_kernel;
pub use flash_unit_backward::{flash_unit_backward_dkdv_kernel, flash_unit_backward_dq_kernel};
pub use flash_unit_sparse::flash_unit_sparse_kernel;
pub use flash_unit_sparse_backward::{
    flash_unit_sparse_backward_dkdv_kernel, flash_unit_sparse_backward_dq_kernel,
};
pub use linear_chunk::linear_chunk_kernel;
pub use linear_chunk_mma::linear_chunk_mma_kernel;
pub use merge_key_splits::merge_key_splits_kernel;
