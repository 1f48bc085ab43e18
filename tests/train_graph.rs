//! Graph replay of the training step on the GPU ([`TrainConfig::graph`]):
//! a run that captures its second step and replays it afterwards gives the
//! same losses, reports and parameters, bit for bit, as the same run
//! stepped eagerly, through a refused step, a profiling step, a batch
//! whose token ids change every step and answer-only batches whose scored
//! count (the loss gradient's scale) changes every step.
//!
//! Why bitwise: a replay launches the very kernels (same grids, same
//! arguments, same cuBLAS algorithms: the handle's workspace is the same
//! fixed size in both runs) in the very order of an eager step, and every
//! kernel the LoRA and full fine-tuning paths run reduces in a fixed order
//! (no floating-point atomics; the token embedding's gradient sums rows
//! grouped by a stable sort on the device; the projection kernels of
//! Uni-LoRA have float atomics, which is why it is not among the cases).
//! Any difference is a replay reading something other than what the eager
//! step reads: stale token ids, a stale loss scale, a freed buffer.
//!
//! Each test prints `skipped:` without a GPU.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;

use common::gpu_or_skip;
use common::trainer::{overfit_config, small_base};
use lorafuse::cpu::Cpu;
use lorafuse::cuda::Gpu;
use lorafuse::rng::Rng;
use lorafuse::train::data::{Corpus, Dataset};
use lorafuse::train::model::{Gpt2, Precision};
use lorafuse::train::trainer::{StepOutcome, TrainConfig, Trainer, GRAPH_WARMUP_STEPS};
use lorafuse::Backend;

/// A 4,000-token stream: random windows of 32 differ from step to step, so
/// every step's batch has other token ids than the last.
fn varied_stream(seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let tokens: Vec<u32> = (0..4000).map(|_| 32 + rng.below(200) as u32).collect();
    Dataset { name: "varied".into(), vocab: 256, train: Corpus::Stream(tokens.clone()), eval: Corpus::Stream(tokens) }
}

/// Held by each test: a capture must not overlap another test's context
/// creation on this device (a new context wrapper synchronises the whole
/// context, the capturing stream included).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The small base saved once and loaded onto each GPU handle.
struct Base(PathBuf);

impl Base {
    fn new(test: &str) -> Self {
        let root = std::env::temp_dir().join(format!("lorafuse-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        small_base(7).save(&Cpu, &root).unwrap();
        Base(root)
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything a step says, as bits.
fn bits(o: &StepOutcome) -> (u64, u64, Option<(u64, u64, bool)>, bool) {
    let report = o.report.map(|r| (r.grad_norm.to_bits(), r.lr_factor.to_bits(), r.clipped));
    (o.iteration, o.loss.to_bits(), report, o.refused.is_some())
}

/// The trainable tensors, downloaded.
fn trainable(t: &mut Trainer<Gpu>) -> Vec<(String, Vec<f32>)> {
    let gpu = t.backend.clone();
    t.adapters
        .as_mut()
        .expect("an adapter run")
        .trainable()
        .into_iter()
        .map(|(name, _, p, _)| (name, gpu.download(p).unwrap()))
        .collect()
}

/// Writes `value` into element 0 of base parameter `index` in place (same
/// buffer, so a replayed graph sees it), returning what was there.
fn poke(t: &mut Trainer<Gpu>, index: usize, value: f32) -> f32 {
    let gpu = t.backend.clone();
    let mut host = gpu.download(&t.model.params[index]).unwrap();
    let old = std::mem::replace(&mut host[0], value);
    gpu.upload_into(&host, &mut t.model.params[index]).unwrap();
    old
}

/// Runs `steps` steps of `cfg` on `data` with the LM head in chunks of
/// `lm_head_rows` rows (`None`: automatic), returning the trainer and what
/// each step said.
fn plain_run(
    gpu: &Gpu,
    base: &Base,
    data: &Dataset,
    cfg: &TrainConfig,
    steps: u64,
    lm_head_rows: Option<usize>,
) -> (Trainer<Gpu>, Vec<StepOutcome>) {
    let mut model = Gpt2::load(gpu, &base.0).unwrap();
    model.set_lm_head_rows(lm_head_rows).unwrap();
    let mut t = Trainer::new(gpu.clone(), model, data.clone(), cfg.clone()).unwrap();
    let out = (0..steps).map(|_| t.step().unwrap()).collect();
    (t, out)
}

/// One run of `steps` steps: at step `poison` the base's parameter 2 (a
/// LayerNorm weight of block 0) is NaN, so the loss and every gradient are
/// NaN and the step must be refused; at step `profile` op timing is on.
fn run(
    gpu: &Gpu,
    base: &Base,
    cfg: &TrainConfig,
    steps: u64,
    poison: u64,
    profile: u64,
) -> (Trainer<Gpu>, Vec<StepOutcome>) {
    let model = Gpt2::load(gpu, &base.0).unwrap();
    let mut t = Trainer::new(gpu.clone(), model, varied_stream(5), cfg.clone()).unwrap();
    let mut out = Vec::new();
    for i in 0..steps {
        let saved = (i == poison).then(|| poke(&mut t, 2, f32::NAN));
        if i == profile {
            gpu.op_timing_start().unwrap();
        }
        out.push(t.step().unwrap());
        if i == profile {
            let ops = gpu.op_timing_finish().unwrap();
            let labels: Vec<&str> = ops.ops.iter().map(|o| o.0).collect();
            // Per-op marks come from an eager step, so they name the ops.
            assert!(labels.contains(&"fwd attention"), "profiling step {i} has no per-op marks: {labels:?}");
        }
        if let Some(v) = saved {
            poke(&mut t, 2, v);
        }
    }
    (t, out)
}

#[test]
fn gpu_replayed_steps_are_bit_identical_to_eager_steps() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(eager_gpu) = gpu_or_skip("gpu_replayed_steps_are_bit_identical_to_eager_steps") else { return };
    // Its own handle (and context wrapper): capture turns off the context's
    // event tracking, which the eager run must not depend on.
    let graph_gpu = Gpu::new(0).unwrap();
    let base = Base::new("train-graph");
    let (steps, profile) = (9, 6);
    for precision in [Precision::F32, Precision::Bf16] {
        // In bf16 the forward reads the base's working copy, not the f32
        // weight `poke` writes: the refused step is exercised in f32.
        let poison = if precision == Precision::F32 { 4 } else { u64::MAX };
        let eager_cfg = TrainConfig { precision, ..overfit_config("lora", steps) };
        let graph_cfg = TrainConfig { graph: true, ..eager_cfg.clone() };
        let (mut e, eager) = run(&eager_gpu, &base, &eager_cfg, steps, poison, u64::MAX);
        let (mut g, graph) = run(&graph_gpu, &base, &graph_cfg, steps, poison, profile);

        // The ids really change from step to step (the replay re-reads the
        // fixed buffers rather than the ids it was captured with).
        let mut rng = Rng::new(eager_cfg.seed ^ 0xDA7A);
        let data = varied_stream(5);
        let (b0, b1) = (data.sample(&mut rng, 2, 32, false), data.sample(&mut rng, 2, 32, false));
        assert_ne!(b0.tokens, b1.tokens, "consecutive batches have the same ids");

        let status = g.graph_status().clone();
        assert_eq!(status.off, None, "{precision}: graph replay turned itself off");
        assert_eq!(status.captures, 1, "{precision}: {status:?}");
        // Warm-up and the profiling step run eagerly, the capture step runs
        // by one replay that is not counted, every other step replays.
        let want_replays = steps - GRAPH_WARMUP_STEPS as u64 - 1 - 1;
        assert_eq!(status.replays, want_replays, "{precision}: {status:?}");
        if let Some(o) = graph.get(poison as usize) {
            assert!(o.refused.is_some(), "{precision}: the NaN step was accepted: {o:?}");
        }
        for (i, (a, b)) in eager.iter().zip(&graph).enumerate() {
            assert_eq!(bits(a), bits(b), "{precision}: step {i} differs: eager {a:?}, graph {b:?}");
        }
        for ((name, a), (_, b)) in trainable(&mut e).into_iter().zip(trainable(&mut g)) {
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{precision}: `{name}` differs after {steps} steps");
        }
        // Evaluating in between drops the graph; the next steps capture anew
        // and still match.
        let (me, mg) = (e.evaluate().unwrap(), g.evaluate().unwrap());
        assert_eq!(me.loss.to_bits(), mg.loss.to_bits(), "{precision}: evaluation differs");
        for i in 0..3 {
            let (a, b) = (e.step().unwrap(), g.step().unwrap());
            assert_eq!(bits(&a), bits(&b), "{precision}: step {i} after evaluation differs");
        }
        assert_eq!(g.graph_status().captures, 2, "{precision}: {:?}", g.graph_status());
    }
}

/// Every base parameter, downloaded (full fine-tuning trains them all).
fn base_params(t: &Trainer<Gpu>) -> Vec<Vec<f32>> {
    t.model.params.iter().map(|p| t.backend.download(p).unwrap()).collect()
}

/// Full fine-tuning replays too: the token embedding's gradient groups the
/// step's ids on the device, so a replay over new ids regroups them, and
/// the optimizer over every parameter and the bf16 working copy's refresh
/// run on fixed buffers. Same schedule as the LoRA test: warm-up, capture,
/// replays through a refused step and a profiling step, then an
/// evaluation and a second capture.
#[test]
fn gpu_full_fine_tuning_replays_bit_identical_to_eager_steps() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(eager_gpu) = gpu_or_skip("gpu_full_fine_tuning_replays_bit_identical_to_eager_steps") else {
        return;
    };
    let graph_gpu = Gpu::new(0).unwrap();
    let base = Base::new("train-graph-full");
    let (steps, profile) = (8, 5);
    for precision in [Precision::F32, Precision::Bf16] {
        let poison = if precision == Precision::F32 { 3 } else { u64::MAX };
        let eager_cfg = TrainConfig { precision, ..overfit_config("full", steps) };
        let graph_cfg = TrainConfig { graph: true, ..eager_cfg.clone() };
        let (mut e, eager) = run(&eager_gpu, &base, &eager_cfg, steps, poison, u64::MAX);
        let (mut g, graph) = run(&graph_gpu, &base, &graph_cfg, steps, poison, profile);

        let status = g.graph_status().clone();
        assert_eq!(status.off, None, "full {precision}: graph replay turned itself off");
        assert_eq!(status.captures, 1, "full {precision}: {status:?}");
        let want_replays = steps - GRAPH_WARMUP_STEPS as u64 - 1 - 1;
        assert_eq!(status.replays, want_replays, "full {precision}: {status:?}");
        if let Some(o) = graph.get(poison as usize) {
            assert!(o.refused.is_some(), "full {precision}: the NaN step was accepted: {o:?}");
        }
        for (i, (a, b)) in eager.iter().zip(&graph).enumerate() {
            assert_eq!(bits(a), bits(b), "full {precision}: step {i} differs: eager {a:?}, graph {b:?}");
        }
        let names = Gpt2::<Gpu>::param_specs(&e.model.config);
        for ((spec, a), b) in names.iter().zip(base_params(&e)).zip(base_params(&g)) {
            let same = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "full {precision}: `{}` differs after {steps} steps", spec.name);
        }
        let (me, mg) = (e.evaluate().unwrap(), g.evaluate().unwrap());
        assert_eq!(me.loss.to_bits(), mg.loss.to_bits(), "full {precision}: evaluation differs");
        for i in 0..3 {
            let (a, b) = (e.step().unwrap(), g.step().unwrap());
            assert_eq!(bits(&a), bits(&b), "full {precision}: step {i} after evaluation differs");
        }
        assert_eq!(g.graph_status().captures, 2, "full {precision}: {:?}", g.graph_status());
    }
}

#[test]
fn gpu_answer_only_batches_of_any_scored_count_replay_and_match_eager() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let name = "gpu_answer_only_batches_of_any_scored_count_replay_and_match_eager";
    let Some(eager_gpu) = gpu_or_skip(name) else { return };
    let graph_gpu = Gpu::new(0).unwrap();
    let base = Base::new("train-graph-answers");
    // Loss on answers only: the scored count, and so the loss gradient's
    // scale 1/count, changes from batch to batch. The scale is counted on
    // the device at every replay, so one captured step serves them all; a
    // replay that kept the captured batch's scale would differ from the
    // eager step on every batch of another count.
    let data = Dataset::embedded(&["sort", "reverse"], 64, 8, 3).unwrap();
    let steps = 12;
    // 64 tokens a batch: in one piece, and in chunks of 24 rows (24, 24,
    // 16), whose logits, targets and dlnf rows move by range copies inside
    // the captured step.
    for (precision, rows) in [(Precision::F32, None), (Precision::Bf16, None), (Precision::Bf16, Some(24))] {
        let what = format!("{precision}, lm_head_rows {rows:?}");
        let cfg = TrainConfig { answer_only: true, precision, ..overfit_config("lora", steps) };
        let (mut e, eager) = plain_run(&eager_gpu, &base, &data, &cfg, steps, rows);
        let (mut g, graph) = plain_run(&graph_gpu, &base, &data, &TrainConfig { graph: true, ..cfg }, steps, rows);
        let counts: Vec<usize> = eager.iter().map(|o| o.tokens).collect();
        let captured = counts[GRAPH_WARMUP_STEPS as usize];
        let others = counts[GRAPH_WARMUP_STEPS as usize + 1..].iter().filter(|&&c| c != captured).count();
        assert!(others > 0, "{what}: every replayed batch scores the captured count: {counts:?}");
        for (i, (a, b)) in eager.iter().zip(&graph).enumerate() {
            assert_eq!(bits(a), bits(b), "{what}: answer-only step {i} differs (scored {})", a.tokens);
        }
        for ((name, a), (_, b)) in trainable(&mut e).into_iter().zip(trainable(&mut g)) {
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{what}: `{name}` differs after {steps} answer-only steps");
        }
        let s = g.graph_status();
        assert_eq!(s.off, None, "{what}: {s:?}");
        // Warm-up eager, the capture step runs by one uncounted replay,
        // every later step replays whatever it scores.
        let want = steps - GRAPH_WARMUP_STEPS as u64 - 1;
        assert_eq!((s.captures, s.replays), (1, want), "{what}: scored counts {counts:?}: {s:?}");
    }
}
