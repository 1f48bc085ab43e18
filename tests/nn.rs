//! The nn family's CUDA ops (kernels/nn.cu) against their CPU twins
//! (src/cpu/nn.rs), op by op, in every compute dtype, on random inputs of
//! awkward shapes: outputs NaN-poisoned before overwriting ops, accumulating
//! ops started from random values. Inputs are rounded to the dtype first,
//! so both sides see the same values.
//!
//! Each case is written once over the backend (`dev`) and the dtype, and
//! instantiated per device by `test_device!` (tests/common): on the GPU
//! (skipped without one; not compiled without the `cuda` feature), and on
//! the CPU where the case has an oracle other than the CPU twin itself.

#[macro_use]
mod common;

use half::{bf16, f16};
use lorafuse::attention::{AttentionOps, AttnShape};
use lorafuse::cpu::Cpu;
#[cfg(feature = "cuda")]
use lorafuse::cuda::Gpu;
use lorafuse::dtype::widen;
use lorafuse::lowrank::{Grads, LinearShape, LowRankOps};
use lorafuse::nn::{mean_over_scored, AdamWStep, AdamWTensor, GradScale, NnOps, SeqShape, TokenIds, IGNORE};
use lorafuse::testing::{abs, check_bounded, check_close, ErrorBound, Magnitude};
use lorafuse::{Backend, Element};

fn nan<T: Element>(n: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); n]
}

/// `n` seeded values in `[-scale, scale)`, rounded to `T`.
fn input<T: Element>(seed: u64, n: usize, scale: f32) -> Vec<T> {
    common::random(seed, n).iter().map(|&v| T::from_f32(scale * v)).collect()
}

/// GPU result vs CPU twin of the sums (embedding, residual add, the
/// parameter gradients of LayerNorm): each element within its derived bound
/// (src/testing.rs) from `sum_abs` = Σ|terms| over a reduction of `n` f32
/// additions on CUDA cores.
fn check_sum<B: Backend, T: Element>(dev: &B, ctx: &str, got: &B::Buf<T>, want: &[T], n: usize, sum_abs: &[f32]) {
    let got = dev.download(got).unwrap();
    let want = widen(want);
    let mag = Magnitude::sums(n, &sum_abs.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let ctx = format!("{ctx} dtype={}", T::DTYPE);
    if let Err(e) = check_bounded(&ctx, &got, &want, &mag, ErrorBound::cuda_cores(T::DTYPE)) {
        panic!("{e}");
    }
}

/// GPU result vs CPU twin of a non-linear op (LayerNorm's output and dx,
/// GELU, attention, cross-entropy, AdamW), within the relative tolerance of
/// the stored dtype `T`: the two sides round the same f32/f64 values, so
/// they differ by at most the last bits of `T`. These are not sums of
/// products, so Σ|terms| has no meaning for them; attention has its own
/// f64-twin tests (tests/attention.rs).
fn check<B: Backend, T: Element>(dev: &B, ctx: &str, got: &B::Buf<T>, want: &[T]) {
    let got = dev.download(got).unwrap();
    let want = widen(want);
    let ctx = format!("{ctx} dtype={}", T::DTYPE);
    if let Err(e) = check_close(&ctx, &got, &want, T::DTYPE.tolerance()) {
        panic!("{e}");
    }
}

fn embedding<B: NnOps, T: Element>(dev: &B) {
    for (n, &(batch, seq, width, vocab, positions)) in
        [(1, 1, 1, 1, 1), (2, 7, 33, 50, 9), (3, 64, 96, 300, 64), (2, 301, 8, 1031, 301)].iter().enumerate()
    {
        let seed = 100 + n as u64;
        let ctx = format!("batch={batch} seq={seq} width={width} vocab={vocab} seed={seed}");
        let shape = SeqShape { batch, seq };
        let mut rng = lorafuse::rng::Rng::new(seed);
        // Repeated tokens exercise the grouped (deterministic) backward.
        let tokens: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab.min(5) as u64) as u32).collect();
        let wte: Vec<T> = input(seed, vocab * width, 1.0);
        let wpe: Vec<T> = input(seed + 1, positions * width, 1.0);
        let mut out_c = vec![0f32; batch * seq * width];
        let ids_c = TokenIds::<Cpu> { device: &tokens, host: &tokens };
        Cpu.embedding_forward(ids_c, &wte, &wpe, shape, width, &mut out_c).unwrap();
        let (t_g, wte_g, wpe_g) = (dev.upload(&tokens).unwrap(), dev.upload(&wte).unwrap(), dev.upload(&wpe).unwrap());
        let ids_g = TokenIds::<B> { device: &t_g, host: &tokens };
        let mut out_g = dev.upload(&nan::<f32>(out_c.len())).unwrap();
        dev.embedding_forward(ids_g, &wte_g, &wpe_g, shape, width, &mut out_g).unwrap();
        // out = wte[token] + wpe[position]: the same op on |tables| is Σ|terms|.
        let (awte, awpe): (Vec<T>, Vec<T>) = (
            wte.iter().map(|v| T::from_f64(v.to_f64().abs())).collect(),
            wpe.iter().map(|v| T::from_f64(v.to_f64().abs())).collect(),
        );
        let mut mag = vec![0f32; out_c.len()];
        Cpu.embedding_forward(ids_c, &awte, &awpe, shape, width, &mut mag).unwrap();
        check_sum(dev, &format!("embedding_forward {ctx} weights={}", T::DTYPE), &out_g, &out_c, 2, &mag);

        let dout = common::random(seed + 2, out_c.len());
        let (mut dwte_c, mut dwpe_c) = (common::random(seed + 3, wte.len()), common::random(seed + 4, wpe.len()));
        let (mut dwte_g, mut dwpe_g) = (dev.upload(&dwte_c).unwrap(), dev.upload(&dwpe_c).unwrap());
        // dwte[v] += Σ over the tokens equal to v, dwpe[p] += Σ over rows:
        // the same op on |dout| from |start| is Σ|terms|.
        let (mut mte, mut mpe) = (abs(&dwte_c), abs(&dwpe_c));
        Cpu.embedding_backward(ids_c, &abs(&dout), shape, width, Some(&mut mte), Some(&mut mpe)).unwrap();
        Cpu.embedding_backward(ids_c, &dout, shape, width, Some(&mut dwte_c), Some(&mut dwpe_c)).unwrap();
        let dout_g = dev.upload(&dout).unwrap();
        dev.embedding_backward(ids_g, &dout_g, shape, width, Some(&mut dwte_g), Some(&mut dwpe_g)).unwrap();
        check_sum(dev, &format!("embedding_backward dwte {ctx}"), &dwte_g, &dwte_c, batch * seq + 1, &mte);
        check_sum(dev, &format!("embedding_backward dwpe {ctx}"), &dwpe_g, &dwpe_c, batch + 1, &mpe);
    }
}

test_device!(embedding[f32, bf16], gpu: gpu_embedding_matches_cpu);

/// The token embedding's gradient on the GPU is, bit for bit, each token's
/// rows summed in f32 in ascending row order and added once: the order the
/// device-built grouping promises (a stable sort), whatever else ran in
/// the workspace before. Rows: 2 × 500 (four 256-row chunks, the last
/// partial); ids: a few frequent ones (groups spanning every chunk), the
/// last vocabulary row, and the rest distinct.
#[cfg(feature = "cuda")]
#[test]
fn gpu_embedding_backward_sums_each_token_in_row_order() {
    let Some(gpu) = common::gpu_or_skip("gpu_embedding_backward_sums_each_token_in_row_order") else { return };
    let (shape, width, vocab) = (SeqShape { batch: 2, seq: 500 }, 24, 2053);
    let rows = shape.tokens();
    let mut rng = lorafuse::rng::Rng::new(31);
    let tokens: Vec<u32> = (0..rows)
        .map(|r| match r % 4 {
            0 => rng.below(3) as u32,
            1 => vocab as u32 - 1,
            _ => 3 + (r as u32 * 7) % (vocab as u32 - 4),
        })
        .collect();
    let dout = common::random(32, rows * width);
    let dwte0 = common::random(33, vocab * width);
    let mut groups = vec![Vec::new(); vocab];
    for (r, &t) in tokens.iter().enumerate() {
        groups[t as usize].push(r);
    }
    let mut want = dwte0.clone();
    for (tok, group) in groups.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
        for c in 0..width {
            let sum = group.iter().fold(0f32, |acc, &r| acc + dout[r * width + c]);
            want[tok * width + c] += sum;
        }
    }
    let (t_g, dout_g) = (gpu.upload(&tokens).unwrap(), gpu.upload(&dout).unwrap());
    let ids = TokenIds::<Gpu> { device: &t_g, host: &tokens };
    for call in 0..2 {
        // Scratch left as NaN bytes (0xFF…) by the previous user.
        gpu.poison_workspace().unwrap();
        let mut dwte_g = gpu.upload(&dwte0).unwrap();
        gpu.embedding_backward(ids, &dout_g, shape, width, Some(&mut dwte_g), None).unwrap();
        let got = gpu.download(&dwte_g).unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(
            differ,
            0,
            "call {call}: {differ} of {} dwte elements differ from the row-ordered f32 sums",
            got.len()
        );
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_embedding_guards_bad_tokens() {
    let Some(gpu) = common::gpu_or_skip("gpu_embedding_guards_bad_tokens") else { return };
    // A token outside the vocabulary is a typed error, not a wild read.
    let shape = SeqShape { batch: 1, seq: 2 };
    let host = [0u32, 9];
    let t_g = gpu.upload(&host).unwrap();
    let (wte_g, wpe_g) = (gpu.upload(&[0.5f32; 8]).unwrap(), gpu.upload(&[0.5f32; 4]).unwrap());
    let mut out_g = gpu.upload(&[0f32; 4]).unwrap();
    let ids = TokenIds::<Gpu> { device: &t_g, host: &host };
    let err = gpu.embedding_forward(ids, &wte_g, &wpe_g, shape, 2, &mut out_g).unwrap_err();
    assert!(matches!(err, lorafuse::Error::Index { index: 9, bound: 4, .. }), "{err}");
    // A device copy that disagrees with the (valid) host copy must not read
    // out of bounds: the kernel guards the index (compute-sanitizer checks
    // this test) and the row comes out NaN.
    let good = [0u32, 1];
    let ids = TokenIds::<Gpu> { device: &t_g, host: &good };
    gpu.embedding_forward(ids, &wte_g, &wpe_g, shape, 2, &mut out_g).unwrap();
    let out = gpu.download(&out_g).unwrap();
    assert!(out[0].is_finite() && out[2].is_nan(), "guarded embedding rows: {out:?}");
    // The same disagreeing copy in the backward: the device grouping leaves
    // the out-of-range row out (it adds to no row), the other row lands.
    let dout_g = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let mut dwte_g = gpu.upload(&[0f32; 8]).unwrap();
    gpu.embedding_backward(ids, &dout_g, shape, 2, Some(&mut dwte_g), None).unwrap();
    assert_eq!(gpu.download(&dwte_g).unwrap(), [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "guarded backward rows");
}

fn layernorm<B: NnOps, T: Element>(dev: &B) {
    // d = 12, 768, 1024: the kernel's register path; 1028 (a multiple of 4
    // over 1024) and the odd widths: its plain loop.
    let shapes = [(1, 1), (1, 31), (9, 33), (130, 768), (65, 257), (3, 12), (17, 1024), (5, 1028)];
    for (n, &(rows, d)) in shapes.iter().enumerate() {
        let seed = 200 + n as u64;
        let ctx = format!("rows={rows} d={d} seed={seed}");
        let x: Vec<f32> = common::random(seed, rows * d).iter().map(|v| 3.0 * v + 0.5).collect();
        let (gamma, beta): (Vec<T>, Vec<T>) = (input(seed + 1, d, 1.0), input(seed + 2, d, 1.0));
        let (mut out_c, mut mean_c, mut rstd_c) = (vec![T::default(); rows * d], vec![0f32; rows], vec![0f32; rows]);
        Cpu.layernorm_forward(&x, &gamma, &beta, 1e-5, &mut out_c, &mut mean_c, &mut rstd_c).unwrap();
        let (x_g, g_g, b_g) = (dev.upload(&x).unwrap(), dev.upload(&gamma).unwrap(), dev.upload(&beta).unwrap());
        let (mut out_g, mut mean_g, mut rstd_g) = (
            dev.upload(&nan::<T>(rows * d)).unwrap(),
            dev.upload(&nan::<f32>(rows)).unwrap(),
            dev.upload(&nan::<f32>(rows)).unwrap(),
        );
        dev.layernorm_forward(&x_g, &g_g, &b_g, 1e-5, &mut out_g, &mut mean_g, &mut rstd_g).unwrap();
        check(dev, &format!("layernorm_forward out {ctx}"), &out_g, &out_c);
        check(dev, &format!("layernorm_forward mean {ctx}"), &mean_g, &mean_c);
        check(dev, &format!("layernorm_forward rstd {ctx}"), &rstd_g, &rstd_c);

        // The residual add fused in front.
        let x0: Vec<f32> = common::random(seed + 7, rows * d);
        let y: Vec<T> = input(seed + 8, rows * d, 2.0);
        let (mut r_c, mut fo_c, mut fm_c, mut fr_c) =
            (vec![0f32; rows * d], vec![T::default(); rows * d], vec![0f32; rows], vec![0f32; rows]);
        Cpu.residual_layernorm_forward(&x0, &y, &gamma, &beta, 1e-5, &mut r_c, &mut fo_c, &mut fm_c, &mut fr_c)
            .unwrap();
        let (x0_g, y_g) = (dev.upload(&x0).unwrap(), dev.upload(&y).unwrap());
        let (mut r_g, mut fo_g, mut fm_g, mut fr_g) = (
            dev.upload(&nan::<f32>(rows * d)).unwrap(),
            dev.upload(&nan::<T>(rows * d)).unwrap(),
            dev.upload(&nan::<f32>(rows)).unwrap(),
            dev.upload(&nan::<f32>(rows)).unwrap(),
        );
        dev.residual_layernorm_forward(&x0_g, &y_g, &g_g, &b_g, 1e-5, &mut r_g, &mut fo_g, &mut fm_g, &mut fr_g)
            .unwrap();
        check(dev, &format!("residual_layernorm_forward resid {ctx}"), &r_g, &r_c);
        check(dev, &format!("residual_layernorm_forward out {ctx}"), &fo_g, &fo_c);
        check(dev, &format!("residual_layernorm_forward mean {ctx}"), &fm_g, &fm_c);
        check(dev, &format!("residual_layernorm_forward rstd {ctx}"), &fr_g, &fr_c);

        let dout: Vec<T> = input(seed + 3, rows * d, 1.0);
        let mut dx_c = common::random(seed + 4, rows * d);
        let (mut dg_c, mut db_c) = (common::random(seed + 5, d), common::random(seed + 6, d));
        let starts_g_b = (dg_c.clone(), db_c.clone());
        let (mut dx_g, mut dg_g, mut db_g) =
            (dev.upload(&dx_c).unwrap(), dev.upload(&dg_c).unwrap(), dev.upload(&db_c).unwrap());
        Cpu.layernorm_backward(&dout, &x, &gamma, &mean_c, &rstd_c, &mut dx_c, Some(&mut dg_c), Some(&mut db_c))
            .unwrap();
        let dout_g = dev.upload(&dout).unwrap();
        let (mean_g2, rstd_g2) = (dev.upload(&mean_c).unwrap(), dev.upload(&rstd_c).unwrap());
        dev.layernorm_backward(&dout_g, &x_g, &g_g, &mean_g2, &rstd_g2, &mut dx_g, Some(&mut dg_g), Some(&mut db_g))
            .unwrap();
        check(dev, &format!("layernorm_backward dx {ctx} dtype={}", T::DTYPE), &dx_g, &dx_c);
        // dbeta = start + Σ_rows dout; dgamma = start + Σ_rows dout·x̂ with
        // x̂ = (x − mean)·rstd, whose error scales with (|x| + |mean|)·rstd
        // (the mean is itself a sum over d): n = rows + d + 4.
        let (mut mg, mut mb) = (vec![0f32; d], vec![0f32; d]);
        for c in 0..d {
            mb[c] = starts_g_b.1[c].abs() + (0..rows).map(|r| dout[r * d + c].to_f32().abs()).sum::<f32>();
            mg[c] = starts_g_b.0[c].abs()
                + (0..rows)
                    .map(|r| dout[r * d + c].to_f32().abs() * rstd_c[r] * (x[r * d + c].abs() + mean_c[r].abs()))
                    .sum::<f32>();
        }
        check_sum(dev, &format!("layernorm_backward dgamma {ctx}"), &dg_g, &dg_c, rows + d + 4, &mg);
        check_sum(dev, &format!("layernorm_backward dbeta {ctx}"), &db_g, &db_c, rows + 1, &mb);
    }
}

test_device!(layernorm[f32, bf16, f16], gpu: gpu_layernorm_matches_cpu);

/// The [`AttentionOps`] entry points (the kernels themselves are
/// tested in depth by tests/attention.rs): wiring, `lse`, and `dqkv`.
fn attention<B: AttentionOps, T: Element>(dev: &B) {
    for (n, &(batch, seq, heads, head_dim)) in [(1, 1, 1, 1), (2, 33, 3, 16), (1, 70, 2, 64)].iter().enumerate() {
        let seed = 300 + n as u64;
        let ctx = format!("batch={batch} seq={seq} heads={heads} head_dim={head_dim} seed={seed}");
        let shape = AttnShape { seq: SeqShape { batch, seq }, heads, head_dim };
        let qkv: Vec<T> = input(seed, shape.seq.tokens() * 3 * shape.width(), 1.0);
        let (mut out_c, mut lse_c) =
            (vec![T::default(); shape.seq.tokens() * shape.width()], vec![0f32; shape.lse_len()]);
        Cpu.attention_forward(&qkv, shape, &mut out_c, &mut lse_c).unwrap();
        let qkv_g = dev.upload(&qkv).unwrap();
        let (mut out_g, mut lse_g) =
            (dev.upload(&nan::<T>(out_c.len())).unwrap(), dev.upload(&nan::<f32>(lse_c.len())).unwrap());
        dev.attention_forward(&qkv_g, shape, &mut out_g, &mut lse_g).unwrap();
        check(dev, &format!("attention_forward out {ctx}"), &out_g, &out_c);
        check(dev, &format!("attention_forward lse {ctx} dtype={}", T::DTYPE), &lse_g, &lse_c);

        let dout: Vec<T> = input(seed + 1, out_c.len(), 1.0);
        let mut dqkv_c = vec![T::default(); qkv.len()];
        Cpu.attention_backward(&dout, &qkv, &out_c, &lse_c, shape, &mut dqkv_c).unwrap();
        let (dout_g, out_cg, lse_cg) =
            (dev.upload(&dout).unwrap(), dev.upload(&out_c).unwrap(), dev.upload(&lse_c).unwrap());
        let mut dqkv_g = dev.upload(&nan::<T>(qkv.len())).unwrap();
        dev.attention_backward(&dout_g, &qkv_g, &out_cg, &lse_cg, shape, &mut dqkv_g).unwrap();
        check(dev, &format!("attention_backward dqkv {ctx}"), &dqkv_g, &dqkv_c);

        // The forward's output read from a packed attn.c_proj's x_packed:
        // rows W + 8 apart with NaN between them, which a read would carry
        // into dqkv. A stride below W or a short buffer is a typed error.
        let (w, tokens) = (shape.width(), shape.seq.tokens());
        let ld = w + 8;
        // The forward writing there: rows ld apart, the pad's garbage kept.
        let garbage = T::from_f32(7.0);
        let mut fwd_s = dev.upload(&vec![garbage; tokens * ld]).unwrap();
        let mut lse_s = dev.upload(&nan::<f32>(lse_c.len())).unwrap();
        dev.attention_forward_strided(&qkv_g, shape, &mut fwd_s, ld, &mut lse_s).unwrap();
        check(
            dev,
            &format!("attention_forward_strided out {ctx} out_ld={ld}"),
            &fwd_s,
            &spread(&out_c, w, ld, garbage),
        );
        let kept = dev.download(&fwd_s).unwrap().chunks(ld).all(|row| row[w..].iter().all(|&p| p == garbage));
        assert!(kept, "attention_forward_strided {ctx}: pad columns written");
        let e = dev.attention_forward_strided(&qkv_g, shape, &mut fwd_s, w - 1, &mut lse_s).unwrap_err();
        assert!(e.to_string().contains("rows would overlap"), "{ctx}: {e}");
        let out_s = dev.upload(&spread(&out_c, w, ld, T::from_f32(f32::NAN))).unwrap();
        let mut dqkv_s = dev.upload(&nan::<T>(qkv.len())).unwrap();
        dev.attention_backward_strided(&dout_g, &qkv_g, &out_s, ld, &lse_cg, shape, &mut dqkv_s, 3 * w).unwrap();
        check(dev, &format!("attention_backward_strided dqkv {ctx} out_ld={ld}"), &dqkv_s, &dqkv_c);
        let short = dev.upload(&nan::<T>(tokens * ld - 1)).unwrap();
        for (out, ld, says) in [(&out_s, w - 1, "rows would overlap"), (&short, ld, "rows of stride")] {
            let e = dev
                .attention_backward_strided(&dout_g, &qkv_g, out, ld, &lse_cg, shape, &mut dqkv_s, 3 * w)
                .unwrap_err();
            assert!(e.to_string().contains(says), "{ctx}: {e}");
        }
    }
}

test_device!(attention[f32, bf16], gpu: gpu_attention_matches_cpu);

/// The CPU twin of the strided attention forward and backward (the GPU
/// ones are in `attention` above): the same values, pads never written or
/// read.
#[test]
fn cpu_attention_backward_reads_strided_out() {
    attention::<Cpu, f32>(&Cpu);
}

fn elementwise<B: NnOps, T: Element>(dev: &B) {
    for (k, &n) in [1usize, 31, 4097, 100_003].iter().enumerate() {
        let seed = 400 + k as u64;
        let ctx = format!("n={n} seed={seed}");
        let x: Vec<T> = input(seed, n, 4.0);
        let x_g = dev.upload(&x).unwrap();
        let mut out_c = vec![T::default(); n];
        Cpu.gelu_forward(&x, &mut out_c).unwrap();
        let mut out_g = dev.upload(&nan::<T>(n)).unwrap();
        dev.gelu_forward(&x_g, &mut out_g).unwrap();
        check(dev, &format!("gelu_forward {ctx}"), &out_g, &out_c);

        let dout: Vec<T> = input(seed + 1, n, 1.0);
        let dout_g = dev.upload(&dout).unwrap();
        Cpu.gelu_backward(&dout, &x, &mut out_c).unwrap();
        let mut dx_g = dev.upload(&nan::<T>(n)).unwrap();
        dev.gelu_backward(&dout_g, &x_g, &mut dx_g).unwrap();
        check(dev, &format!("gelu_backward {ctx}"), &dx_g, &out_c);

        let res = common::random(seed + 2, n);
        let res_g = dev.upload(&res).unwrap();
        let mut sum_c = vec![0f32; n];
        Cpu.residual_add(&res, &x, &mut sum_c).unwrap();
        let mut sum_g = dev.upload(&nan::<f32>(n)).unwrap();
        dev.residual_add(&res_g, &x_g, &mut sum_g).unwrap();
        let mag: Vec<f32> = res.iter().zip(&x).map(|(r, v)| r.abs() + v.to_f32().abs()).collect();
        check_sum(dev, &format!("residual_add {ctx} y={}", T::DTYPE), &sum_g, &sum_c, 2, &mag);

        let mut cast_c = vec![T::default(); n];
        Cpu.cast_from_f32(&res, &mut cast_c).unwrap();
        let mut cast_g = dev.upload(&nan::<T>(n)).unwrap();
        dev.cast_from_f32(&res_g, &mut cast_g).unwrap();
        // Round to nearest even on both sides: bit-identical.
        assert_eq!(dev.download(&cast_g).unwrap(), cast_c, "cast_from_f32 {ctx} dtype={}", T::DTYPE);
    }
}

fn optimizer<B: NnOps>(dev: &B) {
    for (k, &n) in [1usize, 31, 4097, 100_003].iter().enumerate() {
        let seed = 450 + k as u64;
        let x: Vec<f32> = input(seed, n, 4.0);
        let x_g = dev.upload(&x).unwrap();
        let want = Cpu.sum_squares(&x).unwrap();
        let got = dev.sum_squares(&x_g).unwrap();
        assert!((got - want).abs() <= 1e-12 * want.max(1.0), "sum_squares n={n} seed={seed}: {got} vs {want}");

        let (mut p_c, g, mut m_c, mut v_c) = (
            common::random(seed + 3, n),
            common::random(seed + 4, n),
            common::random(seed + 5, n),
            common::random(seed + 6, n).iter().map(|v| v.abs()).collect::<Vec<_>>(),
        );
        let (mut p_g, g_g, mut m_g, mut v_g) =
            (dev.upload(&p_c).unwrap(), dev.upload(&g).unwrap(), dev.upload(&m_c).unwrap(), dev.upload(&v_c).unwrap());
        let hp =
            AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
        Cpu.adamw(&mut p_c, &g, &mut m_c, &mut v_c, &hp).unwrap();
        dev.adamw(&mut p_g, &g_g, &mut m_g, &mut v_g, &hp).unwrap();
        check(dev, &format!("adamw param n={n} seed={seed}"), &p_g, &p_c);
        check(dev, &format!("adamw m n={n} seed={seed}"), &m_g, &m_c);
        check(dev, &format!("adamw v n={n} seed={seed}"), &v_g, &v_c);
    }
}

/// Multi-tensor AdamW (one launch for every tensor, each with its own rate
/// and decay) against the CPU twin's one call per tensor.
fn adamw_many<B: NnOps>(dev: &B) {
    let sizes = [31usize, 1, 100_003, 4097, 3072];
    let hp = AdamWStep {
        lr: f64::NAN,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: f64::NAN,
        step: 5,
        grad_scale: 0.7,
    };
    let host = |k: usize, n: usize, what: u64| -> Vec<f32> {
        let v = common::random(700 + 10 * k as u64 + what, n);
        if what == 3 {
            v.iter().map(|x| x.abs()).collect()
        } else {
            v
        }
    };
    let (mut cpu_bufs, mut dev_bufs) = (Vec::new(), Vec::new());
    for (k, &n) in sizes.iter().enumerate() {
        let b: [Vec<f32>; 4] = [host(k, n, 0), host(k, n, 1), host(k, n, 2), host(k, n, 3)];
        dev_bufs.push(b.iter().map(|x| dev.upload(x).unwrap()).collect::<Vec<_>>());
        cpu_bufs.push(b);
    }
    let rates = |k: usize| (1e-3 * (k + 1) as f64, 0.05 * k as f64);
    let mut cpu_t: Vec<AdamWTensor<'_, Cpu>> = cpu_bufs
        .iter_mut()
        .enumerate()
        .map(|(k, [p, g, m, v])| AdamWTensor { param: p, grad: &*g, m, v, lr: rates(k).0, weight_decay: rates(k).1 })
        .collect();
    Cpu.adamw_many(&mut cpu_t, &hp).unwrap();
    drop(cpu_t);
    let mut dev_t: Vec<AdamWTensor<'_, B>> = dev_bufs
        .iter_mut()
        .enumerate()
        .map(|(k, b)| {
            let [p, g, m, v] = &mut b[..] else { unreachable!() };
            AdamWTensor { param: p, grad: &*g, m, v, lr: rates(k).0, weight_decay: rates(k).1 }
        })
        .collect();
    dev.adamw_many(&mut dev_t, &hp).unwrap();
    drop(dev_t);
    for (k, (c, g)) in cpu_bufs.iter().zip(&dev_bufs).enumerate() {
        for (what, i) in [("param", 0), ("m", 2), ("v", 3)] {
            check(dev, &format!("adamw_many {what} tensor {k} n={}", sizes[k]), &g[i], &c[i]);
        }
    }
}

/// The batched norm shares (one launch, one download per optimizer step).
fn sum_squares_each<B: NnOps>(dev: &B) {
    let xs: Vec<Vec<f32>> =
        [1usize, 257, 70_001].iter().enumerate().map(|(i, &n)| input(600 + i as u64, n, 2.0)).collect();
    let on_dev: Vec<_> = xs.iter().map(|x| dev.upload(x).unwrap()).collect();
    let want = Cpu.sum_squares_each(&xs.iter().collect::<Vec<_>>()).unwrap();
    let got = dev.sum_squares_each(&on_dev.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(got.len(), 3);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-12 * w.max(1.0), "sum_squares_each tensor {i} seed={}: {g} vs {w}", 600 + i);
    }
}

test_device!(elementwise[f32, bf16, f16], gpu: gpu_elementwise_ops_match_cpu);
test_device!(optimizer, gpu: gpu_optimizer_matches_cpu);
test_device!(adamw_many, gpu: gpu_adamw_many_matches_cpu);
test_device!(sum_squares_each, gpu: gpu_sum_squares_each_matches_cpu);

/// `padded > vocab` is the LM head's padded vocabulary: pad columns hold
/// random logits too, which must stay out of the softmax and get a zero
/// gradient; 50304 takes the kernel's 16-byte path, 50257 its scalar one.
fn cross_entropy<B: NnOps, T: Element>(dev: &B) {
    let shapes = [(1usize, 1usize, 1usize), (3, 7, 7), (3, 7, 64), (17, 257, 257), (17, 257, 320)];
    let gpt2 = [(64, 50_257, 50_257), (64, 50_257, 50_304)];
    for (k, &(rows, vocab, padded)) in shapes.iter().chain(&gpt2).enumerate() {
        let seed = 500 + k as u64;
        let ctx = format!("rows={rows} vocab={vocab} padded={padded} seed={seed}");
        let logits: Vec<T> = input(seed, rows * padded, 5.0);
        let mut rng = lorafuse::rng::Rng::new(seed);
        let targets: Vec<u32> =
            (0..rows).map(|r| if r % 5 == 4 { IGNORE } else { rng.below(vocab as u64) as u32 }).collect();
        for grad in [None, Some(0.25)] {
            let mut l_c = logits.clone();
            let ids = TokenIds { device: &targets, host: &targets };
            let out_c = Cpu.cross_entropy_padded(&mut l_c, ids, vocab, padded, grad).unwrap();
            let (mut l_g, t_g) = (dev.upload(&logits).unwrap(), dev.upload(&targets).unwrap());
            let ids = TokenIds { device: &t_g, host: &targets };
            let out_g = dev.cross_entropy_padded(&mut l_g, ids, vocab, padded, grad).unwrap();
            // Losses are f32 whatever the logits' dtype.
            let losses = dev.download(&out_g.losses).unwrap();
            let want: Vec<f64> = out_c.losses.iter().map(|&v| v as f64).collect();
            let lctx = format!("cross_entropy losses {ctx} grad={grad:?} dtype={}", T::DTYPE);
            check_close(&lctx, &losses, &want, 1e-5).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(dev.download(&out_g.correct).unwrap(), out_c.correct, "cross_entropy correct {ctx}");
            check(dev, &format!("cross_entropy logits/grad {ctx} grad={grad:?}"), &l_g, &l_c);
        }
    }
}

test_device!(cross_entropy[f32, bf16], gpu: gpu_cross_entropy_matches_cpu);

/// The loss gradient's scale counted on the backend
/// ([`GradScale::MeanOverScored`]) against the same scale computed on the
/// host and passed as a value ([`GradScale::Fixed`] of
/// [`mean_over_scored`]): losses, hits and gradients equal bit for bit, on
/// each backend (both sides round the same f64 `1/n` to the kernel's f32
/// once). The count may come from more targets than the call's rows (the
/// whole batch of a row chunk); with none scored the scale is 0 and the
/// gradient all zeros.
fn cross_entropy_device_scale<B: NnOps, T: Element>(dev: &B) {
    let (vocab, padded) = (257usize, 320usize);
    // (rows of logits, rows the count runs over, every `ignore_every`-th
    // target ignored; 1: all ignored).
    for (k, &(rows, over, ignore_every)) in
        [(1usize, 1usize, 3usize), (13, 13, 4), (13, 40, 3), (9, 9, 1), (9, 30, 1)].iter().enumerate()
    {
        let seed = 700 + k as u64;
        let ctx = format!("rows={rows} counted over {over} ignore_every={ignore_every} dtype={}", T::DTYPE);
        let logits: Vec<T> = input(seed, rows * padded, 5.0);
        let mut rng = lorafuse::rng::Rng::new(seed);
        let all: Vec<u32> = (0..over)
            .map(|r| if r % ignore_every == ignore_every - 1 { IGNORE } else { rng.below(vocab as u64) as u32 })
            .collect();
        let targets = &all[..rows];
        let scale = mean_over_scored(&all);
        // Independent of the counting code: rows r with r % ignore_every ==
        // ignore_every - 1 are ignored, ⌊over / ignore_every⌋ of them.
        let scored = over - over / ignore_every;
        assert_eq!(scale, if scored == 0 { 0.0 } else { 1.0 / scored as f64 }, "{ctx}");
        let (t_dev, all_dev) = (dev.upload(targets).unwrap(), dev.upload(&all).unwrap());
        let ids = TokenIds { device: &t_dev, host: targets };
        let run = |grad: GradScale<'_, B>| {
            let mut l = dev.upload(&logits).unwrap();
            let ce = dev.cross_entropy_scaled(&mut l, ids, vocab, padded, Some(grad)).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let grad: Vec<f64> = widen(&dev.download(&l).unwrap());
            (bits(dev.download(&ce.losses).unwrap()), dev.download(&ce.correct).unwrap(), grad)
        };
        let host = run(GradScale::Fixed(scale));
        let device = run(GradScale::MeanOverScored(&all_dev));
        assert_eq!(device.0, host.0, "losses differ: {ctx}");
        assert_eq!(device.1, host.1, "hits differ: {ctx}");
        let same = device.2.iter().zip(&host.2).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "gradients differ between the device-counted and the host scale: {ctx}");
        if scale == 0.0 {
            assert!(device.2.iter().all(|&g| g == 0.0), "nothing scored but a gradient is not zero: {ctx}");
        } else {
            assert!(device.2.iter().any(|&g| g != 0.0), "a scored batch has an all-zero gradient: {ctx}");
        }
    }
}

test_device!(
    cross_entropy_device_scale[f32, bf16],
    cpu_cross_entropy_device_scale_equals_host_scale,
    gpu_cross_entropy_device_scale_equals_host_scale
);

/// `copy_range` copies exactly its range (the rest of the destination
/// keeps its values) and refuses ranges past either end, copying nothing.
fn copy_range<B: Backend>(dev: &B) {
    let src = dev.upload(&(0..10u32).collect::<Vec<_>>()).unwrap();
    let mut dst = dev.upload(&[100u32; 6]).unwrap();
    dev.copy_range(&src, 7, &mut dst, 2, 3).unwrap();
    dev.copy_range(&src, 10, &mut dst, 6, 0).unwrap();
    assert_eq!(dev.download(&dst).unwrap(), vec![100, 100, 7, 8, 9, 100]);
    for (so, d_off, n) in [(8usize, 0usize, 3usize), (0, 4, 3), (usize::MAX, 0, 2), (0, 0, 11)] {
        let err = dev.copy_range(&src, so, &mut dst, d_off, n).unwrap_err();
        assert!(matches!(err, lorafuse::Error::Shape { op: "copy_range", .. }), "{so} {d_off} {n}: {err}");
    }
    assert_eq!(dev.download(&dst).unwrap(), vec![100, 100, 7, 8, 9, 100], "a refused copy wrote");
}

test_device!(copy_range, cpu_copy_range_copies_its_range_only, gpu_copy_range_copies_its_range_only);

#[test]
fn mean_over_scored_counts_everything_but_ignore() {
    assert_eq!(mean_over_scored(&[]), 0.0);
    assert_eq!(mean_over_scored(&[IGNORE, IGNORE]), 0.0);
    assert_eq!(mean_over_scored(&[0, IGNORE, IGNORE - 1, 5]), 1.0 / 3.0);
}

/// The LM head over a padded vocabulary (W with zero rows `vocab..padded`,
/// logits `padded` wide, pad columns masked in the cross-entropy) against
/// the same head over `vocab` columns: losses, argmax hits, `dx` and the
/// real rows of `dW` must agree, and the pad rows of `dW` stay zero. On
/// the CPU the padded sums only add exact zeros, so everything is equal
/// bit for bit; on the GPU cuBLAS may pick a different kernel per width, so
/// the comparison allows the dtype's rounding.
fn lm_head_padding<B: NnOps + LowRankOps + 'static>(b: &B) {
    let exact = common::is_cpu::<B>();
    let (rows, d, vocab) = (19usize, 24usize, 50usize);
    let padded = lorafuse::train::model::padded_vocab(vocab);
    assert_eq!(padded, 64);
    let x: Vec<f32> = common::random(900, rows * d);
    let w: Vec<f32> = common::random(901, vocab * d);
    let mut w_pad = w.clone();
    w_pad.resize(padded * d, 0.0);
    let mut rng = lorafuse::rng::Rng::new(902);
    let targets: Vec<u32> =
        (0..rows).map(|r| if r % 7 == 3 { IGNORE } else { rng.below(vocab as u64) as u32 }).collect();
    let t_dev = b.upload(&targets).unwrap();
    let ids = TokenIds { device: &t_dev, host: &targets };
    let xd = b.upload(&x).unwrap();
    // (losses, correct, dx, dW) of the head over `width` columns.
    let run = |w: &[f32], width: usize| {
        let shape = LinearShape { m: rows, k: d, n: width, r: 0 };
        let wd = b.upload(w).unwrap();
        let mut logits = b.zeros::<f32>(rows * width).unwrap();
        b.lowrank_forward(shape, &xd, &wd, None, None, &mut logits, None).unwrap();
        let ce = b.cross_entropy_padded(&mut logits, ids, vocab, width, Some(0.125)).unwrap();
        let (mut dx, mut dw) = (b.zeros::<f32>(rows * d).unwrap(), b.zeros::<f32>(width * d).unwrap());
        let grads = Grads::<B, f32> { dx: Some(&mut dx), dw: Some(&mut dw), ..Grads::none() };
        b.lowrank_backward(shape, &xd, &wd, None, None, &logits, grads).unwrap();
        (
            b.download(&ce.losses).unwrap(),
            b.download(&ce.correct).unwrap(),
            b.download(&dx).unwrap(),
            b.download(&dw).unwrap(),
        )
    };
    let (loss, hit, dx, dw) = run(&w, vocab);
    let (loss_p, hit_p, dx_p, dw_p) = run(&w_pad, padded);
    assert_eq!(hit_p, hit, "argmax hits differ with the padded vocabulary");
    assert!(dw_p[vocab * d..].iter().all(|&v| v == 0.0), "pad rows of dW are not zero");
    let dw_p = &dw_p[..vocab * d];
    if exact {
        assert_eq!(loss_p, loss, "losses differ with the padded vocabulary");
        assert_eq!(dx_p, dx, "dx differs with the padded vocabulary");
        assert_eq!(dw_p, &dw[..], "dW differs with the padded vocabulary");
    } else {
        let tol = f32::DTYPE.tolerance();
        check_close("padded lm_head losses", &loss_p, &widen(&loss), tol).unwrap_or_else(|e| panic!("{e}"));
        check_close("padded lm_head dx", &dx_p, &widen(&dx), tol).unwrap_or_else(|e| panic!("{e}"));
        check_close("padded lm_head dW", dw_p, &widen(&dw), tol).unwrap_or_else(|e| panic!("{e}"));
    }
}

test_device!(lm_head_padding, cpu_lm_head_padding_matches_unpadded, gpu_lm_head_padding_matches_unpadded);

/// The CPU twin's padded cross-entropy on rows whose pad columns hold
/// logits larger than every real one: same losses, hits and real-column
/// gradients as the unpadded call, bit for bit, and zero pad gradients.
#[test]
fn cpu_cross_entropy_masks_pad_columns() {
    let (rows, vocab, padded) = (6usize, 13usize, 64usize);
    let real = common::random(910, rows * vocab);
    let mut wide = vec![7.0f32; rows * padded];
    for r in 0..rows {
        wide[r * padded..r * padded + vocab].copy_from_slice(&real[r * vocab..(r + 1) * vocab]);
    }
    let targets: Vec<u32> = vec![0, 12, IGNORE, 5, 3, 12];
    let ids = TokenIds { device: &targets, host: &targets };
    let (mut a, mut b) = (real.clone(), wide.clone());
    let ce = Cpu.cross_entropy(&mut a, ids, vocab, Some(0.5)).unwrap();
    let ce_p = Cpu.cross_entropy_padded(&mut b, ids, vocab, padded, Some(0.5)).unwrap();
    assert_eq!((ce_p.losses, ce_p.correct), (ce.losses, ce.correct));
    for r in 0..rows {
        assert_eq!(&b[r * padded..r * padded + vocab], &a[r * vocab..(r + 1) * vocab], "row {r}");
        assert!(b[r * padded + vocab..(r + 1) * padded].iter().all(|&v| v == 0.0), "row {r}: pad gradient");
    }
    // A target in the pad columns is out of range.
    let bad = vec![0, 13, 0, 0, 0, 0];
    assert!(Cpu.cross_entropy_padded(&mut b, TokenIds { device: &bad, host: &bad }, vocab, padded, None).is_err());
    assert!(Cpu.cross_entropy_padded(&mut b, ids, padded + 1, padded, None).is_err(), "vocab > padded accepted");
}

// ---- producers writing into a packed layer's wider rows ----

/// `rows` rows of `cols` (the dense result) laid `ld` apart, the other
/// columns holding `pad`: what a strided producer must leave behind.
fn spread<T: Element>(dense: &[T], cols: usize, ld: usize, pad: T) -> Vec<T> {
    let mut out = vec![pad; dense.len() / cols.max(1) * ld];
    for (o, d) in out.chunks_mut(ld).zip(dense.chunks(cols)) {
        o[..cols].copy_from_slice(d);
    }
    out
}

/// The ops that write straight into `x_packed` / `dy_packed` (LayerNorm,
/// the fused residual + LayerNorm, GELU forward and backward, the cast of
/// the residual gradient), each with an output row stride `ld` > width,
/// against the same op unstrided on the CPU: the rows must match and the
/// spare columns, filled with garbage (7.0) beforehand, stay untouched.
/// ld = width + 8 keeps the 16-byte paths; ld = width + 1 and an odd width
/// take the element loops. Then the typed errors: a stride below the width,
/// an output of the wrong length.
fn strided_producers<B: NnOps, T: Element>(dev: &B) {
    let garbage = T::from_f32(7.0);
    for (k, &(rows, d, ld)) in [(7usize, 16usize, 24usize), (5, 768, 776), (3, 12, 13), (4, 31, 40)].iter().enumerate()
    {
        let seed = 700 + k as u64;
        let ctx = format!("rows={rows} width={d} ld={ld} seed={seed} dtype={}", T::DTYPE);
        let n = rows * d;
        let x: Vec<f32> = common::random(seed, n).iter().map(|v| 3.0 * v + 0.5).collect();
        let (gamma, beta): (Vec<T>, Vec<T>) = (input(seed + 1, d, 1.0), input(seed + 2, d, 1.0));
        let (x_g, g_g, b_g) = (dev.upload(&x).unwrap(), dev.upload(&gamma).unwrap(), dev.upload(&beta).unwrap());
        let stats = || (dev.zeros::<f32>(rows).unwrap(), dev.zeros::<f32>(rows).unwrap());
        let got = |buf: &B::Buf<T>| dev.download(buf).unwrap();

        let (mut out_c, mut mean_c, mut rstd_c) = (vec![T::default(); n], vec![0f32; rows], vec![0f32; rows]);
        Cpu.layernorm_forward(&x, &gamma, &beta, 1e-5, &mut out_c, &mut mean_c, &mut rstd_c).unwrap();
        let mut out_g = dev.upload(&vec![garbage; rows * ld]).unwrap();
        let (mut m, mut r) = stats();
        dev.layernorm_forward_strided(&x_g, &g_g, &b_g, 1e-5, &mut out_g, ld, &mut m, &mut r).unwrap();
        check(dev, &format!("layernorm_forward_strided {ctx}"), &out_g, &spread(&out_c, d, ld, garbage));
        let pads_kept = |name: &str, v: &[T]| {
            assert!(
                v.chunks(ld).all(|row| row[d..].iter().all(|&p| p == garbage)),
                "{name} {ctx}: pad columns written"
            );
        };
        pads_kept("layernorm_forward_strided", &got(&out_g));

        let y: Vec<T> = input(seed + 3, n, 1.0);
        let y_g = dev.upload(&y).unwrap();
        let mut resid_c = vec![0f32; n];
        Cpu.residual_layernorm_forward(&x, &y, &gamma, &beta, 1e-5, &mut resid_c, &mut out_c, &mut mean_c, &mut rstd_c)
            .unwrap();
        let mut resid_g = dev.zeros::<f32>(n).unwrap();
        let mut out_g = dev.upload(&vec![garbage; rows * ld]).unwrap();
        let (mut m, mut r) = stats();
        dev.residual_layernorm_forward_strided(
            &x_g,
            &y_g,
            &g_g,
            &b_g,
            1e-5,
            &mut resid_g,
            &mut out_g,
            ld,
            &mut m,
            &mut r,
        )
        .unwrap();
        check(dev, &format!("residual_layernorm_forward_strided out {ctx}"), &out_g, &spread(&out_c, d, ld, garbage));
        pads_kept("residual_layernorm_forward_strided", &got(&out_g));

        let h: Vec<T> = input(seed + 4, n, 4.0);
        let h_g = dev.upload(&h).unwrap();
        let mut dense = vec![T::default(); n];
        Cpu.gelu_forward(&h, &mut dense).unwrap();
        let mut out_g = dev.upload(&vec![garbage; rows * ld]).unwrap();
        dev.gelu_forward_strided(&h_g, d, &mut out_g, ld).unwrap();
        check(dev, &format!("gelu_forward_strided {ctx}"), &out_g, &spread(&dense, d, ld, garbage));
        pads_kept("gelu_forward_strided", &got(&out_g));

        Cpu.gelu_backward(&y, &h, &mut dense).unwrap();
        let mut out_g = dev.upload(&vec![garbage; rows * ld]).unwrap();
        dev.gelu_backward_strided(&y_g, &h_g, d, &mut out_g, ld).unwrap();
        check(dev, &format!("gelu_backward_strided {ctx}"), &out_g, &spread(&dense, d, ld, garbage));
        pads_kept("gelu_backward_strided", &got(&out_g));

        Cpu.cast_from_f32(&x, &mut dense).unwrap();
        let mut out_g = dev.upload(&vec![garbage; rows * ld]).unwrap();
        dev.cast_from_f32_strided(&x_g, d, &mut out_g, ld).unwrap();
        assert_eq!(got(&out_g), spread(&dense, d, ld, garbage), "cast_from_f32_strided {ctx}");

        // A stride below the width, an output of the wrong length: typed
        // errors that say what to pass, before any work.
        let mut short = dev.upload(&vec![garbage; rows * ld - 1]).unwrap();
        let (mut m, mut r) = stats();
        let (overlap, length) = ("rows would overlap", "rows of stride");
        let errs = [
            (dev.layernorm_forward_strided(&x_g, &g_g, &b_g, 1e-5, &mut out_g, d - 1, &mut m, &mut r), overlap),
            (dev.layernorm_forward_strided(&x_g, &g_g, &b_g, 1e-5, &mut short, ld, &mut m, &mut r), length),
            (dev.gelu_forward_strided(&h_g, d, &mut out_g, d - 1), overlap),
            (dev.gelu_forward_strided(&h_g, d, &mut short, ld), length),
            (dev.gelu_backward_strided(&y_g, &h_g, d, &mut short, ld), length),
            (dev.cast_from_f32_strided(&x_g, d, &mut out_g, d - 1), overlap),
            (dev.cast_from_f32_strided(&x_g, d, &mut short, ld), length),
        ];
        for (i, (result, says)) in errs.into_iter().enumerate() {
            let msg = result.expect_err("accepted").to_string();
            assert!(msg.contains(says), "{ctx}: error {i} does not say `{says}`: {msg}");
        }
        assert_eq!(got(&short), vec![garbage; rows * ld - 1], "{ctx}: a rejected call wrote");
    }
}

test_device!(strided_producers[f32, bf16, f16], cpu_strided_producers_leave_the_pad_columns, gpu_strided_producers_match_cpu);
