//! The fused low-rank linear layer against cuBLAS and against the unfused
//! sequence, bf16.
//!
//! GPU (when present), for M ∈ {1, 16, 512, 8192}, (K, N) ∈ {(768, 768),
//! (4096, 4096), (4096, 11008)}, r ∈ {4, 16, 64}, plain LoRA (no u, v),
//! medians of CUDA-event timings after warm-up, two input sets alternated:
//! - forward: fused time / base GEMM `x·Wᵀ` alone, and / the unfused
//!   sequence (base GEMM, `t = x·Aᵀ` GEMM, `y += s·t·Bᵀ` GEMM with β = 1;
//!   the scaling folded into α, which is cheaper than PEFT's separate
//!   elementwise pass, so the baseline is if anything flattered);
//! - training (forward + backward with dx, dA, dB): fused / (base forward +
//!   dx GEMM `dy·W`), and / the unfused sequence (its forward, then
//!   `dx = dy·W`, `gB = dy·B`, `dx += s·gB·A`, `dB = s·dyᵀ·t`,
//!   `dA = s·gBᵀ·x`);
//! - next to each, the floor ratio `1 + r/K + r/N` (the extra FLOPs of
//!   the low-rank term over the base GEMM);
//! - at M = 1, the decode latency the adapter adds over the base GEMM, in µs.
//!
//! Goals at M = 8192, K = N = 4096, r = 16: forward ≤ 1.03× base,
//! forward + backward ≤ 1.06× base, ≥ 1.25× faster than unfused; decode
//! extra ≤ 2 µs.
//!
//! CPU: criterion timings of the oracle's forward and backward.

use std::hint::black_box;

use criterion::Criterion;
use cudarc::driver::CudaSlice;
use half::bf16;
use lorafuse::cpu::Cpu;
use lorafuse::cuda::lowrank::gemm_rowmajor;
use lorafuse::cuda::{bench, Gpu};
use lorafuse::dtype::convert;
use lorafuse::lowrank::*;
use lorafuse::rng::Rng;
use lorafuse::{Backend, Result};

struct Buffers {
    x: [CudaSlice<bf16>; 2],
    w: CudaSlice<bf16>,
    dy: [CudaSlice<bf16>; 2],
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    a_t: CudaSlice<bf16>,
    b_t: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    t: CudaSlice<f32>,
    t_t: CudaSlice<bf16>,
    g_t: CudaSlice<bf16>,
    dx: CudaSlice<bf16>,
    da: CudaSlice<f32>,
    db: CudaSlice<f32>,
}

fn upload_bf16(gpu: &Gpu, rng: &mut Rng, n: usize) -> Result<CudaSlice<bf16>> {
    gpu.upload(&convert::<f32, bf16>(&rng.uniform_vec(n, -1.0, 1.0)))
}

fn buffers(gpu: &Gpu, s: LinearShape, rng: &mut Rng) -> Result<Buffers> {
    let LinearShape { m, k, n, r } = s;
    let a = rng.uniform_vec(r * k, -0.05, 0.05);
    let b = rng.uniform_vec(n * r, -0.05, 0.05);
    Ok(Buffers {
        x: [upload_bf16(gpu, rng, m * k)?, upload_bf16(gpu, rng, m * k)?],
        w: upload_bf16(gpu, rng, n * k)?,
        dy: [upload_bf16(gpu, rng, m * n)?, upload_bf16(gpu, rng, m * n)?],
        a_t: gpu.upload(&convert::<f32, bf16>(&a))?,
        b_t: gpu.upload(&convert::<f32, bf16>(&b))?,
        a: gpu.upload(&a)?,
        b: gpu.upload(&b)?,
        y: gpu.zeros(m * n)?,
        t: gpu.zeros(m * r)?,
        t_t: gpu.zeros(m * r)?,
        g_t: gpu.zeros(m * r)?,
        dx: gpu.zeros(m * k)?,
        da: gpu.zeros(r * k)?,
        db: gpu.zeros(n * r)?,
    })
}

/// The unfused forward: three cuBLAS GEMMs.
fn unfused_forward(gpu: &Gpu, s: LinearShape, bf: &mut Buffers, i: usize, scale: f32) -> Result<()> {
    let LinearShape { m, k, n, r } = s;
    let x = bf.x[i % 2].as_view();
    gemm_rowmajor(gpu, (m, n, k), &x, false, &bf.w.as_view(), true, &mut bf.y.as_view_mut(), 1.0, 0.0)?;
    gemm_rowmajor(gpu, (m, r, k), &x, false, &bf.a_t.as_view(), true, &mut bf.t_t.as_view_mut(), 1.0, 0.0)?;
    gemm_rowmajor(
        gpu,
        (m, n, r),
        &bf.t_t.as_view(),
        false,
        &bf.b_t.as_view(),
        true,
        &mut bf.y.as_view_mut(),
        scale,
        1.0,
    )
}

/// The unfused backward with dx, dA, dB.
fn unfused_backward(gpu: &Gpu, s: LinearShape, bf: &mut Buffers, i: usize, scale: f32) -> Result<()> {
    let LinearShape { m, k, n, r } = s;
    let (x, dy) = (bf.x[i % 2].as_view(), bf.dy[i % 2].as_view());
    gemm_rowmajor(gpu, (m, k, n), &dy, false, &bf.w.as_view(), false, &mut bf.dx.as_view_mut(), 1.0, 0.0)?;
    gemm_rowmajor(gpu, (m, r, n), &dy, false, &bf.b_t.as_view(), false, &mut bf.g_t.as_view_mut(), 1.0, 0.0)?;
    gemm_rowmajor(
        gpu,
        (m, k, r),
        &bf.g_t.as_view(),
        false,
        &bf.a_t.as_view(),
        false,
        &mut bf.dx.as_view_mut(),
        scale,
        1.0,
    )?;
    gemm_rowmajor(gpu, (n, r, m), &dy, true, &bf.t_t.as_view(), false, &mut bf.db.as_view_mut(), scale, 1.0)?;
    gemm_rowmajor(gpu, (r, k, m), &bf.g_t.as_view(), true, &x, false, &mut bf.da.as_view_mut(), scale, 1.0)
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7}",
        "bf16 shape", "fused us", "base us", "unfsd us", "x base", "x unfsd", "floor"
    );
    let mut rng = Rng::new(3);
    for &(k, n) in &[(768usize, 768usize), (4096, 4096), (4096, 11008)] {
        for &m in &[1usize, 16, 512, 8192] {
            for &r in &[4usize, 16, 64] {
                let s = LinearShape { m, k, n, r };
                let mut bf = buffers(gpu, s, &mut rng)?;
                let scale = LowRankConfig::lora(r, 2.0 * r as f32).scale();
                let runs = if m * n * k > 1 << 34 { 10 } else { 30 };
                let floor = 1.0 + r as f64 / k as f64 + r as f64 / n as f64;

                let base = bench::median_ms(gpu, 3, runs, |i| {
                    gpu.lowrank_forward(s, &bf.x[i % 2], &bf.w, None, None, &mut bf.y, None)
                })?;
                let fused = bench::median_ms(gpu, 3, runs, |i| {
                    let ad = Adapter::<Gpu> { a: &bf.a, b: &bf.b, u: None, v: None, scale };
                    gpu.lowrank_forward(s, &bf.x[i % 2], &bf.w, None, Some(ad), &mut bf.y, Some(&mut bf.t))
                })?;
                let unfused = bench::median_ms(gpu, 3, runs, |i| unfused_forward(gpu, s, &mut bf, i, scale))?;
                println!(
                    "{:<34} {:>9.1} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>7.4}",
                    format!("forward  M={m} K={k} N={n} r={r}"),
                    fused * 1e3,
                    base * 1e3,
                    unfused * 1e3,
                    fused / base,
                    fused / unfused,
                    floor
                );
                if m == 1 {
                    println!(
                        "{:<34} {:>9.2} us extra over the base GEMM (goal <= 2)",
                        "  decode",
                        (fused - base) * 1e3
                    );
                }

                let base_train = bench::median_ms(gpu, 3, runs, |i| {
                    gpu.lowrank_forward(s, &bf.x[i % 2], &bf.w, None, None, &mut bf.y, None)?;
                    let grads = Grads::<Gpu, bf16> { dx: Some(&mut bf.dx), ..Grads::none() };
                    gpu.lowrank_backward(s, &bf.x[i % 2], &bf.w, None, None, &bf.dy[i % 2], grads)
                })?;
                let fused_train = bench::median_ms(gpu, 3, runs, |i| {
                    let ad = Adapter::<Gpu> { a: &bf.a, b: &bf.b, u: None, v: None, scale };
                    gpu.lowrank_forward(s, &bf.x[i % 2], &bf.w, None, Some(ad), &mut bf.y, Some(&mut bf.t))?;
                    let grads = Grads::<Gpu, bf16> {
                        dx: Some(&mut bf.dx),
                        da: Some(&mut bf.da),
                        db: Some(&mut bf.db),
                        ..Grads::none()
                    };
                    gpu.lowrank_backward(s, &bf.x[i % 2], &bf.w, Some(ad), Some(&bf.t), &bf.dy[i % 2], grads)
                })?;
                let unfused_train = bench::median_ms(gpu, 3, runs, |i| {
                    unfused_forward(gpu, s, &mut bf, i, scale)?;
                    unfused_backward(gpu, s, &mut bf, i, scale)
                })?;
                println!(
                    "{:<34} {:>9.1} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>7.4}",
                    format!("fwd+bwd  M={m} K={k} N={n} r={r}"),
                    fused_train * 1e3,
                    base_train * 1e3,
                    unfused_train * 1e3,
                    fused_train / base_train,
                    fused_train / unfused_train,
                    floor
                );
            }
        }
    }
    Ok(())
}

fn cpu_bench(c: &mut Criterion) {
    let s = LinearShape { m: 128, k: 256, n: 256, r: 16 };
    let mut rng = Rng::new(5);
    let x = rng.uniform_vec(s.m * s.k, -1.0, 1.0);
    let w = rng.uniform_vec(s.n * s.k, -1.0, 1.0);
    let a = rng.uniform_vec(s.r * s.k, -0.1, 0.1);
    let b = rng.uniform_vec(s.n * s.r, -0.1, 0.1);
    let dy = rng.uniform_vec(s.m * s.n, -1.0, 1.0);
    let ad = Adapter::<Cpu> { a: &a, b: &b, u: None, v: None, scale: 2.0 };
    let (mut y, mut t) = (vec![0f32; s.m * s.n], vec![0f32; s.m * s.r]);
    let mut group = c.benchmark_group("lowrank_cpu");
    group.sample_size(10);
    group.bench_function("forward f32 M=128 K=N=256 r=16", |bch| {
        bch.iter(|| {
            Cpu.lowrank_forward(s, &x, &w, None, Some(ad), &mut y, Some(&mut t)).unwrap();
            black_box(&y);
        })
    });
    let (mut dx, mut da, mut db) = (vec![0f32; s.m * s.k], vec![0f32; s.r * s.k], vec![0f32; s.n * s.r]);
    group.bench_function("backward dx+dA+dB f32 M=128 K=N=256 r=16", |bch| {
        bch.iter(|| {
            let grads = Grads::<Cpu, f32> { dx: Some(&mut dx), da: Some(&mut da), db: Some(&mut db), ..Grads::none() };
            Cpu.lowrank_backward(s, &x, &w, Some(ad), Some(&t), &dy, grads).unwrap();
            black_box(&dx);
        })
    });
    group.finish();
}

fn main() {
    bench::run_gpu_part("lowrank", gpu_bench);
    let mut c = Criterion::default().configure_from_args();
    cpu_bench(&mut c);
    c.final_summary();
}
