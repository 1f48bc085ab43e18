//! CPU twin of `kernels/nn.cu` ([`crate::nn::NnOps`]).
//!
//! Each op is written once as a plain f64 function (`*_f64`, public so the
//! finite-difference tests check the math in f64 directly), and the
//! [`NnOps`] impl converts the f32 buffers at the edges.

use rayon::prelude::*;

use super::{store, Cpu};
use crate::dtype::{widen, Element};
use crate::nn::{
    check, mean_over_scored, optim_state, AdamWStep, AdamWTensor, CrossEntropyOut, GradScale, NnOps, OptimConsts,
    SeqShape, TokenIds, IGNORE,
};
use crate::Result;

/// `src` (rows of `cols`) rounded into `dst`'s rows `ld` apart; the other
/// columns of `dst` keep their values.
fn store_rows<T: Element>(dst: &mut [T], src: &[f64], cols: usize, ld: usize) {
    for (d, s) in dst.chunks_mut(ld).zip(src.chunks(cols)) {
        store(&mut d[..cols], s);
    }
}

fn accumulate(dst: &mut [f32], src: &[f64]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = (*d as f64 + s) as f32);
}

/// LayerNorm forward in f64: returns `(out, mean, rstd)`.
pub fn layernorm_forward_f64(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = gamma.len();
    let rows = x.len() / d;
    let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mu = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            out[r * d + i] = (row[i] - mu) * rs * gamma[i] + beta[i];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
    (out, mean, rstd)
}

/// LayerNorm backward in f64: returns `(dx, dgamma, dbeta)`.
pub fn layernorm_backward_f64(
    dout: &[f64],
    x: &[f64],
    gamma: &[f64],
    mean: &[f64],
    rstd: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = gamma.len();
    let rows = x.len() / d;
    let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; d], vec![0.0; d]);
    for r in 0..rows {
        let (xr, dr) = (&x[r * d..(r + 1) * d], &dout[r * d..(r + 1) * d]);
        // x̂ = (x − μ)·rstd; dx̂ = dout·γ; dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)).
        let (mut m1, mut m2) = (0.0, 0.0);
        for i in 0..d {
            let xhat = (xr[i] - mean[r]) * rstd[r];
            let dxhat = dr[i] * gamma[i];
            m1 += dxhat;
            m2 += dxhat * xhat;
            dg[i] += dr[i] * xhat;
            db[i] += dr[i];
        }
        m1 /= d as f64;
        m2 /= d as f64;
        for i in 0..d {
            let xhat = (xr[i] - mean[r]) * rstd[r];
            dx[r * d + i] = rstd[r] * (dr[i] * gamma[i] - m1 - xhat * m2);
        }
    }
    (dx, dg, db)
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2/π)

/// GELU (tanh approximation) of one value.
pub fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())
}

/// Derivative of [`gelu_f64`].
pub fn gelu_grad_f64(x: f64) -> f64 {
    let u = GELU_C * (x + 0.044715 * x * x * x);
    let t = u.tanh();
    let du = GELU_C * (1.0 + 3.0 * 0.044715 * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

/// Softmax cross-entropy of one row in f64: `(loss, argmax == target,
/// softmax − onehot)`.
pub fn cross_entropy_row_f64(logits: &[f64], target: usize) -> (f64, bool, Vec<f64>) {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let argmax = logits.iter().position(|&v| v == max).unwrap_or(0);
    let sum: f64 = logits.iter().map(|v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    let mut grad: Vec<f64> = logits.iter().map(|v| (v - lse).exp()).collect();
    grad[target] -= 1.0;
    (lse - logits[target], argmax == target, grad)
}

impl NnOps for Cpu {
    fn embedding_forward<T: Element>(
        &self,
        tokens: TokenIds<'_, Cpu>,
        wte: &Vec<T>,
        wpe: &Vec<T>,
        shape: SeqShape,
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let lens = (tokens.device.len(), wte.len(), wpe.len(), out.len());
        let vocab = check::embedding_forward(lens, shape, width)?;
        check::tokens("embedding_forward", tokens.host, vocab)?;
        check::tokens("embedding_forward", tokens.device, vocab)?;
        for (i, &tok) in tokens.device.iter().enumerate() {
            let (t, tok) = (i % shape.seq, tok as usize);
            for c in 0..width {
                out[i * width + c] = (wte[tok * width + c].to_f64() + wpe[t * width + c].to_f64()) as f32;
            }
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        tokens: TokenIds<'_, Cpu>,
        dout: &Vec<f32>,
        shape: SeqShape,
        width: usize,
        dwte: Option<&mut Vec<f32>>,
        dwpe: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let lens = (tokens.device.len(), dout.len(), dwte.as_ref().map(|b| b.len()), dwpe.as_ref().map(|b| b.len()));
        let vocab = check::embedding_backward(lens, shape, width)?;
        if let (Some(dwte), Some(vocab)) = (dwte, vocab) {
            check::tokens("embedding_backward", tokens.host, vocab)?;
            check::tokens("embedding_backward", tokens.device, vocab)?;
            let mut acc = widen(dwte);
            for (i, &tok) in tokens.device.iter().enumerate() {
                for c in 0..width {
                    acc[tok as usize * width + c] += dout[i * width + c] as f64;
                }
            }
            store(dwte, &acc);
        }
        if let Some(dwpe) = dwpe {
            let mut acc = widen(dwpe);
            for i in 0..shape.tokens() {
                let t = i % shape.seq;
                for c in 0..width {
                    acc[t * width + c] += dout[i * width + c] as f64;
                }
            }
            store(dwpe, &acc);
        }
        Ok(())
    }

    fn layernorm_forward_strided<T: Element>(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        eps: f64,
        out: &mut Vec<T>,
        out_ld: usize,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        let (_, d) =
            check::layernorm_forward((x.len(), gamma.len(), beta.len(), out.len(), mean.len(), rstd.len()), out_ld)?;
        let (o, m, r) = layernorm_forward_f64(&widen(x), &widen(gamma), &widen(beta), eps);
        store_rows(out, &o, d, out_ld);
        store(mean, &m);
        store(rstd, &r);
        Ok(())
    }

    fn residual_layernorm_forward_strided<T: Element>(
        &self,
        x: &Vec<f32>,
        y: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        eps: f64,
        resid: &mut Vec<f32>,
        out: &mut Vec<T>,
        out_ld: usize,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        check::layernorm_forward((x.len(), gamma.len(), beta.len(), out.len(), mean.len(), rstd.len()), out_ld)?;
        self.residual_add(x, y, resid)?;
        self.layernorm_forward_strided(resid, gamma, beta, eps, out, out_ld, mean, rstd)
    }

    fn layernorm_backward<T: Element>(
        &self,
        dout: &Vec<T>,
        x: &Vec<f32>,
        gamma: &Vec<T>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        dgamma: Option<&mut Vec<f32>>,
        dbeta: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let lens = (dout.len(), x.len(), gamma.len(), mean.len(), rstd.len(), dx.len());
        check::layernorm_backward(lens, dgamma.as_ref().map(|b| b.len()), dbeta.as_ref().map(|b| b.len()))?;
        let (gx, gg, gb) = layernorm_backward_f64(&widen(dout), &widen(x), &widen(gamma), &widen(mean), &widen(rstd));
        accumulate(dx, &gx);
        if let Some(dg) = dgamma {
            accumulate(dg, &gg);
        }
        if let Some(db) = dbeta {
            accumulate(db, &gb);
        }
        Ok(())
    }

    fn gelu_forward_strided<T: Element>(&self, x: &Vec<T>, cols: usize, out: &mut Vec<T>, out_ld: usize) -> Result<()> {
        if check::strided_elementwise("gelu_forward", x.len(), cols, ("out", out.len()), out_ld)? == 0 {
            return Ok(());
        }
        out.par_chunks_mut(out_ld).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
            o.iter_mut().zip(xr).for_each(|(o, &v)| *o = T::from_f64(gelu_f64(v.to_f64())));
        });
        Ok(())
    }

    fn gelu_backward_strided<T: Element>(
        &self,
        dout: &Vec<T>,
        x: &Vec<T>,
        cols: usize,
        dx: &mut Vec<T>,
        dx_ld: usize,
    ) -> Result<()> {
        check::same_len("gelu_backward", x.len(), &[("dout", dout.len())])?;
        if check::strided_elementwise("gelu_backward", x.len(), cols, ("dx", dx.len()), dx_ld)? == 0 {
            return Ok(());
        }
        dx.par_chunks_mut(dx_ld).zip(x.par_chunks(cols).zip(dout.par_chunks(cols))).for_each(|(d, (xr, gr))| {
            d.iter_mut()
                .zip(xr.iter().zip(gr))
                .for_each(|(d, (&v, &g))| *d = T::from_f64(g.to_f64() * gelu_grad_f64(v.to_f64())));
        });
        Ok(())
    }

    fn residual_add<T: Element>(&self, x: &Vec<f32>, y: &Vec<T>, out: &mut Vec<f32>) -> Result<()> {
        check::same_len("residual_add", x.len(), &[("y", y.len()), ("out", out.len())])?;
        out.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (&a, &b))| *o = (a as f64 + b.to_f64()) as f32);
        Ok(())
    }

    fn cast_from_f32_strided<T: Element>(
        &self,
        x: &Vec<f32>,
        cols: usize,
        out: &mut Vec<T>,
        out_ld: usize,
    ) -> Result<()> {
        if check::strided_elementwise("cast_from_f32", x.len(), cols, ("out", out.len()), out_ld)? == 0 {
            return Ok(());
        }
        for (o, xr) in out.chunks_mut(out_ld).zip(x.chunks(cols)) {
            o.iter_mut().zip(xr).for_each(|(o, &v)| *o = T::from_f32(v));
        }
        Ok(())
    }

    fn cross_entropy_scaled<T: Element>(
        &self,
        logits: &mut Vec<T>,
        targets: TokenIds<'_, Cpu>,
        vocab: usize,
        padded: usize,
        grad: Option<GradScale<'_, Cpu>>,
    ) -> Result<CrossEntropyOut<Cpu>> {
        check::cross_entropy(logits.len(), targets.host, vocab, padded)?;
        check::cross_entropy(logits.len(), targets.device, vocab, padded)?;
        // Counted from the "device" buffer, as the GPU counts its own.
        let grad = grad.map(|g| match g {
            GradScale::Fixed(s) => s,
            GradScale::MeanOverScored(over) => mean_over_scored(over),
        });
        let results: Vec<(f32, u32)> = logits
            .par_chunks_mut(padded)
            .zip(targets.device.par_iter())
            .map(|(row, &target)| {
                if grad.is_some() {
                    row[vocab..].iter_mut().for_each(|v| *v = T::default());
                }
                let row = &mut row[..vocab];
                if target == IGNORE {
                    if grad.is_some() {
                        row.iter_mut().for_each(|v| *v = T::default());
                    }
                    return (0.0, 0);
                }
                let (loss, hit, g) = cross_entropy_row_f64(&widen(row), target as usize);
                if let Some(scale) = grad {
                    row.iter_mut().zip(&g).for_each(|(v, &d)| *v = T::from_f64(d * scale));
                }
                (loss as f32, hit as u32)
            })
            .collect();
        Ok(CrossEntropyOut {
            losses: results.iter().map(|r| r.0).collect(),
            correct: results.iter().map(|r| r.1).collect(),
        })
    }

    fn adamw(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        hp: &AdamWStep,
    ) -> Result<()> {
        check::adamw((param.len(), grad.len(), m.len(), v.len()), hp)?;
        let c1 = 1.0 - hp.beta1.powi(hp.step.min(i32::MAX as u64) as i32);
        let c2 = 1.0 - hp.beta2.powi(hp.step.min(i32::MAX as u64) as i32);
        let (b1, b2) = (hp.beta1, hp.beta2);
        adamw_slice(param, grad, m, v, hp.lr, hp.weight_decay, b1, b2, hp.eps, hp.grad_scale, c1, c2);
        Ok(())
    }

    fn sum_squares_each(&self, xs: &[&Vec<f32>]) -> Result<Vec<f64>> {
        Ok(xs.iter().map(|x| x.iter().map(|&v| v as f64 * v as f64).sum()).collect())
    }

    fn fill_zero(&self, x: &mut Vec<f32>) -> Result<()> {
        x.iter_mut().for_each(|v| *v = 0.0);
        Ok(())
    }

    fn optimizer_prepare(
        &self,
        xs: &[&Vec<f32>],
        norm_tensors: usize,
        consts: &OptimConsts,
        state: &mut Vec<f64>,
        scratch: &mut Vec<f64>,
    ) -> Result<()> {
        // The GPU's partial sums; one pass in order needs none.
        check::optim_state("optimizer_prepare", (state.len(), scratch.len()), xs.len(), norm_tensors)?;
        let sums = self.sum_squares_each(xs)?;
        let header = consts.decide(&sums, norm_tensors, state[optim_state::STEP]);
        state[..optim_state::HEADER].copy_from_slice(&header);
        state[optim_state::HEADER..][..sums.len()].copy_from_slice(&sums);
        Ok(())
    }

    fn adamw_many_device(
        &self,
        tensors: &mut [AdamWTensor<'_, Cpu>],
        consts: &OptimConsts,
        state: &Vec<f64>,
    ) -> Result<()> {
        let lens: Vec<_> = tensors.iter().map(|t| (t.param.len(), t.grad.len(), t.m.len(), t.v.len())).collect();
        check::adamw_many_device(state.len(), &lens)?;
        if state[optim_state::ACCEPTED] == 0.0 {
            return Ok(());
        }
        let (c1, c2) = (state[optim_state::CORRECTION1], state[optim_state::CORRECTION2]);
        let (scale, factor) = (state[optim_state::SCALE], state[optim_state::LR_FACTOR]);
        for t in tensors.iter_mut() {
            let lr = t.lr * factor;
            adamw_slice(
                t.param,
                t.grad,
                t.m,
                t.v,
                lr,
                t.weight_decay,
                consts.beta1,
                consts.beta2,
                consts.eps,
                scale,
                c1,
                c2,
            );
        }
        Ok(())
    }
}

/// One tensor's AdamW update in f64 (`adamw_element` in the kernels):
/// decoupled decay, then the bias-corrected step with corrections `c1`,
/// `c2`, on gradients scaled by `grad_scale`.
#[allow(clippy::too_many_arguments)]
fn adamw_slice(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    grad_scale: f64,
    c1: f64,
    c2: f64,
) {
    for i in 0..param.len() {
        let g = grad[i] as f64 * grad_scale;
        let mi = beta1 * m[i] as f64 + (1.0 - beta1) * g;
        let vi = beta2 * v[i] as f64 + (1.0 - beta2) * g * g;
        let mut p = param[i] as f64;
        p -= lr * weight_decay * p;
        p -= lr * (mi / c1) / ((vi / c2).sqrt() + eps);
        m[i] = mi as f32;
        v[i] = vi as f32;
        param[i] = p as f32;
    }
}
