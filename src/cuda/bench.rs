//! Measuring kernels the same way everywhere: CUDA-event medians after
//! warm-up, and the device-to-device copy bandwidth that every memory-bound
//! kernel's floor is computed from (measured in the same run, never taken
//! from a datasheet).

use cudarc::driver::CudaSlice;

use super::Gpu;
use crate::backend::Backend;
use crate::Result;

/// Median of `runs` timings of `work` (milliseconds) after `warmup` untimed
/// calls. `work` receives the run index, so callers can rotate inputs and
/// keep caches from flattering the numbers.
pub fn median_ms(gpu: &Gpu, warmup: usize, runs: usize, mut work: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..warmup {
        work(i)?;
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs.max(1) {
        times.push(gpu.time_ms(|| work(warmup + i))? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Device-to-device copy bandwidth in bytes per second (bytes read plus
/// bytes written), over a buffer of `bytes` (use one far larger than L2).
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let n = bytes / 4;
    let src: CudaSlice<f32> = gpu.upload(&vec![1.5f32; n])?;
    let mut dst: CudaSlice<f32> = gpu.zeros(n)?;
    let ms = median_ms(gpu, 3, 20, |_| gpu.copy(&src, &mut dst))?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3))
}

/// One row of a bench table: time, achieved bandwidth and the ratio to the
/// floor `floor_bytes / copy_bw`.
pub fn report_row(label: &str, ms: f64, floor_bytes: f64, copy_bw: f64) -> String {
    let floor_ms = floor_bytes / copy_bw * 1e3;
    format!(
        "{label:<44} {:>10.1} us {:>8.0} GB/s  floor {:>9.1} us  x{:>5.2}",
        ms * 1e3,
        floor_bytes / (ms * 1e-3) / 1e9,
        floor_ms * 1e3,
        ms / floor_ms
    )
}

/// Runs a bench's GPU part when there is a GPU and this build has kernels;
/// otherwise prints `skipped: gpu <name> bench: <reason>`. A GPU part that
/// fails ends the process with status 1, so a broken kernel cannot pass as
/// a skipped bench.
pub fn run_gpu_part(name: &str, part: impl FnOnce(&Gpu) -> Result<()>) {
    if !super::kernels::built() {
        println!("skipped: gpu {name} bench: {}", crate::Error::KernelsNotBuilt);
        return;
    }
    match Gpu::new(0) {
        Ok(gpu) => {
            if let Err(e) = part(&gpu) {
                eprintln!("gpu {name} bench failed: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => println!("skipped: gpu {name} bench: {e}"),
    }
}

/// The PyTorch time (microseconds) of the same work, measured by
/// `scripts/torch_baselines.py` earlier in the same `gpu-check.sh` run and
/// handed over as a JSON file named by `LORAFUSE_TORCH_BASELINES`; `None`
/// when the variable is unset, the file is unreadable, or it has no row
/// `key`. Keys are the ones the scripts in `scripts/baselines/` write.
pub fn torch_baseline_us(key: &str) -> Option<f64> {
    static ROWS: std::sync::OnceLock<Option<serde_json::Value>> = std::sync::OnceLock::new();
    let rows = ROWS.get_or_init(|| {
        let path = std::env::var_os("LORAFUSE_TORCH_BASELINES")?;
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?.get("rows").cloned()
    });
    rows.as_ref()?.get(key)?.get("us")?.as_f64()
}

/// `"torch 123.4 us  ours/torch x0.87"` for a time `ms` of ours against the
/// PyTorch row `key`, or a line saying the baseline was not measured in
/// this run, so a bench never prints a ratio it did not measure.
pub fn vs_torch(key: &str, ms: f64) -> String {
    match torch_baseline_us(key) {
        Some(us) => format!("torch {us:>9.1} us  ours/torch x{:>5.2}", ms * 1e3 / us),
        None => format!("torch `{key}`: not measured in this run (LORAFUSE_TORCH_BASELINES)"),
    }
}
