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
use crate::peft::{read_safetensors, write_atomic, write_safetensors, Tensor, TensorFile};
use crate::{Error, Result};

use super::adapters::{module_path, AdapterSet, AdapterSpec, Method};
use super::config::Gpt2Config;
use super::model::{transpose, Gpt2, Module, TrainBackend};

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
            let m = Module::parse(t)?;
            if !targets.contains(&m) {
                targets.push(m);
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
    let name = format!("step-{:08}", state.iteration);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
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
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    // Prune: keep the newest `keep` step directories.
    let mut steps: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .collect();
    steps.sort();
    for old in steps.iter().take(steps.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dst)
}

/// The checkpoint directory `root/latest` names.
pub fn latest_checkpoint(root: &Path) -> Result<PathBuf> {
    let latest = root.join("latest");
    let name = std::fs::read_to_string(&latest).map_err(|e| Error::io(&latest, e))?;
    let name = name.trim();
    if !name.starts_with("step-") || name.contains(['/', '\\']) {
        return Err(Error::format(&latest, format!("names `{name}`, not a step-<n> directory")));
    }
    Ok(root.join(name))
}

/// Reads a checkpoint's `state.json` and optimizer moments.
pub fn read_checkpoint(dir: &Path) -> Result<(CheckpointState, BTreeMap<String, Vec<f32>>)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let opt = read_safetensors(&dir.join("optimizer.safetensors"))?;
    let mut moments = BTreeMap::new();
    for (name, t) in opt.tensors {
        moments.insert(name.clone(), t.to_f32_vec(&name)?);
    }
    Ok((state, moments))
}
