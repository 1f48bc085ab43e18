//! Matrix products for the CPU backend, in f64, through the `gemm` crate
//! (blocked, SIMD, rayon-parallel). Every CPU op that multiplies matrices
//! goes through [`matmul`], so the oracle's accuracy and speed are set here.

use crate::{Error, Result};

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored (row-major).
    N,
    /// Transposed.
    T,
}

/// Below this many multiply-adds a single thread is faster than fanning out.
const PARALLEL_WORK: usize = 1 << 18;

/// `c = beta·c + alpha·op(a)·op(b)` with every matrix row-major: `op(a)` is
/// m×k, `op(b)` is k×n, `c` is m×n. `a` is stored m×k (`Op::N`) or k×m
/// (`Op::T`); `b` is stored k×n or n×k. With `beta = 0`, `c`'s old contents
/// are ignored (NaN in `c` does not leak through).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, k, n): (usize, usize, usize),
    a: &[f64],
    op_a: Op,
    b: &[f64],
    op_b: Op,
    c: &mut [f64],
    alpha: f64,
    beta: f64,
) -> Result<()> {
    let check = |operand: &'static str, len: usize, want: usize, shape: String| {
        if len == want {
            Ok(())
        } else {
            Err(Error::shape("matmul", operand, shape, format!("{len} elements")))
        }
    };
    check("a", a.len(), m * k, format!("{m}x{k} ({op_a:?})"))?;
    check("b", b.len(), k * n, format!("{k}x{n} ({op_b:?})"))?;
    check("c", c.len(), m * n, format!("{m}x{n}"))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { beta * *v });
        return Ok(());
    }
    // (row stride, column stride) of op(x) as stored.
    let (a_rs, a_cs) = match op_a {
        Op::N => (k as isize, 1),
        Op::T => (1, m as isize),
    };
    let (b_rs, b_cs) = match op_b {
        Op::N => (n as isize, 1),
        Op::T => (1, k as isize),
    };
    let parallelism = if m * n * k >= PARALLEL_WORK {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the lengths checked above cover every index the strides reach;
    // `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(m: usize, k: usize, n: usize, a: &[f64], op_a: Op, b: &[f64], op_b: Op) -> Vec<f64> {
        let at = |i: usize, l: usize| if op_a == Op::N { a[i * k + l] } else { a[l * m + i] };
        let bt = |l: usize, j: usize| if op_b == Op::N { b[l * n + j] } else { b[j * k + l] };
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_for_every_transpose_and_odd_shapes() {
        let mut rng = Rng::new(11);
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 3), (5, 1, 9), (17, 33, 65), (64, 70, 1), (130, 67, 129)] {
            for op_a in [Op::N, Op::T] {
                for op_b in [Op::N, Op::T] {
                    let a: Vec<f64> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
                    let b: Vec<f64> = (0..k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                    let c0: Vec<f64> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                    let mut c = c0.clone();
                    matmul((m, k, n), &a, op_a, &b, op_b, &mut c, 0.5, 2.0).unwrap();
                    let want: Vec<f64> =
                        naive(m, k, n, &a, op_a, &b, op_b).iter().zip(&c0).map(|(p, c)| 0.5 * p + 2.0 * c).collect();
                    let cmp = crate::testing::compare(c.iter().copied(), want.iter().copied());
                    assert!(cmp.within(1e-12), "m={m} k={k} n={n} {op_a:?}{op_b:?}: {cmp}");
                }
            }
        }
    }

    #[test]
    fn beta_zero_ignores_nan_in_c_and_shapes_are_checked() {
        let mut c = vec![f64::NAN; 4];
        matmul((2, 1, 2), &[1.0, 2.0], Op::N, &[3.0, 4.0], Op::N, &mut c, 1.0, 0.0).unwrap();
        assert_eq!(c, vec![3.0, 4.0, 6.0, 8.0]);
        let err = matmul((2, 2, 2), &[1.0; 3], Op::N, &[1.0; 4], Op::N, &mut c, 1.0, 0.0).unwrap_err();
        assert!(err.to_string().contains("`a`"), "{err}");
    }
}
