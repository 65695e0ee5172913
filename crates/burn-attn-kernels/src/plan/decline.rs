//! Why a kernel declines a call: typed reasons, so the caller can say which implementation
//! served a call and why the others did not.

use super::Precision;

/// Why a kernel's plan declined a call (the caller then tries another implementation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// The inputs' dtypes: none of f32, f16, bf16, or not one dtype for all.
    DType {
        /// What the inputs hold, in words (e.g. `q F16, k F32, v F16`).
        got: String,
    },
    /// The kernel takes other dtypes (e.g. the matrix-unit kernels take f16 and bf16).
    Precision {
        /// The inputs' dtype.
        got: Precision,
        /// What the kernel takes, in words.
        takes: &'static str,
    },
    /// The kernel runs on another runtime (the matrix-unit kernels hard-code PTX layouts).
    Runtime {
        /// The call's runtime.
        got: &'static str,
        /// The runtime the kernel needs.
        needs: &'static str,
    },
    /// The device lacks the matrix instruction the kernel is written with.
    MatrixInstruction {
        /// The instruction, e.g. `mma.sync.m16n8k16 with ldmatrix`.
        instruction: &'static str,
        /// The inputs' dtype.
        precision: Precision,
    },
    /// Shapes that do not fit together (see the message).
    Shapes(String),
    /// A head or value dim outside what the kernel takes.
    HeadDim {
        /// Head dim of q and k.
        dim: usize,
        /// Head dim of v.
        value_dim: usize,
        /// The largest the kernel takes.
        max: usize,
    },
    /// Lengths past the kernels' 32-bit band arithmetic.
    Length {
        /// `seq_q + seq_k` of the call.
        total: usize,
        /// The largest sum taken.
        max: usize,
    },
    /// A tensor past 32-bit element offsets on a device without 64-bit ones.
    Offsets {
        /// Elements spanned by the call's largest tensor.
        span: usize,
        /// The most 32-bit offsets index.
        max: usize,
        /// The runtime.
        runtime: &'static str,
    },
    /// More cubes along an axis than CubeCL launches.
    Grid {
        /// Cubes along the rows.
        x: usize,
        /// Cubes along `batch * heads`.
        y: usize,
        /// The limit of each axis.
        max: usize,
    },
    /// Not even the smallest tile fits the device's shared memory.
    SharedMemory {
        /// Bytes the smallest tile needs.
        needed: usize,
        /// Bytes a cube may use on the device.
        available: usize,
    },
    /// A software adapter (llvmpipe) would end the kernel's loops early: it counts every
    /// loop iteration of an invocation against one budget and silently leaves all loops
    /// once it is spent.
    LoopBudget {
        /// Loop iterations one unit could run.
        iterations: usize,
        /// The adapter's budget per invocation.
        budget: usize,
    },
    /// A forced plan (tuning) that this call cannot run.
    Forced(String),
    /// The kernel runs only when the caller opts in (tf32 products).
    NotRequested(&'static str),
}

impl core::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Unsupported::DType { got } => {
                write!(f, "dtypes {got} (one of f32, f16, bf16 for all)")
            }
            Unsupported::Precision { got, takes } => {
                write!(f, "dtype {got:?} (the kernel takes {takes})")
            }
            Unsupported::Runtime { got, needs } => {
                write!(f, "runtime {got} (the kernel needs {needs})")
            }
            Unsupported::MatrixInstruction {
                instruction,
                precision,
            } => write!(f, "no {instruction} for {precision:?} on this device"),
            Unsupported::Shapes(s) => write!(f, "shapes: {s}"),
            Unsupported::HeadDim {
                dim,
                value_dim,
                max,
            } => write!(f, "head_dim {dim} / value_dim {value_dim} (1..={max})"),
            Unsupported::Length { total, max } => {
                write!(f, "seq_q + seq_k = {total} (at most {max})")
            }
            Unsupported::Grid { x, y, max } => {
                write!(f, "grid {x} x {y} cubes (each axis at most {max})")
            }
            Unsupported::Offsets { span, max, runtime } => write!(
                f,
                "a tensor spans {span} elements, past 32-bit offsets ({max}), and {runtime} \
                 kernels have no 64-bit ones"
            ),
            Unsupported::SharedMemory { needed, available } => write!(
                f,
                "the smallest tile needs {needed} bytes of shared memory, the device has \
                 {available}"
            ),
            Unsupported::LoopBudget { iterations, budget } => write!(
                f,
                "up to {iterations} loop iterations per unit on a software adapter, which \
                 ends loops past {budget}"
            ),
            Unsupported::Forced(s) => write!(f, "forced plan: {s}"),
            Unsupported::NotRequested(s) => write!(f, "not requested: {s}"),
        }
    }
}

impl std::error::Error for Unsupported {}
