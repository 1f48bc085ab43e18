//! The `lorafuse train` and `eval` commands, driven as a user would: a run
//! from a TOML file that resumes and evaluates, a run started from an
//! initial adapter with sequential batches (the same losses as the library
//! gives), and a Uni-LoRA run from an explicit assignment. They need the
//! binary, so the `cli` feature.
#![cfg(feature = "cli")]

mod common;

use common::trainer::{losses, nonzero_lora, small_base};
use lorafuse::cpu::Cpu;
use lorafuse::nn::SeqShape;
use lorafuse::rng::Rng;
use lorafuse::train::adapters::{AdapterSet, AdapterSpec, Method};
use lorafuse::train::data::Dataset;
use lorafuse::train::model::{Batch, Gpt2};
use lorafuse::train::module::Module;
use lorafuse::train::trainer::{TrainConfig, Trainer};

#[test]
fn cli_trains_from_a_toml_file_resumes_and_evaluates() {
    let dir = std::env::temp_dir().join(format!("lorafuse-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    small_base(3).save(&Cpu, &dir.join("base")).unwrap();
    std::fs::write(
        dir.join("run.toml"),
        "model = \"base\"\ndata = \"embedded:recall\"\nout = \"adapter\"\ncheckpoint_dir = \"ck\"\ncheckpoint_every = 2\n\
         [train]\nmethod = \"unilora:300\"\nsteps = 4\nbatch = 2\neval_examples = 8\n[train.optim]\nlr_theta = 0.01\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse")).args(args).current_dir(&dir).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = run(&["train", "--config", "run.toml"]);
    assert!(ok && text.contains("trainable parameters: 300"), "{text}");
    assert!(dir.join("adapter/adapter_model.safetensors").exists() && dir.join("ck/step-00000004/state.json").exists());
    let lines = std::fs::read_to_string(dir.join("adapter/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 5, "one JSON line per iteration plus the final report:\n{lines}");
    let (ok, text) = run(&["train", "--config", "run.toml", "--resume", "--steps", "6"]);
    assert!(ok && text.contains("resuming from"), "{text}");
    let (ok, text) =
        run(&["eval", "--model", "base", "--adapter", "adapter", "--data", "embedded:recall", "--examples", "8"]);
    assert!(ok && text.contains("(base)") && text.contains("adapter"), "{text}");
    let (ok, text) = run(&["train", "--config", "run.toml", "--rank", "0", "--method", "lora"]);
    assert!(!ok && text.contains("r = 0"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_starts_from_an_init_adapter_with_sequential_batches() {
    use lorafuse::train::data::write_llmc_tokens;
    let dir = std::env::temp_dir().join(format!("lorafuse-cli-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = small_base(3);
    base.save(&Cpu, &dir.join("base")).unwrap();
    let mut rng = Rng::new(11);
    let tokens: Vec<u32> = (0..400).map(|_| 32 + rng.below(64) as u32).collect();
    write_llmc_tokens(&dir.join("data.bin"), &tokens).unwrap();
    let init = nonzero_lora(5);
    lorafuse::peft::save_adapter(&dir.join("init"), &init.to_adapter(&Cpu, &base.config).unwrap()).unwrap();
    std::fs::write(dir.join("run.toml"), "[train.optim]\nschedule = \"constant\"\nclip_norm = 0.0\n").unwrap();
    let run = |extra: &[&str]| {
        let defaults = [
            ("--data", "tokens:data.bin"),
            ("--method", "lora"),
            ("--rank", "2"),
            ("--alpha", "4"),
            ("--steps", "3"),
            ("--batch", "2"),
            ("--seq", "16"),
            ("--warmup", "0"),
            ("--lr", "0.01"),
            ("--out", "out"),
        ];
        let mut args = vec!["train", "--device", "cpu", "--config", "run.toml", "--model", "base"];
        // A flag in `extra` replaces its default.
        for (flag, value) in defaults.iter().filter(|(f, _)| !extra.contains(f)) {
            args.extend([*flag, *value]);
        }
        args.extend_from_slice(extra);
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse")).args(&args).current_dir(&dir).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = run(&["--init-adapter", "init", "--sequential-batches"]);
    assert!(ok, "{text}");
    let got: Vec<f64> = std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect();

    // The same run through the library: identical losses (same CPU code).
    let data = Dataset::llmc(&dir.join("data.bin"), 256).unwrap();
    let mut c = TrainConfig {
        method: "lora".into(),
        rank: 2,
        alpha: 4.0,
        steps: 3,
        batch: 2,
        seq: 16,
        sequential_batches: true,
        ..TrainConfig::default()
    };
    c.optim.lr = 0.01;
    c.optim.warmup = 0;
    c.optim.clip_norm = 0.0;
    c.optim.schedule = lorafuse::train::optimizer::Schedule::Constant;
    let mut t = Trainer::new(Cpu, Gpt2::<Cpu>::load(&Cpu, &dir.join("base")).unwrap(), data.clone(), c).unwrap();
    let loaded = lorafuse::peft::load_adapter(&dir.join("init")).unwrap();
    t.adapters.as_mut().unwrap().load_values(&Cpu, &loaded).unwrap();
    let want = losses(&mut t, 3);
    // (serde_json's float parsing may move the last bit.)
    assert_eq!(got.len(), 3, "one loss per step");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-12 * w.abs(), "CLI losses {got:?} vs library losses {want:?}");
    }

    // Step 1's loss is the initial adapter's loss on windows 0 and 1,
    // computed independently of the trainer, and differs from the base's.
    let host = data.sequential_batch(0, 2, 16).unwrap();
    assert_eq!(host.tokens[..16], tokens[..16], "first row is the stream's first window");
    let batch = Batch::upload(&Cpu, SeqShape { batch: 2, seq: 16 }, &host.tokens, &host.targets).unwrap();
    let mut model = Gpt2::<Cpu>::load(&Cpu, &dir.join("base")).unwrap();
    let mut set = nonzero_lora(5);
    let with = model.run(&Cpu, Some(&mut set), &batch, false).unwrap().mean_loss();
    let without = model.run(&Cpu, None, &batch, false).unwrap().mean_loss();
    assert!((got[0] - with).abs() < 1e-9 * with.abs(), "step-1 loss {} vs adapter loss {with}", got[0]);
    assert!((with - without).abs() > 1e-4, "the init adapter must change the loss ({with} vs {without})");

    // Mismatches are refused, naming the fix.
    let (ok, text) = run(&["--init-adapter", "init", "--rank", "4"]);
    assert!(!ok && text.contains("--rank/--alpha"), "{text}");
    let (ok, text) = run(&["--init-adapter", "init", "--targets", "attn.c_attn"]);
    assert!(!ok && text.contains("--targets"), "{text}");
    let (ok, text) = run(&["--init-adapter", "init", "--method", "vera"]);
    assert!(!ok, "a LoRA adapter cannot start a VeRA run: {text}");
    let (ok, text) = run(&["--init-adapter", "init", "--method", "full"]);
    assert!(!ok && text.contains("full fine-tuning"), "{text}");
    let (ok, text) = run(&["--init-adapter", "missing"]);
    assert!(!ok && text.contains("missing"), "{text}");
    let (ok, text) = run(&["--sequential-batches", "--data", "embedded:add"]);
    assert!(!ok && text.contains("token streams"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_starts_a_unilora_run_from_an_explicit_assignment() {
    // What peft_compare.py hands lorafuse for PEFT's Uni-LoRA: PEFT's own
    // index per element of θ_D (an explicit assignment) and its θ_d.
    use lorafuse::adapter::AdapterWeights;
    use lorafuse::projection::{Assignment, Projection};
    use lorafuse::train::data::write_llmc_tokens;
    let dir = std::env::temp_dir().join(format!("lorafuse-cli-uni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = small_base(3);
    base.save(&Cpu, &dir.join("base")).unwrap();
    let mut rng = Rng::new(12);
    let tokens: Vec<u32> = (0..400).map(|_| 32 + rng.below(64) as u32).collect();
    write_llmc_tokens(&dir.join("data.bin"), &tokens).unwrap();
    let spec = AdapterSpec {
        method: Method::parse("unilora:64").unwrap(),
        rank: 2,
        alpha: 2.0,
        targets: Module::ALL.to_vec(),
        seed: 1,
    };
    let mut adapter = AdapterSet::new(&Cpu, &base.config, &spec).unwrap().to_adapter(&Cpu, &base.config).unwrap();
    let AdapterWeights::UniLora(w) = &mut adapter.weights else { panic!("a Uni-LoRA set gives a Uni-LoRA adapter") };
    let index: Vec<u32> = (0..w.layout.rows()).map(|_| rng.below(64) as u32).collect();
    w.projection = Projection::explicit(index, 64).unwrap();
    w.theta = rng.uniform_vec(64, -0.5, 0.5);
    lorafuse::peft::save_adapter(&dir.join("init"), &adapter).unwrap();

    let args = [
        "train",
        "--device",
        "cpu",
        "--model",
        "base",
        "--data",
        "tokens:data.bin",
        "--method",
        "unilora:64",
        "--rank",
        "2",
        "--alpha",
        "2",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq",
        "16",
        "--init-adapter",
        "init",
        "--sequential-batches",
        "--out",
        "out",
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse")).args(args).current_dir(&dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    let first: f64 = std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .unwrap();

    // Step 1's loss is the loss of that θ_d through that assignment.
    let host = Dataset::llmc(&dir.join("data.bin"), 256).unwrap().sequential_batch(0, 2, 16).unwrap();
    let batch = Batch::upload(&Cpu, SeqShape { batch: 2, seq: 16 }, &host.tokens, &host.targets).unwrap();
    let mut model = Gpt2::<Cpu>::load(&Cpu, &dir.join("base")).unwrap();
    let mut set = AdapterSet::new(&Cpu, &base.config, &spec).unwrap();
    let fresh = model.run(&Cpu, Some(&mut set), &batch, false).unwrap().mean_loss();
    set.load_values(&Cpu, &lorafuse::peft::load_adapter(&dir.join("init")).unwrap()).unwrap();
    let want = model.run(&Cpu, Some(&mut set), &batch, false).unwrap().mean_loss();
    assert!((first - want).abs() < 1e-9 * want.abs(), "step-1 loss {first} vs {want}");
    assert!((want - fresh).abs() > 1e-4, "the explicit assignment must matter ({want} vs {fresh})");
    // The trained adapter keeps the explicit assignment.
    let saved = lorafuse::peft::load_adapter(&dir.join("out")).unwrap();
    let AdapterWeights::UniLora(w) = &saved.weights else { panic!("saved adapter is not Uni-LoRA") };
    assert_eq!(w.projection.assignment(), Assignment::Explicit);
    let _ = std::fs::remove_dir_all(&dir);
}
