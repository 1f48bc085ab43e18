//! `lorafuse similarity`, `sum`, `merge` and `compress`: adapter summation
//! ([`lorafuse::adapter_sum`], [`lorafuse::merge`]) from the command line.
//! `merge` runs on the backend `--device` picks; both give the same result
//! within the dtype's tolerance. Similarity, sums and recompression are
//! r×r-sized host work in f64 and need no device.

use std::path::{Path, PathBuf};

use crate::device::{on_backend, DeviceArg};
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::adapter::Adapter;
use lorafuse::adapter_sum::{self, AdapterSumOps, Direction, Similarity};
use lorafuse::merge::{refuse_overwriting_inputs, MergePlan};
use lorafuse::peft;
use lorafuse::tensor_file::{self, TensorFile};
use lorafuse::{DType, Error, Result};

/// Options of `lorafuse similarity`.
#[derive(clap::Args)]
pub struct SimilarityArgs {
    /// Adapter directories (adapter_config.json + adapter_model.safetensors), at least two.
    #[arg(required = true, num_args = 2..)]
    adapters: Vec<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Options of `lorafuse sum`.
#[derive(clap::Args)]
pub struct SumArgs {
    /// Adapter directories to add.
    #[arg(required = true)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (default: all 1).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    weights: Option<Vec<f64>>,
    /// Output adapter directory (PEFT format).
    #[arg(long)]
    out: PathBuf,
    /// Float type of the written factors.
    #[arg(long, default_value = "f32")]
    dtype: DType,
}

/// Options of `lorafuse merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Base model weights (safetensors).
    #[arg(long)]
    base: PathBuf,
    /// Adapter directories to merge in (or take out, with --unmerge).
    #[arg(required = true)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (default: all 1).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    weights: Option<Vec<f64>>,
    /// Output safetensors file (every other tensor copied unchanged).
    #[arg(long)]
    out: PathBuf,
    /// Subtract the adapters instead: the inverse of a merge.
    #[arg(long)]
    unmerge: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// Options of `lorafuse compress`.
#[derive(clap::Args)]
pub struct CompressArgs {
    /// Adapter directory to compress.
    adapter: PathBuf,
    /// Rank to keep per module.
    #[arg(long)]
    rank: usize,
    /// Output adapter directory (PEFT format).
    #[arg(long)]
    out: PathBuf,
    /// Float type of the written factors.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn load_all(paths: &[PathBuf]) -> Result<Vec<Adapter>> {
    paths.iter().map(|p| peft::load_adapter(p)).collect()
}

fn weights_or_ones(weights: &Option<Vec<f64>>, n: usize) -> Vec<f64> {
    weights.clone().unwrap_or_else(|| vec![1.0; n])
}

fn json_out(value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::invalid("json output", e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// `lorafuse similarity`.
pub fn similarity(args: &SimilarityArgs) -> Result<()> {
    let adapters = load_all(&args.adapters)?;
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let mut pairs = Vec::new();
    for i in 0..refs.len() {
        for j in i + 1..refs.len() {
            pairs.push((i, j, adapter_sum::similarity(refs[i], refs[j])?));
        }
    }
    let matrix = adapter_sum::similarity_matrix(&refs)?;
    if args.json {
        let pairs: Vec<serde_json::Value> =
            pairs.iter().map(|(i, j, s)| serde_json::json!({"a": i, "b": j, "similarity": s})).collect();
        let names: Vec<String> = args.adapters.iter().map(|p| p.display().to_string()).collect();
        return json_out(&serde_json::json!({"adapters": names, "pairs": pairs, "rms_cosine_matrix": matrix}));
    }
    for (i, j, s) in &pairs {
        println!("{} vs {}", args.adapters[*i].display(), args.adapters[*j].display());
        print_similarity(s);
        println!();
    }
    println!("RMS cosine matrix:");
    for (i, row) in matrix.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>8.4}")).collect();
        println!("  [{i}] {}  {}", cells.join(" "), args.adapters[i].display());
    }
    Ok(())
}

fn print_similarity(s: &Similarity) {
    let width = s.modules.iter().map(|m| m.name.len()).max().unwrap_or(6).max(6);
    println!("  {:<width$} {:>10} {:>12} {:>12}", "module", "cosine", "‖ΔW_a‖", "‖ΔW_b‖");
    for m in &s.modules {
        println!("  {:<width$} {:>10.6} {:>12.5e} {:>12.5e}", m.name, m.cosine, m.norm_a, m.norm_b);
    }
    println!("  RMS cosine over {} shared modules: {:.6}", s.modules.len(), s.rms_cosine);
    if !s.only_in_a.is_empty() || !s.only_in_b.is_empty() {
        println!("  only in a: {:?}; only in b: {:?}", s.only_in_a, s.only_in_b);
    }
}

/// `lorafuse sum`.
pub fn sum(args: &SumArgs) -> Result<()> {
    refuse_overwriting_inputs(&args.out, &args.adapters.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let adapters = load_all(&args.adapters)?;
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let sum = adapter_sum::concat_sum(&refs, &weights_or_ones(&args.weights, refs.len()))?;
    peft::save_adapter_as(&args.out, &sum, args.dtype)?;
    let deltas = sum.deltas()?;
    let ranks: Vec<usize> = deltas.iter().map(|m| m.rank).collect();
    println!(
        "wrote {} ({} modules, ranks {}..={}): the exact sum, nothing discarded",
        args.out.display(),
        deltas.len(),
        ranks.iter().min().unwrap_or(&0),
        ranks.iter().max().unwrap_or(&0)
    );
    Ok(())
}

/// `lorafuse compress`.
pub fn compress(args: &CompressArgs) -> Result<()> {
    refuse_overwriting_inputs(&args.out, &[&args.adapter])?;
    let adapter = peft::load_adapter(&args.adapter)?;
    let c = adapter_sum::compress(&adapter, args.rank)?;
    peft::save_adapter_as(&args.out, &c.adapter, args.dtype)?;
    if args.json {
        return json_out(&serde_json::json!({"modules": c.modules, "discarded_energy": c.discarded_energy}));
    }
    let width = c.modules.iter().map(|m| m.name.len()).max().unwrap_or(6).max(6);
    println!("{:<width$} {:>6} {:>6} {:>12}", "module", "rank", "kept", "discarded");
    for m in &c.modules {
        println!("{:<width$} {:>6} {:>6} {:>11.4}%", m.name, m.rank_before, m.rank_after, percent(m.discarded_energy));
    }
    println!("discarded energy overall: {:.4}% of ‖ΔW‖²; wrote {}", percent(c.discarded_energy), args.out.display());
    Ok(())
}

/// A fraction as a percentage for printing; rounding can make an energy
/// difference a tiny negative number, which would print as `-0.0000%`.
fn percent(fraction: f64) -> f64 {
    (100.0 * fraction).max(0.0)
}

/// Merges `plan` into `base` on `backend` under a progress bar (bytes of
/// base weights rewritten); returns the backend in words.
fn merge_on<B: AdapterSumOps>(
    backend: B,
    base: &mut TensorFile,
    plan: &MergePlan,
    direction: Direction,
) -> Result<String> {
    let bar = ProgressBar::new(plan.bytes(base)).with_style(
        ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            .map_err(|e| Error::invalid("progress style", e.to_string()))?,
    );
    plan.apply(&backend, base, direction, |entry, bytes| {
        bar.set_message(entry.factors.name.clone());
        bar.inc(bytes);
    })?;
    bar.finish_and_clear();
    Ok(backend.describe())
}

/// Runs `work` under a spinner (large base files take seconds to read and
/// write); indicatif draws nothing when stderr is not a terminal.
fn with_spinner<R>(message: &str, work: impl FnOnce() -> Result<R>) -> Result<R> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(message.to_string());
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let result = work();
    spinner.finish_and_clear();
    result
}

/// `lorafuse merge`.
pub fn merge(args: &MergeArgs) -> Result<()> {
    let mut inputs: Vec<&Path> = args.adapters.iter().map(PathBuf::as_path).collect();
    inputs.push(&args.base);
    refuse_overwriting_inputs(&args.out, &inputs)?;
    let adapters = load_all(&args.adapters)?;
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let factors = adapter_sum::merge_factors(&refs, &weights_or_ones(&args.weights, refs.len()))?;
    let device = args.device.open()?;
    let mut base =
        with_spinner(&format!("reading {}", args.base.display()), || tensor_file::read_safetensors(&args.base))?;
    let plan = MergePlan::new(factors, &base, &args.base.display().to_string())?;
    let direction = if args.unmerge { Direction::Unmerge } else { Direction::Merge };
    let device = on_backend!(device, merge_on(&mut base, &plan, direction))?;
    with_spinner(&format!("writing {}", args.out.display()), || tensor_file::write_safetensors(&args.out, &base))?;
    let verb = if args.unmerge { "unmerged" } else { "merged" };
    println!(
        "{verb} {} modules of {} adapter(s) on {device}; wrote {}",
        plan.entries.len(),
        refs.len(),
        args.out.display()
    );
    Ok(())
}
