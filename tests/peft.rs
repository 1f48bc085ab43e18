//! PEFT adapter files: round trips for every adapter kind, a file laid out
//! exactly as PEFT writes it, and hostile files (each must be a typed error,
//! never a panic).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lorafuse::adapter::{Adapter, AdapterConfig, AdapterKind, AdapterWeights, ModuleDelta, UniLoraWeights};
use lorafuse::peft;
use lorafuse::projection::{Assignment, Projection, ProjectionLayout};
use lorafuse::rng::Rng;
use lorafuse::tensor_file::{self, Tensor, TensorData, TensorFile};
use lorafuse::{DType, Error};

/// A fresh, empty temporary directory, unique per test; removed when
/// dropped, unless the test is failing (then it is kept for inspection).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lorafuse-peft-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A LoRA adapter over modules of odd shapes and different ranks.
fn random_lora(seed: u64, shapes: &[(&str, usize, usize, usize)]) -> Adapter {
    let mut config = AdapterConfig::lora(4, 8.0, vec!["c_attn".into(), "c_fc".into()]);
    config.extra.insert("task_type".into(), "CAUSAL_LM".into());
    let modules = shapes
        .iter()
        .enumerate()
        .map(|(i, &(name, r, k, n))| {
            let a = common::random(seed + 2 * i as u64, r * k);
            let b = common::random(seed + 2 * i as u64 + 1, n * r);
            ModuleDelta::lora(name, (r, k, n), a, b, config.scale_for(name, r)).unwrap()
        })
        .collect();
    Adapter::new(config, modules).unwrap()
}

fn modules(a: &Adapter) -> &[ModuleDelta] {
    match &a.weights {
        AdapterWeights::Modules(m) => m,
        AdapterWeights::UniLora(_) => panic!("expected modules"),
    }
}

fn sorted(a: &Adapter) -> Vec<ModuleDelta> {
    let mut m = a.deltas().unwrap().into_owned();
    m.sort_by(|x, y| x.name.cmp(&y.name));
    m
}

const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("transformer.h.0.attn.c_attn", 4, 17, 51),
    ("transformer.h.0.mlp.c_fc", 1, 17, 9),
    ("transformer.h.1.attn.c_attn", 7, 3, 5),
];

#[test]
fn lora_round_trip_is_exact_in_f32_and_keeps_extras() {
    let dir = scratch("lora");
    let mut adapter = random_lora(1, SHAPES);
    // A module whose scale is not α/r must survive through alpha_pattern.
    if let AdapterWeights::Modules(m) = &mut adapter.weights {
        m[1].scale = 0.37;
    }
    adapter.extra_tensors.insert("optimizer.step".into(), Tensor::f32(vec![1], vec![12.0]).unwrap());
    // Optimizer state named after a module stays optimizer state.
    let moment = Tensor::f32(vec![4, 17], common::random(5, 68)).unwrap();
    adapter.extra_tensors.insert("optimizer.m.transformer.h.0.attn.c_attn.lora_A.weight".into(), moment);
    peft::save_adapter(&dir, &adapter).unwrap();
    let back = peft::load_adapter(&dir).unwrap();
    assert_eq!(back.config.kind, AdapterKind::Lora);
    assert_eq!(back.config.extra.get("task_type"), Some(&serde_json::Value::from("CAUSAL_LM")));
    assert_eq!(back.extra_tensors, adapter.extra_tensors);
    let (want, got) = (sorted(&adapter), sorted(&back));
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(
            (w.name.as_str(), w.rank, w.in_features, w.out_features),
            (g.name.as_str(), g.rank, g.in_features, g.out_features)
        );
        assert_eq!(w.a, g.a, "{}: A", w.name);
        assert_eq!(w.b, g.b, "{}: B", w.name);
        assert!((w.scale - g.scale).abs() <= 1e-12 * w.scale.abs(), "{}: scale {} vs {}", w.name, w.scale, g.scale);
    }
    // Atomic writes leave no temporary files behind.
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "unexpected files {names:?}");
}

#[test]
fn rslora_and_half_precision_round_trip_within_tolerance() {
    let dir = scratch("bf16");
    let mut adapter = random_lora(9, SHAPES);
    adapter.config.use_rslora = true;
    let rebuilt: Vec<ModuleDelta> = modules(&adapter)
        .iter()
        .map(|m| ModuleDelta { scale: adapter.config.scale_for(&m.name, m.rank), ..m.clone() })
        .collect();
    adapter.weights = AdapterWeights::Modules(rebuilt);
    for dtype in [DType::F16, DType::BF16] {
        peft::save_adapter_as(&dir, &adapter, dtype).unwrap();
        let back = peft::load_adapter(&dir).unwrap();
        assert!(back.config.use_rslora);
        for (w, g) in sorted(&adapter).iter().zip(&sorted(&back)) {
            let want: Vec<f64> = w.b.iter().map(|&x| x as f64).collect();
            lorafuse::testing::check_close(&format!("{} B {dtype} seed 9", w.name), &g.b, &want, dtype.tolerance())
                .unwrap();
            assert!((w.scale - g.scale).abs() < 1e-12, "{}: rsLoRA scale", w.name);
        }
    }
}

fn tied_adapter(kind: AdapterKind) -> Adapter {
    let (r, k, n) = (3, 11, 13);
    let a: Arc<[f32]> = common::random(20, r * k).into();
    let b: Arc<[f32]> = common::random(21, n * r).into();
    let mut config = AdapterConfig::lora(r, 6.0, vec!["c_attn".into()]);
    config.kind = kind;
    let modules = (0..3)
        .map(|l| {
            let u = Some(common::random(30 + l, r));
            let v = (l != 1).then(|| common::random(40 + l, n));
            let name = format!("transformer.h.{l}.attn.c_attn");
            ModuleDelta::tied(name, "c_attn", (r, k, n), a.clone(), b.clone(), u, v, 2.0).unwrap()
        })
        .collect();
    Adapter::new(config, modules).unwrap()
}

#[test]
fn tied_lora_and_vera_round_trip_share_factors() {
    for kind in [AdapterKind::TiedLora, AdapterKind::Vera] {
        let dir = scratch(&format!("{kind:?}"));
        let adapter = tied_adapter(kind);
        peft::save_adapter(&dir, &adapter).unwrap();
        let file = tensor_file::read_safetensors(&dir.join(peft::WEIGHTS_FILE)).unwrap();
        // One shared A and B, 3 u, 2 v.
        assert_eq!(file.tensors.len(), 2 + 3 + 2, "{:?}", file.tensors.keys().collect::<Vec<_>>());
        let back = peft::load_adapter(&dir).unwrap();
        assert_eq!(back.config.kind, kind);
        let got = sorted(&back);
        assert!(Arc::ptr_eq(&got[0].a, &got[2].a), "tied A is loaded once and shared");
        for (w, g) in sorted(&adapter).iter().zip(&got) {
            assert_eq!(w, g, "{kind:?} {}", w.name);
        }
    }
}

fn unilora_adapter(assignment: Assignment) -> Adapter {
    let layout = ProjectionLayout::packed(
        DType::F32,
        [
            ("h.0.attn.lora_A".to_string(), [2, 7]),
            ("h.0.attn.lora_B".to_string(), [9, 2]),
            ("h.1.mlp.lora_A".to_string(), [1, 5]),
            ("h.1.mlp.lora_B".to_string(), [3, 1]),
        ],
    )
    .unwrap();
    let d = 13;
    let projection = match assignment {
        Assignment::Explicit => {
            let mut rng = Rng::new(5);
            Projection::explicit((0..layout.rows()).map(|_| rng.below(d as u64) as u32).collect(), d).unwrap()
        }
        a => Projection::new(layout.rows(), d, 0xDEAD_BEEF_F00D_1234, a).unwrap(),
    };
    let theta = Rng::new(3).uniform_vec(d as usize, -0.02, 0.02);
    let mut config = AdapterConfig::lora(2, 2.0, vec!["attn".into(), "mlp".into()]);
    config.kind = AdapterKind::UniLora;
    Adapter::unilora(config, UniLoraWeights::new(theta, projection, layout).unwrap()).unwrap()
}

#[test]
fn unilora_round_trip_regenerates_the_same_factors() {
    for assignment in [Assignment::Hash, Assignment::Balanced, Assignment::Explicit] {
        let dir = scratch(&format!("uni-{assignment:?}"));
        let adapter = unilora_adapter(assignment);
        peft::save_adapter(&dir, &adapter).unwrap();
        let back = peft::load_adapter(&dir).unwrap();
        let (want, got) = (sorted(&adapter), sorted(&back));
        assert_eq!(want.len(), 2);
        assert_eq!(want, got, "{assignment:?}");
        assert!(want.iter().all(|m| m.scale == 1.0 && m.a.iter().any(|&x| x != 0.0)));
        // The seed survives as a string (JSON numbers lose u64 precision).
        if let AdapterWeights::UniLora(w) = &back.weights {
            assert_eq!(w.projection.seed(), if assignment == Assignment::Explicit { 0 } else { 0xDEAD_BEEF_F00D_1234 });
        }
    }
}

/// Writes a config and a tensor file into a fresh directory.
fn write_adapter(dir: &Path, config: &str, tensors: Vec<(&str, Tensor)>) {
    std::fs::write(dir.join(peft::CONFIG_FILE), config).unwrap();
    let file = TensorFile {
        tensors: tensors.into_iter().map(|(k, t)| (k.to_string(), t)).collect(),
        metadata: BTreeMap::new(),
    };
    tensor_file::write_safetensors(&dir.join(peft::WEIGHTS_FILE), &file).unwrap();
}

const PEFT_CONFIG: &str = r#"{
  "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "gpt2", "bias": "none",
  "fan_in_fan_out": true, "inference_mode": true, "init_lora_weights": true, "lora_alpha": 32,
  "lora_dropout": 0.05, "modules_to_save": null, "peft_type": "LORA", "r": 8,
  "rank_pattern": {"h.1.attn.c_attn": 2}, "revision": null, "target_modules": ["c_attn"],
  "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false
}"#;

fn peft_tensors() -> Vec<(&'static str, Tensor)> {
    let t = |shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        Tensor::from_f32(shape, &common::random(seed, n), DType::F16).unwrap()
    };
    vec![
        ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", t(vec![8, 12], 1)),
        ("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", t(vec![36, 8], 2)),
        ("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight", t(vec![2, 12], 3)),
        ("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight", t(vec![36, 2], 4)),
    ]
}

#[test]
fn reads_a_file_laid_out_like_peft_writes_it() {
    let dir = scratch("peft-layout");
    write_adapter(&dir, PEFT_CONFIG, peft_tensors());
    let a = peft::load_adapter(&dir).unwrap();
    assert!(a.config.fan_in_fan_out);
    assert_eq!(a.config.base_model_name_or_path.as_deref(), Some("gpt2"));
    let m = sorted(&a);
    assert_eq!(m[0].name, "transformer.h.0.attn.c_attn");
    assert_eq!((m[0].rank, m[0].in_features, m[0].out_features), (8, 12, 36));
    assert_eq!(m[0].scale, 32.0 / 8.0);
    assert_eq!((m[1].rank, m[1].scale), (2, 32.0 / 2.0), "rank_pattern module: α/r with its own r");
    // Saving and reloading keeps the same deltas and PEFT's unknown fields.
    let out = scratch("peft-layout-out");
    peft::save_adapter(&out, &a).unwrap();
    let b = peft::load_adapter(&out).unwrap();
    assert_eq!(sorted(&a), sorted(&b));
    assert_eq!(b.config.extra.get("lora_dropout"), Some(&serde_json::Value::from(0.05)));
}

/// Loads `dir` and returns the error, which must exist and mention `needle`.
fn expect_error(dir: &Path, needle: &str) -> Error {
    let err = match peft::load_adapter(dir) {
        Ok(_) => panic!("{}: a hostile adapter loaded without error (expected `{needle}`)", dir.display()),
        Err(e) => e,
    };
    assert!(err.to_string().contains(needle), "{}: error `{err}` does not mention `{needle}`", dir.display());
    err
}

#[test]
fn hostile_safetensors_files_are_typed_errors() {
    let dir = scratch("hostile-st");
    write_adapter(&dir, PEFT_CONFIG, peft_tensors());
    let path = dir.join(peft::WEIGHTS_FILE);
    let good = std::fs::read(&path).unwrap();

    // Truncated data, truncated header, empty file.
    for cut in [1, good.len() / 2, good.len() - 4, good.len()] {
        std::fs::write(&path, &good[..good.len() - cut]).unwrap();
        let e = expect_error(&dir, "malformed");
        assert!(matches!(e, Error::Format { .. }), "cut {cut}: {e}");
    }
    // A header length far beyond the file (would be a giant allocation).
    for n in [u64::MAX, 1 << 40, good.len() as u64] {
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&n.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        expect_error(&dir, "header");
    }
    // A header that is not JSON.
    let mut bad = good.clone();
    bad[8..20].copy_from_slice(b"\xff\xfe garbage!!");
    std::fs::write(&path, &bad).unwrap();
    expect_error(&dir, "safetensors");
    // Offsets pointing past the data, and absurd shapes.
    let header = r#"{"x":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#;
    let mut bad = (header.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(header.as_bytes());
    bad.extend_from_slice(&[0; 8]);
    std::fs::write(&path, &bad).unwrap();
    expect_error(&dir, "safetensors");
    let header = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4096]}}"#;
    let mut bad = (header.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(header.as_bytes());
    bad.extend_from_slice(&[0; 8]);
    std::fs::write(&path, &bad).unwrap();
    expect_error(&dir, "safetensors");
}

#[test]
fn wrong_dtypes_shapes_and_values_are_typed_errors() {
    let dir = scratch("hostile-tensors");
    let key_a = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";
    type Mutation = Box<dyn Fn(&mut Vec<(&'static str, Tensor)>)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "I64",
            Box::new(|t| {
                t[0].1 = Tensor::new(vec![8, 12], TensorData::Raw(safetensors::Dtype::I64, vec![0; 768])).unwrap()
            }),
        ),
        ("ranks differ", Box::new(|t| t[0].1 = Tensor::f32(vec![7, 12], common::random(1, 84)).unwrap())),
        ("nonempty matrix", Box::new(|t| t[0].1 = Tensor::f32(vec![8, 12, 1], common::random(1, 96)).unwrap())),
        (
            "non-finite",
            Box::new(|t| {
                let mut v = common::random(1, 96);
                v[17] = f32::NAN;
                t[0].1 = Tensor::f32(vec![8, 12], v).unwrap();
            }),
        ),
        ("no matching lora_A", Box::new(move |t| t.retain(|(k, _)| *k != key_a))),
        (
            "missing",
            Box::new(|t| {
                t.remove(1);
            }),
        ),
    ];
    for (needle, mutate) in cases {
        let mut tensors = peft_tensors();
        mutate(&mut tensors);
        write_adapter(&dir, PEFT_CONFIG, tensors);
        expect_error(&dir, needle);
    }
}

#[test]
fn hostile_configs_are_typed_errors() {
    let dir = scratch("hostile-config");
    let cases: &[(&str, &str)] = &[
        ("{not json", "adapter config"),
        (r#"{"peft_type": "LORA", "r": 0, "lora_alpha": 8}"#, "at least 1"),
        (r#"{"peft_type": "LORA", "r": -3, "lora_alpha": 8}"#, "adapter config"),
        (r#"{"peft_type": "IA3", "r": 8, "lora_alpha": 8}"#, "not supported"),
        (r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_dora": true}"#, "DoRA"),
        (r#"{"peft_type": "LORAFUSE_VERA", "r": 8, "lora_alpha": 8}"#, "lorafuse_tie_groups"),
        (
            r#"{"peft_type": "LORAFUSE_UNILORA", "r": 8, "lora_alpha": 8, "lorafuse_unilora": {"seed": "1", "d": 4,
               "assignment": "hash", "layout": {"rows": 1000000000000000, "dtype": "f32",
               "segments": [{"name": "m.lora_A", "start": 0, "shape": [4294967296, 4294967296]}]}}}"#,
            "absurd",
        ),
        (
            r#"{"peft_type": "LORAFUSE_UNILORA", "r": 8, "lora_alpha": 8, "lorafuse_unilora": {"seed": "-1", "d": 4,
               "assignment": "hash", "layout": {"rows": 4, "dtype": "f32",
               "segments": [{"name": "m.lora_A", "start": 0, "shape": [1, 4]}]}}}"#,
            "seed",
        ),
        (
            r#"{"peft_type": "LORAFUSE_UNILORA", "r": 8, "lora_alpha": 8, "lorafuse_unilora": {"seed": "1", "d": 4,
               "assignment": "hash", "layout": {"rows": 4, "dtype": "f32",
               "segments": [{"name": "m.lora_A", "start": 0, "shape": [1, 4]}]}}}"#,
            "lora_B",
        ),
    ];
    for (config, needle) in cases {
        write_adapter(&dir, config, vec![("base_model.unilora_theta_d", Tensor::f32(vec![4], vec![0.1; 4]).unwrap())]);
        expect_error(&dir, needle);
    }
    // An oversized config is refused before it is parsed.
    let huge = format!("{{\"x\": \"{}\"}}", "a".repeat((peft::MAX_CONFIG_BYTES + 10) as usize));
    std::fs::write(dir.join(peft::CONFIG_FILE), huge).unwrap();
    expect_error(&dir, "larger than");
    // A missing directory is an I/O error naming the path.
    let e = peft::load_adapter(&dir.join("nope")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("nope"), "{e}");
}

#[test]
fn inconsistent_hand_built_adapters_are_rejected() {
    let mut a = tied_adapter(AdapterKind::TiedLora);
    if let AdapterWeights::Modules(m) = &mut a.weights {
        m[1].a = common::random(99, m[1].a.len()).into();
    }
    let e = a.validate().unwrap_err();
    assert!(e.to_string().contains("do not share"), "{e}");
    let e = peft::save_adapter(&scratch("reject"), &a).unwrap_err();
    assert!(e.to_string().contains("do not share"), "{e}");

    let e = ModuleDelta::lora("m", (2, 3, 4), vec![0.5; 6], vec![0.5; 7], 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let m = ModuleDelta::lora("m", (1, 2, 3), vec![0.5; 2], vec![0.5; 3], 1.0).unwrap();
    let e = Adapter::new(AdapterConfig::lora(1, 1.0, vec![]), vec![m.clone(), m]).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn saving_values_beyond_f16_range_is_an_error_not_an_inf() {
    let m = ModuleDelta::lora("m", (1, 2, 2), vec![1e5, 1.0], vec![0.5, 0.5], 1.0).unwrap();
    let a = Adapter::new(AdapterConfig::lora(1, 1.0, vec![]), vec![m]).unwrap();
    let e = peft::save_adapter_as(&scratch("f16-range"), &a, DType::F16).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    peft::save_adapter_as(&scratch("bf16-range"), &a, DType::BF16).unwrap();
}

mod corruption {
    //! A poor man's fuzzer (the crate's layout has no room for cargo-fuzz):
    //! random byte flips and truncations of valid adapter files of every kind
    //! must load as a typed error or as a valid adapter, never panic.
    use super::*;
    use proptest::prelude::*;

    fn valid(kind: u8) -> Adapter {
        match kind {
            0 => random_lora(3, SHAPES),
            1 => tied_adapter(AdapterKind::Vera),
            _ => unilora_adapter(Assignment::Balanced),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(common::cases(96)))]

        #[test]
        fn corrupted_adapters_never_panic(
            kind in 0u8..3,
            in_config in any::<bool>(),
            truncate in any::<bool>(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let dir = scratch(&format!("corrupt-{kind}"));
            peft::save_adapter(&dir, &valid(kind)).unwrap();
            let path = dir.join(if in_config { peft::CONFIG_FILE } else { peft::WEIGHTS_FILE });
            let mut bytes = std::fs::read(&path).unwrap();
            let i = at.index(bytes.len());
            if truncate {
                bytes.truncate(i);
            } else {
                bytes[i] ^= byte | 1;
            }
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(a) = peft::load_adapter(&dir) {
                // Whatever loads must be a usable adapter.
                prop_assert!(a.validate().is_ok());
                prop_assert!(a.deltas().is_ok());
            }
        }
    }
}
