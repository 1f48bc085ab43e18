//! The one comparison helper every test and self-check uses: it reports the
//! relative Frobenius error, max and mean absolute error, and the first
//! mismatching elements, so a failure says how and where it failed.

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
