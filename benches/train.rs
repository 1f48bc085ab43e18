//! The trainer's speed: lorafuse's side of the comparison with PyTorch +
//! PEFT (scripts/peft_speed.py prints the other side; scripts/gpu-check.sh
//! runs both in the same session and puts them side by side).
//!
//! GPU (when present and the kernels are built): GPT-2 small's shape (12
//! layers, width 768, 12 heads, seq 1024, vocab 50257) with random weights,
//! batch `LORAFUSE_BENCH_BATCH` (default 8), adapters on attn.c_attn,
//! attn.c_proj, mlp.c_fc, mlp.c_proj: LoRA r = 4, α = 64 (the summation
//! paper's setup), Tied-LoRA `tied:vBuA` r = 4, VeRA r = 256 and Uni-LoRA
//! d = 23040 (peft_speed.py's defaults for its VeRA/Uni-LoRA). For each: the
//! median wall time of a whole training step (batch sampling, upload,
//! forward, backward, AdamW, as `Trainer::step` runs it; synchronize before
//! and after) over `LORAFUSE_BENCH_STEPS` (default 10) steps after
//! `LORAFUSE_BENCH_WARMUP` (default 3), as tokens/s; device memory in use
//! after warm-up (`cuMemGetInfo`) and the stream-ordered pool's high-water
//! mark over the timed steps (every buffer of the trainer comes from that
//! pool); and a coarse breakdown from the trainer's public pieces: the
//! forward alone (`Gpt2::run` without backward), forward + backward, and
//! the optimizer (AdamW, plus Uni-LoRA's gather); and the per-op breakdown
//! of one more step (`op_ms`: CUDA events between the trainer's op marks,
//! see `lorafuse::op_timing`). One JSON line per method and precision;
//! `LORAFUSE_BENCH_METHODS` (comma-separated) picks methods,
//! `LORAFUSE_BENCH_PRECISION` (`bf16`, `f32` or both, comma-separated;
//! default bf16, as PEFT runs under bf16 autocast) the compute dtypes.
//!
//! Graph replay (`TrainConfig::graph`): for LoRA (or the methods in
//! `LORAFUSE_BENCH_GRAPH`, comma-separated; `none` for no graph rows) a
//! second line with `"graph": true` follows the eager one: the same
//! measurement with every step after the warm-up replayed as one captured
//! CUDA graph (`step_ms` and `tokens_per_s` time the replays as a whole),
//! `op_ms` from an eager profiling step (per-op marks cannot be recorded
//! inside a graph), `vs_eager` (eager step ms / graph step ms), the graph's
//! counters, and `graph_mem_peak_gib`, the memory the driver reserved for
//! the graph's own allocations (outside the stream-ordered pool).
//!
//! Linear path: every row runs the adapted linears in the packed one-GEMM
//! layout (`LinearPath::Packed`, the trainer's default) unless it says
//! `"linear_path": "CallerBuffers"`; for LoRA and VeRA (or the methods in
//! `LORAFUSE_BENCH_CALLER`, comma-separated; `none` for none) an eager
//! caller-buffer row follows, whose `vs_eager` below 1 is what the packed
//! layout saves (VeRA's r = 256 makes its packed GEMMs 264 columns wider,
//! so there the answer is not obvious).
//!
//! LM head: every row reports `lm_head_rows`, the rows per LM-head chunk
//! the step ran (`Gpt2::lm_head_rows`: only one chunk's logits exist at a
//! time; automatic, about 256 MiB of logits per chunk, unless
//! `LORAFUSE_BENCH_LM_HEAD_ROWS` sets it; a value ≥ batch × seq runs the
//! head in one piece, the layout before chunking, to compare peak memory
//! and step time). For LoRA (or the methods in `LORAFUSE_BENCH_LM_HEAD_WHOLE`,
//! comma-separated; `none` for none) an eager row with `"lm_head_whole":
//! true` follows, the LM head in one piece: its `vs_eager` above 1 is what
//! the chunks cost in time, its `pool_peak_gib` what they save in memory.
//!
//! CPU: criterion timing of one training step of a tiny model.

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use cudarc::driver::CudaSlice;
use half::bf16;
use lorafuse::cpu::Cpu;
use lorafuse::cuda::{bench, Gpu};
use lorafuse::lowrank::{Grads, LinearShape, LowRankOps};
use lorafuse::nn::{optim_state, AdamWStep, AdamWTensor, NnOps, SeqShape, TokenIds};
use lorafuse::rng::Rng;
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::data::Dataset;
use lorafuse::train::model::padded_vocab;
use lorafuse::train::model::{Batch, Gpt2, LinearPath, Precision};
use lorafuse::train::TrainBackend;

use lorafuse::train::optimizer::OptimConfig;
use lorafuse::train::trainer::{TrainConfig, Trainer};
use lorafuse::{Backend, Error, Result};

/// (method, rank, α) timed by default.
const METHODS: [(&str, usize, f32); 4] =
    [("lora", 4, 64.0), ("tied:vBuA", 4, 64.0), ("vera", 256, 256.0), ("unilora:23040", 4, 1.0)];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Milliseconds of `work`, with the device idle before and after.
fn wall_ms<B: Backend>(backend: &B, work: impl FnOnce() -> Result<()>) -> Result<f64> {
    backend.synchronize()?;
    let start = Instant::now();
    work()?;
    backend.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// The device's stream-ordered default pool (cudarc allocates from it when
/// the device supports it).
mod pool {
    use cudarc::driver::sys;
    use lorafuse::cuda::Gpu;

    fn current(gpu: &Gpu) -> Option<sys::CUmemoryPool> {
        if !gpu.context().has_async_alloc() || gpu.context().bind_to_thread().is_err() {
            return None;
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a local.
        let rc = unsafe { sys::cuDeviceGetMemPool(&mut pool, gpu.context().cu_device()) };
        (rc == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    /// Resets the pool's used-memory high-water mark (only 0 is allowed).
    pub fn reset_peak(gpu: &Gpu) {
        if let Some(p) = current(gpu) {
            let mut zero: u64 = 0;
            // SAFETY: USED_MEM_HIGH takes a cuuint64_t; the pointer is to a local.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }

    /// Resets the high-water mark of the memory CUDA graphs allocate
    /// (outside the pool).
    pub fn reset_graph_peak(gpu: &Gpu) {
        if gpu.context().bind_to_thread().is_ok() {
            let mut zero: u64 = 0;
            // SAFETY: USED_MEM_HIGH takes a cuuint64_t; the pointer is to a local.
            unsafe {
                sys::cuDeviceSetGraphMemAttribute(
                    gpu.context().cu_device(),
                    sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }

    /// Bytes: the high-water mark of graph allocations since the last reset.
    pub fn graph_peak(gpu: &Gpu) -> Option<u64> {
        gpu.context().bind_to_thread().ok()?;
        let mut v: u64 = 0;
        // SAFETY: as above.
        let rc = unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                gpu.context().cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
        };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// Bytes: the pool's used-memory high-water mark since the last reset.
    pub fn peak(gpu: &Gpu) -> Option<u64> {
        let p = current(gpu)?;
        let mut v: u64 = 0;
        // SAFETY: as above.
        let rc = unsafe {
            sys::cuMemPoolGetAttribute(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
        };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }
}

fn used_bytes(gpu: &Gpu) -> Result<u64> {
    let (free, total) = gpu.context().mem_get_info().map_err(|e| Error::cuda("cuMemGetInfo", e))?;
    Ok((total - free) as u64)
}

const GIB: f64 = (1u64 << 30) as f64;

/// Extra JSON fields a backend adds at two points of [`time_method`].
type Probe<'a> = &'a mut dyn FnMut() -> Result<serde_json::Value>;

/// Times `method` on `model` (see the module docs) and gives the model back
/// for the next method, with the result as one JSON object. `after_warmup`
/// and `after_timed` add backend-specific fields (memory). With `graph`,
/// steps after the warm-up replay a captured graph (where the backend has
/// graphs).
#[allow(clippy::too_many_arguments)]
fn time_method<B: TrainBackend + Clone>(
    backend: &B,
    model: Gpt2<B>,
    data: &Dataset,
    (method, rank, alpha): (&str, usize, f32),
    precision: Precision,
    graph: bool,
    (batch, seq): (usize, usize),
    (warmup, steps): (usize, usize),
    after_warmup: Probe<'_>,
    after_timed: Probe<'_>,
) -> Result<(Gpt2<B>, serde_json::Value)> {
    let steps = steps.max(1);
    let config = TrainConfig {
        method: method.into(),
        rank,
        alpha,
        steps: (warmup + steps + 100) as u64,
        batch,
        seq,
        eval_examples: 1,
        precision,
        graph,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(backend.clone(), model, data.clone(), config)?;
    let trainable = t.num_trainable();
    for _ in 0..warmup {
        t.step()?;
    }
    backend.synchronize()?;
    let warm = after_warmup()?;
    let mut step_ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        step_ms.push(wall_ms(backend, || t.step().map(drop))?);
    }
    let timed = after_timed()?;

    let graph_status = t.graph_status().clone();

    // Per-op time of one more step, from marks on the device's clock (an
    // eager step under graph replay too: the trainer does not replay while
    // timing is on).
    backend.op_timing_start()?;
    t.step()?;
    let ops = backend.op_timing_finish()?;

    // Breakdown from the trainer's public pieces, on one fixed batch.
    let mut rng = Rng::new(99);
    let host = data.sample(&mut rng, batch, seq, false);
    let b = Batch::upload(backend, SeqShape { batch, seq }, &host.tokens, &host.targets)?;
    let (mut fwd, mut fwd_bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    let total = t.config.steps;
    for _ in 0..steps.min(5) {
        fwd.push(wall_ms(backend, || t.model.run(backend, t.adapters.as_mut(), &b, false).map(drop))?);
        fwd_bwd.push(wall_ms(backend, || {
            if let Some(a) = t.adapters.as_mut() {
                a.zero_grads(backend)?;
            }
            t.model.run(backend, t.adapters.as_mut(), &b, true)?;
            match t.adapters.as_mut() {
                Some(a) => a.scatter(backend),
                None => Ok(()),
            }
        })?);
        opt.push(wall_ms(backend, || {
            let a = t.adapters.as_mut().ok_or_else(|| Error::invalid("bench", "adapter methods only"))?;
            t.optimizer.step(backend, a.trainable(), total)?;
            a.gather(backend)
        })?);
    }
    let ms = median(step_ms.clone());
    let (f, fb) = (median(fwd), median(fwd_bwd));
    let mut line = serde_json::json!({
        "bench": "lorafuse-train",
        "device": backend.describe(),
        "method": method, "rank": rank, "alpha": alpha,
        "layers": t.model.config.n_layer, "width": t.model.config.n_embd, "heads": t.model.config.n_head,
        "vocab": t.model.config.vocab_size, "batch": batch, "seq": seq,
        "trainable_params": trainable,
        "tokens_per_s": (batch * seq) as f64 / (ms * 1e-3),
        "step_ms": ms,
        "step_ms_min": step_ms.iter().copied().fold(f64::INFINITY, f64::min),
        "timed_steps": steps, "warmup_steps": warmup,
        "forward_ms": f, "backward_ms": fb - f, "optimizer_ms": median(opt),
        "precision": precision.to_string(),
        "op_ms": ops.to_json(), "op_total_ms": ops.total_ms(),
        "graph": graph,
        "lm_head_rows": t.model.lm_head_rows(batch * seq),
    });
    if graph {
        if let Some(l) = line.as_object_mut() {
            l.insert(
                "graph_counts".into(),
                serde_json::json!({
                    "captures": graph_status.captures, "replays": graph_status.replays,
                    "eager": graph_status.eager, "off": graph_status.off,
                }),
            );
        }
    }
    for extra in [warm, timed] {
        if let (Some(l), serde_json::Value::Object(e)) = (line.as_object_mut(), extra) {
            l.extend(e);
        }
    }
    Ok((t.model, line))
}

/// The step's memory-bound ops and the LM head alone, at GPT-2 small's
/// shape (`tokens` rows, width 768, vocab 50257 padded to 50304) in bf16:
/// time, GB/s and the ratio to the floor (the bytes the op must move at the
/// copy bandwidth measured here), and the PyTorch time of the same op from
/// scripts/baselines/train.py where it ran. The LM head is timed at both
/// widths: 50257 is what cuBLAS got before the vocabulary was padded.
fn op_floors(gpu: &Gpu, tokens: usize) -> Result<()> {
    let (d, vocab) = (768usize, 50257usize);
    let padded = padded_vocab(vocab);
    let copy_bw = bench::copy_bandwidth(gpu, 1 << 30)?;
    println!("train ops, {tokens} tokens x width {d}, bf16; copy bandwidth {:.0} GB/s", copy_bw / 1e9);
    let mut rng = Rng::new(17);
    let mut rand_bf16 = |n: usize, scale: f32| -> Result<CudaSlice<bf16>> {
        let host: Vec<bf16> = (0..n).map(|_| bf16::from_f32(scale * rng.uniform(-1.0, 1.0) as f32)).collect();
        gpu.upload(&host)
    };
    let x = rand_bf16(tokens * d, 1.0)?;
    let gamma = rand_bf16(d, 1.0)?;
    let beta = rand_bf16(d, 1.0)?;
    let resid: CudaSlice<f32> = gpu.upload(&vec![0.5f32; tokens * d])?;
    let mut resid2: CudaSlice<f32> = gpu.zeros(tokens * d)?;
    let mut out: CudaSlice<bf16> = gpu.zeros(tokens * d)?;
    let (mut mean, mut rstd): (CudaSlice<f32>, CudaSlice<f32>) = (gpu.zeros(tokens)?, gpu.zeros(tokens)?);
    let el = (tokens * d) as f64;
    let row = |label: &str, key: &str, ms: f64, bytes: f64| {
        println!("{}  {}", bench::report_row(label, ms, bytes, copy_bw), bench::vs_torch(key, ms));
    };

    let ms = bench::median_ms(gpu, 3, 20, |_| {
        gpu.residual_layernorm_forward(&resid, &x, &gamma, &beta, 1e-5, &mut resid2, &mut out, &mut mean, &mut rstd)
    })?;
    row("residual + layernorm fwd (fused)", "train.residual_layernorm_fwd.bf16", ms, el * 12.0);
    let ms = bench::median_ms(gpu, 3, 20, |_| {
        gpu.layernorm_forward(&resid, &gamma, &beta, 1e-5, &mut out, &mut mean, &mut rstd)
    })?;
    row("layernorm fwd", "train.layernorm_fwd.bf16", ms, el * 6.0);
    let (mut dg, mut db): (CudaSlice<f32>, CudaSlice<f32>) = (gpu.zeros(d)?, gpu.zeros(d)?);
    let ms = bench::median_ms(gpu, 3, 20, |_| {
        gpu.layernorm_backward(&x, &resid, &gamma, &mean, &rstd, &mut resid2, Some(&mut dg), Some(&mut db))
    })?;
    // dout (2) + x (4) + dx read and written (8) per element.
    row("layernorm bwd (dx accumulated, dgamma, dbeta)", "train.layernorm_bwd.bf16", ms, el * 14.0);
    let ms = bench::median_ms(gpu, 3, 20, |_| gpu.residual_add(&resid, &x, &mut resid2))?;
    row("residual add (unfused)", "train.residual_add.bf16", ms, el * 10.0);
    let ms = bench::median_ms(gpu, 3, 20, |_| gpu.cast_from_f32(&resid, &mut out))?;
    row("cast f32 -> bf16", "train.cast.bf16", ms, el * 6.0);
    drop((out, resid2));

    let h = rand_bf16(tokens * 4 * d, 3.0)?;
    let mut g: CudaSlice<bf16> = gpu.zeros(tokens * 4 * d)?;
    let el4 = el * 4.0;
    let ms = bench::median_ms(gpu, 3, 20, |_| gpu.gelu_forward(&h, &mut g))?;
    row("gelu fwd (width 3072)", "train.gelu_fwd.bf16", ms, el4 * 4.0);
    let dg_in = rand_bf16(tokens * 4 * d, 1.0)?;
    let ms = bench::median_ms(gpu, 3, 20, |_| gpu.gelu_backward(&dg_in, &h, &mut g))?;
    row("gelu bwd (width 3072)", "train.gelu_bwd.bf16", ms, el4 * 6.0);
    drop((h, g, dg_in));

    // The LM head: logits = x·Wᵀ, at the real and the padded width.
    for n in [vocab, padded] {
        let w = rand_bf16(n * d, 0.02)?;
        let mut logits: CudaSlice<bf16> = gpu.zeros(tokens * n)?;
        let shape = LinearShape { m: tokens, k: d, n, r: 0 };
        let ms = bench::median_ms(gpu, 2, 10, |_| gpu.lowrank_forward(shape, &x, &w, None, None, &mut logits, None))?;
        let tflops = 2.0 * (tokens * n * d) as f64 / (ms * 1e-3) / 1e12;
        println!(
            "{:<44} {:>10.1} us {:>8.1} TFLOP/s  {}",
            format!("lm_head fwd GEMM, vocab {n}"),
            ms * 1e3,
            tflops,
            bench::vs_torch(&format!("train.lm_head_fwd.{n}.bf16"), ms)
        );
        let (mut dx, mut dw): (CudaSlice<bf16>, CudaSlice<f32>) = (gpu.zeros(tokens * d)?, gpu.zeros(n * d)?);
        let ms = bench::median_ms(gpu, 2, 10, |_| {
            let grads = Grads::<Gpu, bf16> { dx: Some(&mut dx), dw: Some(&mut dw), ..Grads::none() };
            gpu.lowrank_backward(shape, &x, &w, None, None, &logits, grads)
        })?;
        println!(
            "{:<44} {:>10.1} us {:>8.1} TFLOP/s  {}",
            format!("lm_head bwd GEMMs (dx, dW), vocab {n}"),
            ms * 1e3,
            4.0 * (tokens * n * d) as f64 / (ms * 1e-3) / 1e12,
            bench::vs_torch(&format!("train.lm_head_bwd.{n}.bf16"), ms)
        );
    }

    // Cross-entropy over the padded logits, gradient written in place: the
    // floor is one read and one write of the bf16 logits.
    let mut logits = rand_bf16(tokens * padded, 4.0)?;
    let targets: Vec<u32> = (0..tokens).map(|_| rng.below(vocab as u64) as u32).collect();
    let t_dev = gpu.upload(&targets)?;
    let ids = TokenIds { device: &t_dev, host: &targets };
    let ms = bench::median_ms(gpu, 3, 20, |_| {
        gpu.cross_entropy_padded(&mut logits, ids, vocab, padded, Some(1.0 / tokens as f64)).map(drop)
    })?;
    row("cross-entropy fwd+bwd (padded 50304)", "train.cross_entropy.bf16", ms, (tokens * padded * 4) as f64);
    drop(logits);
    optimizer_floor(gpu, d, copy_bw)
}

/// The optimizer step over GPT-2 small's LoRA r = 4 tensors (A and B of
/// four modules in 12 layers: 96 tensors, 1.18 M values): the norm, the
/// decision and AdamW on the device ([`NnOps::optimizer_prepare`] +
/// [`NnOps::adamw_many_device`], what the trainer queues) against the
/// host-decided path it replaced (norms read back, then `adamw_many`), both
/// timed here. Floor: the gradient read by the norm (4 bytes) plus AdamW's
/// 28 bytes per value.
fn optimizer_floor(gpu: &Gpu, d: usize, copy_bw: f64) -> Result<()> {
    let r = 4;
    let mut lens = Vec::new();
    for _ in 0..12 {
        for (k, n) in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] {
            lens.extend([r * k, n * r]);
        }
    }
    let values: usize = lens.iter().sum();
    let mut bufs = lens
        .iter()
        .map(|&n| Ok([gpu.upload(&vec![0.01f32; n])?, gpu.upload(&vec![1e-3f32; n])?, gpu.zeros(n)?, gpu.zeros(n)?]))
        .collect::<Result<Vec<[CudaSlice<f32>; 4]>>>()?;
    let c = OptimConfig::default();
    let consts = c.consts(1_000_000);
    let mut state = gpu.upload(&optim_state::initial(lens.len(), 0))?;
    let mut scratch: CudaSlice<f64> = gpu.zeros(optim_state::scratch_len(lens.len()))?;
    let bytes = values as f64 * 32.0;
    let ms = bench::median_ms(gpu, 3, 20, |_| {
        let grads: Vec<&CudaSlice<f32>> = bufs.iter().map(|b| &b[1]).collect();
        gpu.optimizer_prepare(&grads, grads.len(), &consts, &mut state, &mut scratch)?;
        let mut ts: Vec<AdamWTensor<'_, Gpu>> = bufs
            .iter_mut()
            .map(|[p, g, m, v]| AdamWTensor { param: p, grad: &*g, m, v, lr: c.lr, weight_decay: 0.0 })
            .collect();
        gpu.adamw_many_device(&mut ts, &consts, &state)
    })?;
    println!("{}", bench::report_row("optimizer: norm + decide + AdamW on device", ms, bytes, copy_bw));
    let ms = bench::median_ms(gpu, 3, 20, |i| {
        let grads: Vec<&CudaSlice<f32>> = bufs.iter().map(|b| &b[1]).collect();
        // The download inside is the host round trip the device path avoids.
        let norm = gpu.sum_squares_each(&grads)?.iter().sum::<f64>().sqrt();
        let grad_scale = if norm > c.clip_norm { c.clip_norm / norm } else { 1.0 };
        let hp = AdamWStep {
            lr: 0.0,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: 0.0,
            step: i as u64 + 1,
            grad_scale,
        };
        let mut ts: Vec<AdamWTensor<'_, Gpu>> = bufs
            .iter_mut()
            .map(|[p, g, m, v]| AdamWTensor { param: p, grad: &*g, m, v, lr: c.lr, weight_decay: 0.0 })
            .collect();
        gpu.adamw_many(&mut ts, &hp)
    })?;
    println!("{}", bench::report_row("optimizer: norm read back, then AdamW", ms, bytes, copy_bw));
    Ok(())
}

fn gpu_bench(gpu: &Gpu) -> Result<()> {
    let batch = env_usize("LORAFUSE_BENCH_BATCH", 8);
    let seq = 1024;
    op_floors(gpu, batch * seq)?;
    let cfg = Gpt2Config::new(50257, 1024, 768, 12, 12)?;
    let wanted: Option<Vec<String>> =
        std::env::var("LORAFUSE_BENCH_METHODS").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let mut rng = Rng::new(5);
    let tokens: Vec<u32> = (0..(batch * seq * 8).max(1 << 16)).map(|_| rng.below(50257) as u32).collect();
    let data = Dataset::stream("random tokens", tokens, 50257)?;
    let base = used_bytes(gpu)?;
    let mut model = Gpt2::random(gpu, &cfg, 0)?;
    // The chunk rows of every row but the one-piece ones: automatic unless
    // set here.
    let lm_head_rows = match std::env::var("LORAFUSE_BENCH_LM_HEAD_ROWS") {
        Ok(rows) => Some(rows.trim().parse::<usize>().map_err(|e| {
            Error::invalid("LORAFUSE_BENCH_LM_HEAD_ROWS", format!("`{rows}`: {e}; give a row count (≥ 1)"))
        })?),
        Err(_) => None,
    };
    model.set_lm_head_rows(lm_head_rows)?;
    gpu.synchronize()?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "lorafuse-train", "device": gpu.info().name, "params": model.num_params(),
            "mem_used_before_model_gib": base as f64 / GIB,
            "mem_used_with_model_gib": used_bytes(gpu)? as f64 / GIB,
        })
    );
    let precisions = std::env::var("LORAFUSE_BENCH_PRECISION").unwrap_or_else(|_| "bf16".into());
    let precisions = precisions.split(',').map(Precision::parse).collect::<Result<Vec<_>>>()?;
    for (m, precision) in METHODS.iter().flat_map(|m| precisions.iter().map(move |p| (*m, *p))) {
        if wanted.as_ref().is_some_and(|w| !w.iter().any(|x| x == m.0)) {
            continue;
        }
        let (warmup, steps) = (env_usize("LORAFUSE_BENCH_WARMUP", 3), env_usize("LORAFUSE_BENCH_STEPS", 10));
        let graph_methods = std::env::var("LORAFUSE_BENCH_GRAPH").unwrap_or_else(|_| "lora".into());
        let with_graph = graph_methods.split(',').any(|g| g.trim() == m.0);
        let caller_methods = std::env::var("LORAFUSE_BENCH_CALLER").unwrap_or_else(|_| "lora,vera".into());
        let with_caller = caller_methods.split(',').any(|g| g.trim() == m.0);
        let whole_methods = std::env::var("LORAFUSE_BENCH_LM_HEAD_WHOLE").unwrap_or_else(|_| "lora".into());
        let with_whole = whole_methods.split(',').any(|g| g.trim() == m.0);
        let mut eager_ms = None;
        // (linear path, graph replay, LM head in one piece)
        let variants = [
            (LinearPath::Packed, false, false),
            (LinearPath::CallerBuffers, false, false),
            (LinearPath::Packed, true, false),
            (LinearPath::Packed, false, true),
        ];
        for (path, graph, whole) in variants {
            if (graph && !with_graph) || (path == LinearPath::CallerBuffers && !with_caller) || (whole && !with_whole) {
                continue;
            }
            model.set_linear_path(path);
            model.set_lm_head_rows(if whole { Some(batch * seq) } else { lm_head_rows })?;
            let mut after_warmup = || -> Result<serde_json::Value> {
                let used = used_bytes(gpu)?;
                pool::reset_peak(gpu);
                Ok(serde_json::json!({ "mem_used_after_warmup_gib": used as f64 / GIB }))
            };
            let mut after_timed = || -> Result<serde_json::Value> {
                Ok(serde_json::json!({
                    "pool_peak_gib": pool::peak(gpu).map(|p| p as f64 / GIB),
                    "graph_mem_peak_gib": pool::graph_peak(gpu).map(|p| p as f64 / GIB),
                }))
            };
            pool::reset_graph_peak(gpu);
            let (back, mut line) = time_method(
                gpu,
                model,
                &data,
                m,
                precision,
                graph,
                (batch, seq),
                (warmup, steps),
                &mut after_warmup,
                &mut after_timed,
            )?;
            let ms = line["step_ms"].as_f64();
            if let Some(l) = line.as_object_mut() {
                l.insert("linear_path".into(), serde_json::json!(format!("{path:?}")));
                l.insert("lm_head_whole".into(), serde_json::json!(whole));
            }
            // vs_eager: the eager packed step's ms over this row's (graph
            // replay's gain, or the packed layout's gain for a caller-buffer row
            // when below 1).
            match (graph || whole, path, eager_ms, ms, line.as_object_mut()) {
                (false, LinearPath::Packed, _, _, _) => eager_ms = ms,
                (_, _, Some(e), Some(g), Some(l)) => {
                    l.insert("vs_eager".into(), serde_json::json!(e / g));
                }
                _ => {}
            }
            println!("{line}");
            model = back;
        }
    }
    Ok(())
}

fn cpu_bench(c: &mut Criterion) {
    let cfg = Gpt2Config::new(256, 64, 64, 2, 4).unwrap();
    let mut rng = Rng::new(1);
    let tokens: Vec<u32> = (0..8192).map(|_| rng.below(256) as u32).collect();
    let data = Dataset::stream("random bytes", tokens, 256).unwrap();
    // The GPU part's measurement, on the CPU backend and a tiny model: the
    // same JSON line, so the code path is exercised where there is no GPU.
    let mut none = || -> Result<serde_json::Value> { Ok(serde_json::json!({})) };
    let mut none2 = || -> Result<serde_json::Value> { Ok(serde_json::json!({})) };
    let model = Gpt2::random(&Cpu, &cfg, 0).unwrap();
    let (_, line) = time_method(
        &Cpu,
        model,
        &data,
        ("lora", 4, 8.0),
        Precision::F32,
        false,
        (4, 32),
        (1, 3),
        &mut none,
        &mut none2,
    )
    .unwrap();
    println!("{line}");
    let mut group = c.benchmark_group("train step, 2 layers, width 64, batch 4 x seq 32 (cpu)");
    group.sample_size(20);
    for (method, rank, alpha) in [("lora", 4, 8.0), ("tied:vBuA", 4, 8.0), ("unilora:2048", 4, 1.0)] {
        let model = Gpt2::random(&Cpu, &cfg, 0).unwrap();
        let config = TrainConfig {
            method: method.into(),
            rank,
            alpha,
            steps: 1000,
            batch: 4,
            seq: 32,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(Cpu, model, data.clone(), config).unwrap();
        group.bench_function(method, |b| b.iter(|| black_box(t.step().unwrap().loss)));
    }
    group.finish();
}

fn main() {
    bench::run_gpu_part("train", gpu_bench);
    let mut c = Criterion::default().configure_from_args();
    cpu_bench(&mut c);
    c.final_summary();
}
