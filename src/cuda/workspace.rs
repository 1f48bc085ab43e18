//! Per-[`Gpu`] device scratch, reused from call to call.
//!
//! A low-rank call needs rank-sized partials, split factors and the like
//! for the length of the call. Allocating them from the stream's pool costs
//! an allocation and a free (and, with cudarc's event tracking, two event
//! creations) per buffer per call: several microseconds on a decode step
//! whose whole budget is a ~25 µs GEMV. Instead every [`Gpu`] (and its
//! clones) keeps one device buffer; a call locks it with [`Gpu::scratch`]
//! and carves 256-byte-aligned, typed [`Region`]s out of it with
//! [`Scratch::take`].
//!
//! # Why reuse is safe: one stream
//!
//! Every kernel that touches the workspace is queued on the `Gpu`'s one
//! stream while the [`Scratch`] guard is held. A later call's kernels are
//! queued after an earlier call's, so they run after them and may reuse
//! the same bytes even though the host returned long before the device
//! finished: stream order, not host synchronisation, separates the calls.
//! The lock keeps two threads from interleaving their kernels on the
//! stream while both carve the same bytes. Regions borrow the guard, so
//! none outlives its call; two regions of one guard never overlap (the
//! offsets only move forward, [`bump`]); a kernel writes a region through
//! `&mut Region` and reads it through `&Region`, so the borrow checker
//! keeps a buffer from being read and written by one launch's arguments.
//!
//! # Growth
//!
//! A call that carves more than the buffer holds gets the excess from
//! extra stream-ordered allocations, freed (in stream order) when its
//! guard drops; the next call then replaces the buffer by one of at least
//! the high-water mark (rounded up to a power of two), so steady-state
//! calls allocate nothing. The buffer never shrinks. A replaced buffer is
//! kept until the last clone of the `Gpu` drops, not freed: a CUDA graph
//! captured while it was current still holds its address. Each growth at
//! least doubles the capacity, so the kept buffers add up to less than the
//! current one. While the stream
//! is capturing a graph the buffer is never replaced (an allocation made
//! during capture would belong to the graph): warm the workspace with one
//! uncaptured run, or [`Gpu::reserve_workspace`], before capturing. A
//! replayed graph uses the buffer that was current at capture; if other
//! threads issue calls on the same `Gpu`, launch the graph while holding
//! [`Gpu::scratch`] so its kernels cannot land between theirs.
//!
//! # Contents
//!
//! A region's contents are undefined: whatever the previous call left.
//! Every producer kernel in this crate writes all of its region before a
//! consumer reads it (none needs zeros); a kernel that did would clear its
//! region with an explicit memset at the call site, never rely on a fresh
//! allocation.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchArgs, PushKernelArg};

use super::Gpu;
use crate::{Error, Result};

/// Alignment of every region, in bytes: a multiple of every vector access
/// a kernel makes (16 bytes) and of the 128-byte cache line, and what
/// cuBLAS prefers for its operands.
pub const ALIGN: usize = 256;

/// Smallest buffer the workspace allocates: every decode call's partials
/// fit, so a decode-only run grows once.
pub const MIN_CAPACITY: usize = 1 << 20;

/// `bytes` rounded up to a whole number of [`ALIGN`] blocks, at least one
/// (so every region has its own address); `None` on overflow.
pub fn aligned_size(bytes: usize) -> Option<usize> {
    bytes.max(1).checked_next_multiple_of(ALIGN)
}

/// Carves `bytes` after `end` (a multiple of [`ALIGN`]): the region's start
/// and the new end, or `None` on overflow.
pub fn bump(end: usize, bytes: usize) -> Option<(usize, usize)> {
    Some((end, end.checked_add(aligned_size(bytes)?)?))
}

/// The byte offsets of regions of `sizes` bytes carved in order from one
/// buffer, and the buffer size they need; `None` on overflow. This is the
/// layout [`Scratch::take`] produces.
pub fn plan(sizes: &[usize]) -> Option<(Vec<usize>, usize)> {
    let mut end = 0;
    let mut offsets = Vec::with_capacity(sizes.len());
    for &bytes in sizes {
        let (start, next) = bump(end, bytes)?;
        offsets.push(start);
        end = next;
    }
    Some((offsets, end))
}

/// The capacity a buffer grows to for a call that needed `want` bytes.
pub fn grown_capacity(want: usize) -> usize {
    want.checked_next_power_of_two().unwrap_or(want).max(MIN_CAPACITY)
}

/// What a [`Gpu`]'s workspace holds ([`Gpu::workspace_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkspaceStats {
    /// Bytes of the current buffer.
    pub capacity: usize,
    /// Bytes of replaced buffers kept for graphs that may hold them.
    pub retired: usize,
    /// How many times the buffer was (re)allocated: unchanged across a run
    /// of calls means they allocated nothing for scratch.
    pub grows: u64,
    /// Extra allocations calls made because the buffer was too small.
    pub overflows: u64,
    /// The most bytes one call has carved.
    pub high_water: usize,
}

/// The buffer and its bookkeeping, behind the workspace's lock.
#[derive(Default)]
struct State {
    buf: Option<CudaSlice<u8>>,
    /// Device address of `buf`.
    base: u64,
    retired: Vec<CudaSlice<u8>>,
    stats: WorkspaceStats,
}

/// The shared part of a [`Gpu`]'s workspace (one per `Gpu` and its clones).
#[derive(Default)]
pub(crate) struct Workspace {
    state: Mutex<State>,
    /// The thread holding the lock ([`thread_token`]), 0 when free: a call
    /// that asks again on the same thread gets an error, not a deadlock.
    holder: AtomicUsize,
}

/// A number unique to the calling thread, never 0.
fn thread_token() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    thread_local!(static TOKEN: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    TOKEN.with(|t| *t)
}

fn poisoned() -> Error {
    Error::invalid(
        "the GPU scratch workspace",
        "a thread panicked during a call that held it, so the kernels it queued may be incomplete; \
         drop this Gpu and open a new one",
    )
}

/// Allocates `bytes` on `stream`, uninitialised, with its device address.
fn alloc(stream: &Arc<CudaStream>, bytes: usize) -> Result<(CudaSlice<u8>, u64)> {
    // SAFETY: scratch contents are undefined by contract (module docs);
    // every reader's producer writes first.
    let buf = unsafe { stream.alloc::<u8>(bytes) }
        .map_err(|e| Error::cuda(format!("allocating {bytes} bytes of scratch workspace"), e))?;
    let base = buf.device_ptr(stream).0;
    Ok((buf, base))
}

impl Workspace {
    /// Replaces the buffer by one of at least `want` bytes unless the
    /// stream is capturing a graph.
    fn grow(state: &mut State, stream: &Arc<CudaStream>, want: usize) -> Result<()> {
        if want <= state.stats.capacity {
            return Ok(());
        }
        let capturing = stream.capture_status().map_err(|e| Error::cuda("asking whether the stream captures", e))?;
        if capturing != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(());
        }
        let bytes = grown_capacity(want);
        let (buf, base) = alloc(stream, bytes)?;
        if let Some(old) = state.buf.replace(buf) {
            state.stats.retired += old.len();
            state.retired.push(old);
        }
        state.base = base;
        state.stats.capacity = bytes;
        state.stats.grows += 1;
        Ok(())
    }
}

impl Gpu {
    /// Locks this device's scratch workspace for one call (see the module
    /// docs). Take it once at a public entry point and pass it down: asking
    /// again on the same thread while holding it is an error.
    pub(crate) fn scratch(&self) -> Result<Scratch<'_>> {
        let me = thread_token();
        let ws = &self.workspace;
        if ws.holder.load(Ordering::Relaxed) == me {
            return Err(Error::invalid(
                "the GPU scratch workspace",
                "this thread already holds it (a call nested in another); pass the outer call's Scratch down",
            ));
        }
        let mut state = ws.state.lock().map_err(|_| poisoned())?;
        let want = state.stats.high_water;
        Workspace::grow(&mut state, &self.stream, want)?;
        ws.holder.store(me, Ordering::Relaxed);
        Ok(Scratch { state, holder: &ws.holder, stream: &self.stream, end: Cell::new(0), overflow: Cell::default() })
    }

    /// Grows the scratch workspace to at least `bytes` now, e.g. before
    /// capturing a CUDA graph (whose calls must not allocate) or before
    /// timing calls that should allocate nothing.
    pub fn reserve_workspace(&self, bytes: usize) -> Result<()> {
        let mut state = self.workspace.state.lock().map_err(|_| poisoned())?;
        state.stats.high_water = state.stats.high_water.max(bytes);
        Workspace::grow(&mut state, &self.stream, bytes)
    }

    /// Fills the workspace's current buffer with 0xFF bytes (NaN in f32,
    /// f16 and bf16), on the stream: a test hook, so a kernel that reads
    /// scratch it did not write shows NaN instead of a previous call's
    /// plausible values.
    #[doc(hidden)]
    pub fn poison_workspace(&self) -> Result<()> {
        let state = self.workspace.state.lock().map_err(|_| poisoned())?;
        if state.stats.capacity == 0 {
            return Ok(());
        }
        self.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
        // SAFETY: `capacity` bytes from `base` are the live buffer; queued on
        // the stream every user of it is queued on.
        unsafe {
            cudarc::driver::result::memset_d8_async(state.base, 0xFF, state.stats.capacity, self.stream.cu_stream())
        }
        .map_err(|e| Error::cuda("poisoning the scratch workspace", e))
    }

    /// The scratch workspace's size and history: a bench compares
    /// [`WorkspaceStats::grows`] before and after its timed loop to show
    /// the loop allocated nothing.
    pub fn workspace_stats(&self) -> Result<WorkspaceStats> {
        Ok(self.workspace.state.lock().map_err(|_| poisoned())?.stats)
    }
}

/// One call's hold on the workspace: typed regions are carved from it with
/// [`Scratch::take`] and live no longer than it. Dropping it releases the
/// lock; the kernels it fed may still be running, which is safe by stream
/// order (module docs).
pub(crate) struct Scratch<'g> {
    state: MutexGuard<'g, State>,
    holder: &'g AtomicUsize,
    stream: &'g Arc<CudaStream>,
    /// Bytes carved so far, as if from one unbounded buffer ([`bump`]).
    end: Cell<usize>,
    /// Allocations for regions past the buffer's end, freed in stream
    /// order when the guard drops.
    overflow: Cell<Vec<CudaSlice<u8>>>,
}

impl Scratch<'_> {
    /// `len` elements of `T` no other live region overlaps, contents
    /// undefined, 256-byte aligned.
    pub(crate) fn take<T: DeviceRepr>(&self, len: usize) -> Result<Region<'_, T>> {
        let too_big = || Error::invalid("scratch workspace", format!("{len} elements do not fit in memory"));
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(too_big)?;
        let (start, end) = bump(self.end.get(), bytes).ok_or_else(too_big)?;
        self.end.set(end);
        let ptr = if end <= self.state.stats.capacity {
            self.state.base + start as u64
        } else {
            let (buf, ptr) = alloc(self.stream, end - start)?;
            let mut chunks = self.overflow.take();
            chunks.push(buf);
            self.overflow.set(chunks);
            ptr
        };
        Ok(Region { ptr, len, _borrow: PhantomData })
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let chunks = self.overflow.take();
        let stats = &mut self.state.stats;
        stats.high_water = stats.high_water.max(self.end.get());
        stats.overflows += chunks.len() as u64;
        // Each chunk's free is queued on the stream after the kernels that
        // use it.
        drop(chunks);
        self.holder.store(0, Ordering::Relaxed);
    }
}

/// `len` elements of `T` in device memory, carved from a [`Scratch`] and
/// borrowed from it: kernels read it through `&Region` and write it through
/// `&mut Region`.
pub(crate) struct Region<'s, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'s mut [T]>,
}

impl<T> Region<'_, T> {
    /// Elements in the region.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The device address (for cuBLAS operands).
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The first `mid` elements and the rest, as two regions borrowed from
    /// this one (so neither can be used with it at the same time).
    pub(crate) fn split_at_mut(&mut self, mid: usize) -> (Region<'_, T>, Region<'_, T>) {
        let mid = mid.min(self.len);
        let rest = self.ptr + (mid * std::mem::size_of::<T>()) as u64;
        (
            Region { ptr: self.ptr, len: mid, _borrow: PhantomData },
            Region { ptr: rest, len: self.len - mid, _borrow: PhantomData },
        )
    }

    /// Copies `host` (exactly this region's length) into the region on
    /// `gpu`'s stream. The driver stages a pageable `host` before
    /// returning, so it may be dropped right after.
    pub(crate) fn copy_from_host(&mut self, gpu: &Gpu, host: &[T]) -> Result<()> {
        if host.len() != self.len {
            return Err(Error::invalid(
                "scratch upload",
                format!("{} host elements for a region of {}", host.len(), self.len),
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        gpu.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
        // SAFETY: the region holds `host.len()` elements of T and is owned
        // by this borrow; queued on the stream every user of it is queued on.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.ptr, host, gpu.stream().cu_stream()) }
            .map_err(|e| Error::cuda("host-to-device copy into scratch", e))
    }
}

// A region is a plain device pointer to the kernel. No cudarc event is
// recorded: the workspace is only ever used on its Gpu's one stream, whose
// order is the only synchronisation it needs (module docs).
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b Region<'_, T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b Region<'_, T>) -> &mut Self {
        <Self as PushKernelArg<&'b u64>>::arg(self, &arg.ptr)
    }
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut Region<'_, T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut Region<'_, T>) -> &mut Self {
        <Self as PushKernelArg<&'b u64>>::arg(self, &arg.ptr)
    }
}

/// A buffer a kernel reads: the caller's view or a scratch region (a
/// value the caller may pass, or one the call recomputed).
pub(crate) enum In<'a, T> {
    /// Caller-owned memory, ordered by cudarc's event tracking.
    View(&'a CudaView<'a, T>),
    /// A region of this call's [`Scratch`].
    Region(&'a Region<'a, T>),
}

impl<T> Clone for In<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for In<'_, T> {}

/// A buffer a kernel writes: the caller's view or a scratch region.
pub(crate) enum Out<'a, 'v, T> {
    /// Caller-owned memory.
    View(&'a mut CudaViewMut<'v, T>),
    /// A region of this call's [`Scratch`].
    Region(&'a mut Region<'v, T>),
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<In<'b, T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: In<'b, T>) -> &mut Self {
        match arg {
            In::View(v) => self.arg(v),
            In::Region(r) => self.arg(r),
        }
    }
}

unsafe impl<'a, 'b: 'a, 'v: 'b, T> PushKernelArg<Out<'b, 'v, T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: Out<'b, 'v, T>) -> &mut Self {
        match arg {
            Out::View(v) => self.arg(v),
            Out::Region(r) => self.arg(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every region starts on an ALIGN boundary, holds its bytes, and ends
    /// before the next begins; the total covers the last one.
    #[test]
    fn plan_aligns_and_never_overlaps() {
        let sizes = [0, 1, 255, 256, 257, 4096 * 4 + 3, 12, 1 << 20];
        let (offsets, total) = plan(&sizes).unwrap();
        assert_eq!(offsets[0], 0);
        for (i, (&off, &size)) in offsets.iter().zip(&sizes).enumerate() {
            assert_eq!(off % ALIGN, 0, "region {i} at {off} is not {ALIGN}-aligned");
            let end = off + size.max(1);
            let next = offsets.get(i + 1).copied().unwrap_or(total);
            assert!(end <= next, "region {i} [{off}, {end}) overlaps the next at {next}");
        }
        assert_eq!(total, offsets[7] + (1 << 20));
        // Exact sizes: one block each for 0, 1, 255, 256; two for 257.
        assert_eq!(&offsets[..6], &[0, 256, 512, 768, 1024, 1536]);
    }

    #[test]
    fn plan_reports_overflow_instead_of_wrapping() {
        assert!(plan(&[usize::MAX]).is_none());
        assert!(plan(&[usize::MAX / 2, usize::MAX / 2 + 2]).is_none());
        assert!(aligned_size(usize::MAX - 10).is_none());
    }

    /// Growth covers the high-water mark, never below the minimum, and a
    /// mark already covered by the current capacity does not grow again.
    #[test]
    fn growth_covers_the_high_water_mark() {
        for want in [0, 1, MIN_CAPACITY - 1, MIN_CAPACITY, MIN_CAPACITY + 1, 3 << 24, (1 << 30) + 5] {
            let cap = grown_capacity(want);
            assert!(cap >= want && cap >= MIN_CAPACITY, "want {want} -> {cap}");
            assert!(cap < 2 * want.max(MIN_CAPACITY), "want {want} -> {cap}: more than doubles");
            assert_eq!(grown_capacity(cap), cap, "a capacity must be a fixed point");
        }
    }

    /// Calls of growing then shrinking sizes on one Gpu: the first grows
    /// via overflow, the next fits, smaller ones never shrink it, and
    /// regions of one guard never overlap. Device-only.
    #[test]
    fn gpu_workspace_grows_once_and_regions_are_disjoint() {
        let gpu = match Gpu::new(0) {
            Ok(gpu) => gpu,
            Err(e) => return println!("skipped: gpu_workspace_grows_once_and_regions_are_disjoint: {e}"),
        };
        let big = 3 * MIN_CAPACITY;
        {
            let s = gpu.scratch().unwrap();
            let a = s.take::<f32>(big / 4).unwrap();
            let b = s.take::<u16>(7).unwrap();
            assert!(b.ptr() >= a.ptr() + big as u64 || a.ptr() >= b.ptr() + 256);
            assert!(gpu.scratch().is_err(), "a nested hold on one thread must be an error");
        }
        let after_first = gpu.workspace_stats().unwrap();
        assert_eq!(after_first.high_water, big + ALIGN);
        for len in [big / 8, 1000, 10] {
            let s = gpu.scratch().unwrap();
            let (a, b) = (s.take::<f32>(len).unwrap(), s.take::<f32>(len).unwrap());
            assert_eq!(b.ptr() - a.ptr(), aligned_size(len * 4).unwrap() as u64);
        }
        let stats = gpu.workspace_stats().unwrap();
        assert!(stats.capacity >= big + ALIGN);
        assert_eq!(stats.grows, after_first.grows + 1, "only the call after the first may grow: {stats:?}");
        assert_eq!(stats.overflows, after_first.overflows, "a warm workspace must not overflow: {stats:?}");
    }

    /// A call that panics while holding the workspace poisons its lock:
    /// later calls get a typed error, not a panic. Device-only.
    #[test]
    fn gpu_poisoned_workspace_is_a_typed_error() {
        let gpu = match Gpu::new(0) {
            Ok(gpu) => gpu,
            Err(e) => return println!("skipped: gpu_poisoned_workspace_is_a_typed_error: {e}"),
        };
        let panicked = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _held = gpu.scratch().unwrap();
                    panic!("a call fails while holding the workspace");
                })
                .join()
                .is_err()
        });
        assert!(panicked);
        for result in [gpu.scratch().map(|_| ()), gpu.workspace_stats().map(|_| ()), gpu.reserve_workspace(1)] {
            match result {
                Err(Error::Invalid { why, .. }) => assert!(why.contains("open a new one"), "{why}"),
                other => panic!("expected a typed error, got {other:?}"),
            }
        }
    }
}
