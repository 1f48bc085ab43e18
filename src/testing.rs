//! The one comparison helper every test and self-check uses: it reports the
//! relative Frobenius error, max and mean absolute error, and the first
//! mismatching elements, so a failure says how and where it failed.
//!
//! Kernel outputs are checked with [`check_bounded`]: each element against
//! its own error bound, derived from the reduction length, the magnitudes
//! summed and the storage types ([`ErrorBound`], notes below).

use std::fmt;

/// How far `got` is from `want`.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// Elements compared.
    pub len: usize,
    /// `‖got − want‖₂ / ‖want‖₂` (absolute error when `want` is all zeros).
    pub rel_frobenius: f64,
    /// Largest `|got − want|`.
    pub max_abs: f64,
    /// Mean `|got − want|`.
    pub mean_abs: f64,
    /// Elements where `got` is NaN or infinite but `want` is finite, or the
    /// other way around.
    pub non_finite: usize,
    /// The first few worst offenders: (index, got, want).
    pub worst: Vec<(usize, f64, f64)>,
}

impl Comparison {
    /// True when the relative error is within `tol` and nothing is
    /// non-finite that should not be.
    pub fn within(&self, tol: f64) -> bool {
        self.non_finite == 0 && self.rel_frobenius <= tol
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rel_frobenius={:.3e} max_abs={:.3e} mean_abs={:.3e} non_finite={} over {} elements",
            self.rel_frobenius, self.max_abs, self.mean_abs, self.non_finite, self.len
        )?;
        for (i, g, w) in &self.worst {
            write!(f, "\n    [{i}] got {g:.9e} want {w:.9e} (diff {:.3e})", (g - w).abs())?;
        }
        Ok(())
    }
}

/// Compares two equally long sequences (converted to f64).
pub fn compare(got: impl IntoIterator<Item = f64>, want: impl IntoIterator<Item = f64>) -> Comparison {
    let (mut diff2, mut want2, mut sum_abs, mut max_abs) = (0f64, 0f64, 0f64, 0f64);
    let (mut len, mut non_finite) = (0usize, 0usize);
    let mut offenders: Vec<(usize, f64, f64)> = Vec::new();
    let mut got = got.into_iter();
    for w in want {
        let g = got.next().unwrap_or(f64::NAN);
        if g.is_finite() != w.is_finite() || (g.is_nan() != w.is_nan()) {
            non_finite += 1;
            offenders.push((len, g, w));
        } else if g.is_finite() {
            let d = (g - w).abs();
            diff2 += d * d;
            want2 += w * w;
            sum_abs += d;
            if d > max_abs {
                max_abs = d;
            }
            if d > 0.0 {
                offenders.push((len, g, w));
            }
        }
        len += 1;
    }
    let extra = got.count();
    non_finite += extra;
    offenders.sort_by(|a, b| {
        let da = if a.1.is_finite() { (a.1 - a.2).abs() } else { f64::INFINITY };
        let db = if b.1.is_finite() { (b.1 - b.2).abs() } else { f64::INFINITY };
        db.total_cmp(&da)
    });
    offenders.truncate(5);
    let rel = if want2 > 0.0 { (diff2 / want2).sqrt() } else { diff2.sqrt() };
    Comparison {
        len,
        rel_frobenius: rel,
        max_abs,
        mean_abs: if len > 0 { sum_abs / len as f64 } else { 0.0 },
        non_finite,
        worst: offenders,
    }
}

/// Compares slices of any element type against an f64 reference and returns
/// `Err` with the full report (prefixed by `context`: shape, dtype, seed)
/// when the relative error exceeds `tol`.
pub fn check_close<T: crate::dtype::Element>(
    context: &str,
    got: &[T],
    want: &[f64],
    tol: f64,
) -> Result<Comparison, String> {
    let c = compare(got.iter().map(|v| v.to_f64()), want.iter().copied());
    if got.len() != want.len() {
        return Err(format!("{context}: length {} != expected {}", got.len(), want.len()));
    }
    if c.within(tol) {
        Ok(c)
    } else {
        Err(format!("{context}: error above tolerance {tol:.1e}: {c}"))
    }
}

// ---- derived error bounds ------------------------------------------------
//
// A fixed relative tolerance is wrong for reductions: the rounding error of
// a sum grows with its length and with the magnitudes summed, not with the
// size of the result (a sum of large terms that cancel to ~0 carries the
// error of the large terms). So every compared element gets its own bound,
// from quantities the oracle knows ([`Magnitude`]):
//
//   bound_i = acc · S_i + k·u_T · R_i + 2·u_out·|want_i| + tiny_out
//
// One reduction of n terms (the common case, [`Magnitude::sum`]): with
// M = Σ|terms| (the products as the oracle forms them, in f64),
//   S = √n·M for f32 accumulation, S = n·M for tensor cores, R = M,
// so the bound is the familiar c·u·√n·Σ|terms| plus the storage terms:
//
// * acc, the accumulation error per unit of S. Every kernel accumulates in
//   f32 and the CPU oracle in f64 ([`Accumulation`]).
//   - f32 FMAs rounding to nearest (CUDA cores): Higham & Mary ("A new
//     approach to probabilistic rounding error analysis", SIAM J. Sci.
//     Comput. 41(5), 2019) model rounding errors as independent, mean-zero
//     and bounded by u; then |ŝ − s| ≤ λ·√n·u·Σ|terms| (first order) except
//     with probability at most 2n·exp(−λ²(1−u)²/2). λ = 8 makes that
//     2n·1.3e-14, under 1e-7 for a million-term sum, so runs comparing
//     millions of elements do not fail by chance: acc = 8·u₃₂, u₃₂ = 2⁻²⁴.
//     For n ≤ 64, 8·√n ≥ n: the deterministic worst case is covered too.
//   - tensor cores (16-bit inputs) accumulate in f32 with truncation (Fasi,
//     Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor
//     cores", PeerJ CS 2021): biased errors, so the deterministic bound with
//     2·u₃₂ per addition, acc = 2·u₃₂ on S = n·M.
//   - f64 (the oracle against an independent f64 reference): acc = 8·2⁻⁵³.
// * k·u_T·R: k roundings of an intermediate to the 16-bit storage type
//   (u_T = 2⁻¹¹ f16, 2⁻⁸ bf16) per term, e.g. t·u cast to bf16 for a
//   tensor-core GEMM: each changes its term by at most u_T relatively, so
//   together at most k·u_T·R (first order, deterministic). k comes from the
//   kernel's design header.
// * 2·u_out·|want_i|: the oracle and the kernel each round the result once
//   to the output type.
// * tiny_out: f16 rounds absolutely below its normal range (2⁻²⁴ per side).
//
// Nested reductions (t = x·Aᵀ, then y = t·Bᵀ) are built with
// [`Magnitude::nested`] from [`Level`]s. To first order the error of the
// output is Σ_j δ_j·c_j over every rounding j of the whole computation,
// c_j = (partial sum rounded at j) × (|factors it is multiplied with
// afterwards|); with the δ_j mean-zero and bounded by u, Azuma's inequality
// (the argument behind Higham & Mary's bound) gives |error| ≤ λ·u·√(Σ c_j²)
// except with probability 2·exp(−λ²/2). An inner reduction i of n terms
// has n roundings with |partial sums| ≤ its Σ|terms|, so it adds
// n·(weight_i·Σ|terms|_i)² under the root: levels and the inner reductions
// of one level add in quadrature ([`Level::inner`]), the output's own
// reduction gives Higham & Mary's √n·Σ|terms|. The deterministic parts add
// linearly: S = Σ n·Σ|terms|, R = Σ Σ|terms| over the levels whose terms
// pass through 16-bit intermediates. Expanding every product into
// elementary terms instead would also be a valid bound, but for a gradient
// like du (an f32 sum over M of products of sums over K and N) it is
// ~10⁴ times the result and could not fail.
//
// What this can catch: for a single reduction with random signs Σ|terms|
// is about √n·|result|, so in f32 a wrong scale of 1 + 1e-3, a dropped term
// or an off-by-one index shows for reduction lengths up to thousands; in
// bf16 the output rounding alone is 0.4 %, so only errors of a few percent
// of |result| show: dropped rows/columns, wrong indices, wrong scales,
// unwritten outputs.

/// Unit roundoff `u` of a storage type: half the spacing of numbers in
/// `[1, 2)`, the largest relative error of one round-to-nearest.
pub const fn unit_roundoff(dtype: crate::DType) -> f64 {
    match dtype {
        crate::DType::F32 => 1.0 / 16_777_216.0, // 2^-24
        crate::DType::F16 => 1.0 / 2048.0,       // 2^-11
        crate::DType::BF16 => 1.0 / 256.0,       // 2^-8
    }
}

/// λ of the probabilistic summation bound (see the module notes): the
/// chance that one element of an f32 reduction of length n exceeds its bound
/// by chance is at most 2n·exp(−λ²/2) ≈ n·2.5e-14.
pub const LAMBDA: f64 = 8.0;

/// How the compared value accumulated its sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulation {
    /// f64 (the CPU oracle, naive references): λ·2⁻⁵³ per unit of √n·Σ|terms|.
    F64,
    /// f32 FMAs rounding to nearest (CUDA cores): λ·2⁻²⁴ per unit of √n·Σ|terms|.
    F32,
    /// 16-bit products accumulated in f32 by tensor cores, which truncate:
    /// the deterministic 2·2⁻²⁴ per unit of n·Σ|terms|.
    TensorCore,
}

/// Reductions of one kind feeding an output (one level of a nested
/// computation), reduced to what the bound needs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Level {
    /// Σ over the level's reductions of n·(Σ|terms|)², the terms weighted
    /// by the factors the reduction's result is multiplied with afterwards.
    pub spread2: f64,
    /// Σ over the level's reductions of n·Σ|terms| (same weighting).
    pub worst: f64,
    /// Σ|terms| (same weighting).
    pub sum_abs: f64,
    /// True when the terms pass through the kernel's 16-bit intermediates.
    pub rounded: bool,
}

impl Level {
    /// One reduction of `n` terms whose absolute values sum to `sum_abs`.
    pub fn sum(n: usize, sum_abs: f64, rounded: bool) -> Level {
        let n = n.max(1) as f64;
        Level { spread2: n * sum_abs * sum_abs, worst: n * sum_abs, sum_abs, rounded }
    }

    /// Independent inner reductions of `n` terms each, one per outer index,
    /// with `weighted[i]` = |factor multiplying reduction i's result| ×
    /// its Σ|terms|. Their roundings are distinct random variables, so in
    /// the probabilistic bound they add in quadrature over i as well.
    pub fn inner(n: usize, weighted: impl IntoIterator<Item = f64>, rounded: bool) -> Level {
        let n = n.max(1) as f64;
        let mut l = Level { rounded, ..Level::default() };
        for w in weighted {
            l.spread2 += n * w * w;
            l.worst += n * w;
            l.sum_abs += w;
        }
        l
    }
}

/// The per-element quantities of a bound, computed by the oracle.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Magnitude {
    /// √(Σ_levels spread2): the scale of f32/f64 accumulation errors
    /// (√n·Σ|terms| for one reduction).
    pub spread: f64,
    /// Σ_levels worst: the scale of tensor-core accumulation errors
    /// (n·Σ|terms| for one reduction).
    pub worst: f64,
    /// Σ|terms| over the levels rounded to 16 bits on the way.
    pub rounded: f64,
}

impl Magnitude {
    /// One reduction of `n` terms whose absolute values sum to `sum_abs`
    /// (through the kernel's intermediate roundings, if any).
    pub fn sum(n: usize, sum_abs: f64) -> Magnitude {
        Magnitude::nested(&[Level::sum(n, sum_abs, true)])
    }

    /// The levels feeding one output. Their rounding errors are
    /// independent: the √n parts add in quadrature, the worst cases add.
    pub fn nested(levels: &[Level]) -> Magnitude {
        let mut m = Magnitude::default();
        let mut spread2 = 0.0;
        for l in levels {
            spread2 += l.spread2;
            m.worst += l.worst;
            if l.rounded {
                m.rounded += l.sum_abs;
            }
        }
        m.spread = spread2.sqrt();
        m
    }

    /// Magnitudes of a single reduction of length `n` for every element.
    pub fn sums(n: usize, sum_abs: &[f64]) -> Vec<Magnitude> {
        sum_abs.iter().map(|&m| Magnitude::sum(n, m)).collect()
    }
}

/// How an output was computed: the accumulation and the 16-bit roundings
/// of intermediates per term.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorBound {
    /// How the sums were accumulated.
    pub accumulation: Accumulation,
    /// The storage type intermediates are rounded to.
    pub storage: crate::DType,
    /// Roundings of an intermediate to `storage` per term.
    pub intermediates: u32,
}

impl ErrorBound {
    /// A GPU kernel over inputs stored as `inputs`: f32 on CUDA cores;
    /// f16/bf16 on tensor cores with one rounding of an intermediate to the
    /// 16-bit type per term (set the kernel's count with
    /// [`ErrorBound::intermediates`]).
    pub fn gpu(inputs: crate::DType) -> ErrorBound {
        let (accumulation, intermediates) =
            if inputs == crate::DType::F32 { (Accumulation::F32, 0) } else { (Accumulation::TensorCore, 1) };
        ErrorBound { accumulation, storage: inputs, intermediates }
    }

    /// A computation on CUDA cores in f32 with 16-bit storage (elementwise
    /// and reduction kernels that load T, compute in f32 and store T).
    pub fn cuda_cores(storage: crate::DType) -> ErrorBound {
        ErrorBound { accumulation: Accumulation::F32, storage, intermediates: 0 }
    }

    /// Sums in f64 (the CPU oracle against an independent f64 reference):
    /// only the output rounding is visible.
    pub fn f64() -> ErrorBound {
        ErrorBound { accumulation: Accumulation::F64, storage: crate::DType::F32, intermediates: 0 }
    }

    /// The same with `k` roundings of intermediates to the storage type
    /// (ignored for f32 storage, whose roundings the accumulation counts).
    pub fn intermediates(self, k: u32) -> ErrorBound {
        ErrorBound { intermediates: if self.storage == crate::DType::F32 { 0 } else { k }, ..self }
    }

    /// The bound of one element: `m` from the oracle, `want` the oracle's
    /// value, `out` the type both sides rounded the result to.
    pub fn of(&self, m: Magnitude, want: f64, out: crate::DType) -> f64 {
        let acc = match self.accumulation {
            Accumulation::F64 => LAMBDA * f64::EPSILON / 2.0 * m.spread,
            Accumulation::F32 => LAMBDA * unit_roundoff(crate::DType::F32) * m.spread,
            Accumulation::TensorCore => 2.0 * unit_roundoff(crate::DType::F32) * m.worst,
        };
        let mid = self.intermediates as f64 * unit_roundoff(self.storage) * m.rounded;
        let tiny = if out == crate::DType::F16 { 1.0 / 16_777_216.0 } else { 0.0 };
        acc + mid + 2.0 * unit_roundoff(out) * want.abs() + tiny
    }
}

/// The result of a bounded comparison: the usual errors plus how each
/// element stood against its own bound.
#[derive(Clone, Debug)]
pub struct Bounded {
    /// Errors over all elements (relative Frobenius for information only).
    pub errors: Comparison,
    /// Elements whose error exceeds their bound (non-finite mismatches
    /// included).
    pub exceeded: usize,
    /// Largest `|got − want| / bound` (∞ when a bound of 0 is exceeded).
    pub max_ratio: f64,
    /// Mean of the per-element bounds.
    pub mean_bound: f64,
    /// The worst elements by error/bound: (index, got, want, bound).
    pub worst: Vec<(usize, f64, f64, f64)>,
}

impl fmt::Display for Bounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.errors;
        write!(
            f,
            "max_abs={:.3e} mean_abs={:.3e} mean_bound={:.3e} max err/bound={:.3} exceeded={} \
             non_finite={} over {} elements (rel_frobenius={:.3e})",
            e.max_abs, e.mean_abs, self.mean_bound, self.max_ratio, self.exceeded, e.non_finite, e.len, e.rel_frobenius
        )?;
        for (i, g, w, b) in &self.worst {
            write!(f, "\n    [{i}] got {g:.9e} want {w:.9e} (diff {:.3e}, bound {b:.3e})", (g - w).abs())?;
        }
        Ok(())
    }
}

/// `|v|` element-wise: inputs for running a sum-of-products oracle on
/// absolute values, which yields Σ|terms| of every output.
pub fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|e| e.abs()).collect()
}

/// Compares `got` against the oracle's `want`, each element against
/// `bound.of(magnitude[i], want[i], T::DTYPE)`; `Err` (prefixed by
/// `context`: shape, dtype, seed) with the full report when any element
/// exceeds its bound, a length differs, or finiteness differs.
pub fn check_bounded<T: crate::dtype::Element>(
    context: &str,
    got: &[T],
    want: &[f64],
    magnitude: &[Magnitude],
    bound: ErrorBound,
) -> Result<Bounded, String> {
    if got.len() != want.len() || magnitude.len() != want.len() {
        return Err(format!(
            "{context}: length {} != expected {} (magnitudes: {})",
            got.len(),
            want.len(),
            magnitude.len()
        ));
    }
    let errors = compare(got.iter().map(|v| v.to_f64()), want.iter().copied());
    let (mut exceeded, mut max_ratio, mut bound_sum) = (0usize, 0f64, 0f64);
    let mut worst: Vec<(f64, (usize, f64, f64, f64))> = Vec::new();
    for (i, ((g, &w), &m)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let g = g.to_f64();
        let b = bound.of(m, w, T::DTYPE);
        bound_sum += b;
        let ratio = if g.is_finite() && w.is_finite() {
            let d = (g - w).abs();
            if d == 0.0 {
                0.0
            } else if b > 0.0 {
                d / b
            } else {
                f64::INFINITY
            }
        } else if g == w || (g.is_nan() && w.is_nan()) {
            0.0 // the same infinity, or NaN where NaN is wanted
        } else {
            f64::INFINITY
        };
        if ratio > 1.0 {
            exceeded += 1;
        }
        max_ratio = max_ratio.max(ratio);
        if ratio > 0.0 {
            worst.push((ratio, (i, g, w, b)));
            if worst.len() > 64 {
                worst.sort_by(|a, b| b.0.total_cmp(&a.0));
                worst.truncate(5);
            }
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    worst.truncate(5);
    let report = Bounded {
        errors,
        exceeded,
        max_ratio,
        mean_bound: if want.is_empty() { 0.0 } else { bound_sum / want.len() as f64 },
        worst: worst.into_iter().map(|(_, w)| w).collect(),
    };
    if exceeded == 0 {
        Ok(report)
    } else {
        Err(format!("{context}: {exceeded} element(s) above their error bound ({bound:?}): {report}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// A sum of n f32 products against its f64 value stays inside the bound,
    /// and the same sum with one term dropped or scaled by 1 + 1e-3 does not.
    #[test]
    fn bound_holds_for_f32_sums_and_catches_a_dropped_term_and_a_wrong_scale() {
        let mut rng = crate::rng::Rng::new(5);
        for &n in &[1usize, 7, 300, 5000] {
            let (x, y) = (rng.uniform_vec(n, -1.0, 1.0), rng.uniform_vec(n, -1.0, 1.0));
            let exact: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = x.iter().zip(&y).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let f32sum = x.iter().zip(&y).fold(0f32, |s, (&a, &b)| a.mul_add(b, s));
            let b = ErrorBound::gpu(DType::F32);
            let mag = [Magnitude::sum(n, mag)];
            check_bounded("f32 dot", &[f32sum], &[exact], &mag, b).unwrap();
            if n >= 7 {
                let big = (0..n).max_by(|&i, &j| (x[i] * y[i]).abs().total_cmp(&(x[j] * y[j]).abs())).unwrap();
                let dropped = f32sum - x[big] * y[big];
                assert!(check_bounded("dropped", &[dropped], &[exact], &mag, b).is_err(), "n={n}");
            }
            if n <= 300 {
                // A 1e-3 scale error is caught when |exact| is not tiny next to
                // the bound; use a sum of same-sign terms to make it so.
                let pos: f64 = x.iter().zip(&y).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let scaled = (pos * (1.0 + 1e-3)) as f32;
                assert!(check_bounded("scale", &[scaled], &[pos], &[Magnitude::sum(n, pos)], b).is_err(), "n={n}");
            }
        }
    }

    #[test]
    fn bound_rounds_16_bit_outputs_and_reports_the_worst_elements() {
        let want = [1.0, 3.0, -2.5];
        let mag = Magnitude::sums(4, &[1.0, 3.0, 2.5]);
        let b = ErrorBound::gpu(DType::BF16);
        let got: Vec<half::bf16> = want.iter().map(|&w| half::bf16::from_f64(w * (1.0 + 1.0 / 512.0))).collect();
        check_bounded("bf16 within", &got, &want, &mag, b).unwrap();
        let bad: Vec<half::bf16> = want.iter().map(|&w| half::bf16::from_f64(w * 1.05)).collect();
        let e = check_bounded("bf16 off by 5%", &bad, &want, &mag, b).unwrap_err();
        assert!(e.contains("3 element(s) above") && e.contains("bound"), "{e}");
        let nan = [half::bf16::NAN, got[1], got[2]];
        assert!(check_bounded("nan", &nan, &want, &mag, b).is_err());
        assert!(check_bounded("len", &got[..2], &want, &mag, b).is_err());
    }
}
