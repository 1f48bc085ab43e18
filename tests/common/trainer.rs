//! Fixtures of the trainer tests (tests/train_*.rs, tests/cli_train.rs):
//! a small frozen base model, a fixed token stream, the overfitting run's
//! settings, and step-0 gradients on any backend.

use lorafuse::cpu::Cpu;
use lorafuse::nn::SeqShape;
use lorafuse::rng::Rng;
use lorafuse::train::adapters::{AdapterSet, AdapterSpec, Method};
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::data::{Corpus, Dataset};
use lorafuse::train::model::{Batch, Gpt2, Precision};
use lorafuse::train::module::Module;
use lorafuse::train::trainer::{TrainConfig, Trainer};
use lorafuse::train::TrainBackend;

/// A fixed 33-token stream: every training batch is the same window.
pub fn fixed_stream(seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let tokens: Vec<u32> = (0..33).map(|_| 32 + rng.below(64) as u32).collect();
    Dataset { name: "fixed".into(), vocab: 256, train: Corpus::Stream(tokens.clone()), eval: Corpus::Stream(tokens) }
}

pub fn small_base(seed: u64) -> Gpt2<Cpu> {
    let cfg = Gpt2Config::new(256, 32, 32, 2, 2).unwrap();
    let mut m = Gpt2::<Cpu>::random(&Cpu, &cfg, seed).unwrap();
    // A frozen random base with GPT-2's tiny init caps the logits near ±0.6
    // (LM head tied to a std-0.02 embedding), so no adapter could fit
    // anything: give the embedding a trained model's scale instead.
    m.params[0].iter_mut().for_each(|v| *v *= 15.0);
    m
}

pub fn overfit_config(method: &str, steps: u64) -> TrainConfig {
    let mut c = TrainConfig {
        method: method.into(),
        rank: 4,
        alpha: 8.0,
        steps,
        batch: 2,
        seq: 32,
        seed: 3,
        ..TrainConfig::default()
    };
    c.optim.warmup = 5;
    c.optim.lr = 2e-2;
    c.optim.lr_vector = 1e-1;
    c.optim.lr_theta = 2e-2;
    c.optim.lr_base = 1e-2;
    c
}

/// Runs `steps` iterations and returns the losses.
pub fn losses<B: TrainBackend>(t: &mut Trainer<B>, steps: u64) -> Vec<f64> {
    (0..steps).map(|_| t.step().unwrap().loss).collect()
}

/// The step-0 gradient of every parameter (name, values) of `model` on a
/// fixed 4-row batch, in `precision`, with the batch rows in `order`: the
/// mean loss, and so every gradient, is the same in exact arithmetic for any
/// order; only the order of the sums over tokens changes.
pub fn step0_grads<B: TrainBackend>(
    b: &B,
    mut model: Gpt2<B>,
    precision: Precision,
    order: [usize; 4],
) -> Vec<(String, Vec<f32>)> {
    model.set_precision(b, precision).unwrap();
    model.enable_full_grads(b).unwrap();
    let seq = 32;
    let mut rng = Rng::new(11);
    let stream: Vec<u32> = (0..4 * seq + 1).map(|_| 32 + rng.below(64) as u32).collect();
    let (mut tokens, mut targets) = (Vec::new(), Vec::new());
    for &row in &order {
        tokens.extend_from_slice(&stream[row * seq..(row + 1) * seq]);
        targets.extend_from_slice(&stream[row * seq + 1..(row + 1) * seq + 1]);
    }
    let batch = Batch::upload(b, SeqShape { batch: 4, seq }, &tokens, &targets).unwrap();
    model.run(b, None, &batch, true).unwrap();
    let grads = model.grads.as_ref().unwrap();
    Gpt2::<B>::param_specs(&model.config)
        .into_iter()
        .zip(grads)
        .map(|(spec, g)| (spec.name, lorafuse::Backend::download(b, g).unwrap()))
        .collect()
}

pub fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |m, &e| m.max(e.abs() as f64))
}

/// A LoRA adapter on `small_base` with nonzero `B` (so it changes the loss).
pub fn nonzero_lora(seed: u64) -> AdapterSet<Cpu> {
    let spec = AdapterSpec { method: Method::Lora, rank: 2, alpha: 4.0, targets: Module::ALL.to_vec(), seed };
    let mut set = AdapterSet::new(&Cpu, &small_base(3).config, &spec).unwrap();
    let mut rng = Rng::new(seed ^ 0xB);
    for m in set.mats.iter_mut().filter(|m| m.name.ends_with("lora_B")) {
        m.data = rng.uniform_vec(m.data.len(), -0.05, 0.05);
    }
    set
}

/// Every tensor of a saved adapter (or model), by name, as f32.
pub fn saved_tensors(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let file = ["adapter_model.safetensors", "model.safetensors"].iter().map(|f| dir.join(f)).find(|p| p.exists());
    let file = lorafuse::tensor_file::read_safetensors(&file.expect("nothing saved")).unwrap();
    file.tensors.iter().map(|(name, t)| (name.clone(), t.to_f32_vec(name).unwrap())).collect()
}
