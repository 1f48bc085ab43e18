//! Many adapters in one batch, bf16, K = N = 4096, r = 16.
//!
//! GPU (when present), medians of CUDA-event timings after warm-up; every
//! row rotates over four disjoint sets of adapters (and two input sets) so
//! the adapters (16.8 MB per set at decode) are read from memory, not from
//! the 50 MB L2:
//! - decode: 64 requests with 64 distinct adapters, against its read floor
//!   (x, y read and written, 64 adapters' A and B: ≈ 17.8 MB at the
//!   measured copy bandwidth) and against a loop of 64 single-adapter
//!   `lowrank::add_in_place` calls (the baseline the batch replaces);
//! - prefill: 8,192 rows in 8 segments of distinct adapters, against the
//!   single-adapter fused term (`lowrank::add_in_place`) at the same M;
//! - both again with Uni-LoRA adapters served from θ (d = 23,040, one
//!   projection), against the materialised LoRA rows;
//! - each row's PyTorch gathered-`bmm` time from `scripts/baselines/
//!   multi_adapter.py` (same keys) when `LORAFUSE_TORCH_BASELINES` is set.
//!
//! Goals (H100): decode ≤ 1.5× its read floor; prefill ≤ 1.2× the
//! single-adapter fused term; Uni-LoRA from θ ≤ 1.5× materialised; decode
//! ≥ 5× faster than the per-adapter loop.
//!
//! CPU: a criterion timing of the oracle on a small decode batch.

use std::hint::black_box;

use criterion::Criterion;
use cudarc::driver::CudaSlice;
use half::bf16;
use lorafuse::cpu::Cpu;
use lorafuse::cuda::lowrank::{add_in_place, AdapterView};
use lorafuse::cuda::{bench, Gpu};
use lorafuse::lowrank::LinearShape;
use lorafuse::multi_adapter::*;
use lorafuse::projection::{Assignment, Projection};
use lorafuse::rng::Rng;
use lorafuse::{Backend, Result};

const K: usize = 4096;
const N: usize = 4096;
const R: usize = 16;
/// Disjoint adapter sets the timed runs rotate through.
const SETS: usize = 4;
/// Uni-LoRA's d (the GPT-2 figure) and a model-sized D.
const UNI_D: u32 = 23_040;
const UNI_ROWS: u64 = 32 * (R * (K + N)) as u64;

fn upload_bf16(gpu: &Gpu, rng: &mut Rng, n: usize) -> Result<CudaSlice<bf16>> {
    gpu.upload(&rng.uniform_vec(n, -1.0, 1.0).into_iter().map(bf16::from_f32).collect::<Vec<_>>())
}

/// A pool of `SETS × per_set` LoRA adapters, and the same factors as f32
/// device buffers for the single-adapter baseline.
/// Every adapter's `A`, `B` as f32 device buffers (the single-adapter API's form).
type F32Factors = Vec<[CudaSlice<f32>; 2]>;

fn lora_pool(gpu: &Gpu, rng: &mut Rng, per_set: usize) -> Result<(AdapterPool<Gpu, bf16>, F32Factors)> {
    let slots = SETS * per_set;
    let cfg = PoolConfig { k: K, n: N, layers: 1, slots, rank_rows: slots * R, floats: 1 };
    let mut pool = AdapterPool::new(gpu, cfg)?;
    let mut f32s = Vec::with_capacity(slots);
    for slot in 0..slots {
        let a = rng.uniform_vec(R * K, -0.02, 0.02);
        let b = rng.uniform_vec(N * R, -0.02, 0.02);
        let lf = [LayerFactors { a: &a, b: &b, u: None, v: None }];
        pool.fill(gpu, slot, &ServedAdapter::PerLayer { rank: R, scale: 2.0, layers: &lf })?;
        f32s.push([gpu.upload(&a)?, gpu.upload(&b)?]);
    }
    Ok((pool, f32s))
}

/// A pool of `SETS × per_set` Uni-LoRA adapters over one projection.
fn uni_pool(gpu: &Gpu, rng: &mut Rng, per_set: usize) -> Result<AdapterPool<Gpu, bf16>> {
    let slots = SETS * per_set;
    let floats = (slots + 1) * UNI_D as usize;
    let cfg = PoolConfig { k: K, n: N, layers: 1, slots, rank_rows: 1, floats };
    let mut pool = AdapterPool::new(gpu, cfg)?;
    let proj = pool.add_projection(gpu, &Projection::new(UNI_ROWS, UNI_D, 7, Assignment::Hash)?)?;
    let layer =
        [UniLoraLayer { a_start: 5 * (R * (K + N)) as u64, b_start: 5 * (R * (K + N)) as u64 + (R * K) as u64 }];
    for slot in 0..slots {
        let theta = rng.uniform_vec(UNI_D as usize, -0.02, 0.02);
        pool.fill(
            gpu,
            slot,
            &ServedAdapter::UniLora { projection: proj, rank: R, scale: 2.0, theta: &theta, layers: &layer },
        )?;
    }
    Ok(pool)
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    let copy_bw = bench::copy_bandwidth(gpu, 1 << 30)?;
    println!("copy bandwidth {:.0} GB/s (read + write), the floors below use it", copy_bw / 1e9);
    let mut rng = Rng::new(5);
    let el = 2.0; // bf16 bytes
    let adapter_bytes = (R * (K + N)) as f64 * el;

    // ---- decode: 64 requests, 64 distinct adapters -----------------------------
    let m = 64;
    let (pool, f32s) = lora_pool(gpu, &mut rng, m)?;
    let uni = uni_pool(gpu, &mut rng, m)?;
    let x = [upload_bf16(gpu, &mut rng, m * K)?, upload_bf16(gpu, &mut rng, m * K)?];
    let mut y = upload_bf16(gpu, &mut rng, m * N)?;
    let ids: Vec<Vec<i32>> = (0..SETS).map(|s| (0..m as i32).map(|i| (s * m) as i32 + i).collect()).collect();
    let decode_bytes = (m * K) as f64 * el + 2.0 * (m * N) as f64 * el + m as f64 * adapter_bytes;
    let multi = bench::median_ms(gpu, 5, 40, |i| {
        gpu.multi_adapter_add(&pool, 0, RowAdapters::Rows(&ids[i % SETS]), &x[i % 2], &mut y)
    })?;
    let single_loop = bench::median_ms(gpu, 3, 20, |i| {
        let set = i % SETS;
        for row in 0..m {
            let [a, b] = &f32s[set * m + row];
            let ad = AdapterView { a: a.as_view(), b: b.as_view(), u: None, v: None, scale: 2.0 };
            let s = LinearShape { m: 1, k: K, n: N, r: R };
            let xr = x[i % 2].slice(row * K..(row + 1) * K);
            add_in_place(gpu, s, &xr, &ad, &mut y.slice_mut(row * N..(row + 1) * N))?;
        }
        Ok(())
    })?;
    let uni_decode = bench::median_ms(gpu, 5, 40, |i| {
        gpu.multi_adapter_add(&uni, 0, RowAdapters::Rows(&ids[i % SETS]), &x[i % 2], &mut y)
    })?;
    println!("{}", bench::report_row("decode 64 req x 64 adapters r=16", multi, decode_bytes, copy_bw));
    println!("    goal <= 1.5x floor; {}", bench::vs_torch("multi_adapter.decode_m64_a64_r16", multi));
    println!("{}", bench::report_row("  loop of 64 single-adapter calls", single_loop, decode_bytes, copy_bw));
    println!("    loop / batched x{:.2} (goal >= 5)", single_loop / multi);
    // From θ the factors are not read: the floor is x and y only.
    let uni_floor = (m * K) as f64 * el + 2.0 * (m * N) as f64 * el;
    println!("{}", bench::report_row("  Uni-LoRA from theta (floor: x, y)", uni_decode, uni_floor, copy_bw));
    println!(
        "    from theta / materialised x{:.2} (goal <= 1.5); {}",
        uni_decode / multi,
        bench::vs_torch("multi_adapter.unilora_decode_m64_a64_r16", uni_decode)
    );
    drop((pool, f32s, uni, x, y));

    // ---- prefill: 8,192 rows in 8 segments -----------------------------------------
    let (m, segs) = (8192, 8);
    let (pool, f32s) = lora_pool(gpu, &mut rng, segs)?;
    let uni = uni_pool(gpu, &mut rng, segs)?;
    let x = [upload_bf16(gpu, &mut rng, m * K)?, upload_bf16(gpu, &mut rng, m * K)?];
    let mut y = upload_bf16(gpu, &mut rng, m * N)?;
    let starts: Vec<usize> = (0..=segs).map(|s| s * m / segs).collect();
    let seg_ids: Vec<Vec<i32>> = (0..SETS).map(|s| (0..segs as i32).map(|i| (s * segs) as i32 + i).collect()).collect();
    let prefill_bytes = (m * K) as f64 * el + 2.0 * (m * N) as f64 * el + segs as f64 * adapter_bytes;
    let multi = bench::median_ms(gpu, 3, 20, |i| {
        let rows = RowAdapters::Segments { starts: &starts, ids: &seg_ids[i % SETS] };
        gpu.multi_adapter_add(&pool, 0, rows, &x[i % 2], &mut y)
    })?;
    let single = bench::median_ms(gpu, 3, 20, |i| {
        let [a, b] = &f32s[i % SETS * segs];
        let ad = AdapterView { a: a.as_view(), b: b.as_view(), u: None, v: None, scale: 2.0 };
        add_in_place(gpu, LinearShape { m, k: K, n: N, r: R }, &x[i % 2].as_view(), &ad, &mut y.as_view_mut())
    })?;
    let uni_prefill = bench::median_ms(gpu, 3, 20, |i| {
        let rows = RowAdapters::Segments { starts: &starts, ids: &seg_ids[i % SETS] };
        gpu.multi_adapter_add(&uni, 0, rows, &x[i % 2], &mut y)
    })?;
    println!("{}", bench::report_row("prefill 8192 rows x 8 segments r=16", multi, prefill_bytes, copy_bw));
    println!(
        "    / single-adapter fused term ({:.1} us) x{:.3} (goal <= 1.2); {}",
        single * 1e3,
        multi / single,
        bench::vs_torch("multi_adapter.prefill_m8192_s8_r16", multi)
    );
    println!("{}", bench::report_row("  Uni-LoRA from theta", uni_prefill, prefill_bytes, copy_bw));
    println!(
        "    from theta / materialised x{:.2} (goal <= 1.5); {}",
        uni_prefill / multi,
        bench::vs_torch("multi_adapter.unilora_prefill_m8192_s8_r16", uni_prefill)
    );
    Ok(())
}

fn cpu_bench(c: &mut Criterion) {
    let (k, n, r, m) = (256, 256, 8, 8);
    let cfg = PoolConfig { k, n, layers: 1, slots: m, rank_rows: m * r, floats: 1 };
    let mut pool = AdapterPool::<Cpu, f32>::new(&Cpu, cfg).unwrap();
    let mut rng = Rng::new(1);
    for slot in 0..m {
        let (a, b) = (rng.uniform_vec(r * k, -1.0, 1.0), rng.uniform_vec(n * r, -1.0, 1.0));
        let lf = [LayerFactors { a: &a, b: &b, u: None, v: None }];
        pool.fill(&Cpu, slot, &ServedAdapter::PerLayer { rank: r, scale: 1.0, layers: &lf }).unwrap();
    }
    let x = rng.uniform_vec(m * k, -1.0, 1.0);
    let mut y = vec![0f32; m * n];
    let ids: Vec<i32> = (0..m as i32).collect();
    c.bench_function("cpu multi_adapter decode 8 x 8 adapters K=N=256 r=8", |bch| {
        bch.iter(|| Cpu.multi_adapter_add(&pool, 0, RowAdapters::Rows(&ids), black_box(&x), &mut y).unwrap())
    });
}

fn main() {
    bench::run_gpu_part("multi_adapter", gpu_bench);
    let mut c = Criterion::default().configure_from_args();
    cpu_bench(&mut c);
    c.final_summary();
}
