//! Training runs on the CPU: every adapter kind overfits a small batch,
//! bf16 mixed precision tracks f32, the per-op breakdown tiles a step, runs
//! are deterministic and resume bit-identically (also in sequential batch
//! order), non-finite steps are refused, bad configs fail before any work,
//! and AdamW and the schedules follow their formulas.

mod common;

use common::trainer::{fixed_stream, losses, overfit_config, small_base};
use lorafuse::cpu::Cpu;
use lorafuse::nn::NnOps;
use lorafuse::rng::Rng;
use lorafuse::testing::check_close;
use lorafuse::train::data::Dataset;
use lorafuse::train::model::Precision;
use lorafuse::train::trainer::{TrainConfig, Trainer};

#[test]
fn every_adapter_kind_overfits_a_small_batch() {
    // (method, loss after 150 steps must be below); the start is ≈ 9.5.
    // Thresholds sit ~30% above measured values (0.002, 0.63, 0.82, 1.35,
    // 1.57, 1.10) so a broken gradient (no descent) cannot pass.
    let cases =
        [("full", 0.05), ("lora", 0.9), ("tied:vBuA", 1.1), ("tied:BA", 1.8), ("vera", 2.1), ("unilora:1024", 1.5)];
    for (method, threshold) in cases {
        let mut t = Trainer::new(Cpu, small_base(1), fixed_stream(2), overfit_config(method, 150)).unwrap();
        let l = losses(&mut t, 150);
        let last = *l.last().unwrap();
        assert!(l[0] > 8.0, "{method}: initial loss {} (expected ≈ 9.5)", l[0]);
        assert!(
            last < threshold,
            "{method}: loss {last:.3} after 150 steps, threshold {threshold} (first {:.3})",
            l[0]
        );
    }
}

#[test]
fn bf16_mixed_precision_tracks_f32_and_still_learns() {
    // Same run in f32 and in bf16 (bf16 weights' working copy and GEMM
    // activations, f32 residual stream, masters, gradients, optimizer):
    // the losses agree to bf16's precision over the first steps, and the
    // bf16 run descends as far as the f32 one (within 25%).
    for method in ["full", "lora", "tied:vBuA", "unilora:1024"] {
        let steps = 40;
        let f32_cfg = overfit_config(method, steps);
        let bf16_cfg = TrainConfig { precision: Precision::Bf16, ..f32_cfg.clone() };
        let mut a = Trainer::new(Cpu, small_base(1), fixed_stream(2), f32_cfg).unwrap();
        let mut b = Trainer::new(Cpu, small_base(1), fixed_stream(2), bf16_cfg).unwrap();
        assert_eq!(b.model.precision(), Precision::Bf16);
        let (la, lb) = (losses(&mut a, steps), losses(&mut b, steps));
        let lb32: Vec<f32> = lb[..3].iter().map(|&v| v as f32).collect();
        check_close(&format!("{method}: bf16 vs f32 losses, first 3 steps, seed 3"), &lb32, &la[..3], 2e-2)
            .unwrap_or_else(|e| panic!("{e}"));
        // Identical losses would mean the bf16 path never ran.
        assert!(la[0] != lb[0], "{method}: bf16 step 0 loss is bit-identical to f32 ({})", la[0]);
        let (fa, fb) = (la[steps as usize - 1], lb[steps as usize - 1]);
        assert!(fb < la[0] * 0.7, "{method}: bf16 run did not learn: {:.3} -> {fb:.3}", lb[0]);
        assert!(fb < fa * 1.25 + 0.05, "{method}: bf16 ends at {fb:.3}, f32 at {fa:.3}");
    }
    assert!(Precision::parse("bf16").is_ok() && Precision::parse("f16").is_err());
}

#[test]
fn per_op_breakdown_accounts_for_a_whole_step() {
    use lorafuse::Backend;
    let mut t = Trainer::new(Cpu, small_base(1), fixed_stream(2), overfit_config("lora", 3)).unwrap();
    t.step().unwrap();
    Cpu.op_timing_start().unwrap();
    let start = std::time::Instant::now();
    t.step().unwrap();
    let wall = start.elapsed().as_secs_f64() * 1e3;
    let b = Cpu.op_timing_finish().unwrap();
    let labels: Vec<&str> = b.ops.iter().map(|o| o.0).collect();
    for want in ["fwd attention", "bwd attention", "fwd attn.c_attn", "bwd mlp.c_proj", "cross_entropy", "optimizer"] {
        assert!(labels.contains(&want), "breakdown lacks `{want}`: {labels:?}");
    }
    // Two layers: each block op is timed twice per step.
    let attn = b.ops.iter().find(|o| o.0 == "fwd attention").unwrap();
    assert_eq!(attn.2, 2, "{b:?}");
    // The marks tile the step: their sum is the step's wall time, less the
    // sliver before the first mark and after the last.
    let total = b.total_ms();
    assert!(total <= wall * 1.01 + 0.05 && total >= wall * 0.8, "breakdown {total:.3} ms vs step {wall:.3} ms");
    // Off again: no marks are kept.
    t.step().unwrap();
    assert!(Cpu.op_timing_finish().unwrap().ops.is_empty());
}

#[test]
fn training_is_deterministic_and_resumes_bit_identically() {
    let dir = std::env::temp_dir().join(format!("lorafuse-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = || Dataset::embedded(&["add", "recall"], 64, 8, 5).unwrap();
    for method in ["lora", "tied:vBuA", "unilora:300", "full"] {
        let mut cfg = overfit_config(method, 8);
        cfg.batch = 3;
        let snapshot = |t: &mut Trainer<Cpu>| -> Vec<Vec<f32>> {
            let mut v: Vec<Vec<f32>> = match t.adapters.as_mut() {
                Some(a) => a.trainable().into_iter().map(|(_, _, p, _)| p.clone()).collect(),
                None => t.model.params.clone(),
            };
            v.extend(t.optimizer.moments.iter().flat_map(|(_, m, v)| [m.clone(), v.clone()]));
            v
        };
        let mut straight = Trainer::new(Cpu, small_base(4), data(), cfg.clone()).unwrap();
        let all = losses(&mut straight, 8);
        let mut again = Trainer::new(Cpu, small_base(4), data(), cfg.clone()).unwrap();
        assert_eq!(losses(&mut again, 8), all, "{method}: two runs with one seed differ");

        let mut first = Trainer::new(Cpu, small_base(4), data(), cfg.clone()).unwrap();
        let head = losses(&mut first, 5);
        let root = dir.join(method.replace(':', "_"));
        first.checkpoint(&root, 2).unwrap();
        drop(first);
        let ckpt = lorafuse::train::checkpoint::latest_checkpoint(&root).unwrap();
        let mut resumed = Trainer::resume(Cpu, small_base(4), data(), &ckpt).unwrap();
        let tail = losses(&mut resumed, 3);
        assert_eq!([head, tail].concat(), all, "{method}: resumed losses differ from the straight run");
        assert!(snapshot(&mut resumed) == snapshot(&mut straight), "{method}: resumed parameters differ in some bit");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_finite_steps_are_refused_and_repeated_failures_stop_the_run() {
    let mut cfg = overfit_config("lora", 20);
    cfg.max_bad_steps = 3;
    let mut t = Trainer::new(Cpu, small_base(1), fixed_stream(2), cfg).unwrap();
    t.step().unwrap();
    let before: Vec<Vec<f32>> =
        t.adapters.as_mut().unwrap().trainable().into_iter().map(|(_, _, p, _)| p.clone()).collect();
    // Poison the frozen base: every loss is NaN from now on.
    t.model.params[2][0] = f32::NAN;
    for i in 0..2 {
        let o = t.step().unwrap();
        assert!(o.report.is_none() && o.refused.is_some(), "step {i} accepted with a NaN loss: {o:?}");
    }
    let after: Vec<Vec<f32>> =
        t.adapters.as_mut().unwrap().trainable().into_iter().map(|(_, _, p, _)| p.clone()).collect();
    assert!(before == after, "a refused step changed parameters");
    let err = t.step().unwrap_err().to_string();
    assert!(err.contains("3 consecutive steps were refused"), "{err}");
}

#[test]
fn bad_run_configs_fail_before_any_work() {
    let msg =
        |cfg: TrainConfig| Trainer::new(Cpu, small_base(1), fixed_stream(2), cfg).err().expect("accepted").to_string();
    let base = overfit_config("lora", 5);
    assert!(msg(TrainConfig { rank: 0, ..base.clone() }).contains("r = 0"));
    assert!(msg(TrainConfig { rank: 40, ..base.clone() }).contains("min(K, N)"));
    assert!(msg(TrainConfig { targets: vec!["attn.q_proj".into()], ..base.clone() }).contains("known modules"));
    assert!(msg(TrainConfig { seq: 33, ..base.clone() }).contains("n_positions"));
    assert!(msg(TrainConfig { method: "dora".into(), ..base.clone() }).contains("known methods"));
    let mut bad_lr = base.clone();
    bad_lr.optim.lr = f64::NAN;
    assert!(msg(bad_lr).contains("optimizer lr"));
    // Examples longer than the rows are rejected too.
    let short = TrainConfig { seq: 8, ..base };
    let data = Dataset::embedded(&["sort"], 4, 2, 1).unwrap();
    let err = Trainer::new(Cpu, small_base(1), data, short).err().unwrap().to_string();
    assert!(err.contains("shorter than an example"), "{err}");
}

#[test]
fn sequential_runs_resume_in_the_same_batch_order() {
    let dir = std::env::temp_dir().join(format!("lorafuse-seq-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut rng = Rng::new(21);
    let tokens: Vec<u32> = (0..600).map(|_| 32 + rng.below(64) as u32).collect();
    let data = || Dataset::stream("seq", tokens.clone(), 256).unwrap();
    let mut cfg = overfit_config("lora", 6);
    cfg.sequential_batches = true;
    cfg.seq = 16;
    let all = losses(&mut Trainer::new(Cpu, small_base(4), data(), cfg.clone()).unwrap(), 6);
    // Different windows per step: the order really moves on.
    assert!(all.windows(2).all(|w| w[0] != w[1]), "{all:?}");
    let mut first = Trainer::new(Cpu, small_base(4), data(), cfg.clone()).unwrap();
    let head = losses(&mut first, 4);
    first.checkpoint(&dir, 1).unwrap();
    let ckpt = lorafuse::train::checkpoint::latest_checkpoint(&dir).unwrap();
    let mut resumed = Trainer::resume(Cpu, small_base(4), data(), &ckpt).unwrap();
    assert!(resumed.config.sequential_batches, "the checkpoint keeps the batch order");
    assert_eq!([head, losses(&mut resumed, 2)].concat(), all, "resumed sequential run differs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adamw_matches_the_formula_and_schedules_have_their_shape() {
    use lorafuse::nn::AdamWStep;
    use lorafuse::train::optimizer::{OptimConfig, Schedule};
    let (mut p, g) = (common::random(1, 9), common::random(2, 9));
    let (mut m, mut v) = (common::random(3, 9), common::random(4, 9).iter().map(|x| x.abs()).collect::<Vec<f32>>());
    let hp = AdamWStep { lr: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-6, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
    let want: Vec<f64> = (0..9)
        .map(|i| {
            let gi = g[i] as f64 * 0.5;
            let mi = 0.8 * m[i] as f64 + 0.2 * gi;
            let vi = 0.95 * v[i] as f64 + 0.05 * gi * gi;
            let (mh, vh) = (mi / (1.0 - 0.8f64.powi(3)), vi / (1.0 - 0.95f64.powi(3)));
            let p0 = p[i] as f64 * (1.0 - 0.01 * 0.1);
            p0 - 0.01 * mh / (vh.sqrt() + 1e-6)
        })
        .collect();
    Cpu.adamw(&mut p, &g, &mut m, &mut v, &hp).unwrap();
    check_close("adamw len=9 step=3 seed=1..4", &p, &want, 1e-6).unwrap();
    assert!(Cpu.adamw(&mut p, &g, &mut m, &mut v, &AdamWStep { step: 0, ..hp }).is_err());

    let c = OptimConfig { warmup: 10, min_lr_ratio: 0.1, ..OptimConfig::default() };
    assert!((c.lr_factor(5, 100) - 0.5).abs() < 1e-12, "warmup is linear");
    assert!((c.lr_factor(10, 100) - 1.0).abs() < 1e-12);
    assert!((c.lr_factor(100, 100) - 0.1).abs() < 1e-12, "cosine ends at min_lr_ratio");
    assert!((c.lr_factor(55, 100) - 0.55).abs() < 1e-12, "cosine midpoint");
    let lin = OptimConfig { schedule: Schedule::Linear, ..c.clone() };
    assert!((lin.lr_factor(55, 100) - 0.55).abs() < 1e-12 && (lin.lr_factor(100, 100) - 0.1).abs() < 1e-12);
}

#[test]
fn the_cpu_ignores_graph_replay_and_steps_the_same() {
    // The CPU has no queue to record: `graph` changes nothing, bit for bit,
    // and no capture, replay or refusal to replay is reported.
    let cfg = overfit_config("lora", 4);
    let mut plain = Trainer::new(Cpu, small_base(1), fixed_stream(2), cfg.clone()).unwrap();
    let mut graph = Trainer::new(Cpu, small_base(1), fixed_stream(2), TrainConfig { graph: true, ..cfg }).unwrap();
    let (a, b) = (losses(&mut plain, 4), losses(&mut graph, 4));
    assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    assert_eq!(graph.graph_status(), &lorafuse::train::trainer::GraphStatus::default());
}

#[test]
fn a_fixed_batch_is_rewritten_in_place_and_checks_its_lengths() {
    use lorafuse::nn::SeqShape;
    use lorafuse::train::model::Batch;
    let shape = SeqShape { batch: 2, seq: 3 };
    let mut b = Batch::zeros(&Cpu, shape).unwrap();
    assert_eq!(b.scored(), 6);
    b.write(&Cpu, &[1, 2, 3, 4, 5, 6], &[2, 3, lorafuse::nn::IGNORE, 5, 6, 7]).unwrap();
    let (tokens, targets) = (b.tokens(), b.targets());
    assert_eq!((tokens.device.as_slice(), tokens.host), (&[1, 2, 3, 4, 5, 6][..], &[1, 2, 3, 4, 5, 6][..]));
    assert_eq!(targets.device, &vec![2, 3, lorafuse::nn::IGNORE, 5, 6, 7]);
    assert_eq!(b.scored(), 5);
    let err = b.write(&Cpu, &[1, 2, 3], &[1, 2, 3]).unwrap_err().to_string();
    assert!(err.contains("tokens"), "{err}");
}
