//! The packed layout: the whole low-rank layer as ONE GEMM, for owners of
//! their buffers (a trainer, an engine that allocates `x` itself).
//!
//! The caller-buffer path ([`super::LowRankOps`]) must leave `x` and `W` as
//! they are, so the low-rank term costs extra passes: the expand GEMM writes
//! `y` and the base GEMM reads it back. If instead `x` lives in an
//! `M × (K + p)` buffer and `W` in an `(N + p) × (K + p)` one, the rank-r
//! factors ride in the spare columns and rows:
//!
//! ```text
//! x_packed   M × (K+p)      [ x  | s·(x·Aᵀ)⊙u | 1    | 0… ]     (spare columns written by packed_forward)
//! w_packed   (N+p) × (K+p)  [ W  | B⊙v        | bias | 0… ]     rows 0..N
//!                           [ A  | 0…                     ]     rows N..N+r (A rounded to T)
//!                           [ 0…                          ]     rows N+r..N+p
//! dy_packed  M × (N+p)      [ dy | s·((dy⊙v)·B)⊙u | 0…    ]     (spare columns written by packed_backward)
//!
//! y  = x_packed · w_packed[0..N, :]ᵀ     one GEMM over K + p
//! dx = dy_packed · w_packed[:, 0..K]     one GEMM over N + p
//! ```
//!
//! `p` ([`PackedLayout::pad`]) is `r` (plus one for the bias column) rounded
//! up to 8, so every row of every packed buffer starts 16-byte aligned. The
//! bias costs nothing either: it is one more "rank" whose `x` column is 1.
//!
//! Keeping the packed weight current is the owner's job: [`PackedOps::pack_weight`]
//! once, then [`PackedOps::pack_adapter`] after every optimizer step that
//! changes `A`, `B`, `v` or the bias (it rewrites only the `N·p + p·(K+p)`
//! adapter elements, never `W`). The adapter passed to the forward and
//! backward must be the one packed: its `A`, `u`, `s` make `t'`, and its
//! `B`, `u`, `v` make `dS`, `dB`, `du`, `dv`.
//!
//! ```
//! use lorafuse::{cpu::Cpu, lowrank::*, lowrank::packed::*};
//! # fn main() -> lorafuse::Result<()> {
//! let shape = LinearShape { m: 3, k: 8, n: 5, r: 2 };
//! let layout = PackedLayout::new(shape, false)?;
//! let mut rng = lorafuse::rng::Rng::new(1);
//! let (a, b) = (rng.uniform_vec(2 * 8, -1.0, 1.0), rng.uniform_vec(5 * 2, -1.0, 1.0));
//! let w = rng.uniform_vec(5 * 8, -1.0, 1.0);
//! let adapter = Adapter::<Cpu> { a: &a, b: &b, u: None, v: None, scale: 0.5 };
//! let mut w_packed = vec![0f32; layout.w_len()];
//! Cpu.pack_weight(&layout, &w, None, adapter, &mut w_packed)?;
//! let x = rng.uniform_vec(3 * 8, -1.0, 1.0);
//! let mut x_packed = vec![0f32; layout.x_len()];
//! Cpu.pack_rows(shape.m, shape.k, layout.x_ld(), &x, &mut x_packed)?; // or produce x there directly
//! let mut y = vec![0f32; 3 * 5];
//! Cpu.packed_forward(&layout, &mut x_packed, &w_packed, adapter, &mut y, None)?;
//! # Ok(()) }
//! ```

use super::{Adapter, AdapterLens, GradLens, Grads, LinearShape, LowRankOps};
use crate::dtype::Element;
use crate::{Error, Result};

/// The geometry of one layer's packed buffers (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    /// The layer's sizes; `r` ≥ 1.
    pub shape: LinearShape,
    /// Whether `w_packed` carries a bias column.
    pub bias: bool,
}

const OP: &str = "packed layout";

impl PackedLayout {
    /// Validates the sizes (as the caller-buffer path does; the rank must be
    /// in `1..=MAX_RANK`) and that every packed dimension fits an `i32`.
    pub fn new(shape: LinearShape, bias: bool) -> Result<Self> {
        let l = PackedLayout { shape, bias };
        shape.check_dims(OP, true)?;
        let p = l.pad();
        if shape.k + p > i32::MAX as usize || shape.n + p > i32::MAX as usize {
            return Err(Error::invalid(OP, format!("{shape}: K + {p} or N + {p} exceeds 2^31 - 1")));
        }
        Ok(l)
    }

    /// Spare columns `p`: `r` (+1 for the bias column) rounded up to 8.
    pub fn pad(&self) -> usize {
        (self.shape.r + self.bias as usize).div_ceil(8) * 8
    }

    /// Row stride of `x_packed` and of `w_packed`: `K + p`.
    pub fn x_ld(&self) -> usize {
        self.shape.k + self.pad()
    }

    /// Row stride of `dy_packed`: `N + p`.
    pub fn dy_ld(&self) -> usize {
        self.shape.n + self.pad()
    }

    /// Elements of `x_packed`: `M·(K + p)`.
    pub fn x_len(&self) -> usize {
        self.shape.m * self.x_ld()
    }

    /// Elements of `w_packed`: `(N + p)·(K + p)`.
    pub fn w_len(&self) -> usize {
        (self.shape.n + self.pad()) * self.x_ld()
    }

    /// Elements of `dy_packed`: `M·(N + p)`.
    pub fn dy_len(&self) -> usize {
        self.shape.m * self.dy_ld()
    }

    pub(crate) fn check_buf(&self, op: &'static str, name: &'static str, len: usize, want: usize) -> Result<()> {
        if len == want {
            Ok(())
        } else {
            Err(Error::shape(
                op,
                name,
                format!("{want} elements for {} (p = {})", self.shape, self.pad()),
                format!("{len} elements: allocate it with PackedLayout::{name}_len()"),
            ))
        }
    }

    pub(crate) fn check_adapter(&self, op: &'static str, ad: &AdapterLens, bias: Option<usize>) -> Result<()> {
        self.shape.check_adapter(op, ad)?;
        match (self.bias, bias) {
            (true, Some(len)) if len == self.shape.n => Ok(()),
            (true, Some(len)) => Err(Error::shape(op, "bias", format!("{} elements", self.shape.n), format!("{len}"))),
            (false, None) => Ok(()),
            (true, None) => Err(Error::invalid(op, "the layout has a bias column: pass the bias")),
            (false, Some(_)) => Err(Error::invalid(
                op,
                "a bias was given but the layout has no bias column: PackedLayout::new(shape, true)",
            )),
        }
    }
}

/// The packed layer on any backend (see the module docs).
pub trait PackedOps: LowRankOps {
    /// Copies `src` (`rows × cols`) into the first `cols` columns of `dst`
    /// (rows `ld` wide), leaving the other columns alone: `x` into
    /// `x_packed`, `dy` into `dy_packed`, for callers that cannot produce
    /// them there directly.
    fn pack_rows<T: Element>(
        &self,
        rows: usize,
        cols: usize,
        ld: usize,
        src: &Self::Buf<T>,
        dst: &mut Self::Buf<T>,
    ) -> Result<()>;

    /// Writes all of `w_packed` from `W` (N×K), the bias and the adapter.
    fn pack_weight<T: Element>(
        &self,
        layout: &PackedLayout,
        w: &Self::Buf<T>,
        bias: Option<&Self::Buf<T>>,
        adapter: Adapter<'_, Self>,
        w_packed: &mut Self::Buf<T>,
    ) -> Result<()>;

    /// Rewrites only the adapter's elements of `w_packed` (`B⊙v`, the bias
    /// column and the `A` rows), after an optimizer step.
    fn pack_adapter<T: Element>(
        &self,
        layout: &PackedLayout,
        bias: Option<&Self::Buf<T>>,
        adapter: Adapter<'_, Self>,
        w_packed: &mut Self::Buf<T>,
    ) -> Result<()>;

    /// `y = x·Wᵀ (+ bias) + s·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v` from `x_packed`, whose
    /// first K columns hold `x`: writes `t' = s·(x·Aᵀ)⊙u` (and the ones of
    /// the bias column) into its spare columns, then one GEMM over `K + p`.
    /// `t` (M×r, f32) receives `x·Aᵀ` for the backward when given.
    fn packed_forward<T: Element>(
        &self,
        layout: &PackedLayout,
        x_packed: &mut Self::Buf<T>,
        w_packed: &Self::Buf<T>,
        adapter: Adapter<'_, Self>,
        y: &mut Self::Buf<T>,
        t: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;

    /// The backward of [`PackedOps::packed_forward`] given `dy_packed`, whose
    /// first N columns hold `dy`: writes `dS` into its spare columns when
    /// `dx` is wanted and computes `dx` as one GEMM over `N + p`; the
    /// parameter gradients as [`LowRankOps::lowrank_backward`] does
    /// (accumulated, `None`: frozen). `t` None: recomputed.
    #[allow(clippy::too_many_arguments)]
    fn packed_backward<T: Element>(
        &self,
        layout: &PackedLayout,
        x_packed: &Self::Buf<T>,
        w_packed: &Self::Buf<T>,
        adapter: Adapter<'_, Self>,
        t: Option<&Self::Buf<f32>>,
        dy_packed: &mut Self::Buf<T>,
        grads: Grads<'_, Self, T>,
    ) -> Result<()>;
}

pub(crate) const FWD: &str = "packed_forward";
pub(crate) const BWD: &str = "packed_backward";
pub(crate) const PACK: &str = "pack_weight";

/// Checks shared by every backend's `packed_forward`.
pub(crate) fn check_forward(
    l: &PackedLayout,
    x_packed: usize,
    w_packed: usize,
    ad: &AdapterLens,
    y: usize,
    t: Option<usize>,
) -> Result<()> {
    let s = l.shape;
    l.check_buf(FWD, "x", x_packed, l.x_len())?;
    l.check_buf(FWD, "w", w_packed, l.w_len())?;
    s.check_adapter(FWD, ad)?;
    if y != s.m * s.n {
        return Err(Error::shape(FWD, "y", format!("{}x{}", s.m, s.n), format!("{y} elements")));
    }
    if let Some(t) = t {
        if t != s.m * s.r {
            return Err(Error::shape(FWD, "t", format!("{}x{}", s.m, s.r), format!("{t} elements")));
        }
    }
    Ok(())
}

/// Checks shared by every backend's `packed_backward`.
pub(crate) fn check_backward(
    l: &PackedLayout,
    x_packed: usize,
    w_packed: usize,
    ad: &AdapterLens,
    t: Option<usize>,
    dy_packed: usize,
    grads: &GradLens,
) -> Result<()> {
    let s = l.shape;
    l.check_buf(BWD, "x", x_packed, l.x_len())?;
    l.check_buf(BWD, "w", w_packed, l.w_len())?;
    l.check_buf(BWD, "dy", dy_packed, l.dy_len())?;
    // The unpacked checks on the logical sizes: same operand names, same
    // messages, for the gradients and `t`.
    s.check_backward(s.m * s.k, s.n * s.k, Some(ad), t, s.m * s.n, grads)
}
