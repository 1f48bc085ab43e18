//! The safetensors container: named, typed tensors and one hardened reader
//! and writer for every file lorafuse touches (adapter weights, model
//! weights, optimizer state, base weights to merge into).
//!
//! # Untrusted input
//! Every file is hostile until checked. [`read_safetensors`] checks the
//! header length against the file's size (and [`MAX_HEADER_BYTES`]) before
//! it reads the rest, so a lying length cannot trigger a large allocation;
//! the `safetensors` crate then validates every offset, dtype size and
//! shape against the data before any tensor is decoded. Decoding copies the
//! little-endian bytes into typed vectors, so the unaligned offsets the
//! format allows are harmless. [`take_f32`] is how a reader takes a float
//! tensor out: it checks presence, shape, dtype and finiteness and names
//! the file and the tensor in its error. Everything wrong is an
//! [`Error::Format`] (or `Shape`/`NonFinite`).
//!
//! Writes go through [`crate::atomic_file::write_atomic`]: a crash never
//! leaves a half-written file under the real name. Little-endian hosts only
//! (as safetensors itself).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::atomic_file::write_atomic;
use crate::{DType, Element, Error, Result};

/// Largest safetensors header accepted (the safetensors crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

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

    /// [`Tensor::to_f32_vec`], moving F32 data instead of copying it.
    pub fn into_f32_vec(self, what: &str) -> Result<Vec<f32>> {
        match self.data {
            TensorData::F32(v) => Ok(v),
            _ => self.to_f32_vec(what),
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
    write_atomic(path, &safetensors_bytes(file)?)
}

/// `file` serialised as a safetensors image.
pub fn safetensors_bytes(file: &TensorFile) -> Result<Vec<u8>> {
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
    safetensors::serialize(views, meta).map_err(|e| Error::invalid("safetensors", e.to_string()))
}

/// Takes tensor `key` out of `tensors` as f32, checking its shape (when
/// `shape` is given), its dtype (F32, F16 or BF16) and that every element
/// is finite; errors name `path` and `key`. F32 data is moved, not copied.
pub fn take_f32(
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
    let shape = t.shape.clone();
    let v = t.into_f32_vec(key).map_err(|e| Error::format(path, e.to_string()))?;
    crate::error::check_finite(&format!("{}: tensor `{key}`", path.display()), &v)?;
    Ok((shape, v))
}
