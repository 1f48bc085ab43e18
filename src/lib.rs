//! # lorafuse
//!
//! Hand-written CUDA kernels, with a minimal runtime, for the LoRA family of
//! parameter-efficient fine-tuning, each with a plain CPU twin that serves as
//! the test oracle and as a working backend without a GPU.
//!
//! - [`lowrank`]: the fused low-rank update of LoRA, Tied-LoRA and VeRA on a
//!   linear layer, forward and hand-written backward.
//! - [`projection`]: Uni-LoRA's shared projection `θ_D = P·θ_d` (gather) and
//!   its transpose (scatter), `P` computed from a seed, never stored.
//! - [`adapter`], [`peft`], [`adapter_sum`]: adapters in memory and in PEFT
//!   files; exact sums, merge/unmerge into base weights, the interference
//!   (cosine) diagnostic and low-rank recompression; [`tensor_file`], the
//!   one hardened safetensors reader and writer every file goes through,
//!   and [`atomic_file`], the crash-safe writes.
//! - [`multi_adapter`]: many adapters in one batch for serving (segmented
//!   prefill, batched decode, a device pool, Uni-LoRA served from `θ`), and
//!   [`capi`], the C ABI of `include/lorafuse.h`.
//! - [`nn`], [`attention`]: the transformer's other ops (embedding,
//!   LayerNorm, GELU, cross-entropy, AdamW; flash-form causal attention).
//! - [`train`]: a GPT-2-architecture trainer with hand-written backward
//!   passes for full, LoRA, Tied-LoRA, VeRA and Uni-LoRA fine-tuning.
//! - [`experiment`]: experiments built on all of the above (the adapter
//!   summation study).
//!
//! Every operation exists three times under one name: `kernels/<family>.cu`,
//! `src/cpu/<family>.rs` (the oracle) and `src/cuda/<family>.rs` (the launch
//! wrappers), with `tests/<family>.rs` and `benches/<family>.rs` beside them.
//!
//! ```
//! use lorafuse::{cpu::Cpu, projection::*, Backend, DType};
//! # fn main() -> lorafuse::Result<()> {
//! let layout = ProjectionLayout::packed(DType::F32, [("A".to_string(), [4, 8]), ("B".to_string(), [8, 4])])?;
//! let p = Projection::new(layout.rows(), 16, 42, Assignment::Hash)?;
//! let cpu = Cpu;
//! let prepared = cpu.projection_prepare(&p)?;
//! let theta = cpu.upload(&lorafuse::rng::Rng::new(1).uniform_vec(16, -0.02, 0.02))?;
//! let (mut a, mut b) = (vec![0f32; 32], vec![0f32; 32]);
//! cpu.projection_gather(&prepared, &theta, &layout, &mut [&mut a, &mut b])?;
//! # Ok(()) }
//! ```

pub mod adapter;
pub mod adapter_sum;
pub mod atomic_file;
pub mod attention;
pub mod backend;
pub mod capi;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod experiment;
pub mod lowrank;
pub mod memory;
pub mod multi_adapter;
pub mod nn;
pub mod op_timing;
pub mod peft;
pub mod projection;
pub mod rng;
pub mod tensor_file;
pub mod testing;
pub mod train;

pub use backend::{Backend, Scalar};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
