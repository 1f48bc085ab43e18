//! Launch wrappers for `kernels/projection.cu`.
//!
//! The `gather`/`scatter` free functions take caller-owned views and run on
//! the [`Gpu`]'s stream, for engines; the [`ProjectionOps`] impl calls them on
//! owned buffers.

use bytemuck::Zeroable;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{blocks_for, grid, kernels, Gpu};
use crate::abi::{self, ColumnMap, ScatterState, SegmentTable, SCATTER_STATE_U64, SHIFT_NONE};
use crate::backend::Backend;
use crate::dtype::Element;
use crate::projection::{
    ceil_log2, check_theta, Assignment, PreparedProjection, Projection, ProjectionLayout, ProjectionOps, ScatterMode,
    MAX_SEGMENTS_PER_LAUNCH,
};
use crate::{Error, Result};

/// Threads per block of the gather and scatter kernels.
const THREADS: u32 = abi::PROJ_THREADS;
/// Rows per tile (`PROJ_THREADS · PROJ_VEC`).
const TILE: u64 = abi::PROJ_TILE as u64;
/// Threads per block of the once-per-projection counting kernels.
const PREPARE_THREADS: u32 = 256;
/// Shared-memory bytes every projection kernel reserves for block flags.
const FLAG_BYTES: usize = abi::PROJ_FLAG_BYTES as usize;

/// The kernel's view of `P`. The index buffer's address (explicit
/// assignment) comes with the guard that keeps cudarc's stream ordering.
fn column_map<'a>(
    p: &'a PreparedProjection<Gpu>,
    stream: &'a cudarc::driver::CudaStream,
) -> (ColumnMap, Option<cudarc::driver::SyncOnDrop<'a>>) {
    let proj = &p.projection;
    let mode = match proj.assignment() {
        Assignment::Hash => abi::PROJ_HASH,
        Assignment::Balanced => abi::PROJ_BALANCED,
        Assignment::Explicit => abi::PROJ_EXPLICIT,
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

/// Rows before a segment buffer's first 16-byte boundary (`lead_of` in the
/// kernel): the kernels do them one by one and start vectors after them.
fn lead(addr: u64, len: u64, elem: u64) -> u64 {
    ((16 - (addr % 16)) % 16 / elem).min(len)
}

/// Splits `(start, address, len)` per segment into launch-sized tables.
fn tables(segments: &[(u64, u64, u64)], elem: usize) -> Vec<SegmentTable> {
    segments
        .chunks(MAX_SEGMENTS_PER_LAUNCH)
        .map(|chunk| {
            let mut t = SegmentTable { count: chunk.len() as u32, ..SegmentTable::zeroed() };
            let mut tiles = 0u64;
            for (k, &(start, addr, len)) in chunk.iter().enumerate() {
                t.dst[k] = addr;
                t.start[k] = start;
                t.len[k] = len as u32;
                t.tile_start[k] = tiles as u32;
                tiles += (len - lead(addr, len, elem as u64)).div_ceil(TILE).max(1);
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

/// The scatter workspace as the kernels expect it before the first call: d
/// zeroed sums, then the `ScatterState` with no fixed-point scale known yet.
fn scatter_workspace(cols: usize) -> Vec<u64> {
    let mut workspace = vec![0u64; cols + SCATTER_STATE_U64 as usize];
    bytemuck::cast_slice_mut::<u64, ScatterState>(&mut workspace[cols..])[0] =
        ScatterState { guess: SHIFT_NONE, final_shift: SHIFT_NONE, ..ScatterState::zeroed() };
    workspace
}

/// Counts and scales on the device, once per projection.
pub fn prepare(gpu: &Gpu, projection: &Projection) -> Result<PreparedProjection<Gpu>> {
    let cols = projection.cols() as usize;
    let index = projection.index().map(|ix| gpu.upload(ix)).transpose()?;
    let mut counts: CudaSlice<u32> = gpu.zeros(cols)?;
    let mut scale: CudaSlice<f32> = gpu.zeros(cols)?;
    let workspace = scatter_workspace(cols);
    let mut prepared = PreparedProjection {
        projection: projection.clone(),
        counts: gpu.zeros(0)?,
        scale: gpu.zeros(0)?,
        index,
        max_count: 0,
        scatter_workspace: std::sync::Mutex::new(gpu.upload(&workspace)?),
    };
    {
        let (map, _index_guard) = column_map(&prepared, gpu.stream());
        let f = gpu.function(kernels::PROJECTION, "projection_counts")?;
        let blocks = gpu.persistent_grid(8, blocks_for(projection.rows(), PREPARE_THREADS) as u64);
        // SAFETY: argument types match the kernel's signature; `counts` holds d.
        unsafe { gpu.stream().launch_builder(&f).arg(&map).arg(&mut counts).launch(grid(blocks, PREPARE_THREADS, 0)) }
            .map_err(launch_err("projection_counts"))?;
    }
    let f = gpu.function(kernels::PROJECTION, "projection_scale")?;
    let cols32 = projection.cols();
    // SAFETY: as above; both buffers hold d.
    unsafe {
        gpu.stream().launch_builder(&f).arg(&counts).arg(&cols32).arg(&mut scale).launch(grid(
            blocks_for(cols as u64, PREPARE_THREADS),
            PREPARE_THREADS,
            0,
        ))
    }
    .map_err(launch_err("projection_scale"))?;
    prepared.max_count = gpu.download(&counts)?.into_iter().max().unwrap_or(0);
    prepared.counts = counts;
    prepared.scale = scale;
    Ok(prepared)
}

/// Shared memory per block for `bytes` of staged data, if the device allows
/// that much (else `None`: the kernel takes its unstaged path).
fn stage_smem(gpu: &Gpu, bytes: usize) -> Option<u32> {
    let total = FLAG_BYTES + bytes;
    (total <= gpu.info().max_shared_per_block).then_some(total as u32)
}

/// `(start, address, len)` per segment, with the guards that keep cudarc's
/// stream ordering for the views until the launches are queued.
fn entries<'a, V: DevicePtr<E> + 'a, E>(
    layout: &ProjectionLayout,
    views: impl Iterator<Item = &'a V>,
    stream: &'a cudarc::driver::CudaStream,
) -> (Vec<(u64, u64, u64)>, Vec<cudarc::driver::SyncOnDrop<'a>>) {
    let mut guards = Vec::new();
    let mut out = Vec::new();
    for (seg, view) in layout.segments().iter().zip(views) {
        let (addr, guard) = view.device_ptr(stream);
        guards.push(guard);
        out.push((seg.start, addr, seg.len()));
    }
    (out, guards)
}

/// `θ_D = P·θ_d` into caller-owned segment views (one per layout segment):
/// one launch per [`MAX_SEGMENTS_PER_LAUNCH`] segments, no scratch memory.
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
    let mut guards = Vec::with_capacity(segments.len());
    let mut entries = Vec::with_capacity(segments.len());
    for (seg, view) in layout.segments().iter().zip(segments.iter_mut()) {
        let (addr, guard) = view.device_ptr_mut(stream);
        guards.push(guard);
        entries.push((seg.start, addr, seg.len()));
    }
    let (map, _index_guard) = column_map(prepared, stream);
    // Stage the d output values T(θ_j·scale_j) in shared memory when they fit.
    let staged = stage_smem(gpu, p.cols() as usize * T::DTYPE.size());
    let (stage, smem) = match staged {
        Some(bytes) => (1u32, bytes),
        None => (0u32, FLAG_BYTES as u32),
    };
    let name = format!("projection_gather_{}", T::DTYPE.suffix());
    let f = gpu.function_with_shared(kernels::PROJECTION, &name, smem)?;
    for table in tables(&entries, T::DTYPE.size()) {
        let blocks = gpu.persistent_grid(1, total_tiles(&table));
        // SAFETY: argument types match; the table's addresses are live views
        // whose lengths were checked against the layout above; θ and scale
        // hold d.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&table)
                .arg(&map)
                .arg(theta)
                .arg(&prepared.scale)
                .arg(&stage)
                .launch(grid(blocks, THREADS, smem))
        }
        .map_err(launch_err(&name))?;
    }
    drop(guards);
    Ok(())
}

/// `g_d = Pᵀ·g_D` from caller-owned gradient views; `out` (d) is overwritten.
/// Deterministic mode: two launches (accumulate, then convert) reading the
/// gradient once in the steady state; see kernels/projection.cu.
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
    let (entries, guards) = entries(layout, grads.iter(), stream);
    let tables = tables(&entries, T::DTYPE.size());
    let (map, _index_guard) = column_map(prepared, stream);
    let sfx = T::DTYPE.suffix();

    if mode == ScatterMode::Atomic {
        stream.memset_zeros(out).map_err(|e| Error::cuda("memset", e))?;
        let name = format!("projection_scatter_atomic_{sfx}");
        let f = gpu.function_with_shared(kernels::PROJECTION, &name, FLAG_BYTES as u32)?;
        for table in &tables {
            let blocks = gpu.persistent_grid(1, total_tiles(table));
            // SAFETY: argument types match; `out` and `scale` hold d.
            unsafe {
                stream.launch_builder(&f).arg(table).arg(&map).arg(&prepared.scale).arg(&mut *out).launch(grid(
                    blocks,
                    THREADS,
                    FLAG_BYTES as u32,
                ))
            }
            .map_err(launch_err(&name))?;
        }
        drop(guards);
        return Ok(());
    }

    // Per-block sums in shared memory (two u32 per column) when they fit.
    let staged = stage_smem(gpu, cols * 8);
    let (stage, smem) = match staged {
        Some(bytes) => (1u32, bytes),
        None => (0u32, FLAG_BYTES as u32),
    };
    let headroom = ceil_log2(prepared.max_count);
    let name = format!("projection_scatter_{sfx}");
    let f = gpu.function_with_shared(kernels::PROJECTION, &name, smem)?;
    let mut workspace = prepared.scatter_workspace.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Every launch of both phases uses one grid size, so the kernels' "last
    // block" ticket counts the same blocks.
    let blocks = tables.iter().map(|t| gpu.persistent_grid(1, total_tiles(t))).max().unwrap_or(1);
    for phase in [abi::SCATTER_SPECULATE, abi::SCATTER_SETTLE] {
        for (k, table) in tables.iter().enumerate() {
            let last = (k + 1 == tables.len()) as u32;
            // SAFETY: argument types match; the workspace holds d + 4 words,
            // `scale` and `out` hold d, and the table's addresses are live
            // views checked against the layout.
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(table)
                    .arg(&map)
                    .arg(&mut *workspace)
                    .arg(&prepared.scale)
                    .arg(&mut *out)
                    .arg(&headroom)
                    .arg(&stage)
                    .arg(&phase)
                    .arg(&last)
                    .launch(grid(blocks, THREADS, smem))
            }
            .map_err(launch_err(&name))?;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels give tile t of a segment the vectors starting at
    /// lead + 8·1024·t: the table must hold just enough tiles to reach the
    /// segment's end, for every alignment and length.
    #[test]
    fn tables_cover_every_row_with_no_spare_tile() {
        for elem in [2u64, 4] {
            for addr in (0..32u64).map(|a| (1 << 20) + a * elem) {
                for len in [1u64, 2, 7, 8, 9, TILE - 1, TILE, TILE + 1, TILE + 7, 3 * TILE + 5] {
                    let t = &tables(&[(0, addr, len)], elem as usize)[0];
                    let (lead, tiles) = (lead(addr, len, elem), total_tiles(t));
                    assert!(lead < 16 / elem && lead <= len, "addr {addr} len {len}: lead {lead}");
                    assert!((addr + lead * elem) % 16 == 0 || lead == len, "addr {addr} len {len}: lead {lead}");
                    assert!(lead + tiles * TILE >= len, "addr {addr} len {len}: {tiles} tiles miss rows");
                    assert!(tiles == 1 || lead + (tiles - 1) * TILE < len, "addr {addr} len {len}: spare tile");
                }
            }
        }
        let many: Vec<(u64, u64, u64)> = (0..300).map(|k| (k * 100, 4096 * k, 100)).collect();
        let t = tables(&many, 2);
        assert_eq!(t.iter().map(|t| t.count).collect::<Vec<_>>(), [128, 128, 44]);
    }

    /// The state words after the d sums, read as the kernels' little-endian
    /// `ScatterState`: absmax and ticket 0, guess and final_shift
    /// SHIFT_NONE, redo and padding 0.
    #[test]
    fn scatter_workspace_starts_with_no_scale() {
        let w = scatter_workspace(3);
        let none = SHIFT_NONE as u32 as u64;
        assert_eq!(w, [0, 0, 0, 0, none | none << 32, 0, 0]);
    }
}
