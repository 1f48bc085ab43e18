//! The optimizer step decided on the backend ([`NnOps::optimizer_prepare`]
//! then [`NnOps::adamw_many_device`]): the clip factor, the schedule's
//! rate, the step count and the refusal of a non-finite step come from the
//! backend's state, never from a host round trip.
//!
//! On the CPU: the state path gives what the host-decided path
//! ([`NnOps::adamw_many`] with the norm read back) gives; a non-finite
//! gradient or guard refuses the step and changes nothing; the step count
//! carries over and restarts from a resumed value. On a GPU: each step's
//! state and tensors against the CPU twin. Skips the GPU part without one.

mod common;

use lorafuse::cpu::Cpu;
use lorafuse::nn::{optim_state, AdamWStep, AdamWTensor, NnOps};
use lorafuse::testing::{check_bounded, ErrorBound, Magnitude};
use lorafuse::train::optimizer::{AdamW, Group, OptimConfig, ParamRef, Schedule};
use lorafuse::{Backend, Error};

/// Tensor lengths: odd, one element, one past a block multiple.
const SIZES: [usize; 4] = [31, 1, 4097, 300];

/// Param, grad, m, v of tensor `k`; gradients scaled by `grad_scale` (large
/// values make the norm exceed the clip).
fn tensors(seed: u64, grad_scale: f32) -> Vec<[Vec<f32>; 4]> {
    SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let s = seed + 10 * k as u64;
            let g = common::random(s + 1, n).iter().map(|v| v * grad_scale).collect();
            let v = common::random(s + 3, n).iter().map(|v| v.abs() * 1e-2).collect();
            [common::random(s, n), g, common::random(s + 2, n), v]
        })
        .collect()
}

fn config() -> OptimConfig {
    OptimConfig { warmup: 2, clip_norm: 1.5, weight_decay: 0.1, schedule: Schedule::Cosine, ..OptimConfig::default() }
}

/// Groups by tensor: a matrix, a vector, θ, and a base weight.
const GROUPS: [Group; 4] = [Group::Matrix, Group::Vector, Group::Theta, Group::Base];

fn params<B: Backend>(bufs: &mut [[B::Buf<f32>; 4]]) -> Vec<ParamRef<'_, B>> {
    bufs.iter_mut()
        .enumerate()
        .map(|(k, b)| {
            let [p, g, _, _] = b;
            (format!("t{k}"), GROUPS[k], p, &*g)
        })
        .collect()
}

/// One step the old way on the CPU: the norm read back, the clip factor,
/// rate and corrections worked out on the host, then `adamw_many`.
fn host_decided_step(c: &OptimConfig, bufs: &mut [[Vec<f32>; 4]], step: u64, total: u64) {
    let norm = bufs.iter().map(|b| b[1].iter().map(|&x| x as f64 * x as f64).sum::<f64>()).sum::<f64>().sqrt();
    let grad_scale = if c.clip_norm > 0.0 && norm > c.clip_norm { c.clip_norm / norm } else { 1.0 };
    let hp = AdamWStep { lr: 0.0, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: 0.0, step, grad_scale };
    let factor = c.lr_factor(step, total);
    let mut ts: Vec<AdamWTensor<'_, Cpu>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(k, [p, g, m, v])| {
            let (lr, weight_decay) = c.group(GROUPS[k]);
            AdamWTensor { param: p, grad: &*g, m, v, lr: lr * factor, weight_decay }
        })
        .collect();
    Cpu.adamw_many(&mut ts, &hp).unwrap();
}

/// Each element of `got` within one f32 rounding of `want` (plus the f64
/// arithmetic's share): both sides compute each element in f64 from the
/// same f32 inputs, the schedule's `powi`/`powf` and the norm's order of
/// summation differ in the last f64 bits only.
fn check_f32(ctx: &str, got: &[f32], want: &[f32], terms: usize) {
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let mag: Vec<Magnitude> = want.iter().map(|w| Magnitude::sum(terms, w.abs())).collect();
    if let Err(e) = check_bounded(ctx, got, &want, &mag, ErrorBound::f64()) {
        panic!("{e}");
    }
}

#[test]
fn state_path_matches_the_host_decided_step_on_the_cpu() {
    let (c, total) = (config(), 6);
    // Steps 1–2 warm up, 3–6 decay; gradients of 5 clip, of 0.01 do not.
    for (seed, grad_scale) in [(10u64, 5.0f32), (20, 0.01)] {
        let mut host = tensors(seed, grad_scale);
        // AdamW keeps its own moments, starting from zero.
        for b in host.iter_mut() {
            b[2].fill(0.0);
            b[3].fill(0.0);
        }
        let mut dev = host.clone();
        let mut opt = AdamW::<Cpu>::new(&Cpu, c.clone(), &params::<Cpu>(&mut dev)).unwrap();
        for step in 1..=total {
            host_decided_step(&c, &mut host, step, total);
            let report = opt.step(&Cpu, params::<Cpu>(&mut dev), total).unwrap();
            assert_eq!(opt.step, step);
            assert_eq!(report.clipped, grad_scale > 1.0, "seed {seed} step {step}: {report:?}");
            assert!((report.lr_factor - c.lr_factor(step, total)).abs() <= 1e-15, "{report:?}");
            let terms = SIZES.iter().sum();
            for (k, ((h, d), (_, m, v))) in host.iter().zip(&dev).zip(&opt.moments).enumerate() {
                for (what, got, i) in [("param", &d[0], 0), ("m", m, 2), ("v", v, 3)] {
                    check_f32(&format!("seed {seed} step {step} tensor {k} {what}"), got, &h[i], terms);
                }
            }
        }
    }
}

#[test]
fn a_non_finite_gradient_or_guard_refuses_the_step_and_changes_nothing() {
    let (c, total) = (config(), 10);
    let mut bufs = tensors(30, 1.0);
    let mut opt = AdamW::<Cpu>::new(&Cpu, c, &params::<Cpu>(&mut bufs)).unwrap();
    opt.step(&Cpu, params::<Cpu>(&mut bufs), total).unwrap();
    assert_eq!(opt.step, 1);

    bufs[2][1][4000] = f32::NAN;
    let before = bufs.clone();
    let moments: Vec<_> = opt.moments.iter().map(|(_, m, v)| (m.clone(), v.clone())).collect();
    match opt.step(&Cpu, params::<Cpu>(&mut bufs), total) {
        Err(Error::NonFinite { what, .. }) => assert!(what.contains("`t2`"), "{what}"),
        other => panic!("a NaN gradient was not refused: {other:?}"),
    }
    assert_eq!(opt.step, 1, "a refused step does not count");
    for (k, (b, a)) in before.iter().zip(&bufs).enumerate() {
        assert_eq!(
            b[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            a[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "tensor {k} param changed"
        );
    }
    for ((m0, v0), (_, m, v)) in moments.iter().zip(&opt.moments) {
        assert_eq!((m0, v0), (m, v), "moments changed on a refused step");
    }

    // A finite gradient with a non-finite guard (the loss) is refused too,
    // and named.
    bufs[2][1][4000] = 0.5;
    let loss = vec![1.0, f32::INFINITY, 2.0];
    opt.queue(&Cpu, params::<Cpu>(&mut bufs), &[("loss", &loss)], total).unwrap();
    match opt.report(&Cpu) {
        Err(Error::NonFinite { what, value, .. }) => assert!(what == "loss" && value.is_infinite(), "{what} {value}"),
        other => panic!("an infinite guard was not refused: {other:?}"),
    }
    assert_eq!(opt.step, 1);
    // The same guard finite: the step is taken and is step 2.
    let loss = vec![1.0, 3.0, 2.0];
    opt.queue(&Cpu, params::<Cpu>(&mut bufs), &[("loss", &loss)], total).unwrap();
    let report = opt.report(&Cpu).unwrap();
    assert_eq!(opt.step, 2);
    assert!((report.lr_factor - 1.0).abs() < 1e-15, "step 2 ends warmup: {report:?}");
}

#[test]
fn the_step_count_lives_in_the_state_and_resumes_from_the_host_value() {
    let (c, total) = (config(), 100);
    let mut bufs = tensors(40, 0.1);
    let mut opt = AdamW::<Cpu>::new(&Cpu, c.clone(), &params::<Cpu>(&mut bufs)).unwrap();
    for _ in 0..3 {
        opt.step(&Cpu, params::<Cpu>(&mut bufs), total).unwrap();
    }
    assert_eq!(opt.step, 3);
    // A resume sets the host count; the next step continues from it.
    opt.step = 50;
    let report = opt.step(&Cpu, params::<Cpu>(&mut bufs), total).unwrap();
    assert_eq!(opt.step, 51);
    assert!((report.lr_factor - c.lr_factor(51, total)).abs() < 1e-15);
}

#[test]
fn state_buffers_of_the_wrong_size_are_shape_errors() {
    let c = config().consts(10);
    let x = vec![1.0f32; 3];
    let mut state = optim_state::initial(2, 0);
    let mut scratch = vec![0.0; optim_state::scratch_len(2)];
    assert!(matches!(
        Cpu.optimizer_prepare(&[&x], 1, &c, &mut state, &mut scratch),
        Err(Error::Shape { operand: "state", .. })
    ));
    let mut state = optim_state::initial(1, 0);
    assert!(matches!(Cpu.optimizer_prepare(&[&x], 2, &c, &mut state, &mut scratch), Err(Error::Invalid { .. })));
}

/// The GPU's state and tensors after each step against the CPU twin's. The
/// GPU buffers are reset to the CPU's values after each comparison, so every
/// comparison is of one step from identical inputs. Step 3 has a NaN
/// gradient (refused on both), step 5 an infinite guard.
#[cfg(feature = "cuda")]
#[test]
fn gpu_state_path_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("gpu_state_path_matches_cpu") else { return };
    let (c, total) = (config(), 8);
    let consts = c.consts(total);
    let n = SIZES.len();
    let mut cpu = tensors(50, 3.0);
    let mut dev: Vec<[_; 4]> = cpu.iter().map(|b| [0, 1, 2, 3].map(|i| gpu.upload(&b[i]).unwrap())).collect::<Vec<_>>();
    let (mut state_c, mut scratch_c) = (optim_state::initial(n + 1, 0), vec![0.0; optim_state::scratch_len(n + 1)]);
    let mut state_g = gpu.upload(&state_c).unwrap();
    let mut scratch_g = gpu.zeros::<f64>(optim_state::scratch_len(n + 1)).unwrap();
    for step in 1..=6u32 {
        let mut guard = vec![0.5f32, -2.0, 1.0];
        if step == 5 {
            guard[1] = f32::INFINITY;
        }
        if step == 3 {
            cpu[0][1][7] = f32::NAN;
        } else if step == 4 {
            cpu[0][1][7] = 0.25;
        }
        for (b, d) in cpu.iter().zip(&mut dev) {
            for i in 0..4 {
                d[i] = gpu.upload(&b[i]).unwrap();
            }
        }
        let guard_g = gpu.upload(&guard).unwrap();
        {
            let mut xs: Vec<&Vec<f32>> = cpu.iter().map(|b| &b[1]).collect();
            xs.push(&guard);
            Cpu.optimizer_prepare(&xs, n, &consts, &mut state_c, &mut scratch_c).unwrap();
            let mut xs: Vec<_> = dev.iter().map(|b| &b[1]).collect();
            xs.push(&guard_g);
            gpu.optimizer_prepare(&xs, n, &consts, &mut state_g, &mut scratch_g).unwrap();
        }
        let rates: Vec<(f64, f64)> = GROUPS.iter().map(|&g| c.group(g)).collect();
        {
            let mut ts: Vec<AdamWTensor<'_, Cpu>> = cpu
                .iter_mut()
                .zip(&rates)
                .map(|([p, g, m, v], &(lr, weight_decay))| AdamWTensor { param: p, grad: &*g, m, v, lr, weight_decay })
                .collect();
            Cpu.adamw_many_device(&mut ts, &consts, &state_c).unwrap();
            let mut ts: Vec<AdamWTensor<'_, lorafuse::cuda::Gpu>> = dev
                .iter_mut()
                .zip(&rates)
                .map(|(b, &(lr, weight_decay))| {
                    let [p, g, m, v] = b;
                    AdamWTensor { param: p, grad: &*g, m, v, lr, weight_decay }
                })
                .collect();
            gpu.adamw_many_device(&mut ts, &consts, &state_g).unwrap();
        }
        let got = gpu.download(&state_g).unwrap();
        let ctx = format!("step {step}");
        use optim_state::*;
        for i in [ACCEPTED, STEP, FIRST_BAD] {
            assert_eq!(got[i], state_c[i], "{ctx}: header[{i}] {got:?} vs {state_c:?}");
        }
        assert_eq!(got[ACCEPTED], if step == 3 || step == 5 { 0.0 } else { 1.0 }, "{ctx}");
        for i in [NORM, SCALE, LR_FACTOR, CORRECTION1, CORRECTION2] {
            let (g, w) = (got[i], state_c[i]);
            assert!(
                g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-12 * w.abs(),
                "{ctx}: header[{i}] {g} vs {w}"
            );
        }
        let terms = SIZES.iter().sum();
        for (k, (b, d)) in cpu.iter().zip(&dev).enumerate() {
            for (what, i) in [("param", 0), ("m", 2), ("v", 3)] {
                check_f32(&format!("{ctx} tensor {k} {what}"), &gpu.download(&d[i]).unwrap(), &b[i], terms);
            }
        }
    }
}
