//! The element types kernels work on: f32, f16 and bf16.
//!
//! Storage may be half precision; arithmetic always accumulates in f32 on the
//! GPU and in f64 in the CPU oracle.

use half::{bf16, f16};

/// A runtime tag for an element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The suffix kernel names carry, e.g. `projection_gather_bf16`.
    pub const fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Relative Frobenius error a kernel may show against the f64 oracle when
    /// its inputs and outputs are stored in this type (f32 accumulation).
    pub const fn tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 1e-2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(crate::Error::invalid("dtype", format!("`{s}`: expected f32, f16 or bf16"))),
        }
    }
}

/// A storage element type. Implemented for `f32`, `half::f16` and `half::bf16`.
pub trait Element:
    Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + bytemuck::Pod + crate::backend::DeviceCopy + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widens to f32 exactly.
    fn to_f32(self) -> f32;
    /// Rounds from f32 to nearest even.
    fn from_f32(v: f32) -> Self;
    /// Widens to f64 exactly.
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// Rounds from f64 (through f32, as the kernels do).
    fn from_f64(v: f64) -> Self {
        Self::from_f32(v as f32)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Converts a slice of one element type into another (rounding to nearest).
pub fn convert<S: Element, D: Element>(src: &[S]) -> Vec<D> {
    src.iter().map(|&v| D::from_f32(v.to_f32())).collect()
}

/// Widens every element to f64 exactly: the working precision of the CPU
/// oracle and of every test's expected values.
pub fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}
