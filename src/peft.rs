//! Hugging Face PEFT adapter files: `adapter_model.safetensors` +
//! `adapter_config.json`, read and written, plus the safetensors helpers the
//! trainer and the CLI share.
//!
//! # Plain LoRA (PEFT-compatible)
//!
//! `peft_type: "LORA"`; per module `base_model.model.<module>.lora_A.weight`
//! (r×K) and `base_model.model.<module>.lora_B.weight` (N×r) (only keys under
//! `base_model.model.` are modules; a trainer may store anything else, e.g.
//! optimizer state, in [`Adapter::extra_tensors`]); config fields
//! `r`, `lora_alpha`, `use_rslora`, `target_modules`, `fan_in_fan_out`,
//! `rank_pattern`, `alpha_pattern`, `base_model_name_or_path`. Every other
//! config field is kept verbatim ([`AdapterConfig::extra`]); every other
//! tensor is kept in [`Adapter::extra_tensors`]. A module whose rank differs
//! from `r` gets a `rank_pattern` entry, and one whose scale differs from
//! `α/r` an `alpha_pattern` entry, so PEFT rebuilds exactly the same deltas.
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
//! [`MAX_CONFIG_BYTES`]; the safetensors header length is checked against
//! the file's size before the rest is read, and the crate validates every
//! offset and shape against the data before any tensor is converted; shapes,
//! dtypes and finiteness are checked per tensor. Everything wrong is an
//! [`Error::Format`] (or `Invalid`/`Shape`/`NonFinite`) naming the file and
//! the tensor. Writes go to a temporary file in the same directory, then a
//! rename, so a crash never leaves a half-written adapter under the real name.
//! Little-endian hosts only (as safetensors itself).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::adapter::{Adapter, AdapterConfig, AdapterKind, AdapterWeights, ModuleDelta, TargetModules, UniLoraWeights};
use crate::projection::{Assignment, Projection, ProjectionLayout};
use crate::{DType, Element, Error, Result};

/// The weights file inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The config file inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Largest `adapter_config.json` accepted (16 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest safetensors header accepted (the safetensors crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

const MODEL_PREFIX: &str = "base_model.model.";
const TIED_PREFIX: &str = "base_model.lorafuse_tied.";
const THETA_KEY: &str = "base_model.unilora_theta_d";
const INDEX_KEY: &str = "base_model.unilora_indices";

/// The elements of one tensor, typed.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// IEEE half floats.
    F16(Vec<f16>),
    /// bfloat16.
    BF16(Vec<bf16>),
    /// 32-bit unsigned integers (index arrays).
    U32(Vec<u32>),
    /// Any other safetensors dtype, kept as raw little-endian bytes.
    Raw(Dtype, Vec<u8>),
}

/// A named tensor's shape and elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: TensorData,
}

impl Tensor {
    /// An f32 tensor; checks the element count against the shape.
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        Tensor::new(shape, TensorData::F32(values))
    }

    /// A tensor of `values` rounded to `dtype`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32], dtype: DType) -> Result<Self> {
        let data = match dtype {
            DType::F32 => TensorData::F32(values.to_vec()),
            DType::F16 => TensorData::F16(crate::dtype::convert(values)),
            DType::BF16 => TensorData::BF16(crate::dtype::convert(values)),
        };
        Tensor::new(shape, data)
    }

    /// Checks that the shape's element count equals the data's.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let t = Tensor { shape, data };
        let want = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let got = t.len();
        if want != Some(got) && !matches!(t.data, TensorData::Raw(..)) {
            return Err(Error::shape("tensor", "data", format!("{:?}", t.shape), format!("{got} elements")));
        }
        Ok(t)
    }

    /// Number of elements (bytes for raw data).
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::Raw(_, v) => v.len(),
        }
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float dtype, or `None` for integer/raw data.
    pub fn dtype(&self) -> Option<DType> {
        match &self.data {
            TensorData::F32(_) => Some(DType::F32),
            TensorData::F16(_) => Some(DType::F16),
            TensorData::BF16(_) => Some(DType::BF16),
            _ => None,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors_dtype(&self) -> Dtype {
        match &self.data {
            TensorData::F32(_) => Dtype::F32,
            TensorData::F16(_) => Dtype::F16,
            TensorData::BF16(_) => Dtype::BF16,
            TensorData::U32(_) => Dtype::U32,
            TensorData::Raw(d, _) => *d,
        }
    }

    /// The little-endian bytes as stored.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
            TensorData::U32(v) => bytemuck::cast_slice(v),
            TensorData::Raw(_, v) => v,
        }
    }

    /// The elements widened to f32; an error naming `what` for non-float data.
    pub fn to_f32_vec(&self, what: &str) -> Result<Vec<f32>> {
        match &self.data {
            TensorData::F32(v) => Ok(v.clone()),
            TensorData::F16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            TensorData::BF16(v) => Ok(v.iter().map(|x| Element::to_f32(*x)).collect()),
            _ => Err(Error::invalid(
                what.to_string(),
                format!("is {:?}; expected F32, F16 or BF16", self.safetensors_dtype()),
            )),
        }
    }
}

/// A safetensors file's tensors (by name) and its `__metadata__` strings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    /// The tensors, in name order.
    pub tensors: BTreeMap<String, Tensor>,
    /// The header's free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Copies little-endian bytes into a typed vector. Copying (not casting)
/// makes the unaligned offsets safetensors allows harmless; the length was
/// validated against the dtype by the safetensors crate.
fn collect<T: bytemuck::Pod + Default>(bytes: &[u8]) -> Vec<T> {
    let mut out = vec![T::default(); bytes.len() / std::mem::size_of::<T>()];
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
    dst.copy_from_slice(&bytes[..dst.len()]);
    out
}

fn decode(dtype: Dtype, bytes: &[u8]) -> TensorData {
    match dtype {
        Dtype::F32 => TensorData::F32(collect(bytes)),
        Dtype::F16 => TensorData::F16(collect(bytes)),
        Dtype::BF16 => TensorData::BF16(collect(bytes)),
        Dtype::U32 => TensorData::U32(collect(bytes)),
        other => TensorData::Raw(other, bytes.to_vec()),
    }
}

/// Parses a safetensors image already in memory. `path` only names the
/// source in errors.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::format(path, format!("safetensors: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::format(path, format!("safetensors: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let t = Tensor { shape: view.shape().to_vec(), data: decode(view.dtype(), view.data()) };
        tensors.insert(name.to_string(), t);
    }
    Ok(TensorFile { tensors, metadata })
}

/// Reads and validates a safetensors file. The header length is checked
/// against the file size before anything else is read, so a hostile length
/// cannot trigger a large allocation; the whole file is then read once.
pub fn read_safetensors(path: &Path) -> Result<TensorFile> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 8];
    if size < 8 {
        return Err(Error::format(path, format!("{size} bytes: too short for a safetensors header (truncated?)")));
    }
    file.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(head);
    if n > MAX_HEADER_BYTES || n > size - 8 {
        return Err(Error::format(
            path,
            format!("header claims {n} bytes but the file has {} after the length (truncated or corrupt)", size - 8),
        ));
    }
    let len = usize::try_from(size).map_err(|_| Error::format(path, "file too large for this platform"))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| Error::format(path, format!("cannot allocate {len} bytes")))?;
    bytes.extend_from_slice(&head);
    file.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    parse_safetensors(path, &bytes)
}

/// Writes `file` as safetensors, atomically (temporary file, then rename).
pub fn write_safetensors(path: &Path, file: &TensorFile) -> Result<()> {
    let views = file
        .tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(t.safetensors_dtype(), t.shape.clone(), t.bytes())
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor `{name}`"), format!("cannot be written: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: Option<HashMap<String, String>> =
        (!file.metadata.is_empty()).then(|| file.metadata.clone().into_iter().collect());
    let bytes = safetensors::serialize(views, meta).map_err(|e| Error::invalid("safetensors", e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary sibling file that is synced
/// and renamed over `path`: readers see the old file or the new one, never a
/// torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?;
    // Unique per process and call, so concurrent saves never share a temp.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}.{call}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

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
    rank_pattern: Option<BTreeMap<String, usize>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, f64>>,
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

/// Takes tensor `key` out of `tensors` as f32 with shape `shape`.
fn take_f32(
    path: &Path,
    tensors: &mut BTreeMap<String, Tensor>,
    key: &str,
    shape: Option<&[usize]>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = tensors.remove(key).ok_or_else(|| Error::format(path, format!("tensor `{key}` is missing")))?;
    if let Some(s) = shape {
        if t.shape != s {
            return Err(Error::format(path, format!("tensor `{key}` has shape {:?}, expected {s:?}", t.shape)));
        }
    }
    let v = t.to_f32_vec(key).map_err(|e| Error::format(path, e.to_string()))?;
    crate::error::check_finite(key, &v)?;
    Ok((t.shape, v))
}

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
    let cfg = read_config(&cfg_path)?;
    let mut tensors = read_safetensors(&st_path)?.tensors;
    if cfg.use_dora {
        return Err(Error::format(&cfg_path, "DoRA adapters (use_dora: true) are not supported"));
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
        rank_pattern: cfg.rank_pattern.unwrap_or_default(),
        alpha_pattern: cfg.alpha_pattern.unwrap_or_default(),
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
        let scale = config.scale_for(&name, r);
        modules.push(ModuleDelta::lora(name, (r, k, n), a, b, scale)?);
    }
    if modules.is_empty() {
        return Err(Error::format(path, "no `base_model.model.…lora_A.weight` tensors: not a LoRA adapter"));
    }
    Ok(modules)
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

/// Saves `adapter` into `dir` (created if needed) with floats stored as
/// `dtype`. The weights file is written first and the config last, each
/// atomically, so a complete config means complete weights.
pub fn save_adapter_as(dir: &Path, adapter: &Adapter, dtype: DType) -> Result<()> {
    adapter.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = &adapter.config;
    let mut tensors = adapter.extra_tensors.clone();
    let mut json = serde_json::Map::new();
    for (k, v) in &cfg.extra {
        json.insert(k.clone(), v.clone());
    }
    let mut rank_pattern = cfg.rank_pattern.clone();
    let mut alpha_pattern = cfg.alpha_pattern.clone();
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
                if cfg.rank_for(&m.name) != m.rank {
                    rank_pattern.insert(m.name.clone(), m.rank);
                }
                if !same(cfg.scale_for(&m.name, m.rank), m.scale) {
                    let root = if cfg.use_rslora { (m.rank as f64).sqrt() } else { m.rank as f64 };
                    alpha_pattern.insert(m.name.clone(), m.scale * root);
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
    json.insert("rank_pattern".into(), serde_json::to_value(rank_pattern).map_err(json_err)?);
    json.insert("alpha_pattern".into(), serde_json::to_value(alpha_pattern).map_err(json_err)?);
    json.insert("base_model_name_or_path".into(), cfg.base_model_name_or_path.clone().into());
    write_safetensors(&dir.join(WEIGHTS_FILE), &TensorFile { tensors, metadata: BTreeMap::new() })?;
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json)).map_err(json_err)?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

fn json_err(e: serde_json::Error) -> Error {
    Error::invalid("adapter config", e.to_string())
}
