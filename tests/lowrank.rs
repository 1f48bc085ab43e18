//! The fused low-rank linear layer: the CPU oracle against independent
//! triple-loop math, finite-difference gradients, tied accumulation, every
//! trainable/frozen combination, typed errors; then the GPU against the CPU
//! (skipped without a GPU).

// Without the `cuda` feature the GPU tests compile out, and the helpers
// only they use would warn.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_imports))]

mod common;

use half::{bf16, f16};
use lorafuse::cpu::Cpu;
use lorafuse::dtype::{convert, widen as f64s, Element};
use lorafuse::lowrank::*;
use lorafuse::rng::Rng;
use lorafuse::testing::{abs, check_bounded, check_close, ErrorBound, Level, Magnitude};
use lorafuse::Error;

/// One layer's inputs, f32 on the host.
#[derive(Clone)]
struct Case {
    s: LinearShape,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    a: Vec<f32>,
    b: Vec<f32>,
    u: Option<Vec<f32>>,
    v: Option<Vec<f32>>,
    scale: f32,
    dy: Vec<f32>,
}

impl Case {
    fn new(seed: u64, s: LinearShape, bias: bool, vectors: bool) -> Case {
        let mut rng = Rng::new(seed);
        let mut gen = |n: usize| rng.uniform_vec(n, -1.0, 1.0);
        let LinearShape { m, k, n, r } = s;
        Case {
            s,
            x: gen(m * k),
            w: gen(n * k),
            bias: bias.then(|| gen(n)),
            a: gen(r * k),
            b: gen(n * r),
            u: vectors.then(|| gen(r)),
            v: vectors.then(|| gen(n)),
            scale: 0.75,
            dy: gen(m * n),
        }
    }

    fn adapter(&self) -> Adapter<'_, Cpu> {
        Adapter { a: &self.a, b: &self.b, u: self.u.as_ref(), v: self.v.as_ref(), scale: self.scale }
    }
}

/// Independent forward: explicit loops, f64, no shared code with the oracle.
#[allow(clippy::too_many_arguments)]
fn naive_forward(
    s: LinearShape,
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    a: &[f64],
    b: &[f64],
    u: Option<&[f64]>,
    v: Option<&[f64]>,
    scale: f64,
    adapter: bool,
) -> Vec<f64> {
    let LinearShape { m, k, n, r } = s;
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        let t: Vec<f64> = (0..r).map(|q| (0..k).map(|l| x[i * k + l] * a[q * k + l]).sum()).collect();
        for j in 0..n {
            let mut acc: f64 = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
            acc += bias.map_or(0.0, |bb| bb[j]);
            if adapter {
                let low: f64 = (0..r).map(|q| t[q] * u.map_or(1.0, |u| u[q]) * b[j * r + q]).sum();
                acc += scale * low * v.map_or(1.0, |v| v[j]);
            }
            y[i * n + j] = acc;
        }
    }
    y
}

/// `L = Σ y ⊙ dy` with the naive forward; `ops` = x, W, bias, A, B, u, v
/// as f64.
fn loss(c: &Case, ops: &[Vec<f64>; 7]) -> f64 {
    let [x, w, bias, a, b, u, v] = ops;
    let y = naive_forward(c.s, x, w, Some(bias), a, b, Some(u), Some(v), c.scale as f64, true);
    y.iter().zip(&c.dy).map(|(y, g)| y * *g as f64).sum()
}

fn run_forward<T: Element>(c: &Case, with_adapter: bool) -> (Vec<T>, Vec<f32>) {
    let x: Vec<T> = convert(&c.x);
    let w: Vec<T> = convert(&c.w);
    let bias: Option<Vec<T>> = c.bias.as_ref().map(|b| convert(b));
    let mut y = vec![T::from_f32(f32::NAN); c.s.m * c.s.n];
    let mut t = vec![f32::NAN; c.s.m * c.s.r];
    let ad = with_adapter.then(|| c.adapter());
    let t_out = if with_adapter { Some(&mut t) } else { None };
    Cpu.lowrank_forward(c.s, &x, &w, bias.as_ref(), ad, &mut y, t_out).unwrap();
    (y, t)
}

fn shapes() -> Vec<LinearShape> {
    vec![
        LinearShape { m: 1, k: 1, n: 1, r: 1 },
        LinearShape { m: 1, k: 7, n: 5, r: 1 },
        LinearShape { m: 3, k: 9, n: 11, r: 2 },
        LinearShape { m: 17, k: 33, n: 31, r: 5 },
        LinearShape { m: 65, k: 130, n: 67, r: 16 },
    ]
}

fn forward_matches_naive_for<T: Element>() {
    for (i, s) in shapes().into_iter().enumerate() {
        for (bias, vectors) in [(false, false), (true, true), (true, false)] {
            let seed = 100 + i as u64;
            let c = Case::new(seed, s, bias, vectors);
            // The oracle reads inputs rounded to T: so does the reference.
            let round = |v: &[f32]| -> Vec<f64> { v.iter().map(|&e| T::from_f32(e).to_f64()).collect() };
            let want = naive_forward(
                s,
                &round(&c.x),
                &round(&c.w),
                c.bias.as_deref().map(round).as_deref(),
                &f64s(&c.a),
                &f64s(&c.b),
                c.u.as_deref().map(f64s).as_deref(),
                c.v.as_deref().map(f64s).as_deref(),
                c.scale as f64,
                true,
            );
            let (y, t) = run_forward::<T>(&c, true);
            let ctx = format!("lowrank_forward {s} {} bias={bias} uv={vectors} seed={seed}", T::DTYPE);
            // Both sum in f64; the oracle rounds once to T.
            let absr = |v: &[f32]| -> Vec<f64> { round(v).iter().map(|e| e.abs()).collect() };
            let absf = |v: &[f32]| -> Vec<f64> { f64s(&abs(v)) };
            let mag = naive_forward(
                s,
                &absr(&c.x),
                &absr(&c.w),
                c.bias.as_deref().map(absr).as_deref(),
                &absf(&c.a),
                &absf(&c.b),
                c.u.as_deref().map(absf).as_deref(),
                c.v.as_deref().map(absf).as_deref(),
                c.scale as f64,
                true,
            );
            check_bounded(&ctx, &y, &want, &Magnitude::sums(s.k + s.r + 2, &mag), ErrorBound::f64()).unwrap();
            let xr = round(&c.x);
            let t_of = |x: &[f64], a: &dyn Fn(usize) -> f64| -> Vec<f64> {
                (0..s.m * s.r).map(|e| (0..s.k).map(|l| x[e / s.r * s.k + l] * a(e % s.r * s.k + l)).sum()).collect()
            };
            let want_t = t_of(&xr, &|i| c.a[i] as f64);
            let mag_t = t_of(&absr(&c.x), &|i| c.a[i].abs() as f64);
            check_bounded(&format!("{ctx} (saved t)"), &t, &want_t, &Magnitude::sums(s.k, &mag_t), ErrorBound::f64())
                .unwrap();
        }
    }
}

#[test]
fn forward_matches_naive_math_f32() {
    forward_matches_naive_for::<f32>();
}

#[test]
fn forward_matches_naive_math_f16_bf16() {
    forward_matches_naive_for::<f16>();
    forward_matches_naive_for::<bf16>();
}

#[test]
fn add_in_place_equals_forward_difference() {
    let s = LinearShape { m: 5, k: 13, n: 9, r: 3 };
    let c = Case::new(7, s, true, true);
    let (with, _) = run_forward::<f32>(&c, true);
    let (base, _) = run_forward::<f32>(&c, false);
    let mut y = base.clone();
    Cpu.lowrank_add(s, &c.x, c.adapter(), &mut y).unwrap();
    check_close(&format!("lowrank_add {s} f32 seed=7"), &y, &f64s(&with), 1e-6).unwrap();
}

/// Every gradient of one layer, from the oracle, into buffers pre-filled
/// with `prefill` (so accumulation is visible).
struct AllGrads {
    dx: Vec<f32>,
    dw: Vec<f32>,
    dbias: Vec<f32>,
    da: Vec<f32>,
    db: Vec<f32>,
    du: Vec<f32>,
    dv: Vec<f32>,
}

impl AllGrads {
    fn filled(s: LinearShape, value: f32) -> Self {
        let LinearShape { m, k, n, r } = s;
        AllGrads {
            dx: vec![f32::NAN; m * k],
            dw: vec![value; n * k],
            dbias: vec![value; n],
            da: vec![value; r * k],
            db: vec![value; n * r],
            du: vec![value; r],
            dv: vec![value; n],
        }
    }

    fn run(&mut self, c: &Case, train: Trainable, dx: bool, base: bool, saved_t: Option<&Vec<f32>>) {
        let grads = Grads::<Cpu, f32> {
            dx: dx.then_some(&mut self.dx),
            dw: base.then_some(&mut self.dw),
            dbias: base.then_some(&mut self.dbias),
            da: train.a.then_some(&mut self.da),
            db: train.b.then_some(&mut self.db),
            du: train.u.then_some(&mut self.du),
            dv: train.v.then_some(&mut self.dv),
        };
        Cpu.lowrank_backward(c.s, &c.x, &c.w, Some(c.adapter()), saved_t, &c.dy, grads).unwrap();
    }
}

const ALL: Trainable = Trainable { a: true, b: true, u: true, v: true };

#[test]
fn gradients_match_finite_differences_in_f64() {
    let s = LinearShape { m: 3, k: 5, n: 4, r: 2 };
    for seed in [1u64, 2] {
        let c = Case::new(seed, s, true, true);
        let (_, t) = run_forward::<f32>(&c, true);
        let mut g = AllGrads::filled(s, 0.0);
        g.run(&c, ALL, true, true, Some(&t));
        let base = [f64s(&c.x), f64s(&c.w), f64s(c.bias.as_ref().unwrap()), f64s(&c.a), f64s(&c.b)];
        let (u, v) = (f64s(c.u.as_ref().unwrap()), f64s(c.v.as_ref().unwrap()));
        let operands = [base[0].clone(), base[1].clone(), base[2].clone(), base[3].clone(), base[4].clone(), u, v];
        let names = ["dx", "dW", "dbias", "dA", "dB", "du", "dv"];
        let got = [&g.dx, &g.dw, &g.dbias, &g.da, &g.db, &g.du, &g.dv];
        for (which, (name, got)) in names.iter().zip(got).enumerate() {
            let h = 1e-5;
            let want: Vec<f64> = (0..operands[which].len())
                .map(|e| {
                    let eval = |delta: f64| {
                        let mut ops = operands.clone();
                        ops[which][e] += delta;
                        loss(&c, &ops)
                    };
                    (eval(h) - eval(-h)) / (2.0 * h)
                })
                .collect();
            let ctx = format!("finite difference {name} {s} f32 seed={seed}");
            check_close(&ctx, got, &want, 1e-6).unwrap();
        }
    }
}

#[test]
fn recomputed_t_equals_saved_t() {
    let s = LinearShape { m: 4, k: 9, n: 6, r: 3 };
    let c = Case::new(3, s, false, true);
    let (_, t) = run_forward::<f32>(&c, true);
    let mut saved = AllGrads::filled(s, 0.0);
    saved.run(&c, ALL, true, false, Some(&t));
    let mut recomputed = AllGrads::filled(s, 0.0);
    recomputed.run(&c, ALL, true, false, None);
    for (name, a, b) in [
        ("dx", &saved.dx, &recomputed.dx),
        ("dA", &saved.da, &recomputed.da),
        ("dB", &saved.db, &recomputed.db),
        ("du", &saved.du, &recomputed.du),
        ("dv", &saved.dv, &recomputed.dv),
    ] {
        check_close(&format!("t recomputed vs saved: {name} {s} seed=3"), a, &f64s(b), 1e-6).unwrap();
    }
}

#[test]
fn every_trainable_frozen_combination_accumulates_only_what_trains() {
    let s = LinearShape { m: 6, k: 11, n: 7, r: 3 };
    let c = Case::new(5, s, false, true);
    let mut full = AllGrads::filled(s, 0.0);
    full.run(&c, ALL, true, false, None);
    let prefill = 0.25f32;
    for train in Trainable::all_combinations() {
        for dx in [false, true] {
            let mut g = AllGrads::filled(s, prefill);
            g.run(&c, train, dx, false, None);
            let ctx = |name: &str| format!("combination {} dx={dx}: {name} {s} seed=5", train.label());
            let plus = |v: &[f32]| -> Vec<f64> { v.iter().map(|&e| e as f64 + prefill as f64).collect() };
            let untouched = |n: usize| vec![prefill as f64; n];
            for (name, on, got, want) in [
                ("dA", train.a, &g.da, &full.da),
                ("dB", train.b, &g.db, &full.db),
                ("du", train.u, &g.du, &full.du),
                ("dv", train.v, &g.dv, &full.dv),
            ] {
                let want = if on { plus(want) } else { untouched(want.len()) };
                check_close(&ctx(name), got, &want, 1e-6).unwrap();
            }
            if dx {
                check_close(&ctx("dx"), &g.dx, &f64s(&full.dx), 1e-6).unwrap();
            } else {
                assert!(g.dx.iter().all(|v| v.is_nan()), "{}: dx written though not asked for", ctx("dx"));
            }
        }
    }
}

#[test]
fn tied_factors_accumulate_the_sum_over_layers() {
    let s = LinearShape { m: 4, k: 10, n: 6, r: 2 };
    let first = Case::new(11, s, false, true);
    // A second layer sharing A and B, with its own x, u, v and dy.
    let mut second = Case::new(12, s, false, true);
    second.a = first.a.clone();
    second.b = first.b.clone();
    let mut shared = AllGrads::filled(s, 0.0);
    shared.run(&first, ALL, false, false, None);
    shared.run(&second, ALL, false, false, None);
    let mut one = AllGrads::filled(s, 0.0);
    one.run(&first, ALL, false, false, None);
    let mut two = AllGrads::filled(s, 0.0);
    two.run(&second, ALL, false, false, None);
    let sum = |p: &[f32], q: &[f32]| -> Vec<f64> { p.iter().zip(q).map(|(a, b)| *a as f64 + *b as f64).collect() };
    check_close("tied dA over two layers", &shared.da, &sum(&one.da, &two.da), 1e-6).unwrap();
    check_close("tied dB over two layers", &shared.db, &sum(&one.db, &two.db), 1e-6).unwrap();
    // The two layers really differ, so the sum is not twice one of them.
    let twice: Vec<f64> = one.da.iter().map(|&e| 2.0 * e as f64).collect();
    assert!(check_close("", &shared.da, &twice, 1e-3).is_err(), "layers were not independent");
}

#[test]
fn no_vectors_equals_vectors_of_ones() {
    let s = LinearShape { m: 3, k: 7, n: 5, r: 2 };
    let plain = Case::new(21, s, true, false);
    let mut ones = plain.clone();
    ones.u = Some(vec![1.0; s.r]);
    ones.v = Some(vec![1.0; s.n]);
    let (y0, _) = run_forward::<f32>(&plain, true);
    let (y1, _) = run_forward::<f32>(&ones, true);
    check_close("u=v=None vs ones: y", &y0, &f64s(&y1), 1e-7).unwrap();
    let mut g0 = AllGrads::filled(s, 0.0);
    g0.run(&plain, ALL, true, false, None);
    let mut g1 = AllGrads::filled(s, 0.0);
    g1.run(&ones, ALL, true, false, None);
    check_close("u=v=None vs ones: du", &g0.du, &f64s(&g1.du), 1e-7).unwrap();
    check_close("u=v=None vs ones: dv", &g0.dv, &f64s(&g1.dv), 1e-7).unwrap();
}

#[test]
fn bad_shapes_are_typed_errors_naming_the_operand() {
    let s = LinearShape { m: 2, k: 3, n: 4, r: 2 };
    let c = Case::new(1, s, false, true);
    let mut y = vec![0f32; 8];
    let short_a = vec![0f32; 5];
    let bad = Adapter::<Cpu> { a: &short_a, ..c.adapter() };
    let err = Cpu.lowrank_forward(s, &c.x, &c.w, None, Some(bad), &mut y, None).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "A", .. }), "{err}");
    let err = Cpu.lowrank_forward(s, &c.x, &c.w[1..].to_vec(), None, None, &mut y, None).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "W", .. }), "{err}");
    let mut da = vec![0f32; s.r * s.k];
    let grads = Grads::<Cpu, f32> { da: Some(&mut da), ..Grads::none() };
    let err = Cpu.lowrank_backward(s, &c.x, &c.w, None, None, &c.dy, grads).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let mut dv = vec![0f32; s.n + 1];
    let grads = Grads::<Cpu, f32> { dv: Some(&mut dv), ..Grads::none() };
    let err = Cpu.lowrank_backward(s, &c.x, &c.w, Some(c.adapter()), None, &c.dy, grads).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "dv", .. }), "{err}");
    let zero_rank = LinearShape { r: 0, ..s };
    let err = Cpu.lowrank_forward(zero_rank, &c.x, &c.w, None, Some(c.adapter()), &mut y, None).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let nan = Adapter::<Cpu> { scale: f32::NAN, ..c.adapter() };
    assert!(Cpu.lowrank_add(s, &c.x, nan, &mut y).is_err());
}

#[test]
fn configs_scale_label_and_initialise_as_documented() {
    let lora = LowRankConfig::lora(16, 32.0);
    assert_eq!(lora.scale(), 2.0);
    assert_eq!(lora.rs().scale(), 8.0);
    assert_eq!(lora.train.label(), "BA");
    assert!(!lora.has_vectors());
    lora.validate().unwrap();
    let mut rng = Rng::new(9);
    let (a, b) = lora.init_factors(64, 24, &mut rng);
    assert!(b.iter().all(|&e| e == 0.0) && a.iter().any(|&e| e != 0.0));
    assert!(a.iter().all(|&e| e.abs() <= 1.0 / 8.0));

    let vera = LowRankConfig::vera(4, 4.0);
    assert_eq!(vera.train.label(), "vu");
    let (a, b) = vera.init_factors(8, 6, &mut rng);
    assert!(a.iter().any(|&e| e != 0.0) && b.iter().any(|&e| e != 0.0));
    let (u, v) = vera.init_vectors(6);
    assert_eq!(u.unwrap(), vec![VERA_U_INIT; 4]);
    assert_eq!(v.unwrap(), vec![0.0; 6]);

    assert_eq!(Trainable::ALL.label(), "vBuA");
    assert_eq!(Trainable::NONE.label(), "-");
    let labels: Vec<String> = Trainable::all_combinations().map(Trainable::label).collect();
    assert_eq!(labels.len(), 16);
    assert_eq!(labels[0], "-");
    assert_eq!(labels[15], "vBuA");
    let mut unique = labels.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 16);

    let tied = LowRankConfig::tied(8, 8.0, Trainable { a: true, b: true, u: true, v: true });
    assert_eq!(tied.init_vectors(3).1.unwrap(), vec![1.0; 3]);
    assert!(LowRankConfig::lora(0, 1.0).validate().is_err());
    assert!(LowRankConfig { train: ALL, ..LowRankConfig::lora(4, 1.0) }.validate().is_err());
}

/// The first GPU run (H100, docs/gpu-runs/2026-11-26-h100-8e33b7a) failed
/// this case against a fixed 1e-5 relative tolerance: du (1 element) is an
/// f32 sum over M = 140 products of t (a sum over K = 42) with (dy⊙v)·B
/// (a sum over N = 272), whose terms (Σ|terms| ≈ 10³) cancel to 0.5.
/// Rebuild the case on the CPU, check the recorded GPU value against its
/// derived bound, and that the sum with one row missing does not pass.
#[test]
fn first_gpu_run_du_case_is_within_its_derived_bound() {
    let s = LinearShape { m: 140, k: 42, n: 272, r: 1 };
    let seed = 13189290928588709580u64;
    let c = Case::new(seed, s, true, true);
    let start = common::random(seed ^ 5, s.r);
    let mut du = start.clone();
    let grads = Grads::<Cpu, f32> { du: Some(&mut du), ..Grads::none() };
    Cpu.lowrank_backward(s, &c.x, &c.w, Some(c.adapter()), None, &c.dy, grads).unwrap();
    let want = 5.157726407e-1; // the oracle's value in the run's log
    assert!((du[0] as f64 - want).abs() < 1e-9, "case not rebuilt: du = {}", du[0]);
    let starts: Vec<Vec<f32>> = [(s.n * s.k, 1), (s.n, 2), (s.r * s.k, 3), (s.n * s.r, 4), (s.r, 5), (s.n, 6)]
        .iter()
        .map(|&(len, salt)| common::random(seed ^ salt, len))
        .collect();
    let y0 = common::random(seed ^ 0xadd, s.m * s.n);
    let mag = magnitudes::<f32>(&c, &c.x, &c.w, c.bias.as_ref(), &y0, &starts, &c.dy).grads[4].clone();
    let bound = ErrorBound::gpu(lorafuse::DType::F32);
    let gpu = [0.515_779_5_f32]; // the H100's value: |diff| = 6.855e-6
    let ok = check_bounded("H100 du", &gpu, &[want], &mag, bound).unwrap();
    println!("{ok}");
    // An off-by-one loop bound (the last of the M rows dropped) must fail.
    let short = LinearShape { m: s.m - 1, ..s };
    let mut du_short = start.clone();
    let grads = Grads::<Cpu, f32> { du: Some(&mut du_short), ..Grads::none() };
    let (x, dy) = (c.x[..short.m * s.k].to_vec(), c.dy[..short.m * s.n].to_vec());
    Cpu.lowrank_backward(short, &x, &c.w, Some(c.adapter()), None, &dy, grads).unwrap();
    let e = check_bounded("du without its last row", &du_short, &[want], &mag, bound).unwrap_err();
    println!("{e}");
}

/// The bounds the GPU test uses, checked against a CPU emulation of the
/// kernels' arithmetic (sequential f32 sums; in bf16 the three roundings of
/// intermediates of kernels/lowrank.cu): the forward y and the gradient du
/// must pass, so the bounds are not tighter than the arithmetic they
/// describe. (Tensor-core summation order differs; the bound allows for any.)
#[test]
fn bounds_hold_for_an_emulation_of_the_kernels_arithmetic() {
    fn run<T: Element>(s: LinearShape, seed: u64) {
        let LinearShape { m, k, n, r } = s;
        let c = Case::new(seed, s, true, true);
        let (x, w): (Vec<T>, Vec<T>) = (convert(&c.x), convert(&c.w));
        let bias: Vec<T> = convert(c.bias.as_ref().unwrap());
        let dy: Vec<T> = convert(&c.dy);
        let (u, v) = (c.u.as_ref().unwrap(), c.v.as_ref().unwrap());
        let f = |e: &T| e.to_f32();
        let half = T::DTYPE != lorafuse::DType::F32;
        let rt = |e: f32| if half { T::from_f32(e).to_f32() } else { e };
        // Forward; A split in two 16-bit halves on the tensor-core path.
        let a_split: Vec<f32> = c.a.iter().map(|&a| if half { rt(a) + rt(a - rt(a)) } else { a }).collect();
        let t: Vec<f32> = (0..m * r)
            .map(|e| (0..k).fold(0f32, |acc, l| f(&x[e / r * k + l]).mul_add(a_split[e % r * k + l], acc)))
            .collect();
        let mut y = vec![T::from_f32(0.0); m * n];
        for i in 0..m {
            for j in 0..n {
                let expand = (0..r).fold(f(&bias[j]), |acc, q| {
                    rt(c.scale * t[i * r + q] * u[q]).mul_add(rt(c.b[j * r + q] * v[j]), acc)
                });
                let base = (0..k).fold(0f32, |acc, l| f(&x[i * k + l]).mul_add(f(&w[j * k + l]), acc));
                y[i * n + j] = T::from_f32(rt(expand) + base);
            }
        }
        let mut cy = vec![T::from_f32(0.0); m * n];
        Cpu.lowrank_forward(s, &x, &w, Some(&bias), Some(c.adapter()), &mut cy, None).unwrap();
        let starts: Vec<Vec<f32>> = [n * k, n, r * k, n * r, r, n]
            .iter()
            .enumerate()
            .map(|(i, &len)| common::random(seed ^ i as u64, len))
            .collect();
        let y0: Vec<T> = convert(&common::random(seed, m * n));
        let mag = magnitudes(&c, &x, &w, Some(&bias), &y0, &starts, &dy);
        let want: Vec<f64> = cy.iter().map(|e| e.to_f64()).collect();
        let ctx = format!("emulated y {s} {} seed={seed}", T::DTYPE);
        let ok = check_bounded(&ctx, &y, &want, &mag.y, ErrorBound::gpu(T::DTYPE).intermediates(3)).unwrap();
        println!("{ctx}: max err/bound {:.3}", ok.max_ratio);
        // du = start + s·Σ_i t⊙((dy⊙v)·B), sums in f32.
        let gb: Vec<f32> = (0..m * r)
            .map(|e| (0..n).fold(0f32, |acc, j| (f(&dy[e / r * n + j]) * v[j]).mul_add(c.b[j * r + e % r], acc)))
            .collect();
        let du: Vec<f32> = (0..r)
            .map(|q| (0..m).fold(starts[4][q], |acc, i| (c.scale * t[i * r + q]).mul_add(gb[i * r + q], acc)))
            .collect();
        let mut cdu = starts[4].clone();
        let grads = Grads::<Cpu, T> { du: Some(&mut cdu), ..Grads::none() };
        Cpu.lowrank_backward(s, &x, &w, Some(c.adapter()), None, &dy, grads).unwrap();
        let ctx = format!("emulated du {s} {} seed={seed}", T::DTYPE);
        let ok =
            check_bounded(&ctx, &du, &f64s(&cdu), &mag.grads[4], ErrorBound::gpu(T::DTYPE).intermediates(3)).unwrap();
        println!("{ctx}: max err/bound {:.3}", ok.max_ratio);
    }
    for (i, s) in [
        LinearShape { m: 140, k: 42, n: 272, r: 1 },
        LinearShape { m: 64, k: 300, n: 129, r: 16 },
        LinearShape { m: 7, k: 1000, n: 33, r: 64 },
    ]
    .into_iter()
    .enumerate()
    {
        run::<f32>(s, 40 + i as u64);
        run::<bf16>(s, 40 + i as u64);
        run::<f16>(s, 40 + i as u64);
    }
}

// ---- GPU against the CPU oracle ------------------------------------------

#[cfg(feature = "cuda")]
use lorafuse::cuda::Gpu;
use lorafuse::Backend;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

#[cfg(feature = "cuda")]
/// One randomised GPU-vs-CPU comparison: forward (with `t` saved and a
/// NaN-poisoned `y`), the in-place add, and the backward with the gradients
/// of `train` (+ dx, dW, dbias when asked) accumulated onto random values.
#[allow(clippy::too_many_arguments)]
fn gpu_matches_cpu<T: Element>(
    gpu: &Gpu,
    c: &Case,
    train: Trainable,
    dx: bool,
    base: bool,
    saved_t: bool,
    seed: u64,
) -> Result<(), String> {
    let s = c.s;
    let LinearShape { m, k, n, r } = s;
    let ctx = |what: &str| {
        format!(
            "{what} {s} {} train={} dx={dx} base={base} bias={} uv={} saved_t={saved_t} seed={seed}",
            T::DTYPE,
            train.label(),
            c.bias.is_some(),
            c.u.is_some()
        )
    };
    let up32 = |v: &[f32]| gpu.upload(v).unwrap();
    let x: Vec<T> = convert(&c.x);
    let w: Vec<T> = convert(&c.w);
    let bias: Option<Vec<T>> = c.bias.as_ref().map(|b| convert(b));
    let dy: Vec<T> = convert(&c.dy);
    let (gx, gw, gdy) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&dy).unwrap());
    let gbias = bias.as_ref().map(|b| gpu.upload(b).unwrap());
    let (ga, gb) = (up32(&c.a), up32(&c.b));
    let (gu, gv) = (c.u.as_deref().map(up32), c.v.as_deref().map(up32));
    let gad = Adapter::<Gpu> { a: &ga, b: &gb, u: gu.as_ref(), v: gv.as_ref(), scale: c.scale };
    // Error bounds (src/testing.rs; levels in `magnitudes`). The 16-bit
    // path rounds 3 intermediates per adapter term (kernels/lowrank.cu):
    // forward t' = s·t⊙u and B' = B⊙v in T, then the expand GEMM's y in T
    // before the base GEMM adds to it; backward dS and A cast to T and the
    // dS·A half of dx stored in T (dA: dS only). t, dB, du, dv read A, B or
    // t split in two 16-bit halves (error ≤ u_T²), covered by one u_T.
    let fwd = ErrorBound::gpu(T::DTYPE).intermediates(3);
    let bwd = ErrorBound::gpu(T::DTYPE).intermediates(3);
    let t_bound = ErrorBound::gpu(T::DTYPE).intermediates(1);
    let y0: Vec<T> = convert(&common::random(seed ^ 0xadd, m * n));
    let start = |len: usize, salt: u64| common::random(seed ^ salt, len);
    let starts = [start(n * k, 1), start(n, 2), start(r * k, 3), start(n * r, 4), start(r, 5), start(n, 6)];
    let mag = magnitudes(c, &x, &w, bias.as_ref(), &y0, &starts, &dy);

    // Forward.
    let nan = T::from_f32(f32::NAN);
    let mut gy = gpu.upload(&vec![nan; m * n]).unwrap();
    let mut gt = gpu.upload(&vec![f32::NAN; m * r]).unwrap();
    gpu.lowrank_forward(s, &gx, &gw, gbias.as_ref(), Some(gad), &mut gy, Some(&mut gt))
        .map_err(|e| ctx(&e.to_string()))?;
    let (mut cy, mut ct) = (vec![nan; m * n], vec![f32::NAN; m * r]);
    Cpu.lowrank_forward(s, &x, &w, bias.as_ref(), Some(c.adapter()), &mut cy, Some(&mut ct)).unwrap();
    let gt_host = gpu.download(&gt).unwrap();
    check_bounded(
        &ctx("forward y"),
        &gpu.download(&gy).unwrap(),
        &cy.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
        &mag.y,
        fwd,
    )?;
    check_bounded(&ctx("forward t"), &gt_host, &f64s(&ct), &mag.t, t_bound)?;

    // In-place add onto a y that holds random values.
    let mut gy0 = gpu.upload(&y0).unwrap();
    gpu.lowrank_add(s, &gx, gad, &mut gy0).map_err(|e| ctx(&e.to_string()))?;
    let mut cy0 = y0.clone();
    Cpu.lowrank_add(s, &x, c.adapter(), &mut cy0).unwrap();
    check_bounded(
        &ctx("add in place"),
        &gpu.download(&gy0).unwrap(),
        &cy0.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
        &mag.add,
        fwd,
    )?;

    // Backward, onto random starting gradients.
    let mut g: Vec<_> = starts.iter().map(|v| up32(v)).collect();
    let mut c_grads: Vec<Vec<f32>> = starts.to_vec();
    let mut gdx = gpu.upload(&vec![nan; m * k]).unwrap();
    let mut cdx = vec![nan; m * k];
    let wants = [base, base, train.a, train.b, train.u, train.v];
    {
        let [gdw, gdb, gda, gdbb, gdu, gdv] = &mut g[..] else { unreachable!() };
        let grads = Grads::<Gpu, T> {
            dx: dx.then_some(&mut gdx),
            dw: wants[0].then_some(gdw),
            dbias: wants[1].then_some(gdb),
            da: wants[2].then_some(gda),
            db: wants[3].then_some(gdbb),
            du: wants[4].then_some(gdu),
            dv: wants[5].then_some(gdv),
        };
        let t_arg = saved_t.then_some(&gt);
        gpu.lowrank_backward(s, &gx, &gw, Some(gad), t_arg, &gdy, grads).map_err(|e| ctx(&e.to_string()))?;
    }
    {
        let [cdw, cdb, cda, cdbb, cdu, cdv] = &mut c_grads[..] else { unreachable!() };
        let grads = Grads::<Cpu, T> {
            dx: dx.then_some(&mut cdx),
            dw: wants[0].then_some(cdw),
            dbias: wants[1].then_some(cdb),
            da: wants[2].then_some(cda),
            db: wants[3].then_some(cdbb),
            du: wants[4].then_some(cdu),
            dv: wants[5].then_some(cdv),
        };
        Cpu.lowrank_backward(s, &x, &w, Some(c.adapter()), saved_t.then_some(&ct), &dy, grads).unwrap();
    }
    if dx {
        let want: Vec<f64> = cdx.iter().map(|v| v.to_f64()).collect();
        check_bounded(&ctx("backward dx"), &gpu.download(&gdx).unwrap(), &want, &mag.dx, bwd)?;
    }
    for (i, name) in ["dW", "dbias", "dA", "dB", "du", "dv"].iter().enumerate() {
        let got = gpu.download(&g[i]).unwrap();
        if wants[i] {
            check_bounded(&ctx(&format!("backward {name}")), &got, &f64s(&c_grads[i]), &mag.grads[i], bwd)?;
        } else if got != starts[i] {
            return Err(ctx(&format!("backward {name}: frozen gradient buffer was modified")));
        }
    }
    Ok(())
}

/// The error-bound magnitudes of every output of one case, level by level
/// as the kernels compute them (kernels/lowrank.cu header; src/testing.rs
/// for the model), in f64 from the inputs both sides read:
///   t = x·Aᵀ (K);  y = x·Wᵀ (K) + bias + s·v⊙((t⊙u)·Bᵀ) (r, inner K);
///   gB = (dy⊙v)·B (N), dS = s·gB⊙u;  dx = dy·W (N) + dS·A (r, inner N);
///   dW = dyᵀ·x, dbias = Σ dy (M);  dA = dSᵀ·x (M, inner N);
///   dB = s·v⊙(dyᵀ·(t⊙u)) (M, inner K);  du = s·Σ t⊙gB (M, inner K and N);
///   dv = s·Σ_q B⊙u⊙P, P = dyᵀ·t (r, inner M, inner-inner K);
/// gradients add |start| as one more term. Levels marked rounded pass
/// through the 16-bit intermediates (t', B', the expand GEMM's y, dS, A in T).
struct Magnitudes {
    y: Vec<Magnitude>,
    t: Vec<Magnitude>,
    add: Vec<Magnitude>,
    dx: Vec<Magnitude>,
    /// dW, dbias, dA, dB, du, dv.
    grads: Vec<Vec<Magnitude>>,
}

fn magnitudes<T: Element>(
    c: &Case,
    x: &[T],
    w: &[T],
    bias: Option<&Vec<T>>,
    y0: &[T],
    starts: &[Vec<f32>],
    dy: &[T],
) -> Magnitudes {
    let LinearShape { m, k, n, r } = c.s;
    let wide = |v: &[T]| v.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
    let (x, w, dy, y0) = (wide(x), wide(w), wide(dy), wide(y0));
    let bias = bias.map(|b| wide(b));
    let (a, b) = (f64s(&c.a), f64s(&c.b));
    let u: Vec<f64> = c.u.as_deref().map_or(vec![1.0; r], f64s);
    let v: Vec<f64> = c.v.as_deref().map_or(vec![1.0; n], f64s);
    let sc = (c.scale as f64).abs();
    let lvl = Level::sum;
    // The tensor-core paths split an f32 operand (A, B, t) into two 16-bit
    // halves: each product keeps |a|·u_T² of error (bf16: 2⁻¹⁶), which is
    // what u_T²/(2·2⁻²⁴) more truncating f32 additions would add: bf16 128,
    // f16 1. Inner reductions (the ones over split operands) get them.
    let ut = lorafuse::testing::unit_roundoff(T::DTYPE);
    let split = if T::DTYPE == lorafuse::DType::F32 { 0 } else { (ut * ut * 8_388_608.0).ceil() as usize };
    // Values and Σ|terms| of the inner reductions t and gB.
    let mut t = vec![0.0; m * r];
    let mut mt = vec![0.0; m * r];
    let mut gb = vec![0.0; m * r];
    let mut mgb = vec![0.0; m * r];
    for i in 0..m {
        for q in 0..r {
            for l in 0..k {
                t[i * r + q] += x[i * k + l] * a[q * k + l];
                mt[i * r + q] += (x[i * k + l] * a[q * k + l]).abs();
            }
            for j in 0..n {
                gb[i * r + q] += dy[i * n + j] * v[j] * b[j * r + q];
                mgb[i * r + q] += (dy[i * n + j] * v[j] * b[j * r + q]).abs();
            }
        }
    }
    let (mut y, mut add) = (Vec::with_capacity(m * n), Vec::with_capacity(m * n));
    for i in 0..m {
        for j in 0..n {
            let base: f64 = (0..k).map(|l| (x[i * k + l] * w[j * k + l]).abs()).sum();
            let bj = bias.as_ref().map_or(0.0, |bb| bb[j].abs());
            let expand = lvl(r, (0..r).map(|q| (sc * v[j] * t[i * r + q] * u[q] * b[j * r + q]).abs()).sum(), true);
            let shrink =
                Level::inner(k + split, (0..r).map(|q| (sc * v[j] * u[q] * b[j * r + q]).abs() * mt[i * r + q]), false);
            y.push(Magnitude::nested(&[lvl(k, base, false), lvl(1, bj, true), expand, shrink]));
            add.push(Magnitude::nested(&[lvl(1, y0[i * n + j].abs(), false), expand, shrink]));
        }
    }
    let t_mag = mt.iter().map(|&e| Magnitude::sum(k, e)).collect();
    let mut dx = Vec::with_capacity(m * k);
    for i in 0..m {
        for l in 0..k {
            let base: f64 = (0..n).map(|j| (dy[i * n + j] * w[j * k + l]).abs()).sum();
            let ds_a: f64 = (0..r).map(|q| (sc * gb[i * r + q] * u[q] * a[q * k + l]).abs()).sum();
            let inner =
                Level::inner(n + split, (0..r).map(|q| (sc * u[q] * a[q * k + l]).abs() * mgb[i * r + q]), false);
            dx.push(Magnitude::nested(&[lvl(n, base, false), lvl(r, ds_a, true), inner]));
        }
    }
    let st = |g: usize, e: usize| lvl(1, starts[g][e].abs() as f64, false);
    let dw = (0..n * k)
        .map(|e| {
            let (j, l) = (e / k, e % k);
            let s1: f64 = (0..m).map(|i| (dy[i * n + j] * x[i * k + l]).abs()).sum();
            Magnitude::nested(&[st(0, e), lvl(m, s1, false)])
        })
        .collect();
    let dbias = (0..n)
        .map(|j| Magnitude::nested(&[st(1, j), lvl(m, (0..m).map(|i| dy[i * n + j].abs()).sum(), false)]))
        .collect();
    let da = (0..r * k)
        .map(|e| {
            let (q, l) = (e / k, e % k);
            let outer: f64 = (0..m).map(|i| (sc * gb[i * r + q] * u[q] * x[i * k + l]).abs()).sum();
            let inner =
                Level::inner(n + split, (0..m).map(|i| (sc * u[q] * x[i * k + l]).abs() * mgb[i * r + q]), false);
            Magnitude::nested(&[st(2, e), lvl(m, outer, true), inner])
        })
        .collect();
    // P = dyᵀ·t (N×r): its value and Σ|terms|.
    let (mut p, mut mp) = (vec![0.0; n * r], vec![0.0; n * r]);
    for j in 0..n {
        for q in 0..r {
            for i in 0..m {
                p[j * r + q] += dy[i * n + j] * t[i * r + q];
                mp[j * r + q] += (dy[i * n + j] * t[i * r + q]).abs();
            }
        }
    }
    let db = (0..n * r)
        .map(|e| {
            let (j, q) = (e / r, e % r);
            let f = (sc * v[j] * u[q]).abs();
            let inner = Level::inner(k + split, (0..m).map(|i| f * dy[i * n + j].abs() * mt[i * r + q]), false);
            Magnitude::nested(&[st(3, e), lvl(m, f * mp[e], true), inner])
        })
        .collect();
    let du = (0..r)
        .map(|q| {
            let outer: f64 = (0..m).map(|i| (sc * t[i * r + q] * gb[i * r + q]).abs()).sum();
            let in_t = Level::inner(k + split, (0..m).map(|i| (sc * gb[i * r + q]).abs() * mt[i * r + q]), false);
            let in_g = Level::inner(n + split, (0..m).map(|i| (sc * t[i * r + q]).abs() * mgb[i * r + q]), false);
            Magnitude::nested(&[st(4, q), lvl(m, outer, true), in_t, in_g])
        })
        .collect();
    let dv = (0..n)
        .map(|j| {
            let f = |q: usize| (sc * b[j * r + q] * u[q]).abs();
            let outer: f64 = (0..r).map(|q| f(q) * p[j * r + q].abs()).sum();
            let in_p = Level::inner(m + split, (0..r).map(|q| f(q) * mp[j * r + q]), true);
            let in_t = Level::inner(
                k,
                (0..r)
                    .flat_map(|q| (0..m).map(move |i| (q, i)))
                    .map(|(q, i)| f(q) * dy[i * n + j].abs() * mt[i * r + q]),
                false,
            );
            Magnitude::nested(&[st(5, j), lvl(r, outer, true), in_p, in_t])
        })
        .collect();
    Magnitudes { y, t: t_mag, add, dx, grads: vec![dw, dbias, da, db, du, dv] }
}

#[cfg(feature = "cuda")]
fn shape_strategy() -> impl Strategy<Value = LinearShape> {
    let m = prop_oneof![1usize..=4, 5usize..=32, 33usize..=300];
    let r = prop_oneof![Just(1usize), 2usize..=17, 18usize..=128];
    (m, 1usize..=300, 1usize..=300, r).prop_map(|(m, k, n, r)| LinearShape { m, k, n, r })
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_lowrank_matches_cpu_on_random_shapes_dtypes_and_combinations() {
    let Some(gpu) = common::gpu_or_skip("gpu_lowrank_matches_cpu_on_random_shapes_dtypes_and_combinations") else {
        return;
    };
    let mut runner = TestRunner::new(Config { cases: common::cases(64), ..Config::default() });
    let strategy = (
        shape_strategy(),
        0usize..3,
        0u8..16,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    runner
        .run(&strategy, |(s, dtype, bits, bias, vectors, dx, saved_t, seed)| {
            let c = Case::new(seed, s, bias, vectors);
            let train = Trainable { a: bits & 8 != 0, b: bits & 4 != 0, u: bits & 2 != 0, v: bits & 1 != 0 };
            let base = bits % 3 == 0;
            let out = match dtype {
                0 => gpu_matches_cpu::<f32>(&gpu, &c, train, dx, base, saved_t, seed),
                1 => gpu_matches_cpu::<f16>(&gpu, &c, train, dx, base, saved_t, seed),
                _ => gpu_matches_cpu::<bf16>(&gpu, &c, train, dx, base, saved_t, seed),
            };
            out.map_err(TestCaseError::fail)
        })
        .unwrap();
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_edge_shapes_every_dtype() {
    let Some(gpu) = common::gpu_or_skip("gpu_edge_shapes_every_dtype") else { return };
    // M = 1, r = 1, decode/prefill boundary, tiles straddled (64 rows, 128
    // and 512 columns, 16 ranks, 32-wide K tiles), r = 128.
    let shapes = [
        (1, 1, 1, 1),
        (1, 4096, 11, 16),
        (32, 257, 129, 128),
        (33, 257, 129, 17),
        (65, 33, 513, 1),
        (300, 1000, 700, 64),
    ];
    for (i, &(m, k, n, r)) in shapes.iter().enumerate() {
        let s = LinearShape { m, k, n, r };
        let c = Case::new(500 + i as u64, s, true, true);
        for (dx, saved) in [(true, true), (true, false)] {
            gpu_matches_cpu::<f32>(&gpu, &c, ALL, dx, true, saved, 500 + i as u64).unwrap();
            gpu_matches_cpu::<f16>(&gpu, &c, ALL, dx, true, saved, 500 + i as u64).unwrap();
            gpu_matches_cpu::<bf16>(&gpu, &c, ALL, dx, true, saved, 500 + i as u64).unwrap();
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_results_are_deterministic() {
    let Some(gpu) = common::gpu_or_skip("gpu_results_are_deterministic") else { return };
    let s = LinearShape { m: 200, k: 515, n: 777, r: 16 };
    let c = Case::new(77, s, true, true);
    let run = || {
        let x = gpu.upload(&convert::<f32, bf16>(&c.x)).unwrap();
        let w = gpu.upload(&convert::<f32, bf16>(&c.w)).unwrap();
        let dy = gpu.upload(&convert::<f32, bf16>(&c.dy)).unwrap();
        let (a, b) = (gpu.upload(&c.a).unwrap(), gpu.upload(&c.b).unwrap());
        let (u, v) = (gpu.upload(c.u.as_ref().unwrap()).unwrap(), gpu.upload(c.v.as_ref().unwrap()).unwrap());
        let ad = Adapter::<Gpu> { a: &a, b: &b, u: Some(&u), v: Some(&v), scale: c.scale };
        let mut y = gpu.zeros::<bf16>(s.m * s.n).unwrap();
        gpu.lowrank_forward(s, &x, &w, None, Some(ad), &mut y, None).unwrap();
        let (mut da, mut db) = (gpu.zeros::<f32>(s.r * s.k).unwrap(), gpu.zeros::<f32>(s.n * s.r).unwrap());
        let (mut du, mut dv) = (gpu.zeros::<f32>(s.r).unwrap(), gpu.zeros::<f32>(s.n).unwrap());
        let grads = Grads::<Gpu, bf16> {
            da: Some(&mut da),
            db: Some(&mut db),
            du: Some(&mut du),
            dv: Some(&mut dv),
            ..Grads::none()
        };
        gpu.lowrank_backward(s, &x, &w, Some(ad), None, &dy, grads).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
        let y: Vec<u16> = gpu.download(&y).unwrap().iter().map(|e| e.to_bits()).collect();
        (
            y,
            bits(gpu.download(&da).unwrap()),
            bits(gpu.download(&db).unwrap()),
            bits(gpu.download(&du).unwrap()),
            bits(gpu.download(&dv).unwrap()),
        )
    };
    assert!(run() == run(), "two identical runs gave different bits");
}

// ---- the packed layout ----------------------------------------------------

use lorafuse::lowrank::packed::{PackedLayout, PackedOps};

/// Unit roundoff of `T` (half an ulp at 1): the error of one rounding.
fn unit_roundoff<T: Element>() -> f64 {
    match T::DTYPE {
        lorafuse::DType::F32 => f32::EPSILON as f64 / 2.0,
        lorafuse::DType::F16 => 2f64.powi(-11),
        lorafuse::DType::BF16 => 2f64.powi(-8),
    }
}

fn frob(v: &[f64]) -> f64 {
    v.iter().map(|e| e * e).sum::<f64>().sqrt()
}

fn packed_shapes() -> Vec<LinearShape> {
    vec![
        LinearShape { m: 1, k: 1, n: 1, r: 1 },
        LinearShape { m: 3, k: 9, n: 11, r: 7 },
        LinearShape { m: 5, k: 13, n: 6, r: 8 },
        LinearShape { m: 17, k: 33, n: 31, r: 16 },
    ]
}

/// `x` packed: the first K columns of every row, the rest NaN (the forward
/// must overwrite every spare column it reads).
fn packed_x<T: Element>(l: &PackedLayout, x: &[f32]) -> Vec<T> {
    let mut xp = vec![T::from_f32(f32::NAN); l.x_len()];
    Cpu.pack_rows(l.shape.m, l.shape.k, l.x_ld(), &convert::<f32, T>(x), &mut xp).unwrap();
    xp
}

/// The packed forward against the independent naive forward. Its extra
/// rounding over the caller path: `t' = s·t⊙u`, `B⊙v` and the bias are
/// rounded to T before the one GEMM, so each low-rank product is off by at
/// most 2u of its size (and the bias by u); the output rounds once more.
/// Bound: u·(‖y‖ + 2‖Σ_q |t'_q|·|B'_q|‖ + ‖bias‖) / ‖y‖ (Frobenius).
fn packed_forward_matches_naive_for<T: Element>() {
    let u = unit_roundoff::<T>();
    for (i, s) in packed_shapes().into_iter().enumerate() {
        for (bias, vectors) in [(false, false), (true, true), (true, false), (false, true)] {
            let seed = 900 + i as u64;
            let c = Case::new(seed, s, bias, vectors);
            let l = PackedLayout::new(s, bias).unwrap();
            let ctx = format!("packed forward {s} {} bias={bias} uv={vectors} seed={seed}", T::DTYPE);
            let round = |v: &[f32]| -> Vec<f64> { v.iter().map(|&e| T::from_f32(e).to_f64()).collect() };
            let (xr, wr) = (round(&c.x), round(&c.w));
            let want = naive_forward(
                s,
                &xr,
                &wr,
                c.bias.as_deref().map(round).as_deref(),
                &f64s(&c.a),
                &f64s(&c.b),
                c.u.as_deref().map(f64s).as_deref(),
                c.v.as_deref().map(f64s).as_deref(),
                c.scale as f64,
                true,
            );
            let w: Vec<T> = convert(&c.w);
            let tb: Option<Vec<T>> = c.bias.as_ref().map(|b| convert(b));
            let mut wp = vec![T::from_f32(f32::NAN); l.w_len()];
            Cpu.pack_weight(&l, &w, tb.as_ref(), c.adapter(), &mut wp).unwrap();
            let mut xp = packed_x::<T>(&l, &c.x);
            let (mut y, mut t) = (vec![T::from_f32(f32::NAN); s.m * s.n], vec![f32::NAN; s.m * s.r]);
            Cpu.packed_forward(&l, &mut xp, &wp, c.adapter(), &mut y, Some(&mut t)).unwrap();

            // The derived bound.
            let LinearShape { m, k, n, r } = s;
            let t64: Vec<f64> =
                (0..m * r).map(|e| (0..k).map(|l| xr[e / r * k + l] * c.a[e % r * k + l] as f64).sum()).collect();
            let mut low_abs = vec![0.0; m * n];
            for i in 0..m {
                for j in 0..n {
                    low_abs[i * n + j] = (0..r)
                        .map(|q| {
                            let tq = c.scale as f64 * t64[i * r + q] * c.u.as_ref().map_or(1.0, |u| u[q] as f64);
                            (tq * c.b[j * r + q] as f64 * c.v.as_ref().map_or(1.0, |v| v[j] as f64)).abs()
                        })
                        .sum();
                }
            }
            let bias_norm = c.bias.as_deref().map_or(0.0, |b| frob(&f64s(b)) * (m as f64).sqrt());
            let tol = u * (frob(&want) + 2.0 * frob(&low_abs) + bias_norm) / frob(&want) + 1e-12;
            check_close(&ctx, &y, &want, tol).unwrap();
            check_close(&format!("{ctx} (saved t)"), &t, &t64, 1e-6).unwrap();

            // x_packed: x untouched, spare columns [T(s·t⊙u) | 1 | 0…].
            let ld = l.x_ld();
            for row in 0..m {
                for col in 0..ld {
                    let got = xp[row * ld + col].to_f64();
                    let want = if col < k {
                        xr[row * k + col]
                    } else if col - k < r {
                        let q = col - k;
                        let tq = c.scale as f64 * t64[row * r + q] * c.u.as_ref().map_or(1.0, |u| u[q] as f64);
                        T::from_f64(tq).to_f64()
                    } else if col - k == r && bias {
                        1.0
                    } else {
                        0.0
                    };
                    let close = (got - want).abs() <= 4.0 * u * want.abs().max(1e-30);
                    assert!(close || got == want, "{ctx}: x_packed[{row}][{col}] = {got}, want {want}");
                }
            }
        }
    }
}

#[test]
fn packed_forward_matches_naive_math_every_dtype() {
    packed_forward_matches_naive_for::<f32>();
    packed_forward_matches_naive_for::<f16>();
    packed_forward_matches_naive_for::<bf16>();
}

#[test]
fn pack_weight_lays_out_w_adapter_bias_and_zero_padding() {
    let s = LinearShape { m: 2, k: 5, n: 3, r: 2 };
    let c = Case::new(31, s, true, true);
    let l = PackedLayout::new(s, true).unwrap();
    assert_eq!((l.pad(), l.x_ld(), l.dy_ld(), l.w_len()), (8, 13, 11, 11 * 13));
    let mut wp = vec![f32::NAN; l.w_len()];
    Cpu.pack_weight(&l, &c.w, c.bias.as_ref(), c.adapter(), &mut wp).unwrap();
    let (v, bias) = (c.v.as_ref().unwrap(), c.bias.as_ref().unwrap());
    for row in 0..s.n + l.pad() {
        for col in 0..l.x_ld() {
            let want = match (row < s.n, col < s.k) {
                (true, true) => c.w[row * s.k + col],
                (true, false) if col - s.k < s.r => c.b[row * s.r + col - s.k] * v[row],
                (true, false) if col - s.k == s.r => bias[row],
                (false, true) if row - s.n < s.r => c.a[(row - s.n) * s.k + col],
                _ => 0.0,
            };
            assert_eq!(wp[row * l.x_ld() + col], want, "w_packed[{row}][{col}]");
        }
    }
    // pack_adapter rewrites the adapter's part and leaves W alone.
    let mut c2 = c.clone();
    c2.b.iter_mut().for_each(|e| *e += 1.0);
    let mut again = wp.clone();
    again[0] = 123.0; // a W element: must survive
    Cpu.pack_adapter(&l, c.bias.as_ref(), c2.adapter(), &mut again).unwrap();
    assert_eq!(again[0], 123.0);
    assert_eq!(again[s.k], c2.b[0] * v[0]);
}

/// The packed backward against the caller-buffer oracle: the parameter
/// gradients exactly (same f64 math), `dx` within the derived bound of its
/// extra roundings (dS and A rounded to T before the one GEMM: 2u of each
/// `|dS|·|A|` product, and the output rounding), and dy_packed's spare
/// columns holding T(dS) and zeros.
fn packed_backward_matches_oracle_for<T: Element>() {
    let u = unit_roundoff::<T>();
    for (i, s) in packed_shapes().into_iter().enumerate() {
        for train in [ALL, Trainable::VECTORS, Trainable::FACTORS, Trainable::NONE] {
            let seed = 950 + i as u64;
            let c = Case::new(seed, s, true, true);
            let l = PackedLayout::new(s, true).unwrap();
            let ctx =
                |what: &str| format!("packed backward {what} {s} {} train={} seed={seed}", T::DTYPE, train.label());
            let (x, w, dy): (Vec<T>, Vec<T>, Vec<T>) = (convert(&c.x), convert(&c.w), convert(&c.dy));
            let tb: Vec<T> = convert(c.bias.as_ref().unwrap());
            let mut wp = vec![T::from_f32(0.0); l.w_len()];
            Cpu.pack_weight(&l, &w, Some(&tb), c.adapter(), &mut wp).unwrap();
            let mut xp = packed_x::<T>(&l, &c.x);
            let mut y = vec![T::from_f32(0.0); s.m * s.n];
            let mut t = vec![0f32; s.m * s.r];
            Cpu.packed_forward(&l, &mut xp, &wp, c.adapter(), &mut y, Some(&mut t)).unwrap();
            let mut dyp = vec![T::from_f32(f32::NAN); l.dy_len()];
            Cpu.pack_rows(s.m, s.n, l.dy_ld(), &dy, &mut dyp).unwrap();

            let mut got = AllGrads::filled(s, 0.5);
            let mut gdx = vec![T::from_f32(f32::NAN); s.m * s.k];
            let grads = Grads::<Cpu, T> {
                dx: Some(&mut gdx),
                dw: Some(&mut got.dw),
                dbias: Some(&mut got.dbias),
                da: train.a.then_some(&mut got.da),
                db: train.b.then_some(&mut got.db),
                du: train.u.then_some(&mut got.du),
                dv: train.v.then_some(&mut got.dv),
            };
            Cpu.packed_backward(&l, &xp, &wp, c.adapter(), Some(&t), &mut dyp, grads).unwrap();

            let mut want = AllGrads::filled(s, 0.5);
            let mut wdx = vec![T::from_f32(f32::NAN); s.m * s.k];
            let grads = Grads::<Cpu, T> {
                dx: Some(&mut wdx),
                dw: Some(&mut want.dw),
                dbias: Some(&mut want.dbias),
                da: train.a.then_some(&mut want.da),
                db: train.b.then_some(&mut want.db),
                du: train.u.then_some(&mut want.du),
                dv: train.v.then_some(&mut want.dv),
            };
            Cpu.lowrank_backward(s, &x, &w, Some(c.adapter()), Some(&t), &dy, grads).unwrap();
            for (name, g, wnt) in [
                ("dW", &got.dw, &want.dw),
                ("dbias", &got.dbias, &want.dbias),
                ("dA", &got.da, &want.da),
                ("dB", &got.db, &want.db),
                ("du", &got.du, &want.du),
                ("dv", &got.dv, &want.dv),
            ] {
                assert!(g == wnt, "{}: differs from the caller-buffer oracle", ctx(name));
            }

            // dS (f64) and the bound for dx.
            let LinearShape { m, k, n, r } = s;
            let (uu, vv) = (c.u.as_ref().unwrap(), c.v.as_ref().unwrap());
            let dyr: Vec<f64> = dy.iter().map(|e| e.to_f64()).collect();
            let ds: Vec<f64> = (0..m * r)
                .map(|e| {
                    let (i, q) = (e / r, e % r);
                    let g: f64 = (0..n).map(|j| dyr[i * n + j] * vv[j] as f64 * c.b[j * r + q] as f64).sum();
                    c.scale as f64 * uu[q] as f64 * g
                })
                .collect();
            let wdx64: Vec<f64> = wdx.iter().map(|e| e.to_f64()).collect();
            let low_abs: Vec<f64> = (0..m * k)
                .map(|e| (0..r).map(|q| (ds[e / k * r + q] * c.a[q * k + e % k] as f64).abs()).sum())
                .collect();
            // The oracle's dx is rounded to T too: one more u of ‖dx‖.
            let tol = u * (2.0 * frob(&wdx64) + 2.0 * frob(&low_abs)) / frob(&wdx64) + 1e-12;
            check_close(&ctx("dx"), &gdx, &wdx64, tol).unwrap();
            let dld = l.dy_ld();
            for row in 0..m {
                for col in n..dld {
                    let got = dyp[row * dld + col].to_f64();
                    let want = if col - n < r { T::from_f64(ds[row * r + col - n]).to_f64() } else { 0.0 };
                    let ok = (got - want).abs() <= 4.0 * u * want.abs().max(1e-30) || got == want;
                    assert!(ok, "{}: dy_packed[{row}][{col}] = {got}, want {want}", ctx("dS"));
                }
            }
        }
    }
}

#[test]
fn packed_backward_matches_caller_buffer_oracle_every_dtype() {
    packed_backward_matches_oracle_for::<f32>();
    packed_backward_matches_oracle_for::<f16>();
    packed_backward_matches_oracle_for::<bf16>();
}

#[test]
fn packed_layout_errors_are_typed_and_name_the_operand() {
    let s = LinearShape { m: 2, k: 3, n: 4, r: 2 };
    let c = Case::new(41, s, true, false);
    assert!(matches!(PackedLayout::new(LinearShape { r: 0, ..s }, false), Err(Error::Invalid { .. })));
    let l = PackedLayout::new(s, false).unwrap();
    let mut wp = vec![0f32; l.w_len()];
    // A bias for a layout without a bias column, and the reverse.
    let err = Cpu.pack_weight(&l, &c.w, c.bias.as_ref(), c.adapter(), &mut wp).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let lb = PackedLayout::new(s, true).unwrap();
    let mut wpb = vec![0f32; lb.w_len()];
    let err = Cpu.pack_weight(&lb, &c.w, None, c.adapter(), &mut wpb).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    Cpu.pack_weight(&l, &c.w, None, c.adapter(), &mut wp).unwrap();
    // x_packed of the unpacked size.
    let mut short = c.x.clone();
    let mut y = vec![0f32; s.m * s.n];
    let err = Cpu.packed_forward(&l, &mut short, &wp, c.adapter(), &mut y, None).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "x", .. }), "{err}");
    assert!(err.to_string().contains("x_len"), "the error says how to size it: {err}");
    // w_packed of the wrong size, dy_packed of the wrong size.
    let mut xp = vec![0f32; l.x_len()];
    let err = Cpu.packed_forward(&l, &mut xp, &c.w, c.adapter(), &mut y, None).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "w", .. }), "{err}");
    let mut dyp = c.dy.clone();
    let err = Cpu.packed_backward(&l, &xp, &wp, c.adapter(), None, &mut dyp, Grads::none()).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "dy", .. }), "{err}");
    // pack_rows: overlapping rows.
    let mut dst = vec![0f32; 4];
    assert!(Cpu.pack_rows(2, 3, 2, &vec![0f32; 6], &mut dst).is_err());
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_packed_matches_cpu_packed_every_dtype() {
    let Some(gpu) = common::gpu_or_skip("gpu_packed_matches_cpu_packed_every_dtype") else { return };
    for (i, s) in packed_shapes().into_iter().chain([LinearShape { m: 300, k: 1000, n: 700, r: 64 }]).enumerate() {
        gpu_packed_case::<f32>(&gpu, s, 700 + i as u64);
        gpu_packed_case::<f16>(&gpu, s, 700 + i as u64);
        gpu_packed_case::<bf16>(&gpu, s, 700 + i as u64);
    }
}

/// Σ_c |a[i][c]|·|b[j][c]| over `len` columns: the Σ|terms| of one GEMM
/// output (rows of a `lda` apart, of b `ldb` apart; `b_t` = b is stored
/// column-major, i.e. element (c, j) at b[c·ldb + j]).
#[allow(clippy::too_many_arguments)]
fn gemm_abs<T: Element>(
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    b_t: bool,
    (rows, cols, len): (usize, usize, usize),
) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = (0..len)
                .map(|c| {
                    let bv = if b_t { b[c * ldb + j] } else { b[j * ldb + c] };
                    (a[i * lda + c].to_f64() * bv.to_f64()).abs()
                })
                .sum();
        }
    }
    out
}

#[cfg(feature = "cuda")]
/// The GPU's packed path against the CPU twin, element by element against
/// derived bounds (src/testing.rs): y and dx are ONE GEMM each (over K + p,
/// N + p) whose 16-bit operands t' and dS may round differently on the two
/// sides (one intermediate rounding); the adapter gradients go through the
/// caller path's kernels and take its bounds (`magnitudes`).
fn gpu_packed_case<T: Element>(gpu: &Gpu, s: LinearShape, seed: u64) {
    let c = Case::new(seed, s, true, true);
    let l = PackedLayout::new(s, true).unwrap();
    let LinearShape { m, k, n, r } = s;
    let (ld, dld) = (l.x_ld(), l.dy_ld());
    let ctx = |what: &str| format!("gpu packed {what} {s} {} seed={seed}", T::DTYPE);
    let one = ErrorBound::gpu(T::DTYPE).intermediates(1);
    let bwd = ErrorBound::gpu(T::DTYPE).intermediates(3);
    let (x, w, dy): (Vec<T>, Vec<T>, Vec<T>) = (convert(&c.x), convert(&c.w), convert(&c.dy));
    let tb: Vec<T> = convert(c.bias.as_ref().unwrap());
    // CPU.
    let mut wp = vec![T::from_f32(0.0); l.w_len()];
    Cpu.pack_weight(&l, &w, Some(&tb), c.adapter(), &mut wp).unwrap();
    let mut xp = packed_x::<T>(&l, &c.x);
    let (mut y, mut t) = (vec![T::from_f32(0.0); m * n], vec![0f32; m * r]);
    Cpu.packed_forward(&l, &mut xp, &wp, c.adapter(), &mut y, Some(&mut t)).unwrap();
    let mut dyp = vec![T::from_f32(f32::NAN); l.dy_len()];
    Cpu.pack_rows(m, n, dld, &dy, &mut dyp).unwrap();
    let starts: Vec<Vec<f32>> = [n * k, n, r * k, n * r, r, n].iter().map(|&len| vec![0.25f32; len]).collect();
    let mut cg: Vec<Vec<f32>> = starts[2..].to_vec();
    let mut cdx = vec![T::from_f32(f32::NAN); m * k];
    {
        let [da, db, du, dv] = &mut cg[..] else { unreachable!() };
        let grads = Grads::<Cpu, T> {
            dx: Some(&mut cdx),
            da: Some(da),
            db: Some(db),
            du: Some(du),
            dv: Some(dv),
            ..Grads::none()
        };
        Cpu.packed_backward(&l, &xp, &wp, c.adapter(), Some(&t), &mut dyp, grads).unwrap();
    }
    // Magnitudes.
    let mag_y = Magnitude::sums(ld, &gemm_abs(&xp, ld, &wp, ld, false, (m, n, ld)));
    let mag_dx = Magnitude::sums(dld, &gemm_abs(&dyp, dld, &wp, ld, true, (m, k, dld)));
    let (uu, vv) = (c.u.as_ref().unwrap(), c.v.as_ref().unwrap());
    let mag_xp: Vec<Magnitude> = (0..m * ld)
        .map(|e| {
            let (i, col) = (e / ld, e % ld);
            if col < k || col - k >= r {
                return Magnitude::default();
            }
            let q = col - k;
            let sum: f64 = (0..k).map(|l| (x[i * k + l].to_f64() * c.a[q * k + l] as f64).abs()).sum();
            Magnitude::sum(k, sum * (c.scale * uu[q]).abs() as f64)
        })
        .collect();
    let mag_dyp: Vec<Magnitude> = (0..m * dld)
        .map(|e| {
            let (i, col) = (e / dld, e % dld);
            if col < n || col - n >= r {
                return Magnitude::default();
            }
            let q = col - n;
            let sum: f64 = (0..n).map(|j| (dy[i * n + j].to_f64() * (vv[j] * c.b[j * r + q]) as f64).abs()).sum();
            Magnitude::sum(n, sum * (c.scale * uu[q]).abs() as f64)
        })
        .collect();
    let y0 = vec![T::from_f32(0.0); m * n];
    let mag = magnitudes(&c, &x, &w, Some(&tb), &y0, &starts, &dy);
    // GPU, from the unpacked inputs (pack_rows and pack_weight on the GPU).
    let up32 = |v: &[f32]| gpu.upload(v).unwrap();
    let (ga, gb, gu, gv) = (up32(&c.a), up32(&c.b), up32(uu), up32(vv));
    let gad = Adapter::<Gpu> { a: &ga, b: &gb, u: Some(&gu), v: Some(&gv), scale: c.scale };
    let (gw, gbias) = (gpu.upload(&w).unwrap(), gpu.upload(&tb).unwrap());
    let mut gwp = gpu.upload(&vec![T::from_f32(f32::NAN); l.w_len()]).unwrap();
    gpu.pack_weight(&l, &gw, Some(&gbias), gad, &mut gwp).unwrap();
    assert!(gpu.download(&gwp).unwrap().iter().zip(&wp).all(|(a, b)| a.to_f64() == b.to_f64()), "{}", ctx("w_packed"));
    let gx = gpu.upload(&x).unwrap();
    let mut gxp = gpu.upload(&vec![T::from_f32(f32::NAN); l.x_len()]).unwrap();
    gpu.pack_rows(m, k, ld, &gx, &mut gxp).unwrap();
    let mut gy = gpu.upload(&vec![T::from_f32(f32::NAN); m * n]).unwrap();
    let mut gt = gpu.upload(&vec![f32::NAN; m * r]).unwrap();
    gpu.packed_forward(&l, &mut gxp, &gwp, gad, &mut gy, Some(&mut gt)).unwrap();
    let want = |v: &[T]| v.iter().map(|e| e.to_f64()).collect::<Vec<_>>();
    check_bounded(&ctx("y"), &gpu.download(&gy).unwrap(), &want(&y), &mag_y, one).unwrap();
    check_bounded(&ctx("x_packed"), &gpu.download(&gxp).unwrap(), &want(&xp), &mag_xp, one).unwrap();
    let gdy = gpu.upload(&dy).unwrap();
    let mut gdyp = gpu.upload(&vec![T::from_f32(f32::NAN); l.dy_len()]).unwrap();
    gpu.pack_rows(m, n, dld, &gdy, &mut gdyp).unwrap();
    let mut g: Vec<_> = starts[2..].iter().map(|v| up32(v)).collect();
    let mut gdx = gpu.upload(&vec![T::from_f32(f32::NAN); m * k]).unwrap();
    {
        let [gda, gdb, gdu, gdv] = &mut g[..] else { unreachable!() };
        let grads = Grads::<Gpu, T> {
            dx: Some(&mut gdx),
            da: Some(gda),
            db: Some(gdb),
            du: Some(gdu),
            dv: Some(gdv),
            ..Grads::none()
        };
        gpu.packed_backward(&l, &gxp, &gwp, gad, Some(&gt), &mut gdyp, grads).unwrap();
    }
    check_bounded(&ctx("dx"), &gpu.download(&gdx).unwrap(), &want(&cdx), &mag_dx, one).unwrap();
    check_bounded(&ctx("dy_packed"), &gpu.download(&gdyp).unwrap(), &want(&dyp), &mag_dyp, one).unwrap();
    for (i, name) in ["dA", "dB", "du", "dv"].iter().enumerate() {
        check_bounded(&ctx(name), &gpu.download(&g[i]).unwrap(), &f64s(&cg[i]), &mag.grads[2 + i], bwd).unwrap();
    }
}

// ---- the fused decode kernel (M ≤ 16) --------------------------------------

#[cfg(feature = "cuda")]
mod fused_decode {
    use super::*;
    use lorafuse::cuda::lowrank::{forward_with, AdapterView, DecodePath, DECODE_FUSED_MAX_M};

    /// Error-bound magnitudes of the fused decode's y and t: y = x·Wᵀ (K) +
    /// bias + s·v⊙((t⊙u)·Bᵀ) (r, inner K), t = x·Aᵀ (K). The kernel keeps every
    /// intermediate in f32 and rounds y once, so no level is marked rounded.
    fn decode_magnitudes<T: Element>(
        c: &Case,
        x: &[T],
        w: &[T],
        bias: Option<&Vec<T>>,
    ) -> (Vec<Magnitude>, Vec<Magnitude>) {
        let LinearShape { m, k, n, r } = c.s;
        let wide = |v: &[T]| v.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
        let (x, w) = (wide(x), wide(w));
        let bias = bias.map(|b| wide(b));
        let (a, b) = (f64s(&c.a), f64s(&c.b));
        let u: Vec<f64> = c.u.as_deref().map_or(vec![1.0; r], f64s);
        let v: Vec<f64> = c.v.as_deref().map_or(vec![1.0; n], f64s);
        let sc = (c.scale as f64).abs();
        let (mut t, mut mt) = (vec![0.0; m * r], vec![0.0; m * r]);
        for i in 0..m {
            for q in 0..r {
                for l in 0..k {
                    t[i * r + q] += x[i * k + l] * a[q * k + l];
                    mt[i * r + q] += (x[i * k + l] * a[q * k + l]).abs();
                }
            }
        }
        let mut y = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let base: f64 = (0..k).map(|l| (x[i * k + l] * w[j * k + l]).abs()).sum();
                let bj = bias.as_ref().map_or(0.0, |bb| bb[j].abs());
                let expand = (0..r).map(|q| (sc * v[j] * t[i * r + q] * u[q] * b[j * r + q]).abs()).sum();
                let shrink =
                    Level::inner(k, (0..r).map(|q| (sc * v[j] * u[q] * b[j * r + q]).abs() * mt[i * r + q]), false);
                y.push(Magnitude::nested(&[
                    Level::sum(k, base, false),
                    Level::sum(1, bj, false),
                    Level::sum(r, expand, false),
                    shrink,
                ]));
            }
        }
        (y, Magnitude::sums(k, &mt))
    }

    /// The fused decode against the CPU oracle for one case and dtype: y
    /// (NaN-poisoned first) and the saved t within their derived bounds (one
    /// rounding of y, f32 everywhere else), and the same bits on a second run.
    pub(super) fn fused_decode_matches_cpu<T: Element>(gpu: &Gpu, c: &Case) -> Result<(), String> {
        let s = c.s;
        let LinearShape { m, n, r, .. } = s;
        let ctx =
            |what: &str| format!("fused decode {what} {s} {} bias={} uv={}", T::DTYPE, c.bias.is_some(), c.u.is_some());
        let x: Vec<T> = convert(&c.x);
        let w: Vec<T> = convert(&c.w);
        let bias: Option<Vec<T>> = c.bias.as_ref().map(|b| convert(b));
        let (gx, gw) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
        let gbias = bias.as_ref().map(|b| gpu.upload(b).unwrap());
        let (ga, gb) = (gpu.upload(&c.a).unwrap(), gpu.upload(&c.b).unwrap());
        let gu = c.u.as_ref().map(|u| gpu.upload(u).unwrap());
        let gv = c.v.as_ref().map(|v| gpu.upload(v).unwrap());
        let ad = AdapterView {
            a: ga.as_view(),
            b: gb.as_view(),
            u: gu.as_ref().map(|u| u.as_view()),
            v: gv.as_ref().map(|v| v.as_view()),
            scale: c.scale,
        };
        let run = || -> Result<(Vec<T>, Vec<f32>), String> {
            let mut gy = gpu.upload(&vec![T::from_f32(f32::NAN); m * n]).unwrap();
            let mut gt = gpu.upload(&vec![f32::NAN; m * r]).unwrap();
            let gbv = gbias.as_ref().map(|b| b.as_view());
            forward_with(
                gpu,
                DecodePath::Fused,
                s,
                &gx.as_view(),
                &gw.as_view(),
                gbv.as_ref(),
                Some(&ad),
                &mut gy.as_view_mut(),
                Some(&mut gt.as_view_mut()),
            )
            .map_err(|e| ctx(&e.to_string()))?;
            Ok((gpu.download(&gy).unwrap(), gpu.download(&gt).unwrap()))
        };
        let (y, t) = run()?;
        let (mut cy, mut ct) = (vec![T::from_f32(f32::NAN); m * n], vec![f32::NAN; m * r]);
        Cpu.lowrank_forward(s, &x, &w, bias.as_ref(), Some(c.adapter()), &mut cy, Some(&mut ct)).unwrap();
        let (mag_y, mag_t) = decode_magnitudes(c, &x, &w, bias.as_ref());
        let bound = ErrorBound::gpu(T::DTYPE).intermediates(0);
        let want_y: Vec<f64> = cy.iter().map(|v| v.to_f64()).collect();
        check_bounded(&ctx("y"), &y, &want_y, &mag_y, bound)?;
        check_bounded(&ctx("t"), &t, &f64s(&ct), &mag_t, bound)?;
        let (y2, t2) = run()?;
        let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
        if bits(&y) != bits(&y2) || t.iter().zip(&t2).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(ctx("two identical runs gave different bits"));
        }
        Ok(())
    }

    #[test]
    fn gpu_fused_decode_matches_cpu_on_awkward_shapes() {
        let Some(gpu) = common::gpu_or_skip("gpu_fused_decode_matches_cpu_on_awkward_shapes") else { return };
        // M across the m16 tile; K with ragged 8-element chunks and several
        // shrink slices, N with partial 16-column tiles, and the 4096-wide
        // decode; every rank bucket; LoRA with a bias, VeRA / Tied (u, v)
        // without.
        let kn = [(37, 129), (300, 40), (1000, 17), (4096, 4099)];
        let ranks = [1, 4, 16, 64];
        let mut seed = 900;
        for m in [1, 3, DECODE_FUSED_MAX_M] {
            for (i, &(k, n)) in kn.iter().enumerate() {
                for (bias, vectors) in [(true, false), (false, true)] {
                    let r = ranks[(i + m + vectors as usize) % ranks.len()];
                    let c = Case::new(seed, LinearShape { m, k, n, r }, bias, vectors);
                    seed += 1;
                    fused_decode_matches_cpu::<f32>(&gpu, &c).unwrap();
                    fused_decode_matches_cpu::<f16>(&gpu, &c).unwrap();
                    fused_decode_matches_cpu::<bf16>(&gpu, &c).unwrap();
                }
            }
        }
    }
}

// ---- the scratch workspace -------------------------------------------------

/// Calls of growing, then shrinking sizes back to back on one `Gpu`, each
/// path that carves scratch (fused decode, base-then-add decode, prefill,
/// backward with and without a saved t, packed forward and backward), every
/// result against the CPU oracle within the bounds above. The workspace is
/// filled with NaN before each call, so a kernel that reads scratch it did
/// not write (stale bytes a fresh allocation might have hidden) or two
/// regions that overlap show up as a mismatch; a second pass over the same
/// sizes must neither grow nor overflow the workspace (steady state
/// allocates nothing).
#[cfg(feature = "cuda")]
#[test]
fn gpu_workspace_reuse_across_growing_and_shrinking_calls() {
    let Some(gpu) = common::gpu_or_skip("gpu_workspace_reuse_across_growing_and_shrinking_calls") else { return };
    // (M, K, N, r): decode sizes, the prefill boundary, a large prefill
    // (the most scratch), then back down.
    let up = [(1, 4096, 1000, 16), (16, 1000, 700, 64), (33, 257, 129, 17), (300, 1000, 700, 64), (400, 640, 1200, 32)];
    let sizes: Vec<_> = up.iter().chain(up.iter().rev().skip(1)).copied().collect();
    let mut warm = None;
    for pass in 0..2 {
        for (i, &(m, k, n, r)) in sizes.iter().enumerate() {
            let s = LinearShape { m, k, n, r };
            let seed = 4000 + 100 * pass + i as u64;
            let c = Case::new(seed, s, i % 2 == 0, i % 3 != 1);
            let (dx, saved_t) = (i % 2 == 1, i % 4 < 2);
            gpu.poison_workspace().unwrap();
            match i % 3 {
                0 => gpu_matches_cpu::<bf16>(&gpu, &c, ALL, dx, true, saved_t, seed),
                1 => gpu_matches_cpu::<f32>(&gpu, &c, ALL, dx, true, saved_t, seed),
                _ => gpu_matches_cpu::<f16>(&gpu, &c, ALL, dx, true, saved_t, seed),
            }
            .unwrap();
            gpu.poison_workspace().unwrap();
            gpu_packed_case::<bf16>(&gpu, s, seed);
            // A decode call between the larger ones.
            let d =
                Case::new(seed ^ 0xdec, LinearShape { m: 1 + i % 16, k: 515, n: 333, r: 4 << (i % 3) }, true, false);
            gpu.poison_workspace().unwrap();
            fused_decode::fused_decode_matches_cpu::<bf16>(&gpu, &d).unwrap();
        }
        let stats = gpu.workspace_stats().unwrap();
        match warm {
            None => warm = Some(stats),
            Some(w) => assert!(
                stats.grows == w.grows && stats.overflows == w.overflows,
                "the second pass allocated scratch: {w:?} -> {stats:?}"
            ),
        }
    }
}
