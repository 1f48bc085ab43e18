//! The C ABI (`include/lorafuse.h`): what a serving engine written in C,
//! C++ or anything with a C FFI links (`liblorafuse.a` / `liblorafuse.so`).
//!
//! Only C types cross the boundary: integers, floats, raw pointers, a
//! caller's `CUstream`, and one opaque handle (`lorafuse_pool*`). Every
//! function returns a status code ([`LORAFUSE_OK`] or one of the
//! `LORAFUSE_ERR_*` codes) and leaves a message for the calling thread in
//! [`lorafuse_last_error`]. Panics never unwind into C: they are caught at
//! the boundary and reported as [`LORAFUSE_ERR_PANIC`].
//!
//! Each operation has a CPU form on host pointers (the f64 oracle: slow,
//! for tests and for running without a GPU) and a CUDA form on device
//! pointers and a caller's stream. The CUDA forms queue their work on an
//! internal stream of the same device that waits for the caller's stream
//! (an event recorded on it) and that the caller's stream in turn waits
//! for, so they are ordered with the caller's work without a host sync.
//! The caller's stream must belong to the device's primary context (the
//! CUDA runtime's context, which PyTorch and vLLM use).
//!
//! The header is written by hand and checked against this file by
//! `tests/capi.rs` (names, parameter names and types, return types,
//! constants), so the two cannot drift.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

#[cfg(feature = "cuda")]
use cudarc::driver::sys::CUstream;
use half::{bf16, f16};

use crate::cpu::Cpu;
#[cfg(feature = "cuda")]
use crate::cuda::Gpu;
use crate::dtype::Element;
use crate::lowrank::{Adapter, LinearShape, LowRankOps};
use crate::multi_adapter::*;
use crate::projection::{Assignment, Projection};
use crate::{Error, Result};

/// Success.
pub const LORAFUSE_OK: i32 = 0;
/// An argument or setting is invalid ([`Error::Invalid`]).
pub const LORAFUSE_ERR_INVALID: i32 = 1;
/// An operand has the wrong size ([`Error::Shape`]).
pub const LORAFUSE_ERR_SHAPE: i32 = 2;
/// An operand has the wrong dtype ([`Error::DType`]).
pub const LORAFUSE_ERR_DTYPE: i32 = 3;
/// An index (slot, layer, id, handle) is out of range ([`Error::Index`]).
pub const LORAFUSE_ERR_INDEX: i32 = 4;
/// A value is NaN or infinite ([`Error::NonFinite`]).
pub const LORAFUSE_ERR_NON_FINITE: i32 = 5;
/// A required pointer is NULL or misaligned for its dtype.
pub const LORAFUSE_ERR_NULL_POINTER: i32 = 6;
/// No usable CUDA device ([`Error::NoDevice`]).
pub const LORAFUSE_ERR_NO_DEVICE: i32 = 7;
/// The library was built without nvcc ([`Error::KernelsNotBuilt`]).
pub const LORAFUSE_ERR_KERNELS_NOT_BUILT: i32 = 8;
/// A CUDA driver or library call failed ([`Error::Cuda`]).
pub const LORAFUSE_ERR_CUDA: i32 = 9;
/// Any other error.
pub const LORAFUSE_ERR_OTHER: i32 = 10;
/// lorafuse panicked (a bug): the call had no effect the caller can rely on.
pub const LORAFUSE_ERR_PANIC: i32 = 11;

/// Element type code: IEEE binary32.
pub const LORAFUSE_F32: i32 = 0;
/// Element type code: IEEE binary16.
pub const LORAFUSE_F16: i32 = 1;
/// Element type code: bfloat16.
pub const LORAFUSE_BF16: i32 = 2;

/// Uni-LoRA projection assignment code: hashed columns.
pub const LORAFUSE_ASSIGN_HASH: i32 = 0;
/// Uni-LoRA projection assignment code: balanced (shuffled partition).
pub const LORAFUSE_ASSIGN_BALANCED: i32 = 1;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn code(e: &Error) -> i32 {
    match e {
        Error::Invalid { .. } => LORAFUSE_ERR_INVALID,
        Error::Shape { .. } => LORAFUSE_ERR_SHAPE,
        Error::DType { .. } => LORAFUSE_ERR_DTYPE,
        Error::Index { .. } => LORAFUSE_ERR_INDEX,
        Error::NonFinite { .. } => LORAFUSE_ERR_NON_FINITE,
        Error::NoDevice(_) => LORAFUSE_ERR_NO_DEVICE,
        Error::KernelsNotBuilt => LORAFUSE_ERR_KERNELS_NOT_BUILT,
        Error::Cuda { .. } => LORAFUSE_ERR_CUDA,
        _ => LORAFUSE_ERR_OTHER,
    }
}

/// A bad pointer, reported with its own status code.
struct BadPointer(String);

enum CallError {
    Lib(Error),
    Pointer(BadPointer),
}

impl From<Error> for CallError {
    fn from(e: Error) -> Self {
        CallError::Lib(e)
    }
}
impl From<BadPointer> for CallError {
    fn from(e: BadPointer) -> Self {
        CallError::Pointer(e)
    }
}

type CallResult<T = ()> = std::result::Result<T, CallError>;

/// Runs `body`, turning errors and panics into a status code and the
/// thread's message.
fn ffi(body: impl FnOnce() -> CallResult) -> i32 {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_error(String::new());
            LORAFUSE_OK
        }
        Ok(Err(CallError::Lib(e))) => {
            set_error(e.to_string());
            code(&e)
        }
        Ok(Err(CallError::Pointer(BadPointer(msg)))) => {
            set_error(msg);
            LORAFUSE_ERR_NULL_POINTER
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_error(format!("lorafuse panicked (a bug; please report it): {what}"));
            LORAFUSE_ERR_PANIC
        }
    }
}

fn dim(what: &'static str, v: i64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(what, format!("{v}: must not be negative")))
}

fn count(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| Error::invalid(what, format!("{dims:?}: too many elements")))
}

/// `len` elements at `ptr` as a host slice; NULL or misaligned is an error.
///
/// # Safety
/// `ptr` must point to `len` readable elements that stay valid and
/// unaliased by writes for the returned lifetime.
unsafe fn host<'a, T>(what: &str, ptr: *const T, len: usize) -> CallResult<&'a [T]> {
    if ptr.is_null() {
        return Err(BadPointer(format!("`{what}` is NULL")).into());
    }
    if (ptr as usize) % std::mem::align_of::<T>() != 0 {
        return Err(BadPointer(format!("`{what}` is not aligned to {} bytes", std::mem::align_of::<T>())).into());
    }
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Like [`host`], for an optional operand (NULL = absent).
unsafe fn host_opt<'a, T>(what: &str, ptr: *const T, len: usize) -> CallResult<Option<&'a [T]>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        unsafe { host(what, ptr, len) }.map(Some)
    }
}

/// # Safety
/// As [`host`], for writable memory nothing else accesses meanwhile.
unsafe fn host_mut<'a, T>(what: &str, ptr: *mut T, len: usize) -> CallResult<&'a mut [T]> {
    unsafe { host(what, ptr as *const T, len) }?;
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// The library version as `major·10000 + minor·100 + patch` (compare with
/// `LORAFUSE_VERSION` from the header to detect a mismatched library).
#[no_mangle]
pub extern "C" fn lorafuse_version() -> u32 {
    let part = |s: &str| s.parse::<u32>().unwrap_or(0);
    part(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
        + part(env!("CARGO_PKG_VERSION_MINOR")) * 100
        + part(env!("CARGO_PKG_VERSION_PATCH"))
}

/// The library version as a NUL-terminated string, e.g. `"0.1.0"` (static).
#[no_mangle]
pub extern "C" fn lorafuse_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the calling thread's last failed call (`""` after a
/// successful one). Valid until the thread's next lorafuse call.
#[no_mangle]
pub extern "C" fn lorafuse_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

// ---- fused LoRA linear ---------------------------------------------------------

/// Host pointers of one LoRA linear call, by role.
struct LinearArgs {
    dtype: i32,
    shape: LinearShape,
    x: *const c_void,
    w: *const c_void,
    bias: *const c_void,
    a: *const f32,
    b: *const f32,
    u: *const f32,
    v: *const f32,
    scale: f32,
    y: *mut c_void,
}

fn shape_of(m: i64, k: i64, n: i64, r: i64) -> Result<LinearShape> {
    Ok(LinearShape { m: dim("m", m)?, k: dim("k", k)?, n: dim("n", n)?, r: dim("r", r)? })
}

fn linear_cpu<T: Element>(p: &LinearArgs) -> CallResult {
    let LinearShape { m, k, n, r } = p.shape;
    let (mk, nk, mn) = (count("x", &[m, k])?, count("w", &[n, k])?, count("y", &[m, n])?);
    let (rk, nr) = (count("a", &[r, k])?, count("b", &[n, r])?);
    // SAFETY: the header documents these lengths for each pointer.
    let (x, w, bias, a, b, u, v, y) = unsafe {
        (
            host("x", p.x as *const T, mk)?.to_vec(),
            host("w", p.w as *const T, nk)?.to_vec(),
            host_opt("bias", p.bias as *const T, n)?.map(<[T]>::to_vec),
            host("a", p.a, rk)?.to_vec(),
            host("b", p.b, nr)?.to_vec(),
            host_opt("u", p.u, r)?.map(<[f32]>::to_vec),
            host_opt("v", p.v, n)?.map(<[f32]>::to_vec),
            host_mut("y", p.y as *mut T, mn)?,
        )
    };
    let adapter = Adapter::<Cpu> { a: &a, b: &b, u: u.as_ref(), v: v.as_ref(), scale: p.scale };
    let mut out = vec![T::default(); mn];
    Cpu.lowrank_forward(p.shape, &x, &w, bias.as_ref(), Some(adapter), &mut out, None)?;
    y.copy_from_slice(&out);
    Ok(())
}

/// `y = x·Wᵀ + bias + scale·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v` on the CPU, host
/// pointers. See the header for shapes and dtypes.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_lora_linear_cpu(
    dtype: i32,
    m: i64,
    k: i64,
    n: i64,
    r: i64,
    x: *const c_void,
    w: *const c_void,
    bias: *const c_void,
    a: *const f32,
    b: *const f32,
    u: *const f32,
    v: *const f32,
    scale: f32,
    y: *mut c_void,
) -> i32 {
    ffi(|| {
        let p = LinearArgs { dtype, shape: shape_of(m, k, n, r)?, x, w, bias, a, b, u, v, scale, y };
        match p.dtype {
            LORAFUSE_F32 => linear_cpu::<f32>(&p),
            LORAFUSE_F16 => linear_cpu::<f16>(&p),
            LORAFUSE_BF16 => linear_cpu::<bf16>(&p),
            d => Err(bad_dtype(d).into()),
        }
    })
}

#[cfg(feature = "cuda")]
mod cuda;

/// A caller's stream: `CUstream` (an opaque pointer) in C. Without the
/// `cuda` feature nothing reads it, and the CUDA entry points answer
/// [`no_cuda`].
#[cfg(not(feature = "cuda"))]
type CUstream = *mut c_void;

/// What every CUDA entry point answers in a build without the `cuda`
/// feature: the symbols stay (one header for both builds), the work does not.
#[cfg(not(feature = "cuda"))]
fn no_cuda() -> CallError {
    Error::NoDevice(
        "this lorafuse was built without its `cuda` feature: rebuild with default features \
         (or `--features cuda`) to use the CUDA entry points, or call the `_cpu` forms"
            .into(),
    )
    .into()
}

fn bad_dtype(d: i32) -> Error {
    Error::invalid("dtype", format!("code {d}: use LORAFUSE_F32 (0), LORAFUSE_F16 (1) or LORAFUSE_BF16 (2)"))
}

#[cfg(feature = "cuda")]
fn linear_cuda(stream: CUstream, p: &LinearArgs) -> CallResult {
    match p.dtype {
        LORAFUSE_F32 => cuda::linear::<f32>(stream, p),
        LORAFUSE_F16 => cuda::linear::<f16>(stream, p),
        LORAFUSE_BF16 => cuda::linear::<bf16>(stream, p),
        d => Err(bad_dtype(d).into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn linear_cuda(_stream: CUstream, _p: &LinearArgs) -> CallResult {
    Err(no_cuda())
}

/// The CUDA form of [`lorafuse_lora_linear_cpu`]: device pointers, work
/// ordered on `stream` (NULL: the legacy default stream).
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_lora_linear_cuda(
    stream: CUstream,
    dtype: i32,
    m: i64,
    k: i64,
    n: i64,
    r: i64,
    x: *const c_void,
    w: *const c_void,
    bias: *const c_void,
    a: *const f32,
    b: *const f32,
    u: *const f32,
    v: *const f32,
    scale: f32,
    y: *mut c_void,
) -> i32 {
    ffi(|| {
        let p = LinearArgs { dtype, shape: shape_of(m, k, n, r)?, x, w, bias, a, b, u, v, scale, y };
        linear_cuda(stream, &p)
    })
}

// ---- adapter pools -------------------------------------------------------------

enum PoolKind {
    CpuF32(AdapterPool<Cpu, f32>),
    CpuF16(AdapterPool<Cpu, f16>),
    CpuBf16(AdapterPool<Cpu, bf16>),
    #[cfg(feature = "cuda")]
    GpuF32(Gpu, AdapterPool<Gpu, f32>),
    #[cfg(feature = "cuda")]
    GpuF16(Gpu, AdapterPool<Gpu, f16>),
    #[cfg(feature = "cuda")]
    GpuBf16(Gpu, AdapterPool<Gpu, bf16>),
}

/// The opaque pool handle C holds (`lorafuse_pool*`).
pub struct LorafusePool(PoolKind);

/// Runs `$body` with `$b` the backend and `$p` the typed pool.
macro_rules! with_pool {
    ($pool:expr, |$b:ident, $p:ident| $body:expr) => {
        match $pool {
            PoolKind::CpuF32($p) => {
                let $b = &Cpu;
                $body
            }
            PoolKind::CpuF16($p) => {
                let $b = &Cpu;
                $body
            }
            PoolKind::CpuBf16($p) => {
                let $b = &Cpu;
                $body
            }
            #[cfg(feature = "cuda")]
            PoolKind::GpuF32(g, $p) => {
                let $b = &*g;
                $body
            }
            #[cfg(feature = "cuda")]
            PoolKind::GpuF16(g, $p) => {
                let $b = &*g;
                $body
            }
            #[cfg(feature = "cuda")]
            PoolKind::GpuBf16(g, $p) => {
                let $b = &*g;
                $body
            }
        }
    };
}

/// # Safety
/// `pool` must be NULL or a live handle from `lorafuse_pool_create_*`.
unsafe fn pool_mut<'a>(pool: *mut LorafusePool) -> CallResult<&'a mut PoolKind> {
    if pool.is_null() {
        return Err(BadPointer("`pool` is NULL".into()).into());
    }
    Ok(unsafe { &mut (*pool).0 })
}

#[allow(clippy::too_many_arguments)]
fn pool_config(k: i64, n: i64, layers: i64, slots: i64, rank_rows: i64, floats: i64) -> Result<PoolConfig> {
    Ok(PoolConfig {
        k: dim("k", k)?,
        n: dim("n", n)?,
        layers: dim("layers", layers)?,
        slots: dim("slots", slots)?,
        rank_rows: dim("rank_rows", rank_rows)?,
        floats: dim("floats", floats)?,
    })
}

fn store_pool(out: *mut *mut LorafusePool, kind: PoolKind) -> CallResult {
    if out.is_null() {
        return Err(BadPointer("`out` is NULL".into()).into());
    }
    // SAFETY: checked non-null; the header says it points to writable storage.
    unsafe { *out = Box::into_raw(Box::new(LorafusePool(kind))) };
    Ok(())
}

/// Creates an adapter pool in host memory (the CPU backend). `*out`
/// receives the handle; free it with [`lorafuse_pool_destroy`].
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_pool_create_cpu(
    dtype: i32,
    k: i64,
    n: i64,
    layers: i64,
    slots: i64,
    rank_rows: i64,
    floats: i64,
    out: *mut *mut LorafusePool,
) -> i32 {
    ffi(|| {
        let cfg = pool_config(k, n, layers, slots, rank_rows, floats)?;
        let kind = match dtype {
            LORAFUSE_F32 => PoolKind::CpuF32(AdapterPool::new(&Cpu, cfg)?),
            LORAFUSE_F16 => PoolKind::CpuF16(AdapterPool::new(&Cpu, cfg)?),
            LORAFUSE_BF16 => PoolKind::CpuBf16(AdapterPool::new(&Cpu, cfg)?),
            d => return Err(bad_dtype(d).into()),
        };
        store_pool(out, kind)
    })
}

#[cfg(feature = "cuda")]
fn pool_cuda(device: usize, dtype: i32, cfg: PoolConfig) -> CallResult<PoolKind> {
    let gpu = cuda::gpu_for(device)?;
    Ok(match dtype {
        LORAFUSE_F32 => PoolKind::GpuF32(gpu.clone(), AdapterPool::new(&gpu, cfg)?),
        LORAFUSE_F16 => PoolKind::GpuF16(gpu.clone(), AdapterPool::new(&gpu, cfg)?),
        LORAFUSE_BF16 => PoolKind::GpuBf16(gpu.clone(), AdapterPool::new(&gpu, cfg)?),
        d => return Err(bad_dtype(d).into()),
    })
}

#[cfg(not(feature = "cuda"))]
fn pool_cuda(_device: usize, _dtype: i32, _cfg: PoolConfig) -> CallResult<PoolKind> {
    Err(no_cuda())
}

/// Creates an adapter pool in the memory of CUDA device `device`.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_pool_create_cuda(
    device: i32,
    dtype: i32,
    k: i64,
    n: i64,
    layers: i64,
    slots: i64,
    rank_rows: i64,
    floats: i64,
    out: *mut *mut LorafusePool,
) -> i32 {
    ffi(|| {
        let cfg = pool_config(k, n, layers, slots, rank_rows, floats)?;
        let kind = pool_cuda(dim("device", device as i64)?, dtype, cfg)?;
        store_pool(out, kind)
    })
}

/// Frees a pool and everything it holds. NULL is a no-op.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_pool_destroy(pool: *mut LorafusePool) -> i32 {
    ffi(|| {
        if !pool.is_null() {
            // SAFETY: a handle from lorafuse_pool_create_*, destroyed once.
            drop(unsafe { Box::from_raw(pool) });
        }
        Ok(())
    })
}

/// Fills `slot` with a LoRA adapter: per-layer factors, contiguous by layer.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_pool_fill_lora(
    pool: *mut LorafusePool,
    slot: i64,
    rank: i64,
    scale: f32,
    a: *const f32,
    b: *const f32,
    u: *const f32,
    v: *const f32,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let (slot, r) = (dim("slot", slot)?, dim("rank", rank)?);
        with_pool!(pool, |be, p| {
            let PoolConfig { k, n, layers, .. } = p.config();
            // SAFETY: lengths as documented in the header.
            let (a, b, u, v) = unsafe {
                (
                    host("a", a, count("a", &[layers, r, k])?)?,
                    host("b", b, count("b", &[layers, n, r])?)?,
                    host_opt("u", u, count("u", &[layers, r])?)?,
                    host_opt("v", v, count("v", &[layers, n])?)?,
                )
            };
            let per: Vec<LayerFactors> = (0..layers)
                .map(|l| LayerFactors {
                    a: &a[l * r * k..(l + 1) * r * k],
                    b: &b[l * n * r..(l + 1) * n * r],
                    u: u.map(|u| &u[l * r..(l + 1) * r]),
                    v: v.map(|v| &v[l * n..(l + 1) * n]),
                })
                .collect();
            p.fill(be, slot, &ServedAdapter::PerLayer { rank: r, scale, layers: &per })?;
        });
        Ok(())
    })
}

/// Per-layer vectors from contiguous `layers × r` / `layers × n` arrays.
fn layer_vectors<'a>(
    u: Option<&'a [f32]>,
    v: Option<&'a [f32]>,
    layers: usize,
    r: usize,
    n: usize,
) -> Vec<LayerVectors<'a>> {
    (0..layers)
        .map(|l| LayerVectors { u: u.map(|u| &u[l * r..(l + 1) * r]), v: v.map(|v| &v[l * n..(l + 1) * n]) })
        .collect()
}

/// Fills `slot` with a Tied-LoRA adapter: one `A`, `B` for all layers.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_pool_fill_tied(
    pool: *mut LorafusePool,
    slot: i64,
    rank: i64,
    scale: f32,
    a: *const f32,
    b: *const f32,
    u: *const f32,
    v: *const f32,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let (slot, r) = (dim("slot", slot)?, dim("rank", rank)?);
        with_pool!(pool, |be, p| {
            let PoolConfig { k, n, layers, .. } = p.config();
            // SAFETY: lengths as documented in the header.
            let (a, b, u, v) = unsafe {
                (
                    host("a", a, count("a", &[r, k])?)?,
                    host("b", b, count("b", &[n, r])?)?,
                    host_opt("u", u, count("u", &[layers, r])?)?,
                    host_opt("v", v, count("v", &[layers, n])?)?,
                )
            };
            let vectors = layer_vectors(u, v, layers, r, n);
            p.fill(be, slot, &ServedAdapter::Tied { rank: r, scale, a, b, vectors: &vectors })?;
        });
        Ok(())
    })
}

fn write_id(out: *mut i64, id: usize) -> CallResult {
    if out.is_null() {
        return Err(BadPointer("`out_id` is NULL".into()).into());
    }
    // SAFETY: checked non-null; documented as writable.
    unsafe { *out = id as i64 };
    Ok(())
}

/// Stores VeRA's frozen `A`, `B` drawn from `seed` once for many adapters.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_pool_add_vera_factors(
    pool: *mut LorafusePool,
    rank: i64,
    seed: u64,
    out_id: *mut i64,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let r = dim("rank", rank)?;
        let id = with_pool!(pool, |be, p| p.add_vera_factors(be, r, seed)?);
        write_id(out_id, id.0)
    })
}

/// Stores given `A`, `B` once for many adapters (Tied-LoRA, frozen factors).
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_pool_add_shared_factors(
    pool: *mut LorafusePool,
    rank: i64,
    a: *const f32,
    b: *const f32,
    out_id: *mut i64,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let r = dim("rank", rank)?;
        let id = with_pool!(pool, |be, p| {
            let PoolConfig { k, n, .. } = p.config();
            // SAFETY: lengths as documented in the header.
            let (a, b) = unsafe { (host("a", a, count("a", &[r, k])?)?, host("b", b, count("b", &[n, r])?)?) };
            p.add_shared_factors(be, r, a, b)?
        });
        write_id(out_id, id.0)
    })
}

/// Fills `slot` with an adapter over shared factors: only its vectors.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_pool_fill_shared(
    pool: *mut LorafusePool,
    slot: i64,
    factors: i64,
    scale: f32,
    u: *const f32,
    v: *const f32,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let (slot, f) = (dim("slot", slot)?, SharedFactors(dim("factors", factors)?));
        with_pool!(pool, |be, p| {
            let PoolConfig { n, layers, .. } = p.config();
            let r = p.shared_rank(f)?;
            // SAFETY: lengths as documented in the header.
            let (u, v) =
                unsafe { (host_opt("u", u, count("u", &[layers, r])?)?, host_opt("v", v, count("v", &[layers, n])?)?) };
            let vectors = layer_vectors(u, v, layers, r, n);
            p.fill(be, slot, &ServedAdapter::Shared { factors: f, scale, vectors: &vectors })?;
        });
        Ok(())
    })
}

/// Registers a Uni-LoRA projection (D = `rows`, d = `cols`, `seed`).
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_pool_add_projection(
    pool: *mut LorafusePool,
    rows: u64,
    cols: u32,
    seed: u64,
    assignment: i32,
    out_id: *mut i64,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let assignment = match assignment {
            LORAFUSE_ASSIGN_HASH => Assignment::Hash,
            LORAFUSE_ASSIGN_BALANCED => Assignment::Balanced,
            a => {
                return Err(Error::invalid(
                    "assignment",
                    format!("code {a}: use LORAFUSE_ASSIGN_HASH (0) or LORAFUSE_ASSIGN_BALANCED (1)"),
                )
                .into())
            }
        };
        let proj = Projection::new(rows, cols, seed, assignment)?;
        let id = with_pool!(pool, |be, p| p.add_projection(be, &proj)?);
        write_id(out_id, id.0)
    })
}

/// Fills `slot` with a Uni-LoRA adapter served from `θ_d`.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_pool_fill_unilora(
    pool: *mut LorafusePool,
    slot: i64,
    projection: i64,
    rank: i64,
    scale: f32,
    theta: *const f32,
    a_start: *const u64,
    b_start: *const u64,
) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let (slot, r) = (dim("slot", slot)?, dim("rank", rank)?);
        let h = ProjectionHandle(dim("projection", projection)?);
        with_pool!(pool, |be, p| {
            let layers = p.config().layers;
            let d = p.projection_cols(h)?;
            // SAFETY: lengths as documented in the header.
            let (theta, a_start, b_start) = unsafe {
                (host("theta", theta, d)?, host("a_start", a_start, layers)?, host("b_start", b_start, layers)?)
            };
            let per: Vec<UniLoraLayer> =
                a_start.iter().zip(b_start).map(|(&a_start, &b_start)| UniLoraLayer { a_start, b_start }).collect();
            p.fill(be, slot, &ServedAdapter::UniLora { projection: h, rank: r, scale, theta, layers: &per })?;
        });
        Ok(())
    })
}

/// Empties `slot`.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_pool_evict(pool: *mut LorafusePool, slot: i64) -> i32 {
    ffi(|| {
        let pool = unsafe { pool_mut(pool) }?;
        let slot = dim("slot", slot)?;
        with_pool!(pool, |be, p| p.evict(be, slot)?);
        Ok(())
    })
}

fn add_cpu<T: Element>(
    pool: &AdapterPool<Cpu, T>,
    layer: usize,
    rows: RowAdapters<'_>,
    x: *const c_void,
    y: *mut c_void,
) -> CallResult {
    let PoolConfig { k, n, .. } = pool.config();
    let m = rows.rows();
    // SAFETY: lengths as documented in the header.
    let (x, y) = unsafe {
        (host("x", x as *const T, count("x", &[m, k])?)?.to_vec(), host_mut("y", y as *mut T, count("y", &[m, n])?)?)
    };
    let mut out = y.to_vec();
    Cpu.multi_adapter_add(pool, layer, rows, &x, &mut out)?;
    y.copy_from_slice(&out);
    Ok(())
}

fn multi_add(
    pool: *mut LorafusePool,
    stream: CUstream,
    layer: i64,
    rows: RowAdapters<'_>,
    x: *const c_void,
    y: *mut c_void,
) -> CallResult {
    let pool = unsafe { pool_mut(pool) }?;
    let layer = dim("layer", layer)?;
    let cpu = matches!(pool, PoolKind::CpuF32(_) | PoolKind::CpuF16(_) | PoolKind::CpuBf16(_));
    if cpu && !stream.is_null() {
        return Err(Error::invalid("stream", "a CPU pool runs on the host: pass NULL as the stream").into());
    }
    match pool {
        PoolKind::CpuF32(p) => add_cpu(p, layer, rows, x, y),
        PoolKind::CpuF16(p) => add_cpu(p, layer, rows, x, y),
        PoolKind::CpuBf16(p) => add_cpu(p, layer, rows, x, y),
        #[cfg(feature = "cuda")]
        PoolKind::GpuF32(g, p) => cuda::add(g, p, stream, layer, rows, x, y),
        #[cfg(feature = "cuda")]
        PoolKind::GpuF16(g, p) => cuda::add(g, p, stream, layer, rows, x, y),
        #[cfg(feature = "cuda")]
        PoolKind::GpuBf16(g, p) => cuda::add(g, p, stream, layer, rows, x, y),
    }
}

/// Decode form: `y[i] += LoRA term of adapter ids[i]` for `m` rows.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
pub unsafe extern "C" fn lorafuse_multi_adapter_add(
    pool: *mut LorafusePool,
    stream: CUstream,
    layer: i64,
    m: i64,
    ids: *const i32,
    x: *const c_void,
    y: *mut c_void,
) -> i32 {
    ffi(|| {
        let m = dim("m", m)?;
        // SAFETY: m ids, as documented.
        let ids = unsafe { host("ids", ids, m) }?;
        multi_add(pool, stream, layer, RowAdapters::Rows(ids), x, y)
    })
}

/// Prefill form: segment `s` (rows `starts[s]..starts[s+1]`) uses `ids[s]`.
///
/// # Safety
/// Every pointer must be valid for the lengths `include/lorafuse.h` gives it
/// (or NULL where it says optional), aligned to its element type, and not
/// written by anything else during the call; `pool` must come from
/// `lorafuse_pool_create_*` and not be destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn lorafuse_multi_adapter_add_segments(
    pool: *mut LorafusePool,
    stream: CUstream,
    layer: i64,
    segments: i64,
    starts: *const i64,
    ids: *const i32,
    x: *const c_void,
    y: *mut c_void,
) -> i32 {
    ffi(|| {
        let s = dim("segments", segments)?;
        // SAFETY: s + 1 starts and s ids, as documented.
        let (starts, ids) = unsafe { (host("starts", starts, s + 1)?, host("ids", ids, s)?) };
        let starts: Vec<usize> = starts.iter().map(|&v| dim("starts", v)).collect::<Result<_>>()?;
        multi_add(pool, stream, layer, RowAdapters::Segments { starts: &starts, ids }, x, y)
    })
}
