//! The fused low-rank update of LoRA, Tied-LoRA and VeRA on a linear layer.
//!
//! For `x` (M×K), a frozen weight `W` (N×K, PyTorch `Linear` layout) with an
//! optional bias, and an adapter `A` (r×K), `B` (N×r) with optional scaling
//! vectors `u` (r) and `v` (N):
//!
//! ```text
//! y = x·Wᵀ + bias + s·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v
//! ```
//!
//! A missing `u` or `v` means all ones (plain LoRA has neither). `s` is
//! [`LowRankConfig::scale`]: `α/r`, or `α/√r` with rank-stabilised scaling.
//!
//! The backward (`docs/methods.md` §2; `t = x·Aᵀ`, `g = dy ⊙ v`, `h = (g·B) ⊙ u`):
//!
//! ```text
//! dx  = dy·W + s·h·A                         (overwritten)
//! dW += dyᵀ·x            dbias += colsum(dy)  (full fine-tuning only)
//! dB += s·gᵀ·(t ⊙ u)     dA += s·hᵀ·x
//! du += s·colsum(t ⊙ (g·B))
//! dv += s·colsum(dy ⊙ ((t ⊙ u)·Bᵀ))
//! ```
//!
//! Every gradient is optional: `None` means frozen and costs nothing.
//! Parameter gradients **accumulate** (`+=`), so a tied `A`/`B` shared by
//! several layers collects the sum over layers; zero them once per step.
//!
//! # Dtypes
//! `x`, `W`, `bias`, `y`, `dy` and `dx` are stored in the layer's dtype `T`
//! (f32, f16 or bf16). Adapter parameters `A`, `B`, `u`, `v`, the saved
//! `t = x·Aᵀ`, and **every parameter gradient** (`dA`, `dB`, `du`, `dv`,
//! `dW`, `dbias`) are f32, so accumulation over layers and steps never
//! rounds to half precision.
//!
//! # Calling it
//! [`LowRankOps`] is implemented by [`crate::cpu::Cpu`] (f64 oracle) and
//! [`crate::cuda::Gpu`] (kernels/lowrank.cu plus cuBLAS; a forward with
//! M ≤ 16 is one fused launch that reads W once with the low-rank term
//! riding along, M ≤ 32 otherwise a single-launch add after the base GEMM).
//! Engines holding raw device memory call the free functions of
//! [`crate::cuda::lowrank`] (`forward`, `add_in_place`, `backward`) on
//! views, on their own stream. A layer's call:
//!
//! ```
//! use lorafuse::{cpu::Cpu, lowrank::*};
//! # fn main() -> lorafuse::Result<()> {
//! let (m, k, n, r) = (3, 8, 5, 2);
//! let cfg = LowRankConfig::lora(r, 4.0);
//! let mut rng = lorafuse::rng::Rng::new(7);
//! let (a, b) = cfg.init_factors(k, n, &mut rng);
//! let x = rng.uniform_vec(m * k, -1.0, 1.0);
//! let w = rng.uniform_vec(n * k, -1.0, 1.0);
//! let shape = LinearShape { m, k, n, r };
//! let adapter = Adapter::<Cpu> { a: &a, b: &b, u: None, v: None, scale: cfg.scale() };
//! let (mut y, mut t) = (vec![0f32; m * n], vec![0f32; m * r]);
//! Cpu.lowrank_forward(shape, &x, &w, None, Some(adapter), &mut y, Some(&mut t))?;
//! let dy = rng.uniform_vec(m * n, -1.0, 1.0);
//! let (mut dx, mut da, mut db) = (vec![0f32; m * k], vec![0f32; r * k], vec![0f32; n * r]);
//! let grads = Grads::<Cpu, f32> { dx: Some(&mut dx), da: Some(&mut da), db: Some(&mut db), ..Grads::none() };
//! Cpu.lowrank_backward(shape, &x, &w, Some(adapter), Some(&t), &dy, grads)?;
//! # Ok(()) }
//! ```

pub mod packed;

use crate::backend::Backend;
use crate::dtype::Element;
use crate::rng::Rng;
use crate::{Error, Result};

/// The largest rank the kernels support (the decode kernel keeps `t` for
/// up to 32 rows × this many ranks in shared memory).
pub const MAX_RANK: usize = 256;

/// How the adapter scale `s` follows from `α` and `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scaling {
    /// `s = α/r` (Hu et al., 2021).
    Standard,
    /// `s = α/√r`, rank-stabilised LoRA ("rsLoRA", Kalajdzievski 2023).
    RankStabilized,
}

/// Which of `A`, `B`, `u`, `v` receive gradients. The rest are frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Trainable {
    /// The down-projection `A` (r×K).
    pub a: bool,
    /// The up-projection `B` (N×r).
    pub b: bool,
    /// The rank-side scaling vector `u` (r), one per layer.
    pub u: bool,
    /// The output-side scaling vector `v` (N), one per layer.
    pub v: bool,
}

impl Trainable {
    /// Everything trains (`"vBuA"`).
    pub const ALL: Trainable = Trainable { a: true, b: true, u: true, v: true };
    /// Only the factors train (`"BA"`): plain LoRA, or tied LoRA with
    /// frozen `u = v = 1`.
    pub const FACTORS: Trainable = Trainable { a: true, b: true, u: false, v: false };
    /// Only the scaling vectors train (`"vu"`): VeRA.
    pub const VECTORS: Trainable = Trainable { a: false, b: false, u: true, v: true };
    /// Nothing trains (`"-"`): a frozen adapter (dx still flows).
    pub const NONE: Trainable = Trainable { a: false, b: false, u: false, v: false };

    /// Every one of the 16 combinations, in the order of the bits
    /// `a, b, u, v` (all frozen first).
    pub fn all_combinations() -> impl Iterator<Item = Trainable> {
        (0..16u8).map(|bits| Trainable { a: bits & 8 != 0, b: bits & 4 != 0, u: bits & 2 != 0, v: bits & 1 != 0 })
    }

    /// The letters that train, in the order `v B u A` of the product
    /// `v ⊙ B·(u ⊙ A·x)`, e.g. `"vBuA"` (everything trains), `"vu"` (VeRA),
    /// `"BA"` (tied LoRA), `"-"` (nothing trains).
    ///
    /// The Tied-LoRA paper (Renduchintala et al., NAACL 2024, arXiv
    /// 2311.09578) names its configurations by these four letters with the
    /// trainable ones marked typographically, and numbers them TL1…TL6.
    /// Its exact table labels, which one it recommends and its
    /// initialisation of `u` and `v` could **not** be retrieved while this
    /// was written (only the abstract was reachable), so no `TLn` number is
    /// given here: these labels are this crate's own, by trainable letters.
    pub fn label(self) -> String {
        let mut s = String::new();
        for (on, c) in [(self.v, 'v'), (self.b, 'B'), (self.u, 'u'), (self.a, 'A')] {
            if on {
                s.push(c);
            }
        }
        if s.is_empty() {
            s.push('-');
        }
        s
    }
}

/// Which method an adapter follows; decides initialisation and whether the
/// scaling vectors exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Plain LoRA: `A`, `B` per layer, no `u`, `v`.
    Lora,
    /// Tied-LoRA: one `A`, `B` shared by all layers, per-layer `u`, `v`.
    TiedLora,
    /// VeRA: frozen shared random `A`, `B`; per-layer `u` (VeRA's `d`) and
    /// `v` (VeRA's `b`) train.
    Vera,
}

/// An adapter's hyper-parameters: rank, `α`, scaling rule, method and which
/// parts train.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LowRankConfig {
    /// Rank `r` (1..=[`MAX_RANK`]).
    pub rank: usize,
    /// `α`; the scale is `α/r` or `α/√r`.
    pub alpha: f32,
    /// How `α` and `r` give the scale.
    pub scaling: Scaling,
    /// The method (init and presence of `u`, `v`).
    pub method: Method,
    /// Which parts receive gradients.
    pub train: Trainable,
}

/// VeRA's initial value of `d` (our `u`): a small constant, 0.1 in the paper.
pub const VERA_U_INIT: f32 = 0.1;

impl LowRankConfig {
    /// Plain LoRA: `A` and `B` train, no `u`, `v`; `s = α/r`.
    pub fn lora(rank: usize, alpha: f32) -> Self {
        LowRankConfig { rank, alpha, scaling: Scaling::Standard, method: Method::Lora, train: Trainable::FACTORS }
    }

    /// Tied-LoRA with `train` choosing the trainable parts ([`Trainable::label`]
    /// names the configuration). `A`, `B` are shared by all layers;
    /// frozen `u`, `v` stay at ones.
    pub fn tied(rank: usize, alpha: f32, train: Trainable) -> Self {
        LowRankConfig { rank, alpha, scaling: Scaling::Standard, method: Method::TiedLora, train }
    }

    /// VeRA: frozen shared random `A`, `B`; `u` (init [`VERA_U_INIT`]) and
    /// `v` (init 0) train.
    pub fn vera(rank: usize, alpha: f32) -> Self {
        LowRankConfig { rank, alpha, scaling: Scaling::Standard, method: Method::Vera, train: Trainable::VECTORS }
    }

    /// The same config with rank-stabilised scaling `s = α/√r`.
    pub fn rs(mut self) -> Self {
        self.scaling = Scaling::RankStabilized;
        self
    }

    /// Rejects a rank outside `1..=MAX_RANK`, a non-finite `α`, or plain
    /// LoRA asked to train `u`/`v` it does not have.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(Error::invalid("adapter rank", format!("r = {}: must be in 1..={MAX_RANK}", self.rank)));
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid("adapter alpha", format!("{}: must be finite", self.alpha)));
        }
        if self.method == Method::Lora && (self.train.u || self.train.v) {
            return Err(Error::invalid(
                "adapter config",
                "plain LoRA has no u, v vectors: use LowRankConfig::tied to train them",
            ));
        }
        Ok(())
    }

    /// The adapter scale `s`.
    pub fn scale(&self) -> f32 {
        let r = self.rank.max(1) as f64;
        let s = match self.scaling {
            Scaling::Standard => self.alpha as f64 / r,
            Scaling::RankStabilized => self.alpha as f64 / r.sqrt(),
        };
        s as f32
    }

    /// Whether the layer carries `u` and `v` (Tied-LoRA and VeRA).
    pub fn has_vectors(&self) -> bool {
        self.method != Method::Lora
    }

    /// Initial `A` (r×K) and `B` (N×r), f32, from `rng`.
    ///
    /// - LoRA, Tied-LoRA: `A` Kaiming-uniform (`U(−1/√K, 1/√K)`, PyTorch's
    ///   `kaiming_uniform_(a=√5)` bound), `B = 0` when `B` trains (so
    ///   `ΔW = 0` at step 0); a frozen `B` is random like VeRA's (a frozen
    ///   zero `B` would make the adapter a no-op forever).
    /// - VeRA: both Kaiming-uniform, `U(−1/√fan_in, 1/√fan_in)`.
    pub fn init_factors(&self, k: usize, n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
        let r = self.rank;
        let ba = 1.0 / (k.max(1) as f32).sqrt();
        let a = rng.uniform_vec(r * k, -ba, ba);
        let b = if self.method != Method::Vera && self.train.b {
            vec![0.0; n * r]
        } else {
            let bb = 1.0 / (r.max(1) as f32).sqrt();
            rng.uniform_vec(n * r, -bb, bb)
        };
        (a, b)
    }

    /// Initial per-layer `u` (r) and `v` (N), or `None` when the method has
    /// none. VeRA: `u = 0.1`, `v = 0` (so `ΔW = 0` at step 0). Tied-LoRA:
    /// ones (frozen vectors are ones per `docs/methods.md`; trainable ones start at
    /// ones too, which this crate chose because the paper's init could not
    /// be retrieved, see [`Trainable::label`]).
    pub fn init_vectors(&self, n: usize) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let r = self.rank;
        match self.method {
            Method::Lora => (None, None),
            Method::TiedLora => (Some(vec![1.0; r]), Some(vec![1.0; n])),
            Method::Vera => (Some(vec![VERA_U_INIT; r]), Some(vec![0.0; n])),
        }
    }
}

/// The sizes of one call: `x` is M×K, `W` N×K, `A` r×K, `B` N×r.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of `x` (tokens).
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Adapter rank (ignored when no adapter is passed).
    pub r: usize,
}

impl std::fmt::Display for LinearShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "M={} K={} N={} r={}", self.m, self.k, self.n, self.r)
    }
}

/// A borrowed adapter on backend `B`: factors, optional scaling vectors
/// (`None` = ones) and the scale `s`. All f32.
pub struct Adapter<'a, B: Backend> {
    /// `A`, r×K row-major.
    pub a: &'a B::Buf<f32>,
    /// `B`, N×r row-major.
    pub b: &'a B::Buf<f32>,
    /// `u`, length r, or `None` for ones.
    pub u: Option<&'a B::Buf<f32>>,
    /// `v`, length N, or `None` for ones.
    pub v: Option<&'a B::Buf<f32>>,
    /// The scale `s` ([`LowRankConfig::scale`]).
    pub scale: f32,
}

impl<B: Backend> Clone for Adapter<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Adapter<'_, B> {}

/// Where the backward writes. `None` = not wanted (frozen): not computed.
/// `dx` is overwritten; every other gradient is **accumulated** (`+=`) and
/// is f32.
pub struct Grads<'a, B: Backend, T: Element> {
    /// `dx` (M×K, dtype `T`), overwritten.
    pub dx: Option<&'a mut B::Buf<T>>,
    /// `dW` (N×K, f32), accumulated.
    pub dw: Option<&'a mut B::Buf<f32>>,
    /// `dbias` (N, f32), accumulated.
    pub dbias: Option<&'a mut B::Buf<f32>>,
    /// `dA` (r×K), accumulated.
    pub da: Option<&'a mut B::Buf<f32>>,
    /// `dB` (N×r), accumulated.
    pub db: Option<&'a mut B::Buf<f32>>,
    /// `du` (r), accumulated. With `u = None` it is the gradient with
    /// respect to `u` at ones.
    pub du: Option<&'a mut B::Buf<f32>>,
    /// `dv` (N), accumulated. With `v = None` it is the gradient with
    /// respect to `v` at ones.
    pub dv: Option<&'a mut B::Buf<f32>>,
}

impl<B: Backend, T: Element> Grads<'_, B, T> {
    /// No gradient at all (fill the wanted ones with struct update syntax).
    pub fn none() -> Self {
        Grads { dx: None, dw: None, dbias: None, da: None, db: None, du: None, dv: None }
    }

    /// True when some adapter gradient (`dA`, `dB`, `du`, `dv`) is wanted.
    pub fn wants_adapter(&self) -> bool {
        self.da.is_some() || self.db.is_some() || self.du.is_some() || self.dv.is_some()
    }
}

/// The fused low-rank linear layer on any backend.
pub trait LowRankOps: Backend + Sized {
    /// `y = x·Wᵀ (+ bias) (+ s·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v)`, overwriting `y`
    /// (M×N). With an adapter and `t` given, `t` (M×r, f32) receives
    /// `x·Aᵀ` for the backward.
    #[allow(clippy::too_many_arguments)]
    fn lowrank_forward<T: Element>(
        &self,
        shape: LinearShape,
        x: &Self::Buf<T>,
        w: &Self::Buf<T>,
        bias: Option<&Self::Buf<T>>,
        adapter: Option<Adapter<'_, Self>>,
        y: &mut Self::Buf<T>,
        t: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;

    /// The backward of [`LowRankOps::lowrank_forward`] given `dy` (M×N):
    /// writes `dx`, accumulates the wanted parameter gradients. `t` is the
    /// forward's saved `x·Aᵀ`; pass `None` to have it recomputed. `x` is read
    /// only for `dA`, `dW` or a recomputed `t`; `w` only for `dx`.
    #[allow(clippy::too_many_arguments)]
    fn lowrank_backward<T: Element>(
        &self,
        shape: LinearShape,
        x: &Self::Buf<T>,
        w: &Self::Buf<T>,
        adapter: Option<Adapter<'_, Self>>,
        t: Option<&Self::Buf<f32>>,
        dy: &Self::Buf<T>,
        grads: Grads<'_, Self, T>,
    ) -> Result<()>;

    /// The engine form: `y += s·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v` in place, for a `y`
    /// that already holds the base layer's output.
    fn lowrank_add<T: Element>(
        &self,
        shape: LinearShape,
        x: &Self::Buf<T>,
        adapter: Adapter<'_, Self>,
        y: &mut Self::Buf<T>,
    ) -> Result<()>;
}

const FWD: &str = "lowrank_forward";
const BWD: &str = "lowrank_backward";

fn check(op: &'static str, operand: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if len == rows * cols {
        Ok(())
    } else {
        Err(Error::shape(op, operand, format!("{rows}x{cols} = {} elements", rows * cols), format!("{len} elements")))
    }
}

/// Lengths of an adapter's buffers, for validation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdapterLens {
    pub a: usize,
    pub b: usize,
    pub u: Option<usize>,
    pub v: Option<usize>,
    pub scale: f32,
}

impl AdapterLens {
    pub(crate) fn of<B: Backend>(ad: &Adapter<'_, B>) -> Self {
        AdapterLens {
            a: B::len(ad.a),
            b: B::len(ad.b),
            u: ad.u.map(|u| B::len(u)),
            v: ad.v.map(|v| B::len(v)),
            scale: ad.scale,
        }
    }
}

impl LinearShape {
    fn check_dims(&self, op: &'static str, adapter: bool) -> Result<()> {
        if self.m == 0 || self.k == 0 || self.n == 0 {
            return Err(Error::invalid(op, format!("{self}: M, K and N must all be at least 1")));
        }
        if adapter && (self.r == 0 || self.r > MAX_RANK) {
            return Err(Error::invalid(op, format!("{self}: rank must be in 1..={MAX_RANK}")));
        }
        let too_big = [self.m, self.k, self.n].iter().any(|&d| d > i32::MAX as usize)
            || self.m.checked_mul(self.k.max(self.n)).is_none_or(|p| p > i64::MAX as usize / 4);
        if too_big {
            return Err(Error::invalid(op, format!("{self}: dimensions too large")));
        }
        Ok(())
    }

    pub(crate) fn check_adapter(&self, op: &'static str, ad: &AdapterLens) -> Result<()> {
        check(op, "A", ad.a, self.r, self.k)?;
        check(op, "B", ad.b, self.n, self.r)?;
        if let Some(u) = ad.u {
            check(op, "u", u, 1, self.r)?;
        }
        if let Some(v) = ad.v {
            check(op, "v", v, 1, self.n)?;
        }
        if !ad.scale.is_finite() {
            return Err(Error::invalid(op, format!("adapter scale {} is not finite", ad.scale)));
        }
        Ok(())
    }

    /// Validates a forward call's operand lengths.
    pub(crate) fn check_forward(
        &self,
        x: usize,
        w: usize,
        bias: Option<usize>,
        adapter: Option<&AdapterLens>,
        y: usize,
        t: Option<usize>,
    ) -> Result<()> {
        self.check_dims(FWD, adapter.is_some())?;
        check(FWD, "x", x, self.m, self.k)?;
        check(FWD, "W", w, self.n, self.k)?;
        if let Some(b) = bias {
            check(FWD, "bias", b, 1, self.n)?;
        }
        check(FWD, "y", y, self.m, self.n)?;
        if let Some(ad) = adapter {
            self.check_adapter(FWD, ad)?;
            if let Some(t) = t {
                check(FWD, "t", t, self.m, self.r)?;
            }
        } else if t.is_some() {
            return Err(Error::invalid(FWD, "`t` was given but there is no adapter to compute it from"));
        }
        Ok(())
    }

    /// Validates an in-place add's operand lengths.
    pub(crate) fn check_add(&self, x: usize, adapter: &AdapterLens, y: usize) -> Result<()> {
        const OP: &str = "lowrank_add";
        self.check_dims(OP, true)?;
        check(OP, "x", x, self.m, self.k)?;
        check(OP, "y", y, self.m, self.n)?;
        self.check_adapter(OP, adapter)
    }

    /// Validates a backward call's operand lengths.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_backward(
        &self,
        x: usize,
        w: usize,
        adapter: Option<&AdapterLens>,
        t: Option<usize>,
        dy: usize,
        grads: &GradLens,
    ) -> Result<()> {
        self.check_dims(BWD, adapter.is_some())?;
        check(BWD, "x", x, self.m, self.k)?;
        check(BWD, "W", w, self.n, self.k)?;
        check(BWD, "dy", dy, self.m, self.n)?;
        if let Some(dx) = grads.dx {
            check(BWD, "dx", dx, self.m, self.k)?;
        }
        if let Some(dw) = grads.dw {
            check(BWD, "dW", dw, self.n, self.k)?;
        }
        if let Some(db) = grads.dbias {
            check(BWD, "dbias", db, 1, self.n)?;
        }
        let wants_adapter = grads.da.is_some() || grads.db.is_some() || grads.du.is_some() || grads.dv.is_some();
        match adapter {
            None if wants_adapter || t.is_some() => Err(Error::invalid(
                BWD,
                "adapter gradients (dA, dB, du, dv) or `t` were given but no adapter: pass the adapter",
            )),
            None => Ok(()),
            Some(ad) => {
                self.check_adapter(BWD, ad)?;
                if let Some(t) = t {
                    check(BWD, "t", t, self.m, self.r)?;
                }
                if let Some(l) = grads.da {
                    check(BWD, "dA", l, self.r, self.k)?;
                }
                if let Some(l) = grads.db {
                    check(BWD, "dB", l, self.n, self.r)?;
                }
                if let Some(l) = grads.du {
                    check(BWD, "du", l, 1, self.r)?;
                }
                if let Some(l) = grads.dv {
                    check(BWD, "dv", l, 1, self.n)?;
                }
                Ok(())
            }
        }
    }
}

/// Lengths of a [`Grads`]' buffers, for validation.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GradLens {
    pub dx: Option<usize>,
    pub dw: Option<usize>,
    pub dbias: Option<usize>,
    pub da: Option<usize>,
    pub db: Option<usize>,
    pub du: Option<usize>,
    pub dv: Option<usize>,
}

impl GradLens {
    pub(crate) fn of<B: Backend, T: Element>(g: &Grads<'_, B, T>) -> Self {
        GradLens {
            dx: g.dx.as_deref().map(B::len),
            dw: g.dw.as_deref().map(B::len),
            dbias: g.dbias.as_deref().map(B::len),
            da: g.da.as_deref().map(B::len),
            db: g.db.as_deref().map(B::len),
            du: g.du.as_deref().map(B::len),
            dv: g.dv.as_deref().map(B::len),
        }
    }
}
