//! The `lorafuse` command line.

use clap::{Parser, Subcommand};

mod selfcheck;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => selfcheck::info(),
        Command::Selfcheck(args) => selfcheck::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
