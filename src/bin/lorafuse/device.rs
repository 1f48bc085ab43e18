//! `--device`: which backend a command runs on.

use lorafuse::cpu::Cpu;
use lorafuse::cuda::{kernels, Gpu};
use lorafuse::train::model::Precision;
use lorafuse::{Error, Result};

/// The `--device` choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The GPU when one answers and this build carries kernels, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device 0; an error when there is none or no kernels.
    Cuda,
}

/// The `--precision` choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionChoice {
    /// bf16 mixed precision on a GPU with tensor cores, f32 elsewhere.
    #[default]
    Auto,
    /// Everything in f32.
    F32,
    /// bf16 working copy of the weights and bf16 GEMM activations; f32
    /// residual stream, master weights, gradients and optimizer state.
    Bf16,
}

impl PrecisionChoice {
    /// The precision to run with on `backend`.
    pub fn resolve<B: lorafuse::Backend>(self, backend: &B) -> Precision {
        match self {
            PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::Auto if backend.has_tensor_cores() => Precision::Bf16,
            PrecisionChoice::Auto => Precision::F32,
        }
    }
}

/// The backend a command got.
pub enum Picked {
    /// The CPU backend.
    Cpu(Cpu),
    /// A CUDA device.
    Cuda(Gpu),
}

/// Opens the backend `choice` names. `auto` never fails: without a usable
/// GPU it says why on stderr and takes the CPU.
pub fn pick(choice: DeviceChoice) -> Result<Picked> {
    match choice {
        DeviceChoice::Cpu => Ok(Picked::Cpu(Cpu)),
        DeviceChoice::Cuda if !kernels::built() => Err(Error::KernelsNotBuilt),
        DeviceChoice::Cuda => Ok(Picked::Cuda(Gpu::new(0)?)),
        DeviceChoice::Auto if !kernels::built() => Ok(Picked::Cpu(Cpu)),
        DeviceChoice::Auto => match Gpu::new(0) {
            Ok(gpu) => Ok(Picked::Cuda(gpu)),
            Err(e) => {
                eprintln!("no GPU ({e}); running on the CPU");
                Ok(Picked::Cpu(Cpu))
            }
        },
    }
}

/// Calls the generic `$f(backend, args...)` with whichever backend was
/// picked (one monomorphised copy per backend).
macro_rules! on_backend {
    ($picked:expr, $f:ident ( $($arg:expr),* )) => {
        match $picked {
            $crate::device::Picked::Cpu(b) => $f(b, $($arg),*),
            $crate::device::Picked::Cuda(b) => $f(b, $($arg),*),
        }
    };
}
pub(crate) use on_backend;
