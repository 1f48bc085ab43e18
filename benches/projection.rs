//! Uni-LoRA shared projection: gather and scatter against the memory floor.
//!
//! GPU (when present): for D (adapter parameters) from 1M to 64M and d
//! (trainable) from 1K to 1M, bf16 segments shaped like 96 adapter tensors,
//! the time of gather and of both scatter modes, next to the floor: the bytes
//! that must move (θ_D written or read once, θ_d once) over the device copy
//! bandwidth measured in the same run. Goals at D ≥ 16M: gather ≤ 1.15×,
//! scatter ≤ 1.3× the floor.
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

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    let copy_bw = bench::copy_bandwidth(gpu, 1 << 30)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)\n", copy_bw / 1e9);
    let mut rng = Rng::new(1);
    for rows in [1u64 << 20, 16 << 20, 64 << 20] {
        let layout = layout(rows, DType::BF16);
        // Two input sets, alternated between runs, so L2 (50 MB) cannot hold
        // the working set of the large cases.
        let sets: Vec<Vec<_>> = (0..2)
            .map(|_| {
                layout
                    .segments()
                    .iter()
                    .map(|s| {
                        let host: Vec<bf16> =
                            (0..s.len()).map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0) as f32)).collect();
                        gpu.upload(&host)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let mut sets = sets;
        for cols in [1u32 << 10, 1 << 16, 1 << 20] {
            let p = Projection::new(rows, cols, 7, Assignment::Hash)?;
            let prep = gpu.projection_prepare(&p)?;
            let theta = gpu.upload(&rng.uniform_vec(cols as usize, -0.02, 0.02))?;
            let mut out = gpu.zeros::<f32>(cols as usize)?;
            let floor = (rows * 2 + cols as u64 * 4) as f64;
            let tag = format!("D={}M d={}K", rows >> 20, cols >> 10);
            let ms = bench::median_ms(gpu, 3, 20, |i| {
                let mut refs: Vec<_> = sets[i % 2].iter_mut().collect();
                gpu.projection_gather(&prep, &theta, &layout, &mut refs)
            })?;
            println!("{}", bench::report_row(&format!("gather bf16 {tag}"), ms, floor, copy_bw));
            for mode in [ScatterMode::Deterministic, ScatterMode::Atomic] {
                let ms = bench::median_ms(gpu, 3, 20, |i| {
                    let refs: Vec<_> = sets[i % 2].iter().collect();
                    gpu.projection_scatter(&prep, &layout, &refs, mode, &mut out)
                })?;
                println!("{}", bench::report_row(&format!("scatter {mode:?} bf16 {tag}"), ms, floor, copy_bw));
            }
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
