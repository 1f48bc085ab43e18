//! The CUDA backend: device probe, one module cache per context, launch and
//! timing helpers, and the launch wrappers of every kernel family (one file
//! each, named like `kernels/<family>.cu`).
//!
//! Nothing here panics when there is no GPU: [`Gpu::new`] returns
//! [`Error::NoDevice`] when the driver library is missing or no device
//! answers, and [`Error::KernelsNotBuilt`] surfaces at the first launch of a
//! build made without nvcc.
//!
//! Engines that own their context and stream wrap them with
//! [`Gpu::from_stream`]; every op then runs on that stream over caller-owned
//! memory, plus the `Gpu`'s own scratch workspace ([`workspace`]), which
//! grows to the largest call and is reused after.

pub mod adapter_sum;
pub mod attention;
pub mod bench;
pub mod graph;
pub mod kernels;
pub mod lowrank;
pub mod multi_adapter;
pub mod nn;
pub mod projection;
pub mod workspace;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};

use crate::backend::{Backend, Scalar};
use crate::op_timing::{Breakdown, Timeline};
use crate::{Error, Result};
pub use kernels::KernelFamily;
pub use workspace::WorkspaceStats;

/// What the device reports about itself.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// L2 cache in bytes.
    pub l2_bytes: usize,
    /// Largest dynamic shared memory a block may opt into, in bytes.
    pub max_shared_per_block: usize,
    /// Driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "cuda:{} {} (sm_{major}{minor}, {} SMs, {:.1} GiB, driver CUDA {}.{})",
            self.ordinal,
            self.name,
            self.sm_count,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10
        )
    }
}

/// A CUDA device and stream, with the kernel modules loaded on it and, from
/// its first GEMM on, a cuBLAS handle bound to the stream.
///
/// Cloning is cheap: clones share the stream, the module cache and the
/// cuBLAS handle, so a trainer, its evaluator and an engine's own code can
/// hold one each; the handle is destroyed with the last clone.
#[derive(Clone)]
pub struct Gpu {
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Arc<Mutex<HashMap<&'static str, Arc<CudaModule>>>>,
    functions: Arc<Mutex<HashMap<String, CudaFunction>>>,
    /// Per-op timing marks while [`Backend::op_timing_start`] is on.
    timeline: Arc<Mutex<Option<Timeline<TimedEvent>>>>,
    /// Shared by the clones; created by [`Gpu::blas`].
    blas: Arc<BlasSlot>,
    /// Device copies of launch tables (pointer lists), keyed by their
    /// contents: [`Gpu::device_table`].
    tables: Arc<Mutex<TableCache>>,
    /// Resident blocks per SM by (kernel, threads, dynamic shared memory):
    /// [`Gpu::blocks_per_sm`].
    occupancy: Arc<Mutex<OccupancyCache>>,
    /// True while the stream records a graph ([`graph`]): marks are off.
    capturing: Arc<AtomicBool>,
    /// Captured graphs alive on this stream ([`graph`]): while above zero
    /// the launch-table cache keeps every table (the graphs read them).
    graphs_alive: Arc<AtomicUsize>,
    /// Per-call device scratch, reused in stream order: [`Gpu::scratch`].
    workspace: Arc<workspace::Workspace>,
}

/// The lazily created cuBLAS handle of one [`Gpu`] and its clones.
struct BlasSlot {
    context: Arc<CudaContext>,
    handle: Mutex<Option<Arc<CudaBlas>>>,
    /// The fixed workspace [`graph`] gives the handle before capturing;
    /// dropped after the handle (fields drop after `Drop::drop`).
    workspace: Mutex<Option<CudaSlice<u8>>>,
}

impl Drop for BlasSlot {
    fn drop(&mut self) {
        let handle = self.handle.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(handle) = handle {
            // cublasDestroy releases device resources of the current
            // context; the last clone may be dropped on any thread.
            if self.context.bind_to_thread().is_ok() {
                drop(handle);
            } else {
                // Without the context, destroying could fail (and cudarc
                // panics on that); leaking one handle is the lesser harm.
                std::mem::forget(handle);
            }
        }
    }
}

/// Resident blocks per SM by (kernel name, threads, dynamic shared memory)
/// ([`Gpu::blocks_per_sm`]).
type OccupancyCache = HashMap<(String, u32, usize), usize>;

/// Device copies of launch tables by their contents ([`Gpu::device_table`]).
type TableCache = HashMap<Vec<u64>, Arc<CudaSlice<u64>>>;

/// A CUDA event recorded on the stream: a [`crate::op_timing::Marker`].
struct TimedEvent(cudarc::driver::CudaEvent);

impl crate::op_timing::Marker for TimedEvent {
    fn ms_until(&self, later: &Self) -> Result<f64> {
        self.0.elapsed_ms(&later.0).map(f64::from).map_err(|e| Error::cuda("reading event time", e))
    }
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

/// Opens device `ordinal` without ever panicking: a missing driver library,
/// no device, or a failing driver are all [`Error::NoDevice`].
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    // cudarc panics if libcuda cannot be loaded; ask first.
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoDevice(
            "the NVIDIA driver library (libcuda.so) was not found; install the driver or run \
             on a machine with a GPU"
                .into(),
        ));
    }
    // A driver old enough to lack a symbol cudarc expects would panic inside
    // cudarc; keep that an error value too.
    let opened = std::panic::catch_unwind(|| CudaContext::new(ordinal));
    match opened {
        Ok(Ok(ctx)) => Ok(ctx),
        Ok(Err(e)) => Err(Error::NoDevice(format!("cuda device {ordinal} could not be opened: {e}"))),
        Err(_) => Err(Error::NoDevice(format!(
            "the CUDA driver failed while opening device {ordinal} (is it older than CUDA 13.0?)"
        ))),
    }
}

fn read_info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let attr = |a| ctx.attribute(a).map_err(|e| Error::cuda("reading device attributes", e));
    let mut driver_version = 0;
    // SAFETY: writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(|e| Error::cuda("reading device name", e))?,
        compute_capability: ctx.compute_capability().map_err(|e| Error::cuda("reading compute capability", e))?,
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        total_memory: ctx.total_mem().map_err(|e| Error::cuda("reading memory size", e))?,
        l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
        max_shared_per_block: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize,
        driver_version,
    })
}

impl Gpu {
    /// Opens device `ordinal` with a fresh stream.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let ctx = open_context(ordinal)?;
        let stream = ctx.new_stream().map_err(|e| Error::cuda("creating a stream", e))?;
        Gpu::from_stream(stream)
    }

    /// Wraps a stream the caller owns (an engine's), so lorafuse's ops run on
    /// it and over the caller's memory.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Gpu> {
        let info = read_info(stream.context())?;
        let blas = Arc::new(BlasSlot {
            context: stream.context().clone(),
            handle: Mutex::new(None),
            workspace: Mutex::new(None),
        });
        Ok(Gpu {
            stream,
            info,
            modules: Arc::default(),
            functions: Arc::default(),
            timeline: Arc::default(),
            blas,
            tables: Arc::default(),
            occupancy: Arc::default(),
            capturing: Arc::default(),
            graphs_alive: Arc::default(),
            workspace: Arc::default(),
        })
    }

    /// The stream every op of this handle is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    /// What the device reports about itself.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The cuBLAS handle of this stream, created at the first call (a few
    /// milliseconds, and its fixed workspace, [`graph::blas_workspace_bytes`]:
    /// call it once before capturing a CUDA graph) and shared by every clone
    /// of this `Gpu`.
    /// Binds the stream's context to this thread first: cuBLAS launches
    /// through the runtime API, which uses the calling thread's context.
    pub fn blas(&self) -> Result<Arc<CudaBlas>> {
        self.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
        let mut slot = self.blas.handle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(handle) = slot.as_ref() {
            return Ok(handle.clone());
        }
        let handle =
            Arc::new(CudaBlas::new(self.stream.clone()).map_err(|e| Error::cuda("creating a cuBLAS handle", e))?);
        self.attach_blas_workspace(&handle)?;
        *slot = Some(handle.clone());
        Ok(handle)
    }

    fn lock_timeline(&self) -> std::sync::MutexGuard<'_, Option<Timeline<TimedEvent>>> {
        self.timeline.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Kernel `name` of `family`, allowed `smem` bytes of dynamic shared
    /// memory (above 48 KiB a kernel must opt in). The attribute stays on
    /// the function, so it is set once, at the first call, not per launch.
    pub(crate) fn function_with_shared(&self, family: KernelFamily, name: &str, smem: u32) -> Result<CudaFunction> {
        let key = format!("{name}#smem={smem}");
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let limit = self.info.max_shared_per_block;
        if smem as usize > limit {
            return Err(Error::invalid(
                format!("{name} on this device"),
                format!("needs {smem} bytes of shared memory per block; the device allows {limit}"),
            ));
        }
        let f = self.function(family, name)?;
        self.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| Error::cuda(format!("allowing {smem} bytes of shared memory for {name}"), e))?;
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    /// Loads `family` once and returns its kernel `name`.
    pub(crate) fn function(&self, family: KernelFamily, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let image = family.image.ok_or(Error::KernelsNotBuilt)?;
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(family.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = cudarc::nvrtc::Ptx::from_binary(image.to_vec());
                    let m = self.context().load_module(ptx).map_err(|e| {
                        let hint = if format!("{e:?}").contains("UNSUPPORTED_PTX")
                            || format!("{e:?}").contains("NO_BINARY_FOR_GPU")
                        {
                            " (no machine code for this GPU and the driver is too old for the \
                             embedded PTX: rebuild with LORAFUSE_CUDA_ARCHS naming this GPU's \
                             sm_XX, or update the driver)"
                        } else {
                            ""
                        };
                        Error::cuda(format!("loading kernels/{}.cu{hint}", family.name), e)
                    })?;
                    modules.insert(family.name, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| Error::cuda(format!("finding kernel {name} in kernels/{}.cu", family.name), e))?;
        self.functions.lock().unwrap().insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// A persistent grid: `blocks_per_sm` blocks on every SM, but never more
    /// than `work_items` blocks.
    pub(crate) fn persistent_grid(&self, blocks_per_sm: u32, work_items: u64) -> u32 {
        let cap = (self.info.sm_count.max(1) * blocks_per_sm) as u64;
        work_items.clamp(1, cap) as u32
    }

    /// Times `work` on this stream with CUDA events: milliseconds between an
    /// event recorded before and one recorded after.
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(|e| Error::cuda("recording an event", e))?;
        work()?;
        let end = self.stream.record_event(flags).map_err(|e| Error::cuda("recording an event", e))?;
        start.elapsed_ms(&end).map_err(|e| Error::cuda("reading event time", e))
    }

    /// Copies `src` to `dst` on the stream (used as the bandwidth yardstick
    /// by the benches).
    pub fn copy<T: Scalar>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memcpy_dtod(src, dst).map_err(|e| Error::cuda("device-to-device copy", e))
    }

    /// Sets every byte of `buf` to zero, on the stream.
    pub fn memset_zero<T: Scalar>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memset_zeros(buf).map_err(|e| Error::cuda("memset", e))
    }

    /// A device copy of `words` (a multi-tensor launch's table of buffer
    /// addresses and lengths), uploaded the first time these exact words
    /// are asked for and reused after: the tables of a training step stay
    /// the same from step to step, so a step neither allocates nor copies
    /// them (which a captured CUDA graph requires). Keyed by contents, a
    /// reused table is always the one a fresh upload would give.
    pub(crate) fn device_table(&self, words: Vec<u64>) -> Result<Arc<CudaSlice<u64>>> {
        /// More distinct tables than a run uses; past it the cache starts over.
        const MAX_TABLES: usize = 64;
        let mut tables = self.tables.lock().unwrap();
        if let Some(t) = tables.get(&words) {
            return Ok(t.clone());
        }
        // A captured graph reads the tables it recorded, and a capture may
        // not free memory allocated before it: never evict then.
        let graph_reads_tables =
            self.graphs_alive.load(Ordering::Acquire) > 0 || self.capturing.load(Ordering::Acquire);
        if tables.len() >= MAX_TABLES && !graph_reads_tables {
            tables.clear();
        }
        let t = Arc::new(self.stream.clone_htod(&words).map_err(|e| Error::cuda("uploading a launch table", e))?);
        tables.insert(words, t.clone());
        Ok(t)
    }

    /// How many blocks of `f` (named `name`) with `threads` threads and
    /// `smem` bytes of dynamic shared memory fit on one SM at once, asked
    /// of the driver once per (kernel, threads, smem) and kept with this
    /// device: a cooperative launch sizes its grid by it, since every block
    /// must be resident.
    pub(crate) fn blocks_per_sm(&self, f: &CudaFunction, name: &str, threads: u32, smem: usize) -> Result<usize> {
        let key = (name.to_string(), threads, smem);
        if let Some(&p) = self.occupancy.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p);
        }
        let p = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .map_err(|e| Error::cuda(format!("occupancy of {name}"), e))? as usize;
        self.occupancy.lock().unwrap_or_else(|p| p.into_inner()).insert(key, p);
        Ok(p)
    }
}

/// Optional kernel arguments: kernels read a null pointer as "absent"
/// (frozen, not requested), so an `Option` of a buffer becomes the buffer or 0.
pub(crate) trait ArgOrNull {
    /// Pushes `arg`, or a null device pointer when it is `None`.
    fn arg_or_null<A>(&mut self, arg: Option<A>) -> &mut Self
    where
        Self: PushKernelArg<A>;
}

/// The null device pointer optional arguments stand for.
static NULL_PTR: u64 = 0;

impl<'a> ArgOrNull for LaunchArgs<'a> {
    fn arg_or_null<A>(&mut self, arg: Option<A>) -> &mut Self
    where
        Self: PushKernelArg<A>,
    {
        match arg {
            Some(a) => self.arg(a),
            None => <Self as PushKernelArg<&'static u64>>::arg(self, &NULL_PTR),
        }
    }
}

/// A one-dimensional launch of `blocks` × `threads` with `shared` bytes of
/// dynamic shared memory.
pub(crate) fn grid(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared }
}

/// `v` as a kernel's 32-bit size or stride argument, or a typed error
/// naming it.
pub(crate) fn u32_arg(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} exceeds the kernels' 32-bit limit")))
}

/// Blocks of `threads` needed to cover `n` items one per thread.
pub(crate) fn blocks_for(n: u64, threads: u32) -> u32 {
    n.div_ceil(threads as u64).max(1).min(u32::MAX as u64) as u32
}

impl Backend for Gpu {
    type Buf<T: Scalar> = CudaSlice<T>;

    fn describe(&self) -> String {
        self.info.to_string()
    }
    fn has_tensor_cores(&self) -> bool {
        // bf16 tensor cores arrived with Ampere (sm_80).
        self.info.compute_capability.0 >= 8
    }
    fn op_timing_start(&self) -> Result<()> {
        *self.lock_timeline() = Some(Timeline::default());
        Ok(())
    }
    fn op_mark(&self, label: &'static str) {
        // An event recorded inside a capture cannot be timed outside it.
        if self.capturing.load(Ordering::Acquire) {
            return;
        }
        if let Some(t) = self.lock_timeline().as_mut() {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            if let Ok(event) = self.stream.record_event(flags) {
                t.push(label, TimedEvent(event));
            }
        }
    }
    fn op_timing_finish(&self) -> Result<Breakdown> {
        self.op_mark("end");
        let timeline = self.lock_timeline().take();
        self.synchronize()?;
        timeline.map(|t| t.breakdown()).unwrap_or_else(|| Ok(Breakdown::default()))
    }
    fn op_timing_on(&self) -> bool {
        self.lock_timeline().is_some()
    }
    fn supports_graphs(&self) -> bool {
        // Graph memory nodes need the stream-ordered allocator.
        self.context().has_async_alloc()
    }
    fn capture_begin(&self) -> Result<()> {
        self.begin_step_capture()
    }
    fn capture_end(&self) -> Result<Box<dyn crate::backend::StepGraph>> {
        self.end_step_capture()
    }
    fn zeros<T: Scalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(|e| Error::cuda(format!("allocating {len} elements"), e))
    }
    fn uninit<T: Scalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the memory is left unset, which `alloc` marks unsafe
        // because reading it gives arbitrary bits. Every element type here
        // is plain old data (`Scalar: Pod`), valid for any bit pattern, so
        // even such a read is no undefined behaviour in Rust, only a wrong
        // value; and `Backend::uninit`'s contract hands the buffer only to
        // callers whose producer overwrites every element before any read
        // (the CPU backend poisons the same buffers with NaN, so the CPU
        // tests catch a caller that breaks it).
        unsafe { self.stream.alloc(len) }.map_err(|e| Error::cuda(format!("allocating {len} elements"), e))
    }
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(|e| Error::cuda("host-to-device copy", e))
    }
    fn download<T: Scalar>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(buf).map_err(|e| Error::cuda("device-to-host copy", e))
    }
    fn upload_into<T: Scalar>(&self, host: &[T], buf: &mut CudaSlice<T>) -> Result<()> {
        crate::error::check_len("upload_into", "host data", host.len(), buf.len())?;
        self.stream.memcpy_htod(host, buf).map_err(|e| Error::cuda("host-to-device copy", e))
    }
    fn copy_into<T: Scalar>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>) -> Result<()> {
        crate::error::check_len("copy_into", "source", src.len(), dst.len())?;
        self.copy(src, dst)
    }
    fn copy_range<T: Scalar>(
        &self,
        src: &CudaSlice<T>,
        src_off: usize,
        dst: &mut CudaSlice<T>,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        crate::backend::check_copy_range(src.len(), src_off, dst.len(), dst_off, n)?;
        if n == 0 {
            return Ok(());
        }
        let from = src.slice(src_off..src_off + n);
        let mut to = dst.slice_mut(dst_off..dst_off + n);
        self.stream.memcpy_dtod(&from, &mut to).map_err(|e| Error::cuda("device-to-device range copy", e))
    }
    fn len<T: Scalar>(buf: &CudaSlice<T>) -> usize {
        buf.len()
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::cuda("stream synchronize", e))
    }
}

/// Opens device 0, or says why not. Never panics.
pub fn probe() -> Result<Gpu> {
    Gpu::new(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clones share one cuBLAS handle, and it goes when the last clone goes
    /// (a process-global cache would keep it, and its stream, forever).
    #[test]
    fn one_blas_handle_per_gpu_dropped_with_it() {
        let gpu = match Gpu::new(0) {
            Ok(gpu) => gpu,
            Err(e) => return println!("skipped: one_blas_handle_per_gpu_dropped_with_it: {e}"),
        };
        let clone = gpu.clone();
        let (a, b) = (gpu.blas().unwrap(), clone.blas().unwrap());
        assert!(Arc::ptr_eq(&a, &b), "clones of one Gpu must share its handle");
        let other = Gpu::new(0).unwrap();
        assert!(!Arc::ptr_eq(&a, &other.blas().unwrap()), "another Gpu has its own handle");
        let weak = Arc::downgrade(&a);
        drop((a, b, gpu));
        assert!(weak.upgrade().is_some(), "a live clone keeps the handle");
        drop(clone);
        assert!(weak.upgrade().is_none(), "the handle must be destroyed with the last clone");
    }
}
