//! What an adapter is, in memory: one low-rank delta per adapted module.
//!
//! Every kind lorafuse knows reduces, per module, to
//! `ΔW = s · diag(v) · B · diag(u) · A` with `A` (r×K), `B` (N×r), the scale
//! `s`, and optional vectors `u` (r) and `v` (N) (absent = ones):
//!
//! - [`AdapterKind::Lora`]: `u`, `v` absent, `s = α/r` (or `α/√r` with rsLoRA).
//! - [`AdapterKind::TiedLora`]: `A`, `B` shared by every module of one tie
//!   group ([`ModuleDelta::tie`]), per-module `u`, `v`; `s` as for LoRA.
//! - [`AdapterKind::Vera`]: like Tied-LoRA (frozen random `A`, `B`); VeRA's
//!   `d` is `u` and its `b` is `v`.
//! - [`AdapterKind::UniLora`]: every `A` and `B` is a segment of
//!   `θ_D = P·θ_d` ([`crate::projection`]); stored as `θ_d` plus the seed and
//!   layout, materialised on demand by [`UniLoraWeights::materialize`];
//!   `s = 1` (Uni-LoRA applies no α/r on top).
//!
//! All matrices are row-major f32. Shared `A`/`B` are [`Arc`]s, so tied
//! modules share memory. Fields are public for easy construction; every
//! consumer (file writer, sums, merges) calls [`Adapter::validate`] first, so a
//! hand-built inconsistent adapter is an error, never a panic.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::cpu::gemm::{matmul, Op};
use crate::cpu::Cpu;
use crate::projection::{Projection, ProjectionLayout, ProjectionOps, Segment};
use crate::{DType, Error, Result};

/// The most elements a Uni-LoRA layout may materialise (2^30, 4 GiB of f32;
/// a rank-64 LoRA of a 70B model is about 2^29.6): a few bytes of hostile
/// config cannot make lorafuse allocate more.
pub const MAX_MATERIALIZED_ELEMENTS: u64 = 1 << 30;

/// Which member of the LoRA family an adapter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// Plain LoRA: `s·B·A` per module.
    Lora,
    /// Tied-LoRA: shared `A`, `B` per tie group, per-module `u`, `v`.
    TiedLora,
    /// VeRA: frozen shared random `A`, `B`, per-module `u` (VeRA's d), `v` (b).
    Vera,
    /// Uni-LoRA: every `A`, `B` projected from one vector `θ_d`.
    UniLora,
}

/// PEFT's `target_modules`: a list of module-name suffixes or one regex.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names (PEFT matches them as suffixes of the full path).
    List(Vec<String>),
    /// One regular expression over the full module path.
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(Vec::new())
    }
}

/// PEFT's `rank_pattern` / `alpha_pattern`: `(key, value)` in the order the
/// file lists them. As in PEFT (`peft.utils.other.get_pattern_key`), a key is
/// a regular expression matched against the whole module path as
/// `^(.*\.)?(key)$` (so it is anchored at a module-name boundary), and the
/// **first** key that matches wins, whatever its length.
pub type Patterns<V> = Vec<(String, V)>;

/// The regular expression PEFT builds from a pattern key.
fn pattern_regex(key: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

/// The first entry of `patterns` whose key matches `module` as PEFT matches
/// it. A key that is not a valid regular expression never matches
/// ([`AdapterConfig::validate`] rejects such configs).
pub fn pattern_match<'a, V>(patterns: &'a [(String, V)], module: &str) -> Option<&'a V> {
    patterns.iter().find(|(k, _)| pattern_regex(k).is_ok_and(|re| re.is_match(module))).map(|(_, v)| v)
}

/// The adapter-wide settings, mirroring PEFT's `adapter_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// Which kind of adapter.
    pub kind: AdapterKind,
    /// Default rank `r` (modules may differ through `rank_pattern`).
    pub r: usize,
    /// `α` of the scale `α/r`.
    pub lora_alpha: f64,
    /// rsLoRA: the scale is `α/√r` instead of `α/r`.
    pub use_rslora: bool,
    /// Which modules carry the adapter.
    pub target_modules: TargetModules,
    /// The base layer stores its weight as K×N (GPT-2's `Conv1D`), so a merge
    /// adds `(B·A)ᵀ`.
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides, in file order (see [`Patterns`]).
    pub rank_pattern: Patterns<usize>,
    /// Per-module `α` overrides, in file order (see [`Patterns`]).
    pub alpha_pattern: Patterns<f64>,
    /// The base model the adapter was trained on, if recorded.
    pub base_model_name_or_path: Option<String>,
    /// Every other `adapter_config.json` field, kept verbatim so that files
    /// written by PEFT round-trip (task_type, lora_dropout, ...).
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl AdapterConfig {
    /// A LoRA config with PEFT's defaults for everything else.
    pub fn lora(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> Self {
        AdapterConfig {
            kind: AdapterKind::Lora,
            r,
            lora_alpha,
            use_rslora: false,
            target_modules: TargetModules::List(target_modules),
            fan_in_fan_out: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            base_model_name_or_path: None,
            extra: BTreeMap::new(),
        }
    }

    /// Checks `r ≥ 1`, `α` finite and every pattern entry sane.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("adapter config `r`", "must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(Error::invalid("adapter config `lora_alpha`", format!("{} is not finite", self.lora_alpha)));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| *r == 0) {
            return Err(Error::invalid("adapter config `rank_pattern`", format!("`{k}` has rank 0")));
        }
        if let Some((k, a)) = self.alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            return Err(Error::invalid("adapter config `alpha_pattern`", format!("`{k}` has α = {a}")));
        }
        for (what, keys) in [
            ("rank_pattern", self.rank_pattern.iter().map(|(k, _)| k).collect::<Vec<_>>()),
            ("alpha_pattern", self.alpha_pattern.iter().map(|(k, _)| k).collect()),
        ] {
            for k in keys {
                if let Err(e) = pattern_regex(k) {
                    return Err(Error::invalid(
                        format!("adapter config `{what}` key `{k}`"),
                        format!("is not a regular expression lorafuse can match as PEFT does ({e})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The rank PEFT builds for `module` (its first matching `rank_pattern`
    /// entry, else `r`).
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_match(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// `α` for `module` (its first matching `alpha_pattern` entry, else
    /// `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_match(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha)
    }

    /// The scale `s` of `module` at rank `rank`: `α/r` or `α/√r`, and 1 for
    /// Uni-LoRA.
    pub fn scale_for(&self, module: &str, rank: usize) -> f64 {
        if self.kind == AdapterKind::UniLora {
            return 1.0;
        }
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// One adapted module's delta `ΔW = s · diag(v) · B · diag(u) · A`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleDelta {
    /// The module's path in the base model, e.g. `transformer.h.0.attn.c_attn`.
    pub name: String,
    /// Rank r.
    pub rank: usize,
    /// K: the layer's input features.
    pub in_features: usize,
    /// N: the layer's output features.
    pub out_features: usize,
    /// `A`, r×K row-major (shared across a tie group for Tied-LoRA/VeRA).
    pub a: Arc<[f32]>,
    /// `B`, N×r row-major (shared across a tie group for Tied-LoRA/VeRA).
    pub b: Arc<[f32]>,
    /// The scale `s`.
    pub scale: f64,
    /// Tied-LoRA/VeRA per-rank scaling `u` (length r); `None` means ones.
    pub u: Option<Vec<f32>>,
    /// Tied-LoRA/VeRA per-output scaling `v` (length N); `None` means ones.
    pub v: Option<Vec<f32>>,
    /// Tied-LoRA/VeRA: the tie group whose `A`, `B` this module shares.
    pub tie: Option<String>,
}

impl ModuleDelta {
    /// A plain LoRA delta `scale·B·A`; checks lengths and finiteness.
    pub fn lora(
        name: impl Into<String>,
        (rank, in_features, out_features): (usize, usize, usize),
        a: Vec<f32>,
        b: Vec<f32>,
        scale: f64,
    ) -> Result<Self> {
        let m = ModuleDelta {
            name: name.into(),
            rank,
            in_features,
            out_features,
            a: a.into(),
            b: b.into(),
            scale,
            u: None,
            v: None,
            tie: None,
        };
        m.validate()?;
        Ok(m)
    }

    /// A Tied-LoRA/VeRA delta `scale·diag(v)·B·diag(u)·A` sharing `a`, `b`
    /// with the rest of tie group `tie`.
    #[allow(clippy::too_many_arguments)]
    pub fn tied(
        name: impl Into<String>,
        tie: impl Into<String>,
        (rank, in_features, out_features): (usize, usize, usize),
        a: Arc<[f32]>,
        b: Arc<[f32]>,
        u: Option<Vec<f32>>,
        v: Option<Vec<f32>>,
        scale: f64,
    ) -> Result<Self> {
        let m = ModuleDelta {
            name: name.into(),
            rank,
            in_features,
            out_features,
            a,
            b,
            scale,
            u,
            v,
            tie: Some(tie.into()),
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks every length against (r, K, N), that all are nonzero, and
    /// that every value is finite.
    pub fn validate(&self) -> Result<()> {
        let (r, k, n) = (self.rank, self.in_features, self.out_features);
        if r == 0 || k == 0 || n == 0 {
            return Err(Error::invalid(
                format!("module `{}`", self.name),
                format!("rank {r}, in_features {k}, out_features {n}: all must be at least 1"),
            ));
        }
        let want = |what: &'static str, len: usize, rows: usize, cols: usize| match rows.checked_mul(cols) {
            Some(e) if e == len => Ok(()),
            _ => Err(Error::Shape {
                op: "adapter module",
                operand: what,
                expected: format!("`{}` {rows}x{cols}", self.name),
                got: format!("{len} elements"),
            }),
        };
        want("A", self.a.len(), r, k)?;
        want("B", self.b.len(), n, r)?;
        if let Some(u) = &self.u {
            want("u", u.len(), r, 1)?;
            crate::error::check_finite(&format!("`{}` u", self.name), u)?;
        }
        if let Some(v) = &self.v {
            want("v", v.len(), n, 1)?;
            crate::error::check_finite(&format!("`{}` v", self.name), v)?;
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid(
                format!("module `{}` scale", self.name),
                format!("{} is not finite", self.scale),
            ));
        }
        crate::error::check_finite(&format!("`{}` A", self.name), &self.a)?;
        crate::error::check_finite(&format!("`{}` B", self.name), &self.b)?;
        Ok(())
    }

    /// The delta as one plain pair with scale folded in, in f64:
    /// `B' = weight·s·diag(v)·B·diag(u)` (N×r) and `A' = A` (r×K), so that
    /// `weight·ΔW = B'·A'`.
    pub fn effective_factors(&self, weight: f64) -> (Vec<f64>, Vec<f64>) {
        let r = self.rank;
        let s = weight * self.scale;
        let b = self
            .b
            .iter()
            .enumerate()
            .map(|(e, &x)| {
                let (row, col) = (e / r, e % r);
                let v = self.v.as_ref().map_or(1.0, |v| v[row] as f64);
                let u = self.u.as_ref().map_or(1.0, |u| u[col] as f64);
                s * v * u * x as f64
            })
            .collect();
        (b, self.a.iter().map(|&x| x as f64).collect())
    }

    /// The dense N×K delta in f64. O(N·K) memory: for tests and small
    /// modules only; everything else works on the factors.
    pub fn dense(&self) -> Result<Vec<f64>> {
        let (b, a) = self.effective_factors(1.0);
        let mut out = vec![0.0; self.out_features * self.in_features];
        matmul((self.out_features, self.rank, self.in_features), &b, Op::N, &a, Op::N, &mut out, 1.0, 0.0)?;
        Ok(out)
    }
}

/// A Uni-LoRA adapter's trainable state: `θ_d`, the projection `P` (seed,
/// d, assignment) and the layout placing every `A` and `B` in `θ_D`.
///
/// Layout segments are named `<module>.lora_A` (shape `[r, K]`) and
/// `<module>.lora_B` (shape `[N, r]`), one pair per module.
#[derive(Clone, Debug)]
pub struct UniLoraWeights {
    /// `θ_d`, length d.
    pub theta: Vec<f32>,
    /// `P`: D × d with its seed and assignment.
    pub projection: Projection,
    /// Where each module's `A` and `B` lie in `θ_D`.
    pub layout: ProjectionLayout,
}

/// A module's (A, B) segment pair in a Uni-LoRA layout.
struct SegmentPair<'a> {
    name: &'a str,
    a: &'a Segment,
    b: &'a Segment,
}

impl UniLoraWeights {
    /// Checks θ's length against d, D against the layout, the size cap, and
    /// that segments pair up as `<module>.lora_A` / `<module>.lora_B` with one
    /// rank per module.
    pub fn new(theta: Vec<f32>, projection: Projection, layout: ProjectionLayout) -> Result<Self> {
        let w = UniLoraWeights { theta, projection, layout };
        w.validate()?;
        Ok(w)
    }

    /// The checks of [`UniLoraWeights::new`].
    pub fn validate(&self) -> Result<()> {
        crate::error::check_len("uni-lora", "theta", self.theta.len(), self.projection.cols() as usize)?;
        crate::error::check_finite("uni-lora theta", &self.theta)?;
        if self.projection.rows() != self.layout.rows() {
            return Err(Error::shape(
                "uni-lora",
                "projection",
                format!("D = {} (the layout's)", self.layout.rows()),
                format!("D = {}", self.projection.rows()),
            ));
        }
        if self.layout.rows() > MAX_MATERIALIZED_ELEMENTS {
            return Err(Error::invalid(
                "uni-lora layout",
                format!("D = {} exceeds the cap of {MAX_MATERIALIZED_ELEMENTS} elements", self.layout.rows()),
            ));
        }
        self.pairs().map(|_| ())
    }

    fn pairs(&self) -> Result<Vec<SegmentPair<'_>>> {
        let mut a_of: BTreeMap<&str, &Segment> = BTreeMap::new();
        let mut b_of: BTreeMap<&str, &Segment> = BTreeMap::new();
        for s in self.layout.segments() {
            let (map, module) = if let Some(m) = s.name.strip_suffix(".lora_A") {
                (&mut a_of, m)
            } else if let Some(m) = s.name.strip_suffix(".lora_B") {
                (&mut b_of, m)
            } else {
                return Err(Error::invalid(
                    "uni-lora layout",
                    format!("segment `{}` must be named `<module>.lora_A` or `<module>.lora_B`", s.name),
                ));
            };
            if map.insert(module, s).is_some() {
                return Err(Error::invalid("uni-lora layout", format!("segment `{}` appears twice", s.name)));
            }
        }
        let names: BTreeSet<&str> = a_of.keys().chain(b_of.keys()).copied().collect();
        names
            .into_iter()
            .map(|name| {
                let (Some(a), Some(b)) = (a_of.get(name), b_of.get(name)) else {
                    return Err(Error::invalid(
                        "uni-lora layout",
                        format!("module `{name}` needs both `{name}.lora_A` and `{name}.lora_B` segments"),
                    ));
                };
                if a.shape[0] != b.shape[1] {
                    return Err(Error::invalid(
                        "uni-lora layout",
                        format!("module `{name}`: A is {:?} and B is {:?}; A is [r, K], B is [N, r]", a.shape, b.shape),
                    ));
                }
                Ok(SegmentPair { name, a, b })
            })
            .collect()
    }

    /// Every module's `A` and `B`, gathered from `θ_d` on the CPU (the same
    /// bits the GPU gather writes), with scale 1.
    pub fn materialize(&self) -> Result<Vec<ModuleDelta>> {
        self.validate()?;
        // The layout's D comes from a config, not from the data the file
        // holds: budget the peak (gathered f32 buffers, the module copies,
        // the prepared projection and the f64 factors consumers fold them
        // into) before allocating.
        let elems: u128 = self.layout.segments().iter().map(|s| s.len() as u128).sum();
        crate::memory::check(
            &format!("materialising a Uni-LoRA layout of D = {} elements", self.layout.rows()),
            Some(elems.max(self.layout.rows() as u128) * 40),
        )?;
        let layout = ProjectionLayout::new(self.layout.rows(), DType::F32, self.layout.segments().to_vec())?;
        let prepared = Cpu.projection_prepare(&self.projection)?;
        let mut bufs: Vec<Vec<f32>> = layout.segments().iter().map(|s| vec![0f32; s.len() as usize]).collect();
        Cpu.projection_gather(&prepared, &self.theta, &layout, &mut bufs.iter_mut().collect::<Vec<_>>())?;
        let by_name: BTreeMap<&str, Vec<f32>> = layout.segments().iter().map(|s| s.name.as_str()).zip(bufs).collect();
        self.pairs()?
            .into_iter()
            .map(|p| {
                let a = by_name[p.a.name.as_str()].clone();
                let b = by_name[p.b.name.as_str()].clone();
                ModuleDelta::lora(p.name, (p.a.shape[0], p.a.shape[1], p.b.shape[0]), a, b, 1.0)
            })
            .collect()
    }
}

/// The weights of an adapter.
#[derive(Clone, Debug)]
pub enum AdapterWeights {
    /// LoRA, Tied-LoRA, VeRA: explicit per-module factors.
    Modules(Vec<ModuleDelta>),
    /// Uni-LoRA: `θ_d` and the projection; factors are materialised on demand.
    UniLora(UniLoraWeights),
}

/// An adapter: config, weights, and any other tensors its file carried.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// The adapter-wide settings.
    pub config: AdapterConfig,
    /// The factors (or Uni-LoRA's θ).
    pub weights: AdapterWeights,
    /// Tensors that are not part of the delta (e.g. a trainer's optimizer
    /// state; a loaded file never has model weights here, see
    /// [`crate::peft::load_adapter`]): written back verbatim, ignored by
    /// every sum and merge.
    pub extra_tensors: BTreeMap<String, crate::tensor_file::Tensor>,
}

impl Adapter {
    /// A LoRA/Tied-LoRA/VeRA adapter; validated.
    pub fn new(config: AdapterConfig, modules: Vec<ModuleDelta>) -> Result<Self> {
        let a = Adapter { config, weights: AdapterWeights::Modules(modules), extra_tensors: BTreeMap::new() };
        a.validate()?;
        Ok(a)
    }

    /// A Uni-LoRA adapter; validated (`config.kind` must be `UniLora`).
    pub fn unilora(config: AdapterConfig, weights: UniLoraWeights) -> Result<Self> {
        let a = Adapter { config, weights: AdapterWeights::UniLora(weights), extra_tensors: BTreeMap::new() };
        a.validate()?;
        Ok(a)
    }

    /// Checks the config, every module, unique names, that the weights match
    /// the kind, and that tie groups really share one shape of `A` and `B`.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let kind = self.config.kind;
        match &self.weights {
            AdapterWeights::UniLora(w) => {
                if kind != AdapterKind::UniLora {
                    return Err(Error::invalid("adapter", format!("Uni-LoRA weights with kind {kind:?}")));
                }
                w.validate()
            }
            AdapterWeights::Modules(modules) => {
                if kind == AdapterKind::UniLora {
                    return Err(Error::invalid("adapter", "kind UniLora needs UniLoraWeights, not modules"));
                }
                let mut names = BTreeSet::new();
                let mut groups: BTreeMap<&str, &ModuleDelta> = BTreeMap::new();
                for m in modules {
                    m.validate()?;
                    if !names.insert(m.name.as_str()) {
                        return Err(Error::invalid("adapter", format!("module `{}` appears twice", m.name)));
                    }
                    let tied = matches!(kind, AdapterKind::TiedLora | AdapterKind::Vera);
                    match (&m.tie, tied) {
                        (Some(g), true) => {
                            // A tie group is stored once: its members must
                            // really share one A and one B.
                            let first = *groups.entry(g.as_str()).or_insert(m);
                            let shares = |x: &Arc<[f32]>, y: &Arc<[f32]>| Arc::ptr_eq(x, y) || x == y;
                            if first.rank != m.rank || !shares(&first.a, &m.a) || !shares(&first.b, &m.b) {
                                return Err(Error::invalid(
                                    "adapter",
                                    format!(
                                        "tie group `{g}`: modules `{}` and `{}` do not share the same A and B",
                                        first.name, m.name
                                    ),
                                ));
                            }
                        }
                        (None, true) => {
                            return Err(Error::invalid(
                                "adapter",
                                format!("{kind:?} module `{}` has no tie group", m.name),
                            ))
                        }
                        (_, false) if m.tie.is_some() || m.u.is_some() || m.v.is_some() => {
                            return Err(Error::invalid(
                                "adapter",
                                format!("LoRA module `{}` has Tied-LoRA fields (tie, u or v)", m.name),
                            ))
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }

    /// Every module's delta (Uni-LoRA's materialised), in name order for
    /// Uni-LoRA and in stored order otherwise.
    pub fn deltas(&self) -> Result<Cow<'_, [ModuleDelta]>> {
        match &self.weights {
            AdapterWeights::Modules(m) => Ok(Cow::Borrowed(m)),
            AdapterWeights::UniLora(w) => Ok(Cow::Owned(w.materialize()?)),
        }
    }
}
