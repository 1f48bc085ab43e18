//! Summing adapters (Cao, Truong & Lizarraga, 2025): exact sums, merging
//! into base weights and back, the interference diagnostic, and
//! recompression to a lower rank.
//!
//! Every delta is first folded into one plain pair
//! ([`ModuleDelta::effective_factors`]): `wᵢ·ΔWᵢ = B'ᵢ·Aᵢ` with
//! `B'ᵢ = wᵢ·sᵢ·diag(vᵢ)·Bᵢ·diag(uᵢ)`, which covers LoRA, Tied-LoRA, VeRA and
//! (materialised) Uni-LoRA alike. Then, per module:
//!
//! - **exact sum** ([`concat_sum`]): `B_cat = [B'₁ | B'₂ | …]` (N×R),
//!   `A_cat = [A₁; A₂; …]` (R×K), `R = Σ rᵢ`, scale 1. Nothing is lost
//!   (PEFT's "linear" combination, which averages A's and B's separately, is
//!   not `Σ B·A`). A module present in only some adapters gets only theirs.
//! - **merge** ([`AdapterSumOps::adapter_merge`], kernel
//!   `kernels/adapter_sum.cu`): `W ← W ± B_cat·A_cat` in one pass over W.
//! - **cosine** ([`similarity`]): `⟨B₁A₁, B₂A₂⟩_F = sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ))`,
//!   two r₁×r₂ Gram products, never an N×K matrix; f64 on the CPU.
//! - **recompression** ([`compress`]): QR of `B_cat` and `A_catᵀ`, SVD of the
//!   small core, keep the top `r` singular triplets; O((N+K)·R²).

use std::collections::{BTreeMap, BTreeSet};

use nalgebra::DMatrix;

use crate::adapter::{Adapter, AdapterConfig, AdapterKind, ModuleDelta, TargetModules};
use crate::backend::Backend;
use crate::cpu::gemm::{matmul, Op};
use crate::dtype::Element;
use crate::{Error, Result};

// ---- the kernel family -------------------------------------------------------

/// The shape of one merge: `W` (rows×cols) `+= alpha · leftᵀ·right` with
/// `left` rank×rows and `right` rank×cols, all row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeShape {
    /// Rows of W as stored.
    pub rows: usize,
    /// Columns of W as stored.
    pub cols: usize,
    /// Total rank Σ rᵢ of the factors.
    pub rank: usize,
}

/// Checks a merge call's buffers against its shape; the kernel indexes with
/// 32-bit row/column/rank counts.
pub(crate) fn check_merge(shape: MergeShape, w: usize, left: usize, right: usize, alpha: f32) -> Result<()> {
    const OP: &str = "adapter_merge";
    let MergeShape { rows, cols, rank } = shape;
    let fits = |x: usize| x <= u32::MAX as usize;
    if !(fits(rows) && fits(cols) && fits(rank)) {
        return Err(Error::invalid(OP, format!("{shape:?}: rows, cols and rank must each be below 2^32")));
    }
    let len = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| Error::invalid(OP, format!("{shape:?} overflows")));
    if w != len(rows, cols)? {
        return Err(Error::shape(OP, "w", format!("{rows}x{cols}"), format!("{w} elements")));
    }
    if left != len(rank, rows)? {
        return Err(Error::shape(OP, "left", format!("{rank}x{rows}"), format!("{left} elements")));
    }
    if right != len(rank, cols)? {
        return Err(Error::shape(OP, "right", format!("{rank}x{cols}"), format!("{right} elements")));
    }
    if !alpha.is_finite() {
        return Err(Error::invalid(OP, format!("alpha = {alpha} is not finite")));
    }
    Ok(())
}

/// The merge kernel on any backend.
pub trait AdapterSumOps: Backend + Sized {
    /// `w += alpha · leftᵀ·right` in one pass over `w` (read once, written
    /// once), f32 accumulation on the GPU, f64 on the CPU. `alpha = 1`
    /// merges, `alpha = -1` unmerges. On the GPU a bf16 `w` with total rank
    /// ≥ [`crate::cuda::adapter_sum::TENSOR_CORE_MIN_RANK`] is merged on
    /// tensor cores with the factors rounded to bf16 first (as an in-place
    /// `addmm_` on bf16 factors would).
    fn adapter_merge<T: Element>(
        &self,
        w: &mut Self::Buf<T>,
        shape: MergeShape,
        left: &Self::Buf<f32>,
        right: &Self::Buf<f32>,
        alpha: f32,
    ) -> Result<()>;
}

/// Whether [`merge_module`] adds the delta or takes it away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `W ← W + Σ wᵢ·ΔWᵢ`.
    Merge,
    /// `W ← W − Σ wᵢ·ΔWᵢ` (the inverse, up to rounding of W's dtype).
    Unmerge,
}

/// One module's summed delta, ready for the merge kernel: `W += leftᵀ·right`
/// with W as stored (`[N, K]`, or `[K, N]` with fan_in_fan_out).
#[derive(Clone, Debug, PartialEq)]
pub struct MergeFactors {
    /// The module's name.
    pub name: String,
    /// Rows, columns and rank Σ rᵢ.
    pub shape: MergeShape,
    /// rank×rows, f32.
    pub left: Vec<f32>,
    /// rank×cols, f32.
    pub right: Vec<f32>,
}

/// Uploads `factors` and merges (or unmerges) them into `w`.
pub fn merge_module<B: AdapterSumOps, T: Element>(
    backend: &B,
    w: &mut B::Buf<T>,
    factors: &MergeFactors,
    direction: Direction,
) -> Result<()> {
    let left = backend.upload(&factors.left)?;
    let right = backend.upload(&factors.right)?;
    let alpha = if direction == Direction::Merge { 1.0 } else { -1.0 };
    backend.adapter_merge(w, factors.shape, &left, &right, alpha)
}

// ---- exact sums ----------------------------------------------------------------

/// PEFT tensors that change the model but are not a `B·A` delta lorafuse
/// models (embedding LoRA, DoRA magnitudes, LoRA biases). They would sit in
/// `extra_tensors` and be dropped by a sum or merge, so their presence is an
/// error rather than a silent loss.
const UNSUMMABLE: [&str; 4] = [".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector", ".lora_B.bias"];

fn check_summable(a: &Adapter) -> Result<()> {
    a.validate()?;
    match a.extra_tensors.keys().find(|k| UNSUMMABLE.iter().any(|u| k.contains(u))) {
        None => Ok(()),
        Some(k) => Err(Error::invalid(
            "adapter",
            format!("tensor `{k}` is a kind of adapter weight lorafuse cannot sum or merge (only lora_A/lora_B pairs)"),
        )),
    }
}

/// Checks weights and adapters, and materialises every adapter's deltas.
fn weighted_deltas(adapters: &[&Adapter], weights: &[f64]) -> Result<Vec<Vec<ModuleDelta>>> {
    if adapters.is_empty() {
        return Err(Error::invalid("adapter sum", "needs at least one adapter"));
    }
    if weights.len() != adapters.len() {
        return Err(Error::invalid(
            "adapter sum weights",
            format!("{} weights for {} adapters: give one weight per adapter", weights.len(), adapters.len()),
        ));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::invalid("adapter sum weights", format!("{w} is not finite")));
    }
    let fifo = adapters[0].config.fan_in_fan_out;
    if adapters.iter().any(|a| a.config.fan_in_fan_out != fifo) {
        return Err(Error::invalid("adapter sum", "adapters disagree on fan_in_fan_out (trained on different bases?)"));
    }
    adapters
        .iter()
        .map(|a| {
            check_summable(a)?;
            Ok(a.deltas()?.into_owned())
        })
        .collect()
}

/// Per module name (sorted), the (delta, weight) pairs of every adapter that
/// has it, after checking that they agree on the module's shape.
fn by_module<'a>(
    deltas: &'a [Vec<ModuleDelta>],
    weights: &[f64],
) -> Result<BTreeMap<&'a str, Vec<(&'a ModuleDelta, f64)>>> {
    let mut out: BTreeMap<&str, Vec<(&ModuleDelta, f64)>> = BTreeMap::new();
    for (list, &w) in deltas.iter().zip(weights) {
        for m in list {
            let entry = out.entry(m.name.as_str()).or_default();
            if let Some((first, _)) = entry.first() {
                if (first.in_features, first.out_features) != (m.in_features, m.out_features) {
                    return Err(Error::Shape {
                        op: "adapter sum",
                        operand: "module",
                        expected: format!("`{}` K={} N={}", m.name, first.in_features, first.out_features),
                        got: format!("K={} N={}", m.in_features, m.out_features),
                    });
                }
            }
            entry.push((m, w));
        }
    }
    Ok(out)
}

/// `B_cat` (N×R) and `A_cat` (R×K) in f64 for one module.
/// The first non-finite element of f64 working data, as an error.
fn finite_f64(what: &str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { what: what.to_string(), index, value: values[index] }),
    }
}

/// The folded factors of `weight·ΔW` ([`ModuleDelta::effective_factors`]),
/// refused when they overflow: a finite but huge `lora_alpha` or weight
/// would otherwise feed inf/NaN into a sum, a merge or an SVD.
fn folded(m: &ModuleDelta, weight: f64) -> Result<(Vec<f64>, Vec<f64>)> {
    let (b, a) = m.effective_factors(weight);
    let what = format!("module `{}` scaled by {} (weight × scale)", m.name, weight * m.scale);
    finite_f64(&what, &b).map_err(|e| {
        Error::invalid("adapter", format!("{e}: the scale or weight overflows; check lora_alpha and the weights"))
    })?;
    Ok((b, a))
}

/// `(R, K, N, B_cat, A_cat)` of one module.
type Concatenated = (usize, usize, usize, Vec<f64>, Vec<f64>);

fn concat_factors(parts: &[(&ModuleDelta, f64)]) -> Result<Concatenated> {
    let (k, n) = (parts[0].0.in_features, parts[0].0.out_features);
    let big_r: usize = parts.iter().map(|(m, _)| m.rank).sum();
    let mut b_cat = vec![0.0; n * big_r];
    let mut a_cat = Vec::with_capacity(big_r * k);
    let mut col = 0;
    for (m, w) in parts {
        let (b, a) = folded(m, *w)?;
        for row in 0..n {
            b_cat[row * big_r + col..row * big_r + col + m.rank].copy_from_slice(&b[row * m.rank..(row + 1) * m.rank]);
        }
        a_cat.extend_from_slice(&a);
        col += m.rank;
    }
    Ok((big_r, k, n, b_cat, a_cat))
}

/// The exact sum `Σ wᵢ·ΔWᵢ` as one LoRA adapter of rank `Σ rᵢ` per module
/// (scale 1; modules present in only some adapters get only theirs). Its
/// config is PEFT-loadable: `r = lora_alpha = ` the largest module rank, other
/// ranks through `rank_pattern`/`alpha_pattern` (written by
/// [`crate::peft::save_adapter`]).
pub fn concat_sum(adapters: &[&Adapter], weights: &[f64]) -> Result<Adapter> {
    let deltas = weighted_deltas(adapters, weights)?;
    let mut modules = Vec::new();
    for parts in by_module(&deltas, weights)?.values() {
        let (big_r, k, n, b, a) = concat_factors(parts)?;
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        modules.push(ModuleDelta::lora(parts[0].0.name.clone(), (big_r, k, n), f32s(a), f32s(b), 1.0)?);
    }
    Adapter::new(sum_config(adapters, &modules), modules)
}

/// Config fields of the inputs a combined adapter keeps: they describe the
/// run or the loader, never which modules carry the adapter. Everything else
/// (`layers_to_transform`, `layers_pattern`, `exclude_modules`, ...) could
/// make PEFT skip or add modules the sum does not hold, so it is dropped.
const KEPT_FIELDS: [&str; 6] =
    ["task_type", "inference_mode", "lora_dropout", "revision", "init_lora_weights", "peft_version"];

/// The config of a combined adapter: LoRA, scale 1 at the largest rank,
/// `target_modules` exactly the modules it holds (full paths, which PEFT
/// matches only to themselves), the base model and [`KEPT_FIELDS`] from the
/// first input.
fn sum_config(adapters: &[&Adapter], modules: &[ModuleDelta]) -> AdapterConfig {
    let first = &adapters[0].config;
    let r = modules.iter().map(|m| m.rank).max().unwrap_or(1).max(1);
    let targets: BTreeSet<String> = modules.iter().map(|m| m.name.clone()).collect();
    AdapterConfig {
        kind: AdapterKind::Lora,
        r,
        lora_alpha: r as f64,
        use_rslora: false,
        target_modules: TargetModules::List(targets.into_iter().collect()),
        fan_in_fan_out: first.fan_in_fan_out,
        rank_pattern: Vec::new(),
        alpha_pattern: Vec::new(),
        base_model_name_or_path: first.base_model_name_or_path.clone(),
        extra: first
            .extra
            .iter()
            .filter(|(k, _)| KEPT_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Every module's merge factors for `Σ wᵢ·ΔWᵢ`, keyed by module name, laid
/// out for W as the base stores it (`fan_in_fan_out` swaps the factors).
pub fn merge_factors(adapters: &[&Adapter], weights: &[f64]) -> Result<BTreeMap<String, MergeFactors>> {
    let deltas = weighted_deltas(adapters, weights)?;
    let fifo = adapters[0].config.fan_in_fan_out;
    let mut out = BTreeMap::new();
    for (name, parts) in by_module(&deltas, weights)? {
        let (big_r, k, n, b_cat, a_cat) = concat_factors(&parts)?;
        // left must be R×rows: B_catᵀ (R×N) for W = [N, K]; A_cat for [K, N].
        let mut b_t = vec![0f32; big_r * n];
        for row in 0..n {
            for c in 0..big_r {
                b_t[c * n + row] = b_cat[row * big_r + c] as f32;
            }
        }
        let a32: Vec<f32> = a_cat.iter().map(|&x| x as f32).collect();
        let (shape, left, right) = if fifo {
            (MergeShape { rows: k, cols: n, rank: big_r }, a32, b_t)
        } else {
            (MergeShape { rows: n, cols: k, rank: big_r }, b_t, a32)
        };
        out.insert(name.to_string(), MergeFactors { name: name.to_string(), shape, left, right });
    }
    Ok(out)
}

// ---- interference diagnostic ------------------------------------------------

/// `sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ))` for effective factors: the Frobenius inner
/// product of the two deltas from two r₁×r₂ Gram products.
fn gram_inner(
    x: &(Vec<f64>, Vec<f64>),
    y: &(Vec<f64>, Vec<f64>),
    (r1, r2, k, n): (usize, usize, usize, usize),
) -> Result<f64> {
    let mut gb = vec![0.0; r1 * r2];
    let mut ga = vec![0.0; r1 * r2];
    matmul((r1, n, r2), &x.0, Op::T, &y.0, Op::N, &mut gb, 1.0, 0.0)?;
    matmul((r1, k, r2), &x.1, Op::N, &y.1, Op::T, &mut ga, 1.0, 0.0)?;
    Ok(gb.iter().zip(&ga).map(|(p, q)| p * q).sum())
}

fn check_same_shape(a: &ModuleDelta, b: &ModuleDelta) -> Result<()> {
    if (a.in_features, a.out_features) == (b.in_features, b.out_features) {
        Ok(())
    } else {
        Err(Error::Shape {
            op: "adapter similarity",
            operand: "module",
            expected: format!("`{}` K={} N={}", a.name, a.in_features, a.out_features),
            got: format!("K={} N={}", b.in_features, b.out_features),
        })
    }
}

/// `⟨ΔW_a, ΔW_b⟩_F` without forming either N×K matrix.
pub fn inner_product(a: &ModuleDelta, b: &ModuleDelta) -> Result<f64> {
    check_same_shape(a, b)?;
    let dims = (a.rank, b.rank, a.in_features, a.out_features);
    gram_inner(&folded(a, 1.0)?, &folded(b, 1.0)?, dims)
}

/// `‖ΔW‖_F` without forming the N×K matrix.
pub fn frobenius_norm(a: &ModuleDelta) -> Result<f64> {
    let f = folded(a, 1.0)?;
    Ok(gram_inner(&f, &f, (a.rank, a.rank, a.in_features, a.out_features))?.max(0.0).sqrt())
}

/// The cosine from an inner product and two norms; 0 when either delta is
/// zero (a zero delta, e.g. LoRA at initialisation, interferes with nothing).
fn cosine(inner: f64, na: f64, nb: f64) -> f64 {
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        (inner / (na * nb)).clamp(-1.0, 1.0)
    }
}

/// The reference the Gram form is tested and benchmarked against: both
/// dense N×K deltas, then their cosine. O(N·K·r) time, O(N·K) memory.
pub fn cosine_dense(a: &ModuleDelta, b: &ModuleDelta) -> Result<f64> {
    check_same_shape(a, b)?;
    let (da, db) = (a.dense()?, b.dense()?);
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    Ok(cosine(dot(&da, &db), dot(&da, &da).sqrt(), dot(&db, &db).sqrt()))
}

/// One module's interference numbers.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModuleSimilarity {
    /// The module's name.
    pub name: String,
    /// `cos(ΔW_a, ΔW_b)` of the flattened deltas (0 if either is zero).
    pub cosine: f64,
    /// `‖ΔW_a‖_F`.
    pub norm_a: f64,
    /// `‖ΔW_b‖_F`.
    pub norm_b: f64,
}

/// The interference diagnostic of two adapters.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Similarity {
    /// Modules both adapters carry, by name.
    pub modules: Vec<ModuleSimilarity>,
    /// Root-mean-square of the cosines over those modules (the paper's
    /// measure); 0 when they share none.
    pub rms_cosine: f64,
    /// Modules only the first adapter carries.
    pub only_in_a: Vec<String>,
    /// Modules only the second adapter carries.
    pub only_in_b: Vec<String>,
}

/// Per-module cosines, norms and their RMS for two adapters (any kinds),
/// from Gram products only.
pub fn similarity(a: &Adapter, b: &Adapter) -> Result<Similarity> {
    check_summable(a)?;
    check_summable(b)?;
    let (da, db) = (a.deltas()?, b.deltas()?);
    let map_b: BTreeMap<&str, &ModuleDelta> = db.iter().map(|m| (m.name.as_str(), m)).collect();
    let names_a: BTreeSet<&str> = da.iter().map(|m| m.name.as_str()).collect();
    let mut sorted_a: Vec<&ModuleDelta> = da.iter().collect();
    sorted_a.sort_by(|x, y| x.name.cmp(&y.name));
    let mut modules = Vec::new();
    let mut only_in_a = Vec::new();
    for ma in sorted_a {
        let Some(mb) = map_b.get(ma.name.as_str()) else {
            only_in_a.push(ma.name.clone());
            continue;
        };
        check_same_shape(ma, mb)?;
        // Fold each module once, then three small Gram pairs.
        let (fa, fb) = (folded(ma, 1.0)?, folded(mb, 1.0)?);
        let (k, n) = (ma.in_features, ma.out_features);
        let norm_a = gram_inner(&fa, &fa, (ma.rank, ma.rank, k, n))?.max(0.0).sqrt();
        let norm_b = gram_inner(&fb, &fb, (mb.rank, mb.rank, k, n))?.max(0.0).sqrt();
        let inner = gram_inner(&fa, &fb, (ma.rank, mb.rank, k, n))?;
        if !(inner.is_finite() && norm_a.is_finite() && norm_b.is_finite()) {
            return Err(Error::invalid(
                format!("module `{}`", ma.name),
                "its Gram products overflow f64: the adapters' scales are too large to compare",
            ));
        }
        modules.push(ModuleSimilarity { name: ma.name.clone(), cosine: cosine(inner, norm_a, norm_b), norm_a, norm_b });
    }
    let only_in_b = map_b.keys().filter(|n| !names_a.contains(*n)).map(|n| n.to_string()).collect();
    let rms_cosine = if modules.is_empty() {
        0.0
    } else {
        (modules.iter().map(|m| m.cosine * m.cosine).sum::<f64>() / modules.len() as f64).sqrt()
    };
    Ok(Similarity { modules, rms_cosine, only_in_a, only_in_b })
}

/// The pairwise RMS-cosine matrix of many adapters (symmetric; the diagonal
/// is each adapter against itself: 1 unless all its deltas are zero).
pub fn similarity_matrix(adapters: &[&Adapter]) -> Result<Vec<Vec<f64>>> {
    let n = adapters.len();
    let mut m = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i..n {
            let s = similarity(adapters[i], adapters[j])?.rms_cosine;
            m[i][j] = s;
            m[j][i] = s;
        }
    }
    Ok(m)
}

// ---- recompression -----------------------------------------------------------

/// What recompressing one module discarded.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModuleCompression {
    /// The module's name.
    pub name: String,
    /// Rank before (Σ rᵢ).
    pub rank_before: usize,
    /// Rank kept.
    pub rank_after: usize,
    /// Singular values of the delta, largest first (all of them, ≤ R).
    pub singular_values: Vec<f64>,
    /// `Σ_{i>r} σᵢ² / Σ σᵢ²`: the fraction of `‖ΔW‖_F²` dropped (0 for a zero
    /// delta).
    pub discarded_energy: f64,
}

/// A recompressed adapter and what each module lost.
#[derive(Clone, Debug)]
pub struct Compression {
    /// The rank-≤r LoRA adapter (scale 1, factors balanced as `U√Σ`, `√ΣVᵀ`).
    pub adapter: Adapter,
    /// Per module, in name order.
    pub modules: Vec<ModuleCompression>,
    /// Discarded energy over the whole adapter: `Σ dropped σ² / Σ σ²`.
    pub discarded_energy: f64,
}

/// Row-major data of a column-major nalgebra matrix's transpose.
fn row_major_transpose(m: &DMatrix<f64>) -> Vec<f64> {
    m.as_slice().to_vec()
}

/// Best rank-`rank` approximation of one module's `B·A` (effective factors),
/// through QR of `B` (N×R) and `Aᵀ` (K×R) and an SVD of the small core.
fn compress_module(m: &ModuleDelta, rank: usize) -> Result<(ModuleDelta, ModuleCompression)> {
    let (big_r, k, n) = (m.rank, m.in_features, m.out_features);
    let (b, a) = folded(m, 1.0)?;
    let qr_b = DMatrix::from_row_slice(n, big_r, &b).qr();
    let qr_a = DMatrix::from_row_slice(big_r, k, &a).transpose().qr();
    let (q_b, r_b) = (qr_b.q(), qr_b.r()); // N×p, p×R
    let (q_a, r_a) = (qr_a.q(), qr_a.r()); // K×q, q×R
    let (p, q) = (r_b.nrows(), r_a.nrows());
    // core = R_b·R_aᵀ (p×q); nalgebra is column-major, so its buffer is the
    // row-major transpose.
    let mut core = vec![0.0; p * q];
    matmul((p, big_r, q), &row_major_transpose(&r_b), Op::T, &row_major_transpose(&r_a), Op::N, &mut core, 1.0, 0.0)?;
    // nalgebra's SVD panics on non-finite input: products of finite but
    // huge factors can still overflow.
    finite_f64(&format!("module `{}`: the core R_B·R_Aᵀ", m.name), &core)?;
    let svd = nalgebra::SVD::try_new(DMatrix::from_row_slice(p, q, &core), true, true, f64::EPSILON, 10_000)
        .ok_or_else(|| Error::invalid(format!("module `{}`", m.name), "SVD of the core did not converge"))?;
    let (Some(u), Some(v_t)) = (svd.u.as_ref(), svd.v_t.as_ref()) else {
        return Err(Error::invalid(format!("module `{}`", m.name), "SVD returned no singular vectors"));
    };
    let sigma: Vec<f64> = svd.singular_values.iter().copied().collect();
    let keep = rank.min(sigma.len());
    // B_new = Q_b·U_r·√Σ (N×keep), A_new = √Σ·V_rᵀ·Q_aᵀ (keep×K).
    let mut u_s = vec![0.0; p * keep];
    for i in 0..p {
        for j in 0..keep {
            u_s[i * keep + j] = u[(i, j)] * sigma[j].sqrt();
        }
    }
    let mut s_vt = vec![0.0; keep * q];
    for i in 0..keep {
        for j in 0..q {
            s_vt[i * q + j] = sigma[i].sqrt() * v_t[(i, j)];
        }
    }
    let mut b_new = vec![0.0; n * keep];
    matmul((n, p, keep), &row_major_transpose(&q_b), Op::T, &u_s, Op::N, &mut b_new, 1.0, 0.0)?;
    let mut a_new = vec![0.0; keep * k];
    matmul((keep, q, k), &s_vt, Op::N, &row_major_transpose(&q_a), Op::N, &mut a_new, 1.0, 0.0)?;
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    let dropped: f64 = sigma[keep..].iter().map(|s| s * s).sum();
    let report = ModuleCompression {
        name: m.name.clone(),
        rank_before: big_r,
        rank_after: keep,
        discarded_energy: if total > 0.0 { dropped / total } else { 0.0 },
        singular_values: sigma,
    };
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    // keep ≥ 1: rank ≥ 1 and the core is at least 1×1 (N, K, R ≥ 1).
    let delta = ModuleDelta::lora(m.name.clone(), (keep, k, n), f32s(a_new), f32s(b_new), 1.0)?;
    Ok((delta, report))
}

/// The best rank-`rank` approximation of every module of `adapter` (any
/// kind; a module already at rank ≤ `rank` keeps its exact delta in the new
/// basis), with the energy each loses.
pub fn compress(adapter: &Adapter, rank: usize) -> Result<Compression> {
    if rank == 0 {
        return Err(Error::invalid("compress rank", "must be at least 1"));
    }
    check_summable(adapter)?;
    let deltas = adapter.deltas()?;
    let mut sorted: Vec<&ModuleDelta> = deltas.iter().collect();
    sorted.sort_by(|x, y| x.name.cmp(&y.name));
    let (mut modules, mut reports) = (Vec::new(), Vec::new());
    let (mut total, mut dropped) = (0.0, 0.0);
    for m in sorted {
        let (delta, report) = compress_module(m, rank)?;
        let energy: f64 = report.singular_values.iter().map(|s| s * s).sum();
        total += energy;
        dropped += energy * report.discarded_energy;
        modules.push(delta);
        reports.push(report);
    }
    let adapter = Adapter::new(sum_config(&[adapter], &modules), modules)?;
    Ok(Compression { adapter, modules: reports, discarded_energy: if total > 0.0 { dropped / total } else { 0.0 } })
}
