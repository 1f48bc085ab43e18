//! The pointwise and row-wise ops of a transformer that are not matrix
//! products: token and position embedding, LayerNorm (alone and fused with
//! the residual add before it), GELU, residual add, the f32 → compute-dtype
//! cast, fused softmax cross-entropy, AdamW and the sums of squares of the
//! global gradient norm.
//!
//! Every linear layer (including the tied LM head) goes through
//! [`crate::lowrank::LowRankOps`] and attention through
//! [`crate::attention::AttentionOps`]; these are the remaining pieces a
//! GPT-2 forward and backward need. The CPU twin is [`crate::cpu::nn`]
//! (f64 arithmetic, f32 at the edges); the CUDA one is
//! [`crate::cuda::nn`] over `kernels/nn.cu`.
//!
//! # Math
//! Per row `x` of width `d` (LayerNorm), per element (GELU), per row of
//! `V` logits `z` with target `y` (cross-entropy):
//!
//! ```text
//! LayerNorm   μ = mean(x)   rstd = 1/√(var(x) + ε)   x̂ = (x − μ)·rstd
//!             out = x̂·γ + β
//!   backward  ĝ = dout·γ
//!             dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
//!             dγ += Σ_rows dout·x̂      dβ += Σ_rows dout
//! GELU        gelu(x) = ½x·(1 + tanh(√(2/π)·(x + 0.044715x³)))
//!   backward  dx = dout·gelu'(x)
//! Cross-ent.  lse = log Σ_v exp(z_v)   loss = lse − z_y
//!   backward  dz = scale·(softmax(z) − onehot(y))
//! AdamW       g ← g·grad_scale
//!             m ← β₁m + (1 − β₁)g      v ← β₂v + (1 − β₂)g²
//!             p ← p − lr·wd·p − lr·(m/(1 − β₁ᵗ)) / (√(v/(1 − β₂ᵗ)) + ε)
//! ```
//!
//! See [`NnOps`] for which buffers are in the compute dtype and which
//! stay f32. Backward functions say whether they overwrite or accumulate
//! their outputs; parameter gradients always accumulate (so tied weights,
//! such as the token embedding used by both the input and the LM head, sum
//! their contributions).

use crate::backend::Backend;
use crate::dtype::Element;
use crate::Result;

/// Targets equal to this are ignored by [`NnOps::cross_entropy`] (padding
/// and prompt positions that carry no loss).
pub const IGNORE: u32 = u32::MAX;

/// Shape of a batch of token rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqShape {
    /// Rows in the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
}

impl SeqShape {
    /// Tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// One AdamW update's hyper-parameters (decoupled weight decay, bias
/// correction by the step count).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this parameter group at this step.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`.
    pub eps: f64,
    /// Decoupled weight decay: `p ← p − lr·wd·p` before the Adam step.
    pub weight_decay: f64,
    /// 1-based step number, for bias correction `1 − βᵗ`.
    pub step: u64,
    /// Multiplies every gradient first (gradient clipping's factor).
    pub grad_scale: f64,
}

/// One tensor of a multi-tensor AdamW step ([`NnOps::adamw_many`]):
/// its buffers and its parameter group's learning rate and decay.
pub struct AdamWTensor<'a, B: Backend> {
    /// The f32 parameter, updated in place.
    pub param: &'a mut B::Buf<f32>,
    /// Its gradient.
    pub grad: &'a B::Buf<f32>,
    /// First moment, updated in place.
    pub m: &'a mut B::Buf<f32>,
    /// Second moment, updated in place.
    pub v: &'a mut B::Buf<f32>,
    /// Learning rate of this tensor at this step.
    pub lr: f64,
    /// Its decoupled weight decay.
    pub weight_decay: f64,
}

/// Layout of the optimizer state that [`NnOps::optimizer_prepare`]
/// writes and [`NnOps::adamw_many_device`] reads: f64s kept on the
/// backend, so the clip factor, the schedule's rate and the decision to
/// refuse a step never travel through the host between the gradient norm
/// and the update (no stall of the stream, and the same launches serve
/// every step, as a captured CUDA graph needs). The host reads the header
/// when it wants the step's report.
pub mod optim_state {
    /// Global gradient norm of the last prepared step (∞ or NaN when a
    /// tensor was not finite).
    pub const NORM: usize = crate::abi::OPTIM_NORM as usize;
    /// Clip factor the update multiplies every gradient by (1 when the
    /// norm is within `clip_norm`).
    pub const SCALE: usize = crate::abi::OPTIM_SCALE as usize;
    /// 1 when the step is taken, 0 when it is refused (a non-finite norm
    /// or guard): a refused step changes no parameter and no moment.
    pub const ACCEPTED: usize = crate::abi::OPTIM_ACCEPTED as usize;
    /// Accepted steps so far, this one included (the bias correction's
    /// `t` and the schedule's position).
    pub const STEP: usize = crate::abi::OPTIM_STEP as usize;
    /// The schedule's factor at `STEP`.
    pub const LR_FACTOR: usize = crate::abi::OPTIM_LR_FACTOR as usize;
    /// `1 − β₁^STEP`.
    pub const CORRECTION1: usize = crate::abi::OPTIM_CORRECTION1 as usize;
    /// `1 − β₂^STEP`.
    pub const CORRECTION2: usize = crate::abi::OPTIM_CORRECTION2 as usize;
    /// Index of the first non-finite tensor (norm tensors, then guards), or
    /// −1.
    pub const FIRST_BAD: usize = crate::abi::OPTIM_FIRST_BAD as usize;
    /// Header length; `Σx²` of each tensor follows it.
    pub const HEADER: usize = crate::abi::OPTIM_HEADER as usize;
    /// Blocks per tensor of the GPU's norm pass, whose partial sums go to
    /// a scratch buffer the caller keeps, so a step allocates nothing.
    pub const NORM_BLOCKS: usize = 512;

    /// f64s of the state of a step over `tensors` tensors (norm tensors
    /// and guards together).
    pub fn len(tensors: usize) -> usize {
        HEADER + tensors
    }

    /// f64s of the scratch buffer of a step over `tensors` tensors.
    pub fn scratch_len(tensors: usize) -> usize {
        tensors * NORM_BLOCKS
    }

    /// A fresh state that has taken `step` steps.
    pub fn initial(tensors: usize, step: u64) -> Vec<f64> {
        let mut s = vec![0.0; len(tensors)];
        s[STEP] = step as f64;
        s[FIRST_BAD] = -1.0;
        s
    }
}

/// Shape of the learning rate after warmup ([`OptimConsts::decay`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Decay {
    /// Cosine from the peak to `min_lr_ratio`.
    Cosine = 0,
    /// Linear from the peak to `min_lr_ratio`.
    Linear = 1,
    /// The peak throughout.
    Constant = 2,
}

/// The constants of a run's optimizer steps that
/// [`NnOps::optimizer_prepare`] and [`NnOps::adamw_many_device`] take:
/// the same on every step, so the per-step values (step count, rate,
/// clip factor) come from the backend's state alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimConsts {
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip_norm: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`.
    pub eps: f64,
    /// Linear warmup steps (from 0).
    pub warmup: u64,
    /// Steps of the whole run (the decay ends there).
    pub total: u64,
    /// Final rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Shape after warmup.
    pub decay: Decay,
}

impl OptimConsts {
    /// The multiplier of every peak rate at 1-based `step` (mirrored by
    /// `lr_factor` in the kernels).
    pub fn lr_factor(&self, step: u64) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return step as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step.saturating_sub(self.warmup)) as f64 / span).min(1.0);
        let m = self.min_lr_ratio;
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => m + (1.0 - m) * (1.0 - progress),
            Decay::Cosine => m + (1.0 - m) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }

    /// The header of [`optim_state`] after a step over tensors whose
    /// `Σx²` are `sums` (the first `norm_tensors` make the norm, the rest
    /// are guards), from the accepted steps so far: the arithmetic every
    /// backend follows (the CPU twin calls it; the kernel mirrors it).
    pub fn decide(&self, sums: &[f64], norm_tensors: usize, steps_before: f64) -> [f64; optim_state::HEADER] {
        use optim_state::*;
        let norm_sq: f64 = sums[..norm_tensors].iter().sum();
        let first_bad = sums.iter().position(|s| !s.is_finite());
        let norm = norm_sq.sqrt();
        let accepted = first_bad.is_none() && norm.is_finite();
        let step = steps_before + accepted as u64 as f64;
        let t = step.max(1.0);
        let mut h = [0.0; HEADER];
        h[NORM] = norm;
        h[SCALE] = if self.clip_norm > 0.0 && norm > self.clip_norm { self.clip_norm / norm } else { 1.0 };
        h[ACCEPTED] = accepted as u64 as f64;
        h[STEP] = step;
        h[LR_FACTOR] = self.lr_factor(t as u64);
        h[CORRECTION1] = 1.0 - self.beta1.powf(t);
        h[CORRECTION2] = 1.0 - self.beta2.powf(t);
        h[FIRST_BAD] = first_bad.map_or(-1.0, |i| i as f64);
        h
    }
}

/// The factor [`NnOps::cross_entropy_scaled`] multiplies the gradient
/// `softmax − onehot` by.
pub enum GradScale<'a, B: Backend> {
    /// This factor, given by the caller (a captured graph records it).
    Fixed(f64),
    /// [`mean_over_scored`] of these targets: `1/n` for the `n` that are
    /// not [`IGNORE`], 0 when there are none (the gradient of the mean
    /// loss over scored positions). Counted on the backend from the buffer
    /// itself, so a captured graph recounts on every replay instead of
    /// recording one batch's count. They may be the targets of more rows
    /// than the call's logits: the whole batch, when the LM head runs in
    /// row chunks.
    MeanOverScored(&'a B::Buf<u32>),
}

impl<B: Backend> Clone for GradScale<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for GradScale<'_, B> {}

/// The scale [`GradScale::MeanOverScored`] stands for: `1/n` (divided in
/// f64) for the `n` targets that are not [`IGNORE`], 0 when there are
/// none. Every backend computes exactly this (the CUDA kernel in double,
/// rounded to f32 once, as a [`GradScale::Fixed`] of this value is).
pub fn mean_over_scored(targets: &[u32]) -> f64 {
    match targets.iter().filter(|&&t| t != IGNORE).count() {
        0 => 0.0,
        n => 1.0 / n as f64,
    }
}

/// Per-position results of [`NnOps::cross_entropy`].
pub struct CrossEntropyOut<B: Backend> {
    /// `−log softmax(logits)[target]` per row (0 where the target is ignored).
    pub losses: B::Buf<f32>,
    /// 1 where `argmax(logits) == target`, else 0 (0 where ignored).
    pub correct: B::Buf<u32>,
}

/// Token ids on the backend together with the host copy they were uploaded
/// from. Range checks (a token `>= vocab` is an [`crate::Error::Index`])
/// read the host copy, so no op has to download the ids and stall the
/// stream; the ops themselves read only the backend's copy (the embedding
/// backward groups rows by token there), so a step queued once can be
/// replayed over new ids written into the same buffer. Kernels also guard
/// every index they read, so a `host` that does not match `device` gives
/// wrong numbers, never an out-of-bounds access.
pub struct TokenIds<'a, B: Backend> {
    /// The ids on the backend.
    pub device: &'a B::Buf<u32>,
    /// The same ids on the host.
    pub host: &'a [u32],
}

impl<B: Backend> Clone for TokenIds<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for TokenIds<'_, B> {}

/// The non-GEMM ops of a transformer, in mixed precision. All shapes are
/// checked; a mismatch is an [`crate::Error::Shape`] naming the operand.
///
/// # Precision
/// `T` is the compute dtype (f32, or bf16 for mixed precision): the base
/// weights' working copy and every activation that feeds or leaves a GEMM.
/// The residual stream and its gradient stay f32 (as under PyTorch's
/// autocast, where the residual adds see an f32 operand), as do LayerNorm
/// statistics, the attention's log-sum-exp, losses, parameter gradients
/// and optimizer state. Every op computes in f32 (CUDA) or f64 (CPU).
pub trait NnOps: Backend + Sized {
    /// `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]` into the f32 residual
    /// stream (`out` overwritten). A token `>= vocab` or `seq > positions`
    /// is an error.
    fn embedding_forward<T: Element>(
        &self,
        tokens: TokenIds<'_, Self>,
        wte: &Self::Buf<T>,
        wpe: &Self::Buf<T>,
        shape: SeqShape,
        width: usize,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Accumulates `dout` into the rows of `dwte` its tokens picked and into
    /// `dwpe`'s first `seq` rows (either may be skipped when frozen).
    fn embedding_backward(
        &self,
        tokens: TokenIds<'_, Self>,
        dout: &Self::Buf<f32>,
        shape: SeqShape,
        width: usize,
        dwte: Option<&mut Self::Buf<f32>>,
        dwpe: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;

    /// Row-wise LayerNorm of the f32 residual stream: `out = (x − μ)·rstd·γ
    /// + β` in `T` (it feeds a GEMM), keeping `mean` and `rstd` (one per
    /// row) for the backward. `out` is overwritten.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward<T: Element>(
        &self,
        x: &Self::Buf<f32>,
        gamma: &Self::Buf<T>,
        beta: &Self::Buf<T>,
        eps: f64,
        out: &mut Self::Buf<T>,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
    ) -> Result<()> {
        let width = Self::len(gamma);
        self.layernorm_forward_strided(x, gamma, beta, eps, out, width, mean, rstd)
    }

    /// [`NnOps::layernorm_forward`] writing rows `out_ld` ≥ width apart
    /// (`out` holds rows·`out_ld`; the columns past the width keep their
    /// values): the normed rows land straight in a packed layer's `x_packed`
    /// ([`crate::lowrank::packed`]) instead of being copied there.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward_strided<T: Element>(
        &self,
        x: &Self::Buf<f32>,
        gamma: &Self::Buf<T>,
        beta: &Self::Buf<T>,
        eps: f64,
        out: &mut Self::Buf<T>,
        out_ld: usize,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// The residual add fused into the LayerNorm that follows it: `resid =
    /// x + y` (the new f32 residual stream, overwritten) and
    /// [`NnOps::layernorm_forward`] of `resid`, in one pass over the row
    /// (the separate add would write `resid` and the LayerNorm read it
    /// back). Same results as [`NnOps::residual_add`] then
    /// [`NnOps::layernorm_forward`].
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward<T: Element>(
        &self,
        x: &Self::Buf<f32>,
        y: &Self::Buf<T>,
        gamma: &Self::Buf<T>,
        beta: &Self::Buf<T>,
        eps: f64,
        resid: &mut Self::Buf<f32>,
        out: &mut Self::Buf<T>,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
    ) -> Result<()> {
        let width = Self::len(gamma);
        self.residual_layernorm_forward_strided(x, y, gamma, beta, eps, resid, out, width, mean, rstd)
    }

    /// [`NnOps::residual_layernorm_forward`] writing the normed rows
    /// `out_ld` ≥ width apart (as [`NnOps::layernorm_forward_strided`]);
    /// `resid` stays contiguous.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward_strided<T: Element>(
        &self,
        x: &Self::Buf<f32>,
        y: &Self::Buf<T>,
        gamma: &Self::Buf<T>,
        beta: &Self::Buf<T>,
        eps: f64,
        resid: &mut Self::Buf<f32>,
        out: &mut Self::Buf<T>,
        out_ld: usize,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// LayerNorm backward: **accumulates** into the f32 `dx` (the residual
    /// stream's gradient already sits there) and into `dgamma`, `dbeta`
    /// when given.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward<T: Element>(
        &self,
        dout: &Self::Buf<T>,
        x: &Self::Buf<f32>,
        gamma: &Self::Buf<T>,
        mean: &Self::Buf<f32>,
        rstd: &Self::Buf<f32>,
        dx: &mut Self::Buf<f32>,
        dgamma: Option<&mut Self::Buf<f32>>,
        dbeta: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;

    /// GELU, tanh approximation (GPT-2's `gelu_new`). `out` overwritten.
    fn gelu_forward<T: Element>(&self, x: &Self::Buf<T>, out: &mut Self::Buf<T>) -> Result<()> {
        let n = Self::len(x);
        self.gelu_forward_strided(x, n, out, n)
    }

    /// [`NnOps::gelu_forward`] of `x` as rows of `cols`, writing them
    /// `out_ld` ≥ `cols` apart (the columns past `cols` keep their values):
    /// the MLP's activation lands straight in c_proj's `x_packed`.
    fn gelu_forward_strided<T: Element>(
        &self,
        x: &Self::Buf<T>,
        cols: usize,
        out: &mut Self::Buf<T>,
        out_ld: usize,
    ) -> Result<()>;

    /// GELU backward from its input: `dx = dout·gelu'(x)`, overwritten.
    fn gelu_backward<T: Element>(&self, dout: &Self::Buf<T>, x: &Self::Buf<T>, dx: &mut Self::Buf<T>) -> Result<()> {
        let n = Self::len(x);
        self.gelu_backward_strided(dout, x, n, dx, n)
    }

    /// [`NnOps::gelu_backward`] with `dout` and `x` rows of `cols` and the
    /// rows of `dx` `dx_ld` ≥ `cols` apart (as
    /// [`NnOps::gelu_forward_strided`]): c_fc's output gradient lands
    /// straight in its `dy_packed`.
    fn gelu_backward_strided<T: Element>(
        &self,
        dout: &Self::Buf<T>,
        x: &Self::Buf<T>,
        cols: usize,
        dx: &mut Self::Buf<T>,
        dx_ld: usize,
    ) -> Result<()>;

    /// Residual connection into the f32 stream: `out = x + y` (`out`
    /// overwritten; `x` is kept, the LayerNorm backward reads it).
    fn residual_add<T: Element>(&self, x: &Self::Buf<f32>, y: &Self::Buf<T>, out: &mut Self::Buf<f32>) -> Result<()>;

    /// `out = x` rounded to `T` (the residual gradient entering a GEMM's
    /// backward; the working copy of f32 master weights).
    fn cast_from_f32<T: Element>(&self, x: &Self::Buf<f32>, out: &mut Self::Buf<T>) -> Result<()> {
        let n = Self::len(x);
        self.cast_from_f32_strided(x, n, out, n)
    }

    /// [`NnOps::cast_from_f32`] of `x` as rows of `cols`, writing them
    /// `out_ld` ≥ `cols` apart (as [`NnOps::gelu_forward_strided`]): the
    /// residual gradient lands straight in a projection's `dy_packed`.
    fn cast_from_f32_strided<T: Element>(
        &self,
        x: &Self::Buf<f32>,
        cols: usize,
        out: &mut Self::Buf<T>,
        out_ld: usize,
    ) -> Result<()>;

    /// Fused softmax cross-entropy over `rows × vocab` logits (any `T`,
    /// reduced in f32). When `grad` is set, the logits are **overwritten**
    /// by `grad·(softmax − onehot)` (0 on ignored rows), so the
    /// probabilities never need a buffer of their own. Targets equal to
    /// [`IGNORE`] carry no loss; others must be `< vocab`.
    fn cross_entropy<T: Element>(
        &self,
        logits: &mut Self::Buf<T>,
        targets: TokenIds<'_, Self>,
        vocab: usize,
        grad: Option<f64>,
    ) -> Result<CrossEntropyOut<Self>> {
        self.cross_entropy_padded(logits, targets, vocab, vocab, grad)
    }

    /// [`NnOps::cross_entropy`] over logits whose rows are `padded ≥
    /// vocab` wide (the LM head of a padded vocabulary): columns
    /// `vocab..padded` are padding, out of the softmax (probability 0,
    /// never the argmax) and given a zero gradient, so the loss and the
    /// gradient equal those of the `rows × vocab` logits.
    fn cross_entropy_padded<T: Element>(
        &self,
        logits: &mut Self::Buf<T>,
        targets: TokenIds<'_, Self>,
        vocab: usize,
        padded: usize,
        grad: Option<f64>,
    ) -> Result<CrossEntropyOut<Self>> {
        self.cross_entropy_scaled(logits, targets, vocab, padded, grad.map(GradScale::Fixed))
    }

    /// [`NnOps::cross_entropy_padded`] with the gradient's scale given as
    /// a [`GradScale`]: fixed by the caller, or the mean over scored
    /// positions counted on the backend ([`GradScale::MeanOverScored`]),
    /// which a captured graph recounts on every replay.
    fn cross_entropy_scaled<T: Element>(
        &self,
        logits: &mut Self::Buf<T>,
        targets: TokenIds<'_, Self>,
        vocab: usize,
        padded: usize,
        grad: Option<GradScale<'_, Self>>,
    ) -> Result<CrossEntropyOut<Self>>;

    /// One AdamW step on a parameter tensor, updating `m` and `v` in place.
    fn adamw(
        &self,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
        hp: &AdamWStep,
    ) -> Result<()>;

    /// [`NnOps::adamw`] on every tensor of `tensors`, each with its own
    /// `lr` and `weight_decay` (those of `hp` are ignored; its betas, ε,
    /// step and gradient scale are shared). The same arithmetic as one
    /// call per tensor; a backend may do it in one launch.
    fn adamw_many(&self, tensors: &mut [AdamWTensor<'_, Self>], hp: &AdamWStep) -> Result<()> {
        for t in tensors.iter_mut() {
            let step = AdamWStep { lr: t.lr, weight_decay: t.weight_decay, ..*hp };
            self.adamw(t.param, t.grad, t.m, t.v, &step)?;
        }
        Ok(())
    }

    /// `Σ x²` in f64 of each tensor (NaN or ∞ where an element is
    /// non-finite): the shares of the global gradient norm, all read back
    /// in one transfer (one host sync per optimizer step, not one per
    /// tensor).
    fn sum_squares_each(&self, xs: &[&Self::Buf<f32>]) -> Result<Vec<f64>>;

    /// `Σ x²` of one tensor ([`NnOps::sum_squares_each`]).
    fn sum_squares(&self, x: &Self::Buf<f32>) -> Result<f64> {
        Ok(self.sum_squares_each(&[x])?[0])
    }

    /// Sets every element to zero.
    fn fill_zero(&self, x: &mut Self::Buf<f32>) -> Result<()>;

    /// The optimizer step's decision where the gradients live: `Σx²` of
    /// every tensor of `xs` into `state` (see [`optim_state`]), then the
    /// header by [`OptimConsts::decide`] from the first `norm_tensors`
    /// (the gradients: their norm and clip factor) with the rest as
    /// guards (a loss, say: not finite refuses the step too). Reads the
    /// step count from `state` and writes the next one, so nothing passes
    /// through the host; `state` holds [`optim_state::len`]`(xs.len())`
    /// and `scratch` (partial sums) [`optim_state::scratch_len`] of it.
    fn optimizer_prepare(
        &self,
        xs: &[&Self::Buf<f32>],
        norm_tensors: usize,
        consts: &OptimConsts,
        state: &mut Self::Buf<f64>,
        scratch: &mut Self::Buf<f64>,
    ) -> Result<()>;

    /// [`NnOps::adamw_many`] with the per-step values read from the
    /// `state` that [`NnOps::optimizer_prepare`] wrote: nothing changes
    /// when it refused the step; otherwise each tensor's rate is its `lr`
    /// (the group's peak) times the schedule's factor, gradients are
    /// scaled by the clip factor, and the bias corrections use the state's
    /// step.
    fn adamw_many_device(
        &self,
        tensors: &mut [AdamWTensor<'_, Self>],
        consts: &OptimConsts,
        state: &Self::Buf<f64>,
    ) -> Result<()>;
}

/// Argument checks shared by every [`NnOps`] implementation, so the CPU
/// twin and the CUDA wrappers accept and reject exactly the same calls.
/// Each takes buffer lengths and returns the sizes the op needs.
pub mod check {
    use super::{AdamWStep, SeqShape, IGNORE};
    use crate::error::check_len;
    use crate::{Error, Result};

    /// `len / width`, or a shape error when `len` is not a multiple of it.
    pub fn rows_of(op: &'static str, operand: &'static str, len: usize, width: usize) -> Result<usize> {
        if width == 0 || len % width != 0 {
            return Err(Error::shape(
                op,
                operand,
                format!("a multiple of {width} elements"),
                format!("{len} elements"),
            ));
        }
        Ok(len / width)
    }

    /// Every token `< vocab`.
    pub fn tokens(op: &str, tokens: &[u32], vocab: usize) -> Result<()> {
        match tokens.iter().position(|&t| t as usize >= vocab) {
            None => Ok(()),
            Some(i) => Err(Error::Index {
                what: format!("{op}: token at position {i}"),
                index: tokens[i] as u64,
                bound: vocab as u64,
            }),
        }
    }

    /// [`super::NnOps::embedding_forward`]: returns the vocabulary size.
    pub fn embedding_forward(
        (tokens, wte, wpe, out): (usize, usize, usize, usize),
        shape: SeqShape,
        width: usize,
    ) -> Result<usize> {
        let op = "embedding_forward";
        check_len(op, "tokens", tokens, shape.tokens())?;
        check_len(op, "out", out, shape.tokens() * width)?;
        let vocab = rows_of(op, "wte", wte, width)?;
        let positions = rows_of(op, "wpe", wpe, width)?;
        if shape.seq > positions {
            return Err(Error::invalid(
                "sequence length",
                format!("{} exceeds the model's {positions} positions", shape.seq),
            ));
        }
        Ok(vocab)
    }

    /// [`super::NnOps::embedding_backward`]: returns the vocabulary size
    /// when `dwte` is given.
    pub fn embedding_backward(
        (tokens, dout, dwte, dwpe): (usize, usize, Option<usize>, Option<usize>),
        shape: SeqShape,
        width: usize,
    ) -> Result<Option<usize>> {
        let op = "embedding_backward";
        check_len(op, "tokens", tokens, shape.tokens())?;
        check_len(op, "dout", dout, shape.tokens() * width)?;
        if let Some(dwpe) = dwpe {
            let positions = rows_of(op, "dwpe", dwpe, width)?;
            if shape.seq > positions {
                return Err(Error::shape(
                    op,
                    "dwpe",
                    format!("at least {} rows", shape.seq),
                    format!("{positions} rows"),
                ));
            }
        }
        dwte.map(|len| rows_of(op, "dwte", len, width)).transpose()
    }

    /// [`super::NnOps::layernorm_forward_strided`]: returns `(rows, width)`.
    pub fn layernorm_forward(
        (x, gamma, beta, out, mean, rstd): (usize, usize, usize, usize, usize, usize),
        out_ld: usize,
    ) -> Result<(usize, usize)> {
        let op = "layernorm_forward";
        let rows = rows_of(op, "x", x, gamma)?;
        check_len(op, "beta", beta, gamma)?;
        strided_out(op, "out", out, rows, gamma, out_ld)?;
        check_len(op, "mean", mean, rows)?;
        check_len(op, "rstd", rstd, rows)?;
        Ok((rows, gamma))
    }

    /// An output of `rows` rows of `cols` written `ld` apart: `ld ≥ cols`
    /// (rows would overlap otherwise) and the buffer holds `rows·ld`.
    pub fn strided_out(
        op: &'static str,
        operand: &'static str,
        len: usize,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<()> {
        if ld < cols {
            return Err(Error::invalid(
                op,
                format!(
                    "{operand}'s row stride {ld} is below its {cols} columns: rows would overlap; pass ld ≥ {cols}"
                ),
            ));
        }
        let want =
            rows.checked_mul(ld).ok_or_else(|| Error::invalid(op, format!("{rows} rows of stride {ld} overflow")))?;
        if len != want {
            return Err(Error::shape(
                op,
                operand,
                format!("{rows} rows of stride {ld} = {want} elements"),
                format!("{len} elements"),
            ));
        }
        Ok(())
    }

    /// An elementwise op over `n` inputs as rows of `cols`, written `ld`
    /// apart into `out_len` elements: returns the rows. With `cols` = 0,
    /// everything must be empty.
    pub fn strided_elementwise(
        op: &'static str,
        n: usize,
        cols: usize,
        out: (&'static str, usize),
        ld: usize,
    ) -> Result<usize> {
        if cols == 0 {
            check_len(op, "x", n, 0)?;
            check_len(op, out.0, out.1, 0)?;
            return Ok(0);
        }
        let rows = rows_of(op, "x", n, cols)?;
        strided_out(op, out.0, out.1, rows, cols, ld)?;
        Ok(rows)
    }

    /// [`super::NnOps::layernorm_backward`]: returns `(rows, width)`.
    #[allow(clippy::type_complexity)]
    pub fn layernorm_backward(
        (dout, x, gamma, mean, rstd, dx): (usize, usize, usize, usize, usize, usize),
        dgamma: Option<usize>,
        dbeta: Option<usize>,
    ) -> Result<(usize, usize)> {
        let op = "layernorm_backward";
        let rows = rows_of(op, "x", x, gamma)?;
        check_len(op, "dout", dout, x)?;
        check_len(op, "dx", dx, x)?;
        check_len(op, "mean", mean, rows)?;
        check_len(op, "rstd", rstd, rows)?;
        if let Some(len) = dgamma {
            check_len(op, "dgamma", len, gamma)?;
        }
        if let Some(len) = dbeta {
            check_len(op, "dbeta", len, gamma)?;
        }
        Ok((rows, gamma))
    }

    /// Elementwise ops: every named operand has `n` elements.
    pub fn same_len(op: &'static str, n: usize, operands: &[(&'static str, usize)]) -> Result<()> {
        operands.iter().try_for_each(|&(name, len)| check_len(op, name, len, n))
    }

    /// [`super::NnOps::cross_entropy_padded`]: returns the number of
    /// rows.
    pub fn cross_entropy(logits: usize, targets: &[u32], vocab: usize, padded: usize) -> Result<usize> {
        let op = "cross_entropy";
        if vocab == 0 || padded < vocab {
            return Err(Error::invalid(
                op,
                format!("vocab {vocab} with rows {padded} wide: need 1 ≤ vocab ≤ the padded row width"),
            ));
        }
        let rows = rows_of(op, "logits", logits, padded)?;
        check_len(op, "targets", targets.len(), rows)?;
        if let Some(i) = targets.iter().position(|&t| t != IGNORE && t as usize >= vocab) {
            return Err(Error::Index {
                what: format!("{op}: target at row {i}"),
                index: targets[i] as u64,
                bound: vocab as u64,
            });
        }
        Ok(rows)
    }

    /// [`super::NnOps::optimizer_prepare`]: `state` and `scratch` fit
    /// `tensors` tensors, of which `norm_tensors` make the norm.
    pub fn optim_state(
        op: &'static str,
        (state, scratch): (usize, usize),
        tensors: usize,
        norm_tensors: usize,
    ) -> Result<()> {
        if norm_tensors > tensors {
            return Err(Error::invalid(op, format!("{norm_tensors} norm tensors among only {tensors}")));
        }
        check_len(op, "state", state, super::optim_state::len(tensors))?;
        check_len(op, "scratch", scratch, super::optim_state::scratch_len(tensors))
    }

    /// [`super::NnOps::adamw_many_device`]: `state` was prepared over
    /// at least these tensors, each of whose four buffers have one length.
    pub fn adamw_many_device(state: usize, tensors: &[(usize, usize, usize, usize)]) -> Result<()> {
        let op = "adamw_many_device";
        let need = super::optim_state::len(tensors.len());
        if state < need {
            return Err(Error::shape(op, "state", format!("at least {need} f64s"), format!("{state} f64s")));
        }
        tensors.iter().try_for_each(|&(param, grad, m, v)| same_len(op, param, &[("grad", grad), ("m", m), ("v", v)]))
    }

    /// [`super::NnOps::adamw`].
    pub fn adamw((param, grad, m, v): (usize, usize, usize, usize), hp: &AdamWStep) -> Result<()> {
        same_len("adamw", param, &[("grad", grad), ("m", m), ("v", v)])?;
        if hp.step == 0 {
            return Err(Error::invalid(
                "adamw step",
                "steps are counted from 1 (bias correction divides by 1 − β^step)",
            ));
        }
        Ok(())
    }
}
