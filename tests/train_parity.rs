//! The whole trainer on a device against the CPU trainer: step-0 gradients
//! of full fine-tuning in f32 and bf16, then five AdamW steps of every
//! adapter kind (losses and saved tensors). Each case is written once over
//! the backend and instantiated per device by `test_device!`; the CPU
//! trainer is the oracle, so there is no CPU instance.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::trainer::{fixed_stream, max_abs, overfit_config, saved_tensors, small_base, step0_grads};
use lorafuse::cpu::Cpu;
use lorafuse::dtype::widen;
use lorafuse::testing::check_close;
use lorafuse::train::model::{Gpt2, Precision};
use lorafuse::train::trainer::{TrainConfig, Trainer};
use lorafuse::train::TrainBackend;

/// A scratch directory (removed when dropped) holding `small_base(7)`
/// saved as a model directory, so both sides load the same bits.
struct Base(PathBuf);

impl Base {
    fn new(test: &str) -> Self {
        let root = std::env::temp_dir().join(format!("lorafuse-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        small_base(7).save(&Cpu, &root.join("base")).unwrap();
        Base(root)
    }

    fn model<B: TrainBackend>(&self, b: &B) -> Gpt2<B> {
        Gpt2::load(b, &self.0.join("base")).unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[q | k | v]` of an `attn.c_attn.bias` without its key third. The key
/// bias's gradient is exactly 0 (the softmax ignores a shift of a query's
/// scores), so each side's value is rounding noise (tests/train_grad.rs,
/// key_bias_gradient_is_rounding_noise_that_adamw_turns_into_full_steps);
/// returns the key third too, for the record.
fn split_key_bias(name: &str, v: &mut Vec<f32>) -> Option<Vec<f32>> {
    if !name.ends_with("attn.c_attn.bias") {
        return None;
    }
    let d = v.len() / 3;
    Some(v.drain(d..2 * d).collect())
}

/// Step-0 gradients of full fine-tuning on `dev` against the CPU's, before
/// any optimizer step can amplify a difference: every tensor (dtype
/// tolerances: whole-model gradients are not one reduction), with the
/// key-bias noise of both sides printed for the record.
fn step0_gradients_match_cpu<B: TrainBackend>(dev: &B) {
    let base = Base::new("step0-parity");
    for (precision, tol) in [(Precision::F32, 1e-4), (Precision::Bf16, 3e-2)] {
        let cpu = step0_grads(&Cpu, base.model(&Cpu), precision, [0, 1, 2, 3]);
        let got = step0_grads(dev, base.model(dev), precision, [0, 1, 2, 3]);
        for ((name, mut c), (_, mut g)) in cpu.into_iter().zip(got) {
            if let (Some(kc), Some(kg)) = (split_key_bias(&name, &mut c), split_key_bias(&name, &mut g)) {
                println!(
                    "step 0 {precision} {name}: key-bias max|g| cpu {:.3e} {} {:.3e}",
                    max_abs(&kc),
                    dev.describe(),
                    max_abs(&kg)
                );
            }
            check_close(&format!("step-0 gradient {name} {precision}"), &g, &widen(&c), tol)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Five AdamW steps of every adapter kind on `dev` and on the CPU: the
/// losses (each depends on every gradient and update before it) and every
/// saved tensor. Five AdamW steps are not a reduction with a derivable bound
/// (the update g/√v has no error bound where g is small), so these are
/// end-to-end tolerances: f32 sums on the device against f64 on the CPU; in
/// bf16 both round the same values but land on different sides of a bf16
/// rounding boundary now and then, so the tolerances are bf16's.
fn trainer_matches_cpu_trainer<B: TrainBackend + Clone>(dev: &B) {
    let base = Base::new("trainer-parity");
    let f32_runs = ["full", "lora", "tied:vBuA", "tied:BA", "vera", "unilora:1024"].map(|m| (m, Precision::F32));
    let bf16_runs = ["full", "lora", "tied:vBuA", "unilora:1024"].map(|m| (m, Precision::Bf16));
    for (method, precision) in f32_runs.into_iter().chain(bf16_runs) {
        let (loss_tol, param_tol) = if precision == Precision::F32 { (1e-4, 1e-3) } else { (1e-2, 3e-2) };
        let cfg = TrainConfig { precision, ..overfit_config(method, 5) };
        let run = format!("{method} {precision}");
        let mut cpu = Trainer::new(Cpu, base.model(&Cpu), fixed_stream(2), cfg.clone()).unwrap();
        let mut on_dev = Trainer::new(dev.clone(), base.model(dev), fixed_stream(2), cfg).unwrap();
        let want: Vec<f64> = (0..5).map(|_| cpu.step().unwrap().loss).collect();
        let got: Vec<f32> = (0..5).map(|_| on_dev.step().unwrap().loss as f32).collect();
        check_close(&format!("{run}: losses over 5 steps"), &got, &want, loss_tol).unwrap_or_else(|e| panic!("{e}"));
        let (dc, dd) = (base.dir(&format!("{run}-cpu")), base.dir(&format!("{run}-dev")));
        cpu.save_result(&dc).unwrap();
        on_dev.save_result(&dd).unwrap();
        compare_saved(&run, &dc, &dd, param_tol);
    }
}

/// Every saved tensor of `got` against the same tensor of `want`, key bias
/// excepted (it does not change the output: see [`split_key_bias`]).
fn compare_saved(run: &str, want: &Path, got: &Path, tol: f64) {
    let (want, got) = (saved_tensors(want), saved_tensors(got));
    assert_eq!(want.len(), got.len(), "{run}: saved tensor counts differ");
    for ((name, mut c), (gname, mut g)) in want.into_iter().zip(got) {
        assert_eq!(name, gname, "{run}: saved tensors in a different order");
        split_key_bias(&name, &mut c);
        split_key_bias(&name, &mut g);
        check_close(&format!("{run}: {name} after 5 steps"), &g, &widen(&c), tol).unwrap_or_else(|e| panic!("{e}"));
    }
}

test_device!(step0_gradients_match_cpu, gpu: gpu_step0_gradients_match_cpu);
test_device!(trainer_matches_cpu_trainer, gpu: gpu_trainer_matches_cpu_trainer_for_every_adapter_kind);
