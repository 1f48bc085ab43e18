//! Launch wrappers for `kernels/projection.cu`.
//!
//! The `gather`/`scatter` free functions take caller-owned views and run on
//! the [`Gpu`]'s stream, for engines; the [`ProjectionOps`] impl calls them on
//! owned buffers.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};

use super::{blocks_for, grid, kernels, Gpu};
use crate::backend::Backend;
use crate::dtype::Element;
use crate::projection::{
    ceil_log2, check_theta, Assignment, PreparedProjection, Projection, ProjectionLayout, ProjectionOps, ScatterMode,
    MAX_SEGMENTS_PER_LAUNCH,
};
use crate::{Error, Result};

/// Must match `PROJ_THREADS * PROJ_VEC * 4` in kernels/projection.cu.
const TILE: u64 = 256 * 8 * 4;
const THREADS: u32 = 256;
/// Shared memory a block may stage without opting in; staying under it keeps
/// several blocks resident per SM, which the memory-bound loops need.
const STAGE_BYTES: usize = 48 * 1024;
const BLOCKS_PER_SM: u32 = 4;

/// Mirrors `struct SegmentTable` in kernels/projection.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SegmentTable {
    dst: [u64; MAX_SEGMENTS_PER_LAUNCH],
    start: [u64; MAX_SEGMENTS_PER_LAUNCH],
    len: [u32; MAX_SEGMENTS_PER_LAUNCH],
    tile_start: [u32; MAX_SEGMENTS_PER_LAUNCH + 1],
    count: u32,
}
// SAFETY: plain integers, laid out as the CUDA struct.
unsafe impl DeviceRepr for SegmentTable {}

/// Mirrors `struct ColumnMap` in kernels/projection.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ColumnMap {
    key: u64,
    rows: u64,
    index: u64,
    cols: u32,
    mode: u32,
    half_bits: u32,
    pad: u32,
}
// SAFETY: plain integers, laid out as the CUDA struct.
unsafe impl DeviceRepr for ColumnMap {}

/// The kernel's view of `P`. The index buffer's address (explicit
/// assignment) comes with the guard that keeps cudarc's stream ordering.
fn column_map<'a>(
    p: &'a PreparedProjection<Gpu>,
    stream: &'a cudarc::driver::CudaStream,
) -> (ColumnMap, Option<cudarc::driver::SyncOnDrop<'a>>) {
    let proj = &p.projection;
    let mode = match proj.assignment() {
        Assignment::Hash => 0,
        Assignment::Balanced => 1,
        Assignment::Explicit => 2,
    };
    let (index, guard) = match &p.index {
        Some(ix) => {
            let (ptr, guard) = ix.device_ptr(stream);
            (ptr, Some(guard))
        }
        None => (0, None),
    };
    let map = ColumnMap {
        key: proj.key(),
        rows: proj.rows(),
        index,
        cols: proj.cols(),
        mode,
        half_bits: proj.half_bits(),
        pad: 0,
    };
    (map, guard)
}

/// Splits `(start, address, len)` per segment into launch-sized tables.
fn tables(segments: &[(u64, u64, u64)]) -> Vec<SegmentTable> {
    segments
        .chunks(MAX_SEGMENTS_PER_LAUNCH)
        .map(|chunk| {
            let mut t = SegmentTable {
                dst: [0; MAX_SEGMENTS_PER_LAUNCH],
                start: [0; MAX_SEGMENTS_PER_LAUNCH],
                len: [0; MAX_SEGMENTS_PER_LAUNCH],
                tile_start: [0; MAX_SEGMENTS_PER_LAUNCH + 1],
                count: chunk.len() as u32,
            };
            let mut tiles = 0u64;
            for (k, &(start, addr, len)) in chunk.iter().enumerate() {
                t.dst[k] = addr;
                t.start[k] = start;
                t.len[k] = len as u32;
                t.tile_start[k] = tiles as u32;
                tiles += len.div_ceil(TILE);
            }
            t.tile_start[chunk.len()] = tiles as u32;
            t
        })
        .collect()
}

fn total_tiles(t: &SegmentTable) -> u64 {
    t.tile_start[t.count as usize] as u64
}

fn launch_err(name: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(format!("launching {name}"), e)
}

/// Counts and scales on the device, once per projection.
pub fn prepare(gpu: &Gpu, projection: &Projection) -> Result<PreparedProjection<Gpu>> {
    let cols = projection.cols() as usize;
    let index = projection.index().map(|ix| gpu.upload(ix)).transpose()?;
    let mut counts: CudaSlice<u32> = gpu.zeros(cols)?;
    let mut scale: CudaSlice<f32> = gpu.zeros(cols)?;
    let mut prepared = PreparedProjection {
        projection: projection.clone(),
        counts: gpu.zeros(0)?,
        scale: gpu.zeros(0)?,
        index,
        max_count: 0,
    };
    {
        let (map, _index_guard) = column_map(&prepared, gpu.stream());
        let f = gpu.function(kernels::PROJECTION, "projection_counts")?;
        let blocks = gpu.persistent_grid(BLOCKS_PER_SM * 2, blocks_for(projection.rows(), THREADS) as u64);
        // SAFETY: argument types match the kernel's signature; `counts` holds d.
        unsafe { gpu.stream().launch_builder(&f).arg(&map).arg(&mut counts).launch(grid(blocks, THREADS, 0)) }
            .map_err(launch_err("projection_counts"))?;
    }
    let f = gpu.function(kernels::PROJECTION, "projection_scale")?;
    let cols32 = projection.cols();
    // SAFETY: as above; both buffers hold d.
    unsafe {
        gpu.stream().launch_builder(&f).arg(&counts).arg(&cols32).arg(&mut scale).launch(grid(
            blocks_for(cols as u64, THREADS),
            THREADS,
            0,
        ))
    }
    .map_err(launch_err("projection_scale"))?;
    prepared.max_count = gpu.download(&counts)?.into_iter().max().unwrap_or(0);
    prepared.counts = counts;
    prepared.scale = scale;
    Ok(prepared)
}

/// `θ_D = P·θ_d` into caller-owned segment views (one per layout segment).
pub fn gather<T: Element>(
    gpu: &Gpu,
    prepared: &PreparedProjection<Gpu>,
    theta: &CudaView<'_, f32>,
    layout: &ProjectionLayout,
    segments: &mut [CudaViewMut<'_, T>],
) -> Result<()> {
    let p = &prepared.projection;
    check_theta("projection_gather", "theta", p, theta.len())?;
    layout.check_call::<T>("projection_gather", p, segments.iter().map(|s| s.len()))?;
    let stream = gpu.stream();
    let cols = p.cols() as usize;
    let mut scaled: CudaSlice<f32> = gpu.zeros(cols)?;
    let f = gpu.function(kernels::PROJECTION, "projection_prescale")?;
    let cols32 = p.cols();
    // SAFETY: argument types match; all three buffers hold d.
    unsafe {
        stream.launch_builder(&f).arg(theta).arg(&prepared.scale).arg(&cols32).arg(&mut scaled).launch(grid(
            blocks_for(cols as u64, THREADS),
            THREADS,
            0,
        ))
    }
    .map_err(launch_err("projection_prescale"))?;

    let mut guards = Vec::with_capacity(segments.len());
    let mut entries = Vec::with_capacity(segments.len());
    for (seg, view) in layout.segments().iter().zip(segments.iter_mut()) {
        let (addr, guard) = view.device_ptr_mut(stream);
        guards.push(guard);
        entries.push((seg.start, addr, seg.len()));
    }
    let (map, _index_guard) = column_map(prepared, stream);
    let stage_cols: u32 = if cols * 4 <= STAGE_BYTES { cols as u32 } else { 0 };
    let name = format!("projection_gather_{}", T::DTYPE.suffix());
    let f = gpu.function(kernels::PROJECTION, &name)?;
    for table in tables(&entries) {
        let blocks = gpu.persistent_grid(BLOCKS_PER_SM, total_tiles(&table));
        // SAFETY: argument types match; the table's addresses are live views
        // whose lengths were checked against the layout above.
        unsafe {
            stream.launch_builder(&f).arg(&table).arg(&map).arg(&scaled).arg(&stage_cols).launch(grid(
                blocks,
                THREADS,
                stage_cols * 4,
            ))
        }
        .map_err(launch_err(&name))?;
    }
    drop(guards);
    Ok(())
}

/// `g_d = Pᵀ·g_D` from caller-owned gradient views; `out` (d) is overwritten.
pub fn scatter<T: Element>(
    gpu: &Gpu,
    prepared: &PreparedProjection<Gpu>,
    layout: &ProjectionLayout,
    grads: &[CudaView<'_, T>],
    mode: ScatterMode,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let p = &prepared.projection;
    check_theta("projection_scatter", "out", p, out.len())?;
    layout.check_call::<T>("projection_scatter", p, grads.iter().map(|g| g.len()))?;
    let stream = gpu.stream();
    let cols = p.cols() as usize;
    let mut guards = Vec::with_capacity(grads.len());
    let mut entries = Vec::with_capacity(grads.len());
    for (seg, view) in layout.segments().iter().zip(grads) {
        let (addr, guard) = view.device_ptr(stream);
        guards.push(guard);
        entries.push((seg.start, addr, seg.len()));
    }
    let tables = tables(&entries);
    let (map, _index_guard) = column_map(prepared, stream);
    let sfx = T::DTYPE.suffix();

    if mode == ScatterMode::Atomic {
        stream.memset_zeros(out).map_err(|e| Error::cuda("memset", e))?;
        let name = format!("projection_scatter_atomic_{sfx}");
        let f = gpu.function(kernels::PROJECTION, &name)?;
        for table in &tables {
            let blocks = gpu.persistent_grid(BLOCKS_PER_SM, total_tiles(table));
            // SAFETY: argument types match; `out` and `scale` hold d.
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(table)
                    .arg(&map)
                    .arg(&prepared.scale)
                    .arg(&mut *out)
                    .launch(grid(blocks, THREADS, 0))
            }
            .map_err(launch_err(&name))?;
        }
        drop(guards);
        return Ok(());
    }

    // Deterministic: absmax over every segment fixes the fixed-point scale,
    // then exact int64 sums, then one pass over d to scale back.
    let mut absmax: CudaSlice<u32> = gpu.zeros(1)?;
    let mut acc: CudaSlice<u64> = gpu.zeros(cols)?;
    let name = format!("projection_absmax_{sfx}");
    let f = gpu.function(kernels::PROJECTION, &name)?;
    for table in &tables {
        let blocks = gpu.persistent_grid(BLOCKS_PER_SM, total_tiles(table));
        // SAFETY: argument types match; `absmax` holds one word.
        unsafe { stream.launch_builder(&f).arg(table).arg(&mut absmax).launch(grid(blocks, THREADS, 0)) }
            .map_err(launch_err(&name))?;
    }
    let headroom = ceil_log2(prepared.max_count);
    let stage_cols: u32 = if cols * 8 <= STAGE_BYTES { cols as u32 } else { 0 };
    let name = format!("projection_scatter_{sfx}");
    let f = gpu.function(kernels::PROJECTION, &name)?;
    for table in &tables {
        let blocks = gpu.persistent_grid(BLOCKS_PER_SM, total_tiles(table));
        // SAFETY: argument types match; `acc` holds d words.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(table)
                .arg(&map)
                .arg(&absmax)
                .arg(&headroom)
                .arg(&mut acc)
                .arg(&stage_cols)
                .launch(grid(blocks, THREADS, stage_cols * 8))
        }
        .map_err(launch_err(&name))?;
    }
    let f = gpu.function(kernels::PROJECTION, "projection_scatter_finish")?;
    let cols32 = p.cols();
    // SAFETY: argument types match; every buffer holds d (absmax one word).
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&acc)
            .arg(&prepared.scale)
            .arg(&absmax)
            .arg(&headroom)
            .arg(&cols32)
            .arg(&mut *out)
            .launch(grid(blocks_for(cols as u64, THREADS), THREADS, 0))
    }
    .map_err(launch_err("projection_scatter_finish"))?;
    drop(guards);
    Ok(())
}

impl ProjectionOps for Gpu {
    fn projection_prepare(&self, projection: &Projection) -> Result<PreparedProjection<Gpu>> {
        prepare(self, projection)
    }

    fn projection_gather<T: Element>(
        &self,
        prepared: &PreparedProjection<Gpu>,
        theta: &CudaSlice<f32>,
        layout: &ProjectionLayout,
        segments: &mut [&mut CudaSlice<T>],
    ) -> Result<()> {
        let mut views: Vec<CudaViewMut<'_, T>> = segments.iter_mut().map(|s| s.slice_mut(..)).collect();
        gather(self, prepared, &theta.slice(..), layout, &mut views)
    }

    fn projection_scatter<T: Element>(
        &self,
        prepared: &PreparedProjection<Gpu>,
        layout: &ProjectionLayout,
        grads: &[&CudaSlice<T>],
        mode: ScatterMode,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let views: Vec<CudaView<'_, T>> = grads.iter().map(|g| g.slice(..)).collect();
        scatter(self, prepared, layout, &views, mode, &mut out.slice_mut(..))
    }
}
