//! Hostile and unusual input: no silent wrong results, no lost data, typed
//! errors instead of crashes or runaway allocations. Most checks drive the
//! `lorafuse` binary as a user would, on tiny models.
//!
//! `LORAFUSE_TEST_BIN=<path>` runs the CLI checks against another build of
//! the binary (e.g. an older one, to see a regression test fail there).
//! Those checks need the binary, so the `cli` feature.

// Without the `cli` feature the CLI checks compile out, and the helpers
// only they use would warn.
#![cfg_attr(not(feature = "cli"), allow(dead_code, unused_imports))]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lorafuse::adapter::{AdapterConfig, AdapterKind};
use lorafuse::cpu::Cpu;
use lorafuse::peft;
use lorafuse::rng::Rng;
use lorafuse::tensor_file::{self, Tensor, TensorFile};
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::model::Gpt2;
use lorafuse::DType;

/// A scratch directory removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lorafuse-robust-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

#[cfg(feature = "cli")]
fn bin() -> String {
    std::env::var("LORAFUSE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lorafuse").to_string())
}

#[cfg(feature = "cli")]
/// Runs the CLI in `dir`; returns (exit code, stdout + stderr).
fn cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin()).args(args).envs(env.iter().copied()).current_dir(dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[cfg(feature = "cli")]
fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, text) = cli(dir, args, &[]);
    assert_eq!(code, 0, "lorafuse {args:?} failed:\n{text}");
    text
}

#[cfg(feature = "cli")]
/// A typed error: exit status 1 (a panic exits 101, an abort by signal).
fn refused(dir: &Path, args: &[&str], env: &[(&str, &str)], needle: &str) -> String {
    let (code, text) = cli(dir, args, env);
    assert_eq!(code, 1, "lorafuse {args:?} should fail with a typed error mentioning `{needle}`:\n{text}");
    assert!(text.contains(needle), "lorafuse {args:?}: error does not mention `{needle}`:\n{text}");
    text
}

/// Saves a random GPT-2 base (vocab 256, 32 positions, width 16, 2 heads)
/// whose token embedding (tied to the output head) is scaled to std 1, so
/// the logits, and the loss, depend strongly on the hidden state: an
/// adapter with a wrong scale changes the loss visibly.
fn save_base(dir: &Path, layers: usize, seed: u64) {
    use lorafuse::Backend;
    let cfg = Gpt2Config::new(256, 32, 16, layers, 2).unwrap();
    let mut model = Gpt2::random(&Cpu, &cfg, seed).unwrap();
    let wte: Vec<f32> = Cpu.download(&model.params[0]).unwrap().iter().map(|x| x * 50.0).collect();
    model.params[0] = Cpu.upload(&wte).unwrap();
    model.save(&Cpu, dir).unwrap();
}

/// (K, N) of a GPT-2 module of width 16, from its name.
fn dims(name: &str) -> (usize, usize) {
    let d = 16;
    if name.ends_with("attn.c_attn") {
        (d, 3 * d)
    } else if name.ends_with("attn.c_proj") {
        (d, d)
    } else if name.ends_with("mlp.c_fc") {
        (d, 4 * d)
    } else {
        (4 * d, d)
    }
}

/// Writes a PEFT-layout adapter: the config text verbatim and random
/// factors of the given rank for each module path.
fn write_peft(dir: &Path, config: &str, modules: &[(&str, usize)], seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(peft::CONFIG_FILE), config).unwrap();
    let mut rng = Rng::new(seed);
    let mut tensors = BTreeMap::new();
    for &(name, r) in modules {
        let (k, n) = dims(name);
        let a = rng.uniform_vec(r * k, -0.5, 0.5);
        let b = rng.uniform_vec(n * r, -0.5, 0.5);
        tensors.insert(format!("base_model.model.{name}.lora_A.weight"), Tensor::f32(vec![r, k], a).unwrap());
        tensors.insert(format!("base_model.model.{name}.lora_B.weight"), Tensor::f32(vec![n, r], b).unwrap());
    }
    tensor_file::write_safetensors(&dir.join(peft::WEIGHTS_FILE), &TensorFile { tensors, metadata: BTreeMap::new() })
        .unwrap();
}

#[cfg(feature = "cli")]
/// The loss column of `lorafuse eval`'s row named `row`.
fn eval_loss(text: &str, row: &str) -> f64 {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(row))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("no eval row `{row}` in:\n{text}"))
}

const EVAL: [&str; 6] = ["--data", "embedded:add", "--examples", "16", "--seq", "32"];

#[cfg(feature = "cli")]
/// Evaluates `adapter` on `base`, then the base with the adapter merged in
/// by `lorafuse merge` (which agrees with PEFT): the two losses must agree.
/// Returns the loss.
fn eval_matches_merge(dir: &Path, base: &str, adapters: &[&str]) -> f64 {
    let mut args = vec!["eval", "--device", "cpu", "--model", base];
    for a in adapters {
        args.extend(["--adapter", a]);
    }
    args.extend(EVAL);
    let text = ok(dir, &args);
    let merged = format!("{base}-merged");
    std::fs::create_dir_all(dir.join(&merged)).unwrap();
    std::fs::copy(dir.join(base).join("config.json"), dir.join(&merged).join("config.json")).unwrap();
    let base_file = format!("{base}/model.safetensors");
    let out_file = format!("{merged}/model.safetensors");
    let mut margs = vec!["merge", "--device", "cpu", "--base", &base_file, "--out", &out_file];
    margs.extend(adapters);
    ok(dir, &margs);
    let mut eargs = vec!["eval", "--device", "cpu", "--model", &merged];
    eargs.extend(EVAL);
    let merged_text = ok(dir, &eargs);
    // Both rows are printed with 4 decimals; the two computations differ by
    // f32 rounding of the merged weights (relative 1e-7) only.
    let (with_adapter, with_merge) =
        (eval_loss(&text, adapters[adapters.len() - 1]), eval_loss(&merged_text, "(base)"));
    assert!(
        (with_adapter - with_merge).abs() <= 2e-4,
        "eval with adapter {adapters:?}: loss {with_adapter}, merged into the base: {with_merge}\n{text}"
    );
    // A wrong scale (α/r for α/√r, say) moves the loss by as much as the
    // adapter itself: far more than the agreement bound above.
    assert!((with_adapter - eval_loss(&text, "(base)")).abs() > 0.05, "the adapter should change the loss:\n{text}");
    with_adapter
}

// ---- 1: resume continues the checkpoint's run -----------------------------

const TRAIN: [&str; 16] = [
    "train",
    "--device",
    "cpu",
    "--model",
    "random:1,16,2,32",
    "--data",
    "embedded:add",
    "--method",
    "lora",
    "--rank",
    "2",
    "--batch",
    "2",
    "--seed",
    "7",
    "--answer-only",
];

fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let file = tensor_file::read_safetensors(&dir.join(peft::WEIGHTS_FILE)).unwrap();
    file.tensors.iter().map(|(k, t)| (k.clone(), t.to_f32_vec(k).unwrap())).collect()
}

#[cfg(feature = "cli")]
#[test]
fn resume_takes_the_checkpoints_run_and_refuses_a_different_one() {
    let s = scratch("resume");
    let dir = &s.0;
    let mut full = TRAIN.to_vec();
    full.extend(["--steps", "6", "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--out", "full"]);
    ok(dir, &full);
    let lines = std::fs::read_to_string(dir.join("full/metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 7, "six iterations and the final report");
    // Lose the last checkpoint and `latest`'s target: resume falls back to
    // the newest complete step (4) and, given no model, seed or data, takes
    // them from the checkpoint.
    std::fs::remove_dir_all(dir.join("ck/step-00000006")).unwrap();
    let text = ok(dir, &["train", "--device", "cpu", "--checkpoint-dir", "ck", "--resume", "--out", "full"]);
    assert!(text.contains("step-00000004"), "{text}");
    let resumed = std::fs::read_to_string(dir.join("full/metrics.jsonl")).unwrap();
    assert_eq!(resumed.lines().count(), 7 + 2 + 1, "resume appends to metrics.jsonl:\n{resumed}");
    let mut again = TRAIN.to_vec();
    again.extend(["--steps", "6", "--checkpoint-dir", "ck2", "--checkpoint-every", "2", "--out", "again"]);
    ok(dir, &again);
    assert_eq!(
        tensors(&dir.join("full")),
        tensors(&dir.join("again")),
        "resumed run differs from an uninterrupted one"
    );
    // A different setting on resume is refused by name, not ignored.
    for (flag, value, name) in [
        ("--rank", "4", "rank"),
        ("--seed", "8", "seed"),
        ("--lr", "0.5", "optim.lr"),
        ("--batch", "3", "batch"),
        ("--method", "vera", "method"),
        ("--targets", "attn.c_attn", "targets"),
        ("--data", "embedded:sort", "data"),
        ("--model", "random:1,16,2,64", "model"),
    ] {
        let args = ["train", "--device", "cpu", "--checkpoint-dir", "ck", "--resume", "--out", "x", flag, value];
        refused(dir, &args, &[], &format!("`{name}`"));
    }
    // Repeating the original flags is fine.
    let mut same = TRAIN.to_vec();
    same.extend(["--steps", "6", "--checkpoint-dir", "ck", "--resume", "--out", "same"]);
    ok(dir, &same);
}

// ---- 2, 14: eval computes what merge (and PEFT) computes -------------------

#[cfg(feature = "cli")]
#[test]
fn eval_honours_rslora_alpha_pattern_and_peft_targets_and_refuses_missing_modules() {
    let s = scratch("eval");
    let dir = &s.0;
    save_base(&dir.join("base"), 2, 1);
    save_base(&dir.join("base1"), 1, 1);
    let config = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "fan_in_fan_out": true,
        "alpha_pattern": {"c_fc": 3}, "target_modules": ["c_attn", "c_fc", "c_proj"], "task_type": "CAUSAL_LM"}"#;
    let modules = [
        ("transformer.h.0.attn.c_attn", 4),
        ("transformer.h.1.attn.c_attn", 4),
        ("transformer.h.0.mlp.c_fc", 4),
        ("transformer.h.1.attn.c_proj", 4),
        ("transformer.h.0.mlp.c_proj", 4),
    ];
    write_peft(&dir.join("rs"), config, &modules, 3);
    eval_matches_merge(dir, "base", &["rs"]);
    // A 2-layer adapter on a 1-layer model: refused, naming the module.
    let e = refused(dir, &["eval", "--device", "cpu", "--model", "base1", "--adapter", "rs"], &[], "layer 1");
    assert!(e.contains("transformer.h.1"), "{e}");
}

#[cfg(feature = "cli")]
#[test]
fn eval_of_sums_with_rank_pattern_and_explicit_unilora_matches_merge() {
    use lorafuse::adapter::AdapterWeights;
    use lorafuse::projection::Projection;
    use lorafuse::train::adapters::{AdapterSet, AdapterSpec, Method};
    use lorafuse::train::module::Module;
    let s = scratch("eval-sum");
    let dir = &s.0;
    save_base(&dir.join("base"), 2, 2);
    let config = |r| {
        format!(
            r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": 8, "fan_in_fan_out": true, "target_modules": ["c_attn", "c_fc"]}}"#
        )
    };
    write_peft(&dir.join("a"), &config(4), &[("transformer.h.0.attn.c_attn", 4), ("transformer.h.1.mlp.c_fc", 4)], 5);
    write_peft(&dir.join("b"), &config(2), &[("transformer.h.0.attn.c_attn", 2)], 6);
    ok(dir, &["sum", "a", "b", "--weights", "0.5,2", "--out", "ab"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ab").join(peft::CONFIG_FILE)).unwrap()).unwrap();
    assert!(!cfg["rank_pattern"].as_object().unwrap().is_empty(), "the sum has two ranks: {cfg}");
    let summed = eval_loss(
        &ok(
            dir,
            &[
                "eval",
                "--device",
                "cpu",
                "--model",
                "base",
                "--adapter",
                "ab",
                "--data",
                "embedded:add",
                "--examples",
                "16",
            ],
        ),
        "ab",
    );
    // The merged sum of both is what eval of the sum must give.
    ok(
        dir,
        &[
            "merge",
            "--device",
            "cpu",
            "--base",
            "base/model.safetensors",
            "--out",
            "m.safetensors",
            "--weights",
            "0.5,2",
            "a",
            "b",
        ],
    );
    std::fs::create_dir_all(dir.join("m")).unwrap();
    std::fs::rename(dir.join("m.safetensors"), dir.join("m/model.safetensors")).unwrap();
    std::fs::copy(dir.join("base/config.json"), dir.join("m/config.json")).unwrap();
    let merged = eval_loss(
        &ok(dir, &["eval", "--device", "cpu", "--model", "m", "--data", "embedded:add", "--examples", "16"]),
        "(base)",
    );
    assert!((summed - merged).abs() <= 2e-4, "sum evaluated {summed}, merged {merged}");

    // Uni-LoRA with an explicit assignment (PEFT's own index).
    let cfg = Gpt2Config::new(256, 32, 16, 2, 2).unwrap();
    let spec = AdapterSpec {
        method: Method::parse("unilora:64").unwrap(),
        rank: 2,
        alpha: 2.0,
        targets: Module::ALL.to_vec(),
        seed: 1,
    };
    let mut adapter = AdapterSet::new(&Cpu, &cfg, &spec).unwrap().to_adapter(&Cpu, &cfg).unwrap();
    let AdapterWeights::UniLora(w) = &mut adapter.weights else { panic!("not Uni-LoRA") };
    let mut rng = Rng::new(4);
    w.projection = Projection::explicit((0..w.layout.rows()).map(|_| rng.below(64) as u32).collect(), 64).unwrap();
    w.theta = rng.uniform_vec(64, -2.0, 2.0);
    peft::save_adapter(&dir.join("uni"), &adapter).unwrap();
    eval_matches_merge(dir, "base", &["uni"]);
}

#[cfg(feature = "cli")]
#[test]
fn init_adapter_accepts_peft_gpt2_targets() {
    let s = scratch("init-cproj");
    let dir = &s.0;
    save_base(&dir.join("base"), 1, 3);
    let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": true,
        "target_modules": ["c_attn", "c_proj"]}"#;
    let modules =
        [("transformer.h.0.attn.c_attn", 2), ("transformer.h.0.attn.c_proj", 2), ("transformer.h.0.mlp.c_proj", 2)];
    write_peft(&dir.join("init"), config, &modules, 1);
    ok(
        dir,
        &[
            "train",
            "--device",
            "cpu",
            "--model",
            "base",
            "--data",
            "embedded:add",
            "--method",
            "lora",
            "--rank",
            "2",
            "--alpha",
            "4",
            "--targets",
            "attn.c_attn,attn.c_proj,mlp.c_proj",
            "--steps",
            "1",
            "--batch",
            "2",
            "--init-adapter",
            "init",
            "--out",
            "out",
        ],
    );
}

// ---- 3: merge refuses non-finite results ------------------------------------

#[cfg(feature = "cli")]
#[test]
fn merge_refuses_overflow_to_inf_or_nan() {
    let s = scratch("merge-inf");
    let dir = &s.0;
    save_base(&dir.join("base"), 1, 4);
    let config =
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "fan_in_fan_out": true, "target_modules": ["c_attn"]}"#;
    write_peft(&dir.join("a"), config, &[("transformer.h.0.attn.c_attn", 2)], 2);
    let e = refused(
        dir,
        &[
            "merge",
            "--device",
            "cpu",
            "--base",
            "base/model.safetensors",
            "--out",
            "o.safetensors",
            "--weights",
            "1e300",
            "a",
        ],
        &[],
        "non-finite",
    );
    assert!(e.contains("h.0.attn.c_attn.weight"), "names the tensor: {e}");
    assert!(!dir.join("o.safetensors").exists(), "nothing written");
    // An f16 base overflows at 65504.
    let base = tensor_file::read_safetensors(&dir.join("base/model.safetensors")).unwrap();
    let w = base.tensors["h.0.attn.c_attn.weight"].to_f32_vec("w").unwrap();
    let mut half = TensorFile::default();
    half.tensors.insert("h.0.attn.c_attn.weight".into(), Tensor::from_f32(vec![16, 48], &w, DType::F16).unwrap());
    tensor_file::write_safetensors(&dir.join("half.safetensors"), &half).unwrap();
    refused(
        dir,
        &["merge", "--device", "cpu", "--base", "half.safetensors", "--out", "o.safetensors", "--weights", "1e8", "a"],
        &[],
        "non-finite",
    );
    ok(dir, &["merge", "--device", "cpu", "--base", "half.safetensors", "--out", "o.safetensors", "a"]);
}

// ---- 4: pattern keys are PEFT's anchored regular expressions ------------------

#[test]
fn patterns_match_as_peft_does() {
    let mut c = AdapterConfig::lora(4, 16.0, vec![]);
    c.alpha_pattern = vec![("^transformer.h.0.attn.c_attn".into(), 8.0)];
    assert_eq!(c.alpha_for("transformer.h.0.attn.c_attn"), 8.0, "anchored regex key");
    assert_eq!(c.alpha_for("transformer.h.1.attn.c_attn"), 16.0);
    // First match wins, not the longest key.
    c.alpha_pattern = vec![("c_proj".into(), 7.0), ("mlp.c_proj".into(), 2.0)];
    assert_eq!(c.alpha_for("transformer.h.0.mlp.c_proj"), 7.0);
    c.alpha_pattern = vec![("mlp.c_proj".into(), 2.0), ("c_proj".into(), 7.0)];
    assert_eq!(c.alpha_for("transformer.h.0.mlp.c_proj"), 2.0);
    assert_eq!(c.alpha_for("transformer.h.0.attn.c_proj"), 7.0);
    // Anchored at a module-name boundary: `h.1.attn.c_attn` is not `h.11...`,
    // and `proj` does not match inside `c_proj`.
    c.rank_pattern = vec![("h.1.attn.c_attn".into(), 2), ("proj".into(), 3), (r"h\.[2-3]\..*".into(), 5)];
    assert_eq!(c.rank_for("transformer.h.11.attn.c_attn"), 4);
    assert_eq!(c.rank_for("transformer.h.1.attn.c_attn"), 2);
    assert_eq!(c.rank_for("transformer.h.0.attn.c_proj"), 4);
    assert_eq!(c.rank_for("transformer.h.3.mlp.c_fc"), 5);
    c.rank_pattern = vec![("(unclosed".into(), 2)];
    assert!(c.validate().is_err(), "a key that is not a regex is refused");

    // Read from a file, in the file's order.
    let s = scratch("patterns");
    for (pattern, want) in [(r#"{"c_fc": 7, "mlp.c_fc": 2}"#, 7.0 / 4.0), (r#"{"mlp.c_fc": 2, "c_fc": 7}"#, 2.0 / 4.0)]
    {
        let config = format!(
            r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 16, "alpha_pattern": {pattern}, "target_modules": ["c_fc"]}}"#
        );
        write_peft(&s.0, &config, &[("transformer.h.0.mlp.c_fc", 4)], 1);
        let a = peft::load_adapter(&s.0).unwrap();
        let lorafuse::adapter::AdapterWeights::Modules(m) = &a.weights else { panic!() };
        assert_eq!(m[0].scale, want, "{pattern}");
        // Written back resolved, it still means the same to PEFT.
        let out = s.0.join("back");
        peft::save_adapter(&out, &a).unwrap();
        let b = peft::load_adapter(&out).unwrap();
        let lorafuse::adapter::AdapterWeights::Modules(mb) = &b.weights else { panic!() };
        assert_eq!(mb[0].scale, want);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

// ---- 5, 7: unmodelled parts and mismatched ranks are refused ----------------

#[cfg(feature = "cli")]
#[test]
fn unmodelled_peft_parts_and_rank_mismatches_are_refused_by_name() {
    let s = scratch("unmodelled");
    let dir = &s.0;
    let base = r#""peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"]"#;
    let m = [("transformer.h.0.attn.c_attn", 2)];
    for (extra, needle) in [
        (r#""modules_to_save": ["lm_head"]"#, "modules_to_save"),
        (r#""bias": "lora_only""#, "bias"),
        (r#""trainable_token_indices": [1, 2]"#, "trainable_token_indices"),
    ] {
        write_peft(&dir.join("a"), &format!("{{{base}, {extra}}}"), &m, 1);
        let e = peft::load_adapter(&dir.join("a")).unwrap_err().to_string();
        assert!(e.contains(needle), "{extra}: {e}");
        refused(dir, &["sum", "a", "a", "--out", "s"], &[], needle);
    }
    // The tensors alone (a config that does not say) are refused too.
    write_peft(&dir.join("a"), &format!("{{{base}}}"), &m, 1);
    let mut file = tensor_file::read_safetensors(&dir.join("a").join(peft::WEIGHTS_FILE)).unwrap();
    file.tensors.insert("base_model.model.lm_head.weight".into(), Tensor::f32(vec![2], vec![1.0, 2.0]).unwrap());
    tensor_file::write_safetensors(&dir.join("a").join(peft::WEIGHTS_FILE), &file).unwrap();
    let e = peft::load_adapter(&dir.join("a")).unwrap_err().to_string();
    assert!(e.contains("lm_head"), "{e}");
    // `null` and `[]` mean "none" as in PEFT.
    write_peft(
        &dir.join("a"),
        &format!(r#"{{{base}, "modules_to_save": null, "bias": "none", "layers_to_transform": null}}"#),
        &m,
        1,
    );
    peft::load_adapter(&dir.join("a")).unwrap();

    // A config whose r is not the tensors' rank.
    write_peft(
        &dir.join("r"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["c_attn"]}"#,
        &m,
        1,
    );
    let e = peft::load_adapter(&dir.join("r")).unwrap_err().to_string();
    assert!(e.contains("rank 2") && e.contains("r = 8"), "{e}");
    // ... unless rank_pattern explains it.
    write_peft(
        &dir.join("r"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": {"h.0.attn.c_attn": 2}, "target_modules": ["c_attn"]}"#,
        &m,
        1,
    );
    peft::load_adapter(&dir.join("r")).unwrap();
}

#[test]
fn adapter_directories_are_written_in_one_step() {
    let s = scratch("atomic-dir");
    let dir = s.0.join("adapter");
    write_peft(
        &s.0.join("src"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"]}"#,
        &[("transformer.h.0.attn.c_attn", 2)],
        1,
    );
    let a = peft::load_adapter(&s.0.join("src")).unwrap();
    peft::save_adapter(&dir, &a).unwrap();
    peft::save_adapter(&dir, &a).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&s.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "no temporary directories left: {names:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    peft::load_adapter(&dir).unwrap();
}

// ---- 6, 11, 15: sum writes a config of exactly its modules; no overwrites ----

#[cfg(feature = "cli")]
#[test]
fn sum_names_exactly_its_modules_and_never_overwrites_an_input() {
    let s = scratch("sum-config");
    let dir = &s.0;
    write_peft(
        &dir.join("a"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ".*h\\.0\\.attn\\.c_attn",
            "layers_to_transform": [0], "layers_pattern": "h", "task_type": "CAUSAL_LM"}"#,
        &[("transformer.h.0.attn.c_attn", 2)],
        1,
    );
    write_peft(
        &dir.join("b"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_fc"]}"#,
        &[("transformer.h.1.mlp.c_fc", 2)],
        2,
    );
    ok(dir, &["sum", "a", "b", "--out", "ab"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ab").join(peft::CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
        "{cfg}"
    );
    assert!(cfg.get("layers_to_transform").is_none() && cfg.get("layers_pattern").is_none(), "{cfg}");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    // Outputs that are inputs.
    let before = std::fs::read(dir.join("b").join(peft::WEIGHTS_FILE)).unwrap();
    refused(dir, &["sum", "a", "b", "--out", "b"], &[], "input");
    refused(dir, &["sum", "a", "b", "--out", "./b/"], &[], "input");
    refused(dir, &["compress", "a", "--rank", "1", "--out", "a"], &[], "input");
    assert_eq!(before, std::fs::read(dir.join("b").join(peft::WEIGHTS_FILE)).unwrap());
    save_base(&dir.join("base"), 2, 1);
    let base = std::fs::read(dir.join("base/model.safetensors")).unwrap();
    refused(
        dir,
        &["merge", "--device", "cpu", "--base", "base/model.safetensors", "--out", "base/model.safetensors", "a"],
        &[],
        "input",
    );
    refused(
        dir,
        &["merge", "--device", "cpu", "--base", "base/model.safetensors", "--out", "a/x.safetensors", "a"],
        &[],
        "input",
    );
    assert_eq!(base, std::fs::read(dir.join("base/model.safetensors")).unwrap());
}

#[cfg(feature = "cli")]
#[test]
fn trained_adapters_carry_task_type_and_keep_lorafuse_metadata_out_of_the_config() {
    let s = scratch("task-type");
    let dir = &s.0;
    let mut args = TRAIN.to_vec();
    args.extend(["--steps", "1", "--out", "out"]);
    ok(dir, &args);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out").join(peft::CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
    assert!(
        cfg.as_object().unwrap().keys().all(|k| !k.starts_with("lorafuse")),
        "PEFT warns about unknown keys: {cfg}"
    );
    let a = peft::load_adapter(&dir.join("out")).unwrap();
    assert_eq!(a.config.extra.get("lorafuse_method"), Some(&serde_json::Value::from("lora")));
    assert_eq!(a.config.kind, AdapterKind::Lora);
}

// ---- 8, 10, 16: checkpoints and outputs are never lost ------------------------

#[cfg(feature = "cli")]
#[test]
fn checkpoint_dirs_of_other_runs_plots_and_stale_files_lose_nothing() {
    let s = scratch("ckpt-dirs");
    let dir = &s.0;
    let mut first = TRAIN.to_vec();
    first.extend(["--steps", "4", "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--out", "o1"]);
    ok(dir, &first);
    // A fresh run in a directory that holds another run's checkpoints.
    let mut second = TRAIN.to_vec();
    second.extend(["--steps", "2", "--checkpoint-dir", "ck", "--checkpoint-every", "1", "--out", "o2"]);
    refused(dir, &second, &[], "--resume");
    assert!(dir.join("ck/step-00000004/state.json").exists());
    // Stale temporaries of a killed run are cleaned up by the next write.
    std::fs::create_dir_all(dir.join("ck2/.step-00000001.tmp")).unwrap();
    std::fs::write(dir.join("ck2/.latest.tmp.1.1"), "x").unwrap();
    // The plot cannot be written (a directory is in the way): the adapter is
    // still saved and the run succeeds with a warning.
    std::fs::create_dir_all(dir.join("o3/loss.svg/blocker")).unwrap();
    let mut third = TRAIN.to_vec();
    third.extend(["--steps", "2", "--checkpoint-dir", "ck2", "--checkpoint-every", "1", "--out", "o3"]);
    let text = ok(dir, &third);
    assert!(text.contains("warning") && text.contains("loss"), "{text}");
    peft::load_adapter(&dir.join("o3")).unwrap();
    let left: Vec<String> = std::fs::read_dir(dir.join("ck2"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.starts_with('.')), "stale temporaries left: {left:?}");
    // A checkpoint dir that is a file is refused before any training.
    std::fs::write(dir.join("file"), "x").unwrap();
    let mut fourth = TRAIN.to_vec();
    fourth.extend(["--steps", "2", "--checkpoint-dir", "file", "--out", "o4"]);
    refused(dir, &fourth, &[], "is a file");
    assert!(!dir.join("o4").exists());
    // Resume with nothing to resume says so.
    refused(dir, &["train", "--device", "cpu", "--checkpoint-dir", "empty", "--resume"], &[], "nothing to resume");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    refused(dir, &["train", "--device", "cpu", "--checkpoint-dir", "empty", "--resume"], &[], "no complete checkpoint");
}

#[cfg(feature = "cli")]
#[test]
fn corrupt_optimizer_moments_are_refused() {
    use lorafuse::train::checkpoint::read_checkpoint;
    let s = scratch("moments");
    let dir = &s.0;
    let mut args = TRAIN.to_vec();
    args.extend(["--steps", "1", "--checkpoint-dir", "ck", "--checkpoint-every", "1", "--out", "o"]);
    ok(dir, &args);
    let ck = dir.join("ck/step-00000001");
    let path = ck.join("optimizer.safetensors");
    let good = tensor_file::read_safetensors(&path).unwrap();
    read_checkpoint(&ck).unwrap();
    for (suffix, value, needle) in [(".adam_m", f32::NAN, "non-finite"), (".adam_v", -1.0, "negative")] {
        let mut bad = good.clone();
        let (name, t) = bad.tensors.iter_mut().find(|(k, _)| k.ends_with(suffix)).unwrap();
        let name = name.clone();
        let mut v = t.to_f32_vec(&name).unwrap();
        v[0] = value;
        *t = Tensor::f32(t.shape.clone(), v).unwrap();
        tensor_file::write_safetensors(&path, &bad).unwrap();
        let e = read_checkpoint(&ck).expect_err("corrupt moments accepted").to_string();
        assert!(e.contains(needle) && e.contains("optimizer.safetensors"), "{e}");
    }
}

// ---- 12, 13: typed errors instead of panics and huge allocations -------------

#[cfg(feature = "cli")]
#[test]
fn zero_and_absurd_sizes_are_typed_errors_before_allocating() {
    let s = scratch("sizes");
    let dir = &s.0;
    save_base(&dir.join("base"), 1, 1);
    std::fs::write(dir.join("t.txt"), "hello world, a small text file ".repeat(20)).unwrap();
    for data in ["text:t.txt", "embedded:add"] {
        refused(dir, &["eval", "--device", "cpu", "--model", "base", "--data", data, "--seq", "0"], &[], "seq");
    }
    refused(
        dir,
        &["eval", "--device", "cpu", "--model", "base", "--data", "text:t.txt", "--seq", "33"],
        &[],
        "n_positions",
    );
    let mut args = TRAIN.to_vec();
    args.extend(["--steps", "1", "--seq", "0"]);
    refused(dir, &args, &[], "seq");
    // Sizes far beyond memory: a budget of 1 GiB makes the check independent
    // of the machine (and keeps a regression from allocating).
    let budget = [("LORAFUSE_MEMORY_BUDGET", "1g")];
    let train = |extra: &[&str]| {
        let mut a: Vec<&str> = vec!["train", "--device", "cpu", "--data", "embedded:add", "--steps", "1"];
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for extra in [
        &["--model", "random:1,100000,1"][..],
        &["--model", "random:1,16,2", "--method", "unilora:4294967295"],
        &["--model", "random:1,16,2", "--batch", "100000000"],
    ] {
        let a = train(extra);
        refused(dir, &a.iter().map(String::as_str).collect::<Vec<_>>(), &budget, "memory budget");
    }
    // A config.json that claims 10^15 layers beside a small model.
    std::fs::create_dir_all(dir.join("huge")).unwrap();
    std::fs::copy(dir.join("base/model.safetensors"), dir.join("huge/model.safetensors")).unwrap();
    std::fs::write(
        dir.join("huge/config.json"),
        r#"{"vocab_size": 256, "n_positions": 32, "n_embd": 16, "n_layer": 1000000000000000, "n_head": 2}"#,
    )
    .unwrap();
    refused(dir, &["eval", "--device", "cpu", "--model", "huge"], &budget, "memory budget");
    // A 1 KB Uni-LoRA adapter whose layout claims 2^30 rows.
    let config = r#"{"peft_type": "LORAFUSE_UNILORA", "r": 2, "lora_alpha": 2, "lorafuse_unilora": {"seed": "1", "d": 4,
        "assignment": "hash", "layout": {"rows": 1073741824, "dtype": "f32", "segments": [
        {"name": "transformer.h.0.attn.c_attn.lora_A", "start": 0, "shape": [32768, 16384]},
        {"name": "transformer.h.0.attn.c_attn.lora_B", "start": 536870912, "shape": [16384, 32768]}]}}}"#;
    std::fs::create_dir_all(dir.join("uni")).unwrap();
    std::fs::write(dir.join("uni").join(peft::CONFIG_FILE), config).unwrap();
    let mut file = TensorFile::default();
    file.tensors.insert("base_model.unilora_theta_d".into(), Tensor::f32(vec![4], vec![0.1; 4]).unwrap());
    tensor_file::write_safetensors(&dir.join("uni").join(peft::WEIGHTS_FILE), &file).unwrap();
    refused(dir, &["similarity", "uni", "uni"], &budget, "memory budget");
    refused(dir, &["compress", "uni", "--rank", "1", "--out", "c"], &budget, "memory budget");
}

#[cfg(feature = "cli")]
#[test]
fn non_finite_tensors_name_their_file_and_compress_prints_no_negative_zero() {
    let s = scratch("nonfinite");
    let dir = &s.0;
    write_peft(
        &dir.join("a"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"]}"#,
        &[("transformer.h.0.attn.c_attn", 2)],
        1,
    );
    let text = ok(dir, &["compress", "a", "--rank", "2", "--out", "c"]);
    assert!(!text.contains("-0.0000%"), "{text}");
    let path = dir.join("a").join(peft::WEIGHTS_FILE);
    let mut file = tensor_file::read_safetensors(&path).unwrap();
    let t = file.tensors.get_mut("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight").unwrap();
    let mut v = t.to_f32_vec("a").unwrap();
    v[3] = f32::INFINITY;
    *t = Tensor::f32(t.shape.clone(), v).unwrap();
    tensor_file::write_safetensors(&path, &file).unwrap();
    let e = peft::load_adapter(&dir.join("a")).unwrap_err().to_string();
    assert!(e.contains(peft::WEIGHTS_FILE) && e.contains("lora_A"), "{e}");
}

// ---- a run killed at every rename of its checkpoints resumes exactly -------

#[cfg(feature = "cli")]
#[test]
fn a_run_killed_at_every_checkpoint_rename_resumes_bit_identically() {
    let s = scratch("kill");
    let dir = &s.0;
    let mut reference = TRAIN.to_vec();
    reference.extend(["--steps", "4", "--checkpoint-dir", "ref-ck", "--checkpoint-every", "2", "--out", "ref"]);
    ok(dir, &reference);
    let want = tensors(&dir.join("ref"));
    let mut run = TRAIN.to_vec();
    run.extend(["--steps", "4", "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--out", "out"]);
    for n in 1..60 {
        let _ = std::fs::remove_dir_all(dir.join("ck"));
        let _ = std::fs::remove_dir_all(dir.join("out"));
        let n_text = n.to_string();
        let (code, text) = cli(dir, &run, &[(lorafuse::atomic_file::FAULT_RENAME_ENV, &n_text)]);
        if code == 0 {
            // Past the last rename: the run completed untouched.
            assert!(n > 10, "only {} renames seen: the hook is not on the checkpoint path", n - 1);
            assert_eq!(tensors(&dir.join("out")), want);
            return;
        }
        assert!(text.contains("aborting before rename"), "rename {n}: the run failed otherwise:\n{text}");
        // What a user does next: resume when a checkpoint is complete, else
        // start again.
        let complete = lorafuse::train::checkpoint::latest_checkpoint(&dir.join("ck")).is_ok();
        let text = if complete {
            ok(
                dir,
                &[
                    "train",
                    "--device",
                    "cpu",
                    "--checkpoint-dir",
                    "ck",
                    "--checkpoint-every",
                    "2",
                    "--resume",
                    "--out",
                    "out",
                ],
            )
        } else {
            ok(dir, &run)
        };
        assert_eq!(
            tensors(&dir.join("out")),
            want,
            "killed before rename {n}, then {}:\n{text}",
            if complete { "resumed" } else { "restarted" }
        );
    }
    panic!("the run never completed");
}
