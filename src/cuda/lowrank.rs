//! Launch wrappers for `kernels/lowrank.cu`, and the cuBLAS GEMMs around
//! them (the step list and which memory pass each fusion avoids are in the
//! kernel file's header).
//!
//! [`forward`], [`add_in_place`], [`backward`] and [`project_down`] take
//! caller-owned views and run on the [`Gpu`]'s stream, for engines (wrap an
//! engine's stream with [`Gpu::from_stream`]); the [`LowRankOps`] impl calls
//! them on owned buffers, and the [`PackedOps`] impl is the one-GEMM packed
//! layout. Scratch space (rank-sized partials, the hi/lo halves of the f32
//! factors, `t'`, `B'`, `dS`) is carved from the [`Gpu`]'s workspace
//! ([`super::workspace`]): each public entry point locks it once and passes
//! the guard down, so a warm decode or training step allocates nothing.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use super::workspace::{In, Out, Region, Scratch};
use super::{blocks_for, grid, kernels, ArgOrNull, Gpu};
use crate::abi;
use crate::dtype::{DType, Element};
use crate::lowrank::packed::{self, PackedLayout, PackedOps};
use crate::lowrank::{Adapter, AdapterLens, GradLens, Grads, LinearShape, LowRankOps};
use crate::{Error, Result};

/// Threads per block of the CUDA-core kernels.
const THREADS: u32 = abi::LR_THREADS;
/// Warps per block of the tensor-core kernels, and the reduction step of a
/// warp.
const TC_WARPS: usize = abi::TC_WARPS as usize;
const TC_KT: usize = abi::TC_KT as usize;
/// Tile sizes of the f32 shrink and dB kernels.
const SH_ROWS: usize = abi::SH_ROWS as usize;
const SH_RANKS: usize = abi::SH_RANKS as usize;
const SH_KT: usize = abi::SH_KT as usize;
const BD_ROWS: usize = abi::BD_ROWS as usize;
const BD_COLS_PER_BLOCK: usize = (abi::BD_COLS * abi::BD_TILES) as usize;
const BD_RANKS: usize = abi::BD_RANKS as usize;
/// Rows per block of `lowrank_backward_rows`.
const ROWS_PER_BLOCK: usize = 128;
/// Columns per block of `lowrank_backward_cols`.
const COLS_PER_BLOCK: usize = abi::COLS_W as usize;
/// Largest M the single-launch decode kernel takes (its `t` sits in shared
/// memory: M·r·4 ≤ 32 KiB at r = 256).
pub const DECODE_MAX_M: usize = 32;
/// Largest M the fused decode kernel (`lowrank_decode_fused`: one pass over
/// W with the low-rank term riding along) takes: one m16 tensor-core tile.
pub const DECODE_FUSED_MAX_M: usize = abi::DEC_MAX_M as usize;
/// Fused decode geometry (kernels/abi.h).
const DEC_WARPS: usize = abi::DEC_WARPS as usize;
const DEC_THREADS: u32 = abi::DEC_WARPS * 32;
const DEC_COLS: usize = abi::DEC_COLS as usize;
const DEC_MAX_M: usize = abi::DEC_MAX_M as usize;
const DEC_SLICE: usize = abi::DEC_SLICE as usize;
/// Shrink partials each fused-decode block sums at its grid sync, at most.
const DEC_PARTIALS: usize = 4096;
/// Blocks per SM the f32 multi-block kernels aim for.
const BLOCKS_PER_SM: usize = 2;
/// Resident 128-thread tensor-core blocks per SM the grids are sized for
/// (≤ 64 registers a thread: 8 blocks; the rank-64 bucket holds fewer), and
/// how many waves of them a grid should fill.
const TC_BLOCKS_PER_SM: usize = 8;
const TC_WAVES: usize = 2;

/// The rank bucket of the tensor-core kernels (`lowrank_shrink_r{16,32,64}`,
/// `lowrank_dy_p_r{16,32,64}`): ranks per block, held in registers as
/// 16×16 accumulator fragments; grid.z walks larger ranks in blocks of 64.
fn rank_block(r: usize) -> usize {
    match r {
        0..=16 => 16,
        17..=32 => 32,
        _ => 64,
    }
}

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

impl<T> GradViews<'_, T> {
    fn lens(&self) -> GradLens {
        GradLens {
            dx: self.dx.as_ref().map(|v| v.len()),
            dw: self.dw.as_ref().map(|v| v.len()),
            dbias: self.dbias.as_ref().map(|v| v.len()),
            da: self.da.as_ref().map(|v| v.len()),
            db: self.db.as_ref().map(|v| v.len()),
            du: self.du.as_ref().map(|v| v.len()),
            dv: self.dv.as_ref().map(|v| v.len()),
        }
    }
}

fn launch_err(name: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(format!("launching {name}"), e)
}

fn kernel<T: Element>(gpu: &Gpu, stem: &str) -> Result<(cudarc::driver::CudaFunction, String)> {
    let name = format!("{stem}_{}", T::DTYPE.suffix());
    Ok((gpu.function(kernels::LOWRANK, &name)?, name))
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
pub(super) struct Operand {
    pub(super) ptr: u64,
    pub(super) ld: usize,
    pub(super) trans: bool,
    pub(super) dtype: DType,
}

/// Row-major `C (m×n) = α·op(A)·op(B) + β·C`, `op(A)` m×k, `op(B)` k×n, f32
/// accumulation. cuBLAS is column-major, so it computes
/// `Cᵀ = op(B)ᵀ·op(A)ᵀ`: a row-major matrix is its column-major transpose.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
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
    let h = gpu.blas()?;
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

/// An f32 factor split into `hi = T(a)` and `lo = T(a − hi)`, zero padded
/// to `rows_pad × ld` (see `split_impl` in the kernel file), in scratch.
struct Split<'w, T> {
    hi: Region<'w, T>,
    lo: Region<'w, T>,
    ld: usize,
}

/// Splits `src` (rows×cols, or cols×rows read transposed when `trans`),
/// scaled per column by `cs`, into padded hi/lo halves in `T`.
#[allow(clippy::too_many_arguments)]
fn split<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    src: In<'_, f32>,
    trans: bool,
    cs: Option<&CudaView<'_, f32>>,
    (rows, cols): (usize, usize),
    rows_pad: usize,
    ld: usize,
) -> Result<Split<'w, T>> {
    let len = rows_pad * ld;
    // Both halves are written in full, padding included.
    let mut hi = ws.take::<T>(len)?;
    let mut lo = ws.take::<T>(len)?;
    let (f, name) = kernel::<T>(gpu, "lowrank_split")?;
    let cfg = grid(gpu.persistent_grid(8, blocks_for(len as u64, THREADS) as u64), THREADS, 0);
    let (tr, r32, c32, rp32, ld32) = (trans as i32, rows as i32, cols as i32, rows_pad as i32, ld as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(src).arg(&tr);
    b.arg_or_null(cs);
    b.arg(&mut hi).arg(&mut lo).arg(&r32).arg(&c32).arg(&rp32).arg(&ld32);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok(Split { hi, lo, ld })
}

/// Splits of a reduction of length `len` (x's K, dy's N or M) so a grid of
/// `other_blocks` blocks per split covers `TC_WAVES` waves, while the f32
/// partials (`r` per row and split) stay within a quarter of the bytes of
/// the operand read (`len` elements of T per row, read `z` times).
fn tc_splits(gpu: &Gpu, len: usize, steps: usize, other_blocks: usize, r: usize, z: usize, size: usize) -> usize {
    let target = gpu.info().sm_count as usize * TC_BLOCKS_PER_SM * TC_WAVES;
    let want = target.div_ceil(other_blocks.max(1));
    let cap = (len * size * z / (16 * r.max(1))).max(1);
    want.min(cap).min(steps).max(1)
}

/// `part[split] = x·Aᵀ` over K-splits on the tensor cores, for 16-bit `x`
/// (M×K, row stride `ldx`) and `A` already split; also the backward's
/// `gB = dy·(B⊙v)` with dy as x. Returns (partials, splits).
fn shrink_tc<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    (m, k, r): (usize, usize, usize),
    x: &CudaView<'_, T>,
    ldx: usize,
    a: &Split<'_, T>,
) -> Result<(Region<'w, f32>, usize)> {
    let rb = rank_block(r);
    let z = r.div_ceil(rb);
    let xblocks = m.div_ceil(16 * TC_WARPS);
    let steps = k.div_ceil(TC_KT);
    let want = tc_splits(gpu, k, steps, xblocks * z, r, z, T::DTYPE.size());
    let per_split = steps.div_ceil(want) * TC_KT;
    let splits = k.div_ceil(per_split);
    let mut part = ws.take::<f32>(splits * m * r)?;
    let (f, name) = kernel::<T>(gpu, &format!("lowrank_shrink_r{rb}"))?;
    let cfg = LaunchConfig {
        grid_dim: (xblocks as u32, splits as u32, z as u32),
        block_dim: ((TC_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ldx32, lda32, m32, k32, r32, ps) = (ldx as i32, a.ld as i32, m as i32, k as i32, r as i32, per_split as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&ldx32).arg(&a.hi).arg(&a.lo).arg(&lda32);
    b.arg(&mut part).arg(&m32).arg(&k32).arg(&r32).arg(&ps);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok((part, splits))
}

/// `part = x·Aᵀ` per K-split for `x` M×K with row stride `ldx`: returns
/// (partials, splits). 16-bit x: tensor cores (`shrink_tc`); f32 x: the
/// CUDA-core kernel, enough splits that the grid covers the device.
fn shrink<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    s: LinearShape,
    x: &CudaView<'_, T>,
    ldx: usize,
    a: &CudaView<'_, f32>,
) -> Result<(Region<'w, f32>, usize)> {
    let LinearShape { m, k, r, .. } = s;
    if T::DTYPE != DType::F32 {
        let rows_pad = r.div_ceil(rank_block(r)) * rank_block(r);
        let a = split::<T>(gpu, ws, In::View(a), false, None, (r, k), rows_pad, k.div_ceil(TC_KT) * TC_KT)?;
        return shrink_tc(gpu, ws, (m, k, r), x, ldx, &a);
    }
    let base = m.div_ceil(SH_ROWS) * r.div_ceil(SH_RANKS);
    let want = (gpu.info().sm_count as usize * BLOCKS_PER_SM).div_ceil(base).max(1);
    let max_splits = k.div_ceil(4 * SH_KT).max(1);
    let per_split = k.div_ceil(want.min(max_splits)).div_ceil(SH_KT) * SH_KT;
    let splits = k.div_ceil(per_split);
    let mut part = ws.take::<f32>(splits * m * r)?;
    let (f, name) = kernel::<T>(gpu, "lowrank_shrink")?;
    let cfg = LaunchConfig {
        grid_dim: (m.div_ceil(SH_ROWS) as u32, splits as u32, r.div_ceil(SH_RANKS) as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ldx32, m32, k32, r32, ps) = (ldx as i32, m as i32, k as i32, r as i32, per_split as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&ldx32).arg(a).arg(&mut part).arg(&m32).arg(&k32).arg(&r32).arg(&ps);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok((part, splits))
}

/// `ppart[stripe] = dyᵀ·(t⊙u)` over row stripes on the tensor cores, for
/// 16-bit `dy` (M×N, row stride `lddy`) and `t⊙u` already split. Returns
/// (partials, stripes).
fn dy_p_tc<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    (m, n, r): (usize, usize, usize),
    dy: &CudaView<'_, T>,
    lddy: usize,
    tu: &Split<'_, T>,
) -> Result<(Region<'w, f32>, usize)> {
    let rb = rank_block(r);
    let z = r.div_ceil(rb);
    let warp_cols = 16 * (64 / rb);
    let xblocks = n.div_ceil(TC_WARPS * warp_cols);
    let tiles = m.div_ceil(16);
    let want = tc_splits(gpu, m, tiles, xblocks * z, r, z, T::DTYPE.size());
    let rows_per_block = tiles.div_ceil(want) * 16;
    let stripes = m.div_ceil(rows_per_block);
    let mut ppart = ws.take::<f32>(stripes * r * n)?;
    let (f, name) = kernel::<T>(gpu, &format!("lowrank_dy_p_r{rb}"))?;
    let cfg = LaunchConfig {
        grid_dim: (xblocks as u32, stripes as u32, z as u32),
        block_dim: ((TC_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ld32, ldt32, m32, n32, r32, rpb) =
        (lddy as i32, tu.ld as i32, m as i32, n as i32, r as i32, rows_per_block as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy).arg(&ld32).arg(&tu.hi).arg(&tu.lo).arg(&ldt32);
    b.arg(&mut ppart).arg(&m32).arg(&n32).arg(&r32).arg(&rpb);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok((ppart, stripes))
}

/// Sums the shrink partials into `t` (if given) and, with `tx`, writes
/// `t' = [s·t⊙u | bias column | 0…]` (`ld` wide, row stride `tx_ld`).
#[allow(clippy::too_many_arguments)]
fn shrink_finish<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    part: &Region<'_, f32>,
    splits: usize,
    ad: &AdapterView<'_>,
    t: Option<Out<'_, '_, f32>>,
    tx: Option<Out<'_, '_, T>>,
    (ld, tx_ld): (usize, usize),
    bias_col: bool,
) -> Result<()> {
    let (f, name) = kernel::<T>(gpu, "lowrank_shrink_finish")?;
    let total = (s.m * ld) as u64;
    let cfg = grid(gpu.persistent_grid(8, blocks_for(total, THREADS) as u64), THREADS, 0);
    let (splits, ld32, txld32, bias32, m32, r32) =
        (splits as i32, ld as i32, tx_ld as i32, bias_col as i32, s.m as i32, s.r as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(part).arg(&splits);
    b.arg_or_null(ad.u.as_ref());
    b.arg(&ad.scale);
    b.arg_or_null(t);
    b.arg_or_null(tx);
    b.arg(&ld32).arg(&txld32).arg(&bias32).arg(&m32).arg(&r32);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok(())
}

/// `B' = [B⊙v | bias | 0…]` in T, N×ld.
fn prep_expand<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    s: LinearShape,
    ad: &AdapterView<'_>,
    bias: Option<&CudaView<'_, T>>,
    ld: usize,
) -> Result<Region<'w, T>> {
    let mut bx = ws.take::<T>(s.n * ld)?;
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
    tx: &Region<'_, T>,
    bx: &Region<'_, T>,
    ld: usize,
    y: &mut CudaViewMut<'_, T>,
    beta: f32,
) -> Result<()> {
    let h = gpu.blas()?;
    let (tp, bp) = (tx.ptr(), bx.ptr());
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
    let h = gpu.blas()?;
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
    ws: &Scratch<'_>,
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
    let mut work = ws.take::<f32>((blocks + 1) * m * r)?;
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

/// How [`forward_with`] computes a forward with an adapter at small M.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DecodePath {
    /// M ≤ [`DECODE_FUSED_MAX_M`]: one fused launch reading W once
    /// (`lowrank_decode_fused`); 16 < M ≤ [`DECODE_MAX_M`]: the base GEMM,
    /// then the single-launch add. The default.
    #[default]
    Fused,
    /// M ≤ [`DECODE_MAX_M`]: the cuBLAS base GEMM, then the single-launch
    /// add (`lowrank_decode`): two launches. Kept for the bench's
    /// comparison.
    BaseThenAdd,
}

/// `y = x·Wᵀ + bias + s·(((x·Aᵀ)⊙u)·Bᵀ)⊙v` for M ≤ 16 in one cooperative
/// launch (design in kernels/lowrank.cu), saving `t` when asked.
#[allow(clippy::too_many_arguments)]
fn decode_fused<T: Element>(
    gpu: &Gpu,
    ws: &Scratch<'_>,
    s: LinearShape,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    ad: &AdapterView<'_>,
    bias: Option<&CudaView<'_, T>>,
    y: &mut CudaViewMut<'_, T>,
    t: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let LinearShape { m, k, n, r } = s;
    debug_assert!(m <= DEC_MAX_M);
    let (f, name) = kernel::<T>(gpu, "lowrank_decode_fused")?;
    let smem = (DEC_WARPS * DEC_MAX_M * DEC_COLS + m * r) * 4;
    // Every block must be resident (cooperative launch): as many as the
    // occupancy query allows, never more than the 16-column tiles.
    let sms = (gpu.info().sm_count as usize).max(1);
    let per_sm = gpu.blocks_per_sm(&f, &name, DEC_THREADS, smem)?;
    let blocks = n.div_ceil(DEC_COLS).min(per_sm.max(1) * sms).max(1);
    // Shrink K-slices (multiples of DEC_SLICE): as many as keep the
    // partials a block sums at the sync within DEC_PARTIALS.
    let max_slices = k.div_ceil(DEC_SLICE);
    let slices = (DEC_PARTIALS / (m * r)).clamp(1, max_slices);
    let k_slice = k.div_ceil(slices).div_ceil(DEC_SLICE) * DEC_SLICE;
    let slices = k.div_ceil(k_slice);
    // Every slice's partials are written before the grid sync that
    // precedes their first read.
    let mut part = ws.take::<f32>(slices * m * r)?;
    let cfg = grid(blocks as u32, DEC_THREADS, smem as u32);
    let (m32, k32, n32, r32, ks32, sl32) = (m as i32, k as i32, n as i32, r as i32, k_slice as i32, slices as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(w).arg(&ad.a).arg(&ad.b);
    b.arg_or_null(ad.u.as_ref());
    b.arg_or_null(ad.v.as_ref());
    b.arg_or_null(bias);
    b.arg(&ad.scale).arg(y);
    b.arg_or_null(t);
    b.arg(&mut part).arg(&m32).arg(&k32).arg(&n32).arg(&r32).arg(&ks32).arg(&sl32);
    // SAFETY: argument order and types match lowrank_decode_fused_T; the
    // lengths were checked by `forward`; the grid fits the occupancy query.
    unsafe { b.launch_cooperative(cfg) }.map_err(launch_err(&name))?;
    Ok(())
}

/// The low-rank term through the prefill path: shrink, finish, prep, and
/// the expand GEMM onto `y` with `beta` (0: y = term (+ bias); 1: y +=).
#[allow(clippy::too_many_arguments)]
fn prefill_expand<T: Element>(
    gpu: &Gpu,
    ws: &Scratch<'_>,
    s: LinearShape,
    x: &CudaView<'_, T>,
    ad: &AdapterView<'_>,
    bias: Option<&CudaView<'_, T>>,
    y: &mut CudaViewMut<'_, T>,
    t: Option<&mut CudaViewMut<'_, f32>>,
    beta: f32,
) -> Result<()> {
    let ld = padded_rank(s.r);
    let (part, splits) = shrink(gpu, ws, s, x, s.k, &ad.a)?;
    // t' is written in full (`ld` columns, padding included) by the finish.
    let mut tx = ws.take::<T>(s.m * ld)?;
    let t = t.map(Out::View);
    shrink_finish(gpu, s, &part, splits, ad, t, Some(Out::Region(&mut tx)), (ld, ld), bias.is_some())?;
    let bx = prep_expand(gpu, ws, s, ad, bias, ld)?;
    expand_gemm(gpu, s, &tx, &bx, ld, y, beta)
}

/// Engine form of the forward over caller views: `y = x·Wᵀ (+ bias) (+ the
/// low-rank term)`, `t = x·Aᵀ` saved when given. See
/// [`LowRankOps::lowrank_forward`]. Decode shapes take the fused kernel
/// ([`DecodePath::Fused`]).
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
    forward_with(gpu, DecodePath::Fused, s, x, w, bias, adapter, y, t)
}

/// [`forward`] with the decode path chosen by the caller (the bench times
/// both; the results agree within the forward's error bound).
#[allow(clippy::too_many_arguments)]
pub fn forward_with<T: Element>(
    gpu: &Gpu,
    path: DecodePath,
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
    let ws = gpu.scratch()?;
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
        Some(ad) if s.m <= DECODE_FUSED_MAX_M && path == DecodePath::Fused => {
            decode_fused(gpu, &ws, s, x, w, ad, bias, y, t)
        }
        Some(ad) if s.m <= DECODE_MAX_M => {
            base_gemm(gpu, s, x, w, y, 0.0)?;
            decode(gpu, &ws, s, x, ad, bias, y, t)
        }
        Some(ad) => {
            prefill_expand(gpu, &ws, s, x, ad, bias, y, t, 0.0)?;
            base_gemm(gpu, s, x, w, y, 1.0)
        }
    }
}

/// `t = x·Aᵀ` (M×r, f32) alone, on `gpu`'s stream: the shrink kernel and
/// its fixed-order finish, deterministic. For engines that apply the
/// expand themselves; the bench times it as a bandwidth row.
pub fn project_down<T: Element>(
    gpu: &Gpu,
    s: LinearShape,
    x: &CudaView<'_, T>,
    a: &CudaView<'_, f32>,
    t: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    const OP: &str = "project_down";
    let LinearShape { m, k, r, .. } = s;
    if m == 0 || k == 0 || r == 0 || r > crate::lowrank::MAX_RANK || [m, k].iter().any(|&d| d > i32::MAX as usize) {
        return Err(Error::invalid(
            OP,
            format!("{s}: M, K must be in 1..2^31 and r in 1..={}", crate::lowrank::MAX_RANK),
        ));
    }
    for (name, len, want) in [("x", x.len(), m * k), ("A", a.len(), r * k), ("t", t.len(), m * r)] {
        if len != want {
            return Err(Error::shape(OP, name, format!("{want} elements"), format!("{len} elements")));
        }
    }
    let ws = gpu.scratch()?;
    let (part, splits) = shrink(gpu, &ws, s, x, k, a)?;
    let ad = AdapterView { a: a.slice(..), b: a.slice(0..0), u: None, v: None, scale: 1.0 };
    shrink_finish::<T>(gpu, s, &part, splits, &ad, Some(Out::View(t)), None, (r, r), false)
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
    let ws = gpu.scratch()?;
    if s.m <= DECODE_MAX_M {
        decode(gpu, &ws, s, x, adapter, None, y, None)
    } else {
        prefill_expand(gpu, &ws, s, x, adapter, None, y, None, 1.0)
    }
}

/// Partials of `gB = (dy⊙v)·B` and `P = dyᵀ·(t⊙u)` from f32 `dy` in ONE
/// CUDA-core pass (`lowrank_backward_dy_f32`): (gpart, parts, ppart, parts).
type DyProducts<'w> = (Option<Region<'w, f32>>, usize, Option<Region<'w, f32>>, usize);

#[allow(clippy::too_many_arguments)]
fn dy_products_f32<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    s: LinearShape,
    (dy, lddy): (&CudaView<'_, T>, usize),
    t: Option<In<'_, f32>>,
    ad: &AdapterView<'_>,
    want_g: bool,
    want_p: bool,
) -> Result<DyProducts<'w>> {
    let LinearShape { m, n, r, .. } = s;
    let gx = n.div_ceil(BD_COLS_PER_BLOCK);
    let gz = r.div_ceil(BD_RANKS);
    let want = (gpu.info().sm_count as usize * BLOCKS_PER_SM).div_ceil(gx * gz).clamp(1, m.div_ceil(BD_ROWS));
    let rows_per_block = m.div_ceil(want).div_ceil(BD_ROWS) * BD_ROWS;
    let gy = m.div_ceil(rows_per_block);
    let mut gpart = if want_g { Some(ws.take::<f32>(gx * m * r)?) } else { None };
    let mut ppart = if want_p { Some(ws.take::<f32>(gy * r * n)?) } else { None };
    let (f, name) = kernel::<T>(gpu, "lowrank_backward_dy")?;
    let cfg =
        LaunchConfig { grid_dim: (gx as u32, gy as u32, gz as u32), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (ld32, m32, n32, r32, rpb) = (lddy as i32, m as i32, n as i32, r as i32, rows_per_block as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy).arg(&ld32);
    b.arg_or_null(t);
    b.arg(&ad.b);
    b.arg_or_null(ad.u.as_ref());
    b.arg_or_null(ad.v.as_ref());
    b.arg_or_null(gpart.as_mut());
    b.arg_or_null(ppart.as_mut());
    b.arg(&m32).arg(&n32).arg(&r32).arg(&rpb);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok((gpart, gx, ppart, gy))
}

/// The same partials from 16-bit `dy` (row stride `lddy`) on the tensor
/// cores: `gB` by the shrink kernel with dy as x and `(B⊙v)ᵀ` as A, `P` by
/// `lowrank_dy_p`; the f32 factors split into hi/lo halves first.
#[allow(clippy::too_many_arguments)]
fn dy_products_tc<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    s: LinearShape,
    (dy, lddy): (&CudaView<'_, T>, usize),
    t: Option<In<'_, f32>>,
    ad: &AdapterView<'_>,
    want_g: bool,
    want_p: bool,
) -> Result<DyProducts<'w>> {
    let LinearShape { m, n, r, .. } = s;
    let rb = rank_block(r);
    let r_pad = r.div_ceil(rb) * rb;
    let (mut gpart, mut gparts, mut ppart, mut pparts) = (None, 0, None, 0);
    if want_g {
        let bv = split::<T>(gpu, ws, In::View(&ad.b), true, ad.v.as_ref(), (r, n), r_pad, n.div_ceil(TC_KT) * TC_KT)?;
        let (part, parts) = shrink_tc(gpu, ws, (m, n, r), dy, lddy, &bv)?;
        (gpart, gparts) = (Some(part), parts);
    }
    if want_p {
        let t = t.ok_or_else(|| Error::invalid(BWD_OP, "internal: P needs t"))?;
        let tu = split::<T>(gpu, ws, t, false, ad.u.as_ref(), (m, r), m.div_ceil(16) * 16, r_pad)?;
        let (part, parts) = dy_p_tc(gpu, ws, (m, n, r), dy, lddy, &tu)?;
        (ppart, pparts) = (Some(part), parts);
    }
    Ok((gpart, gparts, ppart, pparts))
}

const BWD_OP: &str = "lowrank_backward";

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
    s.check_backward(x.len(), w.len(), lens.as_ref(), t.map(|t| t.len()), dy.len(), &grads.lens())?;
    let GradViews { dx, dw, dbias, da, db, du, dv } = grads;
    let LinearShape { m, k, n, r } = s;
    let d = T::DTYPE;
    let h = gpu.blas()?;
    let ws = gpu.scratch()?;
    base_grads(gpu, &ws, s, (x, k), (dy, n), dw, dbias)?;
    let ds = match adapter {
        Some(ad) => {
            let ag = AdapterGrads { da, db, du, dv };
            adapter_grads(gpu, &ws, s, (x, k), (dy, n), ad, t, dx.is_some(), ag)?
        }
        None => None,
    };
    if let Some(mut dx) = dx {
        // As in the forward: the rank-r term dS·A (A rounded to T for the
        // tensor cores) is written into dx first, and the big GEMM dy·W
        // accumulates onto it with β = 1 in its epilogue, instead of a
        // second pass reading and rewriting dx after it.
        let mut beta = 0.0;
        if let (Some(ad), Some(ds)) = (adapter, ds.as_ref()) {
            let mut a_t = ws.take::<T>(r * k)?;
            let (f, name) = kernel::<T>(gpu, "lowrank_cast")?;
            let cfg = grid(gpu.persistent_grid(8, blocks_for((r * k) as u64, THREADS) as u64), THREADS, 0);
            let len = r * k;
            unsafe { gpu.stream().launch_builder(&f).arg(&ad.a).arg(&mut a_t).arg(&len).launch(cfg) }
                .map_err(launch_err(&name))?;
            let (sp, ap) = (ds.ptr(), a_t.ptr());
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

/// `dbias += dyᵀ·1` and `dW += dyᵀ·x` on cuBLAS (deterministic), for `x`
/// and `dy` with row strides `ldx`, `lddy`.
fn base_grads<T: Element>(
    gpu: &Gpu,
    ws: &Scratch<'_>,
    s: LinearShape,
    (x, ldx): (&CudaView<'_, T>, usize),
    (dy, lddy): (&CudaView<'_, T>, usize),
    dw: Option<CudaViewMut<'_, f32>>,
    dbias: Option<CudaViewMut<'_, f32>>,
) -> Result<()> {
    let LinearShape { m, k, n, .. } = s;
    let d = T::DTYPE;
    let h = gpu.blas()?;
    if let Some(mut dbias) = dbias {
        let mut ones = ws.take::<T>(m)?;
        let (f, name) = kernel::<T>(gpu, "lowrank_fill_one")?;
        let cfg = grid(blocks_for(m as u64, THREADS), THREADS, 0);
        unsafe { gpu.stream().launch_builder(&f).arg(&mut ones).arg(&m).launch(cfg) }.map_err(launch_err(&name))?;
        let (gp, _g1) = rd(gpu, dy);
        let op = ones.ptr();
        let (cp, _g3) = wr(gpu, &mut dbias);
        let dyt = Operand { ptr: gp, ld: lddy, trans: true, dtype: d };
        gemm(&h, (n, 1, m), dyt, Operand { ptr: op, ld: 1, trans: false, dtype: d }, cp, 1, DType::F32, 1.0, 1.0)?;
    }
    if let Some(mut dw) = dw {
        let (gp, _g1) = rd(gpu, dy);
        let (xp, _g2) = rd(gpu, x);
        let (cp, _g3) = wr(gpu, &mut dw);
        let dyt = Operand { ptr: gp, ld: lddy, trans: true, dtype: d };
        gemm(&h, (n, k, m), dyt, Operand { ptr: xp, ld: ldx, trans: false, dtype: d }, cp, k, DType::F32, 1.0, 1.0)?;
    }
    Ok(())
}

/// The adapter's gradient outputs (accumulated; `None`: frozen).
struct AdapterGrads<'a> {
    da: Option<CudaViewMut<'a, f32>>,
    db: Option<CudaViewMut<'a, f32>>,
    du: Option<CudaViewMut<'a, f32>>,
    dv: Option<CudaViewMut<'a, f32>>,
}

/// The adapter's part of the backward: the dy pass (gB, P), then dS (in T,
/// M×r, returned when `want_ds` or dA needs it), du, dB, dv and
/// `dA += dSᵀ·x`. `x` and `dy` have row strides `ldx`, `lddy` (a packed
/// layout's, or their widths); `t` None: recomputed when needed.
#[allow(clippy::too_many_arguments)]
fn adapter_grads<'w, T: Element>(
    gpu: &Gpu,
    ws: &'w Scratch<'_>,
    s: LinearShape,
    (x, ldx): (&CudaView<'_, T>, usize),
    (dy, lddy): (&CudaView<'_, T>, usize),
    ad: &AdapterView<'_>,
    t: Option<&CudaView<'_, f32>>,
    want_dx: bool,
    grads: AdapterGrads<'_>,
) -> Result<Option<Region<'w, T>>> {
    let AdapterGrads { da, db, du, dv } = grads;
    let LinearShape { m, k, n, r } = s;
    let d = T::DTYPE;
    let want_ds = want_dx || da.is_some();
    let want_g = want_ds || du.is_some();
    let want_p = db.is_some() || dv.is_some();
    if !want_g && !want_p {
        return Ok(None);
    }
    // t: the forward's, or recomputed; only du, dB and dv read it.
    let need_t = du.is_some() || want_p;
    let mut recomputed = None;
    if t.is_none() && need_t {
        let (part, splits) = shrink(gpu, ws, s, x, ldx, &ad.a)?;
        let mut tt = ws.take::<f32>(m * r)?;
        shrink_finish::<T>(gpu, s, &part, splits, ad, Some(Out::Region(&mut tt)), None, (r, r), false)?;
        recomputed = Some(tt);
    }
    let t_arg = match (t, recomputed.as_ref()) {
        _ if !need_t => None,
        (Some(t), _) => Some(In::View(t)),
        (None, tt) => tt.map(In::Region),
    };
    let (gpart, gparts, ppart, pparts) = if d == DType::F32 {
        dy_products_f32(gpu, ws, s, (dy, lddy), t_arg, ad, want_g, want_p)?
    } else {
        dy_products_tc(gpu, ws, s, (dy, lddy), t_arg, ad, want_g, want_p)?
    };
    let row_blocks = m.div_ceil(ROWS_PER_BLOCK);
    let mut dupart = if du.is_some() { Some(ws.take::<f32>(row_blocks * r)?) } else { None };
    let mut ds: Option<Region<'w, T>> = None;
    if let Some(gpart) = gpart.as_ref() {
        if want_ds {
            ds = Some(ws.take::<T>(m * r)?);
        }
        let (f, name) = kernel::<T>(gpu, "lowrank_backward_rows")?;
        let cfg = grid(row_blocks as u32, THREADS, 0);
        let (np, m32, r32, rpb) = (gparts as i32, m as i32, r as i32, ROWS_PER_BLOCK as i32);
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(gpart).arg(&np);
        b.arg_or_null(t_arg);
        b.arg_or_null(ad.u.as_ref());
        b.arg(&ad.scale);
        b.arg_or_null(ds.as_mut());
        b.arg_or_null(dupart.as_mut());
        b.arg(&m32).arg(&r32).arg(&rpb);
        unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    }
    if want_p || du.is_some() {
        let f = gpu.function(kernels::LOWRANK, "lowrank_backward_cols")?;
        let cfg = grid(n.div_ceil(COLS_PER_BLOCK) as u32, THREADS, 0);
        let (np, nd, n32, r32) = (pparts as i32, row_blocks as i32, n as i32, r as i32);
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
        let h = gpu.blas()?;
        let sp = ds.ptr();
        let (xp, _g2) = rd(gpu, x);
        let (cp, _g3) = wr(gpu, &mut da);
        let dst = Operand { ptr: sp, ld: r, trans: true, dtype: d };
        gemm(&h, (r, k, m), dst, Operand { ptr: xp, ld: ldx, trans: false, dtype: d }, cp, k, DType::F32, 1.0, 1.0)?;
    }
    Ok(ds)
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

/// The packed layout on the GPU: the same kernels and one cuBLAS GEMM each
/// way (see [`crate::lowrank::packed`]).
impl PackedOps for Gpu {
    fn pack_rows<T: Element>(
        &self,
        rows: usize,
        cols: usize,
        ld: usize,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        const OP: &str = "pack_rows";
        if ld < cols || ld > i32::MAX as usize || rows > i32::MAX as usize {
            return Err(Error::invalid(OP, format!("ld = {ld}, cols = {cols}, rows = {rows}: need cols <= ld < 2^31")));
        }
        if src.len() != rows * cols {
            return Err(Error::shape(OP, "src", format!("{rows}x{cols}"), format!("{} elements", src.len())));
        }
        if dst.len() != rows * ld {
            return Err(Error::shape(OP, "dst", format!("{rows}x{ld}"), format!("{} elements", dst.len())));
        }
        pack_rows_into(self, In::View(&src.as_view()), &mut dst.as_view_mut(), (rows, cols, cols, ld))
    }

    fn pack_weight<T: Element>(
        &self,
        layout: &PackedLayout,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        adapter: Adapter<'_, Gpu>,
        w_packed: &mut CudaSlice<T>,
    ) -> Result<()> {
        let LinearShape { k, n, .. } = layout.shape;
        if w.len() != n * k {
            return Err(Error::shape(packed::PACK, "W", format!("{n}x{k}"), format!("{} elements", w.len())));
        }
        pack_weight_launch(self, layout, Some(w), bias, adapter, w_packed)
    }

    fn pack_adapter<T: Element>(
        &self,
        layout: &PackedLayout,
        bias: Option<&CudaSlice<T>>,
        adapter: Adapter<'_, Gpu>,
        w_packed: &mut CudaSlice<T>,
    ) -> Result<()> {
        pack_weight_launch(self, layout, None, bias, adapter, w_packed)
    }

    fn packed_forward<T: Element>(
        &self,
        layout: &PackedLayout,
        x_packed: &mut CudaSlice<T>,
        w_packed: &CudaSlice<T>,
        adapter: Adapter<'_, Gpu>,
        y: &mut CudaSlice<T>,
        t: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let lens = AdapterLens::of(&adapter);
        packed::check_forward(layout, x_packed.len(), w_packed.len(), &lens, y.len(), t.as_ref().map(|t| t.len()))?;
        let s = layout.shape;
        let (p, ld) = (layout.pad(), layout.x_ld());
        let ad = adapter_view(&adapter);
        let ws = self.scratch()?;
        let (part, splits) = shrink(self, &ws, s, &x_packed.as_view(), ld, &ad.a)?;
        let mut t = t.map(|t| t.as_view_mut());
        let mut spare = x_packed.slice_mut(s.k..);
        let (t, spare) = (t.as_mut().map(Out::View), Some(Out::View(&mut spare)));
        shrink_finish(self, s, &part, splits, &ad, t, spare, (p, ld), layout.bias)?;
        let h = self.blas()?;
        let (xp, _g1) = rd(self, x_packed);
        let (wp, _g2) = rd(self, w_packed);
        let (yp, _g3) = wr(self, y);
        let d = T::DTYPE;
        let xo = Operand { ptr: xp, ld, trans: false, dtype: d };
        let wo = Operand { ptr: wp, ld, trans: true, dtype: d };
        gemm(&h, (s.m, s.n, ld), xo, wo, yp, s.n, d, 1.0, 0.0)
    }

    fn packed_backward<T: Element>(
        &self,
        layout: &PackedLayout,
        x_packed: &CudaSlice<T>,
        w_packed: &CudaSlice<T>,
        adapter: Adapter<'_, Gpu>,
        t: Option<&CudaSlice<f32>>,
        dy_packed: &mut CudaSlice<T>,
        grads: Grads<'_, Gpu, T>,
    ) -> Result<()> {
        let lens = AdapterLens::of(&adapter);
        let glens = GradLens::of(&grads);
        let (xl, wl, dyl) = (x_packed.len(), w_packed.len(), dy_packed.len());
        packed::check_backward(layout, xl, wl, &lens, t.map(|t| t.len()), dyl, &glens)?;
        let s = layout.shape;
        let LinearShape { m, k, n, r } = s;
        let (p, ld, dld) = (layout.pad(), layout.x_ld(), layout.dy_ld());
        let ad = adapter_view(&adapter);
        let Grads { dx, dw, dbias, da, db, du, dv } = grads;
        let t = t.map(|t| t.as_view());
        let ws = self.scratch()?;
        let ds = {
            let (x, dy) = (x_packed.as_view(), dy_packed.as_view());
            let (dw, dbias) = (dw.map(|v| v.as_view_mut()), dbias.map(|v| v.as_view_mut()));
            base_grads(self, &ws, s, (&x, ld), (&dy, dld), dw, dbias)?;
            let ag = AdapterGrads {
                da: da.map(|v| v.as_view_mut()),
                db: db.map(|v| v.as_view_mut()),
                du: du.map(|v| v.as_view_mut()),
                dv: dv.map(|v| v.as_view_mut()),
            };
            adapter_grads(self, &ws, s, (&x, ld), (&dy, dld), &ad, t.as_ref(), dx.is_some(), ag)?
        };
        if let (Some(dx), Some(ds)) = (dx, ds) {
            // dS into dy's spare columns (the padding zeroed), then
            // dx = [dy | dS]·[W ; A] as ONE GEMM over N + p.
            pack_rows_into(self, In::Region(&ds), &mut dy_packed.slice_mut(n..), (m, r, p, dld))?;
            let h = self.blas()?;
            let (gp, _g1) = rd(self, dy_packed);
            let (wp, _g2) = rd(self, w_packed);
            let (cp, _g3) = wr(self, dx);
            let d = T::DTYPE;
            let go = Operand { ptr: gp, ld: dld, trans: false, dtype: d };
            let wo = Operand { ptr: wp, ld, trans: false, dtype: d };
            gemm(&h, (m, k, dld), go, wo, cp, k, d, 1.0, 0.0)?;
        }
        Ok(())
    }
}

/// `dst[row][c] = c < cols ? src[row][c] : 0` for `c < width`, rows of
/// `dst` `ld` apart (`lowrank_pack_rows`).
fn pack_rows_into<T: Element>(
    gpu: &Gpu,
    src: In<'_, T>,
    dst: &mut CudaViewMut<'_, T>,
    (rows, cols, width, ld): (usize, usize, usize, usize),
) -> Result<()> {
    let (f, name) = kernel::<T>(gpu, "lowrank_pack_rows")?;
    let cfg = grid(gpu.persistent_grid(8, blocks_for((rows * width) as u64, THREADS) as u64), THREADS, 0);
    let (r32, c32, w32, ld32) = (rows as i32, cols as i32, width as i32, ld as i32);
    unsafe { gpu.stream().launch_builder(&f).arg(src).arg(dst).arg(&r32).arg(&c32).arg(&w32).arg(&ld32).launch(cfg) }
        .map_err(launch_err(&name))?;
    Ok(())
}

/// `lowrank_pack_weight`: the adapter's regions of `w_packed`, and `W`'s
/// when given.
fn pack_weight_launch<T: Element>(
    gpu: &Gpu,
    layout: &PackedLayout,
    w: Option<&CudaSlice<T>>,
    bias: Option<&CudaSlice<T>>,
    adapter: Adapter<'_, Gpu>,
    w_packed: &mut CudaSlice<T>,
) -> Result<()> {
    layout.check_adapter(packed::PACK, &AdapterLens::of(&adapter), bias.map(|b| b.len()))?;
    layout.check_buf(packed::PACK, "w", w_packed.len(), layout.w_len())?;
    let LinearShape { k, n, r, .. } = layout.shape;
    let p = layout.pad();
    let total = n * p + p * layout.x_ld() + w.map_or(0, |_| n * k);
    let (f, name) = kernel::<T>(gpu, "lowrank_pack_weight")?;
    let cfg = grid(gpu.persistent_grid(8, blocks_for(total as u64, THREADS) as u64), THREADS, 0);
    let (n32, k32, r32, p32) = (n as i32, k as i32, r as i32, p as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg_or_null(w);
    b.arg_or_null(bias);
    b.arg(adapter.a).arg(adapter.b);
    b.arg_or_null(adapter.v);
    b.arg(w_packed).arg(&n32).arg(&k32).arg(&r32).arg(&p32);
    unsafe { b.launch(cfg) }.map_err(launch_err(&name))?;
    Ok(())
}
