//! The backend abstraction: where buffers live and how they move.
//!
//! [`Backend`] covers memory only. Each kernel family adds its own trait on
//! top (for example [`crate::projection::ProjectionOps`]), implemented once in
//! `src/cpu/<family>.rs` and once in `src/cuda/<family>.rs`, so the trainer,
//! the CLI and the benches are written once over both.

use crate::Result;

/// Plain-old-data values a buffer can hold (floats and integer indices).
pub trait Scalar:
    Copy
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
}

impl<T> Scalar for T where
    T: Copy
        + Send
        + Sync
        + Default
        + std::fmt::Debug
        + bytemuck::Pod
        + cudarc::driver::DeviceRepr
        + cudarc::driver::ValidAsZeroBits
        + 'static
{
}

/// A place to run kernels: the CPU oracle or a CUDA device.
pub trait Backend: Send + Sync {
    /// A buffer of `T` owned by this backend (`Vec<T>` on the CPU,
    /// `cudarc::driver::CudaSlice<T>` on a GPU).
    type Buf<T: Scalar>: Send + Sync;

    /// A human-readable description, e.g. `cpu (2 threads)` or
    /// `cuda:0 NVIDIA H100 80GB HBM3 (sm_90)`.
    fn describe(&self) -> String;

    /// A buffer of `len` zeros.
    fn zeros<T: Scalar>(&self, len: usize) -> Result<Self::Buf<T>>;

    /// Copies host data into a new buffer.
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buf<T>>;

    /// Copies a buffer back to the host (waits for pending work).
    fn download<T: Scalar>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;

    /// Number of elements in a buffer.
    fn len<T: Scalar>(buf: &Self::Buf<T>) -> usize;

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;
}
