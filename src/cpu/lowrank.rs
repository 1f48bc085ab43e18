//! CPU twin of `kernels/lowrank.cu`: the same steps under the same names
//! (`lowrank_shrink`, `lowrank_expand_add`, `lowrank_backward_dy`,
//! `lowrank_grad_a`), in f64 through [`matmul`], converting to the storage
//! dtype only at the edges. It is the oracle the kernels are tested
//! against, and the backend the CPU trainer uses.

use super::gemm::{matmul, Op};
use super::Cpu;
use crate::dtype::{widen, Element};
use crate::lowrank::packed::{self, PackedLayout, PackedOps};
use crate::lowrank::{Adapter, AdapterLens, GradLens, Grads, LinearShape, LowRankOps};
use crate::{Error, Result};

/// An adapter widened to f64 once per call.
struct Wide {
    a: Vec<f64>,
    b: Vec<f64>,
    u: Option<Vec<f64>>,
    v: Option<Vec<f64>>,
    s: f64,
}

impl Wide {
    fn of(ad: &Adapter<'_, Cpu>) -> Self {
        Wide {
            a: widen(ad.a),
            b: widen(ad.b),
            u: ad.u.map(|u| widen(u)),
            v: ad.v.map(|v| widen(v)),
            s: ad.scale as f64,
        }
    }
}

/// Multiplies every row of the `rows × cols` matrix `m` by `vec` (length
/// `cols`), elementwise; no-op for `None` (ones).
fn scale_columns(m: &mut [f64], cols: usize, vec: Option<&[f64]>) {
    if let Some(vec) = vec {
        for row in m.chunks_exact_mut(cols) {
            row.iter_mut().zip(vec).for_each(|(e, s)| *e *= s);
        }
    }
}

/// Shrink: `t = x·Aᵀ` (M×r) for `x` M×K, `A` r×K.
pub fn lowrank_shrink(shape: LinearShape, x: &[f64], a: &[f64]) -> Result<Vec<f64>> {
    let LinearShape { m, k, r, .. } = shape;
    let mut t = vec![0.0; m * r];
    matmul((m, k, r), x, Op::N, a, Op::T, &mut t, 1.0, 0.0)?;
    Ok(t)
}

/// Expand-and-add: `y += s·((t ⊙ u)·Bᵀ) ⊙ v` for `t` M×r, `B` N×r.
fn lowrank_expand_add(shape: LinearShape, t: &[f64], w: &Wide, y: &mut [f64]) -> Result<()> {
    let LinearShape { m, n, r, .. } = shape;
    let mut tu = t.to_vec();
    scale_columns(&mut tu, r, w.u.as_deref());
    let mut z = vec![0.0; m * n];
    matmul((m, r, n), &tu, Op::N, &w.b, Op::T, &mut z, w.s, 0.0)?;
    scale_columns(&mut z, n, w.v.as_deref());
    y.iter_mut().zip(&z).for_each(|(y, z)| *y += z);
    Ok(())
}

/// What one read of `dy` gives: `gB = (dy ⊙ v)·B` (M×r, before `⊙ u`),
/// `dS = s·gB ⊙ u` (M×r), and `P = dyᵀ·(t ⊙ u)` (N×r) from which
/// `dB = s·v ⊙ P` and `dv = s·rowsum(P ⊙ B)` follow (so `dv` reuses the
/// product `dB` forms instead of building the M×N matrix `(t⊙u)·Bᵀ`).
struct DyProducts {
    gb: Vec<f64>,
    ds: Vec<f64>,
    p: Option<Vec<f64>>,
}

/// The `dy` side of the backward (see [`DyProducts`]); `P` only when `dB`
/// or `dv` is wanted.
fn lowrank_backward_dy(shape: LinearShape, dy: &[f64], t: &[f64], w: &Wide, want_p: bool) -> Result<DyProducts> {
    let LinearShape { m, n, r, .. } = shape;
    let mut g = dy.to_vec();
    scale_columns(&mut g, n, w.v.as_deref());
    let mut gb = vec![0.0; m * r];
    matmul((m, n, r), &g, Op::N, &w.b, Op::N, &mut gb, 1.0, 0.0)?;
    let mut ds: Vec<f64> = gb.iter().map(|e| e * w.s).collect();
    scale_columns(&mut ds, r, w.u.as_deref());
    let p = if want_p {
        let mut tu = t.to_vec();
        scale_columns(&mut tu, r, w.u.as_deref());
        let mut p = vec![0.0; n * r];
        matmul((n, m, r), dy, Op::T, &tu, Op::N, &mut p, 1.0, 0.0)?;
        Some(p)
    } else {
        None
    };
    Ok(DyProducts { gb, ds, p })
}

/// `dA += dSᵀ·x` (r×K) and `du += s·colsum(t ⊙ gB)` (r).
fn lowrank_grad_a(
    shape: LinearShape,
    x: Option<&[f64]>,
    t: &[f64],
    prod: &DyProducts,
    s: f64,
    da: Option<&mut Vec<f32>>,
    du: Option<&mut Vec<f32>>,
) -> Result<()> {
    let LinearShape { m, k, r, .. } = shape;
    if let (Some(da), Some(x)) = (da, x) {
        let mut acc = widen(da);
        matmul((r, m, k), &prod.ds, Op::T, x, Op::N, &mut acc, 1.0, 1.0)?;
        da.iter_mut().zip(&acc).for_each(|(d, a)| *d = *a as f32);
    }
    if let Some(du) = du {
        let mut col = vec![0.0; r];
        for (trow, grow) in t.chunks_exact(r).zip(prod.gb.chunks_exact(r)) {
            for j in 0..r {
                col[j] += trow[j] * grow[j];
            }
        }
        du.iter_mut().zip(&col).for_each(|(d, c)| *d = (*d as f64 + s * c) as f32);
    }
    Ok(())
}

fn accumulate(dst: &mut [f32], add: impl Iterator<Item = f64>) {
    dst.iter_mut().zip(add).for_each(|(d, a)| *d = (*d as f64 + a) as f32);
}

impl LowRankOps for Cpu {
    fn lowrank_forward<T: Element>(
        &self,
        shape: LinearShape,
        x: &Vec<T>,
        w: &Vec<T>,
        bias: Option<&Vec<T>>,
        adapter: Option<Adapter<'_, Cpu>>,
        y: &mut Vec<T>,
        t: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let lens = adapter.as_ref().map(AdapterLens::of);
        shape.check_forward(
            x.len(),
            w.len(),
            bias.map(Vec::len),
            lens.as_ref(),
            y.len(),
            t.as_deref().map(Vec::len),
        )?;
        let LinearShape { m, k, n, .. } = shape;
        let xf = widen(x);
        let mut acc = vec![0.0; m * n];
        matmul((m, k, n), &xf, Op::N, &widen(w), Op::T, &mut acc, 1.0, 0.0)?;
        if let Some(bias) = bias {
            let bias = widen(bias);
            acc.chunks_exact_mut(n).for_each(|row| row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b));
        }
        if let Some(ad) = adapter {
            let wide = Wide::of(&ad);
            let tt = lowrank_shrink(shape, &xf, &wide.a)?;
            lowrank_expand_add(shape, &tt, &wide, &mut acc)?;
            if let Some(t) = t {
                t.iter_mut().zip(&tt).for_each(|(o, v)| *o = *v as f32);
            }
        }
        y.iter_mut().zip(&acc).for_each(|(o, v)| *o = T::from_f64(*v));
        Ok(())
    }

    fn lowrank_backward<T: Element>(
        &self,
        shape: LinearShape,
        x: &Vec<T>,
        w: &Vec<T>,
        adapter: Option<Adapter<'_, Cpu>>,
        t: Option<&Vec<f32>>,
        dy: &Vec<T>,
        grads: Grads<'_, Cpu, T>,
    ) -> Result<()> {
        let lens = adapter.as_ref().map(AdapterLens::of);
        let glens = GradLens::of(&grads);
        shape.check_backward(x.len(), w.len(), lens.as_ref(), t.map(Vec::len), dy.len(), &glens)?;
        let LinearShape { m, k, n, r } = shape;
        let Grads { dx, dw, dbias, da, db, du, dv } = grads;
        let dyf = widen(dy);
        // t only feeds du, dB and dv: a dx-only backward never recomputes it.
        let need_t = du.is_some() || db.is_some() || dv.is_some();
        let need_x = dw.is_some() || da.is_some() || (adapter.is_some() && t.is_none() && need_t);
        let xf = if need_x { Some(widen(x)) } else { None };

        if let Some(dbias) = dbias {
            let mut col = vec![0.0; n];
            dyf.chunks_exact(n).for_each(|row| row.iter().zip(&mut col).for_each(|(g, c)| *c += g));
            accumulate(dbias, col.into_iter());
        }
        if let (Some(dw), Some(xf)) = (dw, xf.as_ref()) {
            let mut acc = widen(dw);
            matmul((n, m, k), &dyf, Op::T, xf, Op::N, &mut acc, 1.0, 1.0)?;
            dw.iter_mut().zip(&acc).for_each(|(d, a)| *d = *a as f32);
        }

        let mut dx_acc = dx.as_ref().map(|_| vec![0.0; m * k]);
        if let Some(acc) = dx_acc.as_mut() {
            matmul((m, n, k), &dyf, Op::N, &widen(w), Op::N, acc, 1.0, 0.0)?;
        }

        if let Some(ad) = adapter {
            let wide = Wide::of(&ad);
            let want_ds = dx.is_some() || da.is_some() || du.is_some();
            let want_p = db.is_some() || dv.is_some();
            if want_ds || want_p {
                let tt = match t {
                    _ if !need_t => Vec::new(),
                    Some(t) => widen(t),
                    None => lowrank_shrink(shape, xf.as_deref().unwrap_or(&[]), &wide.a)?,
                };
                let prod = lowrank_backward_dy(shape, &dyf, &tt, &wide, want_p)?;
                if let Some(acc) = dx_acc.as_mut() {
                    matmul((m, r, k), &prod.ds, Op::N, &wide.a, Op::N, acc, 1.0, 1.0)?;
                }
                lowrank_grad_a(shape, xf.as_deref(), &tt, &prod, wide.s, da, du)?;
                if let Some(p) = prod.p.as_ref() {
                    if let Some(db) = db {
                        let add = p.chunks_exact(r).enumerate().flat_map(|(j, row)| {
                            let vj = wide.v.as_ref().map_or(1.0, |v| v[j]);
                            row.iter().map(move |e| wide.s * vj * e)
                        });
                        accumulate(db, add);
                    }
                    if let Some(dv) = dv {
                        let add = p
                            .chunks_exact(r)
                            .zip(wide.b.chunks_exact(r))
                            .map(|(prow, brow)| wide.s * prow.iter().zip(brow).map(|(p, b)| p * b).sum::<f64>());
                        accumulate(dv, add);
                    }
                }
            }
        }
        if let (Some(dx), Some(acc)) = (dx, dx_acc) {
            dx.iter_mut().zip(&acc).for_each(|(o, v)| *o = T::from_f64(*v));
        }
        Ok(())
    }

    fn lowrank_add<T: Element>(
        &self,
        shape: LinearShape,
        x: &Vec<T>,
        adapter: Adapter<'_, Cpu>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        shape.check_add(x.len(), &AdapterLens::of(&adapter), y.len())?;
        let wide = Wide::of(&adapter);
        let tt = lowrank_shrink(shape, &widen(x), &wide.a)?;
        let mut acc = widen(y);
        lowrank_expand_add(shape, &tt, &wide, &mut acc)?;
        y.iter_mut().zip(&acc).for_each(|(o, v)| *o = T::from_f64(*v));
        Ok(())
    }
}

/// Rows `0..rows`, columns `0..cols` of a row-major buffer with stride `ld`.
fn unpack<T: Element>(buf: &[T], rows: usize, cols: usize, ld: usize) -> Vec<T> {
    (0..rows).flat_map(|i| buf[i * ld..i * ld + cols].iter().copied()).collect()
}

/// The packed layout's CPU twin: the same buffers the GPU writes (spare
/// columns rounded to `T`), and the one GEMM computed in f64 with one
/// rounding to `T` at the end.
impl PackedOps for Cpu {
    fn pack_rows<T: Element>(&self, rows: usize, cols: usize, ld: usize, src: &Vec<T>, dst: &mut Vec<T>) -> Result<()> {
        const OP: &str = "pack_rows";
        if ld < cols {
            return Err(Error::invalid(OP, format!("ld = {ld} < cols = {cols}: rows would overlap")));
        }
        if src.len() != rows * cols {
            return Err(Error::shape(OP, "src", format!("{rows}x{cols}"), format!("{} elements", src.len())));
        }
        if dst.len() != rows * ld {
            return Err(Error::shape(OP, "dst", format!("{rows}x{ld}"), format!("{} elements", dst.len())));
        }
        for (d, s) in dst.chunks_exact_mut(ld.max(1)).zip(src.chunks_exact(cols.max(1))) {
            d[..cols].copy_from_slice(s);
        }
        Ok(())
    }

    fn pack_weight<T: Element>(
        &self,
        layout: &PackedLayout,
        w: &Vec<T>,
        bias: Option<&Vec<T>>,
        adapter: Adapter<'_, Cpu>,
        w_packed: &mut Vec<T>,
    ) -> Result<()> {
        let LinearShape { k, n, .. } = layout.shape;
        if w.len() != n * k {
            return Err(Error::shape(packed::PACK, "W", format!("{n}x{k}"), format!("{} elements", w.len())));
        }
        self.pack_adapter(layout, bias, adapter, w_packed)?;
        let ld = layout.x_ld();
        for (d, s) in w_packed.chunks_exact_mut(ld).zip(w.chunks_exact(k)) {
            d[..k].copy_from_slice(s);
        }
        Ok(())
    }

    fn pack_adapter<T: Element>(
        &self,
        layout: &PackedLayout,
        bias: Option<&Vec<T>>,
        adapter: Adapter<'_, Cpu>,
        w_packed: &mut Vec<T>,
    ) -> Result<()> {
        layout.check_adapter(packed::PACK, &AdapterLens::of(&adapter), bias.map(Vec::len))?;
        layout.check_buf(packed::PACK, "w", w_packed.len(), layout.w_len())?;
        let LinearShape { k, n, r, .. } = layout.shape;
        let (p, ld) = (layout.pad(), layout.x_ld());
        for j in 0..n {
            let vj = adapter.v.map_or(1.0, |v| v[j]);
            for c in 0..p {
                let o = if c < r {
                    adapter.b[j * r + c] * vj
                } else if c == r && layout.bias {
                    bias.map_or(0.0, |b| b[j].to_f64() as f32)
                } else {
                    0.0
                };
                w_packed[j * ld + k + c] = T::from_f32(o);
            }
        }
        for q in 0..p {
            for c in 0..ld {
                let o = if q < r && c < k { adapter.a[q * k + c] } else { 0.0 };
                w_packed[(n + q) * ld + c] = T::from_f32(o);
            }
        }
        Ok(())
    }

    fn packed_forward<T: Element>(
        &self,
        layout: &PackedLayout,
        x_packed: &mut Vec<T>,
        w_packed: &Vec<T>,
        adapter: Adapter<'_, Cpu>,
        y: &mut Vec<T>,
        t: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let ad = AdapterLens::of(&adapter);
        packed::check_forward(layout, x_packed.len(), w_packed.len(), &ad, y.len(), t.as_deref().map(Vec::len))?;
        let s = layout.shape;
        let LinearShape { m, k, n, r } = s;
        let (p, ld) = (layout.pad(), layout.x_ld());
        let wide = Wide::of(&adapter);
        let tt = lowrank_shrink(s, &widen(&unpack(x_packed, m, k, ld)), &wide.a)?;
        for i in 0..m {
            for c in 0..p {
                let o = if c < r {
                    wide.s * tt[i * r + c] * wide.u.as_ref().map_or(1.0, |u| u[c])
                } else if c == r && layout.bias {
                    1.0
                } else {
                    0.0
                };
                x_packed[i * ld + k + c] = T::from_f64(o);
            }
        }
        let xw = widen(x_packed);
        let ww = widen(&w_packed[..n * ld]);
        let mut acc = vec![0.0; m * n];
        matmul((m, ld, n), &xw, Op::N, &ww, Op::T, &mut acc, 1.0, 0.0)?;
        y.iter_mut().zip(&acc).for_each(|(o, v)| *o = T::from_f64(*v));
        if let Some(t) = t {
            t.iter_mut().zip(&tt).for_each(|(o, v)| *o = *v as f32);
        }
        Ok(())
    }

    fn packed_backward<T: Element>(
        &self,
        layout: &PackedLayout,
        x_packed: &Vec<T>,
        w_packed: &Vec<T>,
        adapter: Adapter<'_, Cpu>,
        t: Option<&Vec<f32>>,
        dy_packed: &mut Vec<T>,
        grads: Grads<'_, Cpu, T>,
    ) -> Result<()> {
        let ad = AdapterLens::of(&adapter);
        let glens = GradLens::of(&grads);
        packed::check_backward(layout, x_packed.len(), w_packed.len(), &ad, t.map(Vec::len), dy_packed.len(), &glens)?;
        let s = layout.shape;
        let LinearShape { m, k, n, r } = s;
        let (p, ld, dld) = (layout.pad(), layout.x_ld(), layout.dy_ld());
        let x = unpack(x_packed, m, k, ld);
        let w = unpack(w_packed, n, k, ld);
        let dy = unpack(dy_packed, m, n, dld);
        let Grads { dx, dw, dbias, da, db, du, dv } = grads;
        let rest = Grads::<Cpu, T> { dx: None, dw, dbias, da, db, du, dv };
        self.lowrank_backward(s, &x, &w, Some(adapter), t, &dy, rest)?;
        if let Some(dx) = dx {
            let wide = Wide::of(&adapter);
            let prod = lowrank_backward_dy(s, &widen(&dy), &[], &wide, false)?;
            for i in 0..m {
                for c in 0..p {
                    let o = if c < r { prod.ds[i * r + c] } else { 0.0 };
                    dy_packed[i * dld + n + c] = T::from_f64(o);
                }
            }
            let wk = widen(&unpack(w_packed, n + p, k, ld));
            let mut acc = vec![0.0; m * k];
            matmul((m, dld, k), &widen(dy_packed), Op::N, &wk, Op::N, &mut acc, 1.0, 0.0)?;
            dx.iter_mut().zip(&acc).for_each(|(o, v)| *o = T::from_f64(*v));
        }
        Ok(())
    }
}
