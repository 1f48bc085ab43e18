//! AdamW with bias correction and decoupled weight decay, global-norm
//! gradient clipping, warmup + cosine/linear/constant schedules, and one
//! learning rate per parameter group.
//!
//! A step first computes the global gradient norm over every trainable
//! tensor. A non-finite norm (NaN or ∞ anywhere) **refuses** the step: no
//! parameter or moment changes, and the caller decides (the trainer counts
//! consecutive refusals and stops after too many).
//!
//! The norm, the clip factor, the schedule's rate, the step count and the
//! refusal are decided on the backend ([`NnOps::optimizer_prepare`]),
//! and the update reads them from there ([`NnOps::adamw_many_device`]):
//! queuing a step ([`AdamW::queue`]) waits for nothing, and the host reads
//! the outcome when it asks for the report ([`AdamW::report`]).

use crate::nn::{optim_state, AdamWTensor, Decay, NnOps, OptimConsts};
use crate::{Error, Result};

/// Learning-rate shape over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then cosine decay to `min_lr_ratio`.
    Cosine,
    /// Linear warmup, then linear decay to `min_lr_ratio`.
    Linear,
    /// Linear warmup, then constant.
    Constant,
}

/// Optimizer settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Learning rate of adapter matrices `A`, `B`.
    pub lr: f64,
    /// Learning rate of Tied-LoRA/VeRA vectors `u`, `v` (much larger).
    pub lr_vector: f64,
    /// Learning rate of Uni-LoRA's `θ_d` (much larger).
    pub lr_theta: f64,
    /// Learning rate of base weights (full fine-tuning).
    pub lr_base: f64,
    /// Decoupled weight decay of matrices (`A`, `B`, base weights); vectors
    /// and `θ_d` get none.
    pub weight_decay: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub clip_norm: f64,
    /// Warmup steps (linear from 0).
    pub warmup: u64,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 2e-3,
            lr_vector: 2e-2,
            lr_theta: 2e-2,
            lr_base: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 1.0,
            warmup: 10,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
        }
    }
}

impl OptimConfig {
    /// Rejects negative or non-finite rates, betas outside [0, 1), ε ≤ 0.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("lr", self.lr),
            ("lr_vector", self.lr_vector),
            ("lr_theta", self.lr_theta),
            ("lr_base", self.lr_base),
            ("weight_decay", self.weight_decay),
            ("clip_norm", self.clip_norm),
            ("min_lr_ratio", self.min_lr_ratio),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(format!("optimizer {name}"), format!("{v}: must be a finite number ≥ 0")));
            }
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(format!("optimizer {name}"), format!("{b}: must be in [0, 1)")));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid("optimizer eps", "must be a positive finite number"));
        }
        Ok(())
    }

    /// The multiplier of every peak rate at 1-based `step` of `total`.
    pub fn lr_factor(&self, step: u64, total: u64) -> f64 {
        self.consts(total).lr_factor(step)
    }

    /// The per-run constants the backend's optimizer step takes, for a run
    /// of `total` steps.
    pub fn consts(&self, total: u64) -> OptimConsts {
        OptimConsts {
            clip_norm: self.clip_norm,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            warmup: self.warmup,
            total,
            min_lr_ratio: self.min_lr_ratio,
            decay: match self.schedule {
                Schedule::Cosine => Decay::Cosine,
                Schedule::Linear => Decay::Linear,
                Schedule::Constant => Decay::Constant,
            },
        }
    }

    /// Peak learning rate and weight decay of a group.
    pub fn group(&self, g: Group) -> (f64, f64) {
        match g {
            Group::Base => (self.lr_base, self.weight_decay),
            Group::Matrix => (self.lr, self.weight_decay),
            Group::Vector => (self.lr_vector, 0.0),
            Group::Theta => (self.lr_theta, 0.0),
        }
    }
}

/// Parameter groups: each gets its own learning rate and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Base weights (full fine-tuning).
    Base,
    /// Adapter matrices `A`, `B`.
    Matrix,
    /// Tied-LoRA / VeRA vectors `u`, `v`.
    Vector,
    /// Uni-LoRA's `θ_d`.
    Theta,
}

/// One trainable tensor as the optimizer sees it: name, group, value,
/// gradient.
pub type ParamRef<'a, B> =
    (String, Group, &'a mut <B as crate::Backend>::Buf<f32>, &'a <B as crate::Backend>::Buf<f32>);

/// One tensor's AdamW moments: `(name, m, v)`.
pub type Moments<B> = (String, super::F32<B>, super::F32<B>);

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The schedule's factor at this step.
    pub lr_factor: f64,
    /// Whether clipping scaled the gradients.
    pub clipped: bool,
}

/// AdamW state: the step count and first/second moments per tensor (in the
/// order the trainable tensors are passed, which the trainer keeps fixed),
/// and the backend-resident step state ([`optim_state`]).
pub struct AdamW<B: NnOps> {
    /// Settings.
    pub config: OptimConfig,
    /// Completed (accepted) steps, as of the last [`AdamW::report`]. Set it
    /// to resume a run; the next [`AdamW::queue`] passes it to the backend.
    pub step: u64,
    /// `(name, m, v)` per trainable tensor.
    pub moments: Vec<Moments<B>>,
    /// The step state on the backend, over the trainable tensors and the
    /// guards of the last queued step.
    state: B::Buf<f64>,
    /// The backend's scratch for the norm ([`optim_state::scratch_len`]).
    scratch: B::Buf<f64>,
    /// The step count the backend's state holds (when it differs from
    /// `step`, the next queue uploads `step`).
    backend_step: u64,
    /// Names of the last queued step's guards.
    guards: Vec<String>,
}

impl<B: NnOps> AdamW<B> {
    /// Fresh state (zero moments) for these tensors.
    pub fn new(backend: &B, config: OptimConfig, params: &[ParamRef<'_, B>]) -> Result<Self> {
        config.validate()?;
        let moments = params
            .iter()
            .map(|(name, _, p, _)| Ok((name.clone(), backend.zeros(B::len(p))?, backend.zeros(B::len(p))?)))
            .collect::<Result<Vec<_>>>()?;
        let state = backend.upload(&optim_state::initial(params.len(), 0))?;
        let scratch = backend.zeros(optim_state::scratch_len(params.len()))?;
        Ok(AdamW { config, step: 0, moments, state, scratch, backend_step: 0, guards: Vec::new() })
    }

    /// The global gradient norm; `Err(NonFinite)` when it is not finite.
    /// (Reads the norm back; a training step uses [`AdamW::queue`], which
    /// does not.)
    pub fn grad_norm(backend: &B, params: &[ParamRef<'_, B>]) -> Result<f64> {
        let grads: Vec<&B::Buf<f32>> = params.iter().map(|(_, _, _, g)| &**g).collect();
        let shares = backend.sum_squares_each(&grads)?;
        let mut sum = 0.0;
        for ((name, _, _, _), s) in params.iter().zip(shares) {
            if !s.is_finite() {
                return Err(Error::NonFinite { what: format!("gradient of `{name}`"), index: 0, value: s });
            }
            sum += s;
        }
        Ok(sum.sqrt())
    }

    /// One step at schedule position `step + 1` of `total`, and its report.
    /// Refuses (no change at all) when a gradient is non-finite.
    pub fn step(&mut self, backend: &B, params: Vec<ParamRef<'_, B>>, total: u64) -> Result<StepReport> {
        self.queue(backend, params, &[], total)?;
        self.report(backend)
    }

    /// Queues one step of a run of `total` steps without waiting for the
    /// backend: the gradient norm and the decision (refuse when a gradient
    /// or a `guard`, say the loss, is not finite; clip; the schedule's
    /// rate) are made on the backend, and the update reads them there.
    /// [`AdamW::report`] then says what the step did.
    pub fn queue(
        &mut self,
        backend: &B,
        params: Vec<ParamRef<'_, B>>,
        guards: &[(&str, &B::Buf<f32>)],
        total: u64,
    ) -> Result<()> {
        if params.len() != self.moments.len() {
            return Err(Error::shape("adamw", "params", format!("{} tensors", self.moments.len()), params.len()));
        }
        let tensors = params.len() + guards.len();
        if self.step != self.backend_step || B::len(&self.state) != optim_state::len(tensors) {
            // Resumed (or first use with these guards): the state starts
            // from the host's step count. Not part of a steady-state step.
            self.state = backend.upload(&optim_state::initial(tensors, self.step))?;
            self.scratch = backend.zeros(optim_state::scratch_len(tensors))?;
            self.backend_step = self.step;
        }
        let consts = self.config.consts(total);
        let mut xs: Vec<&B::Buf<f32>> = params.iter().map(|(_, _, _, g)| &**g).collect();
        xs.extend(guards.iter().map(|(_, g)| *g));
        backend.optimizer_prepare(&xs, params.len(), &consts, &mut self.state, &mut self.scratch)?;
        let mut tensors = Vec::with_capacity(params.len());
        for ((name, group, param, grad), (mname, m, v)) in params.into_iter().zip(self.moments.iter_mut()) {
            if name != *mname {
                return Err(Error::invalid("optimizer state", format!("tensor `{name}` where `{mname}` was expected")));
            }
            // The group's peak rate: the backend multiplies in the
            // schedule's factor at the step it counts.
            let (lr, weight_decay) = self.config.group(group);
            tensors.push(AdamWTensor { param, grad, m, v, lr, weight_decay });
        }
        // Every tensor in one call (one launch on the GPU).
        backend.adamw_many_device(&mut tensors, &consts, &self.state)?;
        self.guards = guards.iter().map(|(name, _)| name.to_string()).collect();
        self.backend_step = u64::MAX;
        Ok(())
    }

    /// True when the backend's state already holds [`AdamW::step`] for
    /// these tensors and `guards` guards, so the next [`AdamW::queue`]
    /// uploads nothing. A replayed step (which does not run `queue`'s host
    /// code) is only valid then: after `step` is set by hand, a step must
    /// run eagerly first.
    pub fn state_is_current(&self, guards: usize) -> bool {
        self.step == self.backend_step && B::len(&self.state) == optim_state::len(self.moments.len() + guards)
    }

    /// What the last queued step did (reads the backend's state: the one
    /// wait of a step). `Err(NonFinite)` naming the first non-finite tensor
    /// when it was refused; `step` then stays where it was.
    pub fn report(&mut self, backend: &B) -> Result<StepReport> {
        use optim_state::*;
        let state = backend.download(&self.state)?;
        self.step = state[STEP] as u64;
        self.backend_step = self.step;
        let bad = state[FIRST_BAD];
        if bad >= 0.0 {
            let i = bad as usize;
            let what = match self.moments.get(i) {
                Some((name, _, _)) => format!("gradient of `{name}`"),
                None => self.guards.get(i - self.moments.len()).cloned().unwrap_or_else(|| format!("tensor {i}")),
            };
            return Err(Error::NonFinite { what, index: 0, value: state[HEADER + i] });
        }
        if state[ACCEPTED] == 0.0 {
            return Err(Error::NonFinite { what: "gradient norm".into(), index: 0, value: state[NORM] });
        }
        let grad_norm = state[NORM];
        let clipped = self.config.clip_norm > 0.0 && grad_norm > self.config.clip_norm;
        Ok(StepReport { grad_norm, lr_factor: state[LR_FACTOR], clipped })
    }
}
