//! Launch wrappers for `kernels/lowrank.cu`, and the cuBLAS GEMMs around
//! them (the step list and which memory pass each fusion avoids are in the
//! kernel file's header).
//!
//! [`forward`], [`add_in_place`] and [`backward`] take caller-owned views
//! and run on the [`Gpu`]'s stream, for engines (wrap an engine's stream
//! with [`Gpu::from_stream`]); the [`LowRankOps`] impl calls them on owned
//! buffers. Scratch space (rank-sized partials, `t'`, `B'`, `dS`) is
//! allocated per call from the stream's pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use super::{blocks_for, grid, kernels, ArgOrNull, Gpu};
use crate::dtype::{DType, Element};
use crate::lowrank::{Adapter, AdapterLens, GradLens, Grads, LinearShape, LowRankOps};
use crate::{Error, Result};

/// Must match `LR_THREADS` in kernels/lowrank.cu.
const THREADS: u32 = 256;
/// Must match `TC_THREADS` in kernels/lowrank.cu.
const TC_THREADS: u32 = 128;
/// Tile sizes that must match the kernel's `SH_*`, `TC_ROWS` and `BD_*`
/// constants.
const SH_ROWS: usize = 64;
const SH_RANKS: usize = 16;
const SH_KT: usize = 32;
const BD_ROWS: usize = 64;
const BD_COLS_PER_BLOCK: usize = 128 * 4;
const BD_RANKS: usize = 16;
/// Rows per block of `lowrank_backward_rows`.
const ROWS_PER_BLOCK: usize = 128;
/// Largest M the single-launch decode kernel takes (its `t` sits in shared
/// memory: M·r·4 ≤ 32 KiB at r = 256).
pub const DECODE_MAX_M: usize = 32;
/// Blocks per SM the multi-block kernels aim for.
const BLOCKS_PER_SM: usize = 2;

/// An adapter as device views (see [`crate::lowrank::Adapter`]).
pub struct AdapterView<'a> {
    /// `A`, r×K.
    pub a: CudaView<'a, f32>,
    /// `B`, N×r.
    pub b: CudaView<'a, f32>,
    /// `u` (r), `None` for ones.
    pub u: Option<CudaView<'a, f32>>,
    /// `v` (N), `None` for ones.
    pub v: Option<CudaView<'a, f32>>,
    /// The scale `s`.
    pub scale: f32,
}

impl AdapterView<'_> {
    fn lens(&self) -> AdapterLens {
        AdapterLens {
            a: self.a.len(),
            b: self.b.len(),
            u: self.u.as_ref().map(|u| u.len()),
            v: self.v.as_ref().map(|v| v.len()),
            scale: self.scale,
        }
    }
}

/// Gradient outputs as device views (see [`crate::lowrank::Grads`]): `dx`
/// overwritten, the rest accumulated, `None` not computed.
pub struct GradViews<'a, T> {
    /// `dx` (M×K, T).
    pub dx: Option<CudaViewMut<'a, T>>,
    /// `dW` (N×K, f32).
    pub dw: Option<CudaViewMut<'a, f32>>,
    /// `dbias` (N, f32).
    pub dbias: Option<CudaViewMut<'a, f32>>,
    /// `dA` (r×K).
    pub da: Option<CudaViewMut<'a, f32>>,
    /// `dB` (N×r).
    pub db: Option<CudaViewMut<'a, f32>>,
    /// `du` (r).
    pub du: Option<CudaViewMut<'a, f32>>,
    /// `dv` (N).
    pub dv: Option<CudaViewMut<'a, f32>>,
}

fn launch_err(name: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(format!("launching {name}"), e)
}

fn kernel<T: Element>(gpu: &Gpu, stem: &str) -> Result<(cudarc::driver::CudaFunction, String)> {
    let name = format!("{stem}_{}", T::DTYPE.suffix());
    Ok((gpu.function(kernels::LOWRANK, &name)?, name))
}

/// Scratch memory, fully written by the kernel that produces it before any
/// read.
fn scratch<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller's producer kernel writes all `len` elements before
    // a consumer reads them (see the index ranges in kernels/lowrank.cu).
    unsafe { gpu.stream().alloc::<T>(len.max(1)) }.map_err(|e| Error::cuda(format!("allocating {len} elements"), e))
}

/// The cuBLAS handle of `gpu`'s stream, created once per stream (and kept
/// for the life of the process, with the stream it holds). Binds the
/// stream's context to this thread first: cuBLAS launches through the
/// runtime API, which uses the calling thread's current context.
fn blas(gpu: &Gpu) -> Result<Arc<CudaBlas>> {
    gpu.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<CudaBlas>>>> = OnceLock::new();
    // The handle keeps its stream alive, so the key is never reused.
    let key = Arc::as_ptr(gpu.stream()) as usize;
    let mut map = HANDLES.get_or_init(Default::default).lock().unwrap();
    if let Some(h) = map.get(&key) {
        return Ok(h.clone());
    }
    let h = Arc::new(CudaBlas::new(gpu.stream().clone()).map_err(|e| Error::cuda("creating a cuBLAS handle", e))?);
    map.insert(key, h.clone());
    Ok(h)
}

fn cuda_type(d: DType) -> cudaDataType_t {
    match d {
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
    }
}

/// A row-major GEMM operand: device address, leading dimension (elements
/// per stored row), whether it is used transposed, and its element type.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    ld: usize,
    trans: bool,
    dtype: DType,
}

/// Row-major `C (m×n) = α·op(A)·op(B) + β·C`, `op(A)` m×k, `op(B)` k×n, f32
/// accumulation. cuBLAS is column-major, so it computes
/// `Cᵀ = op(B)ᵀ·op(A)ᵀ`: a row-major matrix is its column-major transpose.
#[allow(clippy::too_many_arguments)]
fn gemm(
    blas: &CudaBlas,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: u64,
    ldc: usize,
    c_type: DType,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    // SAFETY: shapes and leading dimensions were validated against the
    // buffer lengths by the public entry points; pointers come from live
    // views whose stream-ordering guards the caller holds.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(b.trans),
            op(a.trans),
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            b.ptr as *const _,
            cuda_type(b.dtype),
            b.ld as i32,
            a.ptr as *const _,
            cuda_type(a.dtype),
            a.ld as i32,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            cuda_type(c_type),
            ldc as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::cuda(format!("cuBLAS GEMM {m}x{n}x{k}"), e))
}

/// Row-major `C (m×n) = α·op(A)·op(B) + β·C` on the stream's cuBLAS handle
/// (`op(A)` m×k: `A` stored m×k, or k×m when `a_trans`; likewise `B`),
/// inputs in `T`, output in `C` (`T` or f32), f32 accumulation. Exposed for
/// callers composing their own sequences (the benches' unfused baseline,
/// trainers); lengths are checked.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rowmajor<T: Element, C: Element>(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    a: &CudaView<'_, T>,
    a_trans: bool,
    b: &CudaView<'_, T>,
    b_trans: bool,
    c: &mut CudaViewMut<'_, C>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "gemm_rowmajor";
    let dims = |len: usize, rows: usize, cols: usize, name: &'static str| {
        if len == rows * cols {
            Ok(())
        } else {
            Err(Error::shape(OP, name, format!("{rows}x{cols}"), format!("{len} elements")))
        }
    };
    dims(a.len(), m, k, "a")?;
    dims(b.len(), k, n, "b")?;
    dims(c.len(), m, n, "c")?;
    if m == 0 || n == 0 || k == 0 || [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return Err(Error::invalid(OP, format!("m={m} n={n} k={k}: each must be in 1..=2^31-1")));
    }
    if C::DTYPE != T::DTYPE && C::DTYPE != DType::F32 {
        return Err(Error::DType { op: OP, operand: "c", expected: DType::F32, got: C::DTYPE });
    }
    let h = blas(gpu)?;
    let (ap, _g1) = rd(gpu, a);
    let (bp, _g2) = rd(gpu, b);
    let (cp, _g3) = wr(gpu, c);
    let (lda, ldb) = (if a_trans { m } else { k }, if b_trans { k } else { n });
    let ao = Operand { ptr: ap, ld: lda, trans: a_trans, dtype: T::DTYPE };
    let bo = Operand { ptr: bp, ld: ldb, trans: b_trans, dtype: T::DTYPE };
    gemm(&h, (m, n, k), ao, bo, cp, n, C::DTYPE, alpha, beta)
}

/// The address of a read operand, with the guard that orders it on `gpu`'s
/// stream (keep the guard until the GEMM is queued).
fn rd<'a, T>(gpu: &'a Gpu, v: &'a impl DevicePtr<T>) -> (u64, SyncOnDrop<'a>) {
    v.device_ptr(gpu.stream())
}

fn wr<'a, T>(gpu: &'a Gpu, v: &'a mut impl DevicePtrMut<T>) -> (u64, SyncOnDrop<'a>) {
    v.device_ptr_mut(gpu.stream())
}

/// Padded rank of `t'` and `B'`: r ranks + the bias column, rounded to 8
/// elements so every row starts 16-byte aligned for the tensor-core GEMM.
fn padded_rank(r: usize) -> usize {
    (r + 1).div_ceil(8) * 8
}

/// `part = x·Aᵀ` per K-split: returns (partials, splits). Enough splits
/// that the grid covers the device, at least 4 K-tiles per split.
fn shrink<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    a: &CudaView<'_, f32>,
) -> Result<(CudaSlice<f32>, usize)> {
    let LinearShape { m, k, r, .. } = s;
    let base = m.div_ceil(SH_ROWS) * r.div_ceil(SH_RANKS);
    let want = (gpu.info().sm_count as usize * BLOCKS_PER_SM).div_ceil(base).max(1);
    let max_splits = k.div_ceil(4 * SH_KT).max(1);
    let per_split = k.div_ceil(want.min(max_splits)).div_ceil(SH_KT) * SH_KT;
    let splits = k.div_ceil(per_split);
    let mut part = scratch::<f32>(gpu, splits * m * r)?;
    // 16-bit x: tensor cores (A split into hi + lo halves, see the kernel);
    // f32 x: CUDA cores. Same tiling (64 rows × 16 ranks) and partials.
    let (stem, threads) =
        if T::DTYPE == DType::F32 { ("lowrank_shrink", THREADS) } else { ("lowrank_shrink_tc", TC_THREADS) };
    let (f, name) = kernel::<T>(gpu, stem)?;
    let cfg = LaunchConfig {
        grid_dim: (m.div_ceil(SH_ROWS) as u32, splits as u32, r.div_ceil(SH_RANKS) as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let (m32, k32, r32, ps) = (m as i32, k as i32, r as i32, per_split as i32);
    unsafe {
        gpu.stream().launch_builder(&f).arg(x).arg(a).arg(&mut part).arg(&m32).arg(&k32).arg(&r32).arg(&ps).launch(cfg)
    }
    .map_err(launch_err(&name))?;
    Ok((part, splits))
}

/// Sums the shrink partials into `t` (if given) and, with `tx`, writes
/// `t' = [s·t⊙u | bias column | 0…]` (`ld` wide).
#[allow(clippy::too_many_arguments)]
fn shrink_finish<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    part: &CudaSlice<f32>,
    splits: usize,
    ad: &AdapterView<'_>,
    t: Option<&mut CudaViewMut<'_, f32>>,
    tx: Option<&mut CudaSlice<T>>,
    ld: usize,
    bias_col: bool,
) -> Result<()> {
    let (f, name) = kernel::<T>(gpu, "lowrank_shrink_finish")?;
    let total = (s.m * ld) as u64;
    let cfg = grid(gpu.persistent_grid(8, blocks_for(total, THREADS) as u64), THREADS, 0);
    let (splits, ld32, bias32, m32, r32) = (splits as i32, ld as i32, bias_col as i32, s.m as i32, s.r as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(part).arg(&splits);
    b.arg_or_null(ad.u.as_ref());
    b.arg(&ad.scale);
    b.arg_or_null(t);
    b.arg_or_null(tx);
    b.arg(&ld32).arg(&bias32).arg(&m32).arg(&r32);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok(())
}

/// `B' = [B⊙v | bias | 0…]` in T, N×ld.
fn prep_expand<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    ad: &AdapterView<'_>,
    bias: Option<&CudaView<'_, T>>,
    ld: usize,
) -> Result<CudaSlice<T>> {
    let mut bx = scratch::<T>(gpu, s.n * ld)?;
    let (f, name) = kernel::<T>(gpu, "lowrank_prep_expand")?;
    let cfg = grid(gpu.persistent_grid(8, blocks_for((s.n * ld) as u64, THREADS) as u64), THREADS, 0);
    let (ld32, n32, r32) = (ld as i32, s.n as i32, s.r as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&ad.b);
    b.arg_or_null(ad.v.as_ref());
    b.arg_or_null(bias);
    b.arg(&mut bx).arg(&ld32).arg(&n32).arg(&r32);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok(bx)
}

/// `y (+)= t'·B'ᵀ` over the padded rank: the expand term, plus the bias
/// through t's ones column.
#[allow(clippy::too_many_arguments)]
fn expand_gemm<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    tx: &CudaSlice<T>,
    bx: &CudaSlice<T>,
    ld: usize,
    y: &mut CudaViewMut<'_, T>,
    beta: f32,
) -> Result<()> {
    let h = blas(gpu)?;
    let (tp, _g1) = rd(gpu, tx);
    let (bp, _g2) = rd(gpu, bx);
    let (yp, _g3) = wr(gpu, y);
    let d = T::DTYPE;
    gemm(
        &h,
        (s.m, s.n, ld),
        Operand { ptr: tp, ld, trans: false, dtype: d },
        Operand { ptr: bp, ld, trans: true, dtype: d },
        yp,
        s.n,
        d,
        1.0,
        beta,
    )
}

/// `y (β)+= x·Wᵀ`, the base GEMM.
fn base_gemm<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    y: &mut CudaViewMut<'_, T>,
    beta: f32,
) -> Result<()> {
    let h = blas(gpu)?;
    let (xp, _g1) = rd(gpu, x);
    let (wp, _g2) = rd(gpu, w);
    let (yp, _g3) = wr(gpu, y);
    let d = T::DTYPE;
    gemm(
        &h,
        (s.m, s.n, s.k),
        Operand { ptr: xp, ld: s.k, trans: false, dtype: d },
        Operand { ptr: wp, ld: s.k, trans: true, dtype: d },
        yp,
        s.n,
        d,
        1.0,
        beta,
    )
}

/// One cooperative launch: `y += bias + s·(((x·Aᵀ)⊙u)·Bᵀ)⊙v` for M ≤ 32,
/// saving `t` when asked.
#[allow(clippy::too_many_arguments)]
fn decode<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    ad: &AdapterView<'_>,
    bias: Option<&CudaView<'_, T>>,
    y: &mut CudaViewMut<'_, T>,
    t: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let LinearShape { m, k, n, r } = s;
    // At most one block per SM (so all are co-resident: 256 threads,
    // ≤ 32 KiB shared), about 64K multiply-adds of shrink plus expand per
    // block: fewer blocks make the two grid syncs cheaper, more spread the
    // reads of A and B. Never more blocks than 32-wide K-slices.
    let sms = (gpu.info().sm_count as usize).max(1);
    let blocks = (m * r * (k + n)).div_ceil(1 << 16).clamp(4.min(sms), sms).min(k.div_ceil(32)).max(1);
    let k_chunk = k.div_ceil(blocks);
    let blocks = k.div_ceil(k_chunk);
    let mut work = scratch::<f32>(gpu, (blocks + 1) * m * r)?;
    let (f, name) = kernel::<T>(gpu, "lowrank_decode")?;
    let cfg = grid(blocks as u32, THREADS, (m * r * 4) as u32);
    let (m32, k32, n32, r32, kc) = (m as i32, k as i32, n as i32, r as i32, k_chunk as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&ad.a).arg(&ad.b);
    b.arg_or_null(ad.u.as_ref());
    b.arg_or_null(ad.v.as_ref());
    b.arg_or_null(bias);
    b.arg(&ad.scale).arg(y);
    b.arg_or_null(t);
    b.arg(&mut work).arg(&m32).arg(&k32).arg(&n32).arg(&r32).arg(&kc);
    unsafe { b.launch_cooperative(cfg) }.map_err(launch_err(&name))?;
    Ok(())
}

/// The low-rank term through the prefill path: shrink, finish, prep, and
/// the expand GEMM onto `y` with `beta` (0: y = term (+ bias); 1: y +=).
#[allow(clippy::too_many_arguments)]
fn prefill_expand<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    ad: &AdapterView<'_>,
    bias: Option<&CudaView<'_, T>>,
    y: &mut CudaViewMut<'_, T>,
    t: Option<&mut CudaViewMut<'_, f32>>,
    beta: f32,
) -> Result<()> {
    let ld = padded_rank(s.r);
    let (part, splits) = shrink(gpu, s, x, &ad.a)?;
    let mut tx = scratch::<T>(gpu, s.m * ld)?;
    shrink_finish(gpu, s, &part, splits, ad, t, Some(&mut tx), ld, bias.is_some())?;
    let bx = prep_expand(gpu, s, ad, bias, ld)?;
    expand_gemm(gpu, s, &tx, &bx, ld, y, beta)
}

/// Engine form of the forward over caller views: `y = x·Wᵀ (+ bias) (+ the
/// low-rank term)`, `t = x·Aᵀ` saved when given. See
/// [`LowRankOps::lowrank_forward`].
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    adapter: Option<&AdapterView<'_>>,
    y: &mut CudaViewMut<'_, T>,
    t: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let lens = adapter.map(AdapterView::lens);
    s.check_forward(x.len(), w.len(), bias.map(|b| b.len()), lens.as_ref(), y.len(), t.as_ref().map(|t| t.len()))?;
    match adapter {
        None => {
            if let Some(bias) = bias {
                let (f, name) = kernel::<T>(gpu, "lowrank_fill_bias")?;
                let cfg = grid(gpu.persistent_grid(8, blocks_for((s.m * s.n) as u64, THREADS) as u64), THREADS, 0);
                let (m32, n32) = (s.m as i32, s.n as i32);
                unsafe { gpu.stream().launch_builder(&f).arg(bias).arg(&mut *y).arg(&m32).arg(&n32).launch(cfg) }
                    .map_err(launch_err(&name))?;
            }
            base_gemm(gpu, s, x, w, y, if bias.is_some() { 1.0 } else { 0.0 })
        }
        Some(ad) if s.m <= DECODE_MAX_M => {
            base_gemm(gpu, s, x, w, y, 0.0)?;
            decode(gpu, s, x, ad, bias, y, t)
        }
        Some(ad) => {
            prefill_expand(gpu, s, x, ad, bias, y, t, 0.0)?;
            base_gemm(gpu, s, x, w, y, 1.0)
        }
    }
}

/// Engine form of the in-place add: `y += s·(((x·Aᵀ)⊙u)·Bᵀ)⊙v` where `y`
/// already holds the engine's `x·Wᵀ`, on the caller's stream and buffers.
pub fn add_in_place<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    adapter: &AdapterView<'_>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    s.check_add(x.len(), &adapter.lens(), y.len())?;
    if s.m <= DECODE_MAX_M {
        decode(gpu, s, x, adapter, None, y, None)
    } else {
        prefill_expand(gpu, s, x, adapter, None, y, None, 1.0)
    }
}

/// Engine form of the backward over caller views. See
/// [`LowRankOps::lowrank_backward`].
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    adapter: Option<&AdapterView<'_>>,
    t: Option<&CudaView<'_, f32>>,
    dy: &CudaView<'_, T>,
    grads: GradViews<'_, T>,
) -> Result<()> {
    let lens = adapter.map(AdapterView::lens);
    let glens = GradLens {
        dx: grads.dx.as_ref().map(|v| v.len()),
        dw: grads.dw.as_ref().map(|v| v.len()),
        dbias: grads.dbias.as_ref().map(|v| v.len()),
        da: grads.da.as_ref().map(|v| v.len()),
        db: grads.db.as_ref().map(|v| v.len()),
        du: grads.du.as_ref().map(|v| v.len()),
        dv: grads.dv.as_ref().map(|v| v.len()),
    };
    s.check_backward(x.len(), w.len(), lens.as_ref(), t.map(|t| t.len()), dy.len(), &glens)?;
    let GradViews { dx, dw, dbias, da, db, du, dv } = grads;
    let LinearShape { m, k, n, r } = s;
    let d = T::DTYPE;
    let h = blas(gpu)?;

    if let Some(mut dbias) = dbias {
        // dbias += dyᵀ·1: a GEMV on cuBLAS, deterministic.
        let mut ones = scratch::<T>(gpu, m)?;
        let (f, name) = kernel::<T>(gpu, "lowrank_fill_one")?;
        let cfg = grid(blocks_for(m as u64, THREADS), THREADS, 0);
        unsafe { gpu.stream().launch_builder(&f).arg(&mut ones).arg(&m).launch(cfg) }.map_err(launch_err(&name))?;
        let (gp, _g1) = rd(gpu, dy);
        let (op, _g2) = rd(gpu, &ones);
        let (cp, _g3) = wr(gpu, &mut dbias);
        let dyt = Operand { ptr: gp, ld: n, trans: true, dtype: d };
        gemm(&h, (n, 1, m), dyt, Operand { ptr: op, ld: 1, trans: false, dtype: d }, cp, 1, DType::F32, 1.0, 1.0)?;
    }
    if let Some(mut dw) = dw {
        let (gp, _g1) = rd(gpu, dy);
        let (xp, _g2) = rd(gpu, x);
        let (cp, _g3) = wr(gpu, &mut dw);
        let dyt = Operand { ptr: gp, ld: n, trans: true, dtype: d };
        gemm(&h, (n, k, m), dyt, Operand { ptr: xp, ld: k, trans: false, dtype: d }, cp, k, DType::F32, 1.0, 1.0)?;
    }

    // dS (in T) when dx or dA needs it.
    let mut ds: Option<CudaSlice<T>> = None;
    if let Some(ad) = adapter {
        let want_ds = dx.is_some() || da.is_some();
        let want_g = want_ds || du.is_some();
        let want_p = db.is_some() || dv.is_some();
        if want_g || want_p {
            // t: the forward's, or recomputed; only du, dB and dv read it.
            let need_t = du.is_some() || want_p;
            let recomputed;
            let t_view = match t {
                Some(t) => t.slice(..),
                None if !need_t => ad.a.slice(0..0),
                None => {
                    let (part, splits) = shrink(gpu, s, x, &ad.a)?;
                    let mut tt = scratch::<f32>(gpu, m * r)?;
                    shrink_finish::<T>(gpu, s, &part, splits, ad, Some(&mut tt.as_view_mut()), None, r, false)?;
                    recomputed = tt;
                    recomputed.as_view()
                }
            };
            let gx = n.div_ceil(BD_COLS_PER_BLOCK);
            let gz = r.div_ceil(BD_RANKS);
            let want = (gpu.info().sm_count as usize * BLOCKS_PER_SM).div_ceil(gx * gz).clamp(1, m.div_ceil(BD_ROWS));
            let rows_per_block = m.div_ceil(want).div_ceil(BD_ROWS) * BD_ROWS;
            let gy = m.div_ceil(rows_per_block);
            let mut gpart = if want_g { Some(scratch::<f32>(gpu, gx * m * r)?) } else { None };
            let mut ppart = if want_p { Some(scratch::<f32>(gpu, gy * r * n)?) } else { None };
            {
                // 16-bit dy: tensor cores; f32: CUDA cores. Same grid and partials.
                let stem = if d == DType::F32 { "lowrank_backward_dy" } else { "lowrank_backward_dy_tc" };
                let (f, name) = kernel::<T>(gpu, stem)?;
                let cfg = LaunchConfig {
                    grid_dim: (gx as u32, gy as u32, gz as u32),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (m32, n32, r32, rpb) = (m as i32, n as i32, r as i32, rows_per_block as i32);
                let mut b = gpu.stream().launch_builder(&f);
                b.arg(dy);
                b.arg_or_null(need_t.then_some(&t_view));
                b.arg(&ad.b);
                b.arg_or_null(ad.u.as_ref());
                b.arg_or_null(ad.v.as_ref());
                b.arg_or_null(gpart.as_mut());
                b.arg_or_null(ppart.as_mut());
                b.arg(&m32).arg(&n32).arg(&r32).arg(&rpb);
                unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
            }
            let row_blocks = m.div_ceil(ROWS_PER_BLOCK);
            let mut dupart = if du.is_some() { Some(scratch::<f32>(gpu, row_blocks * r)?) } else { None };
            if let Some(gpart) = gpart.as_ref() {
                if want_ds {
                    ds = Some(scratch::<T>(gpu, m * r)?);
                }
                let (f, name) = kernel::<T>(gpu, "lowrank_backward_rows")?;
                let cfg = grid(row_blocks as u32, THREADS, 0);
                let (np, m32, r32, rpb) = (gx as i32, m as i32, r as i32, ROWS_PER_BLOCK as i32);
                let mut b = gpu.stream().launch_builder(&f);
                b.arg(gpart).arg(&np);
                b.arg_or_null(need_t.then_some(&t_view));
                b.arg_or_null(ad.u.as_ref());
                b.arg(&ad.scale);
                b.arg_or_null(ds.as_mut());
                b.arg_or_null(dupart.as_mut());
                b.arg(&m32).arg(&r32).arg(&rpb);
                unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
            }
            if want_p || du.is_some() {
                let f = gpu.function(kernels::LOWRANK, "lowrank_backward_cols")?;
                let cfg = grid(blocks_for(n.max(r) as u64, THREADS), THREADS, 0);
                let (np, nd, n32, r32) = (gy as i32, row_blocks as i32, n as i32, r as i32);
                let (mut db, mut dv, mut du) = (db, dv, du);
                let mut b = gpu.stream().launch_builder(&f);
                b.arg_or_null(ppart.as_ref());
                b.arg(&np).arg(&ad.b);
                b.arg_or_null(ad.v.as_ref());
                b.arg(&ad.scale);
                b.arg_or_null(db.as_mut());
                b.arg_or_null(dv.as_mut());
                b.arg_or_null(dupart.as_ref());
                b.arg(&nd);
                b.arg_or_null(du.as_mut());
                b.arg(&n32).arg(&r32);
                unsafe { b.launch(cfg) }.map_err(launch_err("lowrank_backward_cols"))?;
            }
            if let (Some(mut da), Some(ds)) = (da, ds.as_ref()) {
                // dA += dSᵀ·x
                let (sp, _g1) = rd(gpu, ds);
                let (xp, _g2) = rd(gpu, x);
                let (cp, _g3) = wr(gpu, &mut da);
                let dst = Operand { ptr: sp, ld: r, trans: true, dtype: d };
                gemm(
                    &h,
                    (r, k, m),
                    dst,
                    Operand { ptr: xp, ld: k, trans: false, dtype: d },
                    cp,
                    k,
                    DType::F32,
                    1.0,
                    1.0,
                )?;
            }
        }
    }

    if let Some(mut dx) = dx {
        // As in the forward: the rank-r term dS·A (A rounded to T for the
        // tensor cores) is written into dx first, and the big GEMM dy·W
        // accumulates onto it with β = 1 in its epilogue, instead of a
        // second pass reading and rewriting dx after it.
        let mut beta = 0.0;
        if let (Some(ad), Some(ds)) = (adapter, ds.as_ref()) {
            let mut a_t = scratch::<T>(gpu, r * k)?;
            let (f, name) = kernel::<T>(gpu, "lowrank_cast")?;
            let cfg = grid(gpu.persistent_grid(8, blocks_for((r * k) as u64, THREADS) as u64), THREADS, 0);
            let len = r * k;
            unsafe { gpu.stream().launch_builder(&f).arg(&ad.a).arg(&mut a_t).arg(&len).launch(cfg) }
                .map_err(launch_err(&name))?;
            let (sp, _g1) = rd(gpu, ds);
            let (ap, _g2) = rd(gpu, &a_t);
            let (cp, _g3) = wr(gpu, &mut dx);
            let dso = Operand { ptr: sp, ld: r, trans: false, dtype: d };
            gemm(&h, (m, k, r), dso, Operand { ptr: ap, ld: k, trans: false, dtype: d }, cp, k, d, 1.0, 0.0)?;
            beta = 1.0;
        }
        let (gp, _g1) = rd(gpu, dy);
        let (wp, _g2) = rd(gpu, w);
        let (cp, _g3) = wr(gpu, &mut dx);
        let dyo = Operand { ptr: gp, ld: n, trans: false, dtype: d };
        gemm(&h, (m, k, n), dyo, Operand { ptr: wp, ld: k, trans: false, dtype: d }, cp, k, d, 1.0, beta)?;
    }
    Ok(())
}

fn adapter_view<'a>(ad: &Adapter<'a, Gpu>) -> AdapterView<'a> {
    AdapterView {
        a: ad.a.as_view(),
        b: ad.b.as_view(),
        u: ad.u.map(|u| u.as_view()),
        v: ad.v.map(|v| v.as_view()),
        scale: ad.scale,
    }
}

impl LowRankOps for Gpu {
    fn lowrank_forward<T: Element>(
        &self,
        shape: LinearShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        adapter: Option<Adapter<'_, Gpu>>,
        y: &mut CudaSlice<T>,
        t: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let ad = adapter.as_ref().map(adapter_view);
        let bias = bias.map(|b| b.as_view());
        let mut t = t.map(|t| t.as_view_mut());
        forward(self, shape, &x.as_view(), &w.as_view(), bias.as_ref(), ad.as_ref(), &mut y.as_view_mut(), t.as_mut())
    }

    fn lowrank_backward<T: Element>(
        &self,
        shape: LinearShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        adapter: Option<Adapter<'_, Gpu>>,
        t: Option<&CudaSlice<f32>>,
        dy: &CudaSlice<T>,
        grads: Grads<'_, Gpu, T>,
    ) -> Result<()> {
        let ad = adapter.as_ref().map(adapter_view);
        let t = t.map(|t| t.as_view());
        let views = GradViews {
            dx: grads.dx.map(|v| v.as_view_mut()),
            dw: grads.dw.map(|v| v.as_view_mut()),
            dbias: grads.dbias.map(|v| v.as_view_mut()),
            da: grads.da.map(|v| v.as_view_mut()),
            db: grads.db.map(|v| v.as_view_mut()),
            du: grads.du.map(|v| v.as_view_mut()),
            dv: grads.dv.map(|v| v.as_view_mut()),
        };
        backward(self, shape, &x.as_view(), &w.as_view(), ad.as_ref(), t.as_ref(), &dy.as_view(), views)
    }

    fn lowrank_add<T: Element>(
        &self,
        shape: LinearShape,
        x: &CudaSlice<T>,
        adapter: Adapter<'_, Gpu>,
        y: &mut CudaSlice<T>,
    ) -> Result<()> {
        add_in_place(self, shape, &x.as_view(), &adapter_view(&adapter), &mut y.as_view_mut())
    }
}
