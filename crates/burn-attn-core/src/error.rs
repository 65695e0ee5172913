//! Errors for bad input. Every message names the offending values.

use core::fmt;

/// Why an attention call or configuration was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionError {
    /// A tensor does not have the expected shape.
    Shape {
        /// Which tensor.
        what: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// Query heads are not a multiple of key/value heads.
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// The model width is not a multiple of the head count.
    ModelDimNotDivisible {
        /// Model width.
        d_model: usize,
        /// Head count.
        n_heads: usize,
    },
    /// A size that must be positive is zero.
    ZeroSize {
        /// Which parameter.
        what: &'static str,
    },
    /// A density or ratio outside `(0, 1]`.
    OutOfUnitRange {
        /// Which parameter.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// The minimum of a range is above its maximum.
    MinAboveMax {
        /// Which parameter.
        what: &'static str,
        /// The minimum given.
        min: usize,
        /// The maximum given.
        max: usize,
    },
    /// A non-finite or non-positive scale.
    InvalidScale {
        /// The scale given.
        scale: f64,
    },
    /// Any other invalid value, described.
    Invalid(String),
}

impl fmt::Display for AttentionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape {
                what,
                expected,
                got,
            } => {
                write!(f, "{what} has shape {got:?}, expected {expected}")
            }
            Self::HeadsNotDivisible { heads, kv_heads } => write!(
                f,
                "query heads ({heads}) must be a positive multiple of key/value heads ({kv_heads})"
            ),
            Self::ModelDimNotDivisible { d_model, n_heads } => write!(
                f,
                "d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            ),
            Self::ZeroSize { what } => write!(f, "{what} must be at least 1, got 0"),
            Self::OutOfUnitRange { what, value } => {
                write!(f, "{what} must be in (0, 1], got {value}")
            }
            Self::MinAboveMax { what, min, max } => {
                write!(f, "{what}: minimum ({min}) is above maximum ({max})")
            }
            Self::InvalidScale { scale } => {
                write!(f, "scale must be finite and positive in f32, got {scale:e}")
            }
            Self::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for AttentionError {}

/// Panics with the error's message: the form Burn's own tensor checks take, used where an
/// API returns a tensor rather than a `Result`.
#[track_caller]
pub fn ensure(result: Result<(), AttentionError>) {
    result.or_panic()
}

/// The value of a `Result` whose error becomes a panic with its message (the form of
/// [`ensure`]), reported at the caller: the panicking forms of the `try_` functions.
pub trait OrPanic<T> {
    /// The value, or a panic naming the error.
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for Result<T, AttentionError> {
    #[track_caller]
    fn or_panic(self) -> T {
        match self {
            Ok(value) => value,
            Err(err) => panic!("burn-attn: {err}"),
        }
    }
}
