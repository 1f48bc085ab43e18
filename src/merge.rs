//! Merging adapters into a base checkpoint (what `lorafuse merge` does):
//! which base tensor each adapter module changes ([`resolve_weight`]), a
//! [`MergePlan`] checked against the whole base before any work, the merge
//! of every planned tensor on any backend with an overflow check, and
//! [`refuse_overwriting_inputs`], the guard every command that writes
//! adapters or checkpoints uses so that it never destroys what it reads.
//!
//! ```
//! use lorafuse::adapter::{Adapter, AdapterConfig, ModuleDelta};
//! use lorafuse::adapter_sum::{merge_factors, Direction};
//! use lorafuse::merge::MergePlan;
//! use lorafuse::tensor_file::{Tensor, TensorFile};
//! # fn main() -> lorafuse::Result<()> {
//! // A base checkpoint with one 3×2 linear, named as GPT-2's are.
//! let mut base = TensorFile::default();
//! base.tensors.insert("h.0.mlp.c_fc.weight".into(), Tensor::f32(vec![3, 2], vec![0.0; 6])?);
//! // A rank-1 adapter on that module, named as PEFT names it.
//! let delta = ModuleDelta::lora("transformer.h.0.mlp.c_fc", (1, 2, 3), vec![1.0, 2.0], vec![1.0, 0.0, -1.0], 1.0)?;
//! let adapter = Adapter::new(AdapterConfig::lora(1, 1.0, vec!["c_fc".into()]), vec![delta])?;
//! let plan = MergePlan::new(merge_factors(&[&adapter], &[1.0])?, &base, "base.safetensors")?;
//! assert_eq!(plan.entries[0].tensor, "h.0.mlp.c_fc.weight");
//! plan.apply(&lorafuse::cpu::Cpu, &mut base, Direction::Merge, |_, _| {})?;
//! let w = base.tensors["h.0.mlp.c_fc.weight"].to_f32_vec("w")?;
//! assert_eq!(w, [1.0, 2.0, 0.0, 0.0, -1.0, -2.0]);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::adapter_sum::{merge_module, AdapterSumOps, Direction, MergeFactors};
use crate::error::check_finite;
use crate::tensor_file::{Tensor, TensorData, TensorFile};
use crate::{Element, Error, Result};

/// Refuses an output path that is one of the inputs (or inside one, such
/// as a file in an input adapter directory), so that a command never
/// destroys what it reads. `out` need not exist yet.
pub fn refuse_overwriting_inputs(out: &Path, inputs: &[&Path]) -> Result<()> {
    // Compare resolved paths; an output that does not exist yet cannot be
    // an input, but its parent may be (an adapter directory).
    let resolve = |p: &Path| std::fs::canonicalize(p).ok();
    let out_abs = resolve(out).or_else(|| {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(resolve(parent)?.join(out.file_name()?))
    });
    let Some(out_abs) = out_abs else { return Ok(()) };
    for input in inputs {
        if let Some(inp) = resolve(input) {
            if out_abs == inp || out_abs.starts_with(&inp) {
                return Err(Error::invalid(
                    format!("--out {}", out.display()),
                    format!("is the input {}: writing there would destroy it; pick another --out", input.display()),
                ));
            }
        }
    }
    Ok(())
}

/// The base tensor a module's delta goes into: `<module>.weight`, else the
/// one tensor named `….<module>.weight`, else `<module>` with leading path
/// components dropped (PEFT names GPT-2's modules `transformer.h.0…`, the
/// original checkpoint `h.0…`). `None` when nothing matches, or when only
/// suffix matches exist and there are several (an ambiguity is never
/// guessed).
pub fn resolve_weight<'a>(module: &str, names: &'a [String]) -> Option<&'a str> {
    let exact = format!("{module}.weight");
    if let Some(n) = names.iter().find(|n| **n == exact) {
        return Some(n);
    }
    let suffix = format!(".{exact}");
    let mut longer = names.iter().filter(|n| n.ends_with(&suffix));
    if let (Some(n), None) = (longer.next(), longer.next()) {
        return Some(n);
    }
    let mut tail = module;
    while let Some((_, rest)) = tail.split_once('.') {
        tail = rest;
        let want = format!("{tail}.weight");
        if let Some(n) = names.iter().find(|n| **n == want) {
            return Some(n);
        }
    }
    None
}

/// One base tensor and the summed delta that goes into it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedMerge {
    /// The base tensor's name.
    pub tensor: String,
    /// The delta, laid out for the tensor as stored.
    pub factors: MergeFactors,
}

/// Every adapter module matched to the base tensor it changes, checked
/// (name, shape, dtype, one module per tensor) before any tensor is touched.
#[derive(Clone, Debug, PartialEq)]
pub struct MergePlan {
    /// In module-name order.
    pub entries: Vec<PlannedMerge>,
}

impl MergePlan {
    /// Matches each module of `factors` (from
    /// [`crate::adapter_sum::merge_factors`]) to its tensor in `base`.
    /// `base_name` (the file's path, say) only labels errors.
    pub fn new(factors: BTreeMap<String, MergeFactors>, base: &TensorFile, base_name: &str) -> Result<MergePlan> {
        let names: Vec<String> = base.tensors.keys().cloned().collect();
        let mut entries: Vec<PlannedMerge> = Vec::with_capacity(factors.len());
        for (module, f) in factors {
            let Some(name) = resolve_weight(&module, &names) else {
                return Err(Error::invalid(
                    "merge",
                    format!(
                        "no tensor `{module}.weight` (or a suffix of it) in {base_name}: is this the adapters' base model?"
                    ),
                ));
            };
            if let Some(other) = entries.iter().find(|e| e.tensor == name) {
                return Err(Error::invalid(
                    "merge",
                    format!("modules `{}` and `{module}` both resolve to base tensor `{name}`", other.factors.name),
                ));
            }
            check_target(name, &base.tensors[name], &f)?;
            entries.push(PlannedMerge { tensor: name.to_string(), factors: f });
        }
        Ok(MergePlan { entries })
    }

    /// Bytes of base tensors the plan rewrites (for progress bars).
    pub fn bytes(&self, base: &TensorFile) -> u64 {
        self.entries.iter().filter_map(|e| base.tensors.get(&e.tensor)).map(|t| t.bytes().len() as u64).sum()
    }

    /// Merges (or, with [`Direction::Unmerge`], takes out) every planned
    /// delta into `base` on `backend`, calling `progress(entry, bytes)`
    /// after each tensor. A result that overflows the tensor's dtype (huge
    /// weights, an f16 base past 65504) is an error, never an inf or NaN in
    /// the output; on error `base` may hold some merged tensors, so write
    /// it only after `Ok`.
    pub fn apply<B: AdapterSumOps>(
        &self,
        backend: &B,
        base: &mut TensorFile,
        direction: Direction,
        mut progress: impl FnMut(&PlannedMerge, u64),
    ) -> Result<()> {
        for entry in &self.entries {
            let t = base.tensors.get_mut(&entry.tensor).ok_or_else(|| {
                Error::invalid(
                    "merge",
                    format!("base tensor `{}` is not in the file the plan was made for", entry.tensor),
                )
            })?;
            merge_tensor(backend, &entry.tensor, t, &entry.factors, direction)?;
            progress(entry, t.bytes().len() as u64);
        }
        backend.synchronize()
    }
}

/// Checks that `t` can take the delta `f`: its shape as stored, and a float
/// dtype the merge kernel handles.
fn check_target(name: &str, t: &Tensor, f: &MergeFactors) -> Result<()> {
    let (rows, cols) = (f.shape.rows, f.shape.cols);
    if t.shape != [rows, cols] {
        return Err(Error::invalid(
            format!("base tensor `{name}`"),
            format!(
                "has shape {:?} but adapter module `{}` needs [{rows}, {cols}] (check fan_in_fan_out and the base model)",
                t.shape, f.name
            ),
        ));
    }
    match t.data {
        TensorData::F32(_) | TensorData::F16(_) | TensorData::BF16(_) => Ok(()),
        _ => Err(Error::invalid(
            format!("base tensor `{name}`"),
            format!("is {:?}; only F32, F16 and BF16 weights can be merged", t.safetensors_dtype()),
        )),
    }
}

/// Merges one module's delta `f` into the base tensor `t` (named `name` in
/// errors) on `backend`, and checks the result is finite.
pub fn merge_tensor<B: AdapterSumOps>(
    backend: &B,
    name: &str,
    t: &mut Tensor,
    f: &MergeFactors,
    direction: Direction,
) -> Result<()> {
    check_target(name, t, f)?;
    let what = format!("merged tensor `{name}` ({:?})", t.safetensors_dtype());
    match &mut t.data {
        TensorData::F32(v) => merge_typed(backend, &what, v, f, direction),
        TensorData::F16(v) => merge_typed(backend, &what, v, f, direction),
        TensorData::BF16(v) => merge_typed(backend, &what, v, f, direction),
        _ => unreachable!("check_target admits float tensors only"),
    }
}

fn merge_typed<B: AdapterSumOps, T: Element>(
    backend: &B,
    what: &str,
    values: &mut Vec<T>,
    f: &MergeFactors,
    direction: Direction,
) -> Result<()> {
    let mut w = backend.upload(values)?;
    merge_module(backend, &mut w, f, direction)?;
    let merged = backend.download(&w)?;
    check_finite(what, &merged).map_err(|e| {
        Error::invalid(
            "merge",
            format!("{e}: the result overflows the base's dtype; check the adapters' weights and scales"),
        )
    })?;
    *values = merged;
    Ok(())
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::adapter::{Adapter, AdapterConfig, ModuleDelta};
    use crate::adapter_sum::merge_factors;
    use crate::cpu::Cpu;
    use crate::rng::Rng;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn resolve_weight_prefers_exact_then_unique_suffix_then_shorter_module_paths() {
        let n = names(&["h.0.attn.c_attn.weight", "x.h.0.attn.c_attn.weight", "a.b.mlp.c_fc.weight"]);
        assert_eq!(resolve_weight("h.0.attn.c_attn", &n), Some("h.0.attn.c_attn.weight"));
        // PEFT's `transformer.` prefix dropped to find GPT-2's own name.
        assert_eq!(resolve_weight("transformer.h.0.attn.c_attn", &n), Some("h.0.attn.c_attn.weight"));
        // One longer name ending in `.mlp.c_fc.weight`: taken.
        assert_eq!(resolve_weight("mlp.c_fc", &n), Some("a.b.mlp.c_fc.weight"));
        // Two longer names end in `.attn.c_attn.weight` and no shorter path
        // exists: ambiguous, so not guessed.
        assert_eq!(resolve_weight("attn.c_attn", &n), None);
        assert_eq!(resolve_weight("h.0.mlp.c_proj", &n), None);
    }

    /// A rank-`r` LoRA adapter on `modules`, each `k → n`.
    fn adapter(seed: u64, modules: &[&str], (r, k, n): (usize, usize, usize), alpha: f64) -> Adapter {
        let mut rng = Rng::new(seed);
        let deltas = modules
            .iter()
            .map(|m| {
                let (a, b) = (rng.uniform_vec(r * k, -1.0, 1.0), rng.uniform_vec(n * r, -1.0, 1.0));
                ModuleDelta::lora(*m, (r, k, n), a, b, alpha / r as f64).unwrap()
            })
            .collect();
        Adapter::new(AdapterConfig::lora(r, alpha, names(modules)), deltas).unwrap()
    }

    fn base(shapes: &[(&str, [usize; 2])], seed: u64) -> TensorFile {
        let mut rng = Rng::new(seed);
        let mut file = TensorFile::default();
        for (name, [rows, cols]) in shapes {
            let t = Tensor::f32(vec![*rows, *cols], rng.uniform_vec(rows * cols, -1.0, 1.0)).unwrap();
            file.tensors.insert(name.to_string(), t);
        }
        file
    }

    #[test]
    fn plan_refuses_missing_shared_misshapen_and_integer_targets_before_merging() {
        let (r, k, n) = (2, 5, 7);
        let a = adapter(1, &["transformer.h.0.mlp.c_fc"], (r, k, n), 4.0);
        let f = || merge_factors(&[&a], &[1.0]).unwrap();
        let err = MergePlan::new(f(), &base(&[("h.1.mlp.c_fc.weight", [n, k])], 0), "b").unwrap_err();
        assert!(err.to_string().contains("no tensor `transformer.h.0.mlp.c_fc.weight`"), "{err}");
        let err = MergePlan::new(f(), &base(&[("h.0.mlp.c_fc.weight", [k, n])], 0), "b").unwrap_err();
        assert!(err.to_string().contains("has shape [5, 7]"), "{err}");
        let mut ints = base(&[], 0);
        ints.tensors
            .insert("h.0.mlp.c_fc.weight".into(), Tensor::new(vec![n, k], TensorData::U32(vec![0; n * k])).unwrap());
        let err = MergePlan::new(f(), &ints, "b").unwrap_err();
        assert!(err.to_string().contains("only F32, F16 and BF16"), "{err}");
        // Two modules that both shorten to the same base tensor.
        let two = adapter(2, &["x.h.0.mlp.c_fc", "y.h.0.mlp.c_fc"], (r, k, n), 4.0);
        let both = merge_factors(&[&two], &[1.0]).unwrap();
        let err = MergePlan::new(both, &base(&[("h.0.mlp.c_fc.weight", [n, k])], 0), "b").unwrap_err();
        assert!(err.to_string().contains("both resolve to base tensor"), "{err}");
    }

    /// `Σ_l |s·b_il·a_lj|` for every element: the magnitude the rounding
    /// errors of a delta's products scale with.
    fn abs_dense(m: &ModuleDelta) -> Vec<f64> {
        let (r, k, n) = (m.rank, m.in_features, m.out_features);
        let mut out = vec![0.0; n * k];
        for i in 0..n {
            for j in 0..k {
                out[i * k + j] = (0..r).map(|l| (m.scale * m.b[i * r + l] as f64 * m.a[l * k + j] as f64).abs()).sum();
            }
        }
        out
    }

    /// Merge on the CPU against `W + Σ wᵢ·ΔWᵢ` from the dense deltas (plain
    /// f64 loops), then unmerge back to W. Derived bounds, per element with
    /// `S = |W| + Σ |wᵢ|·Σ_l |sᵢ·b·a|` over the `R = 2r` products:
    /// - merge: the folded factor `wᵢ·sᵢ·B` is rounded to f32 (`2⁻²⁴·S`),
    ///   the f64 sum adds `R·2⁻⁵³·S`, and the one rounding of the result to
    ///   f32 adds `2⁻²⁴·|W'|`;
    /// - unmerge subtracts the identical f64 delta, so only the two f32
    ///   roundings remain: `2⁻²⁴·(|W'| + |W|)`, plus the f64 sums.
    #[test]
    fn apply_merges_every_planned_tensor_and_unmerge_restores_the_base() {
        let (r, k, n) = (3, 11, 6);
        let modules = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"];
        let (a, b) = (adapter(3, &modules, (r, k, n), 8.0), adapter(4, &modules, (r, k, n), 8.0));
        let weights = [0.7, -1.3];
        let shapes = [("h.0.attn.c_attn.weight", [n, k]), ("h.0.mlp.c_proj.weight", [n, k]), ("wte.weight", [4, 3])];
        let w0 = base(&shapes, 5);
        let mut merged = w0.clone();
        let plan = MergePlan::new(merge_factors(&[&a, &b], &weights).unwrap(), &merged, "b").unwrap();
        assert_eq!(plan.entries.len(), 2);
        assert_eq!(plan.bytes(&merged), 2 * (n * k * 4) as u64);
        let mut seen = Vec::new();
        plan.apply(&Cpu, &mut merged, Direction::Merge, |e, bytes| seen.push((e.tensor.clone(), bytes))).unwrap();
        let tensor_bytes = (n * k * 4) as u64;
        assert_eq!(seen, [(shapes[0].0.to_string(), tensor_bytes), (shapes[1].0.to_string(), tensor_bytes)]);
        let mut unmerged = merged.clone();
        plan.apply(&Cpu, &mut unmerged, Direction::Unmerge, |_, _| {}).unwrap();
        let (eps32, eps64, big_r) = (2f64.powi(-24), 2f64.powi(-53), 2.0 * r as f64);
        for (i, (tensor, _)) in shapes[..2].iter().enumerate() {
            let (da, db) = (&a.deltas().unwrap()[i], &b.deltas().unwrap()[i]);
            let (dense_a, dense_b, abs_a, abs_b) =
                (da.dense().unwrap(), db.dense().unwrap(), abs_dense(da), abs_dense(db));
            let read = |f: &TensorFile| f.tensors[*tensor].to_f32_vec(tensor).unwrap();
            let (w, got, back) = (read(&w0), read(&merged), read(&unmerged));
            for j in 0..n * k {
                let want = w[j] as f64 + weights[0] * dense_a[j] + weights[1] * dense_b[j];
                let s = (w[j] as f64).abs() + weights[0].abs() * abs_a[j] + weights[1].abs() * abs_b[j];
                let bound = eps32 * (want.abs() + s) + big_r * eps64 * s;
                let err = (got[j] as f64 - want).abs();
                assert!(err <= bound, "{tensor}[{j}]: merged {}, want {want}, error {err:e} > {bound:e}", got[j]);
                let bound = eps32 * ((got[j] as f64).abs() + (w[j] as f64).abs()) + 2.0 * big_r * eps64 * s;
                let err = (back[j] as f64 - w[j] as f64).abs();
                assert!(err <= bound, "{tensor}[{j}]: unmerged {}, was {}, error {err:e} > {bound:e}", back[j], w[j]);
            }
        }
        assert_eq!(merged.tensors["wte.weight"], w0.tensors["wte.weight"], "unplanned tensors are untouched");
    }

    #[test]
    fn an_overflowing_merge_is_an_error_and_leaves_the_tensor_as_it_was() {
        let (r, k, n) = (1, 4, 3);
        let a = adapter(6, &["h.0.mlp.c_fc"], (r, k, n), 1.0);
        let mut file = TensorFile::default();
        let half: Vec<f16> = (0..n * k).map(|i| f16::from_f32(i as f32)).collect();
        file.tensors.insert("h.0.mlp.c_fc.weight".into(), Tensor::new(vec![n, k], TensorData::F16(half)).unwrap());
        let before = file.clone();
        // |ΔW| ≥ 1e-3 somewhere, so a weight of 1e12 lands far past 65504.
        let plan = MergePlan::new(merge_factors(&[&a], &[1e12]).unwrap(), &file, "b").unwrap();
        let err = plan.apply(&Cpu, &mut file, Direction::Merge, |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("overflows the base's dtype"), "{err}");
        assert_eq!(file, before);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("lorafuse-merge-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("adapter")).unwrap();
            std::fs::write(dir.join("base.safetensors"), b"x").unwrap();
            Scratch(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn outputs_that_are_or_lie_inside_an_input_are_refused() {
        let s = Scratch::new("guard");
        let (adapter, base) = (s.0.join("adapter"), s.0.join("base.safetensors"));
        let inputs = [adapter.as_path(), base.as_path()];
        for bad in
            [base.clone(), adapter.clone(), adapter.join("new.safetensors"), s.0.join("adapter/../base.safetensors")]
        {
            let err = refuse_overwriting_inputs(&bad, &inputs).unwrap_err();
            assert!(err.to_string().contains("would destroy it"), "{}: {err}", bad.display());
        }
        refuse_overwriting_inputs(&s.0.join("merged.safetensors"), &inputs).unwrap();
        refuse_overwriting_inputs(&s.0.join("out/deeper/merged"), &inputs).unwrap();
    }
}
