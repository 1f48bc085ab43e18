//! Many adapters in one batch: the low-rank term of a serving engine's
//! linear layer when every request brings its own adapter.
//!
//! For rows `x[i]` (K wide) and rows `y[i]` (N wide) that already hold the
//! base layer's output, with `a = ids[i]` the pool slot row `i` uses:
//!
//! ```text
//! y[i] += s_a · (((x[i]·A_aᵀ) ⊙ u_a)·B_aᵀ) ⊙ v_a        (ids[i] = −1: y[i] unchanged)
//! ```
//!
//! `A_a` is r_a×K, `B_a` N×r_a, `u_a` (r_a) and `v_a` (N) optional (ones),
//! `s_a` the adapter's scale. Ranks differ between adapters (1 to
//! [`MAX_RANK`]); each row costs its own adapter's rank, never the largest.
//!
//! # Two row layouts, one pair of kernels
//! - [`RowAdapters::Rows`] (decode, as Punica's BGMV): one id per row. Rows
//!   next to each other with the same id are grouped, so a batch sorted by
//!   adapter costs no more than the segmented form.
//! - [`RowAdapters::Segments`] (prefill, as SGMV / vLLM's `lora_shrink` and
//!   `lora_expand`): segment `s` is rows `starts[s]..starts[s+1]`, all using
//!   `ids[s]`.
//!
//! Both become a list of tiles of at most [`TILE_ROWS`] rows of one adapter
//! (built on the host from the ids), and two launches serve every tile of
//! the batch: `multi_adapter_shrink` (`t' = s·(x·Aᵀ) ⊙ u`, one warp per
//! (tile, rank)) then `multi_adapter_expand` (`y += (t'·Bᵀ) ⊙ v`, one thread
//! per 8 columns of a tile). A tile reads its adapter's `A` and `B` once for
//! all of its rows.
//!
//! # The pool
//! [`AdapterPool`] holds the adapters of one module type (one `K × N`
//! projection, e.g. every layer's `q_proj`) for `layers` layers in device
//! memory; the engine fills slots and evicts them. Factors are stored as
//! rank rows (`A` rows of K, `Bᵀ` rows of N) in one arena, in the
//! activation dtype `T`; vectors, `θ` and projection scales are f32 in a
//! second arena. What one adapter costs depends on its kind:
//!
//! | kind ([`ServedAdapter`]) | stored per adapter |
//! |---|---|
//! | `PerLayer` (LoRA) | `A`, `B` (and `u`, `v`) of every layer |
//! | `Tied` (Tied-LoRA, trained `A`, `B`) | one `A`, `B` for all layers, per-layer `u`, `v` |
//! | `Shared` (VeRA; Tied-LoRA with frozen `A`, `B`) | per-layer `u`, `v` only: `A`, `B` are [`SharedFactors`] stored once for all adapters drawn from one seed |
//! | `UniLora` | `θ_d` only (d floats for the whole model): `A` and `B` entries are gathered from `θ_d` and the projection's seed inside the kernels, never materialised |
//!
//! Each (slot, layer) has a 96-byte descriptor on the device saying where
//! its factors, vectors or `θ` live; kernels look the descriptor up per tile.
//!
//! # Determinism
//! Every output element is written by one thread and every sum has a fixed
//! order that depends only on the row's own adapter, so results are the
//! same bits on every run and do not depend on which other requests share
//! the batch. No float atomics.
//!
//! # Example (CPU backend; [`crate::cuda::Gpu`] is used the same way)
//! ```
//! use lorafuse::{cpu::Cpu, multi_adapter::*};
//! # fn main() -> lorafuse::Result<()> {
//! let (k, n, r) = (8, 6, 2);
//! let cfg = PoolConfig { k, n, layers: 1, slots: 4, rank_rows: 16, floats: 64 };
//! let mut pool = AdapterPool::<Cpu, f32>::new(&Cpu, cfg)?;
//! let mut rng = lorafuse::rng::Rng::new(1);
//! let (a, b) = (rng.uniform_vec(r * k, -1.0, 1.0), rng.uniform_vec(n * r, -1.0, 1.0));
//! let layer = LayerFactors { a: &a, b: &b, u: None, v: None };
//! pool.fill(&Cpu, 2, &ServedAdapter::PerLayer { rank: r, scale: 0.5, layers: &[layer] })?;
//! let x = rng.uniform_vec(3 * k, -1.0, 1.0);
//! let mut y = vec![0f32; 3 * n];
//! Cpu.multi_adapter_add(&pool, 0, RowAdapters::Rows(&[2, -1, 2]), &x, &mut y)?;
//! assert!(y[n..2 * n].iter().all(|&v| v == 0.0)); // row 1 has no adapter
//! # Ok(()) }
//! ```

use crate::abi;
use crate::backend::{Backend, Scalar};
use crate::dtype::Element;
use crate::lowrank::LowRankConfig;
use crate::projection::{Assignment, Projection, ProjectionOps};
use crate::rng::Rng;
use crate::{Error, Result};

/// The largest rank an adapter in a pool may have.
pub const MAX_RANK: usize = abi::MA_MAX_RANK as usize;

/// Rows of one tile: the rows of one adapter a block serves together.
pub const TILE_ROWS: usize = abi::MA_TILE_ROWS as usize;

/// Ranks one shrink block computes, one warp each.
pub const SHRINK_RANKS: usize = abi::MA_SHRINK_RANKS as usize;

/// Output columns one expand block covers, 8 per thread.
pub const EXPAND_COLS: usize = abi::MA_EXPAND_COLS as usize;

/// `u32` words of one (slot, layer) descriptor.
pub const DESC_WORDS: usize = abi::MA_DESC_WORDS as usize;

/// Descriptor word offsets and values (`MA_D_*`, `MA_KIND_*` and
/// `MA_OFF_NONE` in kernels/abi.h).
pub(crate) mod desc {
    use crate::abi;

    pub const KIND: usize = abi::MA_D_KIND as usize;
    pub const RANK: usize = abi::MA_D_RANK as usize;
    pub const SCALE: usize = abi::MA_D_SCALE as usize;
    pub const U_OFF: usize = abi::MA_D_U_OFF as usize;
    pub const V_OFF: usize = abi::MA_D_V_OFF as usize;
    /// Factors: first rank row in the factor arena. UniLora: `θ_d`'s offset
    /// in the float arena.
    pub const BASE: usize = abi::MA_D_BASE as usize;
    pub const COLSCALE_OFF: usize = abi::MA_D_COLSCALE_OFF as usize;
    pub const COLS: usize = abi::MA_D_COLS as usize;
    pub const KEY: usize = abi::MA_D_KEY as usize;
    pub const ROWS: usize = abi::MA_D_ROWS as usize;
    pub const MODE: usize = abi::MA_D_MODE as usize;
    pub const HALF_BITS: usize = abi::MA_D_HALF_BITS as usize;
    pub const A_START: usize = abi::MA_D_A_START as usize;
    pub const B_START: usize = abi::MA_D_B_START as usize;
    /// `KIND` values (0: empty).
    pub const FACTORS: u32 = abi::MA_KIND_FACTORS;
    pub const THETA: u32 = abi::MA_KIND_THETA;
    /// `U_OFF` / `V_OFF` when the vector is absent (ones).
    pub const NONE: u32 = abi::MA_OFF_NONE;
}

/// Sizes of an [`AdapterPool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Input features of the module (`x` rows, `A` rows).
    pub k: usize,
    /// Output features (`y` rows, `B` rows).
    pub n: usize,
    /// Layers that share the module type (a Tied-LoRA adapter stores one
    /// `A`, `B` for all of them).
    pub layers: usize,
    /// Adapter slots the engine fills and evicts (ids `0..slots`).
    pub slots: usize,
    /// Capacity of the factor arena, in rank rows: each stored `A`, `B` pair
    /// of rank r takes r rows (`r·K + r·N` elements of `T`).
    pub rank_rows: usize,
    /// Capacity of the f32 arena holding `u`, `v`, Uni-LoRA's `θ_d` and the
    /// projections' column scales.
    pub floats: usize,
}

impl PoolConfig {
    fn validate(&self) -> Result<()> {
        const WHAT: &str = "adapter pool config";
        if self.k == 0 || self.n == 0 || self.layers == 0 || self.slots == 0 {
            return Err(Error::invalid(WHAT, format!("{self:?}: k, n, layers and slots must all be at least 1")));
        }
        if self.k > i32::MAX as usize || self.n > i32::MAX as usize {
            return Err(Error::invalid(WHAT, format!("k = {}, n = {}: each must be below 2^31", self.k, self.n)));
        }
        if self.floats >= u32::MAX as usize || self.rank_rows >= u32::MAX as usize {
            return Err(Error::invalid(WHAT, "rank_rows and floats must be below 2^32 (offsets are 32-bit)"));
        }
        let entries = self.slots.checked_mul(self.layers).and_then(|e| e.checked_mul(DESC_WORDS));
        if entries.is_none_or(|e| e > i32::MAX as usize) {
            return Err(Error::invalid(WHAT, "slots × layers is too large: split the pool"));
        }
        let arena = self.rank_rows.checked_mul(self.k.max(self.n));
        if arena.is_none_or(|e| e > isize::MAX as usize / 4) {
            return Err(Error::invalid(WHAT, "rank_rows × max(k, n) is too large"));
        }
        Ok(())
    }
}

/// One layer's own factors (and optional vectors), f32 on the host;
/// converted to the pool's dtype when stored.
#[derive(Clone, Copy, Debug)]
pub struct LayerFactors<'a> {
    /// `A`, r×K row-major.
    pub a: &'a [f32],
    /// `B`, N×r row-major.
    pub b: &'a [f32],
    /// `u` (r), `None` for ones.
    pub u: Option<&'a [f32]>,
    /// `v` (N), `None` for ones.
    pub v: Option<&'a [f32]>,
}

/// One layer's scaling vectors (both optional: `None` is ones).
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerVectors<'a> {
    /// `u` (r).
    pub u: Option<&'a [f32]>,
    /// `v` (N).
    pub v: Option<&'a [f32]>,
}

/// Where one layer's `A` and `B` sit in Uni-LoRA's `θ_D = P·θ_d`: the first
/// row of `A` (r×K row-major) and of `B` (N×r row-major), as in the
/// training layout's segments ([`crate::projection::Segment::start`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniLoraLayer {
    /// Row of `θ_D` holding `A[0][0]`.
    pub a_start: u64,
    /// Row of `θ_D` holding `B[0][0]`.
    pub b_start: u64,
}

/// Handle of factors stored once and shared by many adapters
/// ([`AdapterPool::add_shared_factors`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SharedFactors(pub usize);

/// Handle of a registered Uni-LoRA projection ([`AdapterPool::add_projection`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProjectionHandle(pub usize);

/// An adapter to store in a slot, in the form its method stores it.
#[derive(Clone, Copy, Debug)]
pub enum ServedAdapter<'a> {
    /// Own factors per layer (plain LoRA; any method given per layer).
    PerLayer {
        /// Rank r.
        rank: usize,
        /// Scale `s`.
        scale: f32,
        /// One entry per pool layer.
        layers: &'a [LayerFactors<'a>],
    },
    /// Tied-LoRA with trained `A`, `B`: one pair for all layers, per-layer
    /// vectors.
    Tied {
        /// Rank r.
        rank: usize,
        /// Scale `s`.
        scale: f32,
        /// `A`, r×K.
        a: &'a [f32],
        /// `B`, N×r.
        b: &'a [f32],
        /// One entry per pool layer.
        vectors: &'a [LayerVectors<'a>],
    },
    /// VeRA, or Tied-LoRA with frozen `A`, `B`: factors already in the pool
    /// ([`AdapterPool::add_shared_factors`]), per-layer vectors.
    Shared {
        /// The shared factors (their rank is the adapter's).
        factors: SharedFactors,
        /// Scale `s`.
        scale: f32,
        /// One entry per pool layer.
        vectors: &'a [LayerVectors<'a>],
    },
    /// Uni-LoRA: `θ_d` and where each layer's factors sit in `θ_D`.
    UniLora {
        /// The registered projection (seed, D, d).
        projection: ProjectionHandle,
        /// Rank r.
        rank: usize,
        /// Scale `s`.
        scale: f32,
        /// `θ_d` (length d).
        theta: &'a [f32],
        /// One entry per pool layer.
        layers: &'a [UniLoraLayer],
    },
}

/// Which adapter each row uses. Ids are pool slots; −1 means no adapter.
#[derive(Clone, Copy, Debug)]
pub enum RowAdapters<'a> {
    /// One id per row (decode).
    Rows(&'a [i32]),
    /// Segment `s` covers rows `starts[s]..starts[s+1]` and uses `ids[s]`
    /// (prefill). `starts` has one entry more than `ids`, starts at 0 and
    /// never decreases; its last entry is M. Empty segments are allowed.
    Segments {
        /// Segment boundaries, length S+1.
        starts: &'a [usize],
        /// One id per segment, length S.
        ids: &'a [i32],
    },
}

impl RowAdapters<'_> {
    /// Rows of `x` and `y` this batch covers.
    pub fn rows(&self) -> usize {
        match self {
            RowAdapters::Rows(ids) => ids.len(),
            RowAdapters::Segments { starts, .. } => starts.last().copied().unwrap_or(0),
        }
    }

    /// The id of every row, expanded (for references and tests).
    pub fn per_row(&self) -> Vec<i32> {
        match self {
            RowAdapters::Rows(ids) => ids.to_vec(),
            RowAdapters::Segments { starts, ids } => {
                let mut out = Vec::with_capacity(self.rows());
                for (s, &id) in ids.iter().enumerate() {
                    out.extend(std::iter::repeat_n(id, starts[s + 1].saturating_sub(starts[s])));
                }
                out
            }
        }
    }
}

/// A first-fit allocator of ranges in `[0, capacity)`.
#[derive(Clone, Debug)]
struct RangeAlloc {
    capacity: usize,
    /// Free ranges (start, len), sorted, never adjacent.
    free: Vec<(usize, usize)>,
}

impl RangeAlloc {
    fn new(capacity: usize) -> Self {
        RangeAlloc { capacity, free: if capacity > 0 { vec![(0, capacity)] } else { Vec::new() } }
    }

    fn alloc(&mut self, len: usize) -> Option<usize> {
        if len == 0 {
            return Some(0);
        }
        let pos = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[pos];
        if l == len {
            self.free.remove(pos);
        } else {
            self.free[pos] = (start + len, l - len);
        }
        Some(start)
    }

    fn release(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let pos = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(pos, (start, len));
        if pos + 1 < self.free.len() && self.free[pos].0 + self.free[pos].1 == self.free[pos + 1].0 {
            self.free[pos].1 += self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0 && self.free[pos - 1].0 + self.free[pos - 1].1 == self.free[pos].0 {
            self.free[pos - 1].1 += self.free[pos].1;
            self.free.remove(pos);
        }
    }

    fn largest_free(&self) -> usize {
        self.free.iter().map(|&(_, l)| l).max().unwrap_or(0)
    }

    fn used(&self) -> usize {
        self.capacity - self.free.iter().map(|&(_, l)| l).sum::<usize>()
    }
}

/// What one filled slot owns, so eviction can give it back.
#[derive(Clone, Debug, Default)]
struct SlotState {
    rows: Vec<(usize, usize)>,
    floats: Vec<(usize, usize)>,
    shared: Option<usize>,
    projection: Option<usize>,
    rank: usize,
}

#[derive(Clone, Debug)]
struct SharedEntry {
    row: usize,
    rank: usize,
    refs: usize,
}

#[derive(Clone, Debug)]
struct ProjectionEntry {
    projection: Projection,
    colscale: usize,
    refs: usize,
}

/// A device pool of adapters for one module type, filled and evicted by
/// slot (see the [module docs](self)). `T` is the dtype of the activations
/// and of the stored factors.
pub struct AdapterPool<B: Backend, T: Element> {
    cfg: PoolConfig,
    /// `A` rows: `rank_rows × K`.
    pub(crate) a_rows: B::Buf<T>,
    /// `Bᵀ` rows: `rank_rows × N` (row q of `Bᵀ` is column q of `B`).
    pub(crate) bt_rows: B::Buf<T>,
    /// `u`, `v`, `θ_d`, column scales.
    pub(crate) floats: B::Buf<f32>,
    /// `slots × layers` descriptors of [`DESC_WORDS`] words.
    pub(crate) descs: B::Buf<u32>,
    /// Host copy of `descs`, for planning batches without a device read.
    host_descs: Vec<u32>,
    rows_alloc: RangeAlloc,
    floats_alloc: RangeAlloc,
    slots: Vec<Option<SlotState>>,
    shared: Vec<Option<SharedEntry>>,
    projections: Vec<Option<ProjectionEntry>>,
}

/// What the multi-adapter kernels need from a backend beyond memory.
pub trait MultiAdapterOps: ProjectionOps + Sized {
    /// Copies `host` into `buf` at element `offset` (used to fill pools).
    fn write_at<T: Scalar>(&self, buf: &mut Self::Buf<T>, offset: usize, host: &[T]) -> Result<()>;

    /// `y[i] += s_a·(((x[i]·A_aᵀ) ⊙ u_a)·B_aᵀ) ⊙ v_a` with `a` the slot row
    /// `i` uses in layer `layer` of `pool` (−1: row unchanged). `x` is M×K,
    /// `y` M×N, both row-major in the pool's dtype; M is `rows.rows()`.
    fn multi_adapter_add<T: Element>(
        &self,
        pool: &AdapterPool<Self, T>,
        layer: usize,
        rows: RowAdapters<'_>,
        x: &Self::Buf<T>,
        y: &mut Self::Buf<T>,
    ) -> Result<()>;
}

const FILL: &str = "adapter pool fill";

fn check_slice(operand: &'static str, got: usize, rows: usize, cols: usize) -> Result<()> {
    if got == rows * cols {
        Ok(())
    } else {
        Err(Error::shape(FILL, operand, format!("{rows}x{cols} = {} elements", rows * cols), format!("{got} elements")))
    }
}

fn check_rank(rank: usize) -> Result<()> {
    if rank == 0 || rank > MAX_RANK {
        return Err(Error::invalid(FILL, format!("rank {rank}: must be in 1..={MAX_RANK}")));
    }
    Ok(())
}

fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::invalid(FILL, format!("scale {scale} is not finite")));
    }
    Ok(())
}

fn check_layers(what: &'static str, got: usize, layers: usize) -> Result<()> {
    if got != layers {
        return Err(Error::shape(FILL, what, format!("one entry per pool layer ({layers})"), format!("{got} entries")));
    }
    Ok(())
}

impl<B: MultiAdapterOps, T: Element> AdapterPool<B, T> {
    /// An empty pool with every arena allocated on `backend`.
    pub fn new(backend: &B, cfg: PoolConfig) -> Result<Self> {
        cfg.validate()?;
        let entries = cfg.slots * cfg.layers;
        Ok(AdapterPool {
            cfg,
            a_rows: backend.zeros(cfg.rank_rows * cfg.k)?,
            bt_rows: backend.zeros(cfg.rank_rows * cfg.n)?,
            floats: backend.zeros(cfg.floats)?,
            descs: backend.zeros(entries * DESC_WORDS)?,
            host_descs: vec![0; entries * DESC_WORDS],
            rows_alloc: RangeAlloc::new(cfg.rank_rows),
            floats_alloc: RangeAlloc::new(cfg.floats),
            slots: vec![None; cfg.slots],
            shared: Vec::new(),
            projections: Vec::new(),
        })
    }

    /// The pool's sizes.
    pub fn config(&self) -> PoolConfig {
        self.cfg
    }

    /// True when `slot` holds an adapter.
    pub fn is_filled(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(Option::is_some)
    }

    /// The rank of the adapter in `slot`, if filled.
    pub fn rank(&self, slot: usize) -> Option<usize> {
        self.slots.get(slot)?.as_ref().map(|s| s.rank)
    }

    /// Rank rows and floats in use (for an engine's accounting).
    pub fn usage(&self) -> (usize, usize) {
        (self.rows_alloc.used(), self.floats_alloc.used())
    }

    fn alloc_rows(&mut self, rank: usize) -> Result<usize> {
        self.rows_alloc.alloc(rank).ok_or_else(|| {
            Error::invalid(
                FILL,
                format!(
                    "the factor arena has no {rank} free contiguous rank rows ({} of {} used, largest free run {}): \
                     evict an adapter or create the pool with more rank_rows",
                    self.rows_alloc.used(),
                    self.cfg.rank_rows,
                    self.rows_alloc.largest_free()
                ),
            )
        })
    }

    fn alloc_floats(&mut self, len: usize) -> Result<usize> {
        self.floats_alloc.alloc(len).ok_or_else(|| {
            Error::invalid(
                FILL,
                format!(
                    "the float arena has no {len} free contiguous floats ({} of {} used): evict an adapter \
                     or create the pool with more floats",
                    self.floats_alloc.used(),
                    self.cfg.floats
                ),
            )
        })
    }

    /// Writes `A` (r×K) and `B` (N×r, stored transposed) at rank row `row`.
    fn write_factors(&mut self, backend: &B, row: usize, rank: usize, a: &[f32], b: &[f32]) -> Result<()> {
        let (k, n) = (self.cfg.k, self.cfg.n);
        let a_t: Vec<T> = a.iter().map(|&v| T::from_f32(v)).collect();
        let mut bt = vec![T::default(); rank * n];
        for j in 0..n {
            for q in 0..rank {
                bt[q * n + j] = T::from_f32(b[j * rank + q]);
            }
        }
        backend.write_at(&mut self.a_rows, row * k, &a_t)?;
        backend.write_at(&mut self.bt_rows, row * n, &bt)
    }

    /// Stores `host` in the float arena and records the range in `state`.
    fn store_floats(&mut self, backend: &B, state: &mut SlotState, host: &[f32]) -> Result<u32> {
        let off = self.alloc_floats(host.len())?;
        state.floats.push((off, host.len()));
        backend.write_at(&mut self.floats, off, host)?;
        Ok(off as u32)
    }

    fn store_vectors(
        &mut self,
        backend: &B,
        state: &mut SlotState,
        rank: usize,
        u: Option<&[f32]>,
        v: Option<&[f32]>,
    ) -> Result<(u32, u32)> {
        if let Some(u) = u {
            check_slice("u", u.len(), 1, rank)?;
        }
        if let Some(v) = v {
            check_slice("v", v.len(), 1, self.cfg.n)?;
        }
        let uo = match u {
            Some(u) => self.store_floats(backend, state, u)?,
            None => desc::NONE,
        };
        let vo = match v {
            Some(v) => self.store_floats(backend, state, v)?,
            None => desc::NONE,
        };
        Ok((uo, vo))
    }

    /// Stores `A`, `B` (f32, converted to `T`) once, for many adapters to
    /// share (VeRA; Tied-LoRA with frozen factors). Released by
    /// [`AdapterPool::release_shared_factors`] once no slot uses them.
    pub fn add_shared_factors(&mut self, backend: &B, rank: usize, a: &[f32], b: &[f32]) -> Result<SharedFactors> {
        check_rank(rank)?;
        check_slice("A", a.len(), rank, self.cfg.k)?;
        check_slice("B", b.len(), self.cfg.n, rank)?;
        let row = self.alloc_rows(rank)?;
        if let Err(e) = self.write_factors(backend, row, rank, a, b) {
            self.rows_alloc.release(row, rank);
            return Err(e);
        }
        let entry = Some(SharedEntry { row, rank, refs: 0 });
        let id = match self.shared.iter().position(Option::is_none) {
            Some(i) => {
                self.shared[i] = entry;
                i
            }
            None => {
                self.shared.push(entry);
                self.shared.len() - 1
            }
        };
        Ok(SharedFactors(id))
    }

    /// VeRA's frozen `A`, `B` drawn from `seed` the way
    /// [`LowRankConfig::init_factors`] draws them (Kaiming-uniform, from
    /// [`Rng::new`]`(seed)`), stored once: every VeRA adapter trained from
    /// this seed is then only its `u` and `v`.
    pub fn add_vera_factors(&mut self, backend: &B, rank: usize, seed: u64) -> Result<SharedFactors> {
        let cfg = LowRankConfig::vera(rank, 1.0);
        cfg.validate()?;
        let (a, b) = cfg.init_factors(self.cfg.k, self.cfg.n, &mut Rng::new(seed));
        self.add_shared_factors(backend, rank, &a, &b)
    }

    /// Frees shared factors no slot uses any more.
    pub fn release_shared_factors(&mut self, id: SharedFactors) -> Result<()> {
        let entry = self.shared_entry(id)?;
        if entry.refs > 0 {
            return Err(Error::invalid(
                "adapter pool shared factors",
                format!("{id:?} is still used by {} slot(s): evict them first", entry.refs),
            ));
        }
        let (row, rank) = (entry.row, entry.rank);
        self.rows_alloc.release(row, rank);
        self.shared[id.0] = None;
        Ok(())
    }

    /// The rank of shared factors.
    pub fn shared_rank(&self, id: SharedFactors) -> Result<usize> {
        Ok(self.shared_entry(id)?.rank)
    }

    /// `d` (the length of `θ_d`) of a registered projection.
    pub fn projection_cols(&self, id: ProjectionHandle) -> Result<usize> {
        Ok(self.projection_entry(id)?.projection.cols() as usize)
    }

    fn shared_entry(&self, id: SharedFactors) -> Result<&SharedEntry> {
        self.shared.get(id.0).and_then(Option::as_ref).ok_or_else(|| Error::Index {
            what: "adapter pool shared factors (never added or already released)".into(),
            index: id.0 as u64,
            bound: self.shared.len() as u64,
        })
    }

    /// Registers a Uni-LoRA projection: its column scales `1/√n_j` (d
    /// floats) go into the float arena once, for every adapter trained with
    /// it. Explicit projections are rejected (an index array of D entries
    /// per projection is what serving from a seed avoids): gather their
    /// factors with [`ProjectionOps::projection_gather`] and fill a
    /// `PerLayer` adapter instead.
    pub fn add_projection(&mut self, backend: &B, projection: &Projection) -> Result<ProjectionHandle> {
        if projection.assignment() == Assignment::Explicit {
            return Err(Error::invalid(
                "adapter pool projection",
                "explicit (index-array) projections cannot be served from θ: materialise the factors with \
                 projection_gather and fill a PerLayer adapter",
            ));
        }
        let prepared = backend.projection_prepare(projection)?;
        let scale = backend.download(&prepared.scale)?;
        let off = self.alloc_floats(scale.len())?;
        if let Err(e) = backend.write_at(&mut self.floats, off, &scale) {
            self.floats_alloc.release(off, scale.len());
            return Err(e);
        }
        let entry = Some(ProjectionEntry { projection: projection.clone(), colscale: off, refs: 0 });
        let id = match self.projections.iter().position(Option::is_none) {
            Some(i) => {
                self.projections[i] = entry;
                i
            }
            None => {
                self.projections.push(entry);
                self.projections.len() - 1
            }
        };
        Ok(ProjectionHandle(id))
    }

    /// Frees a projection no slot uses any more.
    pub fn release_projection(&mut self, id: ProjectionHandle) -> Result<()> {
        let entry = self.projection_entry(id)?;
        if entry.refs > 0 {
            return Err(Error::invalid(
                "adapter pool projection",
                format!("{id:?} is still used by {} slot(s): evict them first", entry.refs),
            ));
        }
        let (off, len) = (entry.colscale, entry.projection.cols() as usize);
        self.floats_alloc.release(off, len);
        self.projections[id.0] = None;
        Ok(())
    }

    fn projection_entry(&self, id: ProjectionHandle) -> Result<&ProjectionEntry> {
        self.projections.get(id.0).and_then(Option::as_ref).ok_or_else(|| Error::Index {
            what: "adapter pool projection (never added or already released)".into(),
            index: id.0 as u64,
            bound: self.projections.len() as u64,
        })
    }

    /// The projection a Uni-LoRA slot was filled with (for the CPU twin).
    pub(crate) fn projection_of_slot(&self, slot: usize) -> Option<&Projection> {
        let p = self.slots.get(slot)?.as_ref()?.projection?;
        self.projections.get(p)?.as_ref().map(|e| &e.projection)
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.cfg.slots {
            return Err(Error::Index {
                what: "adapter pool slot".into(),
                index: slot as u64,
                bound: self.cfg.slots as u64,
            });
        }
        Ok(())
    }

    /// Stores `adapter` in the empty `slot` (every layer at once). On error
    /// the slot stays empty and nothing is leaked.
    pub fn fill(&mut self, backend: &B, slot: usize, adapter: &ServedAdapter<'_>) -> Result<()> {
        self.check_slot(slot)?;
        if self.slots[slot].is_some() {
            return Err(Error::invalid(FILL, format!("slot {slot} is occupied: evict it first")));
        }
        let mut state = SlotState::default();
        let mut words = vec![0u32; self.cfg.layers * DESC_WORDS];
        match self.fill_parts(backend, &mut state, &mut words, adapter) {
            Ok(()) => {}
            Err(e) => {
                self.free_state(&state);
                return Err(e);
            }
        }
        let base = slot * self.cfg.layers * DESC_WORDS;
        if let Err(e) = backend.write_at(&mut self.descs, base, &words) {
            self.free_state(&state);
            return Err(e);
        }
        self.host_descs[base..base + words.len()].copy_from_slice(&words);
        if let Some(s) = state.shared {
            self.shared[s].as_mut().expect("checked in fill_parts").refs += 1;
        }
        if let Some(p) = state.projection {
            self.projections[p].as_mut().expect("checked in fill_parts").refs += 1;
        }
        self.slots[slot] = Some(state);
        Ok(())
    }

    fn fill_parts(
        &mut self,
        backend: &B,
        state: &mut SlotState,
        words: &mut [u32],
        adapter: &ServedAdapter<'_>,
    ) -> Result<()> {
        let (k, n, layers) = (self.cfg.k, self.cfg.n, self.cfg.layers);
        let common = |w: &mut [u32], kind: u32, rank: usize, scale: f32, uo: u32, vo: u32, base: u32| {
            w[desc::KIND] = kind;
            w[desc::RANK] = rank as u32;
            w[desc::SCALE] = scale.to_bits();
            w[desc::U_OFF] = uo;
            w[desc::V_OFF] = vo;
            w[desc::BASE] = base;
        };
        match *adapter {
            ServedAdapter::PerLayer { rank, scale, layers: per } => {
                check_rank(rank)?;
                check_scale(scale)?;
                check_layers("layers", per.len(), layers)?;
                state.rank = rank;
                for (l, f) in per.iter().enumerate() {
                    check_slice("A", f.a.len(), rank, k)?;
                    check_slice("B", f.b.len(), n, rank)?;
                    let row = self.alloc_rows(rank)?;
                    state.rows.push((row, rank));
                    self.write_factors(backend, row, rank, f.a, f.b)?;
                    let (uo, vo) = self.store_vectors(backend, state, rank, f.u, f.v)?;
                    let w = &mut words[l * DESC_WORDS..(l + 1) * DESC_WORDS];
                    common(w, desc::FACTORS, rank, scale, uo, vo, row as u32);
                }
            }
            ServedAdapter::Tied { rank, scale, a, b, vectors } => {
                check_rank(rank)?;
                check_scale(scale)?;
                check_slice("A", a.len(), rank, k)?;
                check_slice("B", b.len(), n, rank)?;
                check_layers("vectors", vectors.len(), layers)?;
                state.rank = rank;
                let row = self.alloc_rows(rank)?;
                state.rows.push((row, rank));
                self.write_factors(backend, row, rank, a, b)?;
                for (l, lv) in vectors.iter().enumerate() {
                    let (uo, vo) = self.store_vectors(backend, state, rank, lv.u, lv.v)?;
                    let w = &mut words[l * DESC_WORDS..(l + 1) * DESC_WORDS];
                    common(w, desc::FACTORS, rank, scale, uo, vo, row as u32);
                }
            }
            ServedAdapter::Shared { factors, scale, vectors } => {
                check_scale(scale)?;
                check_layers("vectors", vectors.len(), layers)?;
                let (row, rank) = {
                    let e = self.shared_entry(factors)?;
                    (e.row, e.rank)
                };
                state.rank = rank;
                state.shared = Some(factors.0);
                for (l, lv) in vectors.iter().enumerate() {
                    let (uo, vo) = self.store_vectors(backend, state, rank, lv.u, lv.v)?;
                    let w = &mut words[l * DESC_WORDS..(l + 1) * DESC_WORDS];
                    common(w, desc::FACTORS, rank, scale, uo, vo, row as u32);
                }
            }
            ServedAdapter::UniLora { projection, rank, scale, theta, layers: per } => {
                check_rank(rank)?;
                check_scale(scale)?;
                check_layers("layers", per.len(), layers)?;
                let (proj, colscale) = {
                    let e = self.projection_entry(projection)?;
                    (e.projection.clone(), e.colscale)
                };
                check_slice("theta", theta.len(), 1, proj.cols() as usize)?;
                for (l, ul) in per.iter().enumerate() {
                    let fits = |start: u64, len: usize| start.checked_add(len as u64).is_some_and(|e| e <= proj.rows());
                    if !fits(ul.a_start, rank * k) || !fits(ul.b_start, n * rank) {
                        return Err(Error::invalid(
                            FILL,
                            format!(
                                "layer {l}: A at θ_D row {} ({rank}x{k}) or B at row {} ({n}x{rank}) runs past D = {}",
                                ul.a_start,
                                ul.b_start,
                                proj.rows()
                            ),
                        ));
                    }
                }
                state.rank = rank;
                state.projection = Some(projection.0);
                let theta_off = self.store_floats(backend, state, theta)?;
                let (mode, key, half_bits) = match proj.assignment() {
                    Assignment::Hash => (abi::PROJ_HASH, proj.key(), 0),
                    _ => (abi::PROJ_BALANCED, proj.key(), proj.half_bits()),
                };
                for (l, ul) in per.iter().enumerate() {
                    let w = &mut words[l * DESC_WORDS..(l + 1) * DESC_WORDS];
                    common(w, desc::THETA, rank, scale, desc::NONE, desc::NONE, theta_off);
                    w[desc::COLSCALE_OFF] = colscale as u32;
                    w[desc::COLS] = proj.cols();
                    w[desc::KEY] = key as u32;
                    w[desc::KEY + 1] = (key >> 32) as u32;
                    w[desc::ROWS] = proj.rows() as u32;
                    w[desc::ROWS + 1] = (proj.rows() >> 32) as u32;
                    w[desc::MODE] = mode;
                    w[desc::HALF_BITS] = half_bits;
                    w[desc::A_START] = ul.a_start as u32;
                    w[desc::A_START + 1] = (ul.a_start >> 32) as u32;
                    w[desc::B_START] = ul.b_start as u32;
                    w[desc::B_START + 1] = (ul.b_start >> 32) as u32;
                }
            }
        }
        Ok(())
    }

    fn free_state(&mut self, state: &SlotState) {
        for &(row, len) in &state.rows {
            self.rows_alloc.release(row, len);
        }
        for &(off, len) in &state.floats {
            self.floats_alloc.release(off, len);
        }
    }

    /// Empties `slot`: its descriptors read "no adapter" on the device and
    /// its storage returns to the arenas. Rows still naming it in a later
    /// batch are rejected on the host.
    pub fn evict(&mut self, backend: &B, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        let Some(state) = self.slots[slot].take() else {
            return Err(Error::invalid("adapter pool evict", format!("slot {slot} is already empty")));
        };
        let base = slot * self.cfg.layers * DESC_WORDS;
        let zeros = vec![0u32; self.cfg.layers * DESC_WORDS];
        if let Err(e) = backend.write_at(&mut self.descs, base, &zeros) {
            self.slots[slot] = Some(state);
            return Err(e);
        }
        self.host_descs[base..base + zeros.len()].fill(0);
        self.free_state(&state);
        if let Some(s) = state.shared {
            if let Some(e) = self.shared[s].as_mut() {
                e.refs -= 1;
            }
        }
        if let Some(p) = state.projection {
            if let Some(e) = self.projections[p].as_mut() {
                e.refs -= 1;
            }
        }
        Ok(())
    }

    /// The descriptor of (slot, layer), from the host copy.
    pub(crate) fn host_desc(&self, slot: usize, layer: usize) -> &[u32] {
        let e = (slot * self.cfg.layers + layer) * DESC_WORDS;
        &self.host_descs[e..e + DESC_WORDS]
    }
}

/// One block's work: `rows` rows from `row0`, descriptor `entry`, and the
/// first rank (shrink) or column (expand) it covers. Laid out as the
/// kernels read it: four `u32` per item.
pub(crate) type Item = [u32; 4];

/// The launch plan of one batch, built on the host from the ids.
#[derive(Clone, Debug, Default)]
pub(crate) struct Plan {
    pub shrink: Vec<Item>,
    pub expand: Vec<Item>,
    /// Row stride of the `t'` scratch (the largest rank in the batch).
    pub ld_t: usize,
}

const ADD: &str = "multi_adapter_add";

/// Validates a call and builds its plan: tiles of at most [`TILE_ROWS`]
/// rows of one adapter, split into rank groups (shrink) and column groups
/// (expand).
pub(crate) fn plan<B: MultiAdapterOps, T: Element>(
    pool: &AdapterPool<B, T>,
    layer: usize,
    rows: &RowAdapters<'_>,
    x_len: usize,
    y_len: usize,
) -> Result<Plan> {
    let cfg = pool.cfg;
    if layer >= cfg.layers {
        return Err(Error::Index { what: format!("{ADD} layer"), index: layer as u64, bound: cfg.layers as u64 });
    }
    let m = rows.rows();
    if m > u32::MAX as usize / 2 {
        return Err(Error::invalid(ADD, format!("{m} rows: at most 2^31 per call")));
    }
    if x_len != m * cfg.k {
        return Err(Error::shape(
            ADD,
            "x",
            format!("{m}x{} = {} elements", cfg.k, m * cfg.k),
            format!("{x_len} elements"),
        ));
    }
    if y_len != m * cfg.n {
        return Err(Error::shape(
            ADD,
            "y",
            format!("{m}x{} = {} elements", cfg.n, m * cfg.n),
            format!("{y_len} elements"),
        ));
    }
    // Runs of rows with one id: (first row, rows, id).
    let mut runs: Vec<(usize, usize, i32)> = Vec::new();
    match rows {
        RowAdapters::Rows(ids) => {
            for (i, &id) in ids.iter().enumerate() {
                match runs.last_mut() {
                    Some(run) if run.2 == id => run.1 += 1,
                    _ => runs.push((i, 1, id)),
                }
            }
        }
        RowAdapters::Segments { starts, ids } => {
            if starts.len() != ids.len() + 1 {
                return Err(Error::shape(
                    ADD,
                    "segment starts",
                    format!("{} entries (one more than ids)", ids.len() + 1),
                    format!("{} entries", starts.len()),
                ));
            }
            if starts[0] != 0 || starts.windows(2).any(|w| w[1] < w[0]) {
                return Err(Error::invalid(ADD, "segment starts must begin at 0 and never decrease"));
            }
            for (s, &id) in ids.iter().enumerate() {
                if starts[s + 1] > starts[s] {
                    runs.push((starts[s], starts[s + 1] - starts[s], id));
                }
            }
        }
    }
    let mut plan = Plan { ld_t: 1, ..Plan::default() };
    for (first, len, id) in runs {
        if id == -1 {
            continue;
        }
        if id < -1 || id as usize >= cfg.slots {
            return Err(Error::Index {
                what: format!("{ADD} adapter id of row {first} (−1 means no adapter)"),
                index: id as i64 as u64,
                bound: cfg.slots as u64,
            });
        }
        let slot = id as usize;
        if !pool.is_filled(slot) {
            return Err(Error::invalid(
                ADD,
                format!("row {first} uses slot {slot}, which is empty: fill it first, or pass −1 for no adapter"),
            ));
        }
        let entry = (slot * cfg.layers + layer) as u32;
        let rank = pool.host_desc(slot, layer)[desc::RANK] as usize;
        plan.ld_t = plan.ld_t.max(rank);
        let mut row0 = first;
        while row0 < first + len {
            let rows_here = TILE_ROWS.min(first + len - row0);
            for q0 in (0..rank).step_by(SHRINK_RANKS) {
                plan.shrink.push([row0 as u32, rows_here as u32, entry, q0 as u32]);
            }
            for n0 in (0..cfg.n).step_by(EXPAND_COLS) {
                plan.expand.push([row0 as u32, rows_here as u32, entry, n0 as u32]);
            }
            row0 += rows_here;
        }
    }
    if plan.shrink.len() > i32::MAX as usize || plan.expand.len() > i32::MAX as usize {
        return Err(Error::invalid(ADD, "the batch needs more than 2^31 blocks: split it"));
    }
    Ok(plan)
}
