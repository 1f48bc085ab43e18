//! The trainable adapter parameters of a GPT-2 model, on a backend.
//!
//! One [`AdapterSet`] holds, for every adapted `(layer, module)` slot, which
//! factors `A` (r×K), `B` (N×r) and vectors `u` (r), `v` (N) it uses, and
//! their gradients:
//!
//! - **LoRA**: own `A`, `B` per slot; `A` Kaiming-uniform, `B = 0`.
//! - **Tied-LoRA** (any trainable subset of `v B u A`) and **VeRA**: one
//!   `A`, `B` per target module *type* shared by all layers (shapes differ
//!   between types), own `u`, `v` per slot. Frozen `A`/`B` are random
//!   (Kaiming-uniform), frozen `u`/`v` are ones (passed as `None`: no memory,
//!   no work). So that `ΔW = 0` at step 0, the first trainable factor in the
//!   order `B, v, u, A` starts at zero; trainable `u`, `v` otherwise start at
//!   ones, except VeRA's `u` (its `d`) at 0.1. Tied gradients accumulate over
//!   layers (the low-rank backward adds).
//! - **Uni-LoRA**: own `A`, `B` per slot, but they are gathered from one
//!   `θ_d` (uniform in ±0.02) before every forward, and their gradients
//!   scattered back into `θ_d`'s after the backward; scale 1. `θ_D` is laid
//!   out slot by slot (layer-major, modules in [`Module::ALL`] order), `A`
//!   then `B` of each, segments named `transformer.h.<l>.<module>.lora_A|B`.
//! - **Full** fine-tuning has no adapter set: the model's own gradients are on.

use crate::lowrank::packed::PackedLayout;
use crate::lowrank::{Adapter, Grads, LinearShape, Trainable};
use crate::projection::{Assignment, PreparedProjection, Projection, ProjectionLayout, ScatterMode};
use crate::rng::Rng;
use crate::{DType, Element, Error, Result};

use super::config::Gpt2Config;
use super::module::Module;
use super::optimizer::{Group, ParamRef};
use super::TrainBackend;

/// Which adapter family trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every base weight trains (no adapter).
    Full,
    /// LoRA: `A`, `B` per module.
    Lora,
    /// Tied-LoRA with the given trainable parts.
    Tied(Trainable),
    /// VeRA: frozen shared random `A`, `B`; `u` and `v` train.
    Vera,
    /// Uni-LoRA with `dim` = d trainable parameters.
    UniLora {
        /// d, the length of `θ_d`.
        dim: u32,
        /// How rows of `P` pick columns.
        assignment: Assignment,
    },
}

impl Method {
    /// Parses `full`, `lora`, `vera`, `unilora:<d>` (hash assignment) or
    /// `unilora-balanced:<d>`, and `tied` (everything trains) or
    /// `tied:<letters>` with letters from `vBuA` naming the trainable parts
    /// (e.g. `tied:BA` is plain tied LoRA, `tied:vu` trains only the
    /// vectors).
    pub fn parse(s: &str) -> Result<Method> {
        let bad = |why: &str| Error::invalid(format!("adapter method `{s}`"), why.to_string());
        let (head, arg) = match s.split_once(':') {
            Some((h, a)) => (h, Some(a)),
            None => (s, None),
        };
        match (head, arg) {
            ("full", None) => Ok(Method::Full),
            ("lora", None) => Ok(Method::Lora),
            ("vera", None) => Ok(Method::Vera),
            ("tied", None) => Ok(Method::Tied(Trainable { a: true, b: true, u: true, v: true })),
            ("tied", Some(letters)) => {
                let mut t = Trainable { a: false, b: false, u: false, v: false };
                for c in letters.chars() {
                    match c {
                        'A' => t.a = true,
                        'B' => t.b = true,
                        'u' => t.u = true,
                        'v' => t.v = true,
                        _ => return Err(bad("tied letters are v, B, u, A (case matters): e.g. tied:vBuA, tied:BA")),
                    }
                }
                if !(t.a || t.b || t.u || t.v) {
                    return Err(bad("nothing would train: name at least one of v, B, u, A"));
                }
                Ok(Method::Tied(t))
            }
            ("unilora" | "unilora-balanced", Some(d)) => {
                let dim: u32 = d.parse().map_err(|_| bad("d must be a positive integer, e.g. unilora:4096"))?;
                if dim == 0 {
                    return Err(bad("d must be at least 1"));
                }
                let assignment = if head == "unilora" { Assignment::Hash } else { Assignment::Balanced };
                Ok(Method::UniLora { dim, assignment })
            }
            ("unilora" | "unilora-balanced", None) => Err(bad("give d, e.g. unilora:4096")),
            _ => Err(bad("known methods: full, lora, tied[:vBuA letters], vera, unilora:<d>, unilora-balanced:<d>")),
        }
    }

    /// A short label for tables: `lora`, `tied:vBuA`, `vera`, `unilora:<d>`.
    pub fn label(&self) -> String {
        match self {
            Method::Full => "full".into(),
            Method::Lora => "lora".into(),
            Method::Tied(t) => format!("tied:{}", t.label()),
            Method::Vera => "vera".into(),
            Method::UniLora { dim, assignment: Assignment::Balanced } => format!("unilora-balanced:{dim}"),
            Method::UniLora { dim, .. } => format!("unilora:{dim}"),
        }
    }

    /// Which of `A`, `B`, `u`, `v` receive gradients.
    pub fn trainable(&self) -> Trainable {
        match *self {
            Method::Full => Trainable { a: false, b: false, u: false, v: false },
            Method::Lora | Method::UniLora { .. } => Trainable { a: true, b: true, u: false, v: false },
            Method::Tied(t) => t,
            Method::Vera => Trainable { a: false, b: false, u: true, v: true },
        }
    }

    fn tied(&self) -> bool {
        matches!(self, Method::Tied(_) | Method::Vera)
    }
}

/// What to train: method, rank, `α`, target modules and the init seed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterSpec {
    /// The method.
    pub method: Method,
    /// Rank r (ignored by full fine-tuning).
    pub rank: usize,
    /// `α`: the scale is `α/r` (Uni-LoRA: 1).
    pub alpha: f32,
    /// Adapted modules, in every layer.
    pub targets: Vec<Module>,
    /// Seed of the initialisation and of Uni-LoRA's projection.
    pub seed: u64,
}

impl AdapterSpec {
    /// Rejects rank 0, rank above `min(K, N)` of any target, an empty or
    /// repeated target list, and a non-finite `α` — before any allocation.
    pub fn validate(&self, config: &Gpt2Config) -> Result<()> {
        if self.method == Method::Full {
            return Ok(());
        }
        if self.targets.is_empty() {
            return Err(Error::invalid(
                "target modules",
                "none given: pick from attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj",
            ));
        }
        let mut seen = self.targets.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.targets.len() {
            return Err(Error::invalid("target modules", "a module is listed twice"));
        }
        if self.rank == 0 {
            return Err(Error::invalid("adapter rank", "r = 0: the rank must be at least 1"));
        }
        for m in &self.targets {
            let (k, n) = m.dims(config.n_embd);
            if self.rank > k.min(n) {
                return Err(Error::invalid(
                    "adapter rank",
                    format!("r = {} exceeds min(K, N) = {} of {} (K = {k}, N = {n})", self.rank, k.min(n), m.name()),
                ));
            }
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid("adapter alpha", format!("{} is not finite", self.alpha)));
        }
        if let Method::Tied(t) = self.method {
            if !(t.a || t.b || t.u || t.v) {
                return Err(Error::invalid("tied adapter", "nothing trains"));
            }
        }
        if let Method::UniLora { dim, .. } = self.method {
            // θ_d, its gradient and AdamW's two moments.
            crate::memory::check(&format!("Uni-LoRA with d = {dim}"), Some(dim as u128 * 16))?;
        }
        Ok(())
    }

    /// The adapter scale `s`: `α/r`, or 1 for Uni-LoRA.
    pub fn scale(&self) -> f32 {
        match self.method {
            Method::UniLora { .. } => 1.0,
            _ => self.alpha / self.rank.max(1) as f32,
        }
    }
}

/// A named tensor on a backend.
pub struct Named<B: TrainBackend> {
    /// Name (PEFT-style module path plus `lora_A` etc.).
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Values.
    pub data: B::Buf<f32>,
}

/// One adapted `(layer, module)` and where its parameters live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Block index.
    pub layer: usize,
    /// Module within the block.
    pub module: Module,
    /// Index of `A` in [`AdapterSet::mats`].
    pub a: usize,
    /// Index of `B` in [`AdapterSet::mats`].
    pub b: usize,
    /// Index of `u` in [`AdapterSet::vecs`] (`None`: ones, frozen).
    pub u: Option<usize>,
    /// Index of `v` in [`AdapterSet::vecs`] (`None`: ones, frozen).
    pub v: Option<usize>,
}

/// Uni-LoRA's trainable vector and projection.
pub struct UniState<B: TrainBackend> {
    /// `θ_d`.
    pub theta: B::Buf<f32>,
    /// Its gradient.
    pub grad: B::Buf<f32>,
    /// `P`, prepared on the backend.
    pub prepared: PreparedProjection<B>,
    /// Where every `A` and `B` lies in `θ_D` (segment `i` is `mats[i]`).
    pub layout: ProjectionLayout,
}

/// The adapters of one model, their gradients, and how they map onto slots.
pub struct AdapterSet<B: TrainBackend> {
    /// What was asked for.
    pub spec: AdapterSpec,
    /// Adapted slots, layer-major, modules in [`Module::ALL`] order.
    pub slots: Vec<Slot>,
    /// Every `A` and `B`.
    pub mats: Vec<Named<B>>,
    /// Gradients of `mats` (allocated for trainable ones, and all for Uni-LoRA).
    pub mat_grads: Vec<B::Buf<f32>>,
    /// Every trainable `u` and `v`.
    pub vecs: Vec<Named<B>>,
    /// Gradients of `vecs`.
    pub vec_grads: Vec<B::Buf<f32>>,
    /// Uni-LoRA's state.
    pub uni: Option<UniState<B>>,
}

fn kaiming(rng: &mut Rng, fan_in: usize, len: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    rng.uniform_vec(len, -bound, bound)
}

/// The module path of a slot, as stored in adapter files.
pub fn module_path(layer: usize, module: Module) -> String {
    format!("transformer.h.{layer}.{}", module.name())
}

impl<B: TrainBackend> AdapterSet<B> {
    /// Builds and initialises the adapters `spec` asks for (see the module
    /// docs for the init rules). `spec` is validated first.
    pub fn new(backend: &B, config: &Gpt2Config, spec: &AdapterSpec) -> Result<Self> {
        spec.validate(config)?;
        if spec.method == Method::Full {
            return Err(Error::invalid("adapter method", "full fine-tuning has no adapter set"));
        }
        let (d, r) = (config.n_embd, spec.rank);
        let train = spec.method.trainable();
        let mut rng = Rng::new(spec.seed);
        let mut targets = spec.targets.clone();
        targets.sort();
        let mut host_mats: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut host_vecs: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut slots = Vec::new();
        // Zero-init choice for tied kinds: the first trainable of B, v, u, A.
        let zero = if train.b {
            'B'
        } else if train.v {
            'v'
        } else if train.u {
            'u'
        } else {
            'A'
        };
        if spec.method.tied() {
            for &m in &targets {
                let (k, n) = m.dims(d);
                let a = if zero == 'A' { vec![0.0; r * k] } else { kaiming(&mut rng, k, r * k) };
                let b = if zero == 'B' { vec![0.0; n * r] } else { kaiming(&mut rng, r, n * r) };
                host_mats.push((format!("{}.lora_A", m.name()), vec![r, k], a));
                host_mats.push((format!("{}.lora_B", m.name()), vec![n, r], b));
            }
        }
        for layer in 0..config.n_layer {
            for &m in &targets {
                let (k, n) = m.dims(d);
                let path = module_path(layer, m);
                if spec.method.tied() {
                    let g = targets.iter().position(|&t| t == m).unwrap_or(0);
                    let mut slot = Slot { layer, module: m, a: 2 * g, b: 2 * g + 1, u: None, v: None };
                    if train.u {
                        let init = if zero == 'u' {
                            0.0
                        } else if spec.method == Method::Vera {
                            crate::lowrank::VERA_U_INIT
                        } else {
                            1.0
                        };
                        slot.u = Some(host_vecs.len());
                        host_vecs.push((format!("{path}.lorafuse_u"), vec![r], vec![init; r]));
                    }
                    if train.v {
                        let init = if zero == 'v' { 0.0 } else { 1.0 };
                        slot.v = Some(host_vecs.len());
                        host_vecs.push((format!("{path}.lorafuse_v"), vec![n], vec![init; n]));
                    }
                    slots.push(slot);
                } else {
                    let (a, b) = match spec.method {
                        Method::Lora => (kaiming(&mut rng, k, r * k), vec![0.0; n * r]),
                        _ => (vec![0.0; r * k], vec![0.0; n * r]),
                    };
                    slots.push(Slot { layer, module: m, a: host_mats.len(), b: host_mats.len() + 1, u: None, v: None });
                    host_mats.push((format!("{path}.lora_A"), vec![r, k], a));
                    host_mats.push((format!("{path}.lora_B"), vec![n, r], b));
                }
            }
        }
        let uni = match spec.method {
            Method::UniLora { dim, assignment } => {
                let layout = ProjectionLayout::packed(
                    DType::F32,
                    host_mats.iter().map(|(name, shape, _)| (name.clone(), [shape[0], shape[1]])),
                )?;
                let projection = Projection::new(layout.rows(), dim, spec.seed, assignment)?;
                let theta = rng.uniform_vec(dim as usize, -0.02, 0.02);
                Some(UniState {
                    theta: backend.upload(&theta)?,
                    grad: backend.zeros(dim as usize)?,
                    prepared: backend.projection_prepare(&projection)?,
                    layout,
                })
            }
            _ => None,
        };
        let mut set = AdapterSet {
            spec: spec.clone(),
            slots,
            mats: Vec::new(),
            mat_grads: Vec::new(),
            vecs: Vec::new(),
            vec_grads: Vec::new(),
            uni,
        };
        for (name, shape, data) in host_mats {
            set.mat_grads.push(backend.zeros(data.len())?);
            set.mats.push(Named { name, shape, data: backend.upload(&data)? });
        }
        for (name, shape, data) in host_vecs {
            set.vec_grads.push(backend.zeros(data.len())?);
            set.vecs.push(Named { name, shape, data: backend.upload(&data)? });
        }
        set.gather(backend)?;
        Ok(set)
    }

    /// Uni-LoRA: writes `P·θ_d` into every `A` and `B` (a no-op otherwise).
    /// Call after every change of `θ_d`, before the forward.
    pub fn gather(&mut self, backend: &B) -> Result<()> {
        if let Some(u) = &self.uni {
            let mut bufs: Vec<&mut B::Buf<f32>> = self.mats.iter_mut().map(|m| &mut m.data).collect();
            backend.projection_gather(&u.prepared, &u.theta, &u.layout, &mut bufs)?;
        }
        Ok(())
    }

    /// Uni-LoRA: `∇θ_d = Pᵀ·∇θ_D` from the factors' gradients (a no-op
    /// otherwise). Call after the backward.
    pub fn scatter(&mut self, backend: &B) -> Result<()> {
        if let Some(u) = &mut self.uni {
            let grads: Vec<&B::Buf<f32>> = self.mat_grads.iter().collect();
            backend.projection_scatter(&u.prepared, &u.layout, &grads, ScatterMode::Deterministic, &mut u.grad)?;
        }
        Ok(())
    }

    /// Zeroes every gradient.
    pub fn zero_grads(&mut self, backend: &B) -> Result<()> {
        for g in self.mat_grads.iter_mut().chain(self.vec_grads.iter_mut()) {
            backend.fill_zero(g)?;
        }
        if let Some(u) = &mut self.uni {
            backend.fill_zero(&mut u.grad)?;
        }
        Ok(())
    }

    fn slot_of(&self, layer: usize, module: Module) -> Option<&Slot> {
        self.slots.iter().find(|s| s.layer == layer && s.module == module)
    }

    /// The adapter of one slot and its rank, if that slot is adapted.
    pub fn adapter(&self, layer: usize, module: Module) -> Option<(Adapter<'_, B>, usize)> {
        let s = self.slot_of(layer, module)?;
        let adapter = Adapter {
            a: &self.mats[s.a].data,
            b: &self.mats[s.b].data,
            u: s.u.map(|i| &self.vecs[i].data),
            v: s.v.map(|i| &self.vecs[i].data),
            scale: self.spec.scale(),
        };
        Some((adapter, self.spec.rank))
    }

    /// Backward of one linear module with this set's adapter (if the slot is
    /// adapted): overwrites `dx`, accumulates base and adapter gradients.
    /// A packed module's operands carry its layout; the adapter must be the
    /// one its weight was packed with (see [`crate::lowrank::packed`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_backward<T: Element>(
        &mut self,
        backend: &B,
        layer: usize,
        module: Module,
        (m, k, n): (usize, usize, usize),
        operands: LinearOperands<'_, B, T>,
        t: Option<&B::Buf<f32>>,
        dx: &mut B::Buf<T>,
        dw: Option<&mut B::Buf<f32>>,
        dbias: Option<&mut B::Buf<f32>>,
    ) -> Result<()> {
        let Some(s) = self.slot_of(layer, module).cloned() else {
            let LinearOperands::Unpacked { x, w, dy } = operands else {
                return Err(Error::invalid(
                    "packed backward",
                    format!("{} of layer {layer} has no adapter", module.name()),
                ));
            };
            let shape = LinearShape { m, k, n, r: 0 };
            let grads = Grads::<B, T> { dx: Some(dx), dw, dbias, ..Grads::none() };
            return backend.lowrank_backward(shape, x, w, None, None, dy, grads);
        };
        let train = if self.uni.is_some() {
            Trainable { a: true, b: true, u: false, v: false }
        } else {
            self.spec.method.trainable()
        };
        let adapter = Adapter {
            a: &self.mats[s.a].data,
            b: &self.mats[s.b].data,
            u: s.u.map(|i| &self.vecs[i].data),
            v: s.v.map(|i| &self.vecs[i].data),
            scale: self.spec.scale(),
        };
        let (ga, gb) = pair_mut(&mut self.mat_grads, s.a, s.b);
        let (gu, gv) = match (s.u, s.v) {
            (Some(i), Some(j)) => {
                let (x, y) = pair_mut(&mut self.vec_grads, i, j);
                (Some(x), Some(y))
            }
            (Some(i), None) => (Some(&mut self.vec_grads[i]), None),
            (None, Some(j)) => (None, Some(&mut self.vec_grads[j])),
            (None, None) => (None, None),
        };
        let grads = Grads::<B, T> {
            dx: Some(dx),
            dw,
            dbias,
            da: if train.a { Some(ga) } else { None },
            db: if train.b { Some(gb) } else { None },
            du: gu,
            dv: gv,
        };
        match operands {
            LinearOperands::Unpacked { x, w, dy } => {
                let shape = LinearShape { m, k, n, r: self.spec.rank };
                backend.lowrank_backward(shape, x, w, Some(adapter), t, dy, grads)
            }
            LinearOperands::Packed { layout, x, w, dy } => {
                backend.packed_backward(&layout, x, w, adapter, t, dy, grads)
            }
        }
    }

    /// Every trainable tensor with its group, value and gradient: `θ_d` for
    /// Uni-LoRA, else the trainable `A`/`B` and all `u`/`v`.
    pub fn trainable(&mut self) -> Vec<ParamRef<'_, B>> {
        if let Some(u) = &mut self.uni {
            return vec![("base_model.unilora_theta_d".to_string(), Group::Theta, &mut u.theta, &u.grad)];
        }
        let train = self.spec.method.trainable();
        let mut out = Vec::new();
        for (m, g) in self.mats.iter_mut().zip(&self.mat_grads) {
            let is_a = m.name.ends_with("lora_A");
            if (is_a && train.a) || (!is_a && train.b) {
                out.push((m.name.clone(), Group::Matrix, &mut m.data, g));
            }
        }
        for (v, g) in self.vecs.iter_mut().zip(&self.vec_grads) {
            out.push((v.name.clone(), Group::Vector, &mut v.data, g));
        }
        out
    }

    /// Trainable parameter count.
    pub fn num_trainable(&mut self) -> usize {
        self.trainable().iter().map(|(_, _, p, _)| B::len(p)).sum()
    }
}

/// The operands of one linear module's backward.
pub(crate) enum LinearOperands<'a, B: TrainBackend, T: Element> {
    /// Caller buffers: `x` (M×K), `W` (N×K), `dy` (M×N).
    Unpacked {
        /// The forward's input.
        x: &'a B::Buf<T>,
        /// The weight.
        w: &'a B::Buf<T>,
        /// The output's gradient.
        dy: &'a B::Buf<T>,
    },
    /// The packed layout: `x_packed` as the forward left it, `w_packed`,
    /// and `dy_packed` whose first N columns hold `dy` (its spare columns
    /// receive `dS`).
    Packed {
        /// The geometry (M = tokens).
        layout: PackedLayout,
        /// `x_packed`.
        x: &'a B::Buf<T>,
        /// `w_packed`.
        w: &'a B::Buf<T>,
        /// `dy_packed`.
        dy: &'a mut B::Buf<T>,
    },
}

/// Two distinct elements of a slice, mutably.
fn pair_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "pair_mut needs two distinct indices");
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&mut lo[i], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&mut hi[0], &mut lo[j])
    }
}
