//! Hugging Face PEFT adapter files: `adapter_model.safetensors` +
//! `adapter_config.json`, read and written. The safetensors container
//! itself is [`crate::tensor_file`]; its types and functions are
//! re-exported here because every adapter file is one.
//!
//! # Plain LoRA (PEFT-compatible)
//!
//! `peft_type: "LORA"`; per module `base_model.model.<module>.lora_A.weight`
//! (r×K) and `base_model.model.<module>.lora_B.weight` (N×r) (only keys under
//! `base_model.model.` are modules; a trainer may store anything else, e.g.
//! optimizer state, in [`Adapter::extra_tensors`]); config fields
//! `r`, `lora_alpha`, `use_rslora`, `target_modules`, `fan_in_fan_out`,
//! `rank_pattern`, `alpha_pattern` (regular expressions, first match wins,
//! as in PEFT: [`crate::adapter::Patterns`]), `base_model_name_or_path`.
//! Every other config field is kept verbatim ([`AdapterConfig::extra`]);
//! every tensor outside `base_model.model.` is kept in
//! [`Adapter::extra_tensors`]. A module's rank must be the one `r` and
//! `rank_pattern` give it. On writing, a module whose rank differs from `r`
//! gets a `rank_pattern` entry, and one whose scale differs from `α/r` an
//! `alpha_pattern` entry, so PEFT rebuilds exactly the same deltas.
//!
//! What PEFT can express but lorafuse does not model is refused by name,
//! never dropped: `modules_to_save`, `bias` other than `"none"`,
//! `trainable_token_indices`, DoRA, and any other tensor under
//! `base_model.model.`.
//!
//! # lorafuse's own kinds (same container, documented extras)
//!
//! - Tied-LoRA (`peft_type: "LORAFUSE_TIED_LORA"`) and VeRA
//!   (`"LORAFUSE_VERA"`): shared factors once per tie group as
//!   `base_model.lorafuse_tied.<group>.lora_A.weight` (r×K) and
//!   `….lora_B.weight` (N×r); per module `base_model.model.<module>.lorafuse_u`
//!   (r) and `….lorafuse_v` (N), each omitted when it is all ones (`None`);
//!   config `lorafuse_tie_groups: {module: group}` lists every module.
//! - Uni-LoRA (`"LORAFUSE_UNILORA"`): `θ_d` as `base_model.unilora_theta_d`
//!   (PEFT's name), config `lorafuse_unilora: {seed: "<u64 as a decimal
//!   string>", d, assignment: "hash"|"balanced"|"explicit", layout: {rows,
//!   dtype, segments: [{name, start, shape}]}}`; an explicit assignment adds
//!   `base_model.unilora_indices` (U32, length D).
//!
//! # Untrusted input
//!
//! Every file is hostile until checked: the config is capped at
//! [`MAX_CONFIG_BYTES`]; the weights go through the one hardened
//! safetensors reader ([`crate::tensor_file`]: header length checked against
//! the file's size, every offset and shape validated before any tensor is
//! converted); shapes, dtypes and finiteness are checked per tensor.
//! Everything wrong is an [`Error::Format`] (or `Invalid`/`Shape`/`NonFinite`)
//! naming the file and the tensor. Writes are atomic
//! ([`crate::atomic_file`]): an adapter directory is written as one rename
//! of a fresh directory where it can be.
//! Little-endian hosts only (as safetensors itself).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::adapter::{Adapter, AdapterConfig, AdapterKind, AdapterWeights, ModuleDelta, TargetModules, UniLoraWeights};
use crate::atomic_file::write_dir_atomic;
use crate::projection::{Assignment, Projection, ProjectionLayout};
use crate::tensor_file::{read_safetensors, safetensors_bytes, take_f32, Tensor, TensorData, TensorFile};
use crate::{DType, Error, Result};

/// The weights file inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The config file inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Largest `adapter_config.json` accepted (16 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
const MODEL_PREFIX: &str = "base_model.model.";
/// Config fields lorafuse adds for itself; for plain LoRA they are stored
/// in the weights file's `__metadata__` (PEFT ignores it).
const METADATA_PREFIX: &str = "lorafuse_";
const TIED_PREFIX: &str = "base_model.lorafuse_tied.";
const THETA_KEY: &str = "base_model.unilora_theta_d";
const INDEX_KEY: &str = "base_model.unilora_indices";

// ---- adapter_config.json ---------------------------------------------------

/// The fields lorafuse reads; everything else lands in `extra`.
#[derive(serde::Deserialize)]
struct ConfigJson {
    #[serde(default = "lora_type")]
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    target_modules: Option<TargetModules>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: Option<Ordered<usize>>,
    #[serde(default)]
    alpha_pattern: Option<Ordered<f64>>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lorafuse_tie_groups: Option<BTreeMap<String, String>>,
    #[serde(default)]
    lorafuse_unilora: Option<UniLoraJson>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

fn lora_type() -> String {
    "LORA".into()
}

/// A JSON object read in document order (PEFT's patterns are first-match),
/// refusing repeated keys (Python would keep the last value at the first
/// key's position: a file with duplicates is ambiguous, not hostile-proof).
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Ordered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of pattern keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom(format!("pattern key `{k}` appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// PEFT features that change what an adapter does but that lorafuse does not
/// model: refused by name so that no sum, merge or evaluation silently drops
/// them.
fn refuse_unmodelled(path: &Path, extra: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    let set = |k: &str| extra.get(k).filter(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()));
    if let Some(v) = set("modules_to_save") {
        return Err(Error::format(
            path,
            format!(
                "`modules_to_save: {v}` (fully trained extra modules) is not supported: lorafuse models only \
                 low-rank deltas; merge those modules with PEFT, or train without them"
            ),
        ));
    }
    if let Some(b) = extra.get("bias").and_then(|b| b.as_str()).filter(|b| *b != "none") {
        return Err(Error::format(
            path,
            format!("`bias: \"{b}\"` (trained biases) is not supported: lorafuse models only bias-free deltas (bias: \"none\")"),
        ));
    }
    for k in ["trainable_token_indices", "target_parameters", "layer_replication"] {
        if let Some(v) = set(k) {
            return Err(Error::format(
                path,
                format!("`{k}: {v}` is not supported by lorafuse (only low-rank deltas of linear modules)"),
            ));
        }
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct UniLoraJson {
    seed: String,
    d: u32,
    assignment: Assignment,
    layout: ProjectionLayout,
}

fn peft_type(kind: AdapterKind) -> &'static str {
    match kind {
        AdapterKind::Lora => "LORA",
        AdapterKind::TiedLora => "LORAFUSE_TIED_LORA",
        AdapterKind::Vera => "LORAFUSE_VERA",
        AdapterKind::UniLora => "LORAFUSE_UNILORA",
    }
}

fn read_config(path: &Path) -> Result<ConfigJson> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::format(path, format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("adapter config: {e}")))
}

// ---- loading ---------------------------------------------------------------

fn matrix_shape(path: &Path, key: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [rows, cols] if rows > 0 && cols > 0 => Ok((rows, cols)),
        _ => Err(Error::format(path, format!("tensor `{key}` has shape {shape:?}, expected a nonempty matrix"))),
    }
}

/// Loads an adapter directory (`adapter_config.json` +
/// `adapter_model.safetensors`) written by PEFT or by [`save_adapter`].
pub fn load_adapter(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let st_path = dir.join(WEIGHTS_FILE);
    let mut cfg = read_config(&cfg_path)?;
    if cfg.use_dora {
        return Err(Error::format(&cfg_path, "DoRA adapters (use_dora: true) are not supported"));
    }
    refuse_unmodelled(&cfg_path, &cfg.extra)?;
    let file = read_safetensors(&st_path)?;
    let mut tensors = file.tensors;
    // lorafuse's own metadata travels in the weights file, where PEFT
    // ignores it (see `save_adapter_as`).
    for (k, v) in file.metadata {
        if k.starts_with(METADATA_PREFIX) {
            let value = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
            cfg.extra.entry(k).or_insert(value);
        }
    }
    let kind = match cfg.peft_type.as_str() {
        "LORA" => AdapterKind::Lora,
        "LORAFUSE_TIED_LORA" => AdapterKind::TiedLora,
        "LORAFUSE_VERA" => AdapterKind::Vera,
        "LORAFUSE_UNILORA" => AdapterKind::UniLora,
        other => {
            return Err(Error::format(
                &cfg_path,
                format!(
                    "peft_type `{other}` is not supported (LORA, LORAFUSE_TIED_LORA, LORAFUSE_VERA, LORAFUSE_UNILORA)"
                ),
            ))
        }
    };
    let config = AdapterConfig {
        kind,
        r: cfg.r,
        lora_alpha: cfg.lora_alpha,
        use_rslora: cfg.use_rslora,
        target_modules: cfg.target_modules.unwrap_or_default(),
        fan_in_fan_out: cfg.fan_in_fan_out,
        rank_pattern: cfg.rank_pattern.map(|p| p.0).unwrap_or_default(),
        alpha_pattern: cfg.alpha_pattern.map(|p| p.0).unwrap_or_default(),
        base_model_name_or_path: cfg.base_model_name_or_path,
        extra: cfg.extra,
    };
    config.validate().map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    let weights = match kind {
        AdapterKind::Lora => AdapterWeights::Modules(load_lora(&st_path, &config, &mut tensors)?),
        AdapterKind::TiedLora | AdapterKind::Vera => {
            let groups = cfg
                .lorafuse_tie_groups
                .ok_or_else(|| Error::format(&cfg_path, "Tied-LoRA/VeRA config needs `lorafuse_tie_groups`"))?;
            AdapterWeights::Modules(load_tied(&st_path, &config, &groups, &mut tensors)?)
        }
        AdapterKind::UniLora => {
            let u = cfg
                .lorafuse_unilora
                .ok_or_else(|| Error::format(&cfg_path, "Uni-LoRA config needs `lorafuse_unilora`"))?;
            AdapterWeights::UniLora(load_unilora(&cfg_path, &st_path, u, &mut tensors)?)
        }
    };
    // Anything left under the module prefix changes the model in a way
    // lorafuse does not model (a `modules_to_save` copy, a bias, ...).
    if let Some(k) = tensors.keys().find(|k| k.starts_with(MODEL_PREFIX)) {
        return Err(Error::format(
            &st_path,
            format!(
                "tensor `{k}` is not a factor lorafuse models (only lora_A/lora_B pairs, and lorafuse_u/v for \
                 Tied-LoRA/VeRA): modules_to_save, biases and embedding adapters are not supported"
            ),
        ));
    }
    let adapter = Adapter { config, weights, extra_tensors: tensors };
    adapter.validate().map_err(|e| Error::format(dir, e.to_string()))?;
    Ok(adapter)
}

fn load_lora(path: &Path, config: &AdapterConfig, tensors: &mut BTreeMap<String, Tensor>) -> Result<Vec<ModuleDelta>> {
    // Only PEFT's `base_model.model.` keys are modules: anything else (a
    // trainer's optimizer state, say) stays in `extra_tensors` whatever its
    // suffix.
    let stem_of = |k: &str, suffix: &str| k.strip_prefix(MODEL_PREFIX).and_then(|m| m.strip_suffix(suffix)).is_some();
    let names: Vec<String> = tensors
        .keys()
        .filter(|k| stem_of(k, ".lora_A.weight"))
        .filter_map(|k| k.strip_suffix(".lora_A.weight"))
        .map(|m| m.to_string())
        .collect();
    if let Some(k) = tensors.keys().find(|k| {
        stem_of(k, ".lora_B.weight")
            && k.strip_suffix(".lora_B.weight").is_some_and(|m| !tensors.contains_key(&format!("{m}.lora_A.weight")))
    }) {
        return Err(Error::format(path, format!("tensor `{k}` has no matching lora_A")));
    }
    let mut modules = Vec::with_capacity(names.len());
    for stem in names {
        let (key_a, key_b) = (format!("{stem}.lora_A.weight"), format!("{stem}.lora_B.weight"));
        let shape_a = tensors.get(&key_a).map(|t| t.shape.clone()).unwrap_or_default();
        let (r, k) = matrix_shape(path, &key_a, &shape_a)?;
        let shape_b = tensors
            .get(&key_b)
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::format(path, format!("tensor `{key_b}` is missing")))?;
        let (n, rb) = matrix_shape(path, &key_b, &shape_b)?;
        if rb != r {
            return Err(Error::format(path, format!("`{key_a}` is {r}x{k} but `{key_b}` is {n}x{rb}: ranks differ")));
        }
        let (_, a) = take_f32(path, tensors, &key_a, None)?;
        let (_, b) = take_f32(path, tensors, &key_b, None)?;
        let name = stem[MODEL_PREFIX.len()..].to_string();
        check_rank(path, config, &name, r)?;
        let scale = config.scale_for(&name, r);
        modules.push(ModuleDelta::lora(name, (r, k, n), a, b, scale)?);
    }
    if modules.is_empty() {
        return Err(Error::format(path, "no `base_model.model.…lora_A.weight` tensors: not a LoRA adapter"));
    }
    Ok(modules)
}

/// The rank the config gives `module` (`r`, or its `rank_pattern` entry)
/// must be the tensors' rank: a config and weights from different writes
/// would otherwise load as a different adapter.
fn check_rank(path: &Path, config: &AdapterConfig, module: &str, rank: usize) -> Result<()> {
    let want = config.rank_for(module);
    if want == rank {
        return Ok(());
    }
    Err(Error::format(
        path,
        format!(
            "module `{module}` has rank {rank} but {CONFIG_FILE} gives it r = {want} (from `r` or `rank_pattern`): \
             the config and the weights do not belong together; rewrite the adapter from its source"
        ),
    ))
}

/// A tie group's (r, K, N, A, B), loaded once and shared by its modules.
type SharedFactors = (usize, usize, usize, Arc<[f32]>, Arc<[f32]>);

fn load_tied(
    path: &Path,
    config: &AdapterConfig,
    groups: &BTreeMap<String, String>,
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<Vec<ModuleDelta>> {
    let mut shared: BTreeMap<&str, SharedFactors> = BTreeMap::new();
    let mut modules = Vec::with_capacity(groups.len());
    for (module, group) in groups {
        if !shared.contains_key(group.as_str()) {
            let key_a = format!("{TIED_PREFIX}{group}.lora_A.weight");
            let key_b = format!("{TIED_PREFIX}{group}.lora_B.weight");
            let (shape_a, a) = take_f32(path, tensors, &key_a, None)?;
            let (shape_b, b) = take_f32(path, tensors, &key_b, None)?;
            let (r, k) = matrix_shape(path, &key_a, &shape_a)?;
            let (n, rb) = matrix_shape(path, &key_b, &shape_b)?;
            if rb != r {
                return Err(Error::format(path, format!("tie group `{group}`: A is {r}x{k}, B is {n}x{rb}")));
            }
            shared.insert(group, (r, k, n, a.into(), b.into()));
        }
        let (r, k, n, a, b) = shared[group.as_str()].clone();
        let mut vector = |suffix: &str, len: usize| -> Result<Option<Vec<f32>>> {
            let key = format!("{MODEL_PREFIX}{module}.{suffix}");
            if tensors.contains_key(&key) {
                Ok(Some(take_f32(path, tensors, &key, Some(&[len]))?.1))
            } else {
                Ok(None)
            }
        };
        check_rank(path, config, module, r)?;
        let u = vector("lorafuse_u", r)?;
        let v = vector("lorafuse_v", n)?;
        let scale = config.scale_for(module, r);
        modules.push(ModuleDelta::tied(module.clone(), group.clone(), (r, k, n), a, b, u, v, scale)?);
    }
    if modules.is_empty() {
        return Err(Error::format(path, "`lorafuse_tie_groups` lists no modules"));
    }
    Ok(modules)
}

fn load_unilora(
    cfg_path: &Path,
    path: &Path,
    u: UniLoraJson,
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<UniLoraWeights> {
    let bad = |why: String| Error::format(cfg_path, why);
    let seed: u64 = u.seed.parse().map_err(|_| bad(format!("lorafuse_unilora.seed `{}` is not a u64", u.seed)))?;
    // Re-validate the layout: deserialisation bypasses ProjectionLayout::new,
    // and a hostile shape could overflow the element count.
    for s in u.layout.segments() {
        let elems =
            s.shape[0].checked_mul(s.shape[1]).filter(|&e| e as u64 <= crate::adapter::MAX_MATERIALIZED_ELEMENTS);
        if elems.is_none() {
            return Err(bad(format!("layout segment `{}` has absurd shape {:?}", s.name, s.shape)));
        }
    }
    if u.layout.rows() > crate::adapter::MAX_MATERIALIZED_ELEMENTS {
        return Err(bad(format!("layout D = {} is above the cap", u.layout.rows())));
    }
    let layout = ProjectionLayout::new(u.layout.rows(), u.layout.dtype(), u.layout.segments().to_vec())
        .map_err(|e| bad(e.to_string()))?;
    let projection = match u.assignment {
        Assignment::Explicit => {
            let t =
                tensors.remove(INDEX_KEY).ok_or_else(|| Error::format(path, format!("`{INDEX_KEY}` is missing")))?;
            let TensorData::U32(index) = t.data else {
                return Err(Error::format(path, format!("`{INDEX_KEY}` must be U32")));
            };
            if t.shape != [layout.rows() as usize] {
                return Err(Error::format(path, format!("`{INDEX_KEY}` has shape {:?}, expected [D]", t.shape)));
            }
            Projection::explicit(index, u.d)
        }
        a => Projection::new(layout.rows(), u.d, seed, a),
    }
    .map_err(|e| bad(e.to_string()))?;
    let (_, theta) = take_f32(path, tensors, THETA_KEY, Some(&[u.d as usize]))?;
    UniLoraWeights::new(theta, projection, layout).map_err(|e| bad(e.to_string()))
}

// ---- saving ----------------------------------------------------------------

/// Saves `adapter` into `dir` (created if needed) as f32.
pub fn save_adapter(dir: &Path, adapter: &Adapter) -> Result<()> {
    save_adapter_as(dir, adapter, DType::F32)
}

/// Saves `adapter` into `dir` with floats stored as `dtype`, in one atomic
/// step where the file system allows: both files are written into a fresh
/// sibling directory that is renamed into place, so a crash (or a second
/// writer) never leaves weights and a config from different writes. When
/// `dir` already holds other files (a training run's metrics, say) it
/// cannot be swapped whole; then each file is replaced atomically, the
/// weights first and the config last, and [`load_adapter`] refuses a pair
/// whose ranks disagree.
///
/// `rank_pattern`/`alpha_pattern` are written resolved: one key per module
/// whose rank or scale differs from `r` and `α/r`, the full module path with
/// its dots escaped, so the keys are disjoint and PEFT's first-match rule
/// cannot pick another entry. lorafuse's own config fields (`lorafuse_*`)
/// of a plain LoRA adapter go into the weights file's metadata, which PEFT
/// ignores, so PEFT loads the config without warnings.
pub fn save_adapter_as(dir: &Path, adapter: &Adapter, dtype: DType) -> Result<()> {
    adapter.validate()?;
    let cfg = &adapter.config;
    let mut tensors = adapter.extra_tensors.clone();
    let mut json = serde_json::Map::new();
    let mut metadata = BTreeMap::new();
    for (k, v) in &cfg.extra {
        if cfg.kind == AdapterKind::Lora && k.starts_with(METADATA_PREFIX) {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            metadata.insert(k.clone(), text);
        } else {
            json.insert(k.clone(), v.clone());
        }
    }
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut put = |key: String, shape: Vec<usize>, values: &[f32]| -> Result<()> {
        let t = Tensor::from_f32(shape, values, dtype)?;
        // f16 overflows at 65504: refuse to write an inf the reader would reject.
        if dtype != DType::F32 {
            crate::error::check_finite(&format!("`{key}` rounded to {dtype}"), &t.to_f32_vec(&key)?)?;
        }
        tensors.insert(key, t);
        Ok(())
    };
    match &adapter.weights {
        AdapterWeights::Modules(modules) => {
            let mut groups = BTreeMap::new();
            for m in modules {
                // Make PEFT's rank/α rules reproduce this module's r and s.
                let key = regex::escape(&m.name);
                if m.rank != cfg.r {
                    rank_pattern.insert(key.clone(), m.rank.into());
                }
                let root = if cfg.use_rslora { (m.rank as f64).sqrt() } else { m.rank as f64 };
                if !same(cfg.lora_alpha / root, m.scale) {
                    alpha_pattern.insert(key, (m.scale * root).into());
                }
                let (r, k, n) = (m.rank, m.in_features, m.out_features);
                match &m.tie {
                    None => {
                        put(format!("{MODEL_PREFIX}{}.lora_A.weight", m.name), vec![r, k], &m.a)?;
                        put(format!("{MODEL_PREFIX}{}.lora_B.weight", m.name), vec![n, r], &m.b)?;
                    }
                    Some(g) => {
                        groups.insert(m.name.clone(), g.clone());
                        put(format!("{TIED_PREFIX}{g}.lora_A.weight"), vec![r, k], &m.a)?;
                        put(format!("{TIED_PREFIX}{g}.lora_B.weight"), vec![n, r], &m.b)?;
                        if let Some(u) = &m.u {
                            put(format!("{MODEL_PREFIX}{}.lorafuse_u", m.name), vec![r], u)?;
                        }
                        if let Some(v) = &m.v {
                            put(format!("{MODEL_PREFIX}{}.lorafuse_v", m.name), vec![n], v)?;
                        }
                    }
                }
            }
            if !groups.is_empty() {
                json.insert("lorafuse_tie_groups".into(), serde_json::to_value(groups).map_err(json_err)?);
            }
        }
        AdapterWeights::UniLora(w) => {
            // θ stays f32 whatever `dtype`: it is the whole adapter.
            tensors.insert(THETA_KEY.into(), Tensor::f32(vec![w.theta.len()], w.theta.clone())?);
            if let Some(ix) = w.projection.index() {
                tensors.insert(INDEX_KEY.into(), Tensor::new(vec![ix.len()], TensorData::U32(ix.to_vec()))?);
            }
            let u = UniLoraJson {
                seed: w.projection.seed().to_string(),
                d: w.projection.cols(),
                assignment: w.projection.assignment(),
                layout: w.layout.clone(),
            };
            json.insert("lorafuse_unilora".into(), serde_json::to_value(u).map_err(json_err)?);
        }
    }
    json.insert("peft_type".into(), peft_type(cfg.kind).into());
    json.insert("r".into(), cfg.r.into());
    json.insert("lora_alpha".into(), cfg.lora_alpha.into());
    json.insert("use_rslora".into(), cfg.use_rslora.into());
    json.insert("target_modules".into(), serde_json::to_value(&cfg.target_modules).map_err(json_err)?);
    json.insert("fan_in_fan_out".into(), cfg.fan_in_fan_out.into());
    json.insert("rank_pattern".into(), serde_json::Value::Object(rank_pattern));
    json.insert("alpha_pattern".into(), serde_json::Value::Object(alpha_pattern));
    json.insert("base_model_name_or_path".into(), cfg.base_model_name_or_path.clone().into());
    let weights = safetensors_bytes(&TensorFile { tensors, metadata })?;
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json)).map_err(json_err)?;
    write_dir_atomic(dir, &[(WEIGHTS_FILE, &weights), (CONFIG_FILE, text.as_bytes())])
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

fn json_err(e: serde_json::Error) -> Error {
    Error::invalid("adapter config", e.to_string())
}
