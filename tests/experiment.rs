//! The summation experiment: its seeding and data invariants, the
//! combination logic, the fit statistics, and resuming a run.

use lorafuse::cpu::Cpu;
use lorafuse::train::adapters::AdapterSet;
use lorafuse::train::config::Gpt2Config;
use lorafuse::train::data::{Corpus, Dataset, Example};
use lorafuse::train::trainer::TrainConfig;
use lorafuse::Backend;

fn examples(c: &Corpus) -> &[Example] {
    match c {
        Corpus::Examples(e) => e,
        Corpus::Stream(_) => panic!("embedded data is examples"),
    }
}

/// A domain's examples must not depend on where it stands in the list:
/// `embedded:add,sort` and `embedded:sort` give the same `sort` data.
#[test]
fn domain_data_does_not_depend_on_its_position() {
    let alone = Dataset::embedded(&["sort"], 300, 40, 7).unwrap();
    let second = Dataset::embedded(&["add", "sort"], 300, 40, 7).unwrap();
    assert_eq!(examples(&alone.train), &examples(&second.train)[300..]);
    assert_eq!(examples(&alone.eval), &examples(&second.eval)[40..]);
}

fn first_a(config: &TrainConfig) -> Vec<f32> {
    let model = Gpt2Config::new(256, 32, 16, 1, 2).unwrap();
    let set = AdapterSet::new(&Cpu, &model, &config.spec().unwrap()).unwrap();
    let a = set.mats.iter().find(|m| m.name.ends_with("lora_A")).unwrap();
    Cpu.download(&a.data).unwrap()
}

/// The adapter initialisation has its own seed: two runs that differ only
/// in `init_seed` start from different `A`, and changing the data seed
/// alone leaves the initialisation as it is.
#[test]
fn init_seed_is_independent_of_the_data_seed() {
    let base = TrainConfig { seed: 3, init_seed: Some(11), ..TrainConfig::default() };
    let other_init = TrainConfig { init_seed: Some(12), ..base.clone() };
    let other_data = TrainConfig { seed: 4, ..base.clone() };
    assert_ne!(first_a(&base), first_a(&other_init));
    assert_eq!(first_a(&base), first_a(&other_data));
    // Unset, it follows the run's seed (what single runs always did).
    let unset = TrainConfig { seed: 11, init_seed: None, ..TrainConfig::default() };
    assert_eq!(first_a(&unset), first_a(&base));
}

// ---- combinations and statistics ---------------------------------------------

use lorafuse::experiment::domains::{self, check_held_out_disjoint, Domain};
use lorafuse::experiment::stats::{combinations, linear_fit, ranks, spearman};

#[test]
fn combinations_are_every_subset_once_in_order() {
    let pairs = combinations(4, 2);
    assert_eq!(pairs, vec![vec![0, 1], vec![0, 2], vec![0, 3], vec![1, 2], vec![1, 3], vec![2, 3]]);
    assert_eq!(combinations(4, 3), vec![vec![0, 1, 2], vec![0, 1, 3], vec![0, 2, 3], vec![1, 2, 3]]);
    assert_eq!(combinations(3, 3), vec![vec![0, 1, 2]]);
    assert!(combinations(2, 3).is_empty());
    assert!(combinations(4, 0).is_empty());
    // n choose k distinct, strictly increasing subsets, for a few n, k.
    for (n, k, count) in [(5, 2, 10), (5, 3, 10), (6, 3, 20), (7, 4, 35)] {
        let c = combinations(n, k);
        assert_eq!(c.len(), count, "{n} choose {k}");
        assert!(c.iter().all(|s| s.len() == k && s.windows(2).all(|w| w[0] < w[1]) && s[k - 1] < n));
        assert!(c.windows(2).all(|w| w[0] < w[1]), "lexicographic, no repeats");
    }
}

#[test]
fn fit_statistics_on_known_data() {
    // A textbook example: y on x with SS_res = 2.4, SS_tot = 6.
    let f = linear_fit(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 4.0, 5.0, 4.0, 5.0]).unwrap();
    assert_eq!(f.n, 5);
    assert!((f.slope - 0.6).abs() < 1e-12, "{f:?}");
    assert!((f.intercept - 2.2).abs() < 1e-12, "{f:?}");
    assert!((f.r_squared - 0.6).abs() < 1e-12, "{f:?}");
    assert!((f.pearson - 0.6f64.sqrt()).abs() < 1e-12, "{f:?}");
    // An exact line.
    let g = linear_fit(&[0.1, 0.4, 0.2], &[2.3, 3.2, 2.6]).unwrap();
    assert!((g.slope - 3.0).abs() < 1e-12 && (g.intercept - 2.0).abs() < 1e-12 && (g.r_squared - 1.0).abs() < 1e-12);
    // Ties share their mean rank: ρ = 8 / √95 for these.
    assert_eq!(ranks(&[1.0, 3.0, 2.0, 3.0, 5.0]), vec![1.0, 3.5, 2.0, 3.5, 5.0]);
    assert!((spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[1.0, 3.0, 2.0, 3.0, 5.0]) - 8.0 / 95f64.sqrt()).abs() < 1e-12);
    // Monotone but not linear: rank correlation 1, Pearson below it.
    let x = [0.5, 1.0, 2.0, 3.0];
    let y: Vec<f64> = x.iter().map(|v: &f64| v.powi(3)).collect();
    let h = linear_fit(&x, &y).unwrap();
    assert!((h.spearman - 1.0).abs() < 1e-12 && h.pearson < 0.99);
    assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    // No slope without spread in x, or with fewer than two points.
    assert!(linear_fit(&[1.0, 1.0], &[2.0, 3.0]).is_none());
    assert!(linear_fit(&[1.0], &[2.0]).is_none());
    assert!(linear_fit(&[1.0, f64::NAN], &[2.0, 3.0]).is_none());
}

// ---- held-out data -------------------------------------------------------------

#[test]
fn held_out_sets_never_meet_a_training_set() {
    let d = domains::embedded(&lorafuse::train::data::DOMAINS, 4000, 400, 0).unwrap();
    check_held_out_disjoint(&d, 32).unwrap();
    // Every pair's merged training data against every member's held-out set,
    // directly.
    for c in combinations(d.len(), 2) {
        let members: Vec<&Domain> = c.iter().map(|&i| &d[i]).collect();
        let merged = domains::combined(&members).unwrap();
        let train: std::collections::HashSet<&[u32]> = examples(&merged.train).iter().map(|e| &e.prompt[..]).collect();
        for m in &members {
            assert!(examples(&m.data.eval).iter().all(|e| !train.contains(&e.prompt[..])));
        }
    }
    // Held-out data of one seed against training data of another (what a
    // run mixing seeds would do): `sort` has few distinct prompts, so
    // they meet, and the check names both domains.
    let a = Domain::new("sort-a", Dataset::embedded(&["sort"], 4000, 200, 0).unwrap()).unwrap();
    let b = Domain::new("sort-b", Dataset::embedded(&["sort"], 4000, 200, 1).unwrap()).unwrap();
    let e = check_held_out_disjoint(&[a, b], 32).unwrap_err().to_string();
    assert!(e.contains("sort-a") && e.contains("sort-b"), "{e}");
}

#[test]
fn held_out_windows_of_streams_are_checked() {
    let tokens: Vec<u32> = (0..2000u32).map(|i| (i * 7919 + i / 13) % 251).collect();
    let a = Domain::new("a", Dataset::stream("a", tokens.clone(), 256).unwrap()).unwrap();
    let mut other = tokens.clone();
    other.reverse();
    let b = Domain::new("b", Dataset::stream("b", other, 256).unwrap()).unwrap();
    check_held_out_disjoint(&[a.clone(), b], 16).unwrap();
    // The same file under two names: a's held-out windows are b's training.
    let mut shifted = tokens[1800..].to_vec();
    shifted.extend_from_slice(&tokens[..1800]);
    let c = Domain::new("c", Dataset::stream("c", shifted, 256).unwrap()).unwrap();
    let e = check_held_out_disjoint(&[a, c], 16).unwrap_err().to_string();
    assert!(e.contains("`a`") && e.contains("`c`") && e.contains("window"), "{e}");
}

// ---- seeds per adapter ---------------------------------------------------------

use lorafuse::experiment::summation::{self, AdapterRecord, Progress, SummationConfig};

fn tiny_config() -> SummationConfig {
    let mut train =
        TrainConfig { rank: 2, alpha: 4.0, steps: 3, batch: 2, seq: 32, answer_only: true, ..TrainConfig::default() };
    train.optim.lr = 1e-2;
    train.optim.warmup = 1;
    SummationConfig { arity: 2, train, init_seed: 5, same_init: false, eval_examples: 6, checkpoint_every: 2 }
}

#[test]
fn every_adapter_starts_from_its_own_init_unless_asked() {
    let mut c = tiny_config();
    let seeds: Vec<u64> = ["add", "sort", "add+sort"].iter().map(|l| c.init_seed_for(l)).collect();
    assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2] && seeds[0] != seeds[2], "{seeds:?}");
    let with = |seed| TrainConfig { init_seed: Some(seed), ..c.train.clone() };
    assert_ne!(first_a(&with(seeds[0])), first_a(&with(seeds[1])));
    // The data seed does not enter.
    c.train.seed = 99;
    assert_eq!(c.init_seed_for("add"), seeds[0]);
    c.same_init = true;
    assert_eq!(c.init_seed_for("add"), c.init_seed_for("sort"));
}

// ---- a whole run, and resuming it ----------------------------------------------

use lorafuse::train::model::Gpt2;
use lorafuse::train::trainer::Trainer;
use std::path::{Path, PathBuf};

/// Records what a run reports.
#[derive(Default)]
struct Log {
    starts: Vec<(String, u64)>,
    done: Vec<(String, bool)>,
}

impl Progress for Log {
    fn adapter_start(&mut self, _index: usize, _total: usize, label: &str, _steps: u64, from: u64) {
        self.starts.push((label.to_string(), from));
    }
    fn adapter_done(&mut self, r: &AdapterRecord, reused: bool) {
        self.done.push((r.label.clone(), reused));
    }
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn adapter_bytes(out: &Path, label: &str) -> Vec<u8> {
    std::fs::read(out.join("adapters").join(label).join("adapter_model.safetensors")).unwrap()
}

#[test]
fn a_run_resumes_without_redoing_finished_adapters() {
    let root = fresh_dir("experiment-resume");
    let base = root.join("base");
    let model_cfg = Gpt2Config::new(256, 32, 16, 1, 2).unwrap();
    Gpt2::random(&Cpu, &model_cfg, 1).unwrap().save(&Cpu, &base).unwrap();
    let doms = domains::embedded(&["add", "sort", "recall"], 60, 6, 2).unwrap();
    let config = tiny_config();
    let out = root.join("out");

    let mut log = Log::default();
    let first = summation::run(&Cpu, &base, &doms, &config, &out, &mut log).unwrap();
    let labels = ["add", "sort", "recall", "add+sort", "add+recall", "sort+recall"];
    assert_eq!(log.done, labels.iter().map(|l| (l.to_string(), false)).collect::<Vec<_>>());
    assert_eq!(first.combinations.len(), 3);
    assert!(first.fit.is_some());
    for c in &first.combinations {
        assert_eq!(c.members.len(), 2);
        assert!(c.rms_cosine.is_finite() && c.rms_cosine > 0.0 && c.rms_cosine <= 1.0, "{c:?}");
        for m in &c.members {
            let want = 100.0 * (m.sum.perplexity - m.merged.perplexity) / m.merged.perplexity;
            assert!((m.change_percent - want).abs() < 1e-9);
        }
    }
    let (json, svg) = summation::write_outputs(&first, &out).unwrap();
    // The file is the report (compared as parsed JSON: serde_json's float
    // parsing may move a last digit, so not through `Report`).
    let text = std::fs::read_to_string(json).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, serde_json::from_str::<serde_json::Value>(&serde_json::to_string(&first).unwrap()).unwrap());
    let back: summation::Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back.combinations.len(), 3);
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("add+sort") && svg.contains("least squares"));
    let table = summation::table(&first);
    assert!(table.contains("sort+recall") && table.contains("Spearman"), "{table}");

    // Rerun: every adapter is loaded, none trained, and the numbers repeat.
    let mut log = Log::default();
    let second = summation::run(&Cpu, &base, &doms, &config, &out, &mut log).unwrap();
    assert!(log.starts.is_empty(), "{:?}", log.starts);
    assert!(log.done.iter().all(|(_, reused)| *reused));
    assert_eq!(second.combinations, first.combinations);

    // Interrupted inside `add+sort` after its checkpoint at iteration 2:
    // only it trains, from there, and ends where the uninterrupted run did.
    let before = adapter_bytes(&out, "add+sort");
    std::fs::remove_dir_all(out.join("adapters").join("add+sort")).unwrap();
    let members: Vec<&Domain> = doms[..2].iter().collect();
    let train = TrainConfig { init_seed: Some(config.init_seed_for("add+sort")), ..config.train.clone() };
    let model = Gpt2::load(&Cpu, &base).unwrap();
    let mut t = Trainer::new(Cpu, model, domains::combined(&members).unwrap(), train).unwrap();
    t.step().unwrap();
    t.step().unwrap();
    t.checkpoint(&out.join("checkpoints").join("add+sort"), 1).unwrap();
    let mut log = Log::default();
    let third = summation::run(&Cpu, &base, &doms, &config, &out, &mut log).unwrap();
    assert_eq!(log.starts, vec![("add+sort".to_string(), 2)]);
    assert_eq!(log.done.iter().filter(|(_, reused)| !reused).count(), 1);
    assert_eq!(adapter_bytes(&out, "add+sort"), before);
    assert_eq!(third.combinations, first.combinations);
    assert!(!out.join("checkpoints").join("add+sort").exists());

    // Other settings into the same directory are refused, not mixed in.
    let other = SummationConfig { init_seed: 6, ..config.clone() };
    let e = summation::run(&Cpu, &base, &doms, &other, &out, &mut Log::default()).unwrap_err().to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[test]
fn bad_settings_are_refused_before_work() {
    let c = tiny_config();
    assert!(SummationConfig { arity: 4, ..c.clone() }.validate(5).is_err());
    assert!(c.validate(1).unwrap_err().to_string().contains("at least 2"));
    let full = SummationConfig { train: TrainConfig { method: "full".into(), ..c.train.clone() }, ..c.clone() };
    assert!(full.validate(4).unwrap_err().to_string().contains("full"));
    assert!(Domain::new("../x", Dataset::embedded(&["add"], 2, 1, 0).unwrap()).is_err());
}
