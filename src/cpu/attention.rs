//! CPU twin of `kernels/attention.cu` ([`crate::attention::AttentionOps`]):
//! causal multi-head attention in the memory-saving ("flash") form, in f64.
//!
//! The forward keeps, per (row, head, query), only the log-sum-exp of the
//! scaled scores (`lse`), not the `seq × seq` probabilities: at GPT-2 small's
//! shape (batch 8, 12 heads, seq 1024) those would be 400 MB per layer. The
//! backward recomputes each probability as `exp(s_ij − lse_i)` and gets the
//! softmax-backward row sum from `D_i = dO_i · O_i` (which equals
//! `Σ_j P_ij·dP_ij`), so it needs only `qkv`, `out`, `dout` and `lse`.
//!
//! Layouts: `qkv` rows are `[q | k | v]` (3·W wide, W = heads·hd), head `h`
//! in columns `h·hd..(h+1)·hd` of each third, as GPT-2's `c_attn` writes
//! them; `out` rows are W wide; `lse` is `[batch][head][query]`.

use rayon::prelude::*;

use super::gemm::{matmul, Op};
use super::{store, Cpu};
use crate::attention::{check_lengths, check_strided_dqkv, check_strided_out, AttentionOps, AttnShape};
use crate::dtype::{widen, Element};
use crate::Result;

impl AttentionOps for Cpu {
    fn attention_forward_strided<T: Element>(
        &self,
        qkv: &Vec<T>,
        shape: AttnShape,
        out: &mut Vec<T>,
        out_ld: usize,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let op = "attention_forward";
        check_lengths(op, shape, qkv.len(), shape.seq.tokens() * shape.width(), lse.len())?;
        check_strided_out(op, shape, out.len(), out_ld)?;
        let (o, l) = attention_forward_f64(&widen(qkv), shape)?;
        let w = shape.width();
        for (dst, src) in out.chunks_mut(out_ld).zip(o.chunks(w)) {
            store(&mut dst[..w], src);
        }
        store(lse, &l);
        Ok(())
    }

    fn attention_backward_strided<T: Element>(
        &self,
        dout: &Vec<T>,
        qkv: &Vec<T>,
        out: &Vec<T>,
        out_ld: usize,
        lse: &Vec<f32>,
        shape: AttnShape,
        dqkv: &mut Vec<T>,
        dqkv_ld: usize,
    ) -> Result<()> {
        let op = "attention_backward";
        check_lengths(op, shape, qkv.len(), dout.len(), lse.len())?;
        check_strided_out(op, shape, out.len(), out_ld)?;
        check_strided_dqkv(op, shape, dqkv.len(), dqkv_ld)?;
        let w = shape.width();
        let out: Vec<f64> = out.chunks(out_ld).flat_map(|row| row[..w].iter().map(|v| v.to_f64())).collect();
        let g = attention_backward_f64(&widen(dout), &widen(qkv), &out, &widen(lse), shape)?;
        for (dst, src) in dqkv.chunks_mut(dqkv_ld).zip(g.chunks(3 * w)) {
            store(&mut dst[..3 * w], src);
        }
        Ok(())
    }
}

/// Gathers head `h` of part `part` (0 = q, 1 = k, 2 = v) of row block `b`
/// into a contiguous seq × hd matrix.
fn head(qkv: &[f64], s: &AttnShape, b: usize, part: usize, h: usize) -> Vec<f64> {
    let (t, hd, w) = (s.seq.seq, s.head_dim, s.width());
    let mut m = vec![0.0; t * hd];
    for i in 0..t {
        let base = (b * t + i) * 3 * w + part * w + h * hd;
        m[i * hd..(i + 1) * hd].copy_from_slice(&qkv[base..base + hd]);
    }
    m
}

/// Head `h` of row block `b` of a W-wide per-token tensor (`out`, `dout`).
fn head_of_out(x: &[f64], s: &AttnShape, b: usize, h: usize) -> Vec<f64> {
    let (t, hd, w) = (s.seq.seq, s.head_dim, s.width());
    let mut m = vec![0.0; t * hd];
    for i in 0..t {
        let base = (b * t + i) * w + h * hd;
        m[i * hd..(i + 1) * hd].copy_from_slice(&x[base..base + hd]);
    }
    m
}

/// Causal softmax of the scaled scores `q·kᵀ/√hd` of one head, from the
/// stored `lse` (one per query): `P_ij = exp(s_ij − lse_i)` for `j ≤ i`,
/// 0 above the diagonal. Exactly what the backward recomputes.
fn probs_from_lse(q: &[f64], k: &[f64], lse: &[f64], t: usize, hd: usize) -> Result<Vec<f64>> {
    let mut p = vec![0.0; t * t];
    matmul((t, hd, t), q, Op::N, k, Op::T, &mut p, 1.0 / (hd as f64).sqrt(), 0.0)?;
    for i in 0..t {
        let row = &mut p[i * t..(i + 1) * t];
        row[..=i].iter_mut().for_each(|e| *e = (*e - lse[i]).exp());
        row[i + 1..].iter_mut().for_each(|e| *e = 0.0);
    }
    Ok(p)
}

/// Causal attention forward in f64: returns `(out, lse)`, `out` tokens × W,
/// `lse` batch·heads·seq.
pub fn attention_forward_f64(qkv: &[f64], s: AttnShape) -> Result<(Vec<f64>, Vec<f64>)> {
    let (t, hd, w) = (s.seq.seq, s.head_dim, s.width());
    let scale = 1.0 / (hd as f64).sqrt();
    let per: Vec<(Vec<f64>, Vec<f64>)> = (0..s.seq.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let (q, k, v) = (head(qkv, &s, b, 0, h), head(qkv, &s, b, 1, h), head(qkv, &s, b, 2, h));
            let mut scores = vec![0.0; t * t];
            matmul((t, hd, t), &q, Op::N, &k, Op::T, &mut scores, scale, 0.0)?;
            let lse: Vec<f64> = (0..t)
                .map(|i| {
                    let row = &scores[i * t..=i * t + i];
                    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    max + row.iter().map(|e| (e - max).exp()).sum::<f64>().ln()
                })
                .collect();
            let p = probs_from_lse(&q, &k, &lse, t, hd)?;
            let mut o = vec![0.0; t * hd];
            matmul((t, t, hd), &p, Op::N, &v, Op::N, &mut o, 1.0, 0.0)?;
            Ok((o, lse))
        })
        .collect::<Result<_>>()?;
    let mut out = vec![0.0; s.seq.tokens() * w];
    let mut lse = Vec::with_capacity(s.lse_len());
    for (bh, (o, l)) in per.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for i in 0..t {
            let base = (b * t + i) * w + h * hd;
            out[base..base + hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
        }
        lse.extend_from_slice(&l);
    }
    Ok((out, lse))
}

/// Causal attention backward in f64: `dqkv` from `dout`, the inputs, and
/// the forward's `out` and `lse` (probabilities recomputed, never stored).
pub fn attention_backward_f64(dout: &[f64], qkv: &[f64], out: &[f64], lse: &[f64], s: AttnShape) -> Result<Vec<f64>> {
    let (t, hd, w) = (s.seq.seq, s.head_dim, s.width());
    let scale = 1.0 / (hd as f64).sqrt();
    let per: Vec<[Vec<f64>; 3]> = (0..s.seq.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let (q, k, v) = (head(qkv, &s, b, 0, h), head(qkv, &s, b, 1, h), head(qkv, &s, b, 2, h));
            let (o, d_o) = (head_of_out(out, &s, b, h), head_of_out(dout, &s, b, h));
            let p = probs_from_lse(&q, &k, &lse[bh * t..(bh + 1) * t], t, hd)?;
            // dV = Pᵀ·dO; dP = dO·Vᵀ; D_i = dO_i·O_i (= Σ_j P_ij·dP_ij);
            // dS = P ⊙ (dP − D); dQ = scale·dS·K; dK = scale·dSᵀ·Q.
            let mut dv = vec![0.0; t * hd];
            matmul((t, t, hd), &p, Op::T, &d_o, Op::N, &mut dv, 1.0, 0.0)?;
            let mut ds = vec![0.0; t * t];
            matmul((t, hd, t), &d_o, Op::N, &v, Op::T, &mut ds, 1.0, 0.0)?;
            for i in 0..t {
                let d_i: f64 = (0..hd).map(|e| d_o[i * hd + e] * o[i * hd + e]).sum();
                let (pr, dr) = (&p[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
                dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - d_i));
            }
            let mut dq = vec![0.0; t * hd];
            matmul((t, t, hd), &ds, Op::N, &k, Op::N, &mut dq, scale, 0.0)?;
            let mut dk = vec![0.0; t * hd];
            matmul((t, t, hd), &ds, Op::T, &q, Op::N, &mut dk, scale, 0.0)?;
            Ok([dq, dk, dv])
        })
        .collect::<Result<_>>()?;
    let mut dqkv = vec![0.0; qkv.len()];
    for (bh, parts) in per.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for (part, m) in parts.iter().enumerate() {
            for i in 0..t {
                let base = (b * t + i) * 3 * w + part * w + h * hd;
                dqkv[base..base + hd].copy_from_slice(&m[i * hd..(i + 1) * hd]);
            }
        }
    }
    Ok(dqkv)
}

/// The explicit softmax probabilities `[batch][head][query][key]` (zero
/// above the diagonal), computed directly from the scores. Only for tests
/// that check the `lse` form against the textbook one.
pub fn attention_probs_f64(qkv: &[f64], s: AttnShape) -> Result<Vec<f64>> {
    let (t, hd) = (s.seq.seq, s.head_dim);
    let mut all = Vec::with_capacity(s.seq.batch * s.heads * t * t);
    for bh in 0..s.seq.batch * s.heads {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let (q, k) = (head(qkv, &s, b, 0, h), head(qkv, &s, b, 1, h));
        let mut p = vec![0.0; t * t];
        matmul((t, hd, t), &q, Op::N, &k, Op::T, &mut p, 1.0 / (hd as f64).sqrt(), 0.0)?;
        for i in 0..t {
            let row = &mut p[i * t..(i + 1) * t];
            let max = row[..=i].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row[..=i].iter().map(|e| (e - max).exp()).sum();
            row[..=i].iter_mut().for_each(|e| *e = (*e - max).exp() / sum);
            row[i + 1..].iter_mut().for_each(|e| *e = 0.0);
        }
        all.extend_from_slice(&p);
    }
    Ok(all)
}
