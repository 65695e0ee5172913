//! The burn-attn comparison tool as a library: the `burn-attn-bench` binary is a thin
//! wrapper, and tests drive the same [`run()`] path at tiny sizes.
#![warn(missing_docs)]

pub mod alloc;
pub mod calibrate;
pub mod cli;
pub mod decode;
pub mod device;
pub mod digest;
pub mod growth;
pub mod kernel;
pub mod linear;
pub mod masks;
pub mod output;
pub mod peers;
pub mod plots;
pub mod run;
pub mod table;

pub use cli::{
    BackendKind, CalibrateArgs, Cli, Command, CompareArgs, DType, DigestArgs, ModelArgs,
};
pub use device::{device_for, memory_meter};
pub use run::{progress_bar, run, MemoryMeter, Report, Row};
pub use table::{format_model, format_table};
