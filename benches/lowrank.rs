//! The fused low-rank linear layer against cuBLAS, the unfused cuBLAS
//! sequence and PyTorch, bf16.
//!
//! GPU (when present), medians of CUDA-event timings after warm-up, two
//! input sets alternated, PyTorch times from `scripts/baselines/lowrank.py`
//! in the same run (`LORAFUSE_TORCH_BASELINES`, same keys):
//! - kernel rows: the shrink `t = x·Aᵀ` and the backward's dy pass (du, dv
//!   only: gB and P from dy, no GEMM) as bytes moved, GB/s and the ratio to
//!   the measured device-to-device copy bandwidth (goal: floor ×1.25, i.e.
//!   ≥ 80 % of copy bandwidth);
//! - decode rows (M ∈ {1, 16}, K = N = 4096, r ∈ {4, 16, 64}): the fused
//!   decode kernel against the cuBLAS base GEMM, the two-launch path it
//!   replaces and the unfused sequence, with GB/s against the floor of
//!   reading W once (goal: fused ≤ 1.05× base); the Gpu's scratch
//!   workspace is warmed before timing, and each row prints how many
//!   scratch allocations the timed calls made (steady state: 0);
//! - layer rows for every shape of `lowrank_shapes()` (GPT-2 small's
//!   linears at batch 8 × 1024, the 4096-wide layers, decode M ∈ {1, 16}):
//!   forward and forward + backward (dx, dA, dB), each / the base GEMM
//!   (x·Wᵀ; training: x·Wᵀ + dx = dy·W), / the unfused cuBLAS sequence
//!   (base GEMM, `t = x·Aᵀ`, `y += s·t·Bᵀ`; its backward
//!   `dx = dy·W`, `gB = dy·B`, `dx += s·gB·A`, `dB = s·dyᵀ·t`,
//!   `dA = s·gBᵀ·x`), the floor `1 + r/K + r/N` (the extra FLOPs), and /
//!   PyTorch's PEFT-style layer;
//! - the packed layout (`lorafuse::lowrank::packed`) next to the
//!   caller-buffer path at M ≥ 512: one GEMM over K + r_pad;
//! - VeRA r = 256 at GPT-2's c_attn shape against LoRA r = 4 there.
//!
//! Goals (issue 13): M=8192 K=N=4096 r=16 fwd ≤ 1.20× base with caller
//! buffers, ≤ 1.08× packed; fwd+bwd ≤ 1.25×, ≤ 1.10× packed; GPT-2 c_fc
//! fwd ≤ 1.25×; decode fused ≤ 1.05× the base GEMM; kernel rows ≤ 1.25×
//! their copy floor; VeRA fwd+bwd ≤ 1.10× LoRA's.
//!
//! CPU: criterion timings of the oracle's forward and backward.

use std::hint::black_box;

use criterion::Criterion;
use cudarc::driver::CudaSlice;
use half::bf16;
use lorafuse::cpu::Cpu;
use lorafuse::cuda::lowrank::{forward_with, gemm_rowmajor, project_down, AdapterView, DecodePath};
use lorafuse::cuda::{bench, Gpu};
use lorafuse::dtype::convert;
use lorafuse::lowrank::packed::{PackedLayout, PackedOps};
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

/// (M, K, N, r) of every layer row; keep in step with SHAPES in
/// scripts/baselines/lowrank.py.
fn lowrank_shapes() -> Vec<(usize, usize, usize, usize)> {
    vec![
        (8192, 768, 768, 4),
        (8192, 768, 2304, 4),
        (8192, 768, 3072, 4),
        (8192, 4096, 4096, 16),
        (8192, 4096, 4096, 64),
        (512, 4096, 4096, 16),
        (8192, 4096, 11008, 16),
        (1, 4096, 4096, 4),
        (1, 4096, 4096, 16),
        (1, 4096, 4096, 64),
        (16, 4096, 4096, 4),
        (16, 4096, 4096, 16),
        (16, 4096, 4096, 64),
    ]
}

fn key(s: LinearShape) -> String {
    format!("M={} K={} N={} r={}", s.m, s.k, s.n, s.r)
}

/// The shrink and the dy pass alone, as bandwidth rows.
fn kernel_rows(gpu: &Gpu, copy_bw: f64) -> Result<()> {
    println!("kernel rows, bf16 (floor: compulsory bytes at the measured copy bandwidth)");
    let mut rng = Rng::new(11);
    for &(m, k, n, r) in &[(8192usize, 768usize, 3072usize, 4usize), (8192, 4096, 4096, 16), (8192, 768, 2304, 256)] {
        let s = LinearShape { m, k, n, r };
        let mut bf = buffers(gpu, s, &mut rng)?;
        let u = gpu.upload(&rng.uniform_vec(r, 0.5, 1.5))?;
        let v = gpu.upload(&rng.uniform_vec(n, 0.5, 1.5))?;
        let (mut du, mut dv) = (gpu.zeros::<f32>(r)?, gpu.zeros::<f32>(n)?);
        let shrink = bench::median_ms(gpu, 3, 30, |i| {
            project_down(gpu, s, &bf.x[i % 2].as_view(), &bf.a.as_view(), &mut bf.t.as_view_mut())
        })?;
        let bytes = (m * k * 2 + m * r * 4 + r * k * 4) as f64;
        println!("{}", bench::report_row(&format!("shrink t = x·Aᵀ M={m} K={k} r={r}"), shrink, bytes, copy_bw));
        let dy_pass = bench::median_ms(gpu, 3, 30, |i| {
            let ad = Adapter::<Gpu> { a: &bf.a, b: &bf.b, u: Some(&u), v: Some(&v), scale: 0.5 };
            let grads = Grads::<Gpu, bf16> { du: Some(&mut du), dv: Some(&mut dv), ..Grads::none() };
            gpu.lowrank_backward(s, &bf.x[i % 2], &bf.w, Some(ad), Some(&bf.t), &bf.dy[i % 2], grads)
        })?;
        let bytes = (m * n * 2 + m * r * 4 + n * r * 4) as f64;
        println!("{}", bench::report_row(&format!("dy pass du,dv M={m} N={n} r={r}"), dy_pass, bytes, copy_bw));
    }
    Ok(())
}

fn print_row(label: &str, ms: f64, base: f64, unfused: f64, floor: f64, torch_key: &str) {
    println!(
        "{label:<40} {:>9.1} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>7.4}  {}",
        ms * 1e3,
        base * 1e3,
        unfused * 1e3,
        ms / base,
        ms / unfused,
        floor,
        bench::vs_torch(torch_key, ms)
    );
}

fn layer_rows(gpu: &Gpu) -> Result<()> {
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7}",
        "bf16 layer", "ours us", "base us", "unfsd us", "x base", "x unfsd", "floor"
    );
    let mut rng = Rng::new(3);
    for (m, k, n, r) in lowrank_shapes() {
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
        print_row(&format!("fwd     {}", key(s)), fused, base, unfused, floor, &format!("lowrank fwd {}", key(s)));
        if m <= 16 {
            continue; // decode: see decode_rows
        }
        let packed = packed_forward_ms(gpu, s, &mut bf, scale, runs)?;
        print_row(
            &format!("fwd     packed {}", key(s)),
            packed,
            base,
            unfused,
            floor,
            &format!("lowrank fwd {}", key(s)),
        );

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
        let tkey = format!("lowrank fwdbwd {}", key(s));
        print_row(&format!("fwd+bwd {}", key(s)), fused_train, base_train, unfused_train, floor, &tkey);
        let packed_train = packed_train_ms(gpu, s, &mut bf, scale, runs)?;
        print_row(&format!("fwd+bwd packed {}", key(s)), packed_train, base_train, unfused_train, floor, &tkey);
    }
    Ok(())
}

/// Calls per timed sample of the decode rows: one decode call is ~10 µs,
/// the size of a launch's overhead, so each sample times a batch of calls
/// queued back to back (as a decoding engine issues them) and divides.
/// Keep in step with DECODE_BATCH in scripts/baselines/lowrank.py.
const DECODE_BATCH: usize = 20;

/// Milliseconds per call of `call`, timed in batches of DECODE_BATCH.
fn per_call_ms(gpu: &Gpu, bf: &mut Buffers, mut call: impl FnMut(usize, &mut Buffers) -> Result<()>) -> Result<f64> {
    let ms = bench::median_ms(gpu, 2, 15, |i| {
        for j in 0..DECODE_BATCH {
            call(i * DECODE_BATCH + j, bf)?;
        }
        Ok(())
    })?;
    Ok(ms / DECODE_BATCH as f64)
}

/// Decode, bf16, M ∈ {1, 16}, K = N = 4096, r ∈ {4, 16, 64}: the fused
/// kernel (`lowrank_decode_fused`, W read once), the cuBLAS base GEMM alone
/// (x·Wᵀ), the two-launch path it replaces (base GEMM + `lowrank_decode`
/// add), the unfused cuBLAS sequence, and the fused kernel's bandwidth
/// against the floor: W, x, y, A and B once at the measured copy
/// bandwidth. Goal (issue 13): fused ≤ 1.05× the base GEMM.
fn decode_rows(gpu: &Gpu, copy_bw: f64) -> Result<()> {
    println!(
        "decode, bf16, per call (batches of {DECODE_BATCH}): {:<26} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "", "fused us", "base us", "2-lnch", "unfsd us", "x base", "x 2-lnch", "GB/s"
    );
    let mut rng = Rng::new(23);
    for &(m, r) in &[(1usize, 4usize), (1, 16), (1, 64), (16, 4), (16, 16), (16, 64)] {
        let s = LinearShape { m, k: 4096, n: 4096, r };
        let mut bf = buffers(gpu, s, &mut rng)?;
        let scale = LowRankConfig::lora(r, 2.0 * r as f32).scale();
        let base = per_call_ms(gpu, &mut bf, |i, bf| {
            gpu.lowrank_forward(s, &bf.x[i % 2], &bf.w, None, None, &mut bf.y, None)
        })?;
        let path = |p: DecodePath| {
            move |i: usize, bf: &mut Buffers| {
                let ad = AdapterView { a: bf.a.as_view(), b: bf.b.as_view(), u: None, v: None, scale };
                let (x, w) = (bf.x[i % 2].as_view(), bf.w.as_view());
                forward_with(gpu, p, s, &x, &w, None, Some(&ad), &mut bf.y.as_view_mut(), Some(&mut bf.t.as_view_mut()))
            }
        };
        // Warm the scratch workspace first: a size's first call allocates
        // its excess, the next grows the Gpu's buffer; from then on no call
        // allocates, which the counters below confirm for the timed calls.
        for p in [DecodePath::Fused, DecodePath::BaseThenAdd] {
            path(p)(0, &mut bf)?;
            path(p)(1, &mut bf)?;
        }
        let cold = gpu.workspace_stats()?;
        let fused = per_call_ms(gpu, &mut bf, path(DecodePath::Fused))?;
        let two = per_call_ms(gpu, &mut bf, path(DecodePath::BaseThenAdd))?;
        let warm = gpu.workspace_stats()?;
        let unfused = per_call_ms(gpu, &mut bf, |i, bf| unfused_forward(gpu, s, bf, i, scale))?;
        let bytes = (s.n * s.k * 2 + m * s.k * 2 + m * s.n * 2 + r * (s.k + s.n) * 4 + m * r * 4) as f64;
        println!(
            "  {:<58} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.3} {:>8.3} {:>7.0}  (goal x base <= 1.05)",
            format!("M={m} K={} N={} r={r}", s.k, s.n),
            fused * 1e3,
            base * 1e3,
            two * 1e3,
            unfused * 1e3,
            fused / base,
            fused / two,
            bytes / (fused * 1e-3) / 1e9,
        );
        println!("    {}", bench::report_row("fused decode vs W-read floor", fused, bytes, copy_bw));
        println!(
            "    scratch: {} KiB workspace, warm before timing; allocations during the timed calls: {}",
            warm.capacity / 1024,
            (warm.grows - cold.grows) + (warm.overflows - cold.overflows)
        );
        println!(
            "    {}",
            bench::report_row("cuBLAS base GEMM vs W-read floor", base, (s.n * s.k * 2) as f64, copy_bw)
        );
        println!("    fused: {}", bench::vs_torch(&format!("lowrank decode fwd {}", key(s)), fused));
        println!("    base:  {}", bench::vs_torch(&format!("lowrank decode base M={m} K={} N={}", s.k, s.n), base));
    }
    Ok(())
}

/// Packed buffers of one layer: x and dy filled once (an owner produces
/// them there; packing is not timed), W packed once.
struct Packed {
    layout: PackedLayout,
    x: [CudaSlice<bf16>; 2],
    w: CudaSlice<bf16>,
    dy: [CudaSlice<bf16>; 2],
}

fn packed(gpu: &Gpu, s: LinearShape, bf: &Buffers, scale: f32) -> Result<Packed> {
    let layout = PackedLayout::new(s, false)?;
    let ad = Adapter::<Gpu> { a: &bf.a, b: &bf.b, u: None, v: None, scale };
    let mut w = gpu.zeros::<bf16>(layout.w_len())?;
    gpu.pack_weight(&layout, &bf.w, None, ad, &mut w)?;
    let pack = |src: &CudaSlice<bf16>, cols: usize, ld: usize| -> Result<CudaSlice<bf16>> {
        let mut dst = gpu.zeros::<bf16>(s.m * ld)?;
        gpu.pack_rows(s.m, cols, ld, src, &mut dst)?;
        Ok(dst)
    };
    let x = [pack(&bf.x[0], s.k, layout.x_ld())?, pack(&bf.x[1], s.k, layout.x_ld())?];
    let dy = [pack(&bf.dy[0], s.n, layout.dy_ld())?, pack(&bf.dy[1], s.n, layout.dy_ld())?];
    Ok(Packed { layout, x, w, dy })
}

fn packed_forward_ms(gpu: &Gpu, s: LinearShape, bf: &mut Buffers, scale: f32, runs: usize) -> Result<f64> {
    let mut p = packed(gpu, s, bf, scale)?;
    bench::median_ms(gpu, 3, runs, |i| {
        let ad = Adapter::<Gpu> { a: &bf.a, b: &bf.b, u: None, v: None, scale };
        gpu.packed_forward(&p.layout, &mut p.x[i % 2], &p.w, ad, &mut bf.y, Some(&mut bf.t))
    })
}

fn packed_train_ms(gpu: &Gpu, s: LinearShape, bf: &mut Buffers, scale: f32, runs: usize) -> Result<f64> {
    let mut p = packed(gpu, s, bf, scale)?;
    bench::median_ms(gpu, 3, runs, |i| {
        let ad = Adapter::<Gpu> { a: &bf.a, b: &bf.b, u: None, v: None, scale };
        gpu.packed_forward(&p.layout, &mut p.x[i % 2], &p.w, ad, &mut bf.y, Some(&mut bf.t))?;
        let grads =
            Grads::<Gpu, bf16> { dx: Some(&mut bf.dx), da: Some(&mut bf.da), db: Some(&mut bf.db), ..Grads::none() };
        gpu.packed_backward(&p.layout, &p.x[i % 2], &p.w, ad, Some(&bf.t), &mut p.dy[i % 2], grads)
    })
}

/// VeRA r = 256 (u, v train, A, B frozen) against LoRA r = 4 (A, B train)
/// at GPT-2's c_attn shape, forward + backward with dx.
fn vera_rows(gpu: &Gpu) -> Result<()> {
    let (m, k, n) = (8192, 768, 2304);
    let mut rng = Rng::new(17);
    let lora = LinearShape { m, k, n, r: 4 };
    let mut lb = buffers(gpu, lora, &mut rng)?;
    let lora_ms = bench::median_ms(gpu, 3, 20, |i| {
        let ad = Adapter::<Gpu> { a: &lb.a, b: &lb.b, u: None, v: None, scale: 16.0 };
        gpu.lowrank_forward(lora, &lb.x[i % 2], &lb.w, None, Some(ad), &mut lb.y, Some(&mut lb.t))?;
        let grads =
            Grads::<Gpu, bf16> { dx: Some(&mut lb.dx), da: Some(&mut lb.da), db: Some(&mut lb.db), ..Grads::none() };
        gpu.lowrank_backward(lora, &lb.x[i % 2], &lb.w, Some(ad), Some(&lb.t), &lb.dy[i % 2], grads)
    })?;
    drop(lb);
    let vera = LinearShape { m, k, n, r: 256 };
    let mut vb = buffers(gpu, vera, &mut rng)?;
    let u = gpu.upload(&vec![0.1f32; 256])?;
    let v = gpu.upload(&rng.uniform_vec(n, -0.1, 0.1))?;
    let (mut du, mut dv) = (gpu.zeros::<f32>(256)?, gpu.zeros::<f32>(n)?);
    let vera_ms = bench::median_ms(gpu, 3, 20, |i| {
        let ad = Adapter::<Gpu> { a: &vb.a, b: &vb.b, u: Some(&u), v: Some(&v), scale: 1.0 };
        gpu.lowrank_forward(vera, &vb.x[i % 2], &vb.w, None, Some(ad), &mut vb.y, Some(&mut vb.t))?;
        let grads = Grads::<Gpu, bf16> { dx: Some(&mut vb.dx), du: Some(&mut du), dv: Some(&mut dv), ..Grads::none() };
        gpu.lowrank_backward(vera, &vb.x[i % 2], &vb.w, Some(ad), Some(&vb.t), &vb.dy[i % 2], grads)
    })?;
    println!(
        "VeRA r=256 fwd+bwd {}: {:.1} us, LoRA r=4 {:.1} us, VeRA / LoRA x{:.3} (goal <= 1.10)  {}",
        key(vera),
        vera_ms * 1e3,
        lora_ms * 1e3,
        vera_ms / lora_ms,
        bench::vs_torch(&format!("vera fwdbwd {}", key(vera)), vera_ms)
    );
    Ok(())
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    let copy_bw = bench::copy_bandwidth(gpu, 1 << 30)?;
    println!("device-to-device copy bandwidth: {:.0} GB/s", copy_bw / 1e9);
    kernel_rows(gpu, copy_bw)?;
    decode_rows(gpu, copy_bw)?;
    layer_rows(gpu)?;
    vera_rows(gpu)
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
