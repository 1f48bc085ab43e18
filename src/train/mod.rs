//! A small autograd-free trainer: GPT-2-architecture models fine-tuned with
//! LoRA, Tied-LoRA/VeRA, Uni-LoRA or fully, every backward written by hand.
//!
//! - [`ops`]: the non-GEMM ops ([`ops::TrainOps`]) the model needs.

pub mod ops;
