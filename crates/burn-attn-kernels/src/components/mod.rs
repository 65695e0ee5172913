//! The pieces the kernels are written with: matrix-unit fragments and products, shared-
//! memory staging, the online-softmax step, epilogues, the portable register tiles and the
//! cube schedule. No plans; the only launches are the probe kernels that test the softmax
//! step and the schedule on their own.

pub(crate) mod band;
pub(crate) mod epilogue;
pub(crate) mod fragments;
pub(crate) mod pipeline;
pub mod products;
pub(crate) mod register_tile;
pub(crate) mod schedule;
pub(crate) mod softmax;
pub(crate) mod staging;
