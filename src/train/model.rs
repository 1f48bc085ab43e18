//! GPT-2 (Radford et al., 2019) forward and hand-written backward.
//!
//! Token + learned position embeddings; `n_layer` pre-LayerNorm blocks
//! `x += attn(ln_1(x)); x += mlp(ln_2(x))` with causal multi-head attention
//! and a GELU (tanh) MLP; a final LayerNorm; the LM head tied to the token
//! embedding; fused softmax cross-entropy. Every adapted linear layer runs
//! in the packed layout ([`crate::lowrank::packed`], [`LinearPath::Packed`]):
//! one GEMM over `K + p` forward and one over `N + p` for `dx`, its weight
//! kept packed in the compute dtype; unadapted layers, the LM head and full
//! fine-tuning are one [`crate::lowrank::LowRankOps`] call on caller
//! buffers; the rest are [`crate::nn::NnOps`] and
//! [`crate::attention::AttentionOps`].
//!
//! # Packed activations
//! An adapted module's input lives in `x_packed` (`T × (K + p)`, `p` the
//! rank plus one rounded up to 8) and its output gradient in `dy_packed`
//! (`T × (N + p)`). The producers write there directly through their row stride: ln_1
//! and ln_2 (plain or fused with the residual add) into c_attn's and c_fc's
//! input, the attention into attn.c_proj's (its backward reads it there),
//! the GELU into mlp.c_proj's, the cast of the residual gradient into both
//! projections' output gradient, the GELU backward into c_fc's, the
//! attention backward into c_attn's: no activation or gradient is copied
//! into the packed layout ([`crate::lowrank::packed::PackedOps::pack_rows`]
//! is for callers whose producers have no row stride).
//!
//! # Weights
//! Stored in PyTorch `Linear` layout (`N×K`, out × in). Hugging Face GPT-2
//! keeps its `Conv1D` weights as (in, out), so [`Gpt2::load`] transposes
//! them and [`Gpt2::save`] transposes back: files are interchangeable with
//! `transformers`' `GPT2LMHeadModel`.
//!
//! # What the backward keeps per layer ([`LayerCache`])
//! With `T` tokens, width `D`, `H` heads, rank `r`; "f32" marks the
//! residual stream and statistics, the rest is in the compute dtype
//! ([`Precision`]): the block input `x` (T·D f32), `ln_1(x)` (T·D) with its
//! mean and rstd (2·T f32), `qkv` (3·T·D), the attention's per-query
//! log-sum-exp (T·H f32; the T·S probabilities are recomputed, never kept),
//! the attention output (T·D), the residual after attention (T·D f32),
//! `ln_2` of it (T·D) with mean and rstd (2·T f32), the MLP pre-activation
//! (4·T·D) and its GELU (4·T·D), and `x·Aᵀ` (T·r f32) for every adapted
//! module. A packed module's input is `p` columns wider (T·p more). Plus, once per model, the final LayerNorm's input and output
//! (2·T·D, 2·T), and the logits of one LM-head chunk at a time (see below).
//!
//! # LM head in row chunks
//! The logits of the whole batch are the step's largest buffer (8192 ×
//! 50304 bf16 = 824 MB at GPT-2 small's bench shape), so the LM head, the
//! cross-entropy (which overwrites the logits with their gradient) and the
//! head's backward (`dx` rows into the final LayerNorm's gradient; the
//! tied `wte`'s gradient accumulating chunk by chunk under full
//! fine-tuning) run over row ranges of [`Gpt2::lm_head_rows`] rows: only
//! one chunk's logits exist at a time. The chunks read their rows through
//! [`crate::Backend::copy_range`] copies of T×D size, small next to the
//! logits; losses and hits land in one buffer for the whole batch as
//! before. The loss gradient's scale `1/scored` counts the whole batch's
//! targets on the backend ([`GradScale::MeanOverScored`]), whatever the
//! chunk. Only the tied embedding's gradient changes with the chunking
//! (its sum is rounded to f32 once per chunk); the losses and every other
//! gradient are the same bits.
//!
//! # Padded vocabulary
//! The token embedding (`params[0]`, and its gradient) is kept with
//! V' = [`padded_vocab`]`(V)` rows, V rounded up to a multiple of
//! [`VOCAB_PAD`] (GPT-2: 50257 → 50304); rows `V..V'` are zero. The LM head
//! then multiplies over V' columns, whose 16-byte-aligned leading dimension
//! lets cuBLAS pick its vectorised tensor-core kernels (50257 columns force
//! the `align1` ones, several times slower). The cross-entropy masks the
//! pad columns out of the softmax and writes them a zero gradient, so the
//! pad rows get no gradient and AdamW leaves them at zero: losses and
//! gradients are those of the unpadded model. Only memory is padded: files
//! ([`Gpt2::save`], checkpoints) and [`Gpt2::download_param`] give V rows.

use std::collections::BTreeMap;
use std::path::Path;

use super::adapters::{AdapterSet, LinearOperands};
use super::config::Gpt2Config;
use super::module::Module;
use super::{TrainBackend, F32};
use crate::attention::AttnShape;
use crate::lowrank::packed::PackedLayout;
use crate::lowrank::{Grads, LinearShape};
use crate::nn::{CrossEntropyOut, GradScale, SeqShape, TokenIds};
use crate::rng::Rng;
use crate::tensor_file::{read_safetensors, take_f32};
use crate::{Element, Error, Result};
use half::bf16;

/// A linear layer's output (compute dtype) and its saved `x·Aᵀ` when adapted.
type Linear<B, T> = (<B as crate::Backend>::Buf<T>, Option<F32<B>>);

/// LayerNorm's output (compute dtype; in `x_packed` when the module it
/// feeds runs packed), mean and rstd.
type Normed<B, T> = (Rows<B, T>, F32<B>, F32<B>);

/// The LM head's losses and hits, and `dlnf` when it ran the backward.
type HeadOut<B, T> = (CrossEntropyOut<B>, Option<<B as crate::Backend>::Buf<T>>);

/// A block's forward: its cache, its output (f32 residual stream) and the
/// next LayerNorm of that output.
type BlockOut<B, T> = (LayerCache<B, T>, F32<B>, Normed<B, T>);

/// Index of `module`'s weight inside a block's parameters (its bias
/// follows), in [`BLOCK_NAMES`] order.
fn weight_slot(module: Module) -> usize {
    match module {
        Module::CAttn => 2,
        Module::AttnProj => 4,
        Module::Fc => 8,
        Module::MlpProj => 10,
    }
}

/// The token embedding's row count is padded to a multiple of this on the
/// backend (see the module docs): 64 rows of bf16 keep every row of the
/// logits 128-byte aligned.
pub const VOCAB_PAD: usize = 64;

/// `vocab` rounded up to a multiple of [`VOCAB_PAD`].
pub fn padded_vocab(vocab: usize) -> usize {
    vocab.div_ceil(VOCAB_PAD) * VOCAB_PAD
}

/// Bytes of logits one LM-head chunk may hold when the rows are chosen
/// automatically ([`lm_head_chunk_rows`]): a quarter of the 824 MB that
/// GPT-2 small's bench batch (8192 tokens × 50304 bf16) would need at once,
/// while each chunk's GEMMs (2048 × 50304 × 768 there) stay large enough
/// for full tensor-core rate.
pub const LM_HEAD_CHUNK_BYTES: usize = 256 << 20;

/// Automatic LM-head chunks are a multiple of this many rows: cuBLAS's
/// tensor-core tiles are 64 or 128 rows tall, so such a chunk fills whole
/// tiles (only the batch's last chunk may not), and the cross-entropy's one
/// block per row still launches thousands of blocks.
pub const LM_HEAD_ROW_MULTIPLE: usize = 64;

/// Rows per LM-head chunk for a pass over `tokens` rows of logits `padded`
/// wide in elements of `elem_bytes` bytes: `rows` when set (at least 1, at
/// most `tokens`); else every row at once when their logits fit in
/// [`LM_HEAD_CHUNK_BYTES`], otherwise as few chunks as keep each within
/// it, evened out and rounded up to a multiple of [`LM_HEAD_ROW_MULTIPLE`]
/// (8192 bf16 rows of 50304: four chunks of 2048 rows, 206 MB each).
pub fn lm_head_chunk_rows(tokens: usize, padded: usize, elem_bytes: usize, rows: Option<usize>) -> usize {
    let tokens = tokens.max(1);
    if let Some(r) = rows {
        return r.clamp(1, tokens);
    }
    let m = LM_HEAD_ROW_MULTIPLE;
    let cap = (LM_HEAD_CHUNK_BYTES / padded.saturating_mul(elem_bytes).max(1) / m * m).max(m);
    if tokens <= cap {
        return tokens;
    }
    // ⌈tokens/chunks⌉ ≤ cap, and cap is a multiple of m: rounding up to m
    // stays within cap.
    let chunks = tokens.div_ceil(cap);
    tokens.div_ceil(chunks).next_multiple_of(m)
}

/// Parameters per block, in [`Gpt2::param_specs`] order.
const PER_BLOCK: usize = 12;
const BLOCK_NAMES: [&str; PER_BLOCK] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

/// One named parameter's shape as stored here (linear weights `N×K`) and
/// whether the Hugging Face file stores it transposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Hugging Face name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    /// Shape here (row-major).
    pub shape: Vec<usize>,
    /// True for `Conv1D` weights, stored (in, out) in the file.
    pub transposed: bool,
}

impl ParamSpec {
    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The dtype the forward and backward compute in (see
/// [`crate::nn::NnOps`] for what stays f32 either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32: the reference, and the CPU's default.
    #[default]
    F32,
    /// Mixed precision: a bf16 working copy of the base weights, bf16 GEMM
    /// inputs and outputs (tensor cores), f32 residual stream, master
    /// weights, adapters, gradients and optimizer state.
    Bf16,
}

impl Precision {
    /// Parses `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::invalid(format!("precision `{other}`"), "use f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// How adapted linear layers compute (unadapted ones, the LM head and full
/// fine-tuning always use caller buffers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinearPath {
    /// The packed layout ([`crate::lowrank::packed`]): `y = x·Wᵀ + bias +
    /// s·((x·Aᵀ)⊙u)·Bᵀ⊙v` as one GEMM over `K + p`, `dx` as one over
    /// `N + p`. Each adapted module's weight lives packed, `(N+p)×(K+p)`,
    /// in the compute dtype, and its input and output gradient in
    /// buffers `p` columns wider than the activation.
    #[default]
    Packed,
    /// The caller-buffer low-rank layer ([`crate::lowrank::LowRankOps`]):
    /// the base GEMM plus the low-rank passes, on unpadded buffers.
    CallerBuffers,
}

impl LinearPath {
    /// Parses `packed` or `caller` (the value of the benches'
    /// `LORAFUSE_LINEAR_PATH`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "packed" => Ok(LinearPath::Packed),
            "caller" | "caller-buffers" | "caller_buffers" => Ok(LinearPath::CallerBuffers),
            other => Err(Error::invalid(format!("linear path `{other}`"), "use packed or caller")),
        }
    }
}

/// The packed weights of the adapted modules in the compute dtype, by the
/// index of `W` in [`Gpt2::params`]: at most one of the maps is in use.
struct PackedWeights<B: TrainBackend> {
    f32: BTreeMap<usize, B::Buf<f32>>,
    bf16: BTreeMap<usize, B::Buf<bf16>>,
}

impl<B: TrainBackend> PackedWeights<B> {
    fn new() -> Self {
        PackedWeights { f32: BTreeMap::new(), bf16: BTreeMap::new() }
    }

    fn clear(&mut self) {
        self.f32.clear();
        self.bf16.clear();
    }
}

/// A GPT-2 model on backend `B`: f32 weights, their gradients when full
/// fine-tuning is on, and the bf16 working copy under
/// [`Precision::Bf16`].
pub struct Gpt2<B: TrainBackend> {
    /// Shape.
    pub config: Gpt2Config,
    /// Every parameter (f32 master copy), in [`Gpt2::param_specs`] order;
    /// the token embedding `params[0]` has [`padded_vocab`] rows, the pad
    /// rows zero (see the module docs).
    pub params: Vec<B::Buf<f32>>,
    /// Gradients of every parameter (full fine-tuning), or `None` (frozen
    /// base: only activation gradients flow through it). Shaped as
    /// `params`, padding included.
    pub grads: Option<Vec<B::Buf<f32>>>,
    precision: Precision,
    /// `params` rounded to bf16, made by [`Gpt2::set_precision`]; the
    /// forward reads these instead of `params` so every GEMM runs on bf16
    /// tensor cores without casting weights per call. The weight of a
    /// module that runs packed is released to a one-element placeholder:
    /// its packed copy serves as the working copy.
    work_bf16: Option<Vec<B::Buf<bf16>>>,
    linear_path: LinearPath,
    packed: PackedWeights<B>,
    /// Rows per LM-head chunk, `None`: automatic ([`Gpt2::set_lm_head_rows`]).
    lm_head_rows: Option<usize>,
}

fn index_wte() -> usize {
    0
}
fn index_wpe() -> usize {
    1
}
fn block_index(layer: usize, slot: usize) -> usize {
    2 + layer * PER_BLOCK + slot
}

/// `host` (shaped by `spec`) as the backend keeps it: the token embedding
/// gains zero rows up to [`padded_vocab`], every other tensor is unchanged.
pub(crate) fn pad_rows(config: &Gpt2Config, spec: &ParamSpec, mut host: Vec<f32>) -> Vec<f32> {
    if spec.name == "wte.weight" {
        host.resize(padded_vocab(config.vocab_size) * config.n_embd, 0.0);
    }
    host
}

impl<B: TrainBackend> Gpt2<B> {
    /// Every parameter's name and shape, in storage order: `wte`, `wpe`, the
    /// blocks' twelve each, `ln_f`.
    pub fn param_specs(c: &Gpt2Config) -> Vec<ParamSpec> {
        let d = c.n_embd;
        let mut v = vec![
            ParamSpec { name: "wte.weight".into(), shape: vec![c.vocab_size, d], transposed: false },
            ParamSpec { name: "wpe.weight".into(), shape: vec![c.n_positions, d], transposed: false },
        ];
        for l in 0..c.n_layer {
            for (slot, name) in BLOCK_NAMES.iter().enumerate() {
                let module = Module::ALL.iter().find(|&&m| weight_slot(m) == slot || weight_slot(m) + 1 == slot);
                let (shape, transposed) = match module {
                    Some(m) if weight_slot(*m) == slot => {
                        let (k, n) = m.dims(d);
                        (vec![n, k], true)
                    }
                    Some(m) => (vec![m.dims(d).1], false),
                    None => (vec![d], false),
                };
                v.push(ParamSpec { name: format!("h.{l}.{name}"), shape, transposed });
            }
        }
        v.push(ParamSpec { name: "ln_f.weight".into(), shape: vec![d], transposed: false });
        v.push(ParamSpec { name: "ln_f.bias".into(), shape: vec![d], transposed: false });
        v
    }

    /// A randomly initialised model, as GPT-2 initialises: weights
    /// N(0, 0.02), the residual projections (`c_proj`) N(0, 0.02/√(2·n_layer)),
    /// biases 0, LayerNorm γ = 1, β = 0.
    pub fn random(backend: &B, config: &Gpt2Config, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let proj_std = 0.02 / ((2 * config.n_layer) as f64).sqrt();
        let mut params = Vec::new();
        for spec in Self::param_specs(config) {
            let host: Vec<f32> = if spec.name.contains("ln_") {
                vec![if spec.name.ends_with("weight") { 1.0 } else { 0.0 }; spec.len()]
            } else if spec.name.ends_with("bias") {
                vec![0.0; spec.len()]
            } else {
                let std = if spec.name.ends_with("c_proj.weight") { proj_std } else { 0.02 };
                (0..spec.len()).map(|_| (rng.normal() * std) as f32).collect()
            };
            params.push(backend.upload(&pad_rows(config, &spec, host))?);
        }
        Ok(Self::from_params(config.clone(), params))
    }

    /// Loads `config.json` and `model.safetensors` from a directory (or a
    /// `.safetensors` file with `config.json` beside it). Accepts GPT-2
    /// naming with or without the `transformer.` prefix, f32/f16/bf16
    /// tensors, and ignores `lm_head.weight` (tied) and attention-mask
    /// buffers.
    pub fn load(backend: &B, path: &Path) -> Result<Self> {
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("model.safetensors"))
        } else {
            (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
        };
        let config = Gpt2Config::load(&dir.join("config.json"))?;
        let mut tensors = read_safetensors(&file)?.tensors;
        let mut params = Vec::new();
        for spec in Self::param_specs(&config) {
            // Hugging Face's GPT2LMHeadModel files prefix every name.
            let prefixed = format!("transformer.{}", spec.name);
            let key = if !tensors.contains_key(&spec.name) && tensors.contains_key(&prefixed) {
                prefixed
            } else {
                spec.name.clone()
            };
            let want: Vec<usize> =
                if spec.transposed { vec![spec.shape[1], spec.shape[0]] } else { spec.shape.clone() };
            if let Some(t) = tensors.get(&key).filter(|t| t.shape != want) {
                return Err(Error::format(
                    &file,
                    format!("tensor `{key}` has shape {:?}, config.json implies {want:?}", t.shape),
                ));
            }
            let (_, mut host) = take_f32(&file, &mut tensors, &key, None)?;
            if spec.transposed {
                host = transpose(&host, want[0], want[1]);
            }
            params.push(backend.upload(&pad_rows(&config, &spec, host))?);
        }
        Ok(Self::from_params(config, params))
    }

    /// A model in f32 with no gradients, on the packed linear path, around
    /// weights already laid out as [`Gpt2::param_specs`] says.
    fn from_params(config: Gpt2Config, params: Vec<B::Buf<f32>>) -> Self {
        Gpt2 {
            config,
            params,
            grads: None,
            precision: Precision::F32,
            work_bf16: None,
            linear_path: LinearPath::default(),
            packed: PackedWeights::new(),
            lm_head_rows: None,
        }
    }

    /// Turns full fine-tuning on: allocates a gradient for every parameter
    /// (shaped as `params`, padding included).
    pub fn enable_full_grads(&mut self, backend: &B) -> Result<()> {
        let grads = self.params.iter().map(|p| backend.zeros(B::len(p))).collect::<Result<Vec<_>>>()?;
        self.grads = Some(grads);
        Ok(())
    }

    /// Rows of the token embedding on the backend: the vocabulary rounded
    /// up to a multiple of [`VOCAB_PAD`].
    pub fn padded_vocab(&self) -> usize {
        padded_vocab(self.config.vocab_size)
    }

    /// Parameter `index` (in [`Gpt2::param_specs`] order) on the host, as
    /// its spec shapes it: the token embedding without its pad rows.
    pub fn download_param(&self, backend: &B, index: usize) -> Result<Vec<f32>> {
        let specs = Self::param_specs(&self.config);
        let spec = specs.get(index).ok_or_else(|| Error::Index {
            what: "model parameter".into(),
            index: index as u64,
            bound: specs.len() as u64,
        })?;
        let mut host = backend.download(&self.params[index])?;
        host.truncate(spec.len());
        Ok(host)
    }

    /// Elements of every parameter.
    pub fn num_params(&self) -> usize {
        Self::param_specs(&self.config).iter().map(ParamSpec::len).sum()
    }

    /// The dtype forward and backward compute in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Switches the compute dtype. [`Precision::Bf16`] makes the bf16
    /// working copy of every weight (one cast pass); [`Precision::F32`]
    /// drops it.
    pub fn set_precision(&mut self, backend: &B, precision: Precision) -> Result<()> {
        self.precision = precision;
        self.work_bf16 = None;
        self.refresh_working_copy(backend)
    }

    /// Re-rounds the bf16 working copy from the f32 master weights, and
    /// drops the packed weights (the next [`Gpt2::run`] packs them again).
    /// Full fine-tuning under [`Precision::Bf16`] calls this after every
    /// optimizer step; a frozen base never needs it, unless `params` were
    /// written directly.
    pub fn refresh_working_copy(&mut self, backend: &B) -> Result<()> {
        self.packed.clear();
        if self.precision != Precision::Bf16 {
            return Ok(());
        }
        let mut work = match self.work_bf16.take() {
            Some(w) => w,
            None => self.params.iter().map(|p| backend.zeros(B::len(p))).collect::<Result<Vec<_>>>()?,
        };
        for (w, p) in work.iter_mut().zip(&self.params) {
            if B::len(w) != B::len(p) {
                *w = backend.zeros(B::len(p))?;
            }
            backend.cast_from_f32(p, w)?;
        }
        self.work_bf16 = Some(work);
        Ok(())
    }

    /// How adapted linear layers compute ([`LinearPath::Packed`] unless set).
    pub fn linear_path(&self) -> LinearPath {
        self.linear_path
    }

    /// Chooses how adapted linear layers compute; both paths give the same
    /// losses and gradients up to rounding (tests/train_grad.rs).
    pub fn set_linear_path(&mut self, path: LinearPath) {
        self.linear_path = path;
    }

    /// Sets the most rows the LM head, the cross-entropy and the head's
    /// backward handle at once (see the module docs); `None` (the
    /// default) chooses by [`lm_head_chunk_rows`]. Fewer rows hold less
    /// memory (one chunk's logits at a time) in more, smaller launches;
    /// rows at or above the batch's tokens run it in one piece. The losses
    /// and every gradient but the tied embedding's are the same bits
    /// whatever the rows. Zero rows are an error.
    pub fn set_lm_head_rows(&mut self, rows: Option<usize>) -> Result<()> {
        if rows == Some(0) {
            return Err(Error::invalid("LM head chunk rows", "must be at least 1 (or None for automatic)"));
        }
        self.lm_head_rows = rows;
        Ok(())
    }

    /// Rows per LM-head chunk of a pass over `tokens` tokens, at the
    /// current precision ([`Gpt2::set_lm_head_rows`]).
    pub fn lm_head_rows(&self, tokens: usize) -> usize {
        let elem_bytes = match self.precision {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        };
        lm_head_chunk_rows(tokens, self.padded_vocab(), elem_bytes, self.lm_head_rows)
    }

    /// Makes the packed weights match `adapters` before a pass: packs the
    /// base weight of every newly adapted module once ([`crate::lowrank::packed::PackedOps::pack_weight`]),
    /// rewrites the adapter columns and rows of the others
    /// ([`crate::lowrank::packed::PackedOps::pack_adapter`], a few `(N + K)·p` elements each: the
    /// optimizer and the Uni-LoRA gather change `A`, `B`, `v` between
    /// passes), and drops those no longer adapted. Under bf16 the working
    /// copy of a packed module's weight is released (the packed copy holds
    /// it) and made again when the module runs unpacked.
    fn prepare_packed(&mut self, backend: &B, adapters: Option<&AdapterSet<B>>) -> Result<()> {
        let d = self.config.n_embd;
        let set = adapters.filter(|_| self.linear_path == LinearPath::Packed && self.grads.is_none());
        let mut want = Vec::new();
        for s in set.map_or(&[][..], |a| &a.slots[..]) {
            let (k, n) = s.module.dims(d);
            let layout = PackedLayout::new(LinearShape { m: 1, k, n, r: set.map_or(0, |a| a.spec.rank) }, true)?;
            want.push((block_index(s.layer, weight_slot(s.module)), layout, s.layer, s.module));
        }
        match self.precision {
            Precision::F32 => {
                self.packed.bf16.clear();
                sync_packed(backend, &self.params, &mut self.packed.f32, set, &want)
            }
            Precision::Bf16 => {
                self.packed.f32.clear();
                let work = self
                    .work_bf16
                    .as_mut()
                    .ok_or_else(|| Error::invalid("bf16 forward", "the working copy is missing"))?;
                let packed = &mut self.packed.bf16;
                packed.retain(|wi, _| want.iter().any(|w| w.0 == *wi));
                // Weights that run unpacked, or whose packed copy must be
                // made anew, need their working copy.
                for (wi, (w, p)) in work.iter_mut().zip(&self.params).enumerate() {
                    let kept =
                        want.iter().any(|(i, l, ..)| *i == wi && packed.get(i).is_some_and(|b| B::len(b) == l.w_len()));
                    if B::len(w) != B::len(p) && !kept {
                        *w = backend.zeros(B::len(p))?;
                        backend.cast_from_f32(p, w)?;
                    }
                }
                sync_packed(backend, work, packed, set, &want)?;
                // Only a full working copy is released: replacing the
                // placeholder on every pass would allocate per module per
                // step, and inside a captured step free memory allocated
                // before the capture, which fails the capture.
                for (wi, ..) in &want {
                    if B::len(&work[*wi]) == B::len(&self.params[*wi]) {
                        work[*wi] = backend.zeros(1)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The forward pass on `batch` (and the backward when `backward`):
    /// returns per-position losses and argmax hits. With `backward`, the
    /// gradients of the mean loss over non-ignored targets are
    /// **accumulated** into the model's gradients (full fine-tuning) and the
    /// adapters' (zero them first); the mean's count is taken on the
    /// backend ([`GradScale::MeanOverScored`]), and a batch without a
    /// scored target adds zero gradients.
    pub fn run(
        &mut self,
        backend: &B,
        adapters: Option<&mut AdapterSet<B>>,
        batch: &Batch<B>,
        backward: bool,
    ) -> Result<BatchOutput> {
        let ce = self.run_queued(backend, adapters, batch, backward)?;
        backend.op_mark("loss download");
        Ok(BatchOutput {
            losses: backend.download(&ce.losses)?,
            correct: backend.download(&ce.correct)?,
            targets: batch.host_targets.clone(),
        })
    }

    /// [`Gpt2::run`] without reading anything back: the per-position losses
    /// and argmax hits stay on the backend, so a training step queues its
    /// forward, backward and optimizer without one wait (and can be
    /// captured as a graph).
    pub fn run_queued(
        &mut self,
        backend: &B,
        adapters: Option<&mut AdapterSet<B>>,
        batch: &Batch<B>,
        backward: bool,
    ) -> Result<CrossEntropyOut<B>> {
        self.prepare_packed(backend, adapters.as_deref())?;
        let lm_head_rows = self.lm_head_rows(batch.shape.tokens());
        let grads = self.grads.as_deref_mut();
        let config = &self.config;
        match (self.precision, self.work_bf16.as_deref()) {
            (Precision::F32, _) => Pass { config, params: &self.params, packed: &self.packed.f32, grads, lm_head_rows }
                .run(backend, adapters, batch, backward),
            (Precision::Bf16, Some(work)) => {
                Pass { config, params: work, packed: &self.packed.bf16, grads, lm_head_rows }
                    .run(backend, adapters, batch, backward)
            }
            (Precision::Bf16, None) => Err(Error::invalid("bf16 forward", "the working copy is missing")),
        }
    }
}

/// Writes or refreshes the packed weight of every `(W index, layout, layer,
/// module)` in `want` from `weights` (the compute-dtype copy) and `set`'s
/// adapters; drops the others.
fn sync_packed<B: TrainBackend, T: Element>(
    backend: &B,
    weights: &[B::Buf<T>],
    packed: &mut BTreeMap<usize, B::Buf<T>>,
    set: Option<&AdapterSet<B>>,
    want: &[(usize, PackedLayout, usize, Module)],
) -> Result<()> {
    packed.retain(|wi, _| want.iter().any(|w| w.0 == *wi));
    for &(wi, layout, layer, module) in want {
        let (adapter, _) = set.and_then(|a| a.adapter(layer, module)).ok_or_else(|| {
            Error::invalid("packed weights", format!("{} of layer {layer} has no adapter", module.name()))
        })?;
        let bias = Some(&weights[wi + 1]);
        match packed.get_mut(&wi) {
            Some(buf) if B::len(buf) == layout.w_len() => backend.pack_adapter(&layout, bias, adapter, buf)?,
            _ => {
                let mut buf = backend.zeros::<T>(layout.w_len())?;
                backend.pack_weight(&layout, &weights[wi], bias, adapter, &mut buf)?;
                packed.insert(wi, buf);
            }
        }
    }
    Ok(())
}

/// One forward (and backward) in compute dtype `T`: the weights it reads
/// (the packed ones of adapted modules under [`LinearPath::Packed`]) and
/// the f32 gradients it accumulates into.
struct Pass<'a, B: TrainBackend, T: Element> {
    config: &'a Gpt2Config,
    params: &'a [B::Buf<T>],
    packed: &'a BTreeMap<usize, B::Buf<T>>,
    grads: Option<&'a mut [B::Buf<f32>]>,
    /// Rows per LM-head chunk ([`Gpt2::lm_head_rows`]).
    lm_head_rows: usize,
}

/// Rows of a linear module's input (`x`, M×K) or output gradient (`dy`,
/// M×N): plain, or in the packed layout's wider buffer (M×(K+p), M×(N+p))
/// whose spare columns the packed ops fill.
struct Rows<B: TrainBackend, T: Element> {
    buf: B::Buf<T>,
    packed: Option<PackedLayout>,
}

impl<B: TrainBackend, T: Element> Pass<'_, B, T> {
    fn run(
        &mut self,
        backend: &B,
        mut adapters: Option<&mut AdapterSet<B>>,
        batch: &Batch<B>,
        backward: bool,
    ) -> Result<CrossEntropyOut<B>> {
        let c = self.config.clone();
        let (d, vocab) = (c.n_embd, c.vocab_size);
        let shape = batch.shape;
        // The embedding's buffer holds the pad rows too: check against the
        // real vocabulary here.
        crate::nn::check::tokens("batch tokens", &batch.host_tokens, vocab)?;
        if shape.seq > c.n_positions {
            return Err(Error::invalid(
                "sequence length",
                format!("{} exceeds the model's n_positions = {}", shape.seq, c.n_positions),
            ));
        }
        let tokens = shape.tokens();
        let attn = AttnShape { seq: shape, heads: c.n_head, head_dim: c.head_dim() };
        backend.op_mark("fwd embedding");
        let mut x = backend.uninit::<f32>(tokens * d)?;
        backend.embedding_forward(
            batch.tokens(),
            &self.params[index_wte()],
            &self.params[index_wpe()],
            shape,
            d,
            &mut x,
        )?;

        let ad = adapters.as_deref();
        let mut caches = Vec::with_capacity(c.n_layer);
        let lnf_i = self.params.len() - 2;
        // The first block's ln_1 reads the embedding; every later LayerNorm
        // (ln_2, the next block's ln_1, ln_f) is fused with the residual add
        // in front of it.
        let first = if c.n_layer > 0 { block_index(0, 0) } else { lnf_i };
        let first_layout = if c.n_layer > 0 { self.layout(ad, 0, Module::CAttn, tokens)? } else { None };
        let mut normed = self.layernorm(backend, &x, first, tokens, first_layout)?;
        for l in 0..c.n_layer {
            let next = if l + 1 < c.n_layer { block_index(l + 1, 0) } else { lnf_i };
            let (cache, out, next_normed) = self.block_forward(backend, ad, l, x, normed, next, attn)?;
            caches.push(cache);
            (x, normed) = (out, next_normed);
        }
        let (Rows { buf: lnf, .. }, lnf_mean, lnf_rstd) = normed;
        // The mean loss's scale 1/scored is counted on the backend from the
        // targets buffer, so a captured step serves batches of any scored
        // count (none scored: scale 0, every gradient zero).
        let grad_scale = backward.then_some(GradScale::MeanOverScored(batch.targets().device));
        let (ce, dlnf) = self.lm_head(backend, &lnf, batch.targets(), grad_scale)?;
        let Some(dlnf) = dlnf else {
            return Ok(ce);
        };

        // Backward.
        let mut dx = backend.zeros::<f32>(tokens * d)?;
        self.layernorm_backward(backend, lnf_i, &dlnf, &x, &lnf_mean, &lnf_rstd, &mut dx)?;
        for l in (0..c.n_layer).rev() {
            let cache = caches.pop().ok_or_else(|| Error::invalid("backward", "missing layer cache"))?;
            self.block_backward(backend, adapters.as_deref_mut(), l, cache, attn, &mut dx)?;
        }
        if let Some(g) = self.grads.as_deref_mut() {
            let (lo, hi) = g.split_at_mut(1);
            backend.op_mark("bwd embedding");
            backend.embedding_backward(batch.tokens(), &dx, shape, d, Some(&mut lo[0]), Some(&mut hi[0]))?;
        }
        backend.op_mark("after backward");
        Ok(ce)
    }

    /// The LM head (`logits = lnf·wteᵀ` over the padded vocabulary), the
    /// cross-entropy and, with `grad`, the head's backward, in chunks of
    /// `lm_head_rows` rows (module docs): returns the losses and hits of
    /// every row and, with `grad`, `dlnf`. A chunk covering every row runs
    /// on the caller's buffers and copies nothing; otherwise each chunk
    /// copies its rows of `lnf` and the targets in, and its losses, hits
    /// and `dlnf` rows out, with [`crate::Backend::copy_range`].
    fn lm_head(
        &mut self,
        backend: &B,
        lnf: &B::Buf<T>,
        targets: TokenIds<'_, B>,
        grad: Option<GradScale<'_, B>>,
    ) -> Result<HeadOut<B, T>> {
        let d = self.config.n_embd;
        let (tokens, chunk) = (targets.host.len(), self.lm_head_rows.max(1));
        if chunk >= tokens {
            return self.lm_head_chunk(backend, lnf, targets, grad);
        }
        // The chunks tile `0..tokens`: their copies write every row of
        // `losses`, `correct` and `dlnf`.
        let mut losses = backend.uninit::<f32>(tokens)?;
        let mut correct = backend.uninit::<u32>(tokens)?;
        let mut dlnf = match grad {
            Some(_) => Some(backend.uninit::<T>(tokens * d)?),
            None => None,
        };
        for start in (0..tokens).step_by(chunk) {
            let rows = chunk.min(tokens - start);
            let mut x = backend.uninit::<T>(rows * d)?;
            backend.copy_range(lnf, start * d, &mut x, 0, rows * d)?;
            let mut ids = backend.uninit::<u32>(rows)?;
            backend.copy_range(targets.device, start, &mut ids, 0, rows)?;
            let ids = TokenIds { device: &ids, host: &targets.host[start..start + rows] };
            let (ce, dx) = self.lm_head_chunk(backend, &x, ids, grad)?;
            backend.copy_range(&ce.losses, 0, &mut losses, start, rows)?;
            backend.copy_range(&ce.correct, 0, &mut correct, start, rows)?;
            if let (Some(dx), Some(dlnf)) = (dx, dlnf.as_mut()) {
                backend.copy_range(&dx, 0, dlnf, start * d, rows * d)?;
            }
        }
        Ok((CrossEntropyOut { losses, correct }, dlnf))
    }

    /// One chunk of [`Pass::lm_head`] on its rows `x` of `lnf` and their
    /// targets: the logits exist from the GEMM to the head's backward.
    fn lm_head_chunk(
        &mut self,
        backend: &B,
        x: &B::Buf<T>,
        targets: TokenIds<'_, B>,
        grad: Option<GradScale<'_, B>>,
    ) -> Result<HeadOut<B, T>> {
        let (d, vocab) = (self.config.n_embd, self.config.vocab_size);
        let padded = padded_vocab(vocab);
        let rows = targets.host.len();
        let head = LinearShape { m: rows, k: d, n: padded, r: 0 };
        backend.op_mark("fwd lm_head");
        let mut logits = backend.uninit::<T>(rows * padded)?;
        backend.lowrank_forward(head, x, &self.params[index_wte()], None, None, &mut logits, None)?;
        backend.op_mark("cross_entropy");
        let ce = backend.cross_entropy_scaled(&mut logits, targets, vocab, padded, grad)?;
        if grad.is_none() {
            return Ok((ce, None));
        }
        // `logits` now holds dloss/dlogits.
        backend.op_mark("bwd lm_head");
        let mut dx = backend.uninit::<T>(rows * d)?;
        let dw = self.grads.as_deref_mut().map(|g| &mut g[index_wte()]);
        let grads = Grads::<B, T> { dx: Some(&mut dx), dw, ..Grads::none() };
        backend.lowrank_backward(head, x, &self.params[index_wte()], None, None, &logits, grads)?;
        Ok((ce, Some(dx)))
    }

    /// The packed layout `module` of `layer` runs in for `tokens` rows, or
    /// `None` when it uses caller buffers (not adapted, or no packed weight).
    fn layout(
        &self,
        adapters: Option<&AdapterSet<B>>,
        layer: usize,
        module: Module,
        tokens: usize,
    ) -> Result<Option<PackedLayout>> {
        let wi = block_index(layer, weight_slot(module));
        match (adapters.and_then(|a| a.adapter(layer, module)), self.packed.contains_key(&wi)) {
            (Some((_, r)), true) => {
                let (k, n) = module.dims(self.config.n_embd);
                Ok(Some(PackedLayout::new(LinearShape { m: tokens, k, n, r }, true)?))
            }
            _ => Ok(None),
        }
    }

    /// The forward of one linear module on `x` (plain, or packed when its
    /// layout says so; the packed forward fills its spare columns): returns
    /// `y` and the saved `x·Aᵀ` when adapted.
    fn linear_forward(
        &self,
        backend: &B,
        adapters: Option<&AdapterSet<B>>,
        layer: usize,
        module: Module,
        x: &mut Rows<B, T>,
        tokens: usize,
    ) -> Result<Linear<B, T>> {
        let (k, n) = module.dims(self.config.n_embd);
        let wi = block_index(layer, weight_slot(module));
        let adapter = adapters.and_then(|a| a.adapter(layer, module));
        let r = adapter.as_ref().map_or(0, |(_, r)| *r);
        let shape = LinearShape { m: tokens, k, n, r };
        backend.op_mark(module.forward_label());
        let mut y = backend.uninit::<T>(tokens * n)?;
        let mut t = if r > 0 { Some(backend.uninit::<f32>(tokens * r)?) } else { None };
        match (x.packed, adapter) {
            (Some(layout), Some((a, _))) => {
                let w = self.packed.get(&wi).ok_or_else(|| Error::invalid("packed forward", "no packed weight"))?;
                backend.packed_forward(&layout, &mut x.buf, w, a, &mut y, t.as_mut())?;
            }
            (None, a) => backend.lowrank_forward(
                shape,
                &x.buf,
                &self.params[wi],
                Some(&self.params[wi + 1]),
                a.map(|(a, _)| a),
                &mut y,
                t.as_mut(),
            )?,
            (Some(_), None) => return Err(Error::invalid("packed forward", "a packed input without an adapter")),
        }
        Ok((y, t))
    }

    /// Backward of one linear module given its forward input `x` and its
    /// output gradient `dy` (in the same layout): returns `dx`, accumulates
    /// parameter gradients.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        backend: &B,
        adapters: Option<&mut AdapterSet<B>>,
        layer: usize,
        module: Module,
        x: &Rows<B, T>,
        t: Option<&B::Buf<f32>>,
        dy: &mut Rows<B, T>,
        tokens: usize,
    ) -> Result<B::Buf<T>> {
        let (k, n) = module.dims(self.config.n_embd);
        let wi = block_index(layer, weight_slot(module));
        backend.op_mark(module.backward_label());
        let mut dx = backend.uninit::<T>(tokens * k)?;
        let (dw, dbias) = match self.grads.as_deref_mut() {
            Some(g) => {
                let (lo, hi) = g.split_at_mut(wi + 1);
                (Some(&mut lo[wi]), Some(&mut hi[0]))
            }
            None => (None, None),
        };
        let operands = match (x.packed, dy.packed) {
            (None, None) => LinearOperands::Unpacked { x: &x.buf, w: &self.params[wi], dy: &dy.buf },
            (Some(layout), Some(_)) => {
                let w = self.packed.get(&wi).ok_or_else(|| Error::invalid("packed backward", "no packed weight"))?;
                LinearOperands::Packed { layout, x: &x.buf, w, dy: &mut dy.buf }
            }
            _ => return Err(Error::invalid("linear backward", "x and dy must both be packed or both plain")),
        };
        match adapters {
            Some(set) => {
                set.linear_backward(backend, layer, module, (tokens, k, n), operands, t, &mut dx, dw, dbias)?
            }
            None => {
                let LinearOperands::Unpacked { x, w, dy } = operands else {
                    return Err(Error::invalid("packed backward", "no adapter set"));
                };
                let shape = LinearShape { m: tokens, k, n, r: 0 };
                let grads = Grads::<B, T> { dx: Some(&mut dx), dw, dbias, ..Grads::none() };
                backend.lowrank_backward(shape, x, w, None, None, dy, grads)?;
            }
        }
        Ok(dx)
    }

    /// A new buffer for `tokens` rows of `cols`: plain, or `x_packed`
    /// (`input`) / `dy_packed` of `layout`, for a producer that writes its
    /// rows there directly. Returns it with its row stride.
    ///
    /// Left unset ([`crate::Backend::uninit`]): the producer writes the
    /// first `cols` columns of every row, and a packed buffer's `p` spare
    /// columns are written whole (rank, bias and zero padding) by the op
    /// that reads them: [`crate::lowrank::packed::PackedOps::packed_forward`]
    /// before its GEMM over `K + p`, `packed_backward` before its `dx` GEMM
    /// over `N + p` (the other readers take only the first `K` or `N`
    /// columns).
    fn new_rows(
        &self,
        backend: &B,
        layout: Option<PackedLayout>,
        tokens: usize,
        cols: usize,
        input: bool,
    ) -> Result<(Rows<B, T>, usize)> {
        let (len, ld) = match layout {
            None => (tokens * cols, cols),
            Some(l) if input => (l.x_len(), l.x_ld()),
            Some(l) => (l.dy_len(), l.dy_ld()),
        };
        Ok((Rows { buf: backend.uninit::<T>(len)?, packed: layout }, ld))
    }

    /// The LayerNorm whose γ sits at `params[index]` of `x`, written where
    /// the module it feeds reads it (`layout`: that module's packed layout).
    fn layernorm(
        &self,
        backend: &B,
        x: &F32<B>,
        index: usize,
        tokens: usize,
        layout: Option<PackedLayout>,
    ) -> Result<Normed<B, T>> {
        let d = self.config.n_embd;
        backend.op_mark("fwd layernorm");
        let (mut out, ld) = self.new_rows(backend, layout, tokens, d, true)?;
        let (mut mean, mut rstd) = (backend.uninit::<f32>(tokens)?, backend.uninit::<f32>(tokens)?);
        backend.layernorm_forward_strided(
            x,
            &self.params[index],
            &self.params[index + 1],
            self.config.layer_norm_epsilon,
            &mut out.buf,
            ld,
            &mut mean,
            &mut rstd,
        )?;
        Ok((out, mean, rstd))
    }

    /// `x + y` into a new f32 residual buffer, and the LayerNorm whose γ
    /// sits at `params[index]` of it, in one fused op, written where the
    /// module it feeds reads it (as [`Pass::layernorm`]).
    fn residual_layernorm(
        &self,
        backend: &B,
        x: &F32<B>,
        y: &B::Buf<T>,
        index: usize,
        tokens: usize,
        layout: Option<PackedLayout>,
    ) -> Result<(F32<B>, Normed<B, T>)> {
        let d = self.config.n_embd;
        backend.op_mark("fwd residual+layernorm");
        let mut resid = backend.uninit::<f32>(B::len(x))?;
        let (mut out, ld) = self.new_rows(backend, layout, tokens, d, true)?;
        let (mut mean, mut rstd) = (backend.uninit::<f32>(tokens)?, backend.uninit::<f32>(tokens)?);
        backend.residual_layernorm_forward_strided(
            x,
            y,
            &self.params[index],
            &self.params[index + 1],
            self.config.layer_norm_epsilon,
            &mut resid,
            &mut out.buf,
            ld,
            &mut mean,
            &mut rstd,
        )?;
        Ok((resid, (out, mean, rstd)))
    }

    /// The residual gradient in `T`, as the output gradient of a projection
    /// (straight into its `dy_packed` when `layout` is given).
    fn cast(&self, backend: &B, x: &F32<B>, layout: Option<PackedLayout>) -> Result<Rows<B, T>> {
        let d = self.config.n_embd;
        backend.op_mark("bwd cast");
        let (mut out, ld) = self.new_rows(backend, layout, B::len(x) / d, d, false)?;
        backend.cast_from_f32_strided(x, d, &mut out.buf, ld)?;
        Ok(out)
    }

    /// Block `l` on its input `x` and `ln_1(x)`: returns its cache, its
    /// output and the LayerNorm at `params[next]` (the next block's ln_1,
    /// or ln_f) of that output.
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        backend: &B,
        adapters: Option<&AdapterSet<B>>,
        l: usize,
        x: F32<B>,
        (mut in0, ln1_mean, ln1_rstd): Normed<B, T>,
        next: usize,
        attn: AttnShape,
    ) -> Result<BlockOut<B, T>> {
        let tokens = attn.seq.tokens();
        let d = self.config.n_embd;
        let layouts = Module::ALL.map(|m| self.layout(adapters, l, m, tokens));
        let [_, l1, l2, l3] = layouts;
        // The block's and the next block's LayerNorms, the attention and
        // the GELU write straight into the packed modules' inputs (the
        // attention backward reads its output back from c_proj's).
        let (qkv, t0) = self.linear_forward(backend, adapters, l, Module::CAttn, &mut in0, tokens)?;
        backend.op_mark("fwd attention");
        let (mut in1, ld) = self.new_rows(backend, l1?, tokens, d, true)?;
        let mut lse = backend.uninit::<f32>(attn.lse_len())?;
        backend.attention_forward_strided(&qkv, attn, &mut in1.buf, ld, &mut lse)?;
        let (proj, t1) = self.linear_forward(backend, adapters, l, Module::AttnProj, &mut in1, tokens)?;
        let (mid, (mut in2, ln2_mean, ln2_rstd)) =
            self.residual_layernorm(backend, &x, &proj, block_index(l, 6), tokens, l2?)?;
        drop(proj);
        let (fc, t2) = self.linear_forward(backend, adapters, l, Module::Fc, &mut in2, tokens)?;
        backend.op_mark("fwd gelu");
        let (mut in3, ld) = self.new_rows(backend, l3?, tokens, 4 * d, true)?;
        backend.gelu_forward_strided(&fc, 4 * d, &mut in3.buf, ld)?;
        let (proj, t3) = self.linear_forward(backend, adapters, l, Module::MlpProj, &mut in3, tokens)?;
        // The next LayerNorm feeds the next block's c_attn (ln_f: the LM head).
        let next_layout =
            if l + 1 < self.config.n_layer { self.layout(adapters, l + 1, Module::CAttn, tokens)? } else { None };
        let (out, next_normed) = self.residual_layernorm(backend, &mid, &proj, next, tokens, next_layout)?;
        let cache = LayerCache {
            x,
            ln1_mean,
            ln1_rstd,
            qkv,
            lse,
            mid,
            ln2_mean,
            ln2_rstd,
            fc,
            ins: [in0, in1, in2, in3],
            t: [t0, t1, t2, t3],
        };
        Ok((cache, out, next_normed))
    }

    /// `dres` holds the gradient of the block's output and leaves holding
    /// that of its input (the residual stream carries it through).
    fn block_backward(
        &mut self,
        backend: &B,
        mut adapters: Option<&mut AdapterSet<B>>,
        l: usize,
        cache: LayerCache<B, T>,
        attn: AttnShape,
        dres: &mut F32<B>,
    ) -> Result<()> {
        let tokens = attn.seq.tokens();
        let d = self.config.n_embd;
        let LayerCache { x, ln1_mean, ln1_rstd, qkv, lse, mid, ln2_mean, ln2_rstd, fc, ins, t } = cache;
        let [in0, in1, in2, in3] = ins;
        // The residual gradient's casts, the GELU backward and the attention
        // backward write straight into the packed modules' output gradients.
        let mut dy = self.cast(backend, dres, in3.packed)?;
        let ad = adapters.as_deref_mut();
        let dgelu = self.linear_backward(backend, ad, l, Module::MlpProj, &in3, t[3].as_ref(), &mut dy, tokens)?;
        drop((in3, dy));
        backend.op_mark("bwd gelu");
        let (mut dfc, ld) = self.new_rows(backend, in2.packed, tokens, 4 * d, false)?;
        backend.gelu_backward_strided(&dgelu, &fc, 4 * d, &mut dfc.buf, ld)?;
        drop((dgelu, fc));
        let ad = adapters.as_deref_mut();
        let dln2 = self.linear_backward(backend, ad, l, Module::Fc, &in2, t[2].as_ref(), &mut dfc, tokens)?;
        drop((in2, dfc));
        self.layernorm_backward(backend, block_index(l, 6), &dln2, &mid, &ln2_mean, &ln2_rstd, dres)?;
        let mut dy = self.cast(backend, dres, in1.packed)?;
        let ad = adapters.as_deref_mut();
        let datt = self.linear_backward(backend, ad, l, Module::AttnProj, &in1, t[1].as_ref(), &mut dy, tokens)?;
        drop(dy);
        backend.op_mark("bwd attention");
        let (mut dqkv, dqkv_ld) = self.new_rows(backend, in0.packed, tokens, 3 * d, false)?;
        let att_ld = in1.packed.map_or(d, |l| l.x_ld());
        backend.attention_backward_strided(&datt, &qkv, &in1.buf, att_ld, &lse, attn, &mut dqkv.buf, dqkv_ld)?;
        drop((datt, lse, qkv, in1));
        let dln1 = self.linear_backward(backend, adapters, l, Module::CAttn, &in0, t[0].as_ref(), &mut dqkv, tokens)?;
        self.layernorm_backward(backend, block_index(l, 0), &dln1, &x, &ln1_mean, &ln1_rstd, dres)
    }

    /// LayerNorm backward of the norm whose γ sits at `params[i]` (β at
    /// `i + 1`), accumulating into the f32 residual gradient `dx`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &mut self,
        backend: &B,
        i: usize,
        dout: &B::Buf<T>,
        x: &F32<B>,
        mean: &F32<B>,
        rstd: &F32<B>,
        dx: &mut F32<B>,
    ) -> Result<()> {
        backend.op_mark("bwd layernorm");
        let (dg, db) = match self.grads.as_deref_mut() {
            Some(g) => {
                let (lo, hi) = g.split_at_mut(i + 1);
                (Some(&mut lo[i]), Some(&mut hi[0]))
            }
            None => (None, None),
        };
        backend.layernorm_backward(dout, x, &self.params[i], mean, rstd, dx, dg, db)
    }
}

/// What one block's backward needs from its forward (see the module docs
/// for sizes). `ins[i]` is the input of module `Module::ALL[i]` (`ln_1`,
/// the attention output, `ln_2`, the GELU), packed when that module runs
/// packed (the attention backward reads its output from `ins[1]`).
/// `t[i]` is `x·Aᵀ` of module `Module::ALL[i]` when adapted.
pub struct LayerCache<B: TrainBackend, T: Element> {
    x: F32<B>,
    ln1_mean: F32<B>,
    ln1_rstd: F32<B>,
    qkv: B::Buf<T>,
    lse: F32<B>,
    mid: F32<B>,
    ln2_mean: F32<B>,
    ln2_rstd: F32<B>,
    fc: B::Buf<T>,
    ins: [Rows<B, T>; 4],
    t: [Option<F32<B>>; 4],
}

/// A batch on the backend: `tokens` and next-token `targets` (`IGNORE` for
/// positions without loss), both `batch × seq`, with the host copies they
/// were uploaded from (range checks and the embedding backward's grouping
/// read those, so a step never waits on a download of its own inputs).
pub struct Batch<B: TrainBackend> {
    /// Rows and tokens per row.
    pub shape: SeqShape,
    device_tokens: B::Buf<u32>,
    device_targets: B::Buf<u32>,
    host_tokens: Vec<u32>,
    host_targets: Vec<u32>,
}

impl<B: TrainBackend> Batch<B> {
    /// Uploads a host batch, checking lengths.
    pub fn upload(backend: &B, shape: SeqShape, tokens: &[u32], targets: &[u32]) -> Result<Self> {
        crate::error::check_len("batch", "tokens", tokens.len(), shape.tokens())?;
        crate::error::check_len("batch", "targets", targets.len(), shape.tokens())?;
        Ok(Batch {
            shape,
            device_tokens: backend.upload(tokens)?,
            device_targets: backend.upload(targets)?,
            host_tokens: tokens.to_vec(),
            host_targets: targets.to_vec(),
        })
    }

    /// A batch of `shape` whose ids are all 0, to be filled by
    /// [`Batch::write`]: a trainer keeps one and rewrites it every step, so
    /// the ids live at fixed addresses (a replayed graph reads them there).
    pub fn zeros(backend: &B, shape: SeqShape) -> Result<Self> {
        let n = shape.tokens();
        Ok(Batch {
            shape,
            device_tokens: backend.zeros(n)?,
            device_targets: backend.zeros(n)?,
            host_tokens: vec![0; n],
            host_targets: vec![0; n],
        })
    }

    /// Overwrites this batch's ids in place (same shape; the device buffers
    /// keep their addresses), host copies included.
    pub fn write(&mut self, backend: &B, tokens: &[u32], targets: &[u32]) -> Result<()> {
        crate::error::check_len("batch", "tokens", tokens.len(), self.shape.tokens())?;
        crate::error::check_len("batch", "targets", targets.len(), self.shape.tokens())?;
        backend.upload_into(tokens, &mut self.device_tokens)?;
        backend.upload_into(targets, &mut self.device_targets)?;
        self.host_tokens.copy_from_slice(tokens);
        self.host_targets.copy_from_slice(targets);
        Ok(())
    }

    /// Positions whose target carries a loss (not [`crate::nn::IGNORE`]).
    pub fn scored(&self) -> usize {
        self.host_targets.iter().filter(|&&t| t != crate::nn::IGNORE).count()
    }

    /// Input tokens, on the backend and on the host.
    pub fn tokens(&self) -> TokenIds<'_, B> {
        TokenIds { device: &self.device_tokens, host: &self.host_tokens }
    }

    /// Targets ([`crate::nn::IGNORE`] where no loss is taken), on the
    /// backend and on the host.
    pub fn targets(&self) -> TokenIds<'_, B> {
        TokenIds { device: &self.device_targets, host: &self.host_targets }
    }
}

/// Per-position results of one forward.
#[derive(Clone, Debug)]
pub struct BatchOutput {
    /// Loss per position (0 where ignored).
    pub losses: Vec<f32>,
    /// 1 where the argmax prediction is the target.
    pub correct: Vec<u32>,
    /// The targets (to know which positions count).
    pub targets: Vec<u32>,
}

impl BatchOutput {
    /// Positions that carry a loss.
    pub fn count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != crate::nn::IGNORE).count()
    }
    /// Mean loss over those positions (in f64).
    pub fn mean_loss(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        self.losses.iter().map(|&v| v as f64).sum::<f64>() / n as f64
    }
}

/// Row-major `rows × cols` → `cols × rows`.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}
