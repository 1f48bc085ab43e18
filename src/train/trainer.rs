//! The training loop: sample a batch, forward and backward, refuse
//! non-finite steps, AdamW, evaluate, checkpoint, resume.

use std::path::Path;

use crate::backend::StepGraph;
use crate::nn::SeqShape;
use crate::peft::{load_adapter, save_adapter};
use crate::rng::Rng;
use crate::{Error, Result};

use super::adapters::{AdapterSet, AdapterSpec, Method};
use super::checkpoint::{read_checkpoint, write_checkpoint, CheckpointState, CheckpointTensors};
use super::data::{Dataset, EvalMetrics, MetricsAccumulator};
use super::model::{pad_rows, Batch, Gpt2, Precision};
use super::module::Module;
use super::optimizer::{AdamW, Group, OptimConfig, ParamRef, StepReport};
use super::{TrainBackend, F32};

/// Everything about a run except file paths (the CLI adds those). Readable
/// from TOML or JSON; every field has a default.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// `full`, `lora`, `tied[:letters]`, `vera`, `unilora:<d>` (see
    /// [`Method::parse`]).
    pub method: String,
    /// Adapter rank.
    pub rank: usize,
    /// Adapter α (scale α/r).
    pub alpha: f32,
    /// Target modules (PEFT `target_modules`).
    pub targets: Vec<String>,
    /// Training iterations.
    pub steps: u64,
    /// Rows per batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Seed of the data order (and of the adapter init when `init_seed`
    /// is unset).
    pub seed: u64,
    /// Seed of the adapter initialisation and of Uni-LoRA's projection, so
    /// that runs on different data can start from different (or, on
    /// purpose, the same) adapters whatever their data seed; `None`: `seed`.
    pub init_seed: Option<u64>,
    /// Example data: take loss on answers only.
    pub answer_only: bool,
    /// Take training batches in the stream's order
    /// ([`Dataset::sequential_batch`]) instead of random windows, so that
    /// another framework can feed exactly the same batches (streams only).
    pub sequential_batches: bool,
    /// Evaluate every this many iterations (0: only at the end).
    pub eval_every: u64,
    /// Held-out examples (or windows) per evaluation.
    pub eval_examples: usize,
    /// Stop after this many consecutive refused (non-finite) steps.
    pub max_bad_steps: u32,
    /// Optimizer settings.
    pub optim: OptimConfig,
    /// Compute dtype of forward and backward ([`Precision::Bf16`] is mixed
    /// precision with f32 master weights; the CLI picks bf16 on a GPU).
    pub precision: Precision,
    /// Replay the training step as one captured graph ([`Trainer::step`]):
    /// same kernels in the same order, so the same numbers, without a
    /// launch gap per kernel. CUDA only: the CPU backend has no queue to
    /// record and ignores it. Off by default. A replay reads every buffer
    /// where the capture found it: change weights between steps in place
    /// ([`crate::Backend::upload_into`]), not by replacing a buffer.
    pub graph: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: "lora".into(),
            rank: 4,
            alpha: 8.0,
            targets: Module::ALL.iter().map(|m| m.name().to_string()).collect(),
            steps: 200,
            batch: 8,
            seq: 32,
            seed: 0,
            init_seed: None,
            answer_only: false,
            sequential_batches: false,
            eval_every: 0,
            eval_examples: 200,
            max_bad_steps: 5,
            optim: OptimConfig::default(),
            precision: Precision::F32,
            graph: false,
        }
    }
}

impl TrainConfig {
    /// The adapter spec this config names (parsed, not yet checked against
    /// a model).
    pub fn spec(&self) -> Result<AdapterSpec> {
        let method = Method::parse(&self.method)?;
        let targets = self.targets.iter().map(|t| Module::parse(t)).collect::<Result<Vec<_>>>()?;
        let seed = self.init_seed.unwrap_or(self.seed);
        Ok(AdapterSpec { method, rank: self.rank, alpha: self.alpha, targets, seed })
    }

    /// Every check that can fail before work starts, against the model
    /// and the data.
    pub fn validate(&self, model: &super::config::Gpt2Config, data: &Dataset) -> Result<AdapterSpec> {
        let spec = self.spec()?;
        spec.validate(model)?;
        self.optim.validate()?;
        for (name, v) in [("steps", self.steps as usize), ("batch", self.batch), ("seq", self.seq)] {
            if v == 0 {
                return Err(Error::invalid(format!("train {name}"), "must be at least 1"));
            }
        }
        if self.seq > model.n_positions {
            return Err(Error::invalid(
                "sequence length",
                format!("seq = {} exceeds the model's n_positions = {}", self.seq, model.n_positions),
            ));
        }
        if data.vocab > model.vocab_size {
            return Err(Error::invalid(
                "data",
                format!(
                    "`{}` uses token ids up to {} but the model's vocab_size is {}",
                    data.name,
                    data.vocab - 1,
                    model.vocab_size
                ),
            ));
        }
        if self.max_bad_steps == 0 {
            return Err(Error::invalid("max_bad_steps", "must be at least 1"));
        }
        data.check_seq(self.seq)?;
        model.check_activation_budget(self.batch, self.seq)?;
        if self.sequential_batches {
            data.sequential_batch(0, 1, self.seq)?;
        }
        Ok(spec)
    }
}

/// What one iteration did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// 1-based iteration number.
    pub iteration: u64,
    /// Mean training loss of the batch (may be non-finite when refused).
    pub loss: f64,
    /// Scored tokens in the batch.
    pub tokens: usize,
    /// The optimizer's report, or `None` when the step was refused.
    pub report: Option<StepReport>,
    /// Why the step was refused.
    pub refused: Option<String>,
}

/// A model, its adapters (or full fine-tuning), the optimizer, the data and
/// the sampler's RNG.
pub struct Trainer<B: TrainBackend> {
    /// The backend.
    pub backend: B,
    /// The model (its gradients are on for full fine-tuning).
    pub model: Gpt2<B>,
    /// The adapters, or `None` for full fine-tuning.
    pub adapters: Option<AdapterSet<B>>,
    /// AdamW state.
    pub optimizer: AdamW<B>,
    /// The data.
    pub data: Dataset,
    /// The data sampler.
    pub rng: Rng,
    /// The run's settings.
    pub config: TrainConfig,
    /// Iterations done.
    pub iteration: u64,
    /// Consecutive refused steps.
    pub bad_steps: u32,
    /// The batch's ids at fixed addresses, rewritten every step.
    batch: Option<Batch<B>>,
    /// The last step's per-position losses at a fixed address (the
    /// optimizer's guard, read back with its report).
    losses: Option<F32<B>>,
    /// Where graph replay stands ([`TrainConfig::graph`]).
    graph: GraphState,
    /// Graph replay's counters and, once it turned itself off, why.
    graph_status: GraphStatus,
}

/// Eager steps before a step is captured: the first step grows every cache
/// a step uses (cuBLAS heuristics and workspace, launch tables, scratch
/// buffers, the optimizer's state), so that the captured step allocates
/// nothing that outlives it.
pub const GRAPH_WARMUP_STEPS: u32 = 1;

/// Guards the optimizer's decision reads besides the gradients: the loss.
const STEP_GUARDS: usize = 1;

/// Where graph replay stands.
enum GraphState {
    /// Off, or turned off ([`GraphStatus::off`] says why).
    Off,
    /// This many eager steps to go before the next step is captured.
    Warmup(u32),
    /// A captured step over the trainer's fixed buffers. It serves every
    /// batch of the captured shape: the loss gradient's scale is counted
    /// from the targets on the device at each replay, not recorded.
    Ready { graph: Box<dyn StepGraph> },
}

/// What graph replay did so far ([`Trainer::graph_status`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphStatus {
    /// Steps captured (the first, and one after each evaluation).
    pub captures: u64,
    /// Steps run by replaying a captured graph.
    pub replays: u64,
    /// Steps run eagerly while replay was on: warm-up and profiling steps
    /// (op timing on).
    pub eager: u64,
    /// Why replay turned itself off (said once on stderr), if it did.
    pub off: Option<String>,
}

/// How one step runs.
enum StepMode {
    Eager,
    Capture,
    Replay,
}

fn trainable<'a, B: TrainBackend>(
    model: &'a mut Gpt2<B>,
    adapters: Option<&'a mut AdapterSet<B>>,
) -> Vec<ParamRef<'a, B>> {
    match adapters {
        Some(a) => a.trainable(),
        None => {
            let names = Gpt2::<B>::param_specs(&model.config);
            match model.grads.as_ref() {
                Some(grads) => names
                    .into_iter()
                    .zip(model.params.iter_mut().zip(grads))
                    .map(|(s, (p, g))| (s.name, Group::Base, p, g))
                    .collect(),
                None => Vec::new(),
            }
        }
    }
}

impl<B: TrainBackend> Trainer<B> {
    /// Validates everything, then builds adapters (or turns on full
    /// fine-tuning) and the optimizer.
    pub fn new(backend: B, mut model: Gpt2<B>, data: Dataset, config: TrainConfig) -> Result<Self> {
        let spec = config.validate(&model.config, &data)?;
        model.set_precision(&backend, config.precision)?;
        let adapters = if spec.method == Method::Full {
            model.enable_full_grads(&backend)?;
            None
        } else {
            Some(AdapterSet::new(&backend, &model.config, &spec)?)
        };
        let mut adapters = adapters;
        let optimizer = AdamW::new(&backend, config.optim.clone(), &trainable(&mut model, adapters.as_mut()))?;
        Ok(Trainer {
            optimizer,
            rng: Rng::new(config.seed ^ 0xDA7A),
            backend,
            model,
            adapters,
            data,
            iteration: 0,
            bad_steps: 0,
            batch: None,
            losses: None,
            graph: if config.graph { GraphState::Warmup(GRAPH_WARMUP_STEPS) } else { GraphState::Off },
            graph_status: GraphStatus::default(),
            config,
        })
    }

    /// What graph replay did so far ([`TrainConfig::graph`]).
    pub fn graph_status(&self) -> &GraphStatus {
        &self.graph_status
    }

    /// Trainable parameters (the token embedding's pad rows not counted).
    pub fn num_trainable(&mut self) -> usize {
        if self.adapters.is_none() && self.model.grads.is_some() {
            return self.model.num_params();
        }
        trainable(&mut self.model, self.adapters.as_mut()).iter().map(|(_, _, p, _)| B::len(p)).sum()
    }

    fn zero_grads(&mut self) -> Result<()> {
        if let Some(a) = self.adapters.as_mut() {
            a.zero_grads(&self.backend)?;
        }
        if let Some(g) = self.model.grads.as_mut() {
            for buf in g.iter_mut() {
                self.backend.fill_zero(buf)?;
            }
        }
        Ok(())
    }

    /// One iteration. A non-finite loss or gradient refuses the step (no
    /// parameter changes) and is reported; `max_bad_steps` consecutive
    /// refusals stop the run with an error.
    ///
    /// The step's device work (zero gradients, forward, backward, the
    /// adapters' scatter, the optimizer's decision and update, the gather)
    /// is queued without a wait; the optimizer's report and the losses are
    /// the one read back, at the end. With [`TrainConfig::graph`] on a
    /// backend that has graphs, the batch is written into fixed buffers,
    /// the step after [`GRAPH_WARMUP_STEPS`] eager ones is captured, and
    /// later steps replay it, whatever number of positions their batch
    /// scores (the loss gradient's scale is counted on the device); a step
    /// runs eagerly instead while op timing is on (so the per-op marks mean
    /// something). When capture or replay fails, the trainer says why once
    /// and continues eagerly.
    pub fn step(&mut self) -> Result<StepOutcome> {
        self.backend.op_mark("batch sample + upload");
        let host = if self.config.sequential_batches {
            // Batch number = iterations done, so a resumed run continues
            // the same order.
            self.data.sequential_batch(self.iteration, self.config.batch, self.config.seq)?
        } else {
            self.data.sample(&mut self.rng, self.config.batch, self.config.seq, self.config.answer_only)
        };
        // Checked here as well as in the forward: a replayed step does not
        // run the forward's host code.
        crate::nn::check::tokens("batch tokens", &host.tokens, self.model.config.vocab_size)?;
        let shape = SeqShape { batch: host.rows, seq: host.seq };
        if self.batch.as_ref().map(|b| (b.shape.batch, b.shape.seq)) != Some((shape.batch, shape.seq)) {
            // New buffers (and maybe new scratch sizes): a graph recorded
            // over the old ones is stale; warm up again, then capture.
            if let GraphState::Ready { .. } = self.graph {
                self.graph = GraphState::Warmup(GRAPH_WARMUP_STEPS);
            }
            self.batch = Some(Batch::zeros(&self.backend, shape)?);
            self.losses = Some(self.backend.zeros(shape.tokens())?);
        }
        let batch =
            self.batch.as_mut().ok_or_else(|| Error::invalid("training step", "the batch buffers are missing"))?;
        batch.write(&self.backend, &host.tokens, &host.targets)?;
        let scored = batch.scored();

        match self.step_mode() {
            StepMode::Eager => self.queue_step()?,
            StepMode::Capture => self.capture_step()?,
            StepMode::Replay => self.replay_step()?,
        }

        self.iteration += 1;
        self.backend.op_mark("optimizer report");
        let report = self.optimizer.report(&self.backend);
        let losses = match self.losses.as_ref() {
            Some(l) => self.backend.download(l)?,
            None => return Err(Error::invalid("training step", "the loss buffer is missing")),
        };
        let loss = if scored == 0 { 0.0 } else { losses.iter().map(|&v| v as f64).sum::<f64>() / scored as f64 };
        let result = if !loss.is_finite() {
            // The device refused the step on its guard; say it in the
            // loss's words.
            Err(format!("loss is {loss}"))
        } else {
            match report {
                Ok(r) => Ok(r),
                Err(Error::NonFinite { what, value, .. }) => Err(format!("{what} has a non-finite norm ({value})")),
                Err(e) => return Err(e),
            }
        };
        let outcome = StepOutcome { iteration: self.iteration, loss, tokens: scored, report: None, refused: None };
        match result {
            Ok(report) => {
                self.bad_steps = 0;
                Ok(StepOutcome { report: Some(report), ..outcome })
            }
            Err(why) => {
                self.bad_steps += 1;
                if self.bad_steps >= self.config.max_bad_steps {
                    return Err(Error::invalid(
                        "training",
                        format!(
                            "stopped at iteration {}: {} consecutive steps were refused (last: {why}); \
                             lower the learning rates or enable clipping (optim.clip_norm)",
                            self.iteration, self.bad_steps
                        ),
                    ));
                }
                Ok(StepOutcome { refused: Some(why), ..outcome })
            }
        }
    }

    /// Queues one step's device work over the fixed batch, without a wait:
    /// zero gradients, forward and backward, the adapters' scatter, the
    /// losses into their fixed buffer, the optimizer (which refuses on the
    /// device when a gradient or the loss is not finite), the adapters'
    /// gather and, for full fine-tuning, the working copy.
    fn queue_step(&mut self) -> Result<()> {
        self.backend.op_mark("zero grads");
        self.zero_grads()?;
        let Trainer { backend, model, adapters, optimizer, batch, losses, config, .. } = self;
        let (batch, losses) = match (batch.as_ref(), losses.as_mut()) {
            (Some(b), Some(l)) => (b, l),
            _ => return Err(Error::invalid("training step", "the batch buffers are missing")),
        };
        let ce = model.run_queued(backend, adapters.as_mut(), batch, true)?;
        backend.op_mark("adapter scatter");
        if let Some(a) = adapters.as_mut() {
            a.scatter(backend)?;
        }
        backend.op_mark("optimizer");
        // Out of the forward's own buffer (freed within the step) into the
        // trainer's, which outlives it.
        backend.copy_into(&ce.losses, losses)?;
        drop(ce);
        // The update, the adapter gather and the working copy are queued
        // back to back: the clip factor and the refusal are decided on the
        // backend, and a refused step leaves the parameters as they were,
        // so the gather and the copy recompute the same values.
        let params = trainable(model, adapters.as_mut());
        optimizer.queue(backend, params, &[("loss", &*losses)], config.steps)?;
        backend.op_mark("adapter gather");
        if let Some(a) = adapters.as_mut() {
            a.gather(backend)?;
        }
        if model.grads.is_some() {
            // Full fine-tuning changes the f32 master weights.
            model.refresh_working_copy(backend)?;
        }
        Ok(())
    }

    /// How this step runs, and the warm-up count down.
    fn step_mode(&mut self) -> StepMode {
        if !self.backend.supports_graphs() {
            return StepMode::Eager;
        }
        if let GraphState::Ready { .. } = self.graph {
            if !self.optimizer.state_is_current(STEP_GUARDS) {
                // The step count was set by hand: the state is uploaded
                // anew (another buffer), which the graph does not read.
                self.graph = GraphState::Warmup(GRAPH_WARMUP_STEPS);
            }
        }
        let profiling = self.backend.op_timing_on();
        let mode = match &mut self.graph {
            GraphState::Off => return StepMode::Eager,
            GraphState::Warmup(0) if !profiling => StepMode::Capture,
            GraphState::Warmup(left) => {
                *left = left.saturating_sub(1);
                StepMode::Eager
            }
            GraphState::Ready { .. } if !profiling => StepMode::Replay,
            GraphState::Ready { .. } => StepMode::Eager,
        };
        if let StepMode::Eager = mode {
            self.graph_status.eager += 1;
        }
        mode
    }

    /// Records this step's work as a graph and runs it by replaying it
    /// once; on failure says why once and runs the step eagerly.
    fn capture_step(&mut self) -> Result<()> {
        self.backend.capture_begin()?;
        let queued = self.queue_step();
        let ended = self.backend.capture_end();
        let graph = match (queued, ended) {
            (Ok(()), Ok(graph)) => graph,
            (Err(e), _) | (Ok(()), Err(e)) => {
                // Nothing ran: a failed capture records, it does not execute.
                // A stale error a drop recorded during capture surfaces
                // here rather than in the eager step.
                let _ = self.backend.synchronize();
                self.graph_off(format!("capturing the step failed: {e}"));
                self.graph_status.eager += 1;
                return self.queue_step();
            }
        };
        self.graph_status.captures += 1;
        graph.replay()?;
        self.graph = GraphState::Ready { graph };
        Ok(())
    }

    /// Replays the captured step; if the launch fails, says why once and
    /// runs the step eagerly.
    fn replay_step(&mut self) -> Result<()> {
        let replayed = match &self.graph {
            GraphState::Ready { graph } => graph.replay(),
            _ => Err(Error::invalid("graph replay", "no captured step")),
        };
        match replayed {
            Ok(()) => {
                self.graph_status.replays += 1;
                Ok(())
            }
            Err(e) => {
                let _ = self.backend.synchronize();
                self.graph_off(format!("replaying the captured step failed: {e}"));
                self.graph_status.eager += 1;
                self.queue_step()
            }
        }
    }

    /// Turns graph replay off for the rest of the run and says why, once.
    fn graph_off(&mut self, why: String) {
        self.graph = GraphState::Off;
        if self.graph_status.off.is_none() {
            eprintln!("lorafuse: graph replay is off, steps run eagerly: {why}");
            self.graph_status.off = Some(why);
        }
    }

    /// Loss, perplexity and accuracy on the held-out set.
    ///
    /// Its batches have other shapes than the training step's and may grow
    /// buffers a captured step reads, so a captured step is dropped and the
    /// next step captures anew (after one eager step).
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        if let GraphState::Ready { .. } = self.graph {
            self.graph = GraphState::Warmup(GRAPH_WARMUP_STEPS);
        }
        evaluate(
            &self.backend,
            &mut self.model,
            self.adapters.as_mut(),
            &self.data,
            self.config.batch.max(8),
            self.config.seq,
            self.config.eval_examples,
        )
    }

    /// Saves the trained adapter (PEFT format) or, for full fine-tuning, the
    /// model (Hugging Face format) into `dir`.
    pub fn save_result(&self, dir: &Path) -> Result<()> {
        match &self.adapters {
            Some(a) => save_adapter(dir, &a.to_adapter(&self.backend, &self.model.config)?),
            None => self.model.save(&self.backend, dir),
        }
    }

    /// Writes a checkpoint under `root` (see [`super::checkpoint`]).
    pub fn checkpoint(&mut self, root: &Path, keep: usize) -> Result<std::path::PathBuf> {
        let config = serde_json::to_value(&self.config).map_err(|e| Error::invalid("train config", e.to_string()))?;
        let state = CheckpointState {
            iteration: self.iteration,
            optimizer_step: self.optimizer.step,
            rng_state: self.rng.state(),
            bad_steps: self.bad_steps,
            config,
        };
        // Files keep the real vocabulary: the token embedding's moments lose
        // their pad rows (always zero) as its weights do.
        let specs = if self.adapters.is_none() { Gpt2::<B>::param_specs(&self.model.config) } else { Vec::new() };
        let real_len = |name: &str| specs.iter().find(|s| s.name == name).map(|s| s.len());
        let moments = self
            .optimizer
            .moments
            .iter()
            .map(|(n, m, v)| {
                let (mut m, mut v) = (self.backend.download(m)?, self.backend.download(v)?);
                if let Some(len) = real_len(n) {
                    m.truncate(len);
                    v.truncate(len);
                }
                Ok((n.clone(), m, v))
            })
            .collect::<Result<Vec<_>>>()?;
        let weights_dir = if self.adapters.is_some() { "adapter" } else { "model" };
        write_checkpoint(root, &state, &CheckpointTensors { moments }, keep, |dir| {
            self.save_result(&dir.join(weights_dir))
        })
    }

    /// Rebuilds a run from a checkpoint directory: `model` is the base (for
    /// full fine-tuning its weights are replaced by the checkpoint's), `data`
    /// the same dataset. Continues bit-identically on the CPU.
    pub fn resume(backend: B, model: Gpt2<B>, data: Dataset, dir: &Path) -> Result<Self> {
        let (state, moments) = read_checkpoint(dir)?;
        let config: TrainConfig = serde_json::from_value(state.config.clone())
            .map_err(|e| Error::format(dir.join("state.json"), e.to_string()))?;
        let model = if config.method == "full" { Gpt2::load(&backend, &dir.join("model"))? } else { model };
        let mut t = Trainer::new(backend, model, data, config)?;
        if let Some(a) = t.adapters.as_mut() {
            a.load_values(&t.backend, &load_adapter(&dir.join("adapter"))?)?;
        }
        let specs = if t.adapters.is_none() { Gpt2::<B>::param_specs(&t.model.config) } else { Vec::new() };
        for (name, m, v) in t.optimizer.moments.iter_mut() {
            let spec = specs.iter().find(|s| s.name == *name);
            for (suffix, buf) in [("adam_m", m), ("adam_v", v)] {
                let key = format!("{name}.{suffix}");
                let host = moments
                    .get(&key)
                    .ok_or_else(|| Error::format(dir.join("optimizer.safetensors"), format!("`{key}` is missing")))?;
                // The file has the real vocabulary; the backend the padded one.
                let host = match spec {
                    Some(spec) if host.len() == spec.len() => pad_rows(&t.model.config, spec, host.clone()),
                    _ => host.clone(),
                };
                crate::error::check_len("resume", "optimizer moment", host.len(), B::len(buf))?;
                *buf = t.backend.upload(&host)?;
            }
        }
        t.optimizer.step = state.optimizer_step;
        t.iteration = state.iteration;
        t.bad_steps = state.bad_steps;
        // SplitMix64's state is its whole state: restore it by construction.
        t.rng = Rng::new(state.rng_state);
        Ok(t)
    }
}

/// Evaluates `model` (+ `adapters`) on `data`'s held-out set, `limit`
/// examples (or windows) in batches of `rows`.
pub fn evaluate<B: TrainBackend>(
    backend: &B,
    model: &mut Gpt2<B>,
    mut adapters: Option<&mut AdapterSet<B>>,
    data: &Dataset,
    rows: usize,
    seq: usize,
    limit: usize,
) -> Result<EvalMetrics> {
    data.check_seq(seq)?;
    let mut acc = MetricsAccumulator::default();
    for hb in data.eval_batches(rows, seq, limit) {
        let batch = Batch::upload(backend, crate::nn::SeqShape { batch: hb.rows, seq }, &hb.tokens, &hb.targets)?;
        let out = model.run(backend, adapters.as_deref_mut(), &batch, false)?;
        acc.add(seq, &out.losses, &out.correct, &out.targets);
    }
    Ok(acc.finish())
}
