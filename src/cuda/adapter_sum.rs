//! Launch wrappers for `kernels/adapter_sum.cu`.
//!
//! [`merge`] takes caller-owned views and runs on the [`Gpu`]'s stream, for
//! engines; the [`AdapterSumOps`] impl calls it on owned buffers.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::{grid, kernels, Gpu};
use crate::adapter_sum::{check_merge, AdapterSumOps, MergeShape};
use crate::dtype::Element;
use crate::{Error, Result};

/// Must match `MERGE_THREADS`, `MERGE_TILE_M` and `MERGE_TILE_N` in
/// kernels/adapter_sum.cu.
const THREADS: u32 = 256;
const TILE_M: u64 = 64;
const TILE_N: u64 = 128;

/// `w += alpha·leftᵀ·right` on caller-owned views (W rows×cols, left
/// rank×rows, right rank×cols, all row-major).
pub fn merge<T: Element>(
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
    let tiles = (rows as u64).div_ceil(TILE_M) * (cols as u64).div_ceil(TILE_N);
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
