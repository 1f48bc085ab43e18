//! Causal attention per layer: lorafuse's flash-form kernels against
//! PyTorch SDPA measured in the same run (scripts/baselines/attention.py).
//!
//! GPU (when present and the kernels are built): bf16, (batch, heads, seq,
//! head_dim) = (8, 12, 1024, 64) (GPT-2 small) and (4, 32, 2048, 128), the
//! forward (out and lse) and forward + backward (then dqkv), as CUDA-event
//! medians after warm-up. Each row prints µs, TFLOP/s and the ratio to
//! SDPA. FLOPs follow the usual causal convention: forward 4·b·h·s²·d / 2
//! (QKᵀ and PV over half the score matrix), forward + backward 3.5× that
//! (the backward's five s²·d products over the forward's two); the
//! recomputation in our separate dQ and dK/dV kernels is not counted, so
//! the TFLOP/s compare like with like. Goals: both ≤ 1.0× SDPA.
//!
//! CPU: one timing of the f64 twin at a small shape (no criterion: the CPU
//! oracle is not a speed target).

use std::time::Instant;

use half::bf16;
use lorafuse::attention::AttnShape;
use lorafuse::cpu::attention::{attention_backward_f64, attention_forward_f64};
use lorafuse::cuda::attention::{attention_backward, attention_forward};
use lorafuse::cuda::{bench, Gpu};
use lorafuse::nn::SeqShape;
use lorafuse::rng::Rng;
use lorafuse::{Backend, Element, Result};

/// (batch, heads, seq, head_dim); the same list as scripts/baselines/attention.py.
const SHAPES: [(usize, usize, usize, usize); 2] = [(8, 12, 1024, 64), (4, 32, 2048, 128)];

/// The baseline row name (same string as attention.py's `key`).
fn key(kind: &str, (b, h, s, d): (usize, usize, usize, usize)) -> String {
    format!("attention_{kind}_b{b}_h{h}_s{s}_d{d}_causal_bf16")
}

fn shape((batch, heads, seq, head_dim): (usize, usize, usize, usize)) -> AttnShape {
    AttnShape { seq: SeqShape { batch, seq }, heads, head_dim }
}

fn random<T: Element>(seed: u64, n: usize) -> Vec<T> {
    Rng::new(seed).uniform_vec(n, -1.0, 1.0).into_iter().map(T::from_f32).collect()
}

fn row(label: &str, key: &str, ms: f64, flops: f64) -> String {
    let verdict = match bench::torch_baseline_us(key) {
        Some(us) if ms * 1e3 <= us => "  (meets ≤ 1.0× SDPA)",
        Some(_) => "  (MISSES ≤ 1.0× SDPA)",
        None => "",
    };
    format!(
        "{label:<40} {:>9.1} us {:>7.1} TFLOP/s  {}{verdict}",
        ms * 1e3,
        flops / (ms * 1e-3) / 1e12,
        bench::vs_torch(key, ms)
    )
}

fn gpu_shape(gpu: &Gpu, dims: (usize, usize, usize, usize)) -> Result<()> {
    let s = shape(dims);
    let (n_qkv, n_out) = (s.seq.tokens() * 3 * s.width(), s.seq.tokens() * s.width());
    let qkv = gpu.upload(&random::<bf16>(1, n_qkv))?;
    let dout = gpu.upload(&random::<bf16>(2, n_out))?;
    let mut out = gpu.zeros::<bf16>(n_out)?;
    let mut lse = gpu.zeros::<f32>(s.lse_len())?;
    let mut dqkv = gpu.zeros::<bf16>(n_qkv)?;
    let (b, h, n, d) = dims;
    let flops = 4.0 * (b * h * n * n * d) as f64 / 2.0;
    let tag = format!("b{b} h{h} s{n} d{d} causal bf16");

    let fwd = bench::median_ms(gpu, 5, 30, |_| attention_forward(gpu, &qkv, s, &mut out, &mut lse))?;
    println!("{}", row(&format!("forward {tag}"), &key("fwd", dims), fwd, flops));
    let fwd_bwd = bench::median_ms(gpu, 5, 30, |_| {
        attention_forward(gpu, &qkv, s, &mut out, &mut lse)?;
        attention_backward(gpu, &dout, &qkv, &out, &lse, s, &mut dqkv)
    })?;
    println!("{}", row(&format!("forward+backward {tag}"), &key("fwd_bwd", dims), fwd_bwd, 3.5 * flops));
    println!(
        "{:<40} {:>9.1} us (forward+backward minus forward)",
        format!("  backward alone {tag}"),
        (fwd_bwd - fwd) * 1e3
    );
    Ok(())
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    println!("device: {}", gpu.info());
    for dims in SHAPES {
        gpu_shape(gpu, dims)?;
    }
    Ok(())
}

fn cpu_once() {
    let s = shape((1, 2, 128, 64));
    let qkv: Vec<f64> = random::<f32>(3, s.seq.tokens() * 3 * s.width()).iter().map(|&v| v as f64).collect();
    let dout: Vec<f64> = random::<f32>(4, s.seq.tokens() * s.width()).iter().map(|&v| v as f64).collect();
    let start = Instant::now();
    let (out, lse) = attention_forward_f64(&qkv, s).expect("valid shape");
    let dqkv = attention_backward_f64(&dout, &qkv, &out, &lse, s).expect("valid shape");
    std::hint::black_box(dqkv);
    println!("cpu f64 twin, forward+backward b1 h2 s128 d64: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
}

fn main() {
    bench::run_gpu_part("attention", gpu_bench);
    cpu_once();
}
