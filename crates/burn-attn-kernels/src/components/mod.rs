//! The pieces the kernels are written with: matrix-unit fragments and products, shared-
//! memory staging, the online-softmax step, epilogues, the portable register tiles and the
//! cube schedule. No launches, no plans.

pub(crate) mod epilogue;
pub(crate) mod fragments;
pub(crate) mod register_tile;
pub(crate) mod schedule;
pub(crate) mod softmax;
pub(crate) mod staging;
