//! Saving and restoring what training produces: adapters as PEFT-style
//! directories (through [`crate::peft`]), whole models in Hugging Face
//! layout, and checkpoints that resume bit-identically on the CPU.
//!
//! A checkpoint is a directory `step-<n>` holding `state.json` (step
//! counters, RNG state, the run's config), `optimizer.safetensors` (AdamW's
//! `m` and `v` per trainable tensor, f32) and either `adapter/` (PEFT
//! format) or `model/` (full fine-tuning). It is written under a temporary
//! name and renamed into place, then the `latest` file (itself written
//! atomically) is pointed at it: a run killed at any moment leaves the
//! previous checkpoint intact and `latest` naming a complete one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::adapter::{Adapter, AdapterConfig, AdapterKind, AdapterWeights, ModuleDelta, TargetModules, UniLoraWeights};
use crate::atomic_file::{rename, write_atomic};
use crate::tensor_file::{read_safetensors, write_safetensors, Tensor, TensorFile};
use crate::{Error, Result};

use super::adapters::{module_path, AdapterSet, AdapterSpec, Method};
use super::config::Gpt2Config;
use super::model::{transpose, Gpt2};
use super::module::Module;
use super::TrainBackend;

impl<B: TrainBackend> Gpt2<B> {
    /// Writes `config.json` and `model.safetensors` (Hugging Face layout,
    /// `Conv1D` weights transposed back to (in, out), f32) into `dir`, each
    /// file atomically.
    pub fn save(&self, backend: &B, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut file = TensorFile::default();
        for (i, spec) in Self::param_specs(&self.config).iter().enumerate() {
            let mut host = self.download_param(backend, i)?;
            let mut shape = spec.shape.clone();
            if spec.transposed {
                host = transpose(&host, shape[0], shape[1]);
                shape.swap(0, 1);
            }
            file.tensors.insert(spec.name.clone(), Tensor::f32(shape, host)?);
        }
        file.metadata.insert("format".into(), "pt".into());
        write_safetensors(&dir.join("model.safetensors"), &file)?;
        write_atomic(&dir.join("config.json"), self.config.to_json().as_bytes())
    }
}

fn kind_of(method: &Method) -> Result<AdapterKind> {
    Ok(match method {
        Method::Lora => AdapterKind::Lora,
        Method::Tied(_) => AdapterKind::TiedLora,
        Method::Vera => AdapterKind::Vera,
        Method::UniLora { .. } => AdapterKind::UniLora,
        Method::Full => {
            return Err(Error::invalid("adapter export", "full fine-tuning has no adapter: save the model"))
        }
    })
}

impl<B: TrainBackend> AdapterSet<B> {
    /// The adapter in memory ([`crate::adapter::Adapter`]), ready for
    /// [`crate::peft::save_adapter`]. Module paths are
    /// `transformer.h.<l>.<module>`; `fan_in_fan_out` is set because GPT-2's
    /// base weights are `Conv1D`.
    pub fn to_adapter(&self, backend: &B, config: &Gpt2Config) -> Result<Adapter> {
        let spec = &self.spec;
        let mut targets: Vec<String> = spec.targets.iter().map(|m| m.name().to_string()).collect();
        targets.sort();
        let mut cfg = AdapterConfig::lora(spec.rank, spec.alpha as f64, targets);
        cfg.kind = kind_of(&spec.method)?;
        cfg.fan_in_fan_out = true;
        // PEFT builds a causal-LM model (not a bare PeftModel) from this.
        cfg.extra.insert("task_type".into(), "CAUSAL_LM".into());
        // Stored where PEFT ignores it (see `crate::peft::save_adapter_as`).
        cfg.extra.insert("lorafuse_method".into(), serde_json::Value::String(spec.method.label()));
        if let Some(u) = &self.uni {
            let w = UniLoraWeights::new(backend.download(&u.theta)?, u.prepared.projection.clone(), u.layout.clone())?;
            return Adapter::unilora(cfg, w);
        }
        let mats: Vec<Arc<[f32]>> =
            self.mats.iter().map(|m| backend.download(&m.data).map(Into::into)).collect::<Result<_>>()?;
        let d = config.n_embd;
        let mut modules = Vec::new();
        for s in &self.slots {
            let (k, n) = s.module.dims(d);
            let name = module_path(s.layer, s.module);
            let dims = (spec.rank, k, n);
            let scale = spec.scale() as f64;
            let m = match spec.method {
                Method::Lora => ModuleDelta::lora(name, dims, mats[s.a].to_vec(), mats[s.b].to_vec(), scale)?,
                _ => {
                    let u = s.u.map(|i| backend.download(&self.vecs[i].data)).transpose()?;
                    let v = s.v.map(|i| backend.download(&self.vecs[i].data)).transpose()?;
                    ModuleDelta::tied(name, s.module.name(), dims, mats[s.a].clone(), mats[s.b].clone(), u, v, scale)?
                }
            };
            modules.push(m);
        }
        Adapter::new(cfg, modules)
    }

    /// Overwrites this set's parameters with those of `adapter` (same
    /// method family, rank and modules). Missing `u`/`v` mean ones.
    pub fn load_values(&mut self, backend: &B, adapter: &Adapter) -> Result<()> {
        adapter.validate()?;
        let want = kind_of(&self.spec.method)?;
        if adapter.config.kind != want {
            return Err(Error::invalid("adapter", format!("is {:?}, the run trains {want:?}", adapter.config.kind)));
        }
        match (&adapter.weights, &mut self.uni) {
            (AdapterWeights::UniLora(w), Some(u)) => {
                if w.layout != u.layout || w.projection.cols() != u.prepared.projection.cols() {
                    return Err(Error::invalid("Uni-LoRA adapter", "its layout or d differs from this model's"));
                }
                if w.projection.seed() != u.prepared.projection.seed()
                    || w.projection.assignment() != u.prepared.projection.assignment()
                {
                    u.prepared = backend.projection_prepare(&w.projection)?;
                }
                u.theta = backend.upload(&w.theta)?;
                self.gather(backend)
            }
            (AdapterWeights::Modules(mods), None) => {
                let by_name: BTreeMap<&str, &ModuleDelta> =
                    mods.iter().map(|m| (m.name.trim_start_matches("base_model.model."), m)).collect();
                for s in self.slots.clone() {
                    let path = module_path(s.layer, s.module);
                    let m = by_name
                        .get(path.as_str())
                        .or_else(|| by_name.get(path.trim_start_matches("transformer.")))
                        .ok_or_else(|| Error::invalid("adapter", format!("has no module `{path}`")))?;
                    if m.rank != self.spec.rank {
                        return Err(Error::invalid(
                            "adapter",
                            format!("`{path}` has rank {}, expected {}", m.rank, self.spec.rank),
                        ));
                    }
                    for (idx, src) in [(s.a, &m.a), (s.b, &m.b)] {
                        crate::error::check_len("adapter load", "factor", src.len(), B::len(&self.mats[idx].data))?;
                        self.mats[idx].data = backend.upload(src)?;
                    }
                    for (idx, src, what) in [(s.u, &m.u, "u"), (s.v, &m.v, "v")] {
                        if let Some(i) = idx {
                            let len = B::len(&self.vecs[i].data);
                            let host = src.clone().unwrap_or_else(|| vec![1.0; len]);
                            crate::error::check_len(
                                "adapter load",
                                if what == "u" { "u" } else { "v" },
                                host.len(),
                                len,
                            )?;
                            self.vecs[i].data = backend.upload(&host)?;
                        } else if src.as_ref().is_some_and(|x| x.iter().any(|&e| e != 1.0)) {
                            return Err(Error::invalid(
                                "adapter",
                                format!("`{path}` has a {what} vector this run keeps frozen at ones"),
                            ));
                        }
                    }
                }
                Ok(())
            }
            _ => Err(Error::invalid("adapter", "its weights do not match the run's method")),
        }
    }
}

/// The `(layer, module)` a module path names on a model of shape `config`
/// (`[base_model.model.][transformer.]h.<l>.<module>`), checking its
/// in/out features.
fn locate(delta: &ModuleDelta, config: &Gpt2Config) -> Result<(usize, Module)> {
    let name = delta.name.trim_start_matches("base_model.model.");
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    let not_here = |why: String| Error::invalid(format!("adapter module `{}`", delta.name), why);
    let (layer, module) = name
        .strip_prefix("h.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(l, m)| Some((l.parse::<usize>().ok()?, Module::ALL.into_iter().find(|x| x.name() == m)?)))
        .ok_or_else(|| not_here("is not a GPT-2 attn/mlp linear (`transformer.h.<l>.attn.c_attn`, ...)".into()))?;
    if layer >= config.n_layer {
        return Err(not_here(format!(
            "is in layer {layer} but the model has {} layers: evaluate it on the model it was trained for",
            config.n_layer
        )));
    }
    let (k, n) = module.dims(config.n_embd);
    if (delta.in_features, delta.out_features) != (k, n) {
        return Err(not_here(format!(
            "maps {} -> {} features but the model's {} maps {k} -> {n}: the adapter is for another model",
            delta.in_features,
            delta.out_features,
            module.name()
        )));
    }
    Ok((layer, module))
}

impl<B: TrainBackend> AdapterSet<B> {
    /// An adapter set that computes exactly `adapter`'s deltas on a model of
    /// shape `config`, for evaluation: every kind (Tied-LoRA, VeRA and
    /// Uni-LoRA with any assignment included) is folded into plain factors
    /// `B' = s·diag(v)·B·diag(u)`, `A` (so rsLoRA, `alpha_pattern` and
    /// per-module ranks all hold), zero-padded to the largest rank, at
    /// scale one. Slots the adapter does not have get a zero delta; a module the
    /// model lacks (another layer count or width) is an error naming it.
    pub fn for_eval(backend: &B, config: &Gpt2Config, adapter: &Adapter) -> Result<Self> {
        adapter.validate()?;
        let deltas = adapter.deltas()?;
        let mut placed: BTreeMap<(usize, Module), &ModuleDelta> = BTreeMap::new();
        for m in deltas.iter() {
            if placed.insert(locate(m, config)?, m).is_some() {
                return Err(Error::invalid("adapter", format!("two modules name the same layer as `{}`", m.name)));
            }
        }
        let rank = placed.values().map(|m| m.rank).max().unwrap_or(1);
        let mut targets: Vec<Module> = placed.keys().map(|&(_, m)| m).collect();
        targets.sort();
        targets.dedup();
        let spec = AdapterSpec { method: Method::Lora, rank, alpha: rank as f32, targets, seed: 0 };
        let mut set = AdapterSet::new(backend, config, &spec)?;
        for s in set.slots.clone() {
            let (k, n) = s.module.dims(config.n_embd);
            let (mut a, mut b) = (vec![0f32; rank * k], vec![0f32; n * rank]);
            if let Some(m) = placed.get(&(s.layer, s.module)) {
                let (bf, af) = m.effective_factors(1.0);
                let r = m.rank;
                for (dst, src) in a.iter_mut().zip(&af) {
                    *dst = *src as f32;
                }
                for row in 0..n {
                    for c in 0..r {
                        b[row * rank + c] = bf[row * r + c] as f32;
                    }
                }
            }
            // The folded scale can overflow f32 even when α and the factors
            // are finite.
            crate::error::check_finite(
                &format!("adapter module at layer {} {} (scale folded in)", s.layer, s.module.name()),
                &b,
            )?;
            set.mats[s.a].data = backend.upload(&a)?;
            set.mats[s.b].data = backend.upload(&b)?;
        }
        Ok(set)
    }
}

/// The spec that rebuilds `adapter`'s structure on a model: method from its
/// kind (Tied-LoRA with every part present), rank, α, modules. Uni-LoRA's d
/// and assignment come from its projection.
pub fn spec_for(adapter: &Adapter) -> Result<AdapterSpec> {
    let deltas_names: Vec<String> = match &adapter.weights {
        AdapterWeights::Modules(m) => m.iter().map(|d| d.name.clone()).collect(),
        AdapterWeights::UniLora(w) => w
            .layout
            .segments()
            .iter()
            .map(|s| s.name.trim_end_matches(".lora_A").trim_end_matches(".lora_B").to_string())
            .collect(),
    };
    let mut targets: Vec<Module> = Vec::new();
    for name in &deltas_names {
        let m = Module::ALL
            .into_iter()
            .find(|m| name.ends_with(&format!(".{}", m.name())))
            .ok_or_else(|| Error::invalid("adapter", format!("module `{name}` is not a GPT-2 attn/mlp linear")))?;
        if !targets.contains(&m) {
            targets.push(m);
        }
    }
    if let TargetModules::List(l) = &adapter.config.target_modules {
        for t in l {
            match Module::parse(t) {
                Ok(m) if !targets.contains(&m) => targets.push(m),
                Ok(_) => {}
                // PEFT's usual GPT-2 `c_proj` names both projections; the
                // tensor names already said which ones this adapter has.
                // `sum` writes full module paths, which name tensors too.
                Err(_) if deltas_names.iter().any(|n| n == t || n.ends_with(&format!(".{t}"))) => {}
                Err(e) => return Err(e),
            }
        }
    }
    targets.sort();
    let method = match (&adapter.config.kind, &adapter.weights) {
        (AdapterKind::Lora, _) => Method::Lora,
        (AdapterKind::TiedLora, _) => Method::parse("tied")?,
        (AdapterKind::Vera, _) => Method::Vera,
        (AdapterKind::UniLora, AdapterWeights::UniLora(w)) => {
            Method::UniLora { dim: w.projection.cols(), assignment: w.projection.assignment() }
        }
        _ => return Err(Error::invalid("adapter", "kind and weights disagree")),
    };
    let seed = match &adapter.weights {
        AdapterWeights::UniLora(w) => w.projection.seed(),
        _ => 0,
    };
    Ok(AdapterSpec { method, rank: adapter.config.r, alpha: adapter.config.lora_alpha as f32, targets, seed })
}

/// Checkpoint counters and settings (`state.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    /// Training iterations done (accepted and refused).
    pub iteration: u64,
    /// Accepted optimizer steps.
    pub optimizer_step: u64,
    /// The data sampler's RNG state.
    pub rng_state: u64,
    /// Consecutive refused steps so far.
    pub bad_steps: u32,
    /// The run's config, as JSON (the CLI's own type).
    pub config: serde_json::Value,
}

/// The moments and trainable values a checkpoint carries.
pub struct CheckpointTensors {
    /// `(name, m, v)` per trainable tensor.
    pub moments: Vec<(String, Vec<f32>, Vec<f32>)>,
}

/// Writes a checkpoint directory `root/step-<iteration>` atomically and
/// points `root/latest` at it. `write_weights` fills the weights part
/// (`adapter/` or `model/`) inside the directory it is given. Older
/// checkpoints beyond the newest `keep` are removed.
pub fn write_checkpoint(
    root: &Path,
    state: &CheckpointState,
    moments: &CheckpointTensors,
    keep: usize,
    write_weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    remove_stale_temporaries(root);
    let name = format!("step-{:08}", state.iteration);
    let tmp = root.join(format!(".{name}.tmp"));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_weights(&tmp)?;
    let mut file = TensorFile::default();
    for (n, m, v) in &moments.moments {
        file.tensors.insert(format!("{n}.adam_m"), Tensor::f32(vec![m.len()], m.clone())?);
        file.tensors.insert(format!("{n}.adam_v"), Tensor::f32(vec![v.len()], v.clone())?);
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &file)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::invalid("checkpoint state", e.to_string()))?;
    write_atomic(&tmp.join("state.json"), json.as_bytes())?;
    let dst = root.join(&name);
    let _ = std::fs::remove_dir_all(&dst);
    rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    // Prune: keep the newest `keep` step directories up to this one. Steps
    // above it (another run's) are left alone, and this one is never
    // removed, so `latest` always names a directory that exists.
    let steps = step_dirs(root)?;
    let older: Vec<&(u64, PathBuf)> = steps.iter().filter(|(n, _)| *n < state.iteration).collect();
    for (_, old) in older.iter().take((older.len() + 1).saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dst)
}

/// Removes what an interrupted write left in a checkpoint root: hidden
/// `.step-*.tmp` directories and `.<file>.tmp.<pid>.<n>` files.
fn remove_stale_temporaries(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".tmp") || name.contains(".tmp.") || name.contains(".old.")) {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// The `step-<n>` directories under `root`, by step.
pub fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

/// The checkpoint to resume from: the directory `root/latest` names, or,
/// when `latest` is missing or names a directory that is gone, the newest
/// complete `step-<n>` (one with a `state.json`).
pub fn latest_checkpoint(root: &Path) -> Result<PathBuf> {
    if !root.is_dir() {
        return Err(Error::invalid(
            format!("checkpoint directory {}", root.display()),
            "does not exist or is not a directory: nothing to resume; drop --resume to start a new run",
        ));
    }
    let latest = root.join("latest");
    if let Ok(name) = std::fs::read_to_string(&latest) {
        let name = name.trim();
        if !name.starts_with("step-") || name.contains(['/', '\\']) {
            return Err(Error::format(&latest, format!("names `{name}`, not a step-<n> directory")));
        }
        if root.join(name).join("state.json").is_file() {
            return Ok(root.join(name));
        }
    }
    step_dirs(root)?.into_iter().rev().map(|(_, p)| p).find(|p| p.join("state.json").is_file()).ok_or_else(|| {
        Error::invalid(
            format!("checkpoint directory {}", root.display()),
            "holds no complete checkpoint (no step-<n>/state.json): drop --resume to start a new run",
        )
    })
}

/// Reads a checkpoint's `state.json` and optimizer moments.
pub fn read_checkpoint(dir: &Path) -> Result<(CheckpointState, BTreeMap<String, Vec<f32>>)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    // Counters a run can reach: a corrupt one would overflow on the next step.
    if state.iteration >= 1 << 62 || state.optimizer_step > state.iteration {
        return Err(Error::format(
            &path,
            format!("iteration {} / optimizer_step {} are not a run's counters", state.iteration, state.optimizer_step),
        ));
    }
    let opt_path = dir.join("optimizer.safetensors");
    let opt = read_safetensors(&opt_path)?;
    let mut moments = BTreeMap::new();
    for (name, t) in opt.tensors {
        let v = t.to_f32_vec(&name).map_err(|e| Error::format(&opt_path, e.to_string()))?;
        crate::error::check_finite(&format!("{}: `{name}`", opt_path.display()), &v)?;
        // AdamW's second moment is a mean of squares: a negative one would
        // make the update NaN (its square root) on the first step.
        if name.ends_with(".adam_v") {
            if let Some(i) = v.iter().position(|&x| x < 0.0) {
                return Err(Error::format(&opt_path, format!("`{name}` has a negative second moment {} at {i}", v[i])));
            }
        }
        moments.insert(name.clone(), v);
    }
    Ok((state, moments))
}
