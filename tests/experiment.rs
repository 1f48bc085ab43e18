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
