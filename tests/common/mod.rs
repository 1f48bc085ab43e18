//! Helpers shared by the integration tests: the GPU handle (or a printed
//! skip), [`test_device!`] to instantiate one test case per device, the
//! number of property-test cases, the small-shapes switch, and seeded random
//! inputs. Widening to f64 is [`lorafuse::dtype::widen`].
#![allow(dead_code, unused_macros)]

#[cfg(feature = "cuda")]
use lorafuse::cuda::Gpu;
use lorafuse::rng::Rng;

/// The GPU, or `None` after printing `skipped: <test>: <reason>` (so a run
/// without a GPU shows what it did not check, and still passes).
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            println!("skipped: {test}: {e}");
            None
        }
    }
}

/// Instantiates a test case written once over the backend, once per device.
///
/// `fn case<B: Backend + …>(dev: &B)` is the case; then
/// - `test_device!(case, case_cpu, case_gpu)` makes two tests: `case_cpu`
///   runs it on [`lorafuse::cpu::Cpu`], `case_gpu` on the GPU;
/// - `test_device!(case, gpu: case_gpu)` makes only the GPU test, for cases
///   that compare the device against the CPU oracle (on the CPU they would
///   compare the oracle with itself);
/// - `test_device!(case[f32, f16, bf16], …)` runs `case::<_, T>(dev)` for
///   each listed element type, so `fn case<B, T: Element>(dev: &B)` is
///   written once over the dtype too.
///
/// The GPU test prints `skipped: <test>: <reason>` and passes where no GPU
/// answers, and is not compiled without the `cuda` feature (the case is
/// then type-checked on the CPU backend, so a generic case must accept
/// any backend its bounds name).
macro_rules! test_device {
    (@run $case:ident, $dev:expr) => {
        $case($dev)
    };
    (@run $case:ident [$($t:ty),+], $dev:expr) => {
        $( $case::<_, $t>($dev); )+
    };
    ($case:ident $([$($t:ty),+])?, $cpu:ident, $gpu:ident) => {
        #[test]
        fn $cpu() {
            test_device!(@run $case $([$($t),+])?, &lorafuse::cpu::Cpu);
        }
        test_device!($case $([$($t),+])?, gpu: $gpu);
    };
    (@typecheck $case:ident) => {
        let _: fn(&lorafuse::cpu::Cpu) = $case;
    };
    (@typecheck $case:ident [$($t:ty),+]) => {
        $( let _: fn(&lorafuse::cpu::Cpu) = $case::<_, $t>; )+
    };
    ($case:ident $([$($t:ty),+])?, gpu: $gpu:ident) => {
        #[cfg(feature = "cuda")]
        #[test]
        fn $gpu() {
            if let Some(gpu) = common::gpu_or_skip(stringify!($gpu)) {
                test_device!(@run $case $([$($t),+])?, &gpu);
            }
        }
        // Without the `cuda` feature the case still compiles, instantiated
        // on the CPU backend (not run), so it neither rots nor warns.
        #[cfg(not(feature = "cuda"))]
        const _: () = {
            test_device!(@typecheck $case $([$($t),+])?);
        };
    };
}

/// True when `B` is the CPU backend, whose twins accumulate in f64 (a
/// generic case picks its accumulator's bound with this).
pub fn is_cpu<B: 'static>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<lorafuse::cpu::Cpu>()
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

pub mod trainer;
