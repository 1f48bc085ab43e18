//! Causal multi-head self-attention in the memory-saving ("flash") form:
//! the one non-GEMM op of a transformer block whose cost grows with the
//! square of the sequence.
//!
//! # Layout
//! `qkv` is tokens × 3W (`W = heads · head_dim`), each row `[q | k | v]`,
//! head `h` in columns `h·hd..(h+1)·hd` of each third, as GPT-2's `c_attn`
//! writes it. `out` (and `dout`) are tokens × W. `lse` is
//! `[batch][head][query]`, [`AttnShape::lse_len`] f32s.
//!
//! # Forward
//! For one (row, head), with `d = head_dim` and queries `i`, keys `j ≤ i`:
//!
//! ```text
//! S_ij   = q_i · k_j / √d
//! lse_i  = log Σ_{j≤i} exp(S_ij)
//! P_ij   = exp(S_ij − lse_i)            (0 for j > i: the causal mask)
//! O_i    = Σ_j P_ij · v_j
//! ```
//!
//! Only `O` and `lse` are kept: the `seq × seq` matrix `P` is never stored
//! (at GPT-2 small's shape, batch 8, 12 heads, seq 1024, it would be 400 MB
//! per layer).
//!
//! # Backward
//! `P` is recomputed from `qkv` and `lse`. With `dP = dO·Vᵀ`, the softmax
//! backward needs the row sums `D_i = Σ_j P_ij·dP_ij`, which equal
//! `dO_i · O_i`, so `P` need not be materialised for them either:
//!
//! ```text
//! dV = Pᵀ · dO
//! dS = P ⊙ (dP − D)
//! dQ = dS · K / √d
//! dK = dSᵀ · Q / √d
//! ```
//!
//! The CPU twin ([`crate::cpu::attention`]) computes exactly these in f64;
//! the kernels (`kernels/attention.cu`, wrappers in
//! [`crate::cuda::attention`]) tile them FlashAttention-2 style with f32
//! accumulation.

use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::check_len;
use crate::nn::SeqShape;
use crate::{Error, Result};

/// Shape of a causal multi-head attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Rows and tokens per row.
    pub seq: SeqShape,
    /// Heads.
    pub heads: usize,
    /// Channels per head (`n_embd / heads`).
    pub head_dim: usize,
}

impl AttnShape {
    /// `n_embd`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Elements of the per-query log-sum-exp the attention forward keeps
    /// for its backward: batch·heads·seq.
    pub fn lse_len(&self) -> usize {
        self.seq.batch * self.heads * self.seq.seq
    }
}

/// Causal attention on a backend. `T` is the storage dtype of `qkv`, `out`
/// and their gradients; `lse` is always f32 and every sum is at least f32.
pub trait AttentionOps: Backend + Sized {
    /// Causal multi-head attention on `qkv` (see the module docs for the
    /// layout). Overwrites `out` (tokens × width) and the per-query
    /// log-sum-exp of the scaled scores (`lse_len()` f32s): all the
    /// backward needs.
    fn attention_forward<T: Element>(
        &self,
        qkv: &Self::Buf<T>,
        shape: AttnShape,
        out: &mut Self::Buf<T>,
        lse: &mut Self::Buf<f32>,
    ) -> Result<()> {
        self.attention_forward_strided(qkv, shape, out, shape.width(), lse)
    }

    /// [`AttentionOps::attention_forward`] writing the output's rows
    /// `out_ld` ≥ width apart (`out` holds tokens·`out_ld`; the columns past
    /// the width keep their values): straight into a packed attn.c_proj's
    /// `x_packed` ([`crate::lowrank::packed`]).
    fn attention_forward_strided<T: Element>(
        &self,
        qkv: &Self::Buf<T>,
        shape: AttnShape,
        out: &mut Self::Buf<T>,
        out_ld: usize,
        lse: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Attention backward, recomputing the probabilities from `qkv` and
    /// `lse`: `dqkv` overwritten. `out` and `lse` are the forward's.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward<T: Element>(
        &self,
        dout: &Self::Buf<T>,
        qkv: &Self::Buf<T>,
        out: &Self::Buf<T>,
        lse: &Self::Buf<f32>,
        shape: AttnShape,
        dqkv: &mut Self::Buf<T>,
    ) -> Result<()> {
        let w = shape.width();
        self.attention_backward_strided(dout, qkv, out, w, lse, shape, dqkv, 3 * w)
    }

    /// [`AttentionOps::attention_backward`] reading the forward's output
    /// from rows `out_ld` ≥ width apart (`out` holds tokens·`out_ld`): the
    /// copy a packed attn.c_proj keeps in its `x_packed`
    /// ([`crate::lowrank::packed`]), so the plain output need not be kept.
    /// `dqkv`'s rows go `dqkv_ld` ≥ 3·width apart (`dqkv` holds
    /// tokens·`dqkv_ld`; the columns past 3·width keep their values):
    /// straight into a packed c_attn's `dy_packed`, saving the copy of the
    /// whole gradient into it.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_strided<T: Element>(
        &self,
        dout: &Self::Buf<T>,
        qkv: &Self::Buf<T>,
        out: &Self::Buf<T>,
        out_ld: usize,
        lse: &Self::Buf<f32>,
        shape: AttnShape,
        dqkv: &mut Self::Buf<T>,
        dqkv_ld: usize,
    ) -> Result<()>;
}

/// `out` of [`AttentionOps::attention_forward_strided`] and
/// [`AttentionOps::attention_backward_strided`]: `out_ld` ≥ the
/// width and tokens·`out_ld` elements.
pub fn check_strided_out(op: &'static str, shape: AttnShape, out: usize, out_ld: usize) -> Result<()> {
    crate::nn::check::strided_out(op, "out", out, shape.seq.tokens(), shape.width(), out_ld)
}

/// `dqkv` of [`AttentionOps::attention_backward_strided`]: `dqkv_ld` ≥
/// 3·width and tokens·`dqkv_ld` elements.
pub fn check_strided_dqkv(op: &'static str, shape: AttnShape, dqkv: usize, dqkv_ld: usize) -> Result<()> {
    crate::nn::check::strided_out(op, "dqkv", dqkv, shape.seq.tokens(), 3 * shape.width(), dqkv_ld)
}

/// The argument check every [`AttentionOps`] implementation runs, so the
/// CPU twin and the CUDA wrappers accept and reject the same calls: a
/// non-empty `shape`, and `qkv`, the per-token output (`out` for the
/// forward, `dout` for the backward) and `lse` of its lengths.
pub fn check_lengths(op: &'static str, shape: AttnShape, qkv: usize, out: usize, lse: usize) -> Result<()> {
    if shape.head_dim == 0 || shape.heads == 0 || shape.seq.tokens() == 0 {
        return Err(Error::invalid(op, format!("empty attention shape {shape:?}")));
    }
    check_len(op, "qkv", qkv, shape.seq.tokens() * 3 * shape.width())?;
    check_len(op, if op.ends_with("forward") { "out" } else { "dout" }, out, shape.seq.tokens() * shape.width())?;
    check_len(op, "lse", lse, shape.lse_len())
}
