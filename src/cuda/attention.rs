//! Placeholder until the flash-form attention kernels land (same branch
//! of work): both calls return an error.

use cudarc::driver::CudaSlice;

use super::Gpu;
use crate::train::ops::AttnShape;
use crate::{Element, Error, Result};

/// Flash-form causal attention forward (not yet wired).
pub fn attention_forward<T: Element>(
    _gpu: &Gpu,
    _qkv: &CudaSlice<T>,
    _shape: AttnShape,
    _out: &mut CudaSlice<T>,
    _lse: &mut CudaSlice<f32>,
) -> Result<()> {
    Err(Error::invalid("attention_forward", "the CUDA attention kernels are not merged yet"))
}

/// Flash-form causal attention backward (not yet wired).
pub fn attention_backward<T: Element>(
    _gpu: &Gpu,
    _dout: &CudaSlice<T>,
    _qkv: &CudaSlice<T>,
    _out: &CudaSlice<T>,
    _lse: &CudaSlice<f32>,
    _shape: AttnShape,
    _dqkv: &mut CudaSlice<T>,
) -> Result<()> {
    Err(Error::invalid("attention_backward", "the CUDA attention kernels are not merged yet"))
}
