//! `--device` and `--precision`: the flags that pick a backend and a
//! compute dtype ([`lorafuse::device`] does the opening).

use lorafuse::device::Device;
use lorafuse::train::model::Precision;
use lorafuse::Result;

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

impl From<DeviceChoice> for lorafuse::device::DeviceChoice {
    fn from(c: DeviceChoice) -> Self {
        match c {
            DeviceChoice::Auto => Self::Auto,
            DeviceChoice::Cpu => Self::Cpu,
            DeviceChoice::Cuda => Self::Cuda,
        }
    }
}

/// `--device`, for the commands that run kernels.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct DeviceArg {
    /// Where to run: `cuda` (fails without a GPU or compiled kernels),
    /// `cpu`, or `auto`: the GPU when one answers and the kernels are
    /// built, else the CPU (it says which it took).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
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

impl DeviceArg {
    /// Opens the backend this names and says on stderr which one `auto`
    /// took (and why not the GPU), so a run's log always names its device.
    pub fn open(self) -> Result<Device> {
        let (device, fallback) = Device::open(self.device.into())?;
        match (self.device, fallback) {
            (_, Some(why)) => eprintln!("--device auto: the GPU is not usable ({why}); running on the CPU"),
            (DeviceChoice::Auto, None) => eprintln!("--device auto: running on {}", device.describe()),
            _ => {}
        }
        Ok(device)
    }
}

/// Calls the generic `$f(backend, args...)` with whichever backend was
/// picked (one monomorphised copy per backend).
macro_rules! on_backend {
    ($picked:expr, $f:ident ( $($arg:expr),* )) => {
        match $picked {
            lorafuse::device::Device::Cpu(b) => $f(b, $($arg),*),
            lorafuse::device::Device::Cuda(b) => $f(b, $($arg),*),
        }
    };
}
pub(crate) use on_backend;
