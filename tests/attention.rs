//! Flash-form causal attention.
//!
//! CPU (always run): the f64 twin (src/cpu/attention.rs) against the
//! textbook softmax, its backward against central finite differences, and
//! causality. GPU (`gpu_*`, skipped without a GPU): the kernels of
//! kernels/attention.cu against that twin in f32, f16 and bf16 on awkward
//! shapes, bit-identical reruns, and the argument checks.

mod common;

use half::{bf16, f16};
use lorafuse::cpu::attention::{attention_backward_f64, attention_forward_f64, attention_probs_f64};
use lorafuse::cuda::attention::{attention_backward, attention_forward, MAX_HEAD_DIM};
use lorafuse::cuda::Gpu;
use lorafuse::testing::{check_close, compare};
use lorafuse::train::ops::{AttnShape, SeqShape};
use lorafuse::{Backend, Element, Error};

fn shape(batch: usize, seq: usize, heads: usize, head_dim: usize) -> AttnShape {
    AttnShape { seq: SeqShape { batch, seq }, heads, head_dim }
}

fn describe(s: AttnShape) -> String {
    format!("batch={} seq={} heads={} head_dim={}", s.seq.batch, s.seq.seq, s.heads, s.head_dim)
}

/// `n` values uniform in `[-scale, scale)` from `seed`.
fn random64(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    common::random(seed, n).iter().map(|&v| scale * v as f64).collect()
}

fn assert_close64(ctx: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    let c = compare(got.iter().copied(), want.iter().copied());
    assert!(c.within(tol), "{ctx}: error above tolerance {tol:.1e}: {c}");
}

/// Index of element `e` of head `h`, part `part` (0 = q, 1 = k, 2 = v) of
/// token `t` in row `b` of `qkv`.
fn qkv_at(s: AttnShape, b: usize, t: usize, part: usize, h: usize, e: usize) -> usize {
    (b * s.seq.seq + t) * 3 * s.width() + part * s.width() + h * s.head_dim + e
}

/// Index of element `e` of head `h` of token `t` in row `b` of `out`.
fn out_at(s: AttnShape, b: usize, t: usize, h: usize, e: usize) -> usize {
    (b * s.seq.seq + t) * s.width() + h * s.head_dim + e
}

/// The scaled score `q_i·k_j/√hd`, straight from the definition.
fn score(qkv: &[f64], s: AttnShape, b: usize, h: usize, i: usize, j: usize) -> f64 {
    let dot: f64 = (0..s.head_dim).map(|e| qkv[qkv_at(s, b, i, 0, h, e)] * qkv[qkv_at(s, b, j, 1, h, e)]).sum();
    dot / (s.head_dim as f64).sqrt()
}

// ---- CPU twin ---------------------------------------------------------------

#[test]
fn cpu_lse_form_matches_the_textbook_softmax() {
    for (n, &(batch, seq, heads, hd)) in [(1, 1, 1, 1), (2, 5, 2, 3), (1, 17, 3, 8), (2, 33, 1, 5)].iter().enumerate() {
        let s = shape(batch, seq, heads, hd);
        let seed = 10 + n as u64;
        let ctx = format!("{} seed={seed}", describe(s));
        // ×3: scores of a few units, so rows have clear maxima.
        let qkv = random64(seed, s.seq.tokens() * 3 * s.width(), 3.0);
        let (out, lse) = attention_forward_f64(&qkv, s).unwrap();
        let probs = attention_probs_f64(&qkv, s).unwrap();
        assert_eq!(lse.len(), s.lse_len(), "{ctx}: lse length");
        assert_eq!(probs.len(), s.lse_len() * s.seq.seq, "{ctx}: probs length");
        let mut from_lse = vec![0.0; probs.len()];
        let mut textbook_out = vec![0.0; out.len()];
        for b in 0..batch {
            for h in 0..heads {
                let bh = b * heads + h;
                for i in 0..seq {
                    for j in 0..=i {
                        from_lse[(bh * seq + i) * seq + j] = (score(&qkv, s, b, h, i, j) - lse[bh * seq + i]).exp();
                    }
                    for e in 0..hd {
                        textbook_out[out_at(s, b, i, h, e)] =
                            (0..seq).map(|j| probs[(bh * seq + i) * seq + j] * qkv[qkv_at(s, b, j, 2, h, e)]).sum();
                    }
                }
            }
        }
        assert_close64(&format!("exp(s - lse) vs softmax {ctx}"), &from_lse, &probs, 1e-12);
        assert_close64(&format!("out vs probs·V {ctx}"), &out, &textbook_out, 1e-12);
        // Every row of probabilities sums to one, and nothing lies above the diagonal.
        for (r, row) in probs.chunks(seq).enumerate() {
            let i = r % seq;
            assert!(
                (row.iter().sum::<f64>() - 1.0).abs() < 1e-12,
                "{ctx}: row {r} sums to {}",
                row.iter().sum::<f64>()
            );
            assert!(row[i + 1..].iter().all(|&p| p == 0.0), "{ctx}: row {r} has mass above the diagonal");
        }
    }
}

/// `Σ dout ⊙ out(qkv)`: its gradient is `attention_backward(dout, ...)`.
fn loss(qkv: &[f64], dout: &[f64], s: AttnShape) -> f64 {
    let (out, _) = attention_forward_f64(qkv, s).unwrap();
    out.iter().zip(dout).map(|(o, d)| o * d).sum()
}

#[test]
fn cpu_backward_matches_finite_differences() {
    for (n, &(batch, seq, heads, hd)) in [(2, 5, 2, 3), (1, 1, 2, 3), (2, 1, 1, 1), (1, 4, 1, 2)].iter().enumerate() {
        let s = shape(batch, seq, heads, hd);
        let seed = 20 + n as u64;
        let ctx = format!("{} seed={seed}", describe(s));
        let mut qkv = random64(seed, s.seq.tokens() * 3 * s.width(), 2.0);
        let dout = random64(seed + 1, s.seq.tokens() * s.width(), 1.0);
        let (out, lse) = attention_forward_f64(&qkv, s).unwrap();
        let grad = attention_backward_f64(&dout, &qkv, &out, &lse, s).unwrap();
        assert_eq!(grad.len(), qkv.len(), "{ctx}: dqkv length");
        // Central differences: truncation ~h²·L''' ≈ 1e-10, rounding ~1e-16/h.
        let h = 1e-5;
        let numeric: Vec<f64> = (0..qkv.len())
            .map(|k| {
                let x = qkv[k];
                qkv[k] = x + h;
                let up = loss(&qkv, &dout, s);
                qkv[k] = x - h;
                let down = loss(&qkv, &dout, s);
                qkv[k] = x;
                (up - down) / (2.0 * h)
            })
            .collect();
        let c = compare(grad.iter().copied(), numeric.iter().copied());
        assert!(c.max_abs < 1e-7, "backward vs finite differences {ctx}: {c}");
        // One key per query: the softmax is constant, q and k get nothing.
        if seq == 1 {
            for b in 0..batch {
                for hh in 0..heads {
                    for e in 0..hd {
                        for part in 0..2 {
                            let g = grad[qkv_at(s, b, 0, part, hh, e)];
                            assert!(g.abs() < 1e-14, "{ctx}: part {part} gradient {g} at seq=1");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn cpu_attention_is_causal() {
    let s = shape(2, 9, 2, 4);
    let (batch_row, later) = (1, 5);
    let qkv = random64(30, s.seq.tokens() * 3 * s.width(), 2.0);
    let (out, lse) = attention_forward_f64(&qkv, s).unwrap();
    // Perturb the later token's q, k and v in every head.
    let mut bumped = qkv.clone();
    let noise = random64(31, 3 * s.width(), 1.0);
    for (k, d) in noise.iter().enumerate() {
        bumped[qkv_at(s, batch_row, later, 0, 0, 0) + k] += d;
    }
    let (out2, lse2) = attention_forward_f64(&bumped, s).unwrap();
    for b in 0..s.seq.batch {
        for t in 0..s.seq.seq {
            let earlier = b != batch_row || t < later;
            for h in 0..s.heads {
                let o = out_at(s, b, t, h, 0);
                let (before, after) = (&out[o..o + s.head_dim], &out2[o..o + s.head_dim]);
                let l = (b * s.heads + h) * s.seq.seq + t;
                if earlier {
                    // Masked keys get probability exactly 0, so not one bit moves.
                    assert_eq!(before, after, "row {b} token {t} head {h}: output changed");
                    assert_eq!(lse[l], lse2[l], "row {b} token {t} head {h}: lse changed");
                } else if t == later {
                    assert_ne!(before, after, "row {b} token {t} head {h}: perturbed token's own output unchanged");
                }
            }
        }
    }
}

// ---- CUDA kernels -----------------------------------------------------------

/// Relative Frobenius tolerance of outputs stored as `T`: the inputs are
/// rounded to `T` before the reference sees them, so what remains is f32
/// arithmetic and the final rounding (twice the crate's per-dtype bound,
/// for the chained products of the backward).
fn tol<T: Element>() -> f64 {
    2.0 * T::DTYPE.tolerance()
}

/// `lse` is f32 whatever `T` is.
const LSE_TOL: f64 = 1e-5;

fn check<T: Element>(ctx: &str, got: &[T], want: &[f64], tol: f64) {
    if let Err(e) = check_close(ctx, got, want, tol) {
        panic!("{e}");
    }
}

fn round<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Forward and backward of one shape against the f64 twin. Outputs start as
/// NaN so an element the kernels never write fails the comparison.
fn check_shape<T: Element>(gpu: &Gpu, s: AttnShape, seed: u64) {
    let ctx = format!("{} {} seed={seed}", T::DTYPE, describe(s));
    let (n_qkv, n_out) = (s.seq.tokens() * 3 * s.width(), s.seq.tokens() * s.width());
    // ×2.5 so scores spread over a few units and the running max moves
    // between key tiles.
    let qkv: Vec<T> = round(&random64(seed, n_qkv, 2.5));
    let qkv64 = widen(&qkv);
    let (out_ref, lse_ref) = attention_forward_f64(&qkv64, s).unwrap();

    let qkv_g = gpu.upload(&qkv).unwrap();
    let mut out_g = gpu.upload(&vec![T::from_f32(f32::NAN); n_out]).unwrap();
    let mut lse_g = gpu.upload(&vec![f32::NAN; s.lse_len()]).unwrap();
    attention_forward(gpu, &qkv_g, s, &mut out_g, &mut lse_g).unwrap();
    check(&format!("attention_forward out {ctx}"), &gpu.download(&out_g).unwrap(), &out_ref, tol::<T>());
    check(&format!("attention_forward lse {ctx}"), &gpu.download(&lse_g).unwrap(), &lse_ref, LSE_TOL);

    // The backward gets the reference's out and lse, stored as the forward
    // stores them (T and f32), and so does its reference: this measures the
    // backward kernels alone.
    let dout: Vec<T> = round(&random64(seed + 1, n_out, 1.0));
    let out_t: Vec<T> = round(&out_ref);
    let lse_f: Vec<f32> = lse_ref.iter().map(|&v| v as f32).collect();
    let lse_f64: Vec<f64> = lse_f.iter().map(|&v| v as f64).collect();
    let dqkv_ref = attention_backward_f64(&widen(&dout), &qkv64, &widen(&out_t), &lse_f64, s).unwrap();
    let (dout_g, out_tg, lse_fg) =
        (gpu.upload(&dout).unwrap(), gpu.upload(&out_t).unwrap(), gpu.upload(&lse_f).unwrap());
    let mut dqkv_g = gpu.upload(&vec![T::from_f32(f32::NAN); n_qkv]).unwrap();
    attention_backward(gpu, &dout_g, &qkv_g, &out_tg, &lse_fg, s, &mut dqkv_g).unwrap();
    check(&format!("attention_backward dqkv {ctx}"), &gpu.download(&dqkv_g).unwrap(), &dqkv_ref, tol::<T>());
}

/// seq around the tile sizes (32, 64) and their multiples, hd in every
/// kernel bucket (32, 64, 128) with odd sizes that leave padding; heads and
/// batch vary with the case number. `LORAFUSE_TEST_SMALL` keeps one partial
/// and one straddled key tile and one hd per bucket (for the sanitizers).
fn shapes() -> Vec<(AttnShape, u64)> {
    let (seqs, hds): (&[usize], &[usize]) = if common::small() {
        (&[7, 65], &[5, 64, 80])
    } else {
        (&[1, 7, 64, 65, 130, 257], &[3, 5, 32, 33, 64, 80, 128])
    };
    let mut v = Vec::new();
    for &seq in seqs {
        for &hd in hds {
            let n = v.len();
            v.push((shape(1 + n % 2, seq, 1 + n % 3, hd), 1000 + n as u64));
        }
    }
    v
}

fn gpu_matches<T: Element>(test: &str) {
    let Some(gpu) = common::gpu_or_skip(test) else { return };
    for (s, seed) in shapes() {
        check_shape::<T>(&gpu, s, seed);
    }
}

#[test]
fn gpu_attention_f32_matches_f64() {
    gpu_matches::<f32>("gpu_attention_f32_matches_f64");
}

#[test]
fn gpu_attention_f16_matches_f64() {
    gpu_matches::<f16>("gpu_attention_f16_matches_f64");
}

#[test]
fn gpu_attention_bf16_matches_f64() {
    gpu_matches::<bf16>("gpu_attention_bf16_matches_f64");
}

/// Two forward and two backward runs on the same inputs, compared bit for bit.
fn bit_identical<T: Element>(gpu: &Gpu, s: AttnShape, seed: u64) {
    let ctx = format!("{} {} seed={seed}", T::DTYPE, describe(s));
    let bits = |v: Vec<T>| -> Vec<u8> { bytemuck::cast_slice(&v).to_vec() };
    let qkv_g = gpu.upload(&round::<T>(&random64(seed, s.seq.tokens() * 3 * s.width(), 2.5))).unwrap();
    let dout_g = gpu.upload(&round::<T>(&random64(seed + 1, s.seq.tokens() * s.width(), 1.0))).unwrap();
    let run = || {
        let mut out = gpu.zeros::<T>(s.seq.tokens() * s.width()).unwrap();
        let mut lse = gpu.zeros::<f32>(s.lse_len()).unwrap();
        attention_forward(gpu, &qkv_g, s, &mut out, &mut lse).unwrap();
        let mut dqkv = gpu.zeros::<T>(s.seq.tokens() * 3 * s.width()).unwrap();
        attention_backward(gpu, &dout_g, &qkv_g, &out, &lse, s, &mut dqkv).unwrap();
        let lse: Vec<u8> = bytemuck::cast_slice(&gpu.download(&lse).unwrap()).to_vec();
        (bits(gpu.download(&out).unwrap()), lse, bits(gpu.download(&dqkv).unwrap()))
    };
    let (first, second) = (run(), run());
    assert!(first.0 == second.0, "attention_forward out differs between runs {ctx}");
    assert!(first.1 == second.1, "attention_forward lse differs between runs {ctx}");
    assert!(first.2 == second.2, "attention_backward dqkv differs between runs {ctx}");
}

#[test]
fn gpu_attention_is_bit_identical_across_runs() {
    let Some(gpu) = common::gpu_or_skip("gpu_attention_is_bit_identical_across_runs") else { return };
    bit_identical::<f32>(&gpu, shape(2, 257, 2, 64), 2000);
    bit_identical::<bf16>(&gpu, shape(2, 257, 2, 64), 2001);
    bit_identical::<f16>(&gpu, shape(1, 130, 3, 80), 2002);
}

#[test]
fn gpu_attention_rejects_bad_arguments() {
    let Some(gpu) = common::gpu_or_skip("gpu_attention_rejects_bad_arguments") else { return };
    let s = shape(1, 3, 1, MAX_HEAD_DIM + 1);
    let qkv = gpu.zeros::<f32>(s.seq.tokens() * 3 * s.width()).unwrap();
    let mut out = gpu.zeros::<f32>(s.seq.tokens() * s.width()).unwrap();
    let mut lse = gpu.zeros::<f32>(s.lse_len()).unwrap();
    match attention_forward(&gpu, &qkv, s, &mut out, &mut lse) {
        Err(e @ Error::Invalid { .. }) => assert!(e.to_string().contains("128"), "{e}"),
        other => panic!("head_dim {}: expected Error::Invalid, got {other:?}", s.head_dim),
    }

    let s = shape(2, 5, 2, 3);
    let qkv = gpu.zeros::<bf16>(s.seq.tokens() * 3 * s.width()).unwrap();
    let mut out = gpu.zeros::<bf16>(s.seq.tokens() * s.width()).unwrap();
    let mut short_lse = gpu.zeros::<f32>(s.lse_len() - 1).unwrap();
    let err = attention_forward(&gpu, &qkv, s, &mut out, &mut short_lse).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "lse", .. }), "{err}");

    let lse = gpu.zeros::<f32>(s.lse_len()).unwrap();
    let mut short_dqkv = gpu.zeros::<bf16>(s.seq.tokens() * 3 * s.width() - 1).unwrap();
    let err = attention_backward(&gpu, &out, &qkv, &out, &lse, s, &mut short_dqkv).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "dqkv", .. }), "{err}");
}
