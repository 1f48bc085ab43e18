//! `lorafuse info` and `lorafuse selfcheck`.

use std::time::Instant;

use half::bf16;
use lorafuse::adapter_sum::{AdapterSumOps, MergeShape};
use lorafuse::cpu::gemm::{matmul, Op};
use lorafuse::cpu::Cpu;
use lorafuse::cuda::{self, Gpu};
use lorafuse::device::Device;
use lorafuse::lowrank::{Adapter, Grads, LinearShape, LowRankConfig, LowRankOps};
use lorafuse::projection::{Assignment, Projection, ProjectionLayout, ProjectionOps, ScatterMode};
use lorafuse::rng::Rng;
use lorafuse::testing::compare;
use lorafuse::{Backend, DType, Error, Result};

/// Options of `lorafuse selfcheck`.
#[derive(clap::Args)]
pub struct Args {
    // `cpu`: the CPU checks alone; `cuda`: fail without a GPU; `auto`: the
    // GPU checks too when a GPU answers and the kernels are built.
    #[command(flatten)]
    device: crate::device::DeviceArg,
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

/// `lorafuse info`: the build and every device it can see (no `--device`:
/// it reports on all of them).
pub fn info() -> Result<()> {
    println!("lorafuse {}", env!("CARGO_PKG_VERSION"));
    let built = cuda::kernels::built();
    if built {
        println!("kernels compiled: yes ({})", cuda::kernels::GENCODE);
    } else {
        println!("kernels compiled: no (built without nvcc)");
    }
    let families: Vec<&str> = cuda::kernels::ALL.iter().map(|f| f.name).collect();
    println!("kernel families: {}", families.join(", "));
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

/// `lorafuse selfcheck`.
pub fn run(args: &Args) -> Result<()> {
    if args.rows < 6 {
        return Err(Error::invalid("--rows", "must be at least 6"));
    }
    let layout = sample_layout(args.rows)?;
    let mut rng = Rng::new(args.seed);
    let theta: Vec<f32> = rng.uniform_vec(args.cols as usize, -0.02, 0.02);
    let mut ok = true;
    // Why the GPU rows are skipped, when they are.
    let gpu: std::result::Result<Gpu, String> = match Device::open(args.device.device.into())? {
        (Device::Cuda(gpu), _) => Ok(gpu),
        (Device::Cpu(_), Some(why)) => Err(why.to_string()),
        (Device::Cpu(_), None) => Err("--device cpu".into()),
    };
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
        match &gpu {
            Ok(gpu) => ok &= gpu_check(gpu, &p, &layout, &theta, &segs, &back)?,
            Err(e) => skipped(&format!("gpu {assignment:?}"), e),
        }
    }
    ok &= lowrank_check(&mut rng, gpu.as_ref().ok())?;
    ok &= merge_check(&mut rng, gpu.as_ref().ok())?;
    if let Err(e) = &gpu {
        skipped("gpu lowrank, gpu merge", e);
    }
    if ok {
        println!("selfcheck passed");
        Ok(())
    } else {
        Err(Error::invalid("selfcheck", "some checks failed (see the table above)"))
    }
}

fn skipped(name: &str, why: &str) {
    println!("{name:<34} {:>12} {:>10}  skipped: {why}", "-", "-");
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

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Fused low-rank update: the CPU op against plain matrix algebra, then (with
/// a GPU) the bf16 kernels' forward and backward against the CPU op. The
/// shape is odd on every axis so no tile lines up.
fn lowrank_check(rng: &mut Rng, gpu: Option<&Gpu>) -> Result<bool> {
    let shape = LinearShape { m: 37, k: 301, n: 259, r: 16 };
    let (m, k, n, r) = (shape.m, shape.k, shape.n, shape.r);
    let cfg = LowRankConfig::lora(r, 32.0);
    let (a, _) = cfg.init_factors(k, n, rng);
    let b = rng.uniform_vec(n * r, -0.1, 0.1);
    let (x, w) = (rng.uniform_vec(m * k, -1.0, 1.0), rng.uniform_vec(n * k, -0.1, 0.1));
    let t0 = Instant::now();
    let adapter = Adapter::<Cpu> { a: &a, b: &b, u: None, v: None, scale: cfg.scale() };
    let mut y = vec![f32::NAN; m * n];
    Cpu.lowrank_forward(shape, &x, &w, None, Some(adapter), &mut y, None)?;
    // y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, straight from the definition.
    let (xd, wd, ad, bd) = (f64s(&x), f64s(&w), f64s(&a), f64s(&b));
    let (mut want, mut t) = (vec![0.0; m * n], vec![0.0; m * r]);
    matmul((m, k, n), &xd, Op::N, &wd, Op::T, &mut want, 1.0, 0.0)?;
    matmul((m, k, r), &xd, Op::N, &ad, Op::T, &mut t, 1.0, 0.0)?;
    matmul((m, r, n), &t, Op::N, &bd, Op::T, &mut want, cfg.scale() as f64, 1.0)?;
    let err = compare(y.iter().map(|&v| v as f64), want.iter().copied()).rel_frobenius;
    let mut ok = report("cpu lowrank forward vs algebra", err, 1e-6, t0.elapsed().as_secs_f64() * 1e3);
    let Some(gpu) = gpu else { return Ok(ok) };

    let t0 = Instant::now();
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let (xh, wh) = (to_bf16(&x), to_bf16(&w));
    let dy = rng.uniform_vec(m * n, -1.0, 1.0);
    let dyh = to_bf16(&dy);
    // The CPU oracle on the same bf16-rounded inputs.
    let mut y_cpu = vec![bf16::ZERO; m * n];
    Cpu.lowrank_forward(shape, &xh, &wh, None, Some(adapter), &mut y_cpu, None)?;
    let (mut dx_cpu, mut da_cpu, mut db_cpu) = (vec![bf16::ZERO; m * k], vec![0f32; r * k], vec![0f32; n * r]);
    let grads =
        Grads::<Cpu, bf16> { dx: Some(&mut dx_cpu), da: Some(&mut da_cpu), db: Some(&mut db_cpu), ..Grads::none() };
    Cpu.lowrank_backward(shape, &xh, &wh, Some(adapter), None, &dyh, grads)?;

    let (xg, wg, ag, bg, dyg) =
        (gpu.upload(&xh)?, gpu.upload(&wh)?, gpu.upload(&a)?, gpu.upload(&b)?, gpu.upload(&dyh)?);
    let gad = Adapter::<Gpu> { a: &ag, b: &bg, u: None, v: None, scale: cfg.scale() };
    let mut yg = gpu.upload(&vec![bf16::NAN; m * n])?;
    let mut tg = gpu.upload(&vec![f32::NAN; m * r])?;
    gpu.lowrank_forward(shape, &xg, &wg, None, Some(gad), &mut yg, Some(&mut tg))?;
    let (mut dxg, mut dag, mut dbg) = (gpu.upload(&vec![bf16::NAN; m * k])?, gpu.zeros(r * k)?, gpu.zeros(n * r)?);
    let grads = Grads::<Gpu, bf16> { dx: Some(&mut dxg), da: Some(&mut dag), db: Some(&mut dbg), ..Grads::none() };
    gpu.lowrank_backward(shape, &xg, &wg, Some(gad), Some(&tg), &dyg, grads)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let tol = lorafuse::DType::BF16.tolerance();
    let cmp_h =
        |g: Vec<bf16>, c: &[bf16]| compare(g.iter().map(|v| v.to_f64()), c.iter().map(|v| v.to_f64())).rel_frobenius;
    let cmp_f = |g: Vec<f32>, c: &[f32]| compare(f64s(&g), f64s(c)).rel_frobenius;
    ok &= report("gpu lowrank bf16 y vs cpu", cmp_h(gpu.download(&yg)?, &y_cpu), tol, ms);
    ok &= report("gpu lowrank bf16 dx vs cpu", cmp_h(gpu.download(&dxg)?, &dx_cpu), tol, ms);
    ok &= report("gpu lowrank bf16 dA vs cpu", cmp_f(gpu.download(&dag)?, &da_cpu), tol, ms);
    ok &= report("gpu lowrank bf16 dB vs cpu", cmp_f(gpu.download(&dbg)?, &db_cpu), tol, ms);
    Ok(ok)
}

/// Merge into base weights: the CPU op against plain algebra, then (with a
/// GPU) the bf16 merge kernel against the CPU op.
fn merge_check(rng: &mut Rng, gpu: Option<&Gpu>) -> Result<bool> {
    let shape = MergeShape { rows: 131, cols: 517, rank: 24 };
    let (rows, cols, rank) = (shape.rows, shape.cols, shape.rank);
    let w = rng.uniform_vec(rows * cols, -1.0, 1.0);
    let (left, right) = (rng.uniform_vec(rank * rows, -0.3, 0.3), rng.uniform_vec(rank * cols, -0.3, 0.3));
    let t0 = Instant::now();
    let mut merged = w.clone();
    Cpu.adapter_merge(&mut merged, shape, &left, &right, 1.0)?;
    let mut want = f64s(&w);
    matmul((rows, rank, cols), &f64s(&left), Op::T, &f64s(&right), Op::N, &mut want, 1.0, 1.0)?;
    let err = compare(f64s(&merged), want).rel_frobenius;
    let mut ok = report("cpu merge vs algebra", err, 1e-6, t0.elapsed().as_secs_f64() * 1e3);
    let Some(gpu) = gpu else { return Ok(ok) };
    let t0 = Instant::now();
    let wh: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut cpu_w = wh.clone();
    Cpu.adapter_merge(&mut cpu_w, shape, &left, &right, 1.0)?;
    let mut gw = gpu.upload(&wh)?;
    gpu.adapter_merge(&mut gw, shape, &gpu.upload(&left)?, &gpu.upload(&right)?, 1.0)?;
    let got = gpu.download(&gw)?;
    let err = compare(got.iter().map(|v| v.to_f64()), cpu_w.iter().map(|v| v.to_f64())).rel_frobenius;
    ok &= report("gpu merge bf16 vs cpu", err, lorafuse::DType::BF16.tolerance(), t0.elapsed().as_secs_f64() * 1e3);
    Ok(ok)
}
