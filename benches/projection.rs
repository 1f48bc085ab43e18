//! Uni-LoRA shared projection: gather and scatter against the memory floor
//! and against PyTorch's int64-index gather and `index_add_` scatter.
//!
//! GPU (when present): for D (adapter parameters) ∈ {1M, 16M, 64M} and d
//! (trainable) ∈ {1K, 23,040}, bf16 segments shaped like 96 adapter tensors:
//! the gather, the deterministic scatter in its steady state (the gradient's
//! largest magnitude stays within its factor-16 bucket, so it is read once),
//! the same scatter when the bucket changes on every call (read twice), and
//! the atomic scatter. Each row prints its time, GB/s, the floor (bytes that
//! must move: θ_D written or read once plus θ_d, over the copy bandwidth
//! measured in the same run), the ratio to it, and the PyTorch time of the
//! same work from `scripts/baselines/projection.py` (keys
//! `projection gather|scatter bf16 D=..M d=..`). Goals: gather ≤ 1.2× floor
//! for D ≥ 16M and ≤ 8 µs at D = 1M; deterministic scatter ≤ 2.5× floor for
//! D ≥ 16M.
//!
//! CPU: criterion timings of the oracle.

use std::hint::black_box;

use criterion::Criterion;
use half::bf16;
use lorafuse::cpu::Cpu;
use lorafuse::cuda::{bench, Gpu};
use lorafuse::projection::*;
use lorafuse::rng::Rng;
use lorafuse::{Backend, DType, Result};

const SEGMENTS: usize = 96;

fn layout(rows: u64, dtype: DType) -> ProjectionLayout {
    let per = rows as usize / SEGMENTS;
    let tensors = (0..SEGMENTS).map(|k| {
        let len = if k == SEGMENTS - 1 { rows as usize - per * (SEGMENTS - 1) } else { per };
        (format!("layer{}.{}", k / 2, if k % 2 == 0 { "lora_A" } else { "lora_B" }), [1, len])
    });
    ProjectionLayout::packed(dtype, tensors).unwrap()
}

/// A bench row with its goal verdict and the PyTorch ratio.
fn row(label: &str, ms: f64, floor_bytes: f64, copy_bw: f64, goal: Option<f64>, torch_key: &str) -> String {
    let ratio = ms / (floor_bytes / copy_bw * 1e3);
    let verdict = match goal {
        Some(g) if ratio <= g => format!("meets ≤{g}"),
        Some(g) => format!("MISSES ≤{g}"),
        None => "-".into(),
    };
    format!("{}  {verdict:<12} {}", bench::report_row(label, ms, floor_bytes, copy_bw), bench::vs_torch(torch_key, ms))
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    let copy_bw = bench::copy_bandwidth(gpu, 1 << 30)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)\n", copy_bw / 1e9);
    let mut rng = Rng::new(1);
    for rows in [1u64 << 20, 16 << 20, 64 << 20] {
        let layout = layout(rows, DType::BF16);
        // Three input sets: two of one magnitude, alternated between runs so
        // L2 (50 MB) cannot hold the working set of the large cases, and one
        // 4096× larger (another fixed-point bucket).
        let mut sets: Vec<Vec<_>> = [1.0f32, 1.0, 4096.0]
            .iter()
            .map(|&mag| {
                layout
                    .segments()
                    .iter()
                    .map(|s| {
                        let host: Vec<bf16> =
                            (0..s.len()).map(|_| bf16::from_f32(mag * rng.uniform(-1.0, 1.0) as f32)).collect();
                        gpu.upload(&host)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        for cols in [1u32 << 10, 23_040] {
            let p = Projection::new(rows, cols, 7, Assignment::Hash)?;
            let prep = gpu.projection_prepare(&p)?;
            let theta = gpu.upload(&rng.uniform_vec(cols as usize, -0.02, 0.02))?;
            let mut out = gpu.zeros::<f32>(cols as usize)?;
            let floor = (rows * 2 + cols as u64 * 4) as f64;
            let tag = format!("bf16 D={}M d={cols}", rows >> 20);
            let big = rows >= 16 << 20;
            let (gather_key, scatter_key) = (format!("projection gather {tag}"), format!("projection scatter {tag}"));

            let ms = bench::median_ms(gpu, 3, 20, |i| {
                let mut refs: Vec<_> = sets[i % 2].iter_mut().collect();
                gpu.projection_gather(&prep, &theta, &layout, &mut refs)
            })?;
            let goal = if big { Some(1.2) } else { None };
            println!("{}", row(&format!("gather {tag}"), ms, floor, copy_bw, goal, &gather_key));
            if !big {
                let verdict = if ms * 1e3 <= 8.0 { "meets ≤ 8 us" } else { "MISSES ≤ 8 us" };
                println!("  gather at D = 1M: {:.1} us ({verdict})", ms * 1e3);
            }

            let scatter = |ms: f64, what: &str, goal: Option<f64>| {
                println!("{}", row(&format!("scatter {what} {tag}"), ms, floor, copy_bw, goal, &scatter_key));
            };
            let ms = bench::median_ms(gpu, 3, 20, |i| {
                let refs: Vec<_> = sets[i % 2].iter().collect();
                gpu.projection_scatter(&prep, &layout, &refs, ScatterMode::Deterministic, &mut out)
            })?;
            scatter(ms, "deterministic", if big { Some(2.5) } else { None });
            // Every call lands in another bucket than the last: two reads.
            let ms = bench::median_ms(gpu, 3, 20, |i| {
                let refs: Vec<_> = sets[if i % 2 == 0 { 0 } else { 2 }].iter().collect();
                gpu.projection_scatter(&prep, &layout, &refs, ScatterMode::Deterministic, &mut out)
            })?;
            scatter(ms, "deterministic, new scale each call", None);
            let ms = bench::median_ms(gpu, 3, 20, |i| {
                let refs: Vec<_> = sets[i % 2].iter().collect();
                gpu.projection_scatter(&prep, &layout, &refs, ScatterMode::Atomic, &mut out)
            })?;
            scatter(ms, "atomic", None);
        }
    }
    Ok(())
}

fn cpu_bench(c: &mut Criterion) {
    let rows = 1u64 << 20;
    let cols = 16_384;
    let layout = layout(rows, DType::F32);
    let p = Projection::new(rows, cols, 7, Assignment::Hash).unwrap();
    let prep = Cpu.projection_prepare(&p).unwrap();
    let theta = Rng::new(2).uniform_vec(cols as usize, -0.02, 0.02);
    let mut segs: Vec<Vec<f32>> = layout.segments().iter().map(|s| vec![0.0; s.len() as usize]).collect();
    let mut group = c.benchmark_group("projection_cpu");
    group.sample_size(10);
    group.bench_function("gather f32 D=1M d=16K", |b| {
        b.iter(|| {
            let mut refs: Vec<_> = segs.iter_mut().collect();
            Cpu.projection_gather(&prep, &theta, &layout, &mut refs).unwrap();
        })
    });
    let mut out = vec![0f32; cols as usize];
    group.bench_function("scatter f32 D=1M d=16K", |b| {
        b.iter(|| {
            let refs: Vec<_> = segs.iter().collect();
            Cpu.projection_scatter(&prep, &layout, &refs, ScatterMode::Deterministic, &mut out).unwrap();
            black_box(&out);
        })
    });
    group.finish();
}

fn main() {
    bench::run_gpu_part("projection", gpu_bench);
    let mut c = Criterion::default().configure_from_args();
    cpu_bench(&mut c);
    c.final_summary();
}
