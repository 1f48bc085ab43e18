//! Adapter summation: the merge kernel against a device copy of W and
//! against PyTorch's in-place `addmm`, and the Gram-product cosine against
//! the dense form.
//!
//! GPU (when present): W of 4096×4096 and 11008×4096 (N×K as stored; bf16
//! and f32), total rank 16 (one adapter), 64 (4 × r16) and 512 (8 × r64)
//! merged in one launch, timed with CUDA events (median after warm-up, three
//! W buffers rotated so L2 cannot hold them), next to a device-to-device copy
//! of the same W in the same run (the floor: W read once and written once).
//! For bf16 W the dispatching `adapter_merge` is followed by both of its
//! paths (streaming kernel, tensor cores) at every rank. Each row prints
//! time, GB/s, the ratio to the floor and to the copy, and the PyTorch time from `scripts/baselines/adapter_sum.py` (keys
//! `adapter_sum copy|merge <dtype> <N>x<K>[ r<rank>]`). Goals: merge ≤ 1.10×
//! the copy for total rank ≤ 64, ≤ 2.0× at total rank 512.
//!
//! CPU: the Gram-product cosine vs the dense cosine at 4096², r = 16
//! (goal ≥ 100×, same value to 1e-5 relative), then criterion timings of the
//! CPU oracle (merge, similarity, recompression).

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use half::bf16;
use lorafuse::adapter::{Adapter, AdapterConfig, ModuleDelta};
use lorafuse::adapter_sum::{self, AdapterSumOps, MergeShape};
use lorafuse::cpu::Cpu;
use lorafuse::cuda::adapter_sum::{merge_streaming, merge_tensor_cores};
use lorafuse::cuda::{bench, Gpu};
use lorafuse::rng::Rng;
use lorafuse::{Backend, DType, Element, Result};

fn random(seed: u64, n: usize) -> Vec<f32> {
    Rng::new(seed).uniform_vec(n, -1.0, 1.0)
}

fn gpu_merge<T: Element>(gpu: &Gpu, rows: usize, cols: usize, copy_bw: f64) -> Result<()> {
    let host: Vec<T> = random(1, rows * cols).into_iter().map(T::from_f32).collect();
    let mut ws = (0..3).map(|_| gpu.upload(&host)).collect::<Result<Vec<_>>>()?;
    let mut dst = gpu.zeros::<T>(rows * cols)?;
    let copy_ms = bench::median_ms(gpu, 3, 30, |i| gpu.copy(&ws[i % 3], &mut dst))?;
    let bytes = 2.0 * (rows * cols * T::DTYPE.size()) as f64;
    let tag = format!("{} {rows}x{cols}", T::DTYPE);
    let copy_key = format!("adapter_sum copy {tag}");
    println!(
        "{}  {}",
        bench::report_row(&format!("copy W {tag}"), copy_ms, bytes, copy_bw),
        bench::vs_torch(&copy_key, copy_ms)
    );
    for (adapters, r) in [(1, 16), (4, 16), (8, 64)] {
        let rank = adapters * r;
        let shape = MergeShape { rows, cols, rank };
        let left = gpu.upload(&random(2, rank * rows))?;
        let right = gpu.upload(&random(3, rank * cols))?;
        let goal = if rank <= 64 { 1.10 } else { 2.0 };
        let key = format!("adapter_sum merge {tag} r{rank}");
        // bf16 W: both paths at every rank, so the dispatch threshold
        // (TENSOR_CORE_MIN_RANK) can follow the measurement.
        let tensor_cores = T::DTYPE == DType::BF16;
        for path in ["merge", "streaming", "tensor cores"] {
            if path != "merge" && !tensor_cores {
                continue;
            }
            // Alternate signs so repeated merges keep W bounded.
            let ms = bench::median_ms(gpu, 3, 30, |i| {
                let alpha = if i % 2 == 0 { 1e-3 } else { -1e-3 };
                let w = &mut ws[i % 3];
                let (l, r) = (left.slice(..), right.slice(..));
                match path {
                    "streaming" => merge_streaming(gpu, &mut w.slice_mut(..), shape, &l, &r, alpha),
                    "tensor cores" => merge_tensor_cores(gpu, &mut w.slice_mut(..), shape, &l, &r, alpha),
                    _ => gpu.adapter_merge(w, shape, &left, &right, alpha),
                }
            })?;
            let label = format!("{path} {tag} {adapters}x r{r} (rank {rank})");
            let verdict = if ms / copy_ms <= goal { "meets" } else { "MISSES" };
            println!(
                "{}  vs copy x{:.2} ({verdict} ≤{goal})  {}",
                bench::report_row(&label, ms, bytes, copy_bw),
                ms / copy_ms,
                bench::vs_torch(&key, ms)
            );
        }
    }
    Ok(())
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    let copy_bw = bench::copy_bandwidth(gpu, 1 << 30)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)\n", copy_bw / 1e9);
    for (rows, cols) in [(4096, 4096), (11008, 4096)] {
        gpu_merge::<bf16>(gpu, rows, cols, copy_bw)?;
        gpu_merge::<f32>(gpu, rows, cols, copy_bw)?;
    }
    println!("skipped: gpu similarity: the Gram-product cosine runs on the CPU in f64 (r×r products)");
    Ok(())
}

fn one_module(seed: u64, (r, k, n): (usize, usize, usize)) -> Adapter {
    let m = ModuleDelta::lora("m", (r, k, n), random(seed, r * k), random(seed + 1, n * r), 2.0).unwrap();
    Adapter::new(AdapterConfig::lora(r, 2.0 * r as f64, vec!["m".into()]), vec![m]).unwrap()
}

fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// The headline CPU number: Gram vs dense cosine at 4096², r = 16.
fn gram_vs_dense() {
    let dims = (16, 4096, 4096);
    let (a, b) = (one_module(1, dims), one_module(3, dims));
    let (ma, mb) = (&a.deltas().unwrap()[0], &b.deltas().unwrap()[0]);
    let mut dense = 0.0;
    let t_dense = median_secs(5, || dense = adapter_sum::cosine_dense(ma, mb).unwrap());
    let mut gram = 0.0;
    // Warm up (rayon's pool, the allocator's free lists) before timing.
    median_secs(5, || gram = adapter_sum::similarity(&a, &b).unwrap().modules[0].cosine);
    let t_gram = median_secs(51, || gram = adapter_sum::similarity(&a, &b).unwrap().modules[0].cosine);
    let rel = (gram - dense).abs() / dense.abs().max(f64::MIN_POSITIVE);
    println!(
        "cpu cosine 4096x4096 r16: gram {:.3} ms, dense {:.1} ms, speedup x{:.0} (goal ≥ 100), \
         cos {gram:.6e} vs {dense:.6e} (rel diff {rel:.1e}, goal ≤ 1e-5)",
        t_gram * 1e3,
        t_dense * 1e3,
        t_dense / t_gram
    );
}

fn cpu_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("adapter_sum_cpu");
    group.sample_size(10);
    let (rows, cols, rank) = (1024, 4096, 16);
    let shape = MergeShape { rows, cols, rank };
    let (left, right) = (random(2, rank * rows), random(3, rank * cols));
    let mut w32 = random(1, rows * cols);
    group.bench_function("adapter_merge f32 1024x4096 r16", |b| {
        b.iter(|| Cpu.adapter_merge(&mut w32, shape, &left, &right, 1e-3).unwrap())
    });
    let mut w16: Vec<bf16> = random(1, rows * cols).into_iter().map(bf16::from_f32).collect();
    group.bench_function("adapter_merge bf16 1024x4096 r16", |b| {
        b.iter(|| Cpu.adapter_merge(&mut w16, shape, &left, &right, 1e-3).unwrap())
    });
    let dims = (16, 4096, 4096);
    let (a, b) = (one_module(1, dims), one_module(3, dims));
    group.bench_function("similarity gram 4096x4096 r16", |bench| {
        bench.iter(|| black_box(adapter_sum::similarity(&a, &b).unwrap()))
    });
    let (ma, mb) = (a.deltas().unwrap()[0].clone(), b.deltas().unwrap()[0].clone());
    group.bench_function("similarity dense 4096x4096 r16", |bench| {
        bench.iter(|| black_box(adapter_sum::cosine_dense(&ma, &mb).unwrap()))
    });
    let adapters: Vec<Adapter> = (0..4).map(|s| one_module(10 + 2 * s, dims)).collect();
    let sum = adapter_sum::concat_sum(&adapters.iter().collect::<Vec<_>>(), &[1.0; 4]).unwrap();
    group.bench_function("compress 4x r16 -> r16 4096x4096", |bench| {
        bench.iter(|| black_box(adapter_sum::compress(&sum, 16).unwrap()))
    });
    group.finish();
}

fn main() {
    bench::run_gpu_part("adapter_sum (merge vs copy)", gpu_bench);
    gram_vs_dense();
    let mut c = Criterion::default().configure_from_args();
    cpu_bench(&mut c);
    c.final_summary();
}
