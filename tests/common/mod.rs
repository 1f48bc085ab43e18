//! Helpers shared by the integration tests: the GPU handle (or a printed
//! skip), the number of property-test cases, the small-shapes switch, and
//! seeded random inputs.
#![allow(dead_code)]

use lorafuse::cuda::Gpu;
use lorafuse::rng::Rng;

/// The GPU, or `None` after printing `skipped: <test>: <reason>` (so a run
/// without a GPU shows what it did not check, and still passes).
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            println!("skipped: {test}: {e}");
            None
        }
    }
}

/// Property-test cases per test: `LORAFUSE_PROPTEST_CASES`, default `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("LORAFUSE_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// True when `LORAFUSE_TEST_SMALL` is set (to anything but `0`): GPU tests
/// then keep one shape per tile boundary and kernel bucket, so that
/// `compute-sanitizer` (racecheck runs kernels ~100× slower) covers every
/// code path in minutes (`scripts/gpu-check.sh sanitize`).
pub fn small() -> bool {
    std::env::var("LORAFUSE_TEST_SMALL").is_ok_and(|v| v != "0")
}

/// `n` values uniform in `[-1, 1)` from `seed`: never zeros, which would hide
/// unwritten outputs and wrong indexing.
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    Rng::new(seed).uniform_vec(n, -1.0, 1.0)
}
