//! Whole-step CUDA graphs: record the ~1,000 launches of a training step
//! once (stream capture) and replay them with one `cuGraphLaunch`, so the
//! step no longer pays a launch gap per kernel.
//!
//! What capture demands, and how this backend meets it (cudarc 0.19.10,
//! CUDA ≥ 12.2; the facts below are from cudarc's source and the CUDA
//! programming guide's "graph memory nodes" section):
//!
//! - **Allocations inside the step.** With memory pools (every GPU this crate
//!   targets), cudarc allocates with `cuMemAllocAsync` and frees on drop with
//!   `cuMemFreeAsync` on the slice's stream. Captured, these become graph
//!   allocation and free nodes: the step's activations keep fixed virtual
//!   addresses for the graph's lifetime and are re-created at every launch.
//!   An allocation made during capture and *not* freed inside it (a cache
//!   that grows) outlives the launch, and a graph whose allocation is still
//!   live cannot be launched again: the relaunch fails, and the trainer
//!   falls back to eager steps. The eager warm-up step grows every cache
//!   first so that this does not happen.
//! - **Frees of older memory.** A free node may only free an allocation made
//!   by the same graph (`cuGraphAddMemFreeNode`: "an address that was not
//!   returned by an allocation node" is `CUDA_ERROR_INVALID_VALUE`), so a
//!   captured step must not drop a buffer allocated before capture: the
//!   batch lives in fixed buffers, and the launch-table cache
//!   (`Gpu::device_table`) does not evict while a graph exists (a graph
//!   also keeps reading the tables it recorded).
//! - **No reads back, no host copies.** A synchronisation or a copy to the
//!   host inside the capture invalidates it; host-to-device copies from
//!   pageable memory would be recorded with a host pointer the graph reads
//!   again at every replay. The step's one read back (the optimizer's
//!   report and the losses) comes after the graph, and its inputs are
//!   uploaded into fixed buffers before it ([`crate::Backend::upload_into`]).
//!   Nothing in the step is computed on the host from its inputs: the token
//!   embedding's gradient groups the ids by a sort on the device, so a
//!   replay over new ids regroups them.
//! - **Scratch.** The workspace ([`super::workspace`]) grows only outside a
//!   capture, to the most one call carved before; capture starts by growing
//!   it, so the captured calls fit and allocate nothing inside the graph.
//! - **cudarc's event tracking.** A context with more than one stream (every
//!   [`Gpu::new`] makes one) records a CUDA event at each use of a slice and
//!   waits on it at the next. Inside a capture those records become part of
//!   the capture, and an event last recorded inside a capture cannot be
//!   waited on outside it (`CUDA_ERROR_CAPTURED_EVENT` at the next eager use
//!   of, say, a weight). The context's tracking is therefore turned off,
//!   for good, at the first capture: every op of this crate runs on the
//!   `Gpu`'s one stream, where stream order already orders every use, so
//!   the events order nothing. (An engine sharing the context across
//!   streams must then order its own streams, as cudarc documents for
//!   `disable_event_tracking`.)
//! - **cuBLAS.** GEMMs capture like kernels; the handle's workspace is a
//!   fixed buffer set when the handle is created (`cublasSetWorkspace`,
//!   [`blas_workspace_bytes`]), so that cuBLAS neither allocates during
//!   capture nor hands every graph a workspace of its own, and eager and
//!   captured GEMMs see the same workspace (the algorithm heuristics weigh
//!   its size: same size, same algorithm, same bits). The heuristics run
//!   on the host at capture and are recorded with the launch.
//! - **Values that change per batch.** A recorded launch keeps its scalar
//!   arguments, so nothing a batch decides may be one: the loss
//!   gradient's scale `1/scored` is counted from the targets buffer on the
//!   device ([`crate::nn::GradScale::MeanOverScored`]) into the workspace,
//!   and the cross-entropy reads it through a pointer, so one graph serves
//!   batches of any scored count.
//! - **Op timing.** [`crate::Backend::op_mark`] records nothing while
//!   capturing (an event recorded inside the capture could not be timed
//!   outside it); per-op times come from an eager profiling step, and the
//!   graph is timed as a whole.
//!
//! Capture uses `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`: unsafe calls from this
//! thread fail the capture; other threads (other `Gpu`s, other tests) are
//! left alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph};

use super::Gpu;
use crate::backend::{Backend, StepGraph};
use crate::{Error, Result};

/// Bytes of the fixed cuBLAS workspace of a device of compute capability
/// `major`: the sizes cuBLAS's documentation of `cublasSetWorkspace`
/// recommends (32 MiB from Hopper on, 4 MiB before), which are also the
/// sizes of the workspace cuBLAS would otherwise allocate itself.
pub fn blas_workspace_bytes(major: i32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// A captured step on one `Gpu`'s stream.
struct CapturedStep {
    /// Always `Some` until dropped (taken first in `drop`).
    graph: Option<CudaGraph>,
    /// The `Gpu`'s count of live graphs (`Gpu::device_table` does not
    /// evict while it is above zero).
    alive: Arc<AtomicUsize>,
    device: sys::CUdevice,
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it
// are not concurrent; `CapturedStep` is owned by one trainer and replayed
// through `&self` from the thread that holds it, never shared (it is not
// `Sync`).
unsafe impl Send for CapturedStep {}

impl StepGraph for CapturedStep {
    fn replay(&self) -> Result<()> {
        let graph = self.graph.as_ref().ok_or_else(|| Error::invalid("graph replay", "the graph was destroyed"))?;
        graph.launch().map_err(|e| Error::cuda("replaying the captured step", e))
    }
}

impl Drop for CapturedStep {
    fn drop(&mut self) {
        // Destroyed first (an in-flight launch completes; the driver frees
        // the executable after it), then its memory can go.
        drop(self.graph.take());
        // The graph's allocations were freed inside it; hand the memory the
        // driver cached for graphs back once no graph of this Gpu needs it
        // (the trim keeps what other graphs on the device still use).
        if self.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: trims a cache of a valid device; a failure leaves the
            // cache as it was.
            unsafe { sys::cuDeviceGraphMemTrim(self.device) };
        }
    }
}

impl Gpu {
    /// True while this `Gpu`'s stream is recording a graph.
    pub fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    /// Prepares the context and the cuBLAS handle for capture (see the
    /// module docs) and starts recording on this stream.
    pub(crate) fn begin_step_capture(&self) -> Result<()> {
        if self.is_capturing() {
            return Err(Error::invalid("graph capture", "this stream is already recording a graph"));
        }
        // SAFETY: every op of this crate runs on the Gpu's one stream, whose
        // order already orders every use of every slice (module docs).
        unsafe { self.context().disable_event_tracking() };
        // Creates the handle (and its workspace) if the step has no GEMM
        // yet; creating it inside the capture would allocate there.
        self.blas()?;
        // Grows the scratch workspace to the warm-up's high-water mark now:
        // the last call of an eager step raises the mark after every grow,
        // and inside the capture the calls past the old size would each
        // allocate in the graph.
        drop(self.scratch()?);
        // Earlier eager work, and any error a drop recorded, settle first.
        self.synchronize()?;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::cuda("starting a graph capture", e))?;
        self.capturing.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops recording; the graph, instantiated and uploaded, has not run.
    pub(crate) fn end_step_capture(&self) -> Result<Box<dyn StepGraph>> {
        if !self.is_capturing() {
            return Err(Error::invalid("graph capture", "no capture was started on this stream"));
        }
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        self.capturing.store(false, Ordering::Release);
        let graph = ended
            .map_err(|e| Error::cuda("ending the graph capture (an op in the step cannot be captured)", e))?
            .ok_or_else(|| Error::invalid("graph capture", "the captured step recorded no work"))?;
        graph.upload().map_err(|e| Error::cuda("uploading the captured step", e))?;
        self.graphs_alive.fetch_add(1, Ordering::AcqRel);
        Ok(Box::new(CapturedStep {
            graph: Some(graph),
            alive: self.graphs_alive.clone(),
            device: self.context().cu_device(),
        }))
    }

    /// Gives a freshly created cuBLAS `handle` its fixed workspace
    /// ([`blas_workspace_bytes`]), kept with the handle for its lifetime.
    pub(crate) fn attach_blas_workspace(&self, handle: &cudarc::cublas::CudaBlas) -> Result<()> {
        let bytes = blas_workspace_bytes(self.info.compute_capability.0);
        // SAFETY: the workspace is only written by cuBLAS's own kernels.
        let workspace =
            unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| Error::cuda("allocating the cuBLAS workspace", e))?;
        let ptr = {
            use cudarc::driver::DevicePtr;
            let (ptr, _sync) = workspace.device_ptr(&self.stream);
            ptr
        };
        // SAFETY: `workspace` outlives every use of the handle: both live in
        // the same `BlasSlot`, whose drop destroys the handle first.
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut std::ffi::c_void, bytes)
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::invalid("cuBLAS workspace", format!("cublasSetWorkspace failed: {status:?}")));
        }
        *self.blas.workspace.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(workspace);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu_or_skip(test: &str) -> Option<Gpu> {
        match Gpu::new(0) {
            Ok(gpu) => Some(gpu),
            Err(e) => {
                println!("skipped: {test}: {e}");
                None
            }
        }
    }

    /// A captured copy through a buffer allocated and freed inside the
    /// capture: nothing runs at capture, each replay re-reads the input's
    /// fixed buffer, and the graph relaunches (its allocation was freed
    /// inside it). Marks record nothing while capturing.
    #[test]
    fn gpu_captured_step_rereads_its_fixed_inputs_at_every_replay() {
        let Some(gpu) = gpu_or_skip("gpu_captured_step_rereads_its_fixed_inputs_at_every_replay") else { return };
        let mut input = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let mut out = gpu.zeros::<f32>(4).unwrap();
        gpu.op_timing_start().unwrap();
        gpu.capture_begin().unwrap();
        assert!(gpu.is_capturing());
        let mut tmp = gpu.zeros::<f32>(4).unwrap();
        gpu.op_mark("inside the capture");
        gpu.copy_into(&input, &mut tmp).unwrap();
        gpu.copy_into(&tmp, &mut out).unwrap();
        drop(tmp);
        let graph = gpu.capture_end().unwrap();
        assert!(!gpu.is_capturing());
        let marks = gpu.op_timing_finish().unwrap();
        assert!(marks.ops.iter().all(|o| o.0 != "inside the capture"), "a mark was recorded in a capture: {marks:?}");
        assert_eq!(gpu.download(&out).unwrap(), [0.0; 4], "the capture ran its work");
        graph.replay().unwrap();
        assert_eq!(gpu.download(&out).unwrap(), [1.0, 2.0, 3.0, 4.0]);
        gpu.upload_into(&[5.0, 6.0, 7.0, 8.0], &mut input).unwrap();
        graph.replay().unwrap();
        graph.replay().unwrap();
        assert_eq!(gpu.download(&out).unwrap(), [5.0, 6.0, 7.0, 8.0], "the replay did not re-read its input");
    }

    /// A read back inside a capture fails the capture, and the stream works
    /// eagerly afterwards.
    #[test]
    fn gpu_capture_that_reads_back_fails_and_leaves_the_stream_usable() {
        let Some(gpu) = gpu_or_skip("gpu_capture_that_reads_back_fails_and_leaves_the_stream_usable") else { return };
        let input = gpu.upload(&[1.0f32, 2.0]).unwrap();
        gpu.capture_begin().unwrap();
        let read = gpu.download(&input);
        let ended = gpu.capture_end();
        assert!(read.is_err() || ended.is_err(), "a synchronising read back was captured");
        assert!(ended.is_err(), "an invalidated capture gave a graph");
        assert!(!gpu.is_capturing());
        let _ = gpu.synchronize();
        assert_eq!(gpu.download(&input).unwrap(), [1.0, 2.0]);
    }
}
