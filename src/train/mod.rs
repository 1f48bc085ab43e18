//! A small autograd-free trainer: GPT-2-architecture models fine-tuned with
//! LoRA, Tied-LoRA/VeRA, Uni-LoRA or fully, every backward written by hand.
//!
//! - [`ops`]: the non-GEMM ops ([`ops::TrainOps`]) the model needs.
//! - [`config`]: the model's shape (Hugging Face `config.json`).
//! - [`data`]: token files, byte text, the embedded domains; eval metrics.
//! - [`model`]: GPT-2 forward and backward over any [`model::TrainBackend`].
//! - [`adapters`]: LoRA, Tied-LoRA, VeRA and Uni-LoRA parameters.
//! - [`optimizer`]: AdamW, clipping, schedules, parameter groups.
//! - [`plot`]: loss curves as SVG.
//! - [`spec`]: model and data specs (`random:…`, `embedded:…`, `tokens:…`).
//! - [`checkpoint`]: adapter/model files and resumable checkpoints.
//! - [`run`]: a run's recorded sources and the checks of a resumed or
//!   adapter-initialised run.
//! - [`trainer`]: the loop: steps, refusals, evaluation, checkpoints.

pub mod adapters;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod model;
pub mod ops;
pub mod optimizer;
pub mod plot;
pub mod run;
pub mod spec;
pub mod trainer;
