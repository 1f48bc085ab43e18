//! A small autograd-free trainer: GPT-2-architecture models fine-tuned with
//! LoRA, Tied-LoRA/VeRA, Uni-LoRA or fully, every backward written by hand.
//!
//! The non-GEMM ops the model needs are the [`crate::nn`] and
//! [`crate::attention`] kernel families; every linear layer is
//! [`crate::lowrank`].
//!
//! - [`config`]: the model's shape (Hugging Face `config.json`).
//! - [`data`]: token files, byte text, the embedded domains; eval metrics.
//! - [`model`]: GPT-2 forward and backward over any [`TrainBackend`].
//! - [`module`]: the linear modules of a block that adapters target.
//! - [`adapters`]: LoRA, Tied-LoRA, VeRA and Uni-LoRA parameters.
//! - [`optimizer`]: AdamW, clipping, schedules, parameter groups.
//! - [`plot`]: loss curves as SVG.
//! - [`spec`]: model and data specs (`random:…`, `embedded:…`, `tokens:…`).
//! - [`checkpoint`]: adapter/model files and resumable checkpoints.
//! - [`run`]: a run's recorded sources and the checks of a resumed or
//!   adapter-initialised run.
//! - [`trainer`]: the loop: steps, refusals, evaluation, checkpoints.
//!
//! Imports run one way: `module` ← `adapters` ← `model` ← `checkpoint` ←
//! `trainer`, and `optimizer` ← `adapters`; the backend bound
//! [`TrainBackend`] and [`F32`] sit here, above them all.

pub mod adapters;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod model;
pub mod module;
pub mod optimizer;
pub mod plot;
pub mod run;
pub mod spec;
pub mod trainer;

use crate::attention::AttentionOps;
use crate::lowrank::packed::PackedOps;
use crate::lowrank::LowRankOps;
use crate::nn::NnOps;
use crate::projection::ProjectionOps;

/// Everything the trainer needs from a backend: the kernel families it
/// calls. Implemented for every backend that has them.
pub trait TrainBackend: NnOps + AttentionOps + LowRankOps + PackedOps + ProjectionOps {}
impl<B: NnOps + AttentionOps + LowRankOps + PackedOps + ProjectionOps> TrainBackend for B {}

/// An f32 buffer of backend `B`.
pub type F32<B> = <B as crate::Backend>::Buf<f32>;
