//! The `lorafuse` command line.

use clap::{Parser, Subcommand};

mod adapters;
mod device;
mod experiment;
mod selfcheck;
mod train;

/// Fused LoRA-family kernels: inspect the device and check the kernels.
#[derive(Parser)]
#[command(name = "lorafuse", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report the build (kernels compiled or not) and the CUDA device, if any.
    Info,
    /// Run every kernel family on random inputs against the CPU oracle, on
    /// the GPU when there is one, else on the CPU backend alone.
    Selfcheck(selfcheck::Args),
    /// Fine-tune a GPT-2-architecture model: full, LoRA, Tied-LoRA, VeRA or
    /// Uni-LoRA, on the embedded domains, byte text or llm.c token files.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model with and without adapters on a dataset.
    Eval(train::EvalArgs),
    /// Pretrain a tiny base on the embedded data, then train LoRA,
    /// Tied-LoRA and Uni-LoRA adapters on one domain and compare them.
    Demo(train::DemoArgs),
    /// Per-module cosine similarity (interference) of adapters' deltas, their
    /// RMS and norms, from r×r Gram products.
    Similarity(adapters::SimilarityArgs),
    /// The exact sum of adapters as one concatenated adapter (PEFT format).
    Sum(adapters::SumArgs),
    /// Merge adapters into base weights (or take them out with --unmerge).
    Merge(adapters::MergeArgs),
    /// Best rank-r approximation of an adapter (e.g. a sum), with the energy
    /// it discards.
    Compress(adapters::CompressArgs),
    /// Experiments over many adapters; `summation`: when do summed adapters interfere?
    Experiment(experiment::ExperimentArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => selfcheck::info(),
        Command::Selfcheck(args) => selfcheck::run(&args),
        Command::Train(args) => train::train(&args),
        Command::Eval(args) => train::eval(&args),
        Command::Demo(args) => train::demo(&args),
        Command::Similarity(args) => adapters::similarity(&args),
        Command::Sum(args) => adapters::sum(&args),
        Command::Merge(args) => adapters::merge(&args),
        Command::Compress(args) => adapters::compress(&args),
        Command::Experiment(args) => experiment::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
