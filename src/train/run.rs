//! What a training run records beside its checkpoints, and the checks that
//! keep a resumed or adapter-initialised run the run it claims to be.
//!
//! A checkpoint directory holds, besides the `step-<n>` checkpoints (whose
//! `state.json` carries the [`TrainConfig`]), the run's [`RunSources`]:
//! where its model and data came from. Resuming continues exactly that run:
//! [`check_resume_settings`] refuses, by name, any setting given again
//! that differs from the checkpoint's (only the number of steps may
//! change). [`init_from_adapter`] starts a run from a saved adapter only if
//! that adapter has the run's kind, rank, α and target modules.

use std::path::Path;

use super::adapters::AdapterSpec;
use super::checkpoint::spec_for;
use super::module::Module;
use super::trainer::{TrainConfig, Trainer};
use super::TrainBackend;
use crate::adapter::Adapter;
use crate::{Error, Result};

/// The file in a checkpoint directory that holds the [`RunSources`].
pub const RUN_FILE: &str = "run.json";

/// Where a run's model and data came from, as specs
/// ([`super::spec::ModelSpec`], [`super::spec::DataSpec`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunSources {
    /// The model spec.
    pub model: String,
    /// The data spec.
    pub data: String,
}

impl RunSources {
    /// The sources recorded in checkpoint directory `dir`; `None` when it
    /// has none (a directory written before sources were recorded).
    pub fn read(dir: &Path) -> Result<Option<RunSources>> {
        let path = dir.join(RUN_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| Error::format(&path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Refuses a model or data spec given for a resumed run that is not the
    /// recorded one (specs compare as written).
    pub fn check_given(&self, model: Option<&str>, data: Option<&str>) -> Result<()> {
        for (what, given, saved) in [("model", model, &self.model), ("data", data, &self.data)] {
            if let Some(given) = given {
                same_as_checkpoint(what, &given.into(), &saved.as_str().into())?;
            }
        }
        Ok(())
    }

    /// Records the sources in checkpoint directory `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::invalid(RUN_FILE, e.to_string()))?;
        crate::atomic_file::write_atomic(&dir.join(RUN_FILE), text.as_bytes())
    }
}

/// Compares a value given for this invocation with the checkpoint's and
/// refuses a difference by name: a resumed run continues the checkpoint's
/// run, it cannot silently become another one. Numbers compare to f32
/// precision (f32 fields such as α round-trip through JSON that way).
pub fn same_as_checkpoint(what: &str, given: &serde_json::Value, saved: &serde_json::Value) -> Result<()> {
    let equal = match (given.as_f64(), saved.as_f64()) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs()),
        _ => given == saved,
    };
    if equal {
        return Ok(());
    }
    Err(Error::invalid(
        "--resume",
        format!(
            "`{what}` is {given} here but the checkpoint's run has {saved}: drop it (only --steps may change on \
             resume), or start a new run in an empty --checkpoint-dir"
        ),
    ))
}

/// Checks every explicitly given setting — `(path, value)` with `path` a
/// dotted path into [`TrainConfig`]'s JSON form such as `optim.lr` — against
/// the checkpoint's config `saved`. `steps` may differ (a resumed run may
/// be made longer or shorter); paths the config does not have are ignored
/// (the run file's own keys).
pub fn check_resume_settings(saved: &TrainConfig, explicit: &[(String, serde_json::Value)]) -> Result<()> {
    let saved_json = serde_json::to_value(saved).map_err(|e| Error::invalid("train config", e.to_string()))?;
    for (path, given) in explicit.iter().filter(|(p, _)| p != "steps") {
        if let Some(saved_value) = path.split('.').try_fold(&saved_json, |v, k| v.get(k)) {
            same_as_checkpoint(path, given, saved_value)?;
        }
    }
    Ok(())
}

/// Refuses to start run `ours` from `adapter` (named `what` in errors)
/// unless it describes the same adapter: rank, α and target modules, and
/// none of PEFT's per-module overrides (a silent mismatch would train
/// something else than asked). The adapter's values must still load into
/// the run's parameters, which checks their kind and shapes.
pub fn check_adapter_matches(ours: &AdapterSpec, adapter: &Adapter, what: &str) -> Result<()> {
    let theirs = spec_for(adapter)?;
    if theirs.rank != ours.rank || theirs.alpha != ours.alpha {
        return Err(Error::invalid(
            what,
            format!(
                "has r = {}, alpha = {} but the run has r = {}, alpha = {}: pass --rank/--alpha to match",
                theirs.rank, theirs.alpha, ours.rank, ours.alpha
            ),
        ));
    }
    let mut want = ours.targets.clone();
    want.sort();
    if theirs.targets != want {
        let names = |m: &[Module]| m.iter().map(|m| m.name()).collect::<Vec<_>>().join(",");
        return Err(Error::invalid(
            what,
            format!("adapts {} but the run adapts {}: pass --targets to match", names(&theirs.targets), names(&want)),
        ));
    }
    if adapter.config.use_rslora || !adapter.config.alpha_pattern.is_empty() || !adapter.config.rank_pattern.is_empty()
    {
        return Err(Error::invalid(what, "rsLoRA, rank_pattern and alpha_pattern adapters cannot start a run"));
    }
    Ok(())
}

/// Replaces the fresh adapter of `t` by `adapter` (named `what` in errors),
/// after [`check_adapter_matches`].
pub fn init_from_adapter<B: TrainBackend>(t: &mut Trainer<B>, adapter: &Adapter, what: &str) -> Result<()> {
    let set = t.adapters.as_mut().ok_or_else(|| {
        Error::invalid(what, "full fine-tuning has no adapter to start from; pick an adapter --method")
    })?;
    check_adapter_matches(&set.spec, adapter, what)?;
    set.load_values(&t.backend, adapter)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::adapter::{AdapterConfig, ModuleDelta};

    /// A rank-`r` LoRA adapter on `targets` of layer 0 (PEFT's GPT-2 names).
    fn lora(targets: &[&str], r: usize, alpha: f64) -> Adapter {
        let deltas = targets
            .iter()
            .map(|t| {
                ModuleDelta::lora(
                    format!("transformer.h.0.{t}"),
                    (r, 8, 8),
                    vec![0.5; r * 8],
                    vec![0.5; 8 * r],
                    alpha / r as f64,
                )
            })
            .collect::<Result<Vec<_>>>()
            .unwrap();
        let names = targets.iter().map(|t| t.rsplit('.').next().unwrap().to_string()).collect();
        Adapter::new(AdapterConfig::lora(r, alpha, names), deltas).unwrap()
    }

    #[test]
    fn an_adapter_starts_a_run_only_with_the_runs_rank_alpha_and_targets() {
        let a = lora(&["attn.c_attn", "mlp.c_fc"], 2, 4.0);
        let ours = spec_for(&a).unwrap();
        check_adapter_matches(&ours, &a, "init").unwrap();
        let mut reordered = ours.clone();
        reordered.targets.reverse();
        check_adapter_matches(&reordered, &a, "init").unwrap();
        let refused = |spec: &AdapterSpec, adapter: &Adapter, says: &str| {
            let e = check_adapter_matches(spec, adapter, "init").unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        };
        refused(&AdapterSpec { rank: 3, ..ours.clone() }, &a, "pass --rank/--alpha");
        refused(&AdapterSpec { alpha: 8.0, ..ours.clone() }, &a, "pass --rank/--alpha");
        refused(&AdapterSpec { targets: ours.targets[..1].to_vec(), ..ours.clone() }, &a, "pass --targets");
        let mut rslora = a.clone();
        rslora.config.use_rslora = true;
        refused(&ours, &rslora, "cannot start a run");
    }

    #[test]
    fn adapter_parameters_count_shared_factors_once() {
        assert_eq!(lora(&["attn.c_attn", "mlp.c_fc"], 2, 4.0).num_params(), 2 * (2 * 8 + 8 * 2));
        let (r, k, n) = (3, 5, 7);
        let (a, b): (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>) = (vec![0.1; r * k].into(), vec![0.1; n * r].into());
        let tied = |i: usize, v: Option<Vec<f32>>| {
            let name = format!("transformer.h.{i}.attn.c_attn");
            ModuleDelta::tied(name, "t", (r, k, n), a.clone(), b.clone(), Some(vec![1.0; r]), v, 1.0).unwrap()
        };
        let mut config = AdapterConfig::lora(r, 1.0, vec!["c_attn".into()]);
        config.kind = crate::adapter::AdapterKind::TiedLora;
        let adapter = Adapter::new(config, vec![tied(0, Some(vec![1.0; n])), tied(1, None)]).unwrap();
        // A and B once, u in both modules, v in the first.
        assert_eq!(adapter.num_params(), r * k + n * r + 2 * r + n);
    }

    #[test]
    fn resume_refuses_changed_settings_by_name_but_not_the_step_count() {
        let saved = TrainConfig::default();
        let same = [
            ("steps".to_string(), json!(saved.steps + 100)),
            ("rank".to_string(), json!(saved.rank)),
            // α is an f32: given as the f64 a flag parses, it still matches.
            ("alpha".to_string(), json!(saved.alpha as f64)),
            ("optim.lr".to_string(), json!(saved.optim.lr)),
            ("out".to_string(), json!("elsewhere")),
        ];
        check_resume_settings(&saved, &same).unwrap();
        for (path, value) in [("alpha", json!(saved.alpha as f64 + 0.1)), ("optim.lr", json!(saved.optim.lr * 2.0))] {
            let e = check_resume_settings(&saved, &[(path.to_string(), value)]).unwrap_err().to_string();
            assert!(e.contains(&format!("`{path}` is")) && e.contains("only --steps may change"), "{e}");
        }
    }

    #[test]
    fn run_sources_round_trip_and_a_directory_without_them_has_none() {
        let dir = std::env::temp_dir().join(format!("lorafuse-run-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let before = RunSources::read(&dir);
        let sources = RunSources { model: "random:1,16,2".into(), data: "embedded:sort".into() };
        sources.write(&dir).unwrap();
        let after = RunSources::read(&dir);
        std::fs::write(dir.join(RUN_FILE), "{").unwrap();
        let corrupt = RunSources::read(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(before.unwrap(), None);
        assert_eq!(after.unwrap(), Some(sources.clone()));
        sources.check_given(Some("random:1,16,2"), None).unwrap();
        let e = sources.check_given(None, Some("embedded:add")).unwrap_err().to_string();
        assert!(e.contains("`data` is \"embedded:add\""), "{e}");
        assert!(corrupt.unwrap_err().to_string().contains(RUN_FILE));
    }
}
