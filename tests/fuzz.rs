//! Mutation fuzzing of every file parser on stable Rust: proptest mutates
//! valid files (byte flips, truncations, insertions, overwritten length
//! fields, and for JSON files values of the wrong type or size put under
//! the keys that matter) and the parsers must answer with a value or a
//! typed error: never a panic, and never an allocation beyond a small
//! memory budget. `LORAFUSE_PROPTEST_CASES` sets the cases per parser
//! (default 48, so CI stays fast).

mod common;

use std::path::{Path, PathBuf};

use lorafuse::cpu::Cpu;
use lorafuse::peft;
use lorafuse::tensor_file::{self, Tensor, TensorData, TensorFile};
use lorafuse::train::checkpoint::read_checkpoint;
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::data::{read_llmc_tokens, write_llmc_tokens, Dataset};
use lorafuse::train::model::Gpt2;
use lorafuse::train::trainer::{TrainConfig, Trainer};
use proptest::prelude::*;

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lorafuse-fuzz-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whatever a mutation produces must fit this: a parser that trusts a size
/// field gets a typed error from the budget check instead of allocating.
fn small_budget() {
    lorafuse::memory::set_budget(Some(256 << 20));
}

/// One byte-level edit: (kind, position, value).
type Edit = (u8, usize, u64);

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec((0u8..5, any::<usize>(), any::<u64>()), 1..6)
}

/// Applies byte-level edits: flip a byte, truncate, insert a byte,
/// overwrite 8 bytes with a random u64 (length fields, counts), or replace
/// an ASCII digit by another (numbers inside a JSON header).
fn mutate(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for &(kind, pos, value) in edits {
        if bytes.is_empty() {
            bytes.push(value as u8);
            continue;
        }
        let at = pos % bytes.len();
        match kind {
            0 => bytes[at] ^= (value as u8).max(1),
            1 => bytes.truncate(at),
            2 => bytes.insert(at, value as u8),
            3 => {
                for (i, b) in value.to_le_bytes().iter().enumerate() {
                    if let Some(x) = bytes.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            _ => {
                if let Some(i) = (at..bytes.len()).chain(0..at).find(|&i| bytes[i].is_ascii_digit()) {
                    bytes[i] = b'0' + (value % 10) as u8;
                }
            }
        }
    }
}

/// JSON values of the wrong type or an extreme size.
fn hostile_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        Just(json!(true)),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1u64 << 40)),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!("")),
        Just(json!("(")),
        Just(json!("c_attn")),
        Just(json!(["c_attn", "c_proj"])),
        Just(json!([])),
        Just(json!({"c_attn": 0})),
        Just(json!({"(": 2})),
        Just(json!({".*": 1e308})),
        Just(json!({"rows": 1u64 << 40, "dtype": "f32", "segments": []})),
    ]
}

/// Structured mutation of a JSON file: hostile values under chosen keys
/// (dotted paths into objects), then byte edits of the text.
fn mutate_json(text: &str, keys: &[&str], sets: &[(usize, serde_json::Value)], edits: &[Edit]) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    for (k, value) in sets {
        let path = keys[k % keys.len()];
        let parts: Vec<&str> = path.split('.').collect();
        let parent = parts[..parts.len() - 1].iter().try_fold(&mut v, |at, p| at.get_mut(*p));
        if let Some(obj) = parent.and_then(|p| p.as_object_mut()) {
            obj.insert(parts[parts.len() - 1].to_string(), value.clone());
        }
    }
    let mut bytes = serde_json::to_vec(&v).unwrap();
    if edits.len() % 2 == 0 {
        // Half the cases keep valid JSON, so the checks after parsing run.
        mutate(&mut bytes, &edits[..1]);
    }
    bytes
}

fn safetensors_image() -> Vec<u8> {
    let mut f = TensorFile::default();
    f.tensors.insert("a".into(), Tensor::f32(vec![3, 4], common::random(1, 12)).unwrap());
    f.tensors.insert("b".into(), Tensor::from_f32(vec![5], &common::random(2, 5), lorafuse::DType::F16).unwrap());
    f.tensors.insert("i".into(), Tensor::new(vec![2], TensorData::U32(vec![1, 7])).unwrap());
    f.metadata.insert("format".into(), "pt".into());
    tensor_file::safetensors_bytes(&f).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_parser_survives_mutations(e in edits()) {
        small_budget();
        let dir = scratch("st");
        let mut bytes = safetensors_image();
        mutate(&mut bytes, &e);
        if let Ok(file) = tensor_file::parse_safetensors(Path::new("mutated"), &bytes) {
            for (name, t) in &file.tensors {
                let _ = t.to_f32_vec(name);
            }
        }
        let path = dir.join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let _ = tensor_file::read_safetensors(&path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn model_file_parser_survives_mutations(e in edits()) {
        small_budget();
        let (root, _) = checkpoint();
        let dir = scratch("model");
        copy_dir(&root.join("base"), &dir);
        let path = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        mutate(&mut bytes, &e);
        std::fs::write(&path, &bytes).unwrap();
        let _ = Gpt2::load(&Cpu, &dir);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn adapter_config_parser_survives_mutations(
        sets in proptest::collection::vec((any::<usize>(), hostile_json()), 0..4),
        e in edits(),
    ) {
        small_budget();
        let dir = scratch("cfg");
        let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": false,
            "target_modules": ["c_attn"], "fan_in_fan_out": true, "rank_pattern": {"h.1.attn.c_attn": 1},
            "alpha_pattern": {}, "bias": "none", "modules_to_save": null, "use_dora": false}"#;
        let keys = ["peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out", "rank_pattern",
            "alpha_pattern", "bias", "modules_to_save", "use_dora", "lorafuse_tie_groups", "lorafuse_unilora",
            "trainable_token_indices"];
        std::fs::write(dir.join(peft::CONFIG_FILE), mutate_json(config, &keys, &sets, &e)).unwrap();
        let mut f = TensorFile::default();
        for (l, r) in [(0, 2), (1, 1)] {
            let m = format!("base_model.model.transformer.h.{l}.attn.c_attn");
            f.tensors.insert(format!("{m}.lora_A.weight"), Tensor::f32(vec![r, 4], common::random(l, 4 * r)).unwrap());
            f.tensors.insert(format!("{m}.lora_B.weight"), Tensor::f32(vec![12, r], common::random(9, 12 * r)).unwrap());
        }
        f.tensors.insert("base_model.unilora_theta_d".into(), Tensor::f32(vec![4], vec![0.5; 4]).unwrap());
        tensor_file::write_safetensors(&dir.join(peft::WEIGHTS_FILE), &f).unwrap();
        if let Ok(a) = peft::load_adapter(&dir) {
            // Whatever loads is consistent and usable.
            prop_assert!(a.validate().is_ok());
            if let Ok(d) = a.deltas() {
                for m in d.iter() {
                    prop_assert!(m.scale.is_finite());
                }
            }
            let _ = lorafuse::adapter_sum::compress(&a, 1);
            let _ = peft::save_adapter(&dir.join("out"), &a);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn checkpoint_parser_survives_mutations(
        sets in proptest::collection::vec((any::<usize>(), hostile_json()), 0..4),
        e in edits(),
        which in 0u8..3,
    ) {
        small_budget();
        let (root, ck) = checkpoint();
        let dir = scratch("ck");
        copy_dir(&ck, &dir);
        let state = std::fs::read_to_string(ck.join("state.json")).unwrap();
        let keys = ["iteration", "optimizer_step", "rng_state", "bad_steps", "config.method", "config.rank",
            "config.batch", "config.seq", "config.targets", "config.eval_examples", "config.optim.lr", "config"];
        if which != 1 {
            std::fs::write(dir.join("state.json"), mutate_json(&state, &keys, &sets, &e)).unwrap();
        }
        if which != 0 {
            let mut bytes = std::fs::read(ck.join("optimizer.safetensors")).unwrap();
            mutate(&mut bytes, &e);
            std::fs::write(dir.join("optimizer.safetensors"), bytes).unwrap();
        }
        let _ = read_checkpoint(&dir);
        let (model, data) = tiny(&root);
        if let Ok(mut t) = Trainer::resume(Cpu, model, data, &dir) {
            // A checkpoint that resumes, trains.
            t.config.steps = t.iteration.saturating_add(1);
            let _ = t.step();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_file_parser_survives_mutations(e in edits(), count in any::<i32>(), version in -1i32..4) {
        small_budget();
        let dir = scratch("tok");
        let path = dir.join("t.bin");
        write_llmc_tokens(&path, &(0..50u32).map(|i| (i * 7) % 300).collect::<Vec<_>>()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        if e.len() % 2 == 1 {
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            bytes[8..12].copy_from_slice(&count.to_le_bytes());
        }
        mutate(&mut bytes, &e);
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(tokens) = read_llmc_tokens(&path) {
            prop_assert!(tokens.len() * 2 <= bytes.len());
        }
        if let Ok(d) = Dataset::llmc(&path, 300) {
            let _ = d.check_seq(8);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A tiny base model saved once per process, and the dataset its
/// checkpoint was trained on.
fn tiny(root: &Path) -> (Gpt2<Cpu>, Dataset) {
    let model = Gpt2::load(&Cpu, &root.join("base")).unwrap();
    (model, Dataset::embedded(&["add"], 40, 8, 0).unwrap())
}

/// A valid LoRA checkpoint (one step of a 1-layer width-8 model), made
/// once per process: `(root, checkpoint dir)`.
fn checkpoint() -> (PathBuf, PathBuf) {
    static ONCE: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let root = scratch("ck-source");
        let cfg = Gpt2Config::new(256, 32, 8, 1, 2).unwrap();
        Gpt2::random(&Cpu, &cfg, 1).unwrap().save(&Cpu, &root.join("base")).unwrap();
        let (model, data) = tiny(&root);
        let config = TrainConfig { rank: 2, steps: 2, batch: 2, eval_examples: 8, ..TrainConfig::default() };
        let mut t = Trainer::new(Cpu, model, data, config).unwrap();
        t.step().unwrap();
        let ck = t.checkpoint(&root.join("ck"), 2).unwrap();
        (root, ck)
    })
    .clone()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn json_mutations_with_an_odd_edit_count_stay_valid_json() {
    // Half the fuzz cases must reach the checks after parsing: the hostile
    // value is in place and the text still parses.
    let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#;
    let clean = mutate_json(config, &["r"], &[(0, serde_json::json!(0))], &[(0, 0, 0)]);
    let v: serde_json::Value = serde_json::from_slice(&clean).unwrap();
    assert_eq!(v["r"], 0);
}

#[test]
fn model_files_go_through_the_hardened_reader() {
    // A header length past the end of the file is refused before anything
    // else is read (the check of tensor_file::read_safetensors), for model
    // files as for adapter files.
    let (root, _) = checkpoint();
    let dir = scratch("model-header");
    copy_dir(&root.join("base"), &dir);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = Gpt2::load(&Cpu, &dir).err().expect("a lying header length was accepted").to_string();
    assert!(err.contains("header claims"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
