//! The CUDA forms of the C ABI: the caller's stream and device memory.
//! Compiled with the `cuda` feature; without it `super::no_cuda` answers
//! every CUDA entry point.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};

use super::{count, BadPointer, CallResult, LinearArgs};
use crate::cuda::Gpu;
use crate::dtype::Element;
use crate::lowrank::LinearShape;
use crate::multi_adapter::{AdapterPool, PoolConfig, RowAdapters};
use crate::{Error, Result};

/// One [`Gpu`] (primary context, internal stream) per device ordinal.
pub(super) fn gpu_for(ordinal: usize) -> Result<Gpu> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Gpu>>> = OnceLock::new();
    let mut map = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Gpu::new(ordinal)?;
    map.insert(ordinal, g.clone());
    Ok(g)
}

fn driver<T>(what: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| Error::cuda(what.to_string(), e))
}

/// The device ordinal of `stream` (NULL: the current context's device),
/// after checking the stream lives in that device's primary context.
fn stream_device(stream: CUstream) -> Result<usize> {
    use cudarc::driver::sys;
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoDevice("the NVIDIA driver library (libcuda.so) was not found".into()));
    }
    // SAFETY: plain driver queries writing into locals.
    unsafe {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        let res = if stream.is_null() { sys::cuCtxGetCurrent(&mut ctx) } else { sys::cuStreamGetCtx(stream, &mut ctx) };
        driver("reading the stream's context", res.result())?;
        if ctx.is_null() {
            return Err(Error::invalid(
                "stream",
                "no CUDA context is current: pass a stream, or make a context current",
            ));
        }
        driver("binding the stream's context", sys::cuCtxPushCurrent_v2(ctx).result())?;
        let mut dev: sys::CUdevice = 0;
        let got = sys::cuCtxGetDevice(&mut dev).result();
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        let _ = sys::cuCtxPopCurrent_v2(&mut popped);
        driver("reading the context's device", got)?;
        let mut primary: sys::CUcontext = std::ptr::null_mut();
        driver("retaining the primary context", sys::cuDevicePrimaryCtxRetain(&mut primary, dev).result())?;
        let _ = sys::cuDevicePrimaryCtxRelease_v2(dev);
        if primary != ctx {
            return Err(Error::invalid(
                "stream",
                "the stream belongs to a non-primary CUDA context; lorafuse runs on the device's primary \
                 context (the CUDA runtime's): create the stream there",
            ));
        }
        Ok(dev as usize)
    }
}

/// Makes `waiter` wait for the work queued so far on `signal` (device-side).
fn stream_wait(waiter: CUstream, signal: CUstream) -> Result<()> {
    use cudarc::driver::sys;
    // SAFETY: a fresh event, recorded, waited on and destroyed; destroying
    // a recorded event is allowed before it completes.
    unsafe {
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        driver("creating an event", sys::cuEventCreate(&mut ev, flags).result())?;
        let r = sys::cuEventRecord(ev, signal).result().and_then(|_| sys::cuStreamWaitEvent(waiter, ev, 0).result());
        let _ = sys::cuEventDestroy_v2(ev);
        driver("ordering lorafuse's stream with the caller's", r)
    }
}

/// Runs `work` on `gpu`'s stream ordered after, and before, the caller's
/// `stream`'s work.
fn on_caller_stream(gpu: &Gpu, stream: CUstream, work: impl FnOnce() -> Result<()>) -> Result<()> {
    driver("binding the CUDA context", gpu.context().bind_to_thread())?;
    let ours = gpu.stream().cu_stream();
    stream_wait(ours, stream)?;
    let r = work();
    stream_wait(stream, ours)?;
    r
}

/// Caller-owned device memory as a `CudaSlice` that is never freed here.
struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must be a device allocation of at least `len` elements of `T`
    /// on `stream`'s device, live for the call.
    unsafe fn new(what: &str, stream: &Arc<CudaStream>, ptr: *const c_void, len: usize) -> CallResult<Self> {
        if ptr.is_null() {
            return Err(BadPointer(format!("`{what}` is NULL")).into());
        }
        if (ptr as usize) % std::mem::align_of::<T>() != 0 {
            return Err(BadPointer(format!("`{what}` is not aligned to {} bytes", std::mem::align_of::<T>())).into());
        }
        Ok(Borrowed(Some(unsafe { stream.upgrade_device_ptr(ptr as u64, len) })))
    }

    unsafe fn opt(what: &str, stream: &Arc<CudaStream>, ptr: *const c_void, len: usize) -> CallResult<Option<Self>> {
        if ptr.is_null() {
            Ok(None)
        } else {
            unsafe { Self::new(what, stream, ptr, len) }.map(Some)
        }
    }

    fn view(&self) -> CudaView<'_, T> {
        self.0.as_ref().expect("present until drop").as_view()
    }

    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.0.as_mut().expect("present until drop").as_view_mut()
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}

pub(super) fn linear<T: Element>(stream: CUstream, p: &LinearArgs) -> CallResult {
    let LinearShape { m, k, n, r } = p.shape;
    let gpu = gpu_for(stream_device(stream)?)?;
    let st = gpu.stream().clone();
    let (mk, nk, mn) = (count("x", &[m, k])?, count("w", &[n, k])?, count("y", &[m, n])?);
    let (rk, nr) = (count("a", &[r, k])?, count("b", &[n, r])?);
    // SAFETY: the header documents these lengths for each device pointer.
    let (x, w, bias, a, b, u, v, mut y) = unsafe {
        (
            Borrowed::<T>::new("x", &st, p.x, mk)?,
            Borrowed::<T>::new("w", &st, p.w, nk)?,
            Borrowed::<T>::opt("bias", &st, p.bias, n)?,
            Borrowed::<f32>::new("a", &st, p.a.cast(), rk)?,
            Borrowed::<f32>::new("b", &st, p.b.cast(), nr)?,
            Borrowed::<f32>::opt("u", &st, p.u.cast(), r)?,
            Borrowed::<f32>::opt("v", &st, p.v.cast(), n)?,
            Borrowed::<T>::new("y", &st, p.y, mn)?,
        )
    };
    let ad = crate::cuda::lowrank::AdapterView {
        a: a.view(),
        b: b.view(),
        u: u.as_ref().map(Borrowed::view),
        v: v.as_ref().map(Borrowed::view),
        scale: p.scale,
    };
    let bias_view = bias.as_ref().map(Borrowed::view);
    on_caller_stream(&gpu, stream, || {
        crate::cuda::lowrank::forward(
            &gpu,
            p.shape,
            &x.view(),
            &w.view(),
            bias_view.as_ref(),
            Some(&ad),
            &mut y.view_mut(),
            None,
        )
    })?;
    Ok(())
}

pub(super) fn add<T: Element>(
    gpu: &Gpu,
    pool: &AdapterPool<Gpu, T>,
    stream: CUstream,
    layer: usize,
    rows: RowAdapters<'_>,
    x: *const c_void,
    y: *mut c_void,
) -> CallResult {
    let PoolConfig { k, n, .. } = pool.config();
    let m = rows.rows();
    if stream_device(stream)? != gpu.info().ordinal {
        return Err(Error::invalid("stream", "the stream is on another device than the pool").into());
    }
    let st = gpu.stream().clone();
    // SAFETY: device lengths as documented in the header.
    let (x, mut y) = unsafe {
        (Borrowed::<T>::new("x", &st, x, count("x", &[m, k])?)?, Borrowed::<T>::new("y", &st, y, count("y", &[m, n])?)?)
    };
    on_caller_stream(gpu, stream, || {
        crate::cuda::multi_adapter::add_in_place(gpu, pool, layer, rows, &x.view(), &mut y.view_mut())
    })?;
    Ok(())
}
