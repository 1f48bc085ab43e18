//! CPU twin of `kernels/multi_adapter.cu`: the same plan (tiles of one
//! adapter, rank groups, column groups) and the same two steps under the
//! same names, `multi_adapter_shrink` and `multi_adapter_expand`, in f64,
//! converting to the storage dtype only when `y` is written. Factors are
//! read as the pool stores them (in `T`); Uni-LoRA entries are gathered
//! from `θ_d` and the column scales as the kernels gather them
//! (`θ_d[j]·scale_j` in f32).

use super::Cpu;
use crate::backend::Scalar;
use crate::dtype::Element;
use crate::multi_adapter::{desc, plan, AdapterPool, MultiAdapterOps, Plan, RowAdapters, DESC_WORDS, EXPAND_COLS};
use crate::projection::Projection;
use crate::{Error, Result};

/// One (slot, layer) descriptor, read the way the kernels read it.
struct Entry<'a, T: Element> {
    d: &'a [u32],
    pool: &'a AdapterPool<Cpu, T>,
    projection: Option<&'a Projection>,
    k: usize,
    n: usize,
}

impl<'a, T: Element> Entry<'a, T> {
    fn new(pool: &'a AdapterPool<Cpu, T>, entry: u32) -> Self {
        let cfg = pool.config();
        let e = entry as usize;
        let d = &pool.descs[e * DESC_WORDS..(e + 1) * DESC_WORDS];
        let projection = (d[desc::KIND] == desc::THETA).then(|| pool.projection_of_slot(e / cfg.layers)).flatten();
        Entry { d, pool, projection, k: cfg.k, n: cfg.n }
    }

    fn rank(&self) -> usize {
        self.d[desc::RANK] as usize
    }

    fn scale(&self) -> f64 {
        f32::from_bits(self.d[desc::SCALE]) as f64
    }

    fn vector(&self, word: usize, i: usize) -> f64 {
        match self.d[word] {
            desc::NONE => 1.0,
            off => self.pool.floats[off as usize + i] as f64,
        }
    }

    fn wide(&self, word: usize) -> u64 {
        self.d[word] as u64 | (self.d[word + 1] as u64) << 32
    }

    /// `θ_D[i] = θ_d[j(i)]·scale_j`, as f32 like the kernels.
    fn theta_d(&self, i: u64) -> f64 {
        let p = self.projection.expect("a θ entry's slot has a projection");
        let j = p.column(i) as usize;
        let theta = self.pool.floats[self.d[desc::BASE] as usize + j];
        let scale = self.pool.floats[self.d[desc::COLSCALE_OFF] as usize + j];
        (theta * scale) as f64
    }

    /// `A[q][k]`.
    fn a(&self, q: usize, k: usize) -> f64 {
        if self.d[desc::KIND] == desc::THETA {
            self.theta_d(self.wide(desc::A_START) + (q * self.k + k) as u64)
        } else {
            self.pool.a_rows[(self.d[desc::BASE] as usize + q) * self.k + k].to_f64()
        }
    }

    /// `B[n][q]` (stored as `Bᵀ` rows for factors).
    fn b(&self, n: usize, q: usize) -> f64 {
        if self.d[desc::KIND] == desc::THETA {
            self.theta_d(self.wide(desc::B_START) + (n * self.rank() + q) as u64)
        } else {
            self.pool.bt_rows[(self.d[desc::BASE] as usize + q) * self.n + n].to_f64()
        }
    }
}

/// `t'[row][q] = s·u_q·Σ_k x[row][k]·A[q][k]` for every shrink item (rows
/// of one tile, ranks `q0..q0+8`).
fn multi_adapter_shrink<T: Element>(pool: &AdapterPool<Cpu, T>, plan: &Plan, x: &[T], t: &mut [f64]) {
    let k = pool.config().k;
    for &[row0, rows, entry, q0] in &plan.shrink {
        let e = Entry::new(pool, entry);
        let q_end = e.rank().min(q0 as usize + crate::multi_adapter::SHRINK_RANKS);
        for q in q0 as usize..q_end {
            let a: Vec<f64> = (0..k).map(|kk| e.a(q, kk)).collect();
            let su = e.scale() * e.vector(desc::U_OFF, q);
            for row in row0 as usize..(row0 + rows) as usize {
                let xr = &x[row * k..(row + 1) * k];
                let dot: f64 = xr.iter().zip(&a).map(|(xv, av)| xv.to_f64() * av).sum();
                t[row * plan.ld_t + q] = su * dot;
            }
        }
    }
}

/// `y[row][j] += v_j·Σ_q t'[row][q]·B[j][q]` for every expand item (rows of
/// one tile, columns `n0..n0+2048`).
fn multi_adapter_expand<T: Element>(pool: &AdapterPool<Cpu, T>, plan: &Plan, t: &[f64], y: &mut [T]) {
    let n = pool.config().n;
    for &[row0, rows, entry, n0] in &plan.expand {
        let e = Entry::new(pool, entry);
        let r = e.rank();
        for j in n0 as usize..n.min(n0 as usize + EXPAND_COLS) {
            let b: Vec<f64> = (0..r).map(|q| e.b(j, q)).collect();
            let vj = e.vector(desc::V_OFF, j);
            for row in row0 as usize..(row0 + rows) as usize {
                let tr = &t[row * plan.ld_t..row * plan.ld_t + r];
                let acc: f64 = tr.iter().zip(&b).map(|(tv, bv)| tv * bv).sum();
                let out = &mut y[row * n + j];
                *out = T::from_f64(out.to_f64() + vj * acc);
            }
        }
    }
}

impl MultiAdapterOps for Cpu {
    fn write_at<T: Scalar>(&self, buf: &mut Vec<T>, offset: usize, host: &[T]) -> Result<()> {
        let end = offset.checked_add(host.len()).filter(|&e| e <= buf.len());
        let Some(end) = end else {
            return Err(Error::invalid(
                "write_at",
                format!("{} elements at offset {offset} run past the buffer's {}", host.len(), buf.len()),
            ));
        };
        buf[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn multi_adapter_add<T: Element>(
        &self,
        pool: &AdapterPool<Cpu, T>,
        layer: usize,
        rows: RowAdapters<'_>,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        let plan = plan(pool, layer, &rows, x.len(), y.len())?;
        let mut t = vec![0f64; rows.rows() * plan.ld_t];
        multi_adapter_shrink(pool, &plan, x, &mut t);
        multi_adapter_expand(pool, &plan, &t, y);
        Ok(())
    }
}
