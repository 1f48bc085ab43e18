//! Uni-LoRA's shared projection (Li et al., 2025): every adapter parameter of
//! the model is one entry of `θ_D = P·θ_d`.
//!
//! `P` (D × d) has exactly one nonzero per row: row `i` picks column `j(i)`,
//! and the nonzero is `1/sqrt(n_j)` with `n_j` the number of rows that picked
//! `j`. Its used columns are orthonormal, so `‖P·θ‖ = ‖θ‖` (an isometry) and
//! `Pᵀ·P·θ = θ` on used columns. Columns nobody picked get no gradient.
//!
//! # How `j(i)` is drawn
//!
//! `P` is a function of `(seed, i)`, never a stored table, so an adapter is one
//! vector plus a seed. Let `mix64` be SplitMix64's finaliser and
//! `splitmix_at(key, i) = mix64(key + (i + 1)·0x9E3779B97F4A7C15)`, the `i`-th
//! output of SplitMix64 started at `key`, with `key = mix64(seed ^ KEY_SALT)`.
//!
//! - [`Assignment::Hash`]: `j(i) = ((splitmix_at(key, i) >> 32) · d) >> 32`,
//!   independent uniform draws (the paper's description).
//! - [`Assignment::Balanced`]: `j(i) = π(i) mod d`, with `π` a pseudorandom
//!   permutation of `[0, D)` (a 4-round Feistel network over the next even
//!   power of two, cycle-walked into range). Every column gets `⌊D/d⌋` or
//!   `⌈D/d⌉` rows, like the reference code's shuffled partition.
//! - [`Assignment::Explicit`]: a user-supplied index per row, as the original
//!   code stores it (validated against `d`).
//!
//! The same integer arithmetic runs in `kernels/common.cuh` and
//! `kernels/projection.cu`; the CPU and GPU draw identical columns.

use std::sync::Arc;

use crate::backend::Backend;
use crate::dtype::{DType, Element};
use crate::{Error, Result};

/// Segments one kernel launch can address (the segment table travels in
/// kernel parameter space). Layouts with more are split into several
/// launches.
pub const MAX_SEGMENTS_PER_LAUNCH: usize = crate::abi::PROJ_MAX_SEGMENTS as usize;

/// Rows one segment may hold (the kernels index within a segment in 32 bits
/// and need headroom for a tile past the end).
pub const MAX_SEGMENT_ROWS: u64 = 1 << 31;

/// Mixed into the seed so that projections do not share streams with other
/// SplitMix64 users of the same seed.
pub const KEY_SALT: u64 = 0x4C4F_5241_4655_5345; // "LORAFUSE"

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th output of SplitMix64 started at `key`.
pub const fn splitmix_at(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add((i.wrapping_add(1)).wrapping_mul(GAMMA)))
}

/// Maps 64 random bits onto `[0, n)` by multiply-shift of the top 32 bits.
pub const fn reduce_range(bits: u64, n: u32) -> u32 {
    (((bits >> 32) * n as u64) >> 32) as u32
}

fn feistel(x: u64, key: u64, half_bits: u32) -> u64 {
    let mask = (1u64 << half_bits) - 1;
    let (mut l, mut r) = (x >> half_bits, x & mask);
    for round in 0..4u64 {
        let f = splitmix_at(key ^ 0xA5A5_A5A5u64.wrapping_mul(round + 1), r) & mask;
        (l, r) = (r, l ^ f);
    }
    (l << half_bits) | r
}

/// How rows choose their column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// Independent uniform draws from a counter-based hash.
    Hash,
    /// A seeded shuffled partition: column sizes differ by at most one.
    Balanced,
    /// A user-supplied index per row.
    Explicit,
}

/// The projection `P`: shape, seed and assignment rule. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Projection {
    rows: u64,
    cols: u32,
    seed: u64,
    assignment: Assignment,
    key: u64,
    half_bits: u32,
    index: Option<Arc<[u32]>>,
}

impl Projection {
    /// `P` with `rows` = D and `cols` = d, columns drawn by `assignment` from
    /// `seed` (use [`Projection::explicit`] for an index array).
    pub fn new(rows: u64, cols: u32, seed: u64, assignment: Assignment) -> Result<Self> {
        if assignment == Assignment::Explicit {
            return Err(Error::invalid(
                "projection assignment",
                "Explicit needs an index array: use Projection::explicit",
            ));
        }
        Self::check_shape(rows, cols)?;
        let bits = 64 - (rows.max(2) - 1).leading_zeros();
        Ok(Projection {
            rows,
            cols,
            seed,
            assignment,
            key: mix64(seed ^ KEY_SALT),
            half_bits: bits.div_ceil(2).max(1),
            index: None,
        })
    }

    /// `P` from an explicit column per row, as the original Uni-LoRA code
    /// stores it. Every index must be `< cols`.
    pub fn explicit(index: Vec<u32>, cols: u32) -> Result<Self> {
        Self::check_shape(index.len() as u64, cols)?;
        if let Some((i, &j)) = index.iter().enumerate().find(|(_, &j)| j >= cols) {
            return Err(Error::Index {
                what: format!("projection index array, row {i}"),
                index: j as u64,
                bound: cols as u64,
            });
        }
        Ok(Projection {
            rows: index.len() as u64,
            cols,
            seed: 0,
            assignment: Assignment::Explicit,
            key: 0,
            half_bits: 0,
            index: Some(index.into()),
        })
    }

    fn check_shape(rows: u64, cols: u32) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Err(Error::invalid("projection shape", format!("D = {rows}, d = {cols}: both must be at least 1")));
        }
        Ok(())
    }

    /// D: rows, the length of `θ_D` (all adapter parameters).
    pub fn rows(&self) -> u64 {
        self.rows
    }
    /// d: columns, the length of the trainable `θ_d`.
    pub fn cols(&self) -> u32 {
        self.cols
    }
    /// The seed `P` is drawn from (0 for explicit projections).
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// How rows choose columns.
    pub fn assignment(&self) -> Assignment {
        self.assignment
    }
    /// The explicit index array, if any.
    pub fn index(&self) -> Option<&[u32]> {
        self.index.as_deref()
    }
    pub(crate) fn key(&self) -> u64 {
        self.key
    }
    pub(crate) fn half_bits(&self) -> u32 {
        self.half_bits
    }

    /// The column row `i` picks. `i` must be `< rows()`.
    pub fn column(&self, i: u64) -> u32 {
        debug_assert!(i < self.rows);
        match self.assignment {
            Assignment::Hash => reduce_range(splitmix_at(self.key, i), self.cols),
            Assignment::Explicit => self.index.as_ref().unwrap()[i as usize],
            Assignment::Balanced => {
                let mut x = i;
                loop {
                    x = feistel(x, self.key, self.half_bits);
                    if x < self.rows {
                        break (x % self.cols as u64) as u32;
                    }
                }
            }
        }
    }
}

/// `1/sqrt(n)` as the kernels compute it (in f64, rounded once), 0 for an
/// unused column.
pub fn column_scale(count: u32) -> f32 {
    if count == 0 {
        0.0
    } else {
        (1.0 / (count as f64).sqrt()) as f32
    }
}

/// `ceil(log2(n))`, at least 0: headroom bits the fixed-point scatter keeps.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn ceil_log2(n: u32) -> u32 {
    32 - n.max(1).saturating_sub(1).leading_zeros()
}

/// One destination of `θ_D`: a contiguous run of rows that lands in one
/// buffer (one layer's A or B).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// Name of the tensor, e.g. `h.3.attn.c_attn.lora_A`.
    pub name: String,
    /// First row of `θ_D` it holds.
    pub start: u64,
    /// Shape of the tensor (row-major); it holds `shape[0]·shape[1]` rows.
    pub shape: [usize; 2],
}

impl Segment {
    /// Rows of `θ_D` it holds.
    pub fn len(&self) -> u64 {
        (self.shape[0] * self.shape[1]) as u64
    }
    /// True for an empty tensor (rejected by layouts).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where every row of `θ_D` lands: an ordered list of non-overlapping
/// segments inside `[0, D)`, with the storage type of the tensors they
/// describe (metadata for files; buffers of any element type fit).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProjectionLayout {
    rows: u64,
    dtype: DType,
    segments: Vec<Segment>,
}

impl ProjectionLayout {
    /// Segments placed back to back in the order given: D is their total.
    pub fn packed(dtype: DType, tensors: impl IntoIterator<Item = (String, [usize; 2])>) -> Result<Self> {
        let mut start = 0u64;
        let segments: Vec<Segment> = tensors
            .into_iter()
            .map(|(name, shape)| {
                let s = Segment { name, start, shape };
                start += s.len();
                s
            })
            .collect();
        Self::new(start, dtype, segments)
    }

    /// Segments at explicit offsets inside `[0, rows)`. Rejects empty,
    /// overlapping or out-of-range segments; gaps are allowed (those rows of
    /// `θ_D` land nowhere).
    pub fn new(rows: u64, dtype: DType, segments: Vec<Segment>) -> Result<Self> {
        if segments.is_empty() {
            return Err(Error::invalid("projection layout", "it has no segments"));
        }
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&k| segments[k].start);
        for (pos, &k) in order.iter().enumerate() {
            let s = &segments[k];
            if s.is_empty() {
                return Err(Error::invalid(
                    "projection layout",
                    format!("segment `{}` has shape {:?}: it holds no rows", s.name, s.shape),
                ));
            }
            if s.len() > MAX_SEGMENT_ROWS {
                return Err(Error::invalid(
                    "projection layout",
                    format!(
                        "segment `{}` holds {} rows; at most 2^31 per segment (split larger tensors)",
                        s.name,
                        s.len()
                    ),
                ));
            }
            let end = s.start.checked_add(s.len()).filter(|&e| e <= rows);
            let Some(end) = end else {
                return Err(Error::invalid(
                    "projection layout",
                    format!(
                        "segment `{}` covers rows {}..{} but D = {rows}",
                        s.name,
                        s.start,
                        s.start as u128 + s.len() as u128
                    ),
                ));
            };
            if let Some(&next) = order.get(pos + 1) {
                let n = &segments[next];
                if n.start < end {
                    return Err(Error::invalid(
                        "projection layout",
                        format!(
                            "segments `{}` (rows {}..{end}) and `{}` (from row {}) overlap",
                            s.name, s.start, n.name, n.start
                        ),
                    ));
                }
            }
        }
        Ok(ProjectionLayout { rows, dtype, segments })
    }

    /// D: the rows of `θ_D` the layout spans.
    pub fn rows(&self) -> u64 {
        self.rows
    }
    /// The storage type of the adapter tensors the layout describes, as
    /// recorded in adapter files. Gather and scatter do not require it: they
    /// take segment buffers of any element type (f32 masters, bf16 weights,
    /// an f32 oracle beside a bf16 kernel) over the same layout.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The segments, in the order buffers are passed to gather and scatter.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Checks a call's projection, θ length and buffers against the layout.
    /// The buffers' element type `T` is any: where rows land does not
    /// depend on how they are stored (callers name it; it is not checked).
    #[allow(clippy::extra_unused_type_parameters)]
    pub(crate) fn check_call<T: Element>(
        &self,
        op: &'static str,
        proj: &Projection,
        buffer_lens: impl ExactSizeIterator<Item = usize>,
    ) -> Result<()> {
        if proj.rows() != self.rows {
            return Err(Error::shape(op, "projection", format!("D = {}", self.rows), format!("D = {}", proj.rows())));
        }
        if buffer_lens.len() != self.segments.len() {
            return Err(Error::shape(
                op,
                "segments",
                format!("{} buffers", self.segments.len()),
                format!("{} buffers", buffer_lens.len()),
            ));
        }
        for (seg, len) in self.segments.iter().zip(buffer_lens) {
            if len as u64 != seg.len() {
                return Err(Error::Shape {
                    op,
                    operand: "segment buffer",
                    expected: format!("`{}` {:?} = {} elements", seg.name, seg.shape, seg.len()),
                    got: format!("{len} elements"),
                });
            }
        }
        Ok(())
    }
}

/// How the backward scatter sums rows into columns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScatterMode {
    /// Same bits on every run (the default). On the GPU: exact int64
    /// fixed-point sums, no float atomics. The gradient is read once while
    /// its largest magnitude stays within the factor-16 bucket of the
    /// previous call's, twice otherwise (the first call included).
    #[default]
    Deterministic,
    /// GPU float atomics: faster, but the summation order (and so the last
    /// bits) varies between runs. On the CPU this is the same as
    /// `Deterministic`.
    Atomic,
}

/// A projection made ready on a backend: column counts and scales computed
/// once, so every forward and backward reuses them.
pub struct PreparedProjection<B: Backend> {
    /// The projection.
    pub projection: Projection,
    /// `n_j` for every column.
    pub counts: B::Buf<u32>,
    /// `1/sqrt(n_j)` for every column (0 where unused).
    pub scale: B::Buf<f32>,
    /// The explicit index array on the backend, if any.
    pub index: Option<B::Buf<u32>>,
    /// The largest `n_j`.
    pub max_count: u32,
    /// Scratch the deterministic GPU scatter keeps between calls: d int64
    /// sums (left zeroed by every call) and the fixed-point scale the last
    /// call found. Empty on the CPU. Behind a lock so that a scatter holds
    /// it for the whole call; two scatters with one prepared projection on
    /// different streams are ordered by the buffer's stream events.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) scatter_workspace: std::sync::Mutex<B::Buf<u64>>,
}

/// The shared-projection kernels, on any backend.
pub trait ProjectionOps: Backend + Sized {
    /// Counts rows per column and computes `1/sqrt(n_j)`, once per projection.
    fn projection_prepare(&self, projection: &Projection) -> Result<PreparedProjection<Self>>;

    /// Forward: `θ_D = P·θ_d`, written straight into every segment buffer of
    /// `layout` (one buffer per segment, in layout order).
    fn projection_gather<T: Element>(
        &self,
        prepared: &PreparedProjection<Self>,
        theta: &Self::Buf<f32>,
        layout: &ProjectionLayout,
        segments: &mut [&mut Self::Buf<T>],
    ) -> Result<()>;

    /// Backward: `g_d = Pᵀ·g_D`, reading the gradient of every segment.
    /// `out` (length d) is overwritten. A non-finite gradient anywhere makes
    /// every output NaN, so the trainer's finiteness check catches it.
    fn projection_scatter<T: Element>(
        &self,
        prepared: &PreparedProjection<Self>,
        layout: &ProjectionLayout,
        grads: &[&Self::Buf<T>],
        mode: ScatterMode,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
}

/// Checks θ (or the output gradient) has length d.
pub(crate) fn check_theta(op: &'static str, operand: &'static str, proj: &Projection, len: usize) -> Result<()> {
    crate::error::check_len(op, operand, len, proj.cols() as usize)
}
