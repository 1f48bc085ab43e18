//! AdamW with bias correction and decoupled weight decay, global-norm
//! gradient clipping, warmup + cosine/linear/constant schedules, and one
//! learning rate per parameter group.
//!
//! A step first computes the global gradient norm over every trainable
//! tensor. A non-finite norm (NaN or ∞ anywhere) **refuses** the step: no
//! parameter or moment changes, and the caller decides (the trainer counts
//! consecutive refusals and stops after too many).

use crate::nn::{AdamWStep, AdamWTensor, NnOps};
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
        if self.warmup > 0 && step <= self.warmup {
            return step as f64 / self.warmup as f64;
        }
        let span = total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step.saturating_sub(self.warmup)) as f64 / span).min(1.0);
        let m = self.min_lr_ratio;
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Linear => m + (1.0 - m) * (1.0 - progress),
            Schedule::Cosine => m + (1.0 - m) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
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
/// order the trainable tensors are passed, which the trainer keeps fixed).
pub struct AdamW<B: NnOps> {
    /// Settings.
    pub config: OptimConfig,
    /// Completed (accepted) steps.
    pub step: u64,
    /// `(name, m, v)` per trainable tensor.
    pub moments: Vec<Moments<B>>,
}

impl<B: NnOps> AdamW<B> {
    /// Fresh state (zero moments) for these tensors.
    pub fn new(backend: &B, config: OptimConfig, params: &[ParamRef<'_, B>]) -> Result<Self> {
        config.validate()?;
        let moments = params
            .iter()
            .map(|(name, _, p, _)| Ok((name.clone(), backend.zeros(B::len(p))?, backend.zeros(B::len(p))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, step: 0, moments })
    }

    /// The global gradient norm; `Err(NonFinite)` when it is not finite.
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

    /// One step at schedule position `step + 1` of `total`. Refuses (no
    /// change at all) when a gradient is non-finite.
    pub fn step(&mut self, backend: &B, params: Vec<ParamRef<'_, B>>, total: u64) -> Result<StepReport> {
        if params.len() != self.moments.len() {
            return Err(Error::shape("adamw", "params", format!("{} tensors", self.moments.len()), params.len()));
        }
        let grad_norm = Self::grad_norm(backend, &params)?;
        let c = &self.config;
        let clipped = c.clip_norm > 0.0 && grad_norm > c.clip_norm;
        let grad_scale = if clipped { c.clip_norm / grad_norm } else { 1.0 };
        let step = self.step + 1;
        let lr_factor = c.lr_factor(step, total);
        let mut tensors = Vec::with_capacity(params.len());
        for ((name, group, param, grad), (mname, m, v)) in params.into_iter().zip(self.moments.iter_mut()) {
            if name != *mname {
                return Err(Error::invalid("optimizer state", format!("tensor `{name}` where `{mname}` was expected")));
            }
            let (lr, weight_decay) = c.group(group);
            tensors.push(AdamWTensor { param, grad, m, v, lr: lr * lr_factor, weight_decay });
        }
        // Every tensor in one call (one launch on the GPU); each takes its
        // group's rate and decay from its entry.
        let hp = AdamWStep { lr: 0.0, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: 0.0, step, grad_scale };
        backend.adamw_many(&mut tensors, &hp)?;
        self.step = step;
        Ok(StepReport { grad_norm, lr_factor, clipped })
    }
}
