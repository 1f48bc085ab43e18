//! `lorafuse train`, `lorafuse eval` and `lorafuse demo`.
//!
//! The commands are written over any [`TrainBackend`]: the CPU backend and
//! the CUDA backend (`kernels/nn.cu`, `kernels/attention.cu`) both
//! implement the kernel families it calls (`NnOps`, `AttentionOps`,
//! `LowRankOps`, `ProjectionOps`), and `--device` picks one.
//!
//! A checkpoint directory holds, besides the `step-<n>` checkpoints, the
//! run's sources (`run.json`: model and data specs). `--resume` continues
//! exactly that run: settings, seed, model and data come from the
//! checkpoint; a flag that asks for something else is refused by name (only
//! `--steps` may change; the checks are [`lorafuse::train::run`]'s).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::device::{on_backend, DeviceArg, PrecisionChoice};
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::peft::load_adapter;
use lorafuse::train::adapters::AdapterSet;
use lorafuse::train::checkpoint::{latest_checkpoint, read_checkpoint, step_dirs};
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::data::{Corpus, Dataset, EvalMetrics, DOMAINS};
use lorafuse::train::model::Gpt2;
use lorafuse::train::plot::Curve;
use lorafuse::train::run::{self, RunSources};
use lorafuse::train::spec::{DataSpec, ModelSpec};
use lorafuse::train::trainer::{evaluate, TrainConfig, Trainer};
use lorafuse::train::TrainBackend;
use lorafuse::{Error, Result};

/// Where the model and data come from, and where results go.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Sources {
    #[command(flatten)]
    device: DeviceArg,
    /// Base model: a directory with config.json + model.safetensors (GPT-2
    /// naming), or `random:<layers>,<width>,<heads>[,<positions>[,<vocab>]]`.
    #[arg(long)]
    model: Option<String>,
    /// Data: `embedded[:domain,domain...]` (add, sort, recall, reverse),
    /// `text:<file>` (byte tokens) or `tokens:<file>` (llm.c token file).
    #[arg(long)]
    data: Option<String>,
}

/// Options of `lorafuse train` (flags override the TOML file).
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML file: top-level `model`, `data`, `out`, `checkpoint_dir`,
    /// `checkpoint_every`, and a `[train]` table (with `[train.optim]`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    sources: Sources,
    /// Where the adapter (or, for `full`, the model) is saved.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `full`, `lora`, `tied[:vBuA letters]`, `vera`, `unilora:<d>`, `unilora-balanced:<d>`.
    #[arg(long)]
    method: Option<String>,
    /// Adapter rank.
    #[arg(long)]
    rank: Option<usize>,
    /// Adapter α.
    #[arg(long)]
    alpha: Option<f32>,
    /// Comma-separated target modules (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj).
    #[arg(long)]
    targets: Option<String>,
    /// Iterations.
    #[arg(long)]
    steps: Option<u64>,
    /// Rows per batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per row.
    #[arg(long)]
    seq: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Learning rate of A, B.
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of u, v (Tied-LoRA, VeRA).
    #[arg(long)]
    lr_vector: Option<f64>,
    /// Learning rate of Uni-LoRA's θ.
    #[arg(long)]
    lr_theta: Option<f64>,
    /// Learning rate of base weights (full).
    #[arg(long)]
    lr_base: Option<f64>,
    /// Warmup iterations.
    #[arg(long)]
    warmup: Option<u64>,
    /// Loss on answers only (embedded data).
    #[arg(long)]
    answer_only: bool,
    /// Take training windows in the stream's order (batch i, row j =
    /// window i·batch + j of `seq` tokens) instead of at random, so another
    /// framework can feed the same batches (text:/tokens: data only).
    #[arg(long)]
    sequential_batches: bool,
    /// Replay each training step as one captured CUDA graph after an eager
    /// warm-up step (the CPU ignores it). Same numbers, fewer launch gaps.
    #[arg(long)]
    graph: bool,
    /// Start from this adapter (PEFT format, e.g. written by PEFT's
    /// save_pretrained) instead of the usual init; its kind, rank, α and
    /// target modules must be the run's.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Evaluate every N iterations.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Checkpoint directory (enables checkpoints).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N iterations.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Resume from the latest checkpoint in --checkpoint-dir.
    #[arg(long)]
    resume: bool,
    /// Metrics file (JSON lines); default `<out>/metrics.jsonl`.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Compute dtype: `bf16` (mixed precision, f32 masters), `f32`, or
    /// `auto`: bf16 on a GPU with tensor cores, else f32. `precision` in
    /// the TOML file's `[train]` table wins over `auto`.
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
}

/// Options of `lorafuse eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    sources: Sources,
    /// Adapter directories (PEFT format), each evaluated on its own.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Tokens per row.
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Held-out examples (or windows).
    #[arg(long, default_value_t = 400)]
    examples: usize,
    /// Seed of the embedded data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Options of `lorafuse demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Pretraining iterations of the tiny base (full fine-tuning, all domains).
    #[arg(long, default_value_t = 3000)]
    base_steps: u64,
    /// Iterations of each adapter.
    #[arg(long, default_value_t = 800)]
    adapter_steps: u64,
    /// The domain the adapters learn.
    #[arg(long, default_value = "sort")]
    domain: String,
    /// Where the base and the adapters are saved.
    #[arg(long, default_value = "lorafuse-demo")]
    out: PathBuf,
    /// Compute dtype (`auto`: bf16 on a GPU with tensor cores, else f32).
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunFile {
    model: Option<String>,
    data: Option<String>,
    out: Option<PathBuf>,
    checkpoint_dir: Option<PathBuf>,
    checkpoint_every: Option<u64>,
    metrics: Option<PathBuf>,
    #[serde(default)]
    train: TrainConfig,
}

fn model_from<B: TrainBackend>(backend: &B, spec: &str, seed: u64) -> Result<Gpt2<B>> {
    spec.parse::<ModelSpec>()?.build(backend, seed)
}

fn data_from(spec: &str, vocab: usize, eval: usize, seed: u64) -> Result<Dataset> {
    spec.parse::<DataSpec>()?.load(vocab, eval, seed)
}

fn metrics_line(out: &mut Option<std::fs::File>, value: serde_json::Value) -> Result<()> {
    if let Some(f) = out {
        writeln!(f, "{value}").map_err(|e| Error::io("metrics file", e))?;
    }
    Ok(())
}

/// Runs the loop with a progress bar; returns (seconds, trained tokens,
/// the loss curve: every step's loss and each evaluation's held-out loss).
fn run_loop<B: TrainBackend>(
    t: &mut Trainer<B>,
    label: &str,
    metrics: &mut Option<std::fs::File>,
    checkpoints: Option<(&Path, u64)>,
) -> Result<(f64, usize, Curve)> {
    let total = t.config.steps;
    let mut curve = Curve::new(label);
    if matches!(t.data.eval, Corpus::Examples(_)) && !t.config.answer_only {
        curve.eval_label = "held-out loss on answers".into();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .map_err(|e| Error::invalid("progress style", e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar.set_position(t.iteration);
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut ema = None::<f64>;
    while t.iteration < total {
        let o = t.step()?;
        tokens += t.config.batch * t.config.seq;
        let secs = start.elapsed().as_secs_f64();
        if o.loss.is_finite() {
            ema = Some(ema.map_or(o.loss, |e| 0.9 * e + 0.1 * o.loss));
        }
        curve.train.push((o.iteration, o.loss));
        bar.set_position(o.iteration);
        bar.set_message(format!("loss {:.3} {:.0} tok/s", ema.unwrap_or(f64::NAN), tokens as f64 / secs.max(1e-9)));
        let mut line = serde_json::json!({
            "run": label, "iteration": o.iteration, "loss": o.loss, "tokens_per_s": tokens as f64 / secs.max(1e-9),
        });
        if let Some(r) = o.report {
            line["grad_norm"] = r.grad_norm.into();
            line["lr_factor"] = r.lr_factor.into();
        }
        if let Some(why) = &o.refused {
            bar.println(format!("iteration {}: step refused: {why}", o.iteration));
            line["refused"] = why.clone().into();
        }
        if t.config.eval_every > 0 && o.iteration % t.config.eval_every == 0 && o.iteration < total {
            let m = t.evaluate()?;
            curve.eval.push((o.iteration, m.loss));
            line["eval"] = serde_json::to_value(&m).unwrap_or_default();
        }
        metrics_line(metrics, line)?;
        if let Some((dir, every)) = checkpoints {
            if every > 0 && o.iteration % every == 0 {
                t.checkpoint(dir, 2)?;
            }
        }
    }
    bar.finish_and_clear();
    Ok((start.elapsed().as_secs_f64(), tokens, curve))
}

/// Replaces the fresh adapters of `t` by the adapter in `dir`.
fn init_from<B: TrainBackend>(t: &mut Trainer<B>, dir: &Path) -> Result<()> {
    let adapter = load_adapter(dir)?;
    run::init_from_adapter(t, &adapter, &format!("--init-adapter {}", dir.display()))
}

/// `lorafuse train` on the backend `--device` picks.
pub fn train(args: &TrainArgs) -> Result<()> {
    on_backend!(args.sources.device.open()?, train_on(args))
}

/// The settings given explicitly for this invocation (TOML `[train]` keys
/// and flags), as JSON paths into `TrainConfig`.
fn explicit_settings(
    args: &TrainArgs,
    file_train: Option<&toml::Value>,
    precision: Option<lorafuse::train::model::Precision>,
) -> Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    if let Some(table) = file_train.and_then(|t| t.as_table()) {
        for (k, v) in table {
            let v = serde_json::to_value(v).map_err(|e| Error::invalid("run file", e.to_string()))?;
            match v {
                serde_json::Value::Object(sub) => {
                    out.extend(sub.into_iter().map(|(k2, v2)| (format!("{k}.{k2}"), v2)));
                }
                v => out.push((k.clone(), v)),
            }
        }
    }
    macro_rules! flag {
        ($($flag:ident => $path:expr),*) => {
            $(if let Some(v) = &args.$flag {
                out.push(($path.to_string(), serde_json::json!(v)));
            })*
        };
    }
    flag!(method => "method", rank => "rank", alpha => "alpha", batch => "batch", seq => "seq", seed => "seed",
          lr => "optim.lr", lr_vector => "optim.lr_vector", lr_theta => "optim.lr_theta", lr_base => "optim.lr_base",
          warmup => "optim.warmup", eval_every => "eval_every");
    if let Some(t) = &args.targets {
        out.push(("targets".into(), serde_json::json!(t.split(',').map(str::trim).collect::<Vec<_>>())));
    }
    if args.answer_only {
        out.push(("answer_only".into(), true.into()));
    }
    if args.sequential_batches {
        out.push(("sequential_batches".into(), true.into()));
    }
    if let Some(p) = precision {
        out.push(("precision".into(), serde_json::to_value(p).unwrap_or_default()));
    }
    Ok(out)
}

fn train_on<B: TrainBackend + Clone>(backend: B, args: &TrainArgs) -> Result<()> {
    let (file, file_sets_precision, file_train): (RunFile, bool, Option<toml::Value>) = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| Error::format(p, e.to_string()))?;
            let explicit = table.get("train").and_then(|t| t.get("precision")).is_some();
            let train = table.get("train").cloned();
            (toml::from_str(&text).map_err(|e| Error::format(p, e.to_string()))?, explicit, train)
        }
        None => (RunFile::default(), false, None),
    };
    let mut c = file.train;
    if args.precision != PrecisionChoice::Auto || !file_sets_precision {
        c.precision = args.precision.resolve(&backend);
    }
    macro_rules! set {
        ($($flag:ident => $field:expr),*) => { $(if let Some(v) = args.$flag.clone() { $field = v; })* };
    }
    set!(method => c.method, rank => c.rank, alpha => c.alpha, steps => c.steps, batch => c.batch, seq => c.seq,
         seed => c.seed, lr => c.optim.lr, lr_vector => c.optim.lr_vector, lr_theta => c.optim.lr_theta,
         lr_base => c.optim.lr_base, warmup => c.optim.warmup, eval_every => c.eval_every);
    if let Some(t) = &args.targets {
        c.targets = t.split(',').map(|s| s.trim().to_string()).collect();
    }
    c.answer_only |= args.answer_only;
    c.sequential_batches |= args.sequential_batches;
    c.graph |= args.graph;
    let given_model = args.sources.model.clone().or(file.model);
    let given_data = args.sources.data.clone().or(file.data);
    let out = args.out.clone().or(file.out).unwrap_or_else(|| PathBuf::from("lorafuse-out"));
    let ckpt_dir = args.checkpoint_dir.clone().or(file.checkpoint_dir);
    let ckpt_every =
        args.checkpoint_every.or(file.checkpoint_every).unwrap_or(if ckpt_dir.is_some() { 100 } else { 0 });
    if let Some(dir) = &ckpt_dir {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::invalid(
                format!("--checkpoint-dir {}", dir.display()),
                "is a file, not a directory: pick a directory path",
            ));
        }
    }
    if args.resume && args.init_adapter.is_some() {
        return Err(Error::invalid("--init-adapter", "cannot be combined with --resume (the checkpoint has one)"));
    }

    // On resume the checkpoint's run is the truth: its config, seed, model
    // and data; a differing explicit setting is refused by name.
    let resume_from = match (&ckpt_dir, args.resume) {
        (Some(dir), true) => {
            let ck = latest_checkpoint(dir)?;
            let (state, _) = read_checkpoint(&ck)?;
            let saved: TrainConfig = serde_json::from_value(state.config.clone())
                .map_err(|e| Error::format(ck.join("state.json"), e.to_string()))?;
            let precision = (args.precision != PrecisionChoice::Auto).then(|| args.precision.resolve(&backend));
            run::check_resume_settings(&saved, &explicit_settings(args, file_train.as_ref(), precision)?)?;
            let sources = RunSources::read(dir)?;
            if let Some(src) = &sources {
                src.check_given(given_model.as_deref(), given_data.as_deref())?;
            }
            c = saved;
            Some((ck, sources))
        }
        (None, true) => return Err(Error::invalid("--resume", "needs --checkpoint-dir")),
        (_, false) => None,
    };
    let sources = resume_from.as_ref().and_then(|(_, s)| s.as_ref());
    let model_spec = sources.map(|s| s.model.clone()).or(given_model).ok_or_else(|| {
        Error::invalid(
            "--model",
            "give a model directory or random:<layers>,<width>,<heads> (or `model` in the TOML file)",
        )
    })?;
    let data_spec = sources.map(|s| s.data.clone()).or(given_data).unwrap_or_else(|| "embedded".into());

    let model = model_from(&backend, &model_spec, c.seed)?;
    let data = data_from(&data_spec, model.config.vocab_size, c.eval_examples, c.seed)?;
    let mut t = match &resume_from {
        Some((ck, _)) => {
            eprintln!("resuming from {}", ck.display());
            let mut t = Trainer::resume(backend.clone(), model, data, ck)?;
            // Only the length may change on resume (the schedule then
            // stretches to the new end).
            if let Some(steps) =
                args.steps.or(file_train.as_ref().and_then(|t| t.get("steps")?.as_integer()).map(|s| s as u64))
            {
                t.config.steps = steps;
            }
            t
        }
        None => Trainer::new(backend.clone(), model, data, c)?,
    };
    if let Some(dir) = &args.init_adapter {
        init_from(&mut t, dir)?;
    }
    // Checked after the run's own settings (those errors come first): a
    // new run must not mix its checkpoints with another run's.
    if let (Some(dir), None) = (&ckpt_dir, &resume_from) {
        if dir.is_dir() {
            if let Some((n, _)) = step_dirs(dir)?.last() {
                return Err(Error::invalid(
                    format!("--checkpoint-dir {}", dir.display()),
                    format!(
                        "already holds checkpoints of a run (up to step {n}): pass --resume to continue it, \
                         or pick an empty directory for a new run"
                    ),
                ));
            }
        }
    }
    if let (Some(dir), None) = (&ckpt_dir, &resume_from) {
        if ckpt_every > 0 {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            RunSources { model: model_spec.clone(), data: data_spec.clone() }.write(dir)?;
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let metrics_path = args.metrics.clone().or(file.metrics).unwrap_or_else(|| out.join("metrics.jsonl"));
    // A resumed run appends: the history before the resume is kept.
    let metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume_from.is_some())
        .truncate(resume_from.is_none())
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut metrics = Some(metrics_file);
    let trainable = t.num_trainable();
    eprintln!(
        "{} on {}: {} trainable of {} base parameters, data {}",
        t.config.method,
        t.backend.describe(),
        trainable,
        t.model.num_params(),
        t.data.name
    );
    let label = t.config.method.clone();
    let (secs, tokens, curve) = run_loop(&mut t, &label, &mut metrics, ckpt_dir.as_deref().map(|d| (d, ckpt_every)))?;
    // The results first: a plot that cannot be written (a full disk) must
    // not cost the trained adapter.
    t.save_result(&out)?;
    let eval = t.evaluate()?;
    let mut curve = curve;
    curve.eval.push((t.iteration, eval.loss));
    let plot = out.join("loss.svg");
    let title = format!("{} fine-tuning of {model_spec} on {data_spec}", t.config.method);
    let plotted = plot_or_warn(&plot, &title, &[curve]);
    let report = serde_json::json!({
        "method": t.config.method, "trainable_params": trainable, "eval": eval,
        "seconds": secs, "tokens_per_s": tokens as f64 / secs.max(1e-9), "saved": out.display().to_string(),
    });
    metrics_line(&mut metrics, serde_json::json!({ "final": report }))?;
    println!("trainable parameters: {trainable}");
    println!(
        "eval: loss {:.4}  perplexity {:.3}  exact match {:.1}%  token accuracy {:.1}%  ({} rows)",
        eval.loss,
        eval.perplexity,
        100.0 * eval.exact_match,
        100.0 * eval.token_accuracy,
        eval.rows
    );
    println!("time {secs:.1} s, {:.0} tokens/s", tokens as f64 / secs.max(1e-9));
    println!(
        "{} saved to {}; metrics in {}",
        if t.adapters.is_some() { "adapter" } else { "model" },
        out.display(),
        metrics_path.display()
    );
    if plotted {
        println!("loss curves: {}", plot.display());
    }
    Ok(())
}

fn print_metrics(name: &str, params: &str, m: &EvalMetrics, extra: &str) {
    println!(
        "{name:<18} {params:>10} {:>9.4} {:>8.3} {:>7.1}% {:>7.1}% {extra}",
        m.loss,
        m.perplexity,
        100.0 * m.exact_match,
        100.0 * m.token_accuracy
    );
}

/// `lorafuse eval` on the backend `--device` picks.
pub fn eval(args: &EvalArgs) -> Result<()> {
    on_backend!(args.sources.device.open()?, eval_on(args))
}

fn eval_on<B: TrainBackend + Clone>(backend: B, args: &EvalArgs) -> Result<()> {
    let spec = args.sources.model.clone().ok_or_else(|| Error::invalid("--model", "required"))?;
    let mut model = model_from(&backend, &spec, args.seed)?;
    let data = data_from(
        args.sources.data.as_deref().unwrap_or("embedded"),
        model.config.vocab_size,
        args.examples,
        args.seed,
    )?;
    if args.seq == 0 || args.seq > model.config.n_positions {
        return Err(Error::invalid(
            format!("--seq {}", args.seq),
            format!("must be between 1 and the model's n_positions = {}", model.config.n_positions),
        ));
    }
    // Every adapter is checked against the model before any evaluation.
    let mut sets = Vec::new();
    for dir in &args.adapter {
        let adapter = load_adapter(dir)?;
        let set = AdapterSet::for_eval(&backend, &model.config, &adapter)
            .map_err(|e| Error::invalid(format!("--adapter {}", dir.display()), e.to_string()))?;
        sets.push((dir, adapter.num_params(), set));
    }
    println!("{:<18} {:>10} {:>9} {:>8} {:>8} {:>8}", "adapter", "params", "loss", "ppl", "exact", "token");
    let base = evaluate(&backend, &mut model, None, &data, 16, args.seq, args.examples)?;
    print_metrics("(base)", "-", &base, "");
    for (dir, n, mut set) in sets {
        let m = evaluate(&backend, &mut model, Some(&mut set), &data, 16, args.seq, args.examples)?;
        print_metrics(&dir.display().to_string(), &n.to_string(), &m, "");
    }
    Ok(())
}

/// Writes a loss plot; a failure (a full disk) is a warning, never the end
/// of a run whose results are already saved.
fn plot_or_warn(path: &Path, title: &str, curves: &[Curve]) -> bool {
    match lorafuse::train::plot::write_svg(path, title, curves) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("warning: loss plot not written: {e}");
            false
        }
    }
}

/// `lorafuse demo` on the backend `--device` picks.
pub fn demo(args: &DemoArgs) -> Result<()> {
    on_backend!(args.device.open()?, demo_on(args))
}

fn demo_on<B: TrainBackend + Clone>(backend: B, args: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    if !DOMAINS.contains(&args.domain.as_str()) {
        return Err(Error::invalid(format!("--domain `{}`", args.domain), format!("known: {}", DOMAINS.join(", "))));
    }
    let cfg = Gpt2Config::new(256, 32, 64, 2, 4)?;
    eprintln!(
        "demo on {} ({}): pretrain a {}-layer, width-{} GPT-2 on all domains ({} iterations), then adapt to `{}`",
        backend.describe(),
        args.precision.resolve(&backend),
        cfg.n_layer,
        cfg.n_embd,
        args.base_steps,
        args.domain
    );
    let base = Gpt2::random(&backend, &cfg, args.seed)?;
    let mixed = Dataset::embedded(&DOMAINS, 4000, 50, args.seed)?;
    let mut pre = TrainConfig {
        method: "full".into(),
        steps: args.base_steps,
        batch: 16,
        seq: 32,
        seed: args.seed,
        precision: args.precision.resolve(&backend),
        ..TrainConfig::default()
    };
    // Held-out loss ten times along the way, for the plot (evaluation
    // draws no random numbers, so the training run is the same without).
    pre.eval_every = (args.base_steps / 10).max(1);
    pre.optim.lr_base = 3e-3;
    pre.optim.warmup = 20;
    pre.optim.weight_decay = 0.0;
    let mut t = Trainer::new(backend.clone(), base, mixed, pre)?;
    let mut metrics = Some(
        std::fs::create_dir_all(&args.out)
            .and_then(|_| std::fs::File::create(args.out.join("metrics.jsonl")))
            .map_err(|e| Error::io(&args.out, e))?,
    );
    let (secs, toks, base_curve) = run_loop(&mut t, "base", &mut metrics, None)?;
    let mut curves = Vec::new();
    let base_dir = args.out.join("base");
    t.model.save(&t.backend, &base_dir)?;
    let base_title =
        format!("Pretraining the demo's {}-layer, width-{} GPT-2 on all embedded domains", cfg.n_layer, cfg.n_embd);
    plot_or_warn(&args.out.join("base-loss.svg"), &base_title, &[base_curve]);
    let base_params = t.model.num_params();
    let mut rows = vec![("base (full)".to_string(), base_params, None, secs, toks as f64 / secs)];
    // The pretraining seed again: the domain's 4,000 training examples are
    // the ones the base saw, and its held-out prompts are drawn after them
    // and kept apart from them, so no held-out prompt was ever trained on
    // (another seed would draw a held-out set that overlaps pretraining).
    let domain = Dataset::embedded(&[args.domain.as_str()], 4000, 200, args.seed)?;
    let mut base_model = Gpt2::load(&backend, &base_dir)?;
    let before = evaluate(&backend, &mut base_model, None, &domain, 32, 32, 200)?;
    let methods: [(&str, usize, f32, f64); 3] =
        [("lora", 4, 8.0, 0.0), ("tied:vBuA", 4, 8.0, 0.0), ("unilora:2048", 4, 1.0, 0.0)];
    for (method, rank, alpha, _) in methods {
        let mut c = TrainConfig {
            method: method.into(),
            rank,
            alpha,
            steps: args.adapter_steps,
            batch: 16,
            seq: 32,
            seed: args.seed,
            answer_only: true,
            eval_examples: 200,
            precision: args.precision.resolve(&backend),
            ..TrainConfig::default()
        };
        c.eval_every = (args.adapter_steps / 8).max(1);
        c.optim.lr = 1e-2;
        c.optim.lr_vector = 3e-2;
        c.optim.lr_theta = 1e-2;
        c.optim.warmup = 10;
        let model = Gpt2::load(&backend, &base_dir)?;
        let mut t = Trainer::new(backend.clone(), model, domain.clone(), c)?;
        let n = t.num_trainable();
        let (secs, toks, mut curve) = run_loop(&mut t, method, &mut metrics, None)?;
        let m = t.evaluate()?;
        curve.eval.push((t.iteration, m.loss));
        curves.push(curve);
        t.save_result(&args.out.join(method.replace(':', "-")))?;
        rows.push((method.to_string(), n, Some(m), secs, toks as f64 / secs));
    }
    println!("\ndomain `{}`: held-out evaluation on answers ({} examples)", args.domain, before.rows);
    println!(
        "{:<18} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "run", "trainable", "loss", "ppl", "exact", "token", "time", "tok/s"
    );
    print_metrics("base, no adapter", "-", &before, "");
    for (name, n, m, secs, tps) in &rows {
        match m {
            Some(m) => print_metrics(name, &n.to_string(), m, &format!("{secs:>7.1}s {tps:>9.0}")),
            None => println!("{name:<18} {n:>10} {:>9} {:>8} {:>8} {:>8} {secs:>7.1}s {tps:>9.0}", "-", "-", "-", "-"),
        }
    }
    let title = format!("Adapters learning `{}` on the pretrained base (loss on answers)", args.domain);
    plot_or_warn(&args.out.join("adapters-loss.svg"), &title, &curves);
    println!("\ntotal {:.1} s; base and adapters saved under {}", start.elapsed().as_secs_f64(), args.out.display());
    println!("loss curves: base-loss.svg, adapters-loss.svg");
    Ok(())
}
