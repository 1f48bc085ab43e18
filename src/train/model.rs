//! GPT-2 (Radford et al., 2019) forward and hand-written backward.
//!
//! Token + learned position embeddings; `n_layer` pre-LayerNorm blocks
//! `x += attn(ln_1(x)); x += mlp(ln_2(x))` with causal multi-head attention
//! and a GELU (tanh) MLP; a final LayerNorm; the LM head tied to the token
//! embedding; fused softmax cross-entropy. Every linear layer, the LM head
//! included, is one [`LowRankOps`] call (with or without an adapter); the
//! rest are [`TrainOps`].
//!
//! # Weights
//! Stored in PyTorch `Linear` layout (`N×K`, out × in). Hugging Face GPT-2
//! keeps its `Conv1D` weights as (in, out), so [`Gpt2::load`] transposes
//! them and [`Gpt2::save`] transposes back: files are interchangeable with
//! `transformers`' `GPT2LMHeadModel`.
//!
//! # What the backward keeps per layer ([`LayerCache`])
//! With `T` tokens, width `D`, `H` heads, rows of `S` tokens, rank `r`:
//! the block input `x` (T·D), `ln_1(x)` (T·D) with its mean and rstd (2·T),
//! `qkv` (3·T·D), the attention probabilities (T·H·S), the attention output
//! (T·D), the residual after attention (T·D), `ln_2` of it (T·D) with mean
//! and rstd (2·T), the MLP pre-activation (4·T·D) and its GELU (4·T·D), and
//! `x·Aᵀ` (T·r) for every adapted module. Plus, once per model, the final
//! LayerNorm's input and output (2·T·D, 2·T) and the logits (T·V), which the
//! fused cross-entropy overwrites with their gradient.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::adapters::AdapterSet;
use super::config::Gpt2Config;
use super::ops::{AttnShape, SeqShape, TrainOps};
use crate::lowrank::{Grads, LinearShape, LowRankOps};
use crate::projection::ProjectionOps;
use crate::rng::Rng;
use crate::{Error, Result};

/// An f32 buffer of backend `B`.
pub type F32<B> = <B as crate::Backend>::Buf<f32>;

/// LayerNorm's output, mean and rstd.
type Normed<B> = (F32<B>, F32<B>, F32<B>);

/// Everything the trainer needs from a backend.
pub trait TrainBackend: TrainOps + LowRankOps + ProjectionOps {}
impl<B: TrainOps + LowRankOps + ProjectionOps> TrainBackend for B {}

/// The four linear modules of a block that adapters can target, named as
/// PEFT's `target_modules` names them for GPT-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Module {
    /// `attn.c_attn`: D → 3D (q, k, v).
    #[serde(rename = "attn.c_attn")]
    CAttn,
    /// `attn.c_proj`: D → D.
    #[serde(rename = "attn.c_proj")]
    AttnProj,
    /// `mlp.c_fc`: D → 4D.
    #[serde(rename = "mlp.c_fc")]
    Fc,
    /// `mlp.c_proj`: 4D → D.
    #[serde(rename = "mlp.c_proj")]
    MlpProj,
}

impl Module {
    /// All four, in block order (the order adapters are laid out in).
    pub const ALL: [Module; 4] = [Module::CAttn, Module::AttnProj, Module::Fc, Module::MlpProj];

    /// The dotted name inside a block, e.g. `attn.c_attn`.
    pub fn name(self) -> &'static str {
        match self {
            Module::CAttn => "attn.c_attn",
            Module::AttnProj => "attn.c_proj",
            Module::Fc => "mlp.c_fc",
            Module::MlpProj => "mlp.c_proj",
        }
    }

    /// Parses a target name: the full dotted name, or `c_attn` / `c_fc`
    /// (unambiguous). Bare `c_proj` is rejected (two modules carry it).
    pub fn parse(s: &str) -> Result<Module> {
        let s = s.trim();
        match s {
            "attn.c_attn" | "c_attn" => Ok(Module::CAttn),
            "attn.c_proj" => Ok(Module::AttnProj),
            "mlp.c_fc" | "c_fc" => Ok(Module::Fc),
            "mlp.c_proj" => Ok(Module::MlpProj),
            "c_proj" => {
                Err(Error::invalid("target module `c_proj`", "ambiguous in GPT-2: write attn.c_proj or mlp.c_proj"))
            }
            other => Err(Error::invalid(
                format!("target module `{other}`"),
                "known modules are attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj",
            )),
        }
    }

    /// `(K, N)`: input and output features for width `d`.
    pub fn dims(self, d: usize) -> (usize, usize) {
        match self {
            Module::CAttn => (d, 3 * d),
            Module::AttnProj => (d, d),
            Module::Fc => (d, 4 * d),
            Module::MlpProj => (4 * d, d),
        }
    }

    /// Index of its weight inside a block's parameters (bias follows).
    fn slot(self) -> usize {
        match self {
            Module::CAttn => 2,
            Module::AttnProj => 4,
            Module::Fc => 8,
            Module::MlpProj => 10,
        }
    }
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

/// A GPT-2 model on backend `B`: weights, and their gradients when full
/// fine-tuning is on.
pub struct Gpt2<B: TrainBackend> {
    /// Shape.
    pub config: Gpt2Config,
    /// Every parameter, in [`Gpt2::param_specs`] order.
    pub params: Vec<B::Buf<f32>>,
    /// Gradients of every parameter (full fine-tuning), or `None` (frozen
    /// base: only activation gradients flow through it).
    pub grads: Option<Vec<B::Buf<f32>>>,
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
                let module = Module::ALL.iter().find(|m| m.slot() == slot || m.slot() + 1 == slot);
                let (shape, transposed) = match module {
                    Some(m) if m.slot() == slot => {
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
            params.push(backend.upload(&host)?);
        }
        Ok(Gpt2 { config: config.clone(), params, grads: None })
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
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&file, e.to_string()))?;
        let mut params = Vec::new();
        for spec in Self::param_specs(&config) {
            let view = st
                .tensor(&spec.name)
                .or_else(|_| st.tensor(&format!("transformer.{}", spec.name)))
                .map_err(|_| Error::format(&file, format!("tensor `{}` is missing", spec.name)))?;
            let want: Vec<usize> =
                if spec.transposed { vec![spec.shape[1], spec.shape[0]] } else { spec.shape.clone() };
            if view.shape() != want.as_slice() {
                return Err(Error::format(
                    &file,
                    format!("tensor `{}` has shape {:?}, config.json implies {:?}", spec.name, view.shape(), want),
                ));
            }
            let data = view.data();
            let mut host: Vec<f32> = match view.dtype() {
                Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                other => {
                    return Err(Error::format(
                        &file,
                        format!("tensor `{}` is {other:?}; f32, f16 or bf16 expected", spec.name),
                    ))
                }
            };
            if spec.transposed {
                host = transpose(&host, want[0], want[1]);
            }
            crate::error::check_finite(&spec.name, &host)?;
            params.push(backend.upload(&host)?);
        }
        Ok(Gpt2 { config, params, grads: None })
    }

    /// Turns full fine-tuning on: allocates a gradient for every parameter.
    pub fn enable_full_grads(&mut self, backend: &B) -> Result<()> {
        let grads =
            Self::param_specs(&self.config).iter().map(|s| backend.zeros(s.len())).collect::<Result<Vec<_>>>()?;
        self.grads = Some(grads);
        Ok(())
    }

    /// Elements of every parameter.
    pub fn num_params(&self) -> usize {
        Self::param_specs(&self.config).iter().map(ParamSpec::len).sum()
    }

    /// The forward pass on `batch` (and the backward when `backward`):
    /// returns per-position losses and argmax hits. With `backward`, the
    /// gradients of the mean loss over non-ignored targets are
    /// **accumulated** into the model's gradients (full fine-tuning) and the
    /// adapters' (zero them first).
    pub fn run(
        &mut self,
        backend: &B,
        mut adapters: Option<&mut AdapterSet<B>>,
        batch: &Batch<B>,
        backward: bool,
    ) -> Result<BatchOutput> {
        let c = self.config.clone();
        let (d, vocab) = (c.n_embd, c.vocab_size);
        let shape = batch.shape;
        if shape.seq > c.n_positions {
            return Err(Error::invalid(
                "sequence length",
                format!("{} exceeds the model's n_positions = {}", shape.seq, c.n_positions),
            ));
        }
        let tokens = shape.tokens();
        let attn = AttnShape { seq: shape, heads: c.n_head, head_dim: c.head_dim() };
        let mut x = backend.zeros(tokens * d)?;
        backend.embedding_forward(
            &batch.tokens,
            &self.params[index_wte()],
            &self.params[index_wpe()],
            shape,
            d,
            &mut x,
        )?;

        let ad = adapters.as_deref();
        let mut caches = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let (cache, out) = self.block_forward(backend, ad, l, x, attn)?;
            caches.push(cache);
            x = out;
        }
        let (mut lnf, mut lnf_mean, mut lnf_rstd) =
            (backend.zeros(tokens * d)?, backend.zeros(tokens)?, backend.zeros(tokens)?);
        let lnf_i = self.params.len() - 2;
        backend.layernorm_forward(
            &x,
            &self.params[lnf_i],
            &self.params[lnf_i + 1],
            c.layer_norm_epsilon,
            &mut lnf,
            &mut lnf_mean,
            &mut lnf_rstd,
        )?;
        let head = LinearShape { m: tokens, k: d, n: vocab, r: 0 };
        let mut logits = backend.zeros(tokens * vocab)?;
        backend.lowrank_forward(head, &lnf, &self.params[index_wte()], None, None, &mut logits, None)?;

        let host_targets = backend.download(&batch.targets)?;
        let count = host_targets.iter().filter(|&&t| t != super::ops::IGNORE).count();
        let grad_scale = if backward && count > 0 { Some(1.0 / count as f64) } else { None };
        let ce = backend.cross_entropy(&mut logits, &batch.targets, vocab, grad_scale)?;
        let out = BatchOutput {
            losses: backend.download(&ce.losses)?,
            correct: backend.download(&ce.correct)?,
            targets: host_targets,
        };
        if grad_scale.is_none() {
            return Ok(out);
        }

        // Backward. `logits` now holds dloss/dlogits.
        let mut dlnf = backend.zeros(tokens * d)?;
        {
            let dw = self.grads.as_mut().map(|g| &mut g[index_wte()]);
            let grads = Grads::<B, f32> { dx: Some(&mut dlnf), dw, ..Grads::none() };
            backend.lowrank_backward(head, &lnf, &self.params[index_wte()], None, None, &logits, grads)?;
        }
        drop(logits);
        let mut dx = backend.zeros(tokens * d)?;
        {
            let (g, b) = match self.grads.as_mut() {
                Some(gr) => {
                    let (lo, hi) = gr.split_at_mut(lnf_i + 1);
                    (Some(&mut lo[lnf_i]), Some(&mut hi[0]))
                }
                None => (None, None),
            };
            backend.layernorm_backward(&dlnf, &x, &self.params[lnf_i], &lnf_mean, &lnf_rstd, &mut dx, g, b)?;
        }
        for l in (0..c.n_layer).rev() {
            let cache = caches.pop().ok_or_else(|| Error::invalid("backward", "missing layer cache"))?;
            self.block_backward(backend, adapters.as_deref_mut(), l, cache, attn, &mut dx)?;
        }
        if let Some(g) = self.grads.as_mut() {
            let (lo, hi) = g.split_at_mut(1);
            backend.embedding_backward(&batch.tokens, &dx, shape, d, Some(&mut lo[0]), Some(&mut hi[0]))?;
        }
        Ok(out)
    }

    fn linear_forward(
        &self,
        backend: &B,
        adapters: Option<&AdapterSet<B>>,
        layer: usize,
        module: Module,
        x: &B::Buf<f32>,
        tokens: usize,
    ) -> Result<(F32<B>, Option<F32<B>>)> {
        let (k, n) = module.dims(self.config.n_embd);
        let wi = block_index(layer, module.slot());
        let adapter = adapters.and_then(|a| a.adapter(layer, module));
        let r = adapter.as_ref().map_or(0, |(_, r)| *r);
        let shape = LinearShape { m: tokens, k, n, r };
        let mut y = backend.zeros(tokens * n)?;
        let mut t = if r > 0 { Some(backend.zeros(tokens * r)?) } else { None };
        backend.lowrank_forward(
            shape,
            x,
            &self.params[wi],
            Some(&self.params[wi + 1]),
            adapter.map(|(a, _)| a),
            &mut y,
            t.as_mut(),
        )?;
        Ok((y, t))
    }

    /// Backward of one linear module: returns `dx`, accumulates parameter
    /// gradients.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        backend: &B,
        adapters: Option<&mut AdapterSet<B>>,
        layer: usize,
        module: Module,
        x: &B::Buf<f32>,
        t: Option<&B::Buf<f32>>,
        dy: &B::Buf<f32>,
        tokens: usize,
    ) -> Result<B::Buf<f32>> {
        let (k, n) = module.dims(self.config.n_embd);
        let wi = block_index(layer, module.slot());
        let mut dx = backend.zeros(tokens * k)?;
        let (dw, dbias) = match self.grads.as_mut() {
            Some(g) => {
                let (lo, hi) = g.split_at_mut(wi + 1);
                (Some(&mut lo[wi]), Some(&mut hi[0]))
            }
            None => (None, None),
        };
        let w = &self.params[wi];
        match adapters {
            Some(set) => {
                set.linear_backward(backend, layer, module, (tokens, k, n), x, w, t, dy, &mut dx, dw, dbias)?
            }
            None => {
                let shape = LinearShape { m: tokens, k, n, r: 0 };
                let grads = Grads::<B, f32> { dx: Some(&mut dx), dw, dbias, ..Grads::none() };
                backend.lowrank_backward(shape, x, w, None, None, dy, grads)?;
            }
        }
        Ok(dx)
    }

    fn layernorm(&self, backend: &B, x: &B::Buf<f32>, index: usize, tokens: usize) -> Result<Normed<B>> {
        let d = self.config.n_embd;
        let (mut out, mut mean, mut rstd) =
            (backend.zeros(tokens * d)?, backend.zeros(tokens)?, backend.zeros(tokens)?);
        backend.layernorm_forward(
            x,
            &self.params[index],
            &self.params[index + 1],
            self.config.layer_norm_epsilon,
            &mut out,
            &mut mean,
            &mut rstd,
        )?;
        Ok((out, mean, rstd))
    }

    fn block_forward(
        &self,
        backend: &B,
        adapters: Option<&AdapterSet<B>>,
        l: usize,
        x: B::Buf<f32>,
        attn: AttnShape,
    ) -> Result<(LayerCache<B>, B::Buf<f32>)> {
        let tokens = attn.seq.tokens();
        let (ln1, ln1_mean, ln1_rstd) = self.layernorm(backend, &x, block_index(l, 0), tokens)?;
        let (qkv, t0) = self.linear_forward(backend, adapters, l, Module::CAttn, &ln1, tokens)?;
        let mut att = backend.zeros(tokens * attn.width())?;
        let mut probs = backend.zeros(attn.probs_len())?;
        backend.attention_forward(&qkv, attn, &mut att, &mut probs)?;
        let (mut mid, t1) = self.linear_forward(backend, adapters, l, Module::AttnProj, &att, tokens)?;
        backend.add_assign(&mut mid, &x)?;
        let (ln2, ln2_mean, ln2_rstd) = self.layernorm(backend, &mid, block_index(l, 6), tokens)?;
        let (fc, t2) = self.linear_forward(backend, adapters, l, Module::Fc, &ln2, tokens)?;
        let mut gelu = backend.zeros(B::len(&fc))?;
        backend.gelu_forward(&fc, &mut gelu)?;
        let (mut out, t3) = self.linear_forward(backend, adapters, l, Module::MlpProj, &gelu, tokens)?;
        backend.add_assign(&mut out, &mid)?;
        let cache = LayerCache {
            x,
            ln1,
            ln1_mean,
            ln1_rstd,
            qkv,
            probs,
            att,
            mid,
            ln2,
            ln2_mean,
            ln2_rstd,
            fc,
            gelu,
            t: [t0, t1, t2, t3],
        };
        Ok((cache, out))
    }

    /// `dres` holds the gradient of the block's output and leaves holding
    /// that of its input (the residual stream carries it through).
    fn block_backward(
        &mut self,
        backend: &B,
        mut adapters: Option<&mut AdapterSet<B>>,
        l: usize,
        cache: LayerCache<B>,
        attn: AttnShape,
        dres: &mut B::Buf<f32>,
    ) -> Result<()> {
        let tokens = attn.seq.tokens();
        let LayerCache { x, ln1, ln1_mean, ln1_rstd, qkv, probs, att, mid, ln2, ln2_mean, ln2_rstd, fc, gelu, t } =
            cache;
        let dgelu = self.linear_backward(
            backend,
            adapters.as_deref_mut(),
            l,
            Module::MlpProj,
            &gelu,
            t[3].as_ref(),
            dres,
            tokens,
        )?;
        drop(gelu);
        let mut dfc = backend.zeros(B::len(&fc))?;
        backend.gelu_backward(&dgelu, &fc, &mut dfc)?;
        drop((dgelu, fc));
        let dln2 =
            self.linear_backward(backend, adapters.as_deref_mut(), l, Module::Fc, &ln2, t[2].as_ref(), &dfc, tokens)?;
        drop(dfc);
        self.layernorm_backward(backend, l, 6, &dln2, &mid, &ln2_mean, &ln2_rstd, dres)?;
        let datt = self.linear_backward(
            backend,
            adapters.as_deref_mut(),
            l,
            Module::AttnProj,
            &att,
            t[1].as_ref(),
            dres,
            tokens,
        )?;
        let mut dqkv = backend.zeros(B::len(&qkv))?;
        backend.attention_backward(&datt, &qkv, &probs, attn, &mut dqkv)?;
        drop((datt, probs, qkv));
        let dln1 = self.linear_backward(backend, adapters, l, Module::CAttn, &ln1, t[0].as_ref(), &dqkv, tokens)?;
        self.layernorm_backward(backend, l, 0, &dln1, &x, &ln1_mean, &ln1_rstd, dres)
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &mut self,
        backend: &B,
        l: usize,
        slot: usize,
        dout: &B::Buf<f32>,
        x: &B::Buf<f32>,
        mean: &B::Buf<f32>,
        rstd: &B::Buf<f32>,
        dx: &mut B::Buf<f32>,
    ) -> Result<()> {
        let i = block_index(l, slot);
        let (dg, db) = match self.grads.as_mut() {
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
/// for sizes). `t[i]` is `x·Aᵀ` of module `Module::ALL[i]` when adapted.
pub struct LayerCache<B: TrainBackend> {
    x: B::Buf<f32>,
    ln1: B::Buf<f32>,
    ln1_mean: B::Buf<f32>,
    ln1_rstd: B::Buf<f32>,
    qkv: B::Buf<f32>,
    probs: B::Buf<f32>,
    att: B::Buf<f32>,
    mid: B::Buf<f32>,
    ln2: B::Buf<f32>,
    ln2_mean: B::Buf<f32>,
    ln2_rstd: B::Buf<f32>,
    fc: B::Buf<f32>,
    gelu: B::Buf<f32>,
    t: [Option<B::Buf<f32>>; 4],
}

/// A batch on the backend: `tokens` and next-token `targets` (`IGNORE` for
/// positions without loss), both `batch × seq`.
pub struct Batch<B: TrainBackend> {
    /// Rows and tokens per row.
    pub shape: SeqShape,
    /// Input tokens.
    pub tokens: B::Buf<u32>,
    /// Targets, [`super::ops::IGNORE`] where no loss is taken.
    pub targets: B::Buf<u32>,
}

impl<B: TrainBackend> Batch<B> {
    /// Uploads a host batch, checking lengths.
    pub fn upload(backend: &B, shape: SeqShape, tokens: &[u32], targets: &[u32]) -> Result<Self> {
        crate::error::check_len("batch", "tokens", tokens.len(), shape.tokens())?;
        crate::error::check_len("batch", "targets", targets.len(), shape.tokens())?;
        Ok(Batch { shape, tokens: backend.upload(tokens)?, targets: backend.upload(targets)? })
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
        self.targets.iter().filter(|&&t| t != super::ops::IGNORE).count()
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
