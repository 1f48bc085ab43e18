//! `lorafuse info` and `lorafuse selfcheck`.

use std::time::Instant;

use lorafuse::cpu::Cpu;
use lorafuse::cuda::{self, Gpu};
use lorafuse::projection::{Assignment, Projection, ProjectionLayout, ProjectionOps, ScatterMode};
use lorafuse::rng::Rng;
use lorafuse::testing::compare;
use lorafuse::{Backend, DType, Error, Result};

/// Options of `lorafuse selfcheck`.
#[derive(clap::Args)]
pub struct Args {
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Rows of θ_D (all adapter parameters) in the projection check.
    #[arg(long, default_value_t = 1_000_003)]
    rows: usize,
    /// Columns of θ_d (trainable parameters) in the projection check.
    #[arg(long, default_value_t = 4099)]
    cols: u32,
}

pub fn info() -> Result<()> {
    println!("lorafuse {}", env!("CARGO_PKG_VERSION"));
    let built = cuda::kernels::built();
    println!(
        "kernels compiled: {}",
        if built { "yes (sm_80, sm_90a, compute_80 PTX)" } else { "no (built without nvcc)" }
    );
    match cuda::probe() {
        Ok(gpu) => println!("device: {}", gpu.info()),
        Err(e) => println!("device: none ({e})"),
    }
    println!("cpu: {}", Cpu.describe());
    Ok(())
}

/// A layout shaped like adapters of a few layers, with odd sizes so tiles
/// and segment edges do not line up.
fn sample_layout(rows: usize) -> Result<ProjectionLayout> {
    let per = (rows / 6).max(1);
    let tensors = (0..6).map(|k| (format!("segment.{k}"), [1, if k == 5 { rows - 5 * per } else { per }]));
    ProjectionLayout::packed(DType::F32, tensors)
}

pub fn run(args: &Args) -> Result<()> {
    if args.rows < 6 {
        return Err(Error::invalid("--rows", "must be at least 6"));
    }
    let layout = sample_layout(args.rows)?;
    let mut rng = Rng::new(args.seed);
    let theta: Vec<f32> = rng.uniform_vec(args.cols as usize, -0.02, 0.02);
    let mut ok = true;
    println!("{:<34} {:>12} {:>10}  result", "check", "error", "time");
    for assignment in [Assignment::Hash, Assignment::Balanced] {
        let p = Projection::new(layout.rows(), args.cols, args.seed, assignment)?;
        let t = Instant::now();
        let prep = Cpu.projection_prepare(&p)?;
        let mut segs: Vec<Vec<f32>> = layout.segments().iter().map(|s| vec![0f32; s.len() as usize]).collect();
        Cpu.projection_gather(&prep, &theta, &layout, &mut segs.iter_mut().collect::<Vec<_>>())?;
        let norm_d: f64 = segs.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let used: f64 = theta.iter().zip(&prep.counts).filter(|(_, &n)| n > 0).map(|(&v, _)| (v as f64).powi(2)).sum();
        let iso = (norm_d - used.sqrt()).abs() / used.sqrt();
        let mut back = vec![0f32; args.cols as usize];
        Cpu.projection_scatter(
            &prep,
            &layout,
            &segs.iter().collect::<Vec<_>>(),
            ScatterMode::Deterministic,
            &mut back,
        )?;
        let want = theta.iter().zip(&prep.counts).map(|(&v, &n)| if n > 0 { v as f64 } else { 0.0 });
        let round = compare(back.iter().map(|&v| v as f64), want);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        ok &= report(&format!("cpu {assignment:?} isometry ‖Pθ‖=‖θ‖"), iso, 1e-6, ms);
        ok &= report(&format!("cpu {assignment:?} Pᵀ(Pθ)=θ"), round.rel_frobenius, 1e-6, ms);
        match Gpu::new(0) {
            Ok(gpu) => ok &= gpu_check(&gpu, &p, &layout, &theta, &segs, &back)?,
            Err(e) => println!("{:<34} {:>12} {:>10}  skipped: {e}", format!("gpu {assignment:?}"), "-", "-"),
        }
    }
    if ok {
        println!("selfcheck passed");
        Ok(())
    } else {
        Err(Error::invalid("selfcheck", "some checks failed (see the table above)"))
    }
}

fn report(name: &str, err: f64, tol: f64, ms: f64) -> bool {
    let pass = err <= tol;
    println!("{name:<34} {err:>12.3e} {ms:>8.1}ms  {}", if pass { "ok" } else { "FAILED" });
    pass
}

fn gpu_check(
    gpu: &Gpu,
    p: &Projection,
    layout: &ProjectionLayout,
    theta: &[f32],
    cpu_segs: &[Vec<f32>],
    cpu_back: &[f32],
) -> Result<bool> {
    let t = Instant::now();
    let prep = gpu.projection_prepare(p)?;
    let theta_d = gpu.upload(theta)?;
    let mut segs =
        layout.segments().iter().map(|s| gpu.upload(&vec![f32::NAN; s.len() as usize])).collect::<Result<Vec<_>>>()?;
    gpu.projection_gather(&prep, &theta_d, layout, &mut segs.iter_mut().collect::<Vec<_>>())?;
    let mut out = gpu.upload(&vec![f32::NAN; p.cols() as usize])?;
    gpu.projection_scatter(&prep, layout, &segs.iter().collect::<Vec<_>>(), ScatterMode::Deterministic, &mut out)?;
    let mut mismatched = 0usize;
    for (g, c) in segs.iter().zip(cpu_segs) {
        let g = gpu.download(g)?;
        mismatched += g.iter().zip(c).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    }
    let back = gpu.download(&out)?;
    let err = compare(back.iter().map(|&v| v as f64), cpu_back.iter().map(|&v| v as f64)).rel_frobenius;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let name = format!("gpu {:?}", p.assignment());
    let a = report(&format!("{name} gather bit-identical"), mismatched as f64, 0.0, ms);
    let b = report(&format!("{name} scatter vs cpu"), err, 1e-6, ms);
    Ok(a && b)
}
