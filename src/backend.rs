//! The backend abstraction: where buffers live and how they move.
//!
//! [`Backend`] covers memory only. Each kernel family adds its own trait on
//! top (for example [`crate::projection::ProjectionOps`]), implemented once in
//! `src/cpu/<family>.rs` and once in `src/cuda/<family>.rs`, so the trainer,
//! the CLI and the benches are written once over both.

use crate::Result;

/// What a device buffer asks of its elements: cudarc's `DeviceRepr` and
/// `ValidAsZeroBits` with the `cuda` feature, nothing without it (so the
/// element traits keep one definition in both builds). Implemented for
/// every type that qualifies; there is nothing to implement by hand.
#[cfg(feature = "cuda")]
pub trait DeviceCopy: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceCopy for T {}

/// What a device buffer asks of its elements: cudarc's `DeviceRepr` and
/// `ValidAsZeroBits` with the `cuda` feature, nothing without it (so the
/// element traits keep one definition in both builds). Implemented for
/// every type that qualifies; there is nothing to implement by hand.
#[cfg(not(feature = "cuda"))]
pub trait DeviceCopy {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceCopy for T {}

/// Plain-old-data values a buffer can hold (floats and integer indices).
pub trait Scalar: Copy + Send + Sync + Default + std::fmt::Debug + bytemuck::Pod + DeviceCopy + 'static {}

impl<T> Scalar for T where T: Copy + Send + Sync + Default + std::fmt::Debug + bytemuck::Pod + DeviceCopy + 'static {}

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

    /// A buffer of `len` elements whose contents are unspecified: the
    /// caller must write every element before anything reads it. For
    /// outputs an op overwrites completely (a GEMM with β = 0, a
    /// LayerNorm, a cast), it saves the memset of [`Backend::zeros`]: a
    /// pass of pure write bandwidth over the buffer. Never use it for an
    /// output an op **accumulates** into (`+=`), nor for a strided output
    /// whose columns past the written width are read later unless another
    /// op writes them first. The CPU fills it with [`poison`] (NaN, or a
    /// large integer), so a CPU test that reads an element before it is
    /// written sees the poison in its results.
    fn uninit<T: Scalar>(&self, len: usize) -> Result<Self::Buf<T>>;

    /// Copies host data into a new buffer.
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buf<T>>;

    /// Copies a buffer back to the host (waits for pending work).
    fn download<T: Scalar>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;

    /// Copies host data into an existing buffer of the same length, keeping
    /// its address (a captured [`StepGraph`] reads its inputs from fixed
    /// addresses). A length mismatch is an [`crate::Error::Shape`].
    fn upload_into<T: Scalar>(&self, host: &[T], buf: &mut Self::Buf<T>) -> Result<()>;

    /// Copies `src` into `dst` (same length) on the backend, queued like a
    /// kernel (no wait).
    fn copy_into<T: Scalar>(&self, src: &Self::Buf<T>, dst: &mut Self::Buf<T>) -> Result<()>;

    /// Copies `n` elements of `src` from index `src_off` into `dst` from
    /// index `dst_off`, on the backend, queued like a kernel (no wait): how
    /// a caller works on a row range of a larger buffer (the LM head's row
    /// chunks) without sub-buffer views. A range past either buffer's end
    /// is an [`crate::Error::Shape`] ([`check_copy_range`]) and copies
    /// nothing. `src` and `dst` are distinct buffers, so the ranges never
    /// overlap.
    fn copy_range<T: Scalar>(
        &self,
        src: &Self::Buf<T>,
        src_off: usize,
        dst: &mut Self::Buf<T>,
        dst_off: usize,
        n: usize,
    ) -> Result<()>;

    /// Number of elements in a buffer.
    fn len<T: Scalar>(buf: &Self::Buf<T>) -> usize;

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    /// True for a device with bf16 tensor cores, where mixed precision is
    /// the sensible default (the CLI's `--precision auto`).
    fn has_tensor_cores(&self) -> bool {
        false
    }

    /// Starts collecting per-op timing marks ([`crate::op_timing`]),
    /// discarding any earlier ones.
    fn op_timing_start(&self) -> Result<()> {
        Ok(())
    }

    /// Closes the interval the previous mark opened and opens one named
    /// `label`. Free (and a no-op) while timing is off; a mark that fails
    /// to record is dropped rather than failing the op it precedes.
    fn op_mark(&self, _label: &'static str) {}

    /// Stops timing and returns the time per label (waits for the device).
    fn op_timing_finish(&self) -> Result<crate::op_timing::Breakdown> {
        Ok(Default::default())
    }

    /// True between [`Backend::op_timing_start`] and
    /// [`Backend::op_timing_finish`]: a caller that replays captured work
    /// runs it op by op instead, so that the marks mean something.
    fn op_timing_on(&self) -> bool {
        false
    }

    /// True when the backend can record queued work once and replay it
    /// ([`Backend::capture_begin`]). The CPU cannot: there is no queue, so
    /// there is nothing to save.
    fn supports_graphs(&self) -> bool {
        false
    }

    /// Starts recording instead of running: every op queued from this
    /// thread until [`Backend::capture_end`] becomes part of one graph and
    /// does not run now. Nothing may read results back in between. Always
    /// pair with `capture_end`, also when the recorded work failed.
    fn capture_begin(&self) -> Result<()> {
        Err(crate::Error::invalid(format!("graph capture on {}", self.describe()), "this backend has no graphs"))
    }

    /// Stops recording and returns the graph (it has not run yet: replay it
    /// once to do the recorded work).
    fn capture_end(&self) -> Result<Box<dyn StepGraph>> {
        Err(crate::Error::invalid(format!("graph capture on {}", self.describe()), "this backend has no graphs"))
    }
}

/// What [`Backend::uninit`] fills a CPU buffer with: every bit set but
/// the lowest. In every IEEE float format (f16, bf16, f32, f64) that is a
/// NaN (exponent all ones, mantissa non-zero), which propagates into
/// whatever reads it; in an unsigned integer it is `MAX − 1` (u32:
/// 4294967294), out of range as a token id or index and distinct from
/// [`crate::nn::IGNORE`] (`u32::MAX`), so a target read unwritten is an
/// error rather than silently ignored.
pub fn poison<T: Scalar>() -> T {
    let mut v: T = bytemuck::Zeroable::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut v);
    bytes.fill(0xFF);
    let lowest = if cfg!(target_endian = "little") { 0 } else { bytes.len().saturating_sub(1) };
    if let Some(b) = bytes.get_mut(lowest) {
        *b = 0xFE;
    }
    v
}

/// Work recorded once by [`Backend::capture_begin`] / [`Backend::capture_end`]
/// and replayed as a whole: the same kernels with the same arguments over
/// the same buffers, so inputs change only through writes into those buffers
/// ([`Backend::upload_into`]).
pub trait StepGraph: Send {
    /// Queues the recorded work once more (no wait).
    fn replay(&self) -> Result<()>;
}

/// The argument check of [`Backend::copy_range`], the same on every
/// backend: `[src_off, src_off + n)` lies inside a source of `src_len`
/// elements and `[dst_off, dst_off + n)` inside a destination of
/// `dst_len`.
pub fn check_copy_range(src_len: usize, src_off: usize, dst_len: usize, dst_off: usize, n: usize) -> Result<()> {
    for (operand, len, off) in [("source", src_len, src_off), ("destination", dst_len, dst_off)] {
        if off.checked_add(n).is_none_or(|end| end > len) {
            return Err(crate::Error::shape(
                "copy_range",
                operand,
                format!("{n} elements from offset {off} (pass a range inside the buffer)"),
                format!("a buffer of {len} elements"),
            ));
        }
    }
    Ok(())
}
