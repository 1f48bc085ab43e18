//! Adapter summation against dense math written out here (plain loops, not
//! the crate's matmul): the merge kernel's CPU twin, exact concatenated sums,
//! merge→unmerge, the Gram-product cosine, recompression, and the GPU kernel
//! against the CPU (skipped without a GPU).

// Without the `cuda` feature the GPU tests compile out, and the helpers
// only they use would warn.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_imports))]

mod common;

use std::sync::Arc;

use half::{bf16, f16};
use lorafuse::adapter::{Adapter, AdapterConfig, AdapterKind, ModuleDelta, UniLoraWeights};
use lorafuse::adapter_sum::{self, AdapterSumOps, Direction, MergeShape};
use lorafuse::cpu::Cpu;
use lorafuse::projection::{Assignment, Projection, ProjectionLayout};
use lorafuse::rng::Rng;
use lorafuse::testing::{abs, check_bounded, check_close, compare, ErrorBound, Magnitude};
use lorafuse::{Backend, DType, Element, Error};
use proptest::prelude::*;

/// `s·diag(v)·B·diag(u)·A` by the definition, N×K.
fn naive_delta(m: &ModuleDelta) -> Vec<f64> {
    let (r, k, n) = (m.rank, m.in_features, m.out_features);
    let mut out = vec![0.0; n * k];
    for i in 0..n {
        let vi = m.v.as_ref().map_or(1.0, |v| v[i] as f64);
        for j in 0..k {
            let mut acc = 0.0;
            for l in 0..r {
                let ul = m.u.as_ref().map_or(1.0, |u| u[l] as f64);
                acc += m.b[i * r + l] as f64 * ul * m.a[l * k + j] as f64;
            }
            out[i * k + j] = m.scale * vi * acc;
        }
    }
    out
}

fn lora(name: &str, seed: u64, (r, k, n): (usize, usize, usize), scale: f64) -> ModuleDelta {
    ModuleDelta::lora(name, (r, k, n), common::random(seed, r * k), common::random(seed + 1, n * r), scale).unwrap()
}

fn lora_adapter(modules: Vec<ModuleDelta>) -> Adapter {
    Adapter::new(AdapterConfig::lora(modules[0].rank, 2.0, vec!["x".into()]), modules).unwrap()
}

/// A Tied-LoRA adapter over modules `names`, all K×N, sharing A and B.
fn tied_adapter(seed: u64, names: &[&str], (r, k, n): (usize, usize, usize)) -> Adapter {
    let a: Arc<[f32]> = common::random(seed, r * k).into();
    let b: Arc<[f32]> = common::random(seed + 1, n * r).into();
    let modules = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let u = Some(common::random(seed + 10 + i as u64, r));
            let v = (i % 2 == 0).then(|| common::random(seed + 20 + i as u64, n));
            ModuleDelta::tied(*name, "t", (r, k, n), a.clone(), b.clone(), u, v, 0.75).unwrap()
        })
        .collect();
    let mut config = AdapterConfig::lora(r, 1.0, vec!["x".into()]);
    config.kind = AdapterKind::TiedLora;
    Adapter::new(config, modules).unwrap()
}

/// A Uni-LoRA adapter over modules `names`, all K×N.
fn unilora_adapter(seed: u64, names: &[&str], (r, k, n): (usize, usize, usize)) -> Adapter {
    let tensors = names.iter().flat_map(|m| [(format!("{m}.lora_A"), [r, k]), (format!("{m}.lora_B"), [n, r])]);
    let layout = ProjectionLayout::packed(DType::F32, tensors).unwrap();
    let d = 29;
    let projection = Projection::new(layout.rows(), d, seed, Assignment::Balanced).unwrap();
    let theta = Rng::new(seed).uniform_vec(d as usize, -0.5, 0.5);
    let mut config = AdapterConfig::lora(r, 1.0, vec!["x".into()]);
    config.kind = AdapterKind::UniLora;
    Adapter::unilora(config, UniLoraWeights::new(theta, projection, layout).unwrap()).unwrap()
}

/// Σ wᵢ·ΔWᵢ of module `name`, dense, over the adapters that have it.
fn naive_sum(adapters: &[&Adapter], weights: &[f64], name: &str, len: usize) -> Vec<f64> {
    let mut out = vec![0.0; len];
    for (a, w) in adapters.iter().zip(weights) {
        for m in a.deltas().unwrap().iter().filter(|m| m.name == name) {
            out.iter_mut().zip(naive_delta(m)).for_each(|(o, d)| *o += w * d);
        }
    }
    out
}

fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows).map(|e| x[(e % rows) * cols + e / rows]).collect()
}

/// `w + alpha·leftᵀ·right` by the definition.
fn naive_merge(w: &[f64], s: MergeShape, left: &[f32], right: &[f32], alpha: f64) -> Vec<f64> {
    let mut out = w.to_vec();
    for i in 0..s.rows {
        for j in 0..s.cols {
            let dot: f64 = (0..s.rank).map(|k| left[k * s.rows + i] as f64 * right[k * s.cols + j] as f64).sum();
            out[i * s.cols + j] += alpha * dot;
        }
    }
    out
}

fn merge_case<T: Element>(s: MergeShape, seed: u64, alpha: f32) -> Result<(), String> {
    let w0: Vec<T> = common::random(seed, s.rows * s.cols).into_iter().map(T::from_f32).collect();
    let left = common::random(seed + 1, s.rank * s.rows);
    let right = common::random(seed + 2, s.rank * s.cols);
    let want = naive_merge(&w0.iter().map(|x| x.to_f64()).collect::<Vec<_>>(), s, &left, &right, alpha as f64);
    let mut w = w0.clone();
    Cpu.adapter_merge(&mut w, s, &left, &right, alpha).map_err(|e| e.to_string())?;
    let ctx = format!("cpu adapter_merge {s:?} {} alpha={alpha} seed={seed}", T::DTYPE);
    check_bounded(&ctx, &w, &want, &merge_magnitudes(&w0, s, &left, &right, alpha), ErrorBound::f64()).map(|_| ())
}

/// Σ|terms| of every merged element, |w| + |alpha|·Σ_k |l|·|r|: a sum of
/// rank + 1 terms (the definition on absolute values).
fn merge_magnitudes<T: Element>(w0: &[T], s: MergeShape, left: &[f32], right: &[f32], alpha: f32) -> Vec<Magnitude> {
    let w_abs: Vec<f64> = w0.iter().map(|x| x.to_f64().abs()).collect();
    let m = naive_merge(&w_abs, s, &abs(left), &abs(right), alpha.abs() as f64);
    Magnitude::sums(s.rank + 1, &m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(24)))]

    #[test]
    fn cpu_merge_matches_dense_math(rows in 1usize..80, cols in 1usize..150, rank in 1usize..21, seed in 0u64..1000) {
        let s = MergeShape { rows, cols, rank };
        merge_case::<f32>(s, seed, 1.0).map_err(TestCaseError::fail)?;
        merge_case::<f16>(s, seed, -1.0).map_err(TestCaseError::fail)?;
        merge_case::<bf16>(s, seed, 0.5).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn gram_cosine_matches_dense(k in 1usize..40, n in 1usize..40, r1 in 1usize..9, r2 in 1usize..9, seed in 0u64..1000) {
        let a = lora("m", seed, (r1, k, n), 1.5);
        let b = lora("m", seed + 7, (r2, k, n), -0.25);
        let (da, db) = (naive_delta(&a), naive_delta(&b));
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
        let want = dot(&da, &db) / (dot(&da, &da).sqrt() * dot(&db, &db).sqrt());
        let got = adapter_sum::similarity(&lora_adapter(vec![a.clone()]), &lora_adapter(vec![b.clone()])).unwrap();
        let ctx = format!("cosine K={k} N={n} r1={r1} r2={r2} seed={seed}");
        prop_assert!((got.modules[0].cosine - want).abs() < 1e-9, "{}: {} vs {}", ctx, got.modules[0].cosine, want);
        prop_assert!((got.modules[0].norm_a - dot(&da, &da).sqrt()).abs() < 1e-9 * got.modules[0].norm_a, "{}", ctx);
        prop_assert!((adapter_sum::cosine_dense(&a, &b).unwrap() - want).abs() < 1e-9, "{}", ctx);
        prop_assert!((got.rms_cosine - want.abs()).abs() < 1e-9, "{}", ctx);
    }
}

#[test]
fn merge_shape_errors_are_typed() {
    let s = MergeShape { rows: 3, cols: 5, rank: 2 };
    let mut w = vec![0.5f32; 15];
    let e = Cpu.adapter_merge(&mut w, s, &vec![0.5; 5], &vec![0.5; 10], 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { operand: "left", .. }), "{e}");
    let e = Cpu.adapter_merge(&mut w, s, &vec![0.5; 6], &vec![0.5; 10], f32::NAN).unwrap_err();
    assert!(e.to_string().contains("alpha"), "{e}");
    let e = Cpu.adapter_merge(&mut vec![0.5f32; 14], s, &vec![0.5; 6], &vec![0.5; 10], 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { operand: "w", .. }), "{e}");
}

const NAMES: [&str; 3] = ["h.0.attn", "h.1.attn", "h.2.mlp"];

/// Three adapters of three kinds over overlapping module sets, same K×N.
fn mixed_adapters() -> Vec<Adapter> {
    let dims = (3, 37, 29);
    vec![
        lora_adapter(vec![lora(NAMES[0], 1, (1, 37, 29), 2.0), lora(NAMES[2], 3, (5, 37, 29), 0.5)]),
        tied_adapter(10, &NAMES[..2], dims),
        unilora_adapter(20, &NAMES[1..], (2, 37, 29)),
    ]
}

#[test]
fn concat_sum_delta_equals_the_weighted_sum_of_deltas() {
    let adapters = mixed_adapters();
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let weights = [1.0, -0.5, 2.0];
    let sum = adapter_sum::concat_sum(&refs, &weights).unwrap();
    let deltas = sum.deltas().unwrap();
    assert_eq!(deltas.len(), 3, "every module of every adapter appears once");
    for m in deltas.iter() {
        let want = naive_sum(&refs, &weights, &m.name, 37 * 29);
        let cmp = compare(m.dense().unwrap(), want);
        assert!(cmp.within(1e-6), "concat sum `{}` rank {}: {cmp}", m.name, m.rank);
    }
    let ranks: Vec<usize> = deltas.iter().map(|m| m.rank).collect();
    assert_eq!(ranks, vec![1 + 3, 3 + 2, 5 + 2]);
    // The result round-trips through a PEFT directory with the same deltas.
    let dir = std::env::temp_dir().join(format!("lorafuse-sum-{}", std::process::id()));
    lorafuse::peft::save_adapter(&dir, &sum).unwrap();
    let back = lorafuse::peft::load_adapter(&dir).unwrap();
    for (x, y) in sum.deltas().unwrap().iter().zip(back.deltas().unwrap().iter()) {
        let cmp = compare(y.dense().unwrap(), x.dense().unwrap());
        assert!(cmp.within(1e-12), "`{}` after save/load: {cmp}", x.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merge_then_unmerge_restores_w_for_every_dtype_and_layout() {
    let adapters = mixed_adapters();
    for fan_in_fan_out in [false, true] {
        let adapters: Vec<Adapter> = adapters
            .iter()
            .cloned()
            .map(|mut a| {
                a.config.fan_in_fan_out = fan_in_fan_out;
                a
            })
            .collect();
        let refs: Vec<&Adapter> = adapters.iter().collect();
        let weights = [0.5, 1.0, -1.5];
        let plan = adapter_sum::merge_factors(&refs, &weights).unwrap();
        for (name, f) in &plan {
            let (n, k) = (29, 37);
            let delta = naive_sum(&refs, &weights, name, n * k);
            let delta = if fan_in_fan_out { transpose(&delta, n, k) } else { delta };
            assert_eq!(f.shape.rows * f.shape.cols, n * k);
            round_trip::<f32>(f, &delta, fan_in_fan_out);
            round_trip::<f16>(f, &delta, fan_in_fan_out);
            round_trip::<bf16>(f, &delta, fan_in_fan_out);
        }
    }
}

fn round_trip<T: Element>(f: &adapter_sum::MergeFactors, delta: &[f64], fifo: bool) {
    let w0: Vec<T> = common::random(77, delta.len()).into_iter().map(T::from_f32).collect();
    let w0_64: Vec<f64> = w0.iter().map(|x| x.to_f64()).collect();
    let want: Vec<f64> = w0_64.iter().zip(delta).map(|(w, d)| w + d).collect();
    let mut w = w0.clone();
    adapter_sum::merge_module(&Cpu, &mut w, f, Direction::Merge).unwrap();
    let ctx = format!("merge `{}` {:?} fan_in_fan_out={fifo} {}", f.name, f.shape, T::DTYPE);
    check_close(&ctx, &w, &want, T::DTYPE.tolerance()).unwrap();
    adapter_sum::merge_module(&Cpu, &mut w, f, Direction::Unmerge).unwrap();
    check_close(&format!("un{ctx}"), &w, &w0_64, 2.0 * T::DTYPE.tolerance()).unwrap();
}

#[test]
fn cosine_with_itself_is_one_and_with_its_negation_minus_one() {
    for a in mixed_adapters() {
        let s = adapter_sum::similarity(&a, &a).unwrap();
        assert!((s.rms_cosine - 1.0).abs() < 1e-12, "{:?}: {s:?}", a.config.kind);
        let neg = adapter_sum::concat_sum(&[&a], &[-1.0]).unwrap();
        let s = adapter_sum::similarity(&a, &neg).unwrap();
        for m in &s.modules {
            assert!((m.cosine + 1.0).abs() < 1e-9, "{:?} `{}`: {}", a.config.kind, m.name, m.cosine);
            // The negated copy's factors are rounded to f32 once.
            assert!((m.norm_a - m.norm_b).abs() < 1e-6 * m.norm_a, "`{}`: {} vs {}", m.name, m.norm_a, m.norm_b);
        }
    }
    // Modules carried by only one side are listed, not averaged in.
    let all = mixed_adapters();
    let s = adapter_sum::similarity(&all[0], &all[2]).unwrap();
    assert_eq!(s.modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec![NAMES[2]]);
    assert_eq!(
        (s.only_in_a.as_slice(), s.only_in_b.as_slice()),
        (&[NAMES[0].to_string()][..], &[NAMES[1].to_string()][..])
    );
    let matrix = adapter_sum::similarity_matrix(&all.iter().collect::<Vec<_>>()).unwrap();
    for (i, row) in matrix.iter().enumerate() {
        assert!((row[i] - 1.0).abs() < 1e-12);
        assert!(row.iter().zip(&matrix).all(|(x, other)| (x - other[i]).abs() < 1e-15), "symmetric");
    }
}

#[test]
fn summing_rejects_bad_weights_and_mismatched_modules() {
    let a = lora_adapter(vec![lora("m", 1, (2, 5, 7), 1.0)]);
    let b = lora_adapter(vec![lora("m", 2, (2, 6, 7), 1.0)]);
    let e = adapter_sum::concat_sum(&[&a, &b], &[1.0, 1.0]).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let e = adapter_sum::concat_sum(&[&a], &[1.0, 2.0]).unwrap_err();
    assert!(e.to_string().contains("one weight per adapter"), "{e}");
    let e = adapter_sum::merge_factors(&[&a], &[f64::INFINITY]).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
    assert!(adapter_sum::similarity(&a, &b).is_err());
}

/// Dense singular values of an N×K matrix (the reference for compression).
fn dense_singular_values(x: &[f64], n: usize, k: usize) -> Vec<f64> {
    let m = nalgebra::DMatrix::from_row_slice(n, k, x);
    let mut s: Vec<f64> = m.singular_values().iter().copied().collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

#[test]
fn compression_is_the_best_rank_r_approximation() {
    let adapters = mixed_adapters();
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let sum = adapter_sum::concat_sum(&refs, &[1.0, 0.7, -1.3]).unwrap();
    for rank in [1, 2, 4, 9] {
        let c = adapter_sum::compress(&sum, rank).unwrap();
        let before = sum.deltas().unwrap();
        let after = c.adapter.deltas().unwrap();
        for ((m0, m1), rep) in before.iter().zip(after.iter()).zip(&c.modules) {
            let (d0, d1) = (naive_delta(m0), naive_delta(m1));
            let sv = dense_singular_values(&d0, m0.out_features, m0.in_features);
            let keep = rank.min(m0.rank);
            assert_eq!((m1.rank, rep.rank_after), (keep, keep), "`{}` rank {rank}", m0.name);
            // Eckart–Young: ‖ΔW − ΔW_r‖² = Σ_{i>r} σᵢ², and that is what is reported.
            let err2: f64 = d0.iter().zip(&d1).map(|(x, y)| (x - y).powi(2)).sum();
            let total: f64 = sv.iter().map(|s| s * s).sum();
            let tail: f64 = sv[keep..].iter().map(|s| s * s).sum();
            let ctx = format!("compress `{}` R={} r={rank}", m0.name, m0.rank);
            assert!((err2 - tail).abs() <= 1e-9 * total, "{ctx}: error² {err2} vs Σ dropped σ² {tail}");
            assert!((rep.discarded_energy - tail / total).abs() < 1e-9, "{ctx}: reported {}", rep.discarded_energy);
            for (got, want) in rep.singular_values.iter().zip(&sv) {
                assert!((got - want).abs() <= 1e-9 * sv[0], "{ctx}: σ {got} vs dense {want}");
            }
        }
        assert!((0.0..=1.0).contains(&c.discarded_energy));
    }
    assert!(adapter_sum::compress(&sum, 0).is_err());
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_merge_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("gpu_merge_matches_cpu") else { return };
    // Shapes straddle the 64×128 tile and the 16-deep rank slice; odd widths
    // exercise the unvectorised edge path.
    let shapes = [(1, 1, 1), (1, 300, 3), (65, 129, 17), (64, 128, 16), (200, 67, 33), (130, 1000, 64)];
    for (i, &(rows, cols, rank)) in shapes.iter().enumerate() {
        let s = MergeShape { rows, cols, rank };
        gpu_case::<f32>(&gpu, s, i as u64);
        gpu_case::<f16>(&gpu, s, i as u64);
        gpu_case::<bf16>(&gpu, s, i as u64);
    }
}

#[cfg(feature = "cuda")]
fn gpu_case<T: Element>(gpu: &lorafuse::cuda::Gpu, s: MergeShape, seed: u64) {
    let w0: Vec<T> = common::random(seed, s.rows * s.cols).into_iter().map(T::from_f32).collect();
    let left = common::random(seed + 1, s.rank * s.rows);
    let right = common::random(seed + 2, s.rank * s.cols);
    let mut on_cpu = w0.clone();
    Cpu.adapter_merge(&mut on_cpu, s, &left, &right, -0.75).unwrap();
    let want: Vec<f64> = on_cpu.iter().map(|x| x.to_f64()).collect();
    let mut w = gpu.upload(&w0).unwrap();
    let (l, r) = (gpu.upload(&left).unwrap(), gpu.upload(&right).unwrap());
    gpu.adapter_merge(&mut w, s, &l, &r, -0.75).unwrap();
    let got = gpu.download(&w).unwrap();
    let ctx = format!("gpu adapter_merge {s:?} {} seed={seed}", T::DTYPE);
    // f32 FMAs on CUDA cores (kernels/adapter_sum.cu), W rounded once to T;
    // a bf16 W at large total rank goes to tensor cores with L and R rounded
    // to bf16 first (two roundings per term).
    let mag = merge_magnitudes(&w0, s, &left, &right, -0.75);
    let bound = if T::DTYPE == DType::BF16 && s.rank >= lorafuse::cuda::adapter_sum::TENSOR_CORE_MIN_RANK {
        ErrorBound::gpu(DType::BF16).intermediates(2)
    } else {
        ErrorBound::cuda_cores(T::DTYPE)
    };
    check_bounded(&ctx, &got, &want, &mag, bound).unwrap();
}

#[cfg(feature = "cli")]
/// Runs the `lorafuse` binary and returns its stdout, failing on a non-zero exit.
fn lorafuse(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse")).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lorafuse {args:?} failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

#[cfg(feature = "cli")]
#[test]
fn cli_sum_similarity_merge_unmerge_and_compress() {
    use lorafuse::peft;
    use lorafuse::tensor_file::{self, Tensor, TensorFile};
    let dir = std::env::temp_dir().join(format!("lorafuse-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let adapters = mixed_adapters();
    for (i, a) in adapters.iter().enumerate() {
        peft::save_adapter(&dir.join(format!("a{i}")), a).unwrap();
    }
    // A base whose names carry an extra prefix the adapters' do not, plus an
    // unrelated tensor that must be copied unchanged.
    let mut base = TensorFile::default();
    for (k, name) in NAMES.iter().enumerate() {
        let w = common::random(100 + k as u64, 29 * 37);
        base.tensors.insert(format!("model.{name}.weight"), Tensor::from_f32(vec![29, 37], &w, DType::BF16).unwrap());
    }
    base.tensors.insert("model.wte.weight".into(), Tensor::f32(vec![3, 2], common::random(7, 6)).unwrap());
    tensor_file::write_safetensors(&dir.join("base.safetensors"), &base).unwrap();

    let json = lorafuse(&["similarity", &p("a0"), &p("a1"), &p("a2"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let want = adapter_sum::similarity(&adapters[0], &adapters[1]).unwrap().rms_cosine;
    let got = v["pairs"][0]["similarity"]["rms_cosine"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-12, "cli rms cosine {got} vs library {want}");
    assert!(lorafuse(&["similarity", &p("a0"), &p("a1")]).contains("RMS cosine"));

    lorafuse(&["sum", &p("a0"), &p("a1"), &p("a2"), "--weights", "1,-0.5,2", "--out", &p("sum")]);
    let sum = peft::load_adapter(&dir.join("sum")).unwrap();
    let refs: Vec<&Adapter> = adapters.iter().collect();
    for m in sum.deltas().unwrap().iter() {
        let cmp = compare(m.dense().unwrap(), naive_sum(&refs, &[1.0, -0.5, 2.0], &m.name, 29 * 37));
        assert!(cmp.within(1e-6), "cli sum `{}`: {cmp}", m.name);
    }

    let args = ["merge", "--base", &p("base.safetensors"), &p("a0"), &p("a1"), &p("a2"), "--weights", "1,-0.5,2"];
    lorafuse(&[&args[..], &["--out", &p("merged.safetensors")]].concat());
    let merged = tensor_file::read_safetensors(&dir.join("merged.safetensors")).unwrap();
    assert_eq!(merged.tensors["model.wte.weight"], base.tensors["model.wte.weight"]);
    for name in NAMES {
        let key = format!("model.{name}.weight");
        let w0 = base.tensors[&key].to_f32_vec(&key).unwrap();
        let want: Vec<f64> =
            naive_sum(&refs, &[1.0, -0.5, 2.0], name, 29 * 37).iter().zip(&w0).map(|(d, &w)| w as f64 + d).collect();
        let got = merged.tensors[&key].to_f32_vec(&key).unwrap();
        check_close(&format!("cli merge `{key}` bf16"), &got, &want, DType::BF16.tolerance()).unwrap();
    }
    let args = ["merge", "--base", &p("merged.safetensors"), &p("sum"), "--unmerge", "--device", "cpu"];
    lorafuse(&[&args[..], &["--out", &p("unmerged.safetensors")]].concat());
    let unmerged = tensor_file::read_safetensors(&dir.join("unmerged.safetensors")).unwrap();
    for name in NAMES {
        let key = format!("model.{name}.weight");
        let want: Vec<f64> = base.tensors[&key].to_f32_vec(&key).unwrap().iter().map(|&x| x as f64).collect();
        let got = unmerged.tensors[&key].to_f32_vec(&key).unwrap();
        check_close(&format!("cli unmerge `{key}` bf16"), &got, &want, 2.0 * DType::BF16.tolerance()).unwrap();
    }

    let report = lorafuse(&["compress", &p("sum"), "--rank", "2", "--out", &p("small"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let e = v["discarded_energy"].as_f64().unwrap();
    assert!(e > 0.0 && e < 1.0, "rank 2 of ranks 4..7 discards something: {e}");
    let small = peft::load_adapter(&dir.join("small")).unwrap();
    assert!(small.deltas().unwrap().iter().all(|m| m.rank == 2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_zero_delta_has_norm_zero_and_cosine_zero() {
    // LoRA at initialisation: B = 0, so ΔW = 0 and interferes with nothing.
    let zero = ModuleDelta::lora("m", (3, 8, 5), common::random(1, 24), vec![0.0; 15], 2.0).unwrap();
    let other = lora("m", 5, (2, 8, 5), 1.0);
    let s = adapter_sum::similarity(&lora_adapter(vec![zero]), &lora_adapter(vec![other])).unwrap();
    assert_eq!((s.modules[0].norm_a, s.modules[0].cosine, s.rms_cosine), (0.0, 0.0, 0.0));
    assert!(s.modules[0].norm_b > 0.0);
}

#[test]
fn adapters_with_weights_lorafuse_cannot_sum_are_refused_not_dropped() {
    let mut a = lora_adapter(vec![lora("m", 1, (2, 5, 7), 1.0)]);
    let t = lorafuse::tensor_file::Tensor::f32(vec![2, 11], common::random(3, 22)).unwrap();
    a.extra_tensors.insert("base_model.model.wte.lora_embedding_A".into(), t);
    for e in [
        adapter_sum::concat_sum(&[&a], &[1.0]).unwrap_err(),
        adapter_sum::merge_factors(&[&a], &[1.0]).unwrap_err(),
        adapter_sum::similarity(&a, &a).unwrap_err(),
        adapter_sum::compress(&a, 1).unwrap_err(),
    ] {
        assert!(e.to_string().contains("lora_embedding_A"), "{e}");
    }
}

// ---- the streaming merge kernel, element by element (skip without a GPU) ---

#[cfg(feature = "cuda")]
/// Per element of `W + alpha·leftᵀ·right`, the exact value and the error the
/// kernel's arithmetic allows: the rank-r dot product in f32 (at most
/// (r+1)·2^-24·Σ|terms|), one f32 fma (2^-24·|x|), then one rounding to T
/// (unit roundoff u_T, plus half a subnormal ulp). A bf16 W at total rank ≥
/// `TENSOR_CORE_MIN_RANK` goes through tensor cores with both factors
/// rounded to bf16 first:
/// each term is then off by up to (2·2^-8 + 2^-16)·|term| more.
fn merge_bounds<T: Element>(w: &[T], s: MergeShape, left: &[f32], right: &[f32], alpha: f32) -> (Vec<f64>, Vec<f64>) {
    let (u, sub) = match T::DTYPE {
        DType::F32 => (2f64.powi(-24), 2f64.powi(-150)),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
        DType::BF16 => (2f64.powi(-8), 2f64.powi(-134)),
    };
    let tensor_cores = T::DTYPE == DType::BF16 && s.rank >= lorafuse::cuda::adapter_sum::TENSOR_CORE_MIN_RANK;
    let factor_rounding = if tensor_cores { 2.0 * 2f64.powi(-8) + 2f64.powi(-16) } else { 0.0 };
    let mut want = Vec::with_capacity(s.rows * s.cols);
    let mut bound = Vec::with_capacity(s.rows * s.cols);
    for i in 0..s.rows {
        for j in 0..s.cols {
            let (mut dot, mut mag) = (0f64, 0f64);
            for k in 0..s.rank {
                let t = left[k * s.rows + i] as f64 * right[k * s.cols + j] as f64;
                dot += t;
                mag += t.abs();
            }
            let x = w[i * s.cols + j].to_f64() + alpha as f64 * dot;
            let e32 = (alpha.abs() as f64) * ((s.rank as f64 + 1.0) * 2f64.powi(-24) + factor_rounding) * mag
                + 2f64.powi(-24) * x.abs();
            want.push(x);
            bound.push(e32 + u * (x.abs() + e32) + sub);
        }
    }
    (want, bound)
}

#[cfg(feature = "cuda")]
fn gpu_merge_case<T: Element>(gpu: &lorafuse::cuda::Gpu, s: MergeShape, alpha: f32, seed: u64) {
    let ctx = format!("gpu adapter_merge {s:?} {} alpha={alpha} seed={seed}", T::DTYPE);
    let w0: Vec<T> = common::random(seed, s.rows * s.cols).into_iter().map(T::from_f32).collect();
    let left = common::random(seed + 1, s.rank * s.rows);
    let right = common::random(seed + 2, s.rank * s.cols);
    let (want, bound) = merge_bounds(&w0, s, &left, &right, alpha);
    let (l, r) = (gpu.upload(&left).unwrap(), gpu.upload(&right).unwrap());
    let run = || {
        let mut w = gpu.upload(&w0).unwrap();
        gpu.adapter_merge(&mut w, s, &l, &r, alpha).unwrap();
        gpu.download(&w).unwrap()
    };
    let got = run();
    let bad = (0..got.len()).find(|&e| outside((got[e].to_f64() - want[e]).abs(), bound[e]));
    assert!(
        bad.is_none(),
        "{ctx}: element {bad:?} outside its bound: {:?}",
        bad.map(|e| (got[e].to_f64(), want[e], bound[e]))
    );
    let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&run()), "{ctx}: two merges gave different bits");
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_merge_is_within_its_rounding_bound_on_every_tile_edge_and_rank_slice() {
    let Some(gpu) = common::gpu_or_skip("gpu_merge_is_within_its_rounding_bound_...") else { return };
    // Tiles are 64×128 (f16/bf16) and 128×64 (f32); ranks are staged 32 (16)
    // at a time; odd widths break 16-byte rows and take the scalar path;
    // rank ≥ 64 takes the tensor-core path for bf16.
    let shapes = [
        (77, 301, 130),
        (1, 1, 1),
        (1, 300, 3),
        (65, 129, 17),
        (64, 128, 32),
        (128, 64, 16),
        (200, 67, 33),
        (130, 1000, 64),
        (129, 256, 70),
        (3, 2048, 8),
    ];
    for (i, &(rows, cols, rank)) in shapes.iter().enumerate() {
        let s = MergeShape { rows, cols, rank };
        let alpha = [1.0, -0.75, 0.5, -1.0][i % 4];
        gpu_merge_case::<f32>(&gpu, s, alpha, 40 + i as u64);
        gpu_merge_case::<f16>(&gpu, s, alpha, 40 + i as u64);
        gpu_merge_case::<bf16>(&gpu, s, alpha, 40 + i as u64);
    }
}

#[cfg(feature = "cuda")]
/// An error above its bound, or NaN (which no bound admits).
fn outside(err: f64, bound: f64) -> bool {
    err.is_nan() || err > bound
}
