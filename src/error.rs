//! The one error type of the crate.
//!
//! Every variant's message says what was wrong and, where there is one, how to
//! fix it. Nothing in the public API panics on bad input: shapes, dtypes,
//! indices and files are checked at the boundary and reported here.

use crate::dtype::DType;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in lorafuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operand has the wrong shape or length.
    #[error("{op}: `{operand}` has shape {got}, expected {expected}")]
    Shape {
        /// The operation that checked it.
        op: &'static str,
        /// Which operand.
        operand: &'static str,
        /// What the operation needed.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// An operand has the wrong element type.
    #[error("{op}: `{operand}` is {got}, expected {expected}")]
    DType {
        /// The operation that checked it.
        op: &'static str,
        /// Which operand.
        operand: &'static str,
        /// What the operation needed.
        expected: DType,
        /// What it was given.
        got: DType,
    },
    /// An index is out of its valid range.
    #[error("{what}: index {index} is out of range (must be < {bound})")]
    Index {
        /// What was being indexed.
        what: String,
        /// The offending index.
        index: u64,
        /// The exclusive upper bound.
        bound: u64,
    },
    /// A value is NaN or infinite where a finite value is required.
    #[error("{what}: non-finite value {value} at element {index}")]
    NonFinite {
        /// What was being checked.
        what: String,
        /// Position of the first non-finite element.
        index: usize,
        /// The value found there.
        value: f64,
    },
    /// An argument or configuration value is invalid.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which argument or setting.
        what: String,
        /// Why it is rejected, and what is accepted.
        why: String,
    },
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed, truncated or hostile.
    #[error("{path}: malformed file: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// No usable CUDA device: no driver library, no GPU, or a driver too old.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The crate was built without nvcc, so it carries no kernels.
    #[error(
        "CUDA kernels were not compiled into this build (nvcc was not found). \
         Install the pinned compiler with scripts/install-cuda-toolchain.sh, \
         export NVCC=<the path it prints>, and rebuild"
    )]
    KernelsNotBuilt,
    /// A CUDA driver or library call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda {
        /// What lorafuse was doing.
        context: String,
        /// The driver's or library's message.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), why: why.into() }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(
        op: &'static str,
        operand: &'static str,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        Error::Shape { op, operand, expected: expected.to_string(), got: got.to_string() }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl AsRef<std::path::Path>, why: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().display().to_string(), why: why.into() }
    }

    /// Wraps a CUDA driver error with what lorafuse was doing.
    pub fn cuda(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Cuda { context: context.into(), message: err.to_string() }
    }
}

/// Checks that `len` equals `expected`, naming the operand otherwise.
pub fn check_len(op: &'static str, operand: &'static str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::shape(op, operand, format!("[{expected}]"), format!("[{len}]")))
    }
}

/// Returns the first non-finite element of `values` as an error.
pub fn check_finite<T: crate::dtype::Element>(what: &str, values: &[T]) -> Result<()> {
    match values.iter().position(|v| !v.to_f64().is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { what: what.to_string(), index, value: values[index].to_f64() }),
    }
}
