//! The summation experiment: do summed adapters interfere, and does the
//! cosine between them predict by how much?
//!
//! After Cao, Truong & Lizarraga (2025): for `n` domains it trains
//!
//! - one adapter per domain, on that domain's training set, and
//! - one adapter per combination of `k` domains (pairs, or triples), on the
//!   members' training sets together,
//!
//! every one for the same number of steps from its own initialisation
//! (derived from [`SummationConfig::init_seed`] and the adapter's label,
//! so domains do not share `A` at step 0 and the cosine is not inflated by
//! a common start; [`SummationConfig::same_init`] asks for a shared one).
//! For each combination it then forms the exact sum of the members'
//! single-domain adapters ([`crate::adapter_sum::concat_sum`]), scores the
//! sum and the merged-data adapter on each member's held-out set, and
//! reports the relative perplexity change `(ppl_sum − ppl_merged) /
//! ppl_merged` per member and averaged (positive: the sum is worse). The
//! interference measure is the RMS of the per-module cosines of the
//! members' `ΔW` ([`crate::adapter_sum::similarity`]; over every pair of
//! members for triples). A line is fitted through (RMS cosine, mean
//! change) across combinations.
//!
//! Every finished adapter is saved under `out/adapters/<label>/` with a
//! `done.json` record; a rerun with the same settings loads it instead of
//! training it again. An adapter interrupted mid-training continues from
//! its latest checkpoint (`out/checkpoints/<label>/`). `out/experiment.json`
//! holds the settings and data fingerprints: a rerun with other settings
//! into the same directory is refused rather than mixing two experiments.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::domains::{check_held_out_disjoint, combined, fingerprint, Domain};
use super::stats::{combinations, linear_fit, LinearFit};
use crate::adapter::Adapter;
use crate::adapter_sum::{concat_sum, similarity};
use crate::atomic_file::write_atomic;
use crate::peft::{load_adapter, save_adapter};
use crate::train::adapters::{AdapterSet, Method};
use crate::train::checkpoint::latest_checkpoint;
use crate::train::config::Gpt2Config;
use crate::train::data::{Dataset, EvalMetrics};
use crate::train::model::{Gpt2, Precision};
use crate::train::trainer::{evaluate, TrainConfig, Trainer};
use crate::train::TrainBackend;
use crate::{Error, Result};

/// The experiment's settings (written to `out/experiment.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SummationConfig {
    /// Domains per combination: 2 (pairs) or 3 (triples).
    pub arity: usize,
    /// How every adapter trains: method, rank, α, targets, `steps` (the
    /// budget of each adapter, single or merged), batch, seq, data `seed`,
    /// optimizer, precision. Its `init_seed` is replaced per adapter.
    pub train: TrainConfig,
    /// The seed each adapter's initialisation seed is derived from.
    pub init_seed: u64,
    /// Start every adapter from the same initialisation (`init_seed`
    /// itself) instead of one per adapter: shows how much a shared start
    /// adds to the cosine.
    pub same_init: bool,
    /// Held-out examples (or windows) scored per domain.
    pub eval_examples: usize,
    /// Checkpoint a training adapter every this many iterations (0: only
    /// finished adapters are kept).
    pub checkpoint_every: u64,
}

impl SummationConfig {
    /// Rejects settings that cannot make an experiment, before any work.
    pub fn validate(&self, domains: usize) -> Result<()> {
        if !(2..=3).contains(&self.arity) {
            return Err(Error::invalid("combination size", format!("{}: use 2 (pairs) or 3 (triples)", self.arity)));
        }
        if domains < self.arity {
            return Err(Error::invalid(
                "domains",
                format!("{domains} given but combinations of {} need at least {}", self.arity, self.arity),
            ));
        }
        if Method::parse(&self.train.method)? == Method::Full {
            return Err(Error::invalid("method", "full fine-tuning has no adapter to sum; use lora, tied, vera, …"));
        }
        if self.eval_examples == 0 {
            return Err(Error::invalid("eval examples", "must be at least 1"));
        }
        Ok(())
    }

    /// The initialisation seed of the adapter labelled `label`.
    pub fn init_seed_for(&self, label: &str) -> u64 {
        if self.same_init {
            return self.init_seed;
        }
        let h = label.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
        crate::projection::mix64(self.init_seed ^ h)
    }
}

/// The adapter label of a set of domains: their names joined by `+`.
pub fn label(domains: &[&Domain]) -> String {
    domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join("+")
}

/// What the run reports while it works (every method has a silent default).
pub trait Progress {
    /// A stage begins (a line of text).
    fn stage(&mut self, _message: &str) {}
    /// Adapter `index` of `total` starts training (or continues from
    /// iteration `from`) for `steps` iterations.
    fn adapter_start(&mut self, _index: usize, _total: usize, _label: &str, _steps: u64, _from: u64) {}
    /// One iteration finished, with the running mean of the training loss.
    fn step(&mut self, _iteration: u64, _loss: f64) {}
    /// An adapter is finished; `reused` when it was loaded from a
    /// previous run instead of trained.
    fn adapter_done(&mut self, _record: &AdapterRecord, _reused: bool) {}
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// One trained adapter (its `done.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterRecord {
    /// `add`, `add+sort`, …
    pub label: String,
    /// The domains it trained on.
    pub domains: Vec<String>,
    /// Its initialisation seed.
    pub init_seed: u64,
    /// Iterations trained.
    pub steps: u64,
    /// Running mean of the training loss at the end.
    pub final_loss: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// Seconds of training (in the session that finished it).
    pub seconds: f64,
}

/// One member domain of a combination, scored four ways on its held-out set.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemberResult {
    /// The domain.
    pub domain: String,
    /// The base model, no adapter.
    pub base: EvalMetrics,
    /// The domain's own single-domain adapter.
    pub single: EvalMetrics,
    /// The adapter trained on the combination's merged data.
    pub merged: EvalMetrics,
    /// The exact sum of the members' single-domain adapters.
    pub sum: EvalMetrics,
    /// `100 · (ppl_sum − ppl_merged) / ppl_merged`.
    pub change_percent: f64,
}

/// The RMS cosine of one pair of single-domain adapters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairCosine {
    /// First domain.
    pub a: String,
    /// Second domain.
    pub b: String,
    /// RMS over shared modules of `cos(ΔW_a, ΔW_b)`.
    pub rms_cosine: f64,
    /// Mean of the per-module cosines (signed).
    pub mean_cosine: f64,
}

/// One combination's results.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CombinationResult {
    /// `add+sort`, …
    pub label: String,
    /// Its member domains.
    pub domains: Vec<String>,
    /// RMS of the per-module cosines over every pair of members.
    pub rms_cosine: f64,
    /// Each pair's numbers.
    pub pairs: Vec<PairCosine>,
    /// Each member's scores.
    pub members: Vec<MemberResult>,
    /// The mean of the members' `change_percent`.
    pub mean_change_percent: f64,
}

/// One domain of the run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DomainInfo {
    /// Its name.
    pub name: String,
    /// Where its data came from.
    pub data: String,
    /// Fingerprint of its tokens.
    pub fingerprint: String,
}

/// Everything the experiment found (`report.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The settings.
    pub config: SummationConfig,
    /// The base model's directory.
    pub base_model: String,
    /// The base model's shape.
    pub model_config: Gpt2Config,
    /// Where it ran.
    pub device: String,
    /// The domains.
    pub domains: Vec<DomainInfo>,
    /// Every adapter, singles first.
    pub adapters: Vec<AdapterRecord>,
    /// Every combination.
    pub combinations: Vec<CombinationResult>,
    /// Mean change against RMS cosine, across combinations (`None` with
    /// fewer than two combinations or no spread in the cosine).
    pub fit: Option<LinearFit>,
    /// Seconds of the whole run (this session).
    pub seconds: f64,
}

/// Trains until `t.config.steps`, checkpointing under `ckpt` every
/// `every` iterations; returns the running-mean loss at the end.
fn train_loop<B: TrainBackend>(
    t: &mut Trainer<B>,
    ckpt: &Path,
    every: u64,
    progress: &mut dyn Progress,
) -> Result<f64> {
    let mut ema = None::<f64>;
    while t.iteration < t.config.steps {
        let o = t.step()?;
        if o.loss.is_finite() {
            ema = Some(ema.map_or(o.loss, |e| 0.95 * e + 0.05 * o.loss));
        }
        progress.step(o.iteration, ema.unwrap_or(f64::NAN));
        if every > 0 && o.iteration % every == 0 && o.iteration < t.config.steps {
            t.checkpoint(ckpt, 1)?;
        }
    }
    Ok(ema.unwrap_or(f64::NAN))
}

/// A trainer for `config`, continued from the latest checkpoint under
/// `ckpt` when there is one (which must have been written with the same
/// settings).
fn trainer_at<B: TrainBackend + Clone>(
    backend: &B,
    model: Gpt2<B>,
    data: Dataset,
    config: TrainConfig,
    ckpt: &Path,
) -> Result<Trainer<B>> {
    if !ckpt.join("latest").exists() {
        return Trainer::new(backend.clone(), model, data, config);
    }
    let t = Trainer::resume(backend.clone(), model, data, &latest_checkpoint(ckpt)?)?;
    if t.config != config {
        return Err(Error::invalid(
            format!("checkpoint {}", ckpt.display()),
            "was written with other training settings; delete it to start this adapter afresh",
        ));
    }
    Ok(t)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::invalid("json", e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// The demo's tiny base: 2 layers, width 64, 4 heads, 32 positions, byte
/// vocabulary.
pub fn tiny_base_config() -> Result<Gpt2Config> {
    Gpt2Config::new(256, 32, 64, 2, 4)
}

/// How the demo's tiny base is pretrained (all parameters, the demo's
/// optimizer settings, batch 16 of 32 tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct TinyBase {
    /// Iterations.
    pub steps: u64,
    /// Seed of the initial weights and the batch order.
    pub seed: u64,
    /// Compute dtype.
    pub precision: Precision,
    /// Checkpoint every this many iterations (0: never).
    pub checkpoint_every: u64,
}

/// Pretrains the demo's tiny base on the union of `domains`' training
/// sets into `dir`, unless `dir` already holds one made with the same
/// steps, seed, precision and data. Checkpoints go under
/// `dir/../checkpoints/base`.
pub fn pretrain_tiny_base<B: TrainBackend + Clone>(
    backend: &B,
    domains: &[Domain],
    how: &TinyBase,
    dir: &Path,
    progress: &mut dyn Progress,
) -> Result<()> {
    let TinyBase { steps, seed, precision, checkpoint_every } = how.clone();
    let all: Vec<&Domain> = domains.iter().collect();
    let data = combined(&all)?;
    let key = serde_json::json!({ "steps": steps, "seed": seed, "precision": precision.to_string(),
                                  "data": format!("{:016x}", fingerprint(&data)) });
    let done = dir.join("done.json");
    if done.exists() && read_json::<serde_json::Value>(&done)? == key {
        progress.stage(&format!("base model: reusing {}", dir.display()));
        return Ok(());
    }
    let mut config =
        TrainConfig { method: "full".into(), steps, batch: 16, seq: 32, seed, precision, ..TrainConfig::default() };
    config.optim.lr_base = 3e-3;
    config.optim.warmup = 20;
    config.optim.weight_decay = 0.0;
    let ckpt = dir.with_file_name("checkpoints").join("base");
    let model = Gpt2::random(backend, &tiny_base_config()?, seed)?;
    let mut t = trainer_at(backend, model, data, config, &ckpt)?;
    progress.adapter_start(0, 1, "base", steps, t.iteration);
    let start = Instant::now();
    let final_loss = train_loop(&mut t, &ckpt, checkpoint_every, progress)?;
    t.model.save(backend, dir)?;
    write_json(&done, &key)?;
    let _ = std::fs::remove_dir_all(&ckpt);
    let record = AdapterRecord {
        label: "base".into(),
        domains: domains.iter().map(|d| d.name.clone()).collect(),
        init_seed: seed,
        steps,
        final_loss,
        trainable: t.model.num_params(),
        seconds: start.elapsed().as_secs_f64(),
    };
    progress.adapter_done(&record, false);
    Ok(())
}

/// Scores a model with and without adapters on held-out sets.
struct Scorer<B: TrainBackend> {
    backend: B,
    model: Gpt2<B>,
    rows: usize,
    seq: usize,
    limit: usize,
}

impl<B: TrainBackend> Scorer<B> {
    fn score(&mut self, adapter: Option<&Adapter>, data: &Dataset) -> Result<EvalMetrics> {
        let (b, rows, seq, limit) = (&self.backend, self.rows, self.seq, self.limit);
        match adapter {
            None => evaluate(b, &mut self.model, None, data, rows, seq, limit),
            Some(a) => {
                // Folded to plain factors, so a sum's per-module scales
                // (alpha_pattern, rsLoRA) count exactly as `eval` counts them.
                let mut set = AdapterSet::for_eval(b, &self.model.config, a)?;
                evaluate(b, &mut self.model, Some(&mut set), data, rows, seq, limit)
            }
        }
    }
}

/// The settings a resumed run must share with the run that wrote `out`.
fn settings(config: &SummationConfig, base: &Path, model: &Gpt2Config, domains: &[DomainInfo]) -> serde_json::Value {
    serde_json::json!({ "config": config, "base_model": base.display().to_string(), "model_config": model,
                        "domains": domains })
}

/// Runs the experiment over `domains` on the base model in `base` (a
/// directory with `config.json` + `model.safetensors`), writing adapters,
/// sums, checkpoints and records under `out`. Call
/// [`write_outputs`] on the report for the JSON and the plot.
pub fn run<B: TrainBackend + Clone>(
    backend: &B,
    base: &Path,
    domains: &[Domain],
    config: &SummationConfig,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Report> {
    let start = Instant::now();
    config.validate(domains.len())?;
    for (i, d) in domains.iter().enumerate() {
        if domains[..i].iter().any(|e| e.name == d.name) {
            return Err(Error::invalid(format!("domain `{}`", d.name), "is listed twice"));
        }
    }
    check_held_out_disjoint(domains, config.train.seq)?;
    let mut model = Gpt2::load(backend, base)?;
    model.set_precision(backend, config.train.precision)?;
    let model_config = model.config.clone();
    let infos: Vec<DomainInfo> = domains
        .iter()
        .map(|d| DomainInfo {
            name: d.name.clone(),
            data: d.data.name.clone(),
            fingerprint: format!("{:016x}", fingerprint(&d.data)),
        })
        .collect();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let settings_path = out.join("experiment.json");
    let want = settings(config, base, &model_config, &infos);
    if settings_path.exists() {
        if read_json::<serde_json::Value>(&settings_path)? != want {
            return Err(Error::invalid(
                format!("--out {}", out.display()),
                "holds a run with other settings, base model or data; pass another --out, or delete it to start over",
            ));
        }
    } else {
        write_json(&settings_path, &want)?;
    }

    // Every adapter: singles first, then combinations.
    let combos = combinations(domains.len(), config.arity);
    let mut jobs: Vec<Vec<usize>> = (0..domains.len()).map(|i| vec![i]).collect();
    jobs.extend(combos.iter().cloned());
    let mut records = Vec::new();
    let mut adapters = Vec::new();
    for (index, job) in jobs.iter().enumerate() {
        let members: Vec<&Domain> = job.iter().map(|&i| &domains[i]).collect();
        let name = label(&members);
        let dir = out.join("adapters").join(&name);
        let done = dir.join("done.json");
        let (record, reused) = if done.exists() {
            (read_json::<AdapterRecord>(&done)?, true)
        } else {
            let init_seed = config.init_seed_for(&name);
            let train = TrainConfig { init_seed: Some(init_seed), eval_every: 0, ..config.train.clone() };
            let ckpt = out.join("checkpoints").join(&name);
            let model = Gpt2::load(backend, base)?;
            let mut t = trainer_at(backend, model, combined(&members)?, train.clone(), &ckpt)?;
            progress.adapter_start(index, jobs.len(), &name, train.steps, t.iteration);
            let t0 = Instant::now();
            let final_loss = train_loop(&mut t, &ckpt, config.checkpoint_every, progress)?;
            t.save_result(&dir)?;
            let record = AdapterRecord {
                label: name.clone(),
                domains: members.iter().map(|d| d.name.clone()).collect(),
                init_seed,
                steps: train.steps,
                final_loss,
                trainable: t.num_trainable(),
                seconds: t0.elapsed().as_secs_f64(),
            };
            // The record is written last: its presence means the adapter
            // files beside it are complete.
            write_json(&done, &record)?;
            let _ = std::fs::remove_dir_all(&ckpt);
            (record, false)
        };
        progress.adapter_done(&record, reused);
        adapters.push(load_adapter(&dir)?);
        records.push(record);
    }

    progress.stage("scoring sums and merged-data adapters on held-out data");
    let rows = config.train.batch.max(8);
    let mut scorer =
        Scorer { backend: backend.clone(), model, rows, seq: config.train.seq, limit: config.eval_examples };
    let mut base_scores = Vec::new();
    let mut single_scores = Vec::new();
    for (i, d) in domains.iter().enumerate() {
        base_scores.push(scorer.score(None, &d.data)?);
        single_scores.push(scorer.score(Some(&adapters[i]), &d.data)?);
    }
    let mut results = Vec::new();
    for (c, combo) in combos.iter().enumerate() {
        let members: Vec<&Domain> = combo.iter().map(|&i| &domains[i]).collect();
        let name = label(&members);
        let singles: Vec<&Adapter> = combo.iter().map(|&i| &adapters[i]).collect();
        let sum = concat_sum(&singles, &vec![1.0; singles.len()])?;
        save_adapter(&out.join("sums").join(&name), &sum)?;
        let merged = &adapters[domains.len() + c];
        let mut pairs = Vec::new();
        let mut squares = Vec::new();
        for x in 0..combo.len() {
            for y in x + 1..combo.len() {
                let s = similarity(singles[x], singles[y])?;
                squares.extend(s.modules.iter().map(|m| m.cosine * m.cosine));
                let mean_cosine = s.modules.iter().map(|m| m.cosine).sum::<f64>() / s.modules.len().max(1) as f64;
                pairs.push(PairCosine {
                    a: members[x].name.clone(),
                    b: members[y].name.clone(),
                    rms_cosine: s.rms_cosine,
                    mean_cosine,
                });
            }
        }
        let rms_cosine = (squares.iter().sum::<f64>() / squares.len().max(1) as f64).sqrt();
        let mut member_results = Vec::new();
        for (&i, d) in combo.iter().zip(&members) {
            let merged_m = scorer.score(Some(merged), &d.data)?;
            let sum_m = scorer.score(Some(&sum), &d.data)?;
            let change_percent = 100.0 * (sum_m.perplexity - merged_m.perplexity) / merged_m.perplexity;
            member_results.push(MemberResult {
                domain: d.name.clone(),
                base: base_scores[i].clone(),
                single: single_scores[i].clone(),
                merged: merged_m,
                sum: sum_m,
                change_percent,
            });
        }
        let mean_change_percent =
            member_results.iter().map(|m| m.change_percent).sum::<f64>() / member_results.len() as f64;
        results.push(CombinationResult {
            label: name,
            domains: members.iter().map(|d| d.name.clone()).collect(),
            rms_cosine,
            pairs,
            members: member_results,
            mean_change_percent,
        });
    }
    let x: Vec<f64> = results.iter().map(|r| r.rms_cosine).collect();
    let y: Vec<f64> = results.iter().map(|r| r.mean_change_percent).collect();
    Ok(Report {
        config: config.clone(),
        base_model: base.display().to_string(),
        model_config,
        device: backend.describe(),
        domains: infos,
        adapters: records,
        combinations: results,
        fit: linear_fit(&x, &y),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The report as a plain-text table: one row per member of each
/// combination (perplexities on its held-out set), the combination's mean
/// change and RMS cosine, then the fit.
pub fn table(report: &Report) -> String {
    let mut s = String::new();
    let w = report.combinations.iter().map(|c| c.label.len()).max().unwrap_or(11).max(11);
    let dw = report.domains.iter().map(|d| d.name.len()).max().unwrap_or(6).max(6);
    s += &format!(
        "{:<w$} {:>8}  {:<dw$} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "combination", "rms cos", "domain", "base ppl", "single", "merged", "sum", "change"
    );
    for c in &report.combinations {
        for (i, m) in c.members.iter().enumerate() {
            let (name, cos) =
                if i == 0 { (c.label.as_str(), format!("{:.4}", c.rms_cosine)) } else { ("", String::new()) };
            s += &format!(
                "{name:<w$} {cos:>8}  {:<dw$} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>+8.2}%\n",
                m.domain,
                m.base.perplexity,
                m.single.perplexity,
                m.merged.perplexity,
                m.sum.perplexity,
                m.change_percent
            );
        }
        s += &format!("{:<w$} {:>8}  {:<dw$} {:>49} {:>+8.2}%\n", "", "", "mean", "", c.mean_change_percent);
    }
    match &report.fit {
        Some(f) => {
            s += &format!(
                "\nfit over {} combinations: change% = {:+.3} {:+.3} · rms_cos;  R² = {:.3}, Pearson r = {:+.3}, \
                 Spearman ρ = {:+.3}\n",
                f.n, f.intercept, f.slope, f.r_squared, f.pearson, f.spearman
            );
        }
        None => s += "\nno fit: fewer than two combinations, or every RMS cosine equal\n",
    }
    s
}

/// Writes `report.json` and `summation.svg` (the scatter plot with its fit
/// line) into `out`; returns their paths.
pub fn write_outputs(report: &Report, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let json = out.join("report.json");
    write_json(&json, report)?;
    let svg = out.join("summation.svg");
    super::plot::write_svg(&svg, report)?;
    Ok((json, svg))
}
