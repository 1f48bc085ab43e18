//! Launch wrappers for `kernels/multi_adapter.cu` (the tile plan, the two
//! kernels and their memory passes are described in the kernel file's
//! header).
//!
//! [`add_in_place`] takes caller-owned views and runs on the [`Gpu`]'s
//! stream (wrap an engine's stream with [`Gpu::from_stream`]); the
//! [`MultiAdapterOps`] impl calls it on owned buffers. Each call copies its
//! work-item list (16 bytes per block, built on the host from the ids) and
//! keeps an `M × r_max` f32 `t'` in the [`Gpu`]'s scratch workspace
//! ([`super::workspace`]): one host-to-device copy, no allocation.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::{grid, kernels, Gpu};
use crate::backend::Scalar;
use crate::dtype::Element;
use crate::multi_adapter::{plan, AdapterPool, MultiAdapterOps, RowAdapters};
use crate::{Error, Result};

/// Threads per block of the shrink and expand kernels.
const THREADS: u32 = crate::abi::MA_THREADS;

fn launch_err(name: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(format!("launching {name}"), e)
}

fn kernel<T: Element>(gpu: &Gpu, stem: &str) -> Result<(cudarc::driver::CudaFunction, String)> {
    let name = format!("{stem}_{}", T::DTYPE.suffix());
    Ok((gpu.function(kernels::MULTI_ADAPTER, &name)?, name))
}

/// `y[i] += s_a·(((x[i]·A_aᵀ) ⊙ u_a)·B_aᵀ) ⊙ v_a` over caller views, on the
/// [`Gpu`]'s stream. See [`MultiAdapterOps::multi_adapter_add`].
pub fn add_in_place<T: Element>(
    gpu: &Gpu,
    pool: &AdapterPool<Gpu, T>,
    layer: usize,
    rows: RowAdapters<'_>,
    x: &CudaView<'_, T>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let plan = plan(pool, layer, &rows, x.len(), y.len())?;
    if plan.shrink.is_empty() {
        return Ok(());
    }
    let cfg = pool.config();
    let ns = plan.shrink.len();
    let host_items: Vec<u32> = plan.shrink.iter().chain(&plan.expand).flatten().copied().collect();
    let ws = gpu.scratch()?;
    let mut items = ws.take::<u32>(host_items.len())?;
    items.copy_from_host(gpu, &host_items)?;
    let (shrink_items, expand_items) = items.split_at_mut(4 * ns);
    let m = rows.rows();
    // Every t'[row][q] the expand reads (q below the row's rank) is written
    // by the shrink item covering (row's tile, q) before it; the rest of
    // the region is never read.
    let mut t = ws.take::<f32>(m * plan.ld_t)?;
    let (k32, n32, ld32) = (cfg.k as i32, cfg.n as i32, plan.ld_t as i32);
    {
        let (f, name) = kernel::<T>(gpu, "multi_adapter_shrink")?;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(x).arg(&pool.a_rows).arg(&pool.floats).arg(&pool.descs).arg(&shrink_items);
        b.arg(&mut t).arg(&k32).arg(&ld32);
        // SAFETY: argument types and order match the kernel; item indices
        // were validated against the pool and the shapes by `plan`.
        unsafe { b.launch(grid(ns as u32, THREADS, 0)) }.map_err(launch_err(&name))?;
    }
    {
        let (f, name) = kernel::<T>(gpu, "multi_adapter_expand")?;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(&pool.bt_rows).arg(&pool.floats).arg(&pool.descs).arg(&expand_items);
        b.arg(&t).arg(y).arg(&n32).arg(&ld32);
        // SAFETY: as above.
        unsafe { b.launch(grid(plan.expand.len() as u32, THREADS, 0)) }.map_err(launch_err(&name))?;
    }
    Ok(())
}

impl MultiAdapterOps for Gpu {
    fn write_at<T: Scalar>(&self, buf: &mut CudaSlice<T>, offset: usize, host: &[T]) -> Result<()> {
        let end = offset.checked_add(host.len()).filter(|&e| e <= buf.len());
        let Some(end) = end else {
            return Err(Error::invalid(
                "write_at",
                format!("{} elements at offset {offset} run past the buffer's {}", host.len(), buf.len()),
            ));
        };
        if host.is_empty() {
            return Ok(());
        }
        self.stream()
            .memcpy_htod(host, &mut buf.slice_mut(offset..end))
            .map_err(|e| Error::cuda("host-to-device copy into an adapter pool", e))
    }

    fn multi_adapter_add<T: Element>(
        &self,
        pool: &AdapterPool<Gpu, T>,
        layer: usize,
        rows: RowAdapters<'_>,
        x: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<()> {
        add_in_place(self, pool, layer, rows, &x.as_view(), &mut y.as_view_mut())
    }
}
