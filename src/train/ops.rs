//! The trainer's non-GEMM operations, on any backend: embedding, LayerNorm,
//! causal attention, GELU (tanh), residual add, fused softmax cross-entropy,
//! AdamW and the global gradient norm.
//!
//! Every linear layer (including the tied LM head) goes through
//! [`crate::lowrank::LowRankOps`] instead; these are the remaining pieces a
//! GPT-2 forward and backward need. The CPU implementation lives in
//! `src/cpu/train.rs` (f64 arithmetic, f32 at the edges); a CUDA one adds
//! `src/cuda/train.rs` and `kernels/train.cu` without touching the trainer.
//!
//! Activations, weights and gradients are f32 buffers. Backward functions
//! say whether they overwrite or accumulate their outputs; parameter
//! gradients always accumulate (so tied weights, such as the token embedding
//! used by both the input and the LM head, sum their contributions).

use crate::backend::Backend;
use crate::Result;

/// Targets equal to this are ignored by [`TrainOps::cross_entropy`] (padding
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
    /// Elements of the stored attention probabilities: batch·heads·seq·seq.
    pub fn probs_len(&self) -> usize {
        self.seq.batch * self.heads * self.seq.seq * self.seq.seq
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

/// Per-position results of [`TrainOps::cross_entropy`].
pub struct CrossEntropyOut<B: Backend> {
    /// `−log softmax(logits)[target]` per row (0 where the target is ignored).
    pub losses: B::Buf<f32>,
    /// 1 where `argmax(logits) == target`, else 0 (0 where ignored).
    pub correct: B::Buf<u32>,
}

/// The trainer's non-GEMM kernels. All shapes are checked; a mismatch is an
/// [`crate::Error::Shape`] naming the operand.
pub trait TrainOps: Backend + Sized {
    /// `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]` (`out` overwritten). A
    /// token `>= vocab` or `seq > positions` is an error.
    fn embedding_forward(
        &self,
        tokens: &Self::Buf<u32>,
        wte: &Self::Buf<f32>,
        wpe: &Self::Buf<f32>,
        shape: SeqShape,
        width: usize,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Accumulates `dout` into the rows of `dwte` its tokens picked and into
    /// `dwpe`'s first `seq` rows (either may be skipped when frozen).
    fn embedding_backward(
        &self,
        tokens: &Self::Buf<u32>,
        dout: &Self::Buf<f32>,
        shape: SeqShape,
        width: usize,
        dwte: Option<&mut Self::Buf<f32>>,
        dwpe: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;

    /// Row-wise LayerNorm: `out = (x − μ)·rstd·γ + β`, keeping `mean` and
    /// `rstd` (one per row) for the backward. `out` is overwritten.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        x: &Self::Buf<f32>,
        gamma: &Self::Buf<f32>,
        beta: &Self::Buf<f32>,
        eps: f64,
        out: &mut Self::Buf<f32>,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// LayerNorm backward: **accumulates** into `dx` (the residual stream's
    /// gradient already sits there) and into `dgamma`, `dbeta` when given.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dout: &Self::Buf<f32>,
        x: &Self::Buf<f32>,
        gamma: &Self::Buf<f32>,
        mean: &Self::Buf<f32>,
        rstd: &Self::Buf<f32>,
        dx: &mut Self::Buf<f32>,
        dgamma: Option<&mut Self::Buf<f32>>,
        dbeta: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;

    /// Causal multi-head attention on `qkv` (tokens × 3·width, laid out
    /// `[q | k | v]`, head `h` in columns `h·hd..(h+1)·hd` of each third,
    /// as GPT-2's `c_attn` produces it). Writes `out` (tokens × width) and
    /// keeps the softmax probabilities (`probs_len()` elements) for the
    /// backward. Scores are scaled by `1/sqrt(head_dim)`.
    fn attention_forward(
        &self,
        qkv: &Self::Buf<f32>,
        shape: AttnShape,
        out: &mut Self::Buf<f32>,
        probs: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Attention backward from the stored probabilities: `dqkv` overwritten.
    fn attention_backward(
        &self,
        dout: &Self::Buf<f32>,
        qkv: &Self::Buf<f32>,
        probs: &Self::Buf<f32>,
        shape: AttnShape,
        dqkv: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// GELU, tanh approximation (GPT-2's `gelu_new`). `out` overwritten.
    fn gelu_forward(&self, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>) -> Result<()>;

    /// GELU backward from its input: `dx = dout·gelu'(x)`, overwritten.
    fn gelu_backward(&self, dout: &Self::Buf<f32>, x: &Self::Buf<f32>, dx: &mut Self::Buf<f32>) -> Result<()>;

    /// Residual connection: `y += x`.
    fn add_assign(&self, y: &mut Self::Buf<f32>, x: &Self::Buf<f32>) -> Result<()>;

    /// Fused softmax cross-entropy over `rows × vocab` logits. When `grad`
    /// is set, the logits are **overwritten** by `grad·(softmax − onehot)`
    /// (0 on ignored rows), so the probabilities never need a buffer of
    /// their own. Targets equal to [`IGNORE`] carry no loss; others must be
    /// `< vocab`.
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf<f32>,
        targets: &Self::Buf<u32>,
        vocab: usize,
        grad: Option<f64>,
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

    /// `Σ x²` in f64 (NaN or ∞ if any element is non-finite): one tensor's
    /// share of the global gradient norm.
    fn sum_squares(&self, x: &Self::Buf<f32>) -> Result<f64>;

    /// Sets every element to zero.
    fn fill_zero(&self, x: &mut Self::Buf<f32>) -> Result<()>;
}
