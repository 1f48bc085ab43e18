//! A small autograd-free trainer: GPT-2-architecture models fine-tuned with
//! LoRA, Tied-LoRA/VeRA, Uni-LoRA or fully, every backward written by hand.
//!
//! The non-GEMM ops the model needs are the [`crate::nn`] and
//! [`crate::attention`] kernel families; every linear layer is
//! [`crate::lowrank`].
//!
//! - [`config`]: the model's shape (Hugging Face `config.json`).
//! - [`data`]: token files, byte text, the embedded domains; eval metrics.
//! - [`model`]: GPT-2 forward and backward over any [`model::TrainBackend`].
//! - [`adapters`]: LoRA, Tied-LoRA, VeRA and Uni-LoRA parameters.
//! - [`optimizer`]: AdamW, clipping, schedules, parameter groups.
//! - [`plot`]: loss curves as PNG.
//! - [`checkpoint`]: adapter/model files and resumable checkpoints.
//! - [`trainer`]: the loop: steps, refusals, evaluation, checkpoints.

pub mod adapters;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod model;
pub mod optimizer;
pub mod plot;
pub mod trainer;
