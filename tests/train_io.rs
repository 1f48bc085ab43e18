//! The trainer's files and data: model and adapter files round-trip and
//! hostile ones (and llm.c token files) are refused, the embedded data sets
//! are deterministic and held out, and sequential batches walk a token
//! stream in order (what scripts/peft_compare.py relies on).

mod common;

use common::trainer::{fixed_stream, losses, overfit_config, small_base};
use lorafuse::cpu::Cpu;
use lorafuse::nn::IGNORE;
use lorafuse::train::adapters::AdapterSet;
use lorafuse::train::data::{Corpus, Dataset};
use lorafuse::train::model::Gpt2;
use lorafuse::train::trainer::Trainer;

#[test]
fn model_and_adapter_files_round_trip_and_hostile_token_files_are_rejected() {
    let dir = std::env::temp_dir().join(format!("lorafuse-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Model: save (HF layout, Conv1D transposed) and load give the same bits.
    let model = small_base(7);
    model.save(&Cpu, &dir.join("model")).unwrap();
    let loaded = Gpt2::<Cpu>::load(&Cpu, &dir.join("model")).unwrap();
    assert!(loaded.params == model.params && loaded.config == model.config, "model round trip changed weights");
    let st = lorafuse::tensor_file::read_safetensors(&dir.join("model/model.safetensors")).unwrap();
    assert_eq!(st.tensors["h.0.attn.c_attn.weight"].shape, vec![32, 96], "Conv1D weights are stored (in, out)");
    // Adapter: train briefly, save in PEFT format, reload into a fresh set:
    // the evaluation is identical.
    for method in ["lora", "tied:vBu", "vera", "unilora-balanced:200"] {
        let mut t = Trainer::new(Cpu, small_base(7), fixed_stream(1), overfit_config(method, 4)).unwrap();
        losses(&mut t, 4);
        let path = dir.join(method.replace(':', "_"));
        t.save_result(&path).unwrap();
        let want = t.evaluate().unwrap();
        let adapter = lorafuse::peft::load_adapter(&path).unwrap();
        let spec = lorafuse::train::checkpoint::spec_for(&adapter).unwrap();
        let mut set = AdapterSet::new(&Cpu, &t.model.config, &spec).unwrap();
        set.load_values(&Cpu, &adapter).unwrap();
        let mut base = small_base(7);
        let got = lorafuse::train::trainer::evaluate(&Cpu, &mut base, Some(&mut set), &t.data, 8, 32, 200).unwrap();
        assert_eq!(got, want, "{method}: evaluation after save/load differs");
    }
    // Hostile model files: a missing tensor, a shape that contradicts
    // config.json, a NaN weight and a truncated file are errors.
    let mdir = dir.join("model");
    let good = lorafuse::tensor_file::read_safetensors(&mdir.join("model.safetensors")).unwrap();
    type Breaker = fn(&mut lorafuse::tensor_file::TensorFile);
    let cases: [(&str, Breaker); 3] = [
        ("is missing", |f| {
            f.tensors.remove("h.1.mlp.c_fc.bias");
        }),
        ("config.json implies", |f| {
            let t = f.tensors.get_mut("h.0.attn.c_attn.weight").unwrap();
            t.shape = vec![96, 32];
        }),
        ("non-finite", |f| {
            let t = f.tensors.get_mut("wpe.weight").unwrap();
            if let lorafuse::tensor_file::TensorData::F32(v) = &mut t.data {
                v[3] = f32::NAN;
            }
        }),
    ];
    for (want, break_it) in cases {
        let mut f = good.clone();
        break_it(&mut f);
        lorafuse::tensor_file::write_safetensors(&mdir.join("model.safetensors"), &f).unwrap();
        let err = Gpt2::<Cpu>::load(&Cpu, &mdir).err().expect("hostile model accepted").to_string();
        assert!(err.contains(want), "expected `{want}`: {err}");
    }
    let bytes = std::fs::read(dir.join("model/config.json")).unwrap();
    lorafuse::tensor_file::write_safetensors(&mdir.join("model.safetensors"), &good).unwrap();
    let full = std::fs::read(mdir.join("model.safetensors")).unwrap();
    std::fs::write(mdir.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    assert!(Gpt2::<Cpu>::load(&Cpu, &mdir).is_err(), "truncated model accepted");
    std::fs::write(mdir.join("config.json"), b"{\"n_embd\": 0}").unwrap();
    assert!(Gpt2::<Cpu>::load(&Cpu, &mdir).is_err());
    std::fs::write(mdir.join("config.json"), bytes).unwrap();
    // llm.c token files: round trip, then a wrong magic, a truncated body
    // and a lying count are rejected with a format error.
    use lorafuse::train::data::{read_llmc_tokens, write_llmc_tokens};
    let p = dir.join("tokens.bin");
    write_llmc_tokens(&p, &[1, 2, 50000, 7]).unwrap();
    assert_eq!(read_llmc_tokens(&p).unwrap(), vec![1, 2, 50000, 7]);
    let good = std::fs::read(&p).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 1;
    std::fs::write(&p, &bad).unwrap();
    assert!(read_llmc_tokens(&p).unwrap_err().to_string().contains("magic"));
    std::fs::write(&p, &good[..good.len() - 1]).unwrap();
    assert!(read_llmc_tokens(&p).unwrap_err().to_string().contains("bytes follow"));
    std::fs::write(&p, &good[..100]).unwrap();
    assert!(read_llmc_tokens(&p).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn embedded_data_is_deterministic_held_out_and_scored_on_answers() {
    let a = Dataset::embedded(&lorafuse::train::data::DOMAINS, 50, 10, 9).unwrap();
    let b = Dataset::embedded(&lorafuse::train::data::DOMAINS, 50, 10, 9).unwrap();
    let (Corpus::Examples(tr), Corpus::Examples(ev)) = (&a.train, &a.eval) else { panic!("examples expected") };
    let Corpus::Examples(ev_b) = &b.eval else { panic!() };
    assert_eq!(ev, ev_b, "same seed, different data");
    assert_eq!((tr.len(), ev.len()), (200, 40));
    assert!(ev.iter().all(|e| tr.iter().all(|t| t.prompt != e.prompt)), "an eval prompt is in the training set");
    let text = |e: &lorafuse::train::data::Example| {
        e.prompt.iter().chain(&e.answer).map(|&c| c as u8 as char).collect::<String>()
    };
    assert!(ev.iter().any(|e| text(e).starts_with("sort:")), "{:?}", text(&ev[0]));
    for e in tr.iter() {
        let s = text(e);
        if let Some((lhs, rhs)) = s.split_once('=') {
            let (x, y) = lhs.split_once('+').unwrap();
            assert_eq!(
                rhs.trim().parse::<u64>().unwrap(),
                x.parse::<u64>().unwrap() + y.parse::<u64>().unwrap(),
                "{s}"
            );
        }
    }
    // Eval rows score exactly the answer tokens.
    let batches = a.eval_batches(16, 32, 40);
    let scored: usize = batches.iter().flat_map(|b| &b.targets).filter(|&&t| t != IGNORE).count();
    assert_eq!(scored, ev.iter().map(|e| e.answer.len()).sum::<usize>());
    assert_eq!(batches.iter().map(|b| b.rows).sum::<usize>(), 40);
}

#[test]
fn sequential_batches_walk_the_stream_in_order_and_wrap() {
    let tokens: Vec<u32> = (0..50).collect();
    let data = Dataset::stream("ramp", tokens, 256).unwrap();
    // 45 training tokens, seq 8: W = 44 / 8 = 5 windows.
    let (rows, seq) = (3, 8);
    for index in 0..4u64 {
        let b = data.sequential_batch(index, rows, seq).unwrap();
        for j in 0..rows {
            let w = ((index as usize) * rows + j) % 5;
            let want: Vec<u32> = (w * seq..w * seq + seq).map(|t| t as u32).collect();
            assert_eq!(b.tokens[j * seq..(j + 1) * seq], want[..], "batch {index} row {j}: tokens of window {w}");
            let next: Vec<u32> = want.iter().map(|t| t + 1).collect();
            assert_eq!(b.targets[j * seq..(j + 1) * seq], next[..], "batch {index} row {j}: targets shift by one");
        }
    }
    let examples = Dataset::embedded(&["add"], 10, 2, 0).unwrap();
    let e = examples.sequential_batch(0, 1, 8).unwrap_err().to_string();
    assert!(e.contains("token streams"), "{e}");
    assert!(data.sequential_batch(0, 1, 45).is_err(), "a window longer than the stream must be refused");
}
