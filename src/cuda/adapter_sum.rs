//! Launch wrappers for `kernels/adapter_sum.cu`.
//!
//! [`merge`] takes caller-owned views and runs on the [`Gpu`]'s stream, for
//! engines; the [`AdapterSumOps`] impl calls it on owned buffers. It picks
//! one of two paths, each also callable directly (the bench times both):
//! [`merge_streaming`] (the kernel: any dtype and rank, f32 factors) and
//! [`merge_tensor_cores`] (bf16 W only: cuBLAS on bf16-rounded factors).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtrMut, PushKernelArg};

use super::lowrank::{gemm, Operand};
use super::workspace::Region;
use super::{blocks_for, grid, kernels, Gpu};
use crate::adapter_sum::{check_merge, AdapterSumOps, MergeShape};
use crate::dtype::{DType, Element};
use crate::{Error, Result};

/// Total rank from which a bf16 W is merged on tensor cores (cuBLAS, factors
/// rounded to bf16) rather than by the streaming kernel, whose f32 FMAs
/// stop hiding under W's memory traffic above rank ~32 (estimate: rank 64 is
/// ~36 µs of FMA at peak for a 4096² W whose copy takes ~22–35 µs; see
/// kernels/adapter_sum.cu). Rounding the factors to bf16 costs the update
/// at most ~2^-7 relative, below one rounding of W itself while the update
/// is small next to W (PEFT's bf16 merge computes B·A in bf16 outright).
pub const TENSOR_CORE_MIN_RANK: usize = 64;

/// Threads per block of the streaming kernel.
const THREADS: u32 = crate::abi::MERGE_THREADS;

/// A block's tile of W, (rows, cols), for elements of `elem` bytes: the
/// kernel's geometry, defined once in kernels/abi.h (`MERGE_TILE_M/N`).
fn tile(elem: usize) -> (u64, u64) {
    let (m, n) = match elem {
        4 => (crate::abi::MERGE_F32_TILE_M, crate::abi::MERGE_F32_TILE_N),
        _ => (crate::abi::MERGE_HALF_TILE_M, crate::abi::MERGE_HALF_TILE_N),
    };
    (m as u64, n as u64)
}

/// `w += alpha·leftᵀ·right` on caller-owned views (W rows×cols, left
/// rank×rows, right rank×cols, all row-major): [`merge_tensor_cores`] for a
/// bf16 W at total rank ≥ [`TENSOR_CORE_MIN_RANK`], else [`merge_streaming`].
pub fn merge<T: Element>(
    gpu: &Gpu,
    w: &mut CudaViewMut<'_, T>,
    shape: MergeShape,
    left: &CudaView<'_, f32>,
    right: &CudaView<'_, f32>,
    alpha: f32,
) -> Result<()> {
    if T::DTYPE == DType::BF16 && shape.rank >= TENSOR_CORE_MIN_RANK {
        merge_tensor_cores(gpu, w, shape, left, right, alpha)
    } else {
        merge_streaming(gpu, w, shape, left, right, alpha)
    }
}

/// The streaming kernel: W read and written once with 16-byte accesses, the
/// update accumulated from the f32 factors in f32, W rounded once.
pub fn merge_streaming<T: Element>(
    gpu: &Gpu,
    w: &mut CudaViewMut<'_, T>,
    shape: MergeShape,
    left: &CudaView<'_, f32>,
    right: &CudaView<'_, f32>,
    alpha: f32,
) -> Result<()> {
    check_merge(shape, w.len(), left.len(), right.len(), alpha)?;
    let MergeShape { rows, cols, rank } = shape;
    if rank == 0 || rows == 0 || cols == 0 {
        return Ok(());
    }
    let (tile_m, tile_n) = tile(T::DTYPE.size());
    let tiles = (rows as u64).div_ceil(tile_m) * (cols as u64).div_ceil(tile_n);
    if tiles > i32::MAX as u64 {
        return Err(Error::invalid("adapter_merge", format!("{shape:?} needs {tiles} blocks, above the grid limit")));
    }
    let name = format!("adapter_merge_{}", T::DTYPE.suffix());
    let f = gpu.function(kernels::ADAPTER_SUM, &name)?;
    let (rows32, cols32, rank32) = (rows as u32, cols as u32, rank as u32);
    // SAFETY: argument types match the kernel's signature; check_merge
    // verified every buffer length against the shape.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(w)
            .arg(left)
            .arg(right)
            .arg(&rows32)
            .arg(&cols32)
            .arg(&rank32)
            .arg(&alpha)
            .launch(grid(tiles as u32, THREADS, 0))
    }
    .map_err(|e| Error::cuda(format!("launching {name}"), e))?;
    Ok(())
}

/// `w += alpha·leftᵀ·right` for a bf16 `w` on tensor cores: the factors are
/// rounded to bf16 into the [`Gpu`]'s scratch workspace (rank·(rows + cols)
/// elements), then one cuBLAS GEMM with beta = 1 reads and writes W once.
/// Other dtypes are a [`Error::DType`].
pub fn merge_tensor_cores<T: Element>(
    gpu: &Gpu,
    w: &mut CudaViewMut<'_, T>,
    shape: MergeShape,
    left: &CudaView<'_, f32>,
    right: &CudaView<'_, f32>,
    alpha: f32,
) -> Result<()> {
    if T::DTYPE != DType::BF16 {
        return Err(Error::DType {
            op: "adapter_merge (tensor cores)",
            operand: "w",
            expected: DType::BF16,
            got: T::DTYPE,
        });
    }
    check_merge(shape, w.len(), left.len(), right.len(), alpha)?;
    let MergeShape { rows, cols, rank } = shape;
    if rank == 0 || rows == 0 || cols == 0 {
        return Ok(());
    }
    if [rows, cols, rank].iter().any(|&d| d > i32::MAX as usize) {
        return Err(Error::invalid(
            "adapter_merge (tensor cores)",
            format!("{shape:?}: each dimension must be < 2^31"),
        ));
    }
    let ws = gpu.scratch()?;
    let cast = |src: &CudaView<'_, f32>, dst: &mut Region<'_, T>| -> Result<()> {
        let f = gpu.function(kernels::ADAPTER_SUM, "adapter_factor_cast_bf16")?;
        debug_assert_eq!(src.len(), dst.len());
        let n = src.len() as u64;
        let blocks = gpu.persistent_grid(8, blocks_for(n, THREADS) as u64);
        // SAFETY: argument types match; both buffers hold n elements, and T
        // is bf16 here (the caller checked T::DTYPE).
        unsafe { gpu.stream().launch_builder(&f).arg(src).arg(dst).arg(&n).launch(grid(blocks, THREADS, 0)) }
            .map_err(|e| Error::cuda("launching adapter_factor_cast_bf16", e))?;
        Ok(())
    };
    // Every element of both regions is written by its cast before cuBLAS
    // reads it (same stream).
    let (mut l16, mut r16) = (ws.take::<T>(left.len())?, ws.take::<T>(right.len())?);
    cast(left, &mut l16)?;
    cast(right, &mut r16)?;
    // Row-major W (rows×cols) += alpha · leftᵀ (rows×rank, stored rank×rows)
    // · right (rank×cols).
    let h = gpu.blas()?;
    let (wp, _w_guard) = w.device_ptr_mut(gpu.stream());
    let lt = Operand { ptr: l16.ptr(), ld: rows, trans: true, dtype: DType::BF16 };
    let rt = Operand { ptr: r16.ptr(), ld: cols, trans: false, dtype: DType::BF16 };
    gemm(&h, (rows, cols, rank), lt, rt, wp, cols, DType::BF16, alpha, 1.0)
}

impl AdapterSumOps for Gpu {
    fn adapter_merge<T: Element>(
        &self,
        w: &mut CudaSlice<T>,
        shape: MergeShape,
        left: &CudaSlice<f32>,
        right: &CudaSlice<f32>,
        alpha: f32,
    ) -> Result<()> {
        merge(self, &mut w.slice_mut(..), shape, &left.slice(..), &right.slice(..), alpha)
    }
}
