//! Naming a backend at run time: `cpu`, `cuda` or `auto` (the GPU when one
//! answers and this build carries kernels, else the CPU), as the command
//! line's `--device` does.
//!
//! ```
//! use lorafuse::device::{Device, DeviceChoice};
//! # fn main() -> lorafuse::Result<()> {
//! let choice: DeviceChoice = "auto".parse()?;
//! let (device, fallback) = Device::open(choice)?;
//! if let Some(why) = fallback {
//!     eprintln!("no GPU ({why}); running on the CPU");
//! }
//! println!("running on {}", device.describe());
//! # Ok(()) }
//! ```

use crate::cpu::Cpu;
#[cfg(feature = "cuda")]
use crate::cuda::{kernels, Gpu};
use crate::{Backend, Error, Result};

/// Which backend to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when one answers and the kernels were compiled, else
    /// the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device 0; an error when there is none or no kernels.
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            _ => Err(Error::invalid(format!("device `{s}`"), "use cpu, cuda or auto")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// An opened backend.
#[derive(Clone, Debug)]
pub enum Device {
    /// The CPU backend.
    Cpu(Cpu),
    /// A CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(Gpu),
}

impl Device {
    /// Opens what `choice` names. `Auto` never fails: without a usable GPU
    /// it opens the CPU and returns, beside it, why the GPU was not taken
    /// (for the caller to report). `Cuda` without a GPU or without compiled
    /// kernels is an error.
    pub fn open(choice: DeviceChoice) -> Result<(Device, Option<Error>)> {
        #[cfg(not(feature = "cuda"))]
        {
            let missing = || {
                Error::invalid("device `cuda`", "this build of lorafuse has no CUDA backend: enable its `cuda` feature")
            };
            match choice {
                DeviceChoice::Cpu => Ok((Device::Cpu(Cpu), None)),
                DeviceChoice::Cuda => Err(missing()),
                DeviceChoice::Auto => Ok((Device::Cpu(Cpu), Some(missing()))),
            }
        }
        #[cfg(feature = "cuda")]
        match choice {
            DeviceChoice::Cpu => Ok((Device::Cpu(Cpu), None)),
            DeviceChoice::Cuda if !kernels::built() => Err(Error::KernelsNotBuilt),
            DeviceChoice::Cuda => Ok((Device::Cuda(Gpu::new(0)?), None)),
            DeviceChoice::Auto if !kernels::built() => Ok((Device::Cpu(Cpu), Some(Error::KernelsNotBuilt))),
            DeviceChoice::Auto => match Gpu::new(0) {
                Ok(gpu) => Ok((Device::Cuda(gpu), None)),
                Err(e) => Ok((Device::Cpu(Cpu), Some(e))),
            },
        }
    }

    /// The backend in words, e.g. `cuda:0 NVIDIA H100 … (sm_90, …)`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu(cpu) => cpu.describe(),
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => gpu.describe(),
        }
    }

    /// The GPU, when this is one.
    #[cfg(feature = "cuda")]
    pub fn gpu(&self) -> Option<&Gpu> {
        match self {
            Device::Cuda(gpu) => Some(gpu),
            Device::Cpu(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_print_and_open_without_a_gpu_as_documented() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
        let err = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.to_string().contains("use cpu, cuda or auto"), "{err}");
        assert!(matches!(Device::open(DeviceChoice::Cpu).unwrap(), (Device::Cpu(_), None)));
        // Auto agrees with Cuda: a GPU when Cuda opens one, else the CPU
        // with Cuda's reason (the two differ only in failing).
        let (auto, why) = Device::open(DeviceChoice::Auto).unwrap();
        match Device::open(DeviceChoice::Cuda) {
            #[cfg(feature = "cuda")]
            Ok((Device::Cuda(_), None)) => assert!(matches!(auto, Device::Cuda(_)) && why.is_none()),
            Ok(other) => panic!("cuda opened {other:?}"),
            Err(e) => {
                assert!(matches!(auto, Device::Cpu(_)));
                assert_eq!(why.map(|w| w.to_string()), Some(e.to_string()));
            }
        }
    }
}
