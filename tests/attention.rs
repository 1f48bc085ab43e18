//! Flash-form causal attention.
//!
//! CPU (always run): the f64 twin (src/cpu/attention.rs) against the
//! textbook softmax, its backward against central finite differences, and
//! causality; the per-element error bounds below against a CPU model of the
//! tensor-core kernels' roundings (accepted) and of an off-by-one causal
//! mask (rejected). GPU (`gpu_*`, skipped without a GPU): the kernels of
//! kernels/attention.cu (CUDA-core f32, tensor-core f16/bf16) against that
//! twin on awkward shapes with those bounds, bit-identical reruns, and the
//! argument checks. Both: the backward writing `dqkv` with a row stride
//! (a packed c_attn's `dy_packed`) against the plain call.

// Without the `cuda` feature the GPU tests compile out, and the helpers
// only they use would warn.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_imports))]

mod common;

use half::{bf16, f16};
use lorafuse::attention::{AttentionOps, AttnShape};
use lorafuse::cpu::attention::{attention_backward_f64, attention_forward_f64, attention_probs_f64};
use lorafuse::cpu::Cpu;
#[cfg(feature = "cuda")]
use lorafuse::cuda::attention::{attention_backward, attention_forward, MAX_HEAD_DIM};
#[cfg(feature = "cuda")]
use lorafuse::cuda::Gpu;
use lorafuse::dtype::widen;
use lorafuse::nn::SeqShape;
use lorafuse::testing::{check_bounded, check_close, compare, ErrorBound, Level, Magnitude};
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

/// The forward as the 16-bit kernels round it: P = exp(s − m) rounded to T
/// before the P·V product, the row sum from unrounded P, the output
/// rounded to T. `reach` moves the causal mask: keys j ≤ i + reach.
fn forward_like_kernel<T: Element>(qkv: &[f64], s: AttnShape, reach: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); s.seq.tokens() * s.width()];
    for b in 0..s.seq.batch {
        for h in 0..s.heads {
            for i in 0..s.seq.seq {
                let keys = 0..(i + 1 + reach).min(s.seq.seq);
                let sc: Vec<f64> = keys.clone().map(|j| score(qkv, s, b, h, i, j)).collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for e in 0..s.head_dim {
                    let pv: f64 = keys
                        .clone()
                        .map(|j| T::from_f64((sc[j] - m).exp()).to_f64() * qkv[qkv_at(s, b, j, 2, h, e)])
                        .sum();
                    out[out_at(s, b, i, h, e)] = T::from_f64(pv / l);
                }
            }
        }
    }
    out
}

/// The per-element bounds the GPU tests use are neither vacuous nor too
/// tight: a CPU model of the tensor-core forward's roundings stays inside
/// them in f16 and bf16, and the same model with the causal mask one key
/// too far (an off-by-one on the diagonal) does not.
fn bounds_accept_kernel_rounding_and_reject_a_shifted_mask<T: Element>() {
    let s = shape(2, 70, 2, 40);
    let qkv: Vec<f64> =
        round::<T>(&random64(40, s.seq.tokens() * 3 * s.width(), 2.5)).iter().map(|v| v.to_f64()).collect();
    let dout = random64(41, s.seq.tokens() * s.width(), 1.0);
    let (out, lse) = attention_forward_f64(&qkv, s).unwrap();
    let mag = magnitudes(&qkv, &dout, &out, &lse, s);
    let ctx = format!("{} {}", T::DTYPE, describe(s));
    let model = forward_like_kernel::<T>(&qkv, s, 0);
    let ok = check_bounded(&ctx, &model, &out, &mag.out, bound::<T>()).unwrap();
    assert!(ok.max_ratio > 0.02, "{ctx}: the bound is far looser than the rounding it covers: {ok}");
    let shifted = forward_like_kernel::<T>(&qkv, s, 1);
    let err = check_bounded(&ctx, &shifted, &out, &mag.out, bound::<T>()).unwrap_err();
    assert!(err.contains("above their error bound"), "{err}");
}

#[test]
fn cpu_bounds_accept_kernel_rounding_and_reject_a_shifted_mask() {
    bounds_accept_kernel_rounding_and_reject_a_shifted_mask::<f16>();
    bounds_accept_kernel_rounding_and_reject_a_shifted_mask::<bf16>();
}

// ---- CUDA kernels -----------------------------------------------------------

/// `lse` is f32 whatever `T` is: a relative tolerance of a few f32
/// roundings of the scores' magnitude.
const LSE_TOL: f64 = 1e-5;

fn check<T: Element>(ctx: &str, got: &[T], want: &[f64], tol: f64) {
    if let Err(e) = check_close(ctx, got, want, tol) {
        panic!("{e}");
    }
}

/// Per-element error magnitudes of the attention outputs (see
/// `lorafuse::testing` for how a bound follows from them), from the oracle's
/// intermediates of one call. The kernels' error sources, per output:
///
/// * `out_i = Σ_j P_ij v_j / 1`: the P·V reduction over the i+1 keys with
///   P rounded to T on the way (16-bit kernels: P is the A operand of the
///   tensor-core product); the scores s_ij = scale·q_i·k_j, an hd-term
///   reduction whose error δ moves P_ij by P_ij·δ and out_i by
///   P_ij·δ·(v_j − out_i), so it enters with weight P_ij·(|v_j| + |out_i|);
///   the f32 row sum l_i, a relative error on all of out_i.
/// * `dV_j = Σ_{i≥j} P_ij dO_i`: the same P roundings and score errors.
/// * `dQ_i = scale·Σ_j dS_ij k_j`, `dK_j = scale·Σ_i dS_ij q_i` with
///   `dS_ij = P_ij (dP_ij − Δ_i)` rounded to T: the reduction itself; the
///   score errors through P_ij (weight P_ij·|dP_ij − Δ_i|); the hd-term
///   reduction dP_ij = dO_i·v_j (weight P_ij); the hd-term Δ_i = dO_i·O_i.
///
/// The score's magnitude is taken as scale·Σ|q·k| + |lse_i| + 1: the last
/// two cover the f32 shift by the running max or lse and exp2's own error
/// (a few ulps), which perturb P_ij relatively by u₃₂ times those.
struct AttnMagnitudes {
    out: Vec<Magnitude>,
    dqkv: Vec<Magnitude>,
}

fn magnitudes(qkv: &[f64], dout: &[f64], out: &[f64], lse: &[f64], s: AttnShape) -> AttnMagnitudes {
    let (n, hd) = (s.seq.seq, s.head_dim);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut mag_out = vec![Magnitude::default(); out.len()];
    let mut mag_dqkv = vec![Magnitude::default(); qkv.len()];
    for b in 0..s.seq.batch {
        for h in 0..s.heads {
            let at = |part, t, e| qkv[qkv_at(s, b, t, part, h, e)];
            let o = |t, e| out[out_at(s, b, t, h, e)];
            let d_o = |t, e| dout[out_at(s, b, t, h, e)];
            let l = |i: usize| lse[(b * s.heads + h) * n + i];
            // Row i, column j ≤ i (zero above the diagonal).
            let (mut p, mut c, mut dp_abs, mut ds, mut dsd) =
                (vec![0.0; n * n], vec![0.0; n * n], vec![0.0; n * n], vec![0.0; n * n], vec![0.0; n * n]);
            let mut delta_abs = vec![0.0; n];
            for i in 0..n {
                let delta: f64 = (0..hd).map(|e| d_o(i, e) * o(i, e)).sum();
                delta_abs[i] = (0..hd).map(|e| (d_o(i, e) * o(i, e)).abs()).sum();
                for j in 0..=i {
                    let dot: f64 = (0..hd).map(|e| at(0, i, e) * at(1, j, e)).sum();
                    let dot_abs: f64 = (0..hd).map(|e| (at(0, i, e) * at(1, j, e)).abs()).sum();
                    let dp: f64 = (0..hd).map(|e| d_o(i, e) * at(2, j, e)).sum();
                    let pij = (scale * dot - l(i)).exp();
                    p[i * n + j] = pij;
                    c[i * n + j] = scale * dot_abs + l(i).abs() + 1.0;
                    dp_abs[i * n + j] = (0..hd).map(|e| (d_o(i, e) * at(2, j, e)).abs()).sum();
                    ds[i * n + j] = (pij * (dp - delta)).abs();
                    dsd[i * n + j] = (dp - delta).abs();
                }
            }
            for i in 0..n {
                for e in 0..hd {
                    let keys = 0..=i;
                    let pv: f64 = keys.clone().map(|j| p[i * n + j] * at(2, j, e).abs()).sum();
                    let score = keys.clone().map(|j| p[i * n + j] * (at(2, j, e).abs() + o(i, e).abs()) * c[i * n + j]);
                    mag_out[out_at(s, b, i, h, e)] = Magnitude::nested(&[
                        Level::sum(i + 1, pv, true),
                        Level::inner(hd, score, false),
                        Level::sum(i + 1, o(i, e).abs(), false),
                    ]);
                    // dQ_i: sum over keys j ≤ i.
                    let red: f64 = keys.clone().map(|j| scale * ds[i * n + j] * at(1, j, e).abs()).sum();
                    let sc =
                        keys.clone().map(|j| scale * p[i * n + j] * c[i * n + j] * dsd[i * n + j] * at(1, j, e).abs());
                    let dpl = keys.clone().map(|j| scale * p[i * n + j] * dp_abs[i * n + j] * at(1, j, e).abs());
                    let pk: f64 = keys.map(|j| scale * p[i * n + j] * at(1, j, e).abs()).sum();
                    mag_dqkv[qkv_at(s, b, i, 0, h, e)] = Magnitude::nested(&[
                        Level::sum(i + 1, red, true),
                        Level::inner(hd, sc, false),
                        Level::inner(hd, dpl, false),
                        Level::sum(hd, delta_abs[i] * pk, false),
                    ]);
                }
            }
            for j in 0..n {
                for e in 0..hd {
                    let queries = j..n;
                    // dK_j: sum over queries i ≥ j.
                    let red: f64 = queries.clone().map(|i| scale * ds[i * n + j] * at(0, i, e).abs()).sum();
                    let sc = queries
                        .clone()
                        .map(|i| scale * p[i * n + j] * c[i * n + j] * dsd[i * n + j] * at(0, i, e).abs());
                    let dpl = queries.clone().map(|i| scale * p[i * n + j] * dp_abs[i * n + j] * at(0, i, e).abs());
                    let dl = queries.clone().map(|i| scale * p[i * n + j] * delta_abs[i] * at(0, i, e).abs());
                    mag_dqkv[qkv_at(s, b, j, 1, h, e)] = Magnitude::nested(&[
                        Level::sum(n - j, red, true),
                        Level::inner(hd, sc, false),
                        Level::inner(hd, dpl, false),
                        Level::inner(hd, dl, false),
                    ]);
                    // dV_j = Σ_{i≥j} P_ij dO_i.
                    let pdo: f64 = queries.clone().map(|i| p[i * n + j] * d_o(i, e).abs()).sum();
                    let sc = queries.map(|i| p[i * n + j] * c[i * n + j] * d_o(i, e).abs());
                    mag_dqkv[qkv_at(s, b, j, 2, h, e)] =
                        Magnitude::nested(&[Level::sum(n - j, pdo, true), Level::inner(hd, sc, false)]);
                }
            }
        }
    }
    AttnMagnitudes { out: mag_out, dqkv: mag_dqkv }
}

/// The kernels' error model: f32 on CUDA cores; f16/bf16 on tensor cores,
/// each term of a product rounded to 16 bits once on the way (P in P·V and
/// Pᵀ·dO, dS in dS·K and dSᵀ·Q; the other operands are inputs, already T).
fn bound<T: Element>() -> ErrorBound {
    ErrorBound::gpu(T::DTYPE).intermediates(1)
}

fn check_bound<T: Element>(ctx: &str, got: &[T], want: &[f64], mag: &[Magnitude]) {
    if let Err(e) = check_bounded(ctx, got, want, mag, bound::<T>()) {
        panic!("{e}");
    }
}

fn round<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

#[cfg(feature = "cuda")]
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
    check(&format!("attention_forward lse {ctx}"), &gpu.download(&lse_g).unwrap(), &lse_ref, LSE_TOL);

    // The backward gets the reference's out and lse, stored as the forward
    // stores them (T and f32), and so does its reference: this measures the
    // backward kernels alone.
    let dout: Vec<T> = round(&random64(seed + 1, n_out, 1.0));
    let out_t: Vec<T> = round(&out_ref);
    let lse_f: Vec<f32> = lse_ref.iter().map(|&v| v as f32).collect();
    let lse_f64: Vec<f64> = lse_f.iter().map(|&v| v as f64).collect();
    let dqkv_ref = attention_backward_f64(&widen(&dout), &qkv64, &widen(&out_t), &lse_f64, s).unwrap();
    let mag = magnitudes(&qkv64, &widen(&dout), &widen(&out_t), &lse_f64, s);
    check_bound(&format!("attention_forward out {ctx}"), &gpu.download(&out_g).unwrap(), &out_ref, &mag.out);
    let (dout_g, out_tg, lse_fg) =
        (gpu.upload(&dout).unwrap(), gpu.upload(&out_t).unwrap(), gpu.upload(&lse_f).unwrap());
    let mut dqkv_g = gpu.upload(&vec![T::from_f32(f32::NAN); n_qkv]).unwrap();
    attention_backward(gpu, &dout_g, &qkv_g, &out_tg, &lse_fg, s, &mut dqkv_g).unwrap();
    check_bound(&format!("attention_backward dqkv {ctx}"), &gpu.download(&dqkv_g).unwrap(), &dqkv_ref, &mag.dqkv);
}

#[cfg(feature = "cuda")]
/// seq around the tile sizes (32, 64) and their multiples, hd in every
/// kernel bucket (32, 64, 128) with odd sizes that leave padding (and take
/// the element-wise load path of the tensor-core kernels); heads and batch
/// vary with the case number. `LORAFUSE_TEST_SMALL` keeps one partial and
/// one straddled key tile and one hd per bucket (for the sanitizers).
fn shapes() -> Vec<(AttnShape, u64)> {
    let (seqs, hds): (&[usize], &[usize]) = if common::small() {
        (&[7, 65], &[5, 64, 80])
    } else {
        (&[1, 7, 64, 65, 130, 257], &[3, 5, 32, 33, 64, 80, 100, 128])
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

#[cfg(feature = "cuda")]
fn gpu_matches<T: Element>(test: &str) {
    let Some(gpu) = common::gpu_or_skip(test) else { return };
    for (s, seed) in shapes() {
        check_shape::<T>(&gpu, s, seed);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_attention_f32_matches_f64() {
    gpu_matches::<f32>("gpu_attention_f32_matches_f64");
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_attention_f16_matches_f64() {
    gpu_matches::<f16>("gpu_attention_f16_matches_f64");
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_attention_bf16_matches_f64() {
    gpu_matches::<bf16>("gpu_attention_bf16_matches_f64");
}

#[cfg(feature = "cuda")]
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

#[cfg(feature = "cuda")]
#[test]
fn gpu_attention_is_bit_identical_across_runs() {
    let Some(gpu) = common::gpu_or_skip("gpu_attention_is_bit_identical_across_runs") else { return };
    bit_identical::<f32>(&gpu, shape(2, 257, 2, 64), 2000);
    bit_identical::<bf16>(&gpu, shape(2, 257, 2, 64), 2001);
    bit_identical::<f16>(&gpu, shape(1, 130, 3, 80), 2002);
    bit_identical::<bf16>(&gpu, shape(1, 300, 2, 128), 2003);
    bit_identical::<f16>(&gpu, shape(2, 100, 1, 33), 2004);
}

#[cfg(feature = "cuda")]
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

// ---- dqkv with a row stride (both backends) -----------------------------------

/// The backward writing `dqkv`'s rows `ld` apart into a buffer whose pad
/// columns hold NaN must give the plain call's rows bit for bit (the same
/// kernels or the same f64 sums, only the store address differs) and leave
/// every pad bit as it was; a stride below 3W and a buffer one short are
/// typed errors naming `dqkv`.
fn strided_dqkv_matches_plain<B: AttentionOps, T: Element>(dev: &B, s: AttnShape, seed: u64) {
    let (tokens, w3) = (s.seq.tokens(), 3 * s.width());
    let qkv = dev.upload(&round::<T>(&random64(seed, tokens * w3, 2.5))).unwrap();
    let dout = dev.upload(&round::<T>(&random64(seed + 1, tokens * s.width(), 1.0))).unwrap();
    let mut out = dev.zeros::<T>(tokens * s.width()).unwrap();
    let mut lse = dev.zeros::<f32>(s.lse_len()).unwrap();
    dev.attention_forward(&qkv, s, &mut out, &mut lse).unwrap();
    let mut plain = dev.zeros::<T>(tokens * w3).unwrap();
    dev.attention_backward(&dout, &qkv, &out, &lse, s, &mut plain).unwrap();
    let plain = dev.download(&plain).unwrap();
    let bits = |v: &[T]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
    // +8: a packed c_attn's pad (rank + 1 rounded up to 8); +3: an odd pitch.
    for ld in [w3 + 8, w3 + 3] {
        let ctx = format!("{} {} seed={seed} dqkv_ld={ld}", T::DTYPE, describe(s));
        let nan = T::from_f32(f32::NAN);
        let mut dqkv = dev.upload(&vec![nan; tokens * ld]).unwrap();
        dev.attention_backward_strided(&dout, &qkv, &out, s.width(), &lse, s, &mut dqkv, ld).unwrap();
        let got = dev.download(&dqkv).unwrap();
        for (t, (row, want)) in got.chunks(ld).zip(plain.chunks(w3)).enumerate() {
            assert!(bits(&row[..w3]) == bits(want), "{ctx}: token {t} differs from the plain call");
            assert!(bits(&row[w3..]) == bits(&vec![nan; ld - w3]), "{ctx}: token {t}'s pad columns were written");
        }
        let mut short = dev.zeros::<T>(tokens * ld - 1).unwrap();
        for (buf, ld, says) in [(&mut dqkv, w3 - 1, "rows would overlap"), (&mut short, ld, "rows of stride")] {
            match dev.attention_backward_strided(&dout, &qkv, &out, s.width(), &lse, s, buf, ld) {
                Err(e @ Error::Invalid { .. }) | Err(e @ Error::Shape { operand: "dqkv", .. }) => {
                    assert!(e.to_string().contains(says), "{ctx}: {e}")
                }
                other => panic!("{ctx}: dqkv_ld={ld}: expected a typed dqkv error, got {other:?}"),
            }
        }
    }
}

#[test]
fn cpu_strided_dqkv_matches_plain() {
    strided_dqkv_matches_plain::<_, f32>(&Cpu, shape(2, 9, 2, 5), 3000);
    strided_dqkv_matches_plain::<_, bf16>(&Cpu, shape(1, 17, 3, 4), 3001);
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_strided_dqkv_matches_plain() {
    let Some(gpu) = common::gpu_or_skip("gpu_strided_dqkv_matches_plain") else { return };
    // f32: CUDA-core kernels; f16/bf16: tensor-core dQ and dK/dV kernels,
    // hd 64 (native, cp.async) and 33 (padded); seq past one tile.
    strided_dqkv_matches_plain::<_, f32>(&gpu, shape(2, 130, 2, 64), 3002);
    strided_dqkv_matches_plain::<_, bf16>(&gpu, shape(2, 130, 2, 64), 3003);
    strided_dqkv_matches_plain::<_, f16>(&gpu, shape(1, 70, 3, 33), 3004);
    strided_dqkv_matches_plain::<_, bf16>(&gpu, shape(1, 65, 1, 128), 3005);
}
