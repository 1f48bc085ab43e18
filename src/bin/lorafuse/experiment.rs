//! `lorafuse experiment summation`: the adapter-summation study
//! ([`lorafuse::experiment::summation`]) from the command line.

use std::path::PathBuf;
use std::time::Instant;

use crate::device::{on_backend, DeviceArg, PrecisionChoice};
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::experiment::domains;
use lorafuse::experiment::summation::{self, AdapterRecord, Progress, SummationConfig};
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::data::BYTE_VOCAB;
use lorafuse::train::trainer::TrainConfig;
use lorafuse::train::TrainBackend;
use lorafuse::Result;

/// Options of `lorafuse experiment`.
#[derive(clap::Args)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Train one adapter per domain and one per pair (or triple) of domains
    /// on their merged data; compare each combination's exact sum with its
    /// merged-data adapter on held-out perplexity, against the RMS cosine
    /// of the summed adapters; fit a line, write a table, JSON and a plot.
    Summation(Box<SummationArgs>),
}

/// Options of `lorafuse experiment summation`. Defaults without `--model`
/// suit the demo's tiny base on the embedded domains; with `--model` they
/// follow the paper (GPT-2 small, r = 4, α = 64).
#[derive(clap::Args)]
pub struct SummationArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Base model directory (config.json + model.safetensors, GPT-2
    /// naming). Default: pretrain the demo's tiny base on the domains'
    /// training data into <out>/base (reused on reruns).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Pretraining iterations of the tiny base (without --model).
    #[arg(long, default_value_t = 3000)]
    base_steps: u64,
    /// A domain's data, repeated per domain: `NAME=tokens:<file>` (llm.c
    /// token file), `NAME=text:<file>` (bytes), or `embedded[:add,sort,…]`
    /// (each listed embedded domain is one domain). Default: `embedded`
    /// (add, sort, recall, reverse).
    #[arg(long)]
    data: Vec<String>,
    /// Combinations of three domains instead of pairs.
    #[arg(long)]
    triples: bool,
    /// Adapter method: lora, tied[:vBuA], vera, unilora:<d>.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Adapter rank.
    #[arg(long, default_value_t = 4)]
    rank: usize,
    /// Adapter α [default: 8, or 64 with --model].
    #[arg(long)]
    alpha: Option<f32>,
    /// Comma-separated target modules [default: all four linears].
    #[arg(long)]
    targets: Option<String>,
    /// Iterations of every adapter, single-domain and merged alike
    /// [default: 600, or 1000 with --model].
    #[arg(long)]
    steps: Option<u64>,
    /// Rows per batch [default: 16, or 8 with --model].
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per row [default: 32, or 256 with --model].
    #[arg(long)]
    seq: Option<usize>,
    /// Learning rate of the adapter factors [default: 2e-3, or 2e-4 with --model].
    #[arg(long)]
    lr: Option<f64>,
    /// Warmup iterations.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Seed of the data (embedded examples, batch order) and the tiny base.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seed each adapter's initialisation is derived from (per adapter,
    /// from its label) [default: --seed].
    #[arg(long)]
    init_seed: Option<u64>,
    /// Start every adapter from the same initialisation (shows how much a
    /// shared start adds to the cosine).
    #[arg(long)]
    same_init: bool,
    /// Training examples per embedded domain.
    #[arg(long, default_value_t = 4000)]
    train_examples: usize,
    /// Held-out examples (or windows) scored per domain.
    #[arg(long, default_value_t = 400)]
    eval_examples: usize,
    /// Checkpoint a training adapter every N iterations (0: keep finished
    /// adapters only).
    #[arg(long, default_value_t = 200)]
    checkpoint_every: u64,
    /// Output directory: adapters, sums, checkpoints, report.json,
    /// summation.svg. Rerunning into it resumes.
    #[arg(long, default_value = "lorafuse-summation")]
    out: PathBuf,
    /// Compute dtype (`auto`: bf16 on a GPU with tensor cores, else f32).
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
}

/// `lorafuse experiment …`.
pub fn run(args: &ExperimentArgs) -> Result<()> {
    match &args.which {
        Which::Summation(a) => on_backend!(a.device.open()?, summation_on(a)),
    }
}

/// Progress bars on stderr: one per adapter, and a line when it is done.
struct Bars {
    bar: Option<ProgressBar>,
    prefix: String,
}

impl Progress for Bars {
    fn stage(&mut self, message: &str) {
        eprintln!("{message}");
    }
    fn adapter_start(&mut self, index: usize, total: usize, label: &str, steps: u64, from: u64) {
        let bar = ProgressBar::new(steps);
        if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}") {
            bar.set_style(style.progress_chars("=> "));
        }
        self.prefix = format!("[{}/{}] {label}", index + 1, total);
        bar.set_prefix(self.prefix.clone());
        bar.set_position(from);
        if from > 0 {
            bar.println(format!("{}: continuing from the checkpoint at iteration {from}", self.prefix));
        }
        self.bar = Some(bar);
    }
    fn step(&mut self, iteration: u64, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(iteration);
            bar.set_message(format!("loss {loss:.4}"));
        }
    }
    fn adapter_done(&mut self, r: &AdapterRecord, reused: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let how =
            if reused { "finished earlier, reused".to_string() } else { format!("trained in {:.1} s", r.seconds) };
        eprintln!("{:<24} {} iterations, final loss {:.4}: {how}", r.label, r.steps, r.final_loss);
    }
}

fn summation_on<B: TrainBackend + Clone>(backend: B, args: &SummationArgs) -> Result<()> {
    let start = Instant::now();
    let real = args.model.is_some();
    let vocab = match &args.model {
        Some(dir) => Gpt2Config::load(&dir.join("config.json"))?.vocab_size,
        None => BYTE_VOCAB,
    };
    let domains = domains::from_specs(&args.data, vocab, args.train_examples, args.eval_examples, args.seed)?;
    let precision = args.precision.resolve(&backend);
    let mut train = TrainConfig {
        method: args.method.clone(),
        rank: args.rank,
        alpha: args.alpha.unwrap_or(if real { 64.0 } else { 8.0 }),
        steps: args.steps.unwrap_or(if real { 1000 } else { 600 }),
        batch: args.batch.unwrap_or(if real { 8 } else { 16 }),
        seq: args.seq.unwrap_or(if real { 256 } else { 32 }),
        seed: args.seed,
        answer_only: true,
        eval_examples: args.eval_examples,
        precision,
        ..TrainConfig::default()
    };
    if let Some(t) = &args.targets {
        train.targets = t.split(',').map(|s| s.trim().to_string()).collect();
    }
    train.optim.lr = args.lr.unwrap_or(if real { 2e-4 } else { 2e-3 });
    train.optim.lr_vector = 3.0 * train.optim.lr;
    train.optim.lr_theta = train.optim.lr;
    train.optim.warmup = args.warmup;
    let config = SummationConfig {
        arity: if args.triples { 3 } else { 2 },
        train,
        init_seed: args.init_seed.unwrap_or(args.seed),
        same_init: args.same_init,
        eval_examples: args.eval_examples,
        checkpoint_every: args.checkpoint_every,
    };
    config.validate(domains.len())?;
    let mut bars = Bars { bar: None, prefix: String::new() };
    let n = domains.len();
    let combos = lorafuse::experiment::stats::combinations(n, config.arity).len();
    eprintln!(
        "summation experiment on {} ({precision}): {n} domains ({}), {combos} {}, {} adapters of {} iterations each",
        backend.describe(),
        domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
        if config.arity == 2 { "pairs" } else { "triples" },
        n + combos,
        config.train.steps
    );
    let base = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = args.out.join("base");
            eprintln!(
                "base model: the demo's tiny GPT-2 pretrained on the domains' training data ({} iterations)",
                args.base_steps
            );
            let how = summation::TinyBase {
                steps: args.base_steps,
                seed: args.seed,
                precision,
                checkpoint_every: args.checkpoint_every,
            };
            summation::pretrain_tiny_base(&backend, &domains, &how, &dir, &mut bars)?;
            dir
        }
    };
    let report = summation::run(&backend, &base, &domains, &config, &args.out, &mut bars)?;
    let (json, svg) = summation::write_outputs(&report, &args.out)?;
    println!("\n{}", summation::table(&report));
    println!("report: {}\nplot:   {}", json.display(), svg.display());
    println!("total {:.1} s (adapters under {})", start.elapsed().as_secs_f64(), args.out.join("adapters").display());
    Ok(())
}
