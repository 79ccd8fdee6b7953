//! Stage 3 of an RL step, the update: `num_ppo_epochs` × shuffled mini-batches ×
//! micro-batches of clipped policy (and value) loss, one optimizer update per mini-batch
//! (docs/ALGORITHMS.md §7).

use super::algorithm::AlgorithmSpec;
use super::experience::{Actors, Experience};
use super::losses::PolicyObjective;
use super::micro_batch::{critic_pass, policy_pass, response_values, MicroBatch, Tally};
use super::rollout::to_rows;
use super::selection::Selection;
use super::shaping::{mean, Shaped};
use crate::config::rl::RlConfig;
use crate::train::update::{skipped_cause, Updater};
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::logprobs::Entropy;
use std::ops::AddAssign;
use std::sync::Mutex;

/// Per-update figures; `+=` adds one update's, [`UpdateStats::mean`] divides by the count.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpdateStats {
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub kl_loss: f64,
    /// Token-mean entropy of the policy over the response tokens.
    pub entropy: f64,
    /// `½ (logp − logp_old)²`, token mean.
    pub approxkl: f64,
    pub clipfrac: f64,
    pub vf_clipfrac: f64,
    pub ratio_mean: f64,
    pub grad_norm: f64,
    pub updates: usize,
}

impl AddAssign for UpdateStats {
    fn add_assign(&mut self, o: Self) {
        self.pg_loss += o.pg_loss;
        self.vf_loss += o.vf_loss;
        self.kl_loss += o.kl_loss;
        self.entropy += o.entropy;
        self.approxkl += o.approxkl;
        self.clipfrac += o.clipfrac;
        self.vf_clipfrac += o.vf_clipfrac;
        self.ratio_mean += o.ratio_mean;
        self.grad_norm += o.grad_norm;
        self.updates += o.updates;
    }
}

impl UpdateStats {
    /// The mean over the updates added.
    pub fn mean(&self) -> Self {
        let u = self.updates.max(1) as f64;
        Self {
            pg_loss: self.pg_loss / u,
            vf_loss: self.vf_loss / u,
            kl_loss: self.kl_loss / u,
            entropy: self.entropy / u,
            approxkl: self.approxkl / u,
            clipfrac: self.clipfrac / u,
            vf_clipfrac: self.vf_clipfrac / u,
            ratio_mean: self.ratio_mean / u,
            grad_norm: self.grad_norm / u,
            updates: self.updates,
        }
    }
}

/// What the update stage returns.
pub struct Trained {
    /// Means over the step's updates.
    pub stats: UpdateStats,
    /// Why an update was skipped (the step is then a bad step).
    pub skipped: Option<String>,
    /// The first micro-batch's ratios on response tokens (exactly 1 before any update).
    pub first_ratio: Vec<f32>,
    /// The update's own log-probs in rollout order, when they serve as the old ones.
    pub logp_from_update: Vec<Vec<f64>>,
}

/// The settings of one step's update.
pub struct UpdatePlan<'a> {
    pub cfg: &'a RlConfig,
    pub spec: &'a AlgorithmSpec,
    pub objective: PolicyObjective,
    pub lr: f64,
    pub beta: f64,
    pub step: u64,
    pub dropout: Option<&'a Mutex<ChaCha8Rng>>,
    /// Compute the policy's entropy (for the metric) even when it is not in the loss.
    pub entropy_metric: bool,
    /// Pack each group's prompt once into the training passes ([`Layout::choose`]).
    pub share_prompts: bool,
    /// The rollouts trained on and their loss tokens (dynamic sampling, masked truncation).
    pub selection: &'a Selection,
}

/// A seed for (run seed, step, purpose) so every step's randomness is reproducible on resume.
pub fn mix(seed: u64, step: u64, purpose: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ purpose.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// `num_ppo_epochs` × mini-batches × micro-batches on the step's experience.
pub fn train_on_rollouts(
    actors: Actors,
    updater: &mut Updater,
    x: &Experience,
    shaped: &Shaped,
    plan: &UpdatePlan,
) -> Result<Trained> {
    let (r, t) = (&plan.cfg.rl, &plan.cfg.training);
    // The whole step's rollouts kept for training (every rank's): mini-batches are cut from
    // one order, the same on every rank, and each rank trains the members it holds.
    let kept = &plan.selection.rows;
    let n = kept.len();
    let mini = n.div_ceil(r.num_mini_batches).max(1);
    let mut out = Trained {
        stats: UpdateStats::default(),
        skipped: None,
        first_ratio: Vec::new(),
        logp_from_update: Vec::new(),
    };
    for epoch in 0..r.num_ppo_epochs {
        // The first epoch keeps rollout order, so its first micro-batches are exactly the
        // chunks `logp_old` was computed on (the first ratio is exactly 1); later epochs
        // shuffle (rollouts are i.i.d.; the order matters only for bitwise reproducibility).
        let mut perm: Vec<usize> = kept.clone();
        if epoch > 0 {
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                t.seed,
                plan.step,
                100 + epoch as u64,
            )));
        }
        let mut epoch_kl = Vec::new();
        for m in perm.chunks(mini) {
            let s = mini_batch_update(actors, updater, x, shaped, plan, m, &mut out)?;
            epoch_kl.push(s.approxkl);
            out.stats += s;
        }
        if let Some(target) = r.target_kl {
            let k = mean(&epoch_kl);
            if k > target {
                tracing::info!("step {}: approx KL {k:.4} > target_kl {target} after epoch {}; stopping this step's updates", plan.step + 1, epoch + 1);
                break;
            }
        }
    }
    out.stats = out.stats.mean();
    Ok(out)
}

/// One optimizer update on mini-batch `m` (indices into the step's batch), its gradients
/// summed over this rank's micro-batches of it and then over ranks.
fn mini_batch_update(
    actors: Actors,
    updater: &mut Updater,
    x: &Experience,
    shaped: &Shaped,
    plan: &UpdatePlan,
    m: &[usize],
    out: &mut Trained,
) -> Result<UpdateStats> {
    let (r, t) = (&plan.cfg.rl, &plan.cfg.training);
    // 1. This rank's members of `m`, in `m`'s order; the losses are normalised over all of
    //    `m` (every rank's).
    let own: Vec<usize> = m.iter().copied().filter(|i| x.local.contains(i)).collect();
    let mb_tokens: usize = m.iter().map(|&i| plan.selection.loss_lens[i]).sum();
    let want_entropy = if r.entropy_coef > 0.0 {
        Entropy::Loss
    } else if plan.entropy_metric {
        Entropy::Metric
    } else {
        Entropy::Skip
    };
    let mut acc = updater.accumulator();
    let mut tally = Tally::default();
    // 2. Each micro-batch: its targets, the policy's pass, a separate critic's, the figures.
    for micro in own.chunks(t.per_device_train_batch_size) {
        let mb = MicroBatch::new(actors, x, shaped, plan, micro, (mb_tokens, m.len()))?;
        let p = policy_pass(actors, plan, &mb, want_entropy, &mut acc, updater.params())?;
        let critic = critic_pass(actors, plan, &mb, &mut acc, updater.params())?;
        if x.logp_old.is_empty() {
            // One update per step: its own log-probs are the old ones.
            out.logp_from_update.extend(to_rows(&p.logp, &mb.lens)?);
        }
        let ratio = tally.add(&p, critic.as_ref(), &mb.mask)?;
        if out.first_ratio.is_empty() {
            // Response tokens only (padding has no old log-prob).
            out.first_ratio = response_values(&ratio, &mb.mask)?;
        }
    }
    // 3. The update (gradients and policy loss summed over ranks), the figures.
    let update = updater.apply(acc, tally.pg_loss, "policy loss", plan.lr, plan.step)?;
    if !update.applied {
        out.skipped = Some(skipped_cause("policy loss"));
    }
    tally.into_stats(&update, mb_tokens)
}
