//! `lorafuse similarity`, `sum`, `merge` and `compress`: adapter summation
//! from the command line. Merges run on the GPU when there is one (and the
//! kernels were compiled), on the CPU otherwise; both give the same result
//! within the dtype's tolerance.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::adapter::Adapter;
use lorafuse::adapter_sum::{self, AdapterSumOps, Direction, MergeFactors, Similarity};
use lorafuse::cpu::Cpu;
use lorafuse::cuda::{self, Gpu};
use lorafuse::peft::{self, Tensor, TensorData};
use lorafuse::{Backend, DType, Element, Error, Result};

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
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
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

/// Refuses an output path that is one of the inputs (or inside one), so
/// that a command never destroys what it reads.
fn refuse_overwriting_inputs(out: &Path, inputs: &[&Path]) -> Result<()> {
    // Compare resolved paths; an output that does not exist yet cannot be
    // an input, but its parent may be (an adapter directory).
    let resolve = |p: &Path| std::fs::canonicalize(p).ok();
    let out_abs = resolve(out).or_else(|| {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(resolve(parent)?.join(out.file_name()?))
    });
    let Some(out_abs) = out_abs else { return Ok(()) };
    for input in inputs {
        if let Some(inp) = resolve(input) {
            if out_abs == inp || out_abs.starts_with(&inp) {
                return Err(Error::invalid(
                    format!("--out {}", out.display()),
                    format!("is the input {}: writing there would destroy it; pick another --out", input.display()),
                ));
            }
        }
    }
    Ok(())
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

/// The base tensor a module's delta goes into: `<module>.weight`, else the
/// one tensor named `….<module>.weight`, else `<module>` with leading path
/// components dropped (PEFT names GPT-2's modules `transformer.h.0…`, the
/// original checkpoint `h.0…`).
fn resolve_weight<'a>(module: &str, names: &'a [String]) -> Option<&'a String> {
    let exact = format!("{module}.weight");
    if let Some(n) = names.iter().find(|n| **n == exact) {
        return Some(n);
    }
    let suffix = format!(".{exact}");
    let mut longer = names.iter().filter(|n| n.ends_with(&suffix));
    if let (Some(n), None) = (longer.next(), longer.next()) {
        return Some(n);
    }
    let mut tail = module;
    while let Some((_, rest)) = tail.split_once('.') {
        tail = rest;
        let want = format!("{tail}.weight");
        if let Some(n) = names.iter().find(|n| **n == want) {
            return Some(n);
        }
    }
    None
}

fn merge_typed<B: AdapterSumOps, T: Element>(
    backend: &B,
    values: &mut Vec<T>,
    f: &MergeFactors,
    direction: Direction,
) -> Result<()> {
    let mut w = backend.upload(values)?;
    adapter_sum::merge_module(backend, &mut w, f, direction)?;
    *values = backend.download(&w)?;
    Ok(())
}

fn merge_tensor<B: AdapterSumOps>(
    backend: &B,
    name: &str,
    t: &mut Tensor,
    f: &MergeFactors,
    direction: Direction,
) -> Result<()> {
    let (rows, cols) = (f.shape.rows, f.shape.cols);
    if t.shape != [rows, cols] {
        return Err(Error::invalid(
            format!("base tensor `{name}`"),
            format!(
                "has shape {:?} but adapter module `{}` needs [{rows}, {cols}] (check fan_in_fan_out and the base model)",
                t.shape, f.name
            ),
        ));
    }
    match &mut t.data {
        TensorData::F32(v) => merge_typed(backend, v, f, direction),
        TensorData::F16(v) => merge_typed(backend, v, f, direction),
        TensorData::BF16(v) => merge_typed(backend, v, f, direction),
        _ => Err(Error::invalid(format!("base tensor `{name}`"), "is not F32, F16 or BF16")),
    }
}

fn merge_all<B: AdapterSumOps>(
    backend: &B,
    base: &mut peft::TensorFile,
    plan: &[(String, MergeFactors)],
    direction: Direction,
) -> Result<()> {
    let bytes: u64 = plan.iter().map(|(n, _)| base.tensors[n].bytes().len() as u64).sum();
    let bar = ProgressBar::new(bytes).with_style(
        ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            .map_err(|e| Error::invalid("progress style", e.to_string()))?,
    );
    for (name, f) in plan {
        bar.set_message(f.name.clone());
        let t = base.tensors.get_mut(name).ok_or_else(|| Error::invalid("merge", format!("`{name}` vanished")))?;
        merge_tensor(backend, name, t, f, direction)?;
        // An overflow (huge weights, or an f16 base past 65504) must not
        // reach the output file as inf/NaN.
        crate_check_finite(name, t)?;
        bar.inc(t.bytes().len() as u64);
    }
    backend.synchronize()?;
    bar.finish_and_clear();
    Ok(())
}

fn crate_check_finite(name: &str, t: &Tensor) -> Result<()> {
    let values = t.to_f32_vec(name)?;
    lorafuse::error::check_finite(&format!("merged tensor `{name}` ({:?})", t.safetensors_dtype()), &values).map_err(
        |e| {
            Error::invalid(
                "merge",
                format!("{e}: the result overflows the base's dtype; check --weights and the adapters' scales"),
            )
        },
    )
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
    let mut base = with_spinner(&format!("reading {}", args.base.display()), || peft::read_safetensors(&args.base))?;
    let names: Vec<String> = base.tensors.keys().cloned().collect();
    let mut plan = Vec::new();
    for (module, f) in factors {
        let Some(name) = resolve_weight(&module, &names) else {
            return Err(Error::invalid(
                "merge",
                format!("no tensor `{module}.weight` (or a suffix of it) in {}", args.base.display()),
            ));
        };
        if let Some((_, other)) = plan.iter().find(|(n, _): &&(String, MergeFactors)| n == name) {
            return Err(Error::invalid(
                "merge",
                format!("modules `{}` and `{module}` both resolve to base tensor `{name}`", other.name),
            ));
        }
        plan.push((name.clone(), f));
    }
    let direction = if args.unmerge { Direction::Unmerge } else { Direction::Merge };
    let gpu = if args.cpu || !cuda::kernels::built() { None } else { Gpu::new(0).ok() };
    let device = match &gpu {
        Some(gpu) => {
            merge_all(gpu, &mut base, &plan, direction)?;
            gpu.describe()
        }
        None => {
            merge_all(&Cpu, &mut base, &plan, direction)?;
            Cpu.describe()
        }
    };
    with_spinner(&format!("writing {}", args.out.display()), || peft::write_safetensors(&args.out, &base))?;
    let verb = if args.unmerge { "unmerged" } else { "merged" };
    println!("{verb} {} modules of {} adapter(s) on {device}; wrote {}", plan.len(), refs.len(), args.out.display());
    Ok(())
}
