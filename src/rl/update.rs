//! Stage 3 of an RL step, the update: `num_ppo_epochs` × shuffled mini-batches ×
//! micro-batches of clipped policy (and value) loss, one optimizer update per mini-batch
//! (docs/ALGORITHMS.md §7).

use super::algorithm::{AlgorithmSpec, KlPlacement};
use super::experience::{Actors, Experience};
use super::layout::Layout;
use super::losses::{agg_weights, policy_loss, value_loss, weighted_sum, ClipParams};
use super::rollout::score_hidden_states;
use super::rollout::to_rows;
use super::shaping::{mean, Shaped};
use crate::config::rl::RlConfig;
use crate::train::update::{skipped_cause, Updater};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::logprobs::Entropy;
use rlft_policies::ForwardCtx;
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
    pub clip: ClipParams,
    pub lr: f64,
    pub beta: f64,
    pub step: u64,
    pub dropout: Option<&'a Mutex<ChaCha8Rng>>,
    /// Compute the policy's entropy (for the metric) even when it is not in the loss.
    pub entropy_metric: bool,
    /// Pack each group's prompt once into the training passes ([`Layout::choose`]).
    pub share_prompts: bool,
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
    // The whole step's rollouts (every rank's): mini-batches are cut from one order, the
    // same on every rank, and each rank trains the members it holds.
    let n = x.lens.len();
    let mini = n / r.num_mini_batches;
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
        let mut perm: Vec<usize> = (0..n).collect();
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
    let ro = &x.rollouts;
    let dev = actors.model.info().device.clone();
    let width = ro.r_len;
    let mb_tokens: usize = m.iter().map(|&i| x.lens[i]).sum();
    let mut acc = updater.accumulator();
    let mut s = UpdateStats {
        updates: 1,
        ..UpdateStats::default()
    };
    let (mut akl, mut cf, mut vcf, mut rsum, mut ent) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let want_entropy = if r.entropy_coef > 0.0 {
        Entropy::Loss
    } else if plan.entropy_metric {
        Entropy::Metric
    } else {
        Entropy::Skip
    };
    let checkpointing = t.gradient_checkpointing;
    // This rank's members of `m`, in `m`'s order; `micro` indexes the step's figures,
    // `local` this rank's rollouts.
    let own: Vec<usize> = m.iter().copied().filter(|i| x.local.contains(i)).collect();
    for micro in own.chunks(t.per_device_train_batch_size) {
        let local: Vec<usize> = micro.iter().map(|&i| i - x.local.start).collect();
        let layout = Layout::choose(ro, &local, actors.model.info(), plan.share_prompts)?;
        let lens: Vec<usize> = micro.iter().map(|&i| x.lens[i]).collect();
        let w = agg_weights(
            r.loss_aggregation,
            &lens,
            width,
            mb_tokens,
            m.len(),
            plan.cfg.generation.max_new_tokens,
        );
        let w = Tensor::from_vec(w, (micro.len(), width), &dev)?;
        let mask = ro.mask(&local, &dev)?;
        let old_given = (!x.logp_old.is_empty())
            .then(|| rows_tensor(micro, &x.logp_old, width, &dev))
            .transpose()?;
        let adv = rows_tensor(micro, &shaped.advantages, width, &dev)?;
        let value_targets = match (&x.values, &shaped.returns) {
            (Some(v), Some(ret)) => Some((
                rows_tensor(micro, v, width, &dev)?,
                rows_tensor(micro, ret, width, &dev)?,
            )),
            _ => None,
        };
        let logp_ref = match x.logp_ref.as_ref() {
            Some(lr) if plan.spec.kl == KlPlacement::InLoss && plan.beta > 0.0 => {
                Some(rows_tensor(micro, lr, width, &dev)?)
            }
            _ => None,
        };
        // The policy's loss terms, from its final hidden states.
        let policy_ctx = ForwardCtx::train(Some(actors.policy), plan.dropout);
        let mut terms = None;
        backward_from_hidden::<anyhow::Error>(
            actors.model,
            &layout.input,
            &policy_ctx,
            checkpointing,
            &mut |hidden| {
                let sc = score_hidden_states(
                    actors.model,
                    &policy_ctx,
                    hidden,
                    &layout,
                    plan.cfg.generation.temperature,
                    actors.shared_head(),
                    want_entropy,
                )?;
                let old = old_given.clone().unwrap_or_else(|| sc.logp.detach());
                // Clipped surrogate: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = exp(logp − logp_old).
                let (pg, clipped) = policy_loss(&sc.logp, &old, &adv, &plan.clip)?;
                let pg_loss = weighted_sum(&pg, &w)?;
                let mut loss = pg_loss.clone();
                let mut vf = None;
                if let (Some(v), Some((vold, ret))) = (&sc.values, &value_targets) {
                    let (vf_t, vclipped) = value_loss(v, vold, ret, r.cliprange_value)?;
                    let vf_loss = weighted_sum(&vf_t, &w)?;
                    loss = (loss + (&vf_loss * r.vf_coef)?)?;
                    vf = Some((vf_loss.detach(), vclipped));
                }
                let mut kl_loss = None;
                if let Some(lref) = &logp_ref {
                    // k3 = exp(logr) − 1 − logr, logr = logp_ref − logp.
                    let logr = (lref - &sc.logp)?;
                    let k3 = ((logr.exp()? - 1.0)? - &logr)?;
                    let l = weighted_sum(&k3, &w)?;
                    loss = (loss + (&l * plan.beta)?)?;
                    kl_loss = Some(l.detach());
                }
                if let (Some(h), true) = (&sc.entropy, r.entropy_coef > 0.0) {
                    let e = weighted_sum(h, &w)?;
                    loss = (loss - (e * r.entropy_coef)?)?;
                }
                terms = Some(PolicyTerms {
                    logp: sc.logp.detach(),
                    old,
                    pg_loss: pg_loss.detach(),
                    clipped,
                    vf,
                    kl_loss,
                    entropy: sc.entropy.map(|h| h.detach()),
                });
                Ok(loss)
            },
            &mut |grads| acc.add(updater.params(), grads),
        )?;
        let p = terms.expect("the loss closure ran");
        // A separate critic: the value loss from its own hidden states.
        if let (Some(c), Some(h), Some((vold, ret))) =
            (actors.critic, actors.value_head, &value_targets)
        {
            let critic_ctx = ForwardCtx::train(Some(c), plan.dropout);
            let mut vf = None;
            backward_from_hidden::<anyhow::Error>(
                actors.model,
                &layout.input,
                &critic_ctx,
                checkpointing,
                &mut |hidden| {
                    let v = h.forward(&layout.states(hidden)?, true)?;
                    let (vf_t, vclipped) = value_loss(&v, vold, ret, r.cliprange_value)?;
                    let vf_loss = weighted_sum(&vf_t, &w)?;
                    vf = Some((vf_loss.detach(), vclipped));
                    Ok((vf_loss * r.vf_coef)?)
                },
                &mut |grads| acc.add(updater.params(), grads),
            )?;
            let (vf_loss, vclipped) = vf.expect("the loss closure ran");
            s.vf_loss += vf_loss.to_scalar::<f32>()? as f64;
            vcf += (vclipped * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        if let Some((vf_loss, vclipped)) = &p.vf {
            s.vf_loss += vf_loss.to_scalar::<f32>()? as f64;
            vcf += (vclipped * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        if let Some(l) = &p.kl_loss {
            s.kl_loss += l.to_scalar::<f32>()? as f64;
        }
        if let Some(h) = &p.entropy {
            ent += (h * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        if x.logp_old.is_empty() {
            // One update per step: its own log-probs are the old ones.
            out.logp_from_update.extend(to_rows(&p.logp, &lens)?);
        }
        s.pg_loss += p.pg_loss.to_scalar::<f32>()? as f64;
        let diff = (&p.logp - &p.old)?;
        akl += ((diff.sqr()? * &mask)?.sum_all()?.to_scalar::<f32>()? as f64) * 0.5;
        cf += (p.clipped * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        let ratio = diff.exp()?;
        rsum += (&ratio * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        if out.first_ratio.is_empty() {
            // Response tokens only (padding has no old log-prob).
            let rv: Vec<f32> = ratio.flatten_all()?.to_vec1()?;
            let mv: Vec<f32> = mask.flatten_all()?.to_vec1()?;
            out.first_ratio = rv
                .into_iter()
                .zip(mv)
                .filter(|(_, k)| *k > 0.0)
                .map(|(v, _)| v)
                .collect();
        }
    }
    let update = updater.apply(acc, s.pg_loss, "policy loss", plan.lr, plan.step)?;
    if !update.applied {
        out.skipped = Some(skipped_cause("policy loss"));
    }
    // The figures over every rank's members (the policy loss came back summed).
    s.pg_loss = update.loss;
    let mut sums = [s.vf_loss, s.kl_loss, akl, cf, vcf, rsum, ent];
    crate::dist::sum(&mut sums)?;
    [s.vf_loss, s.kl_loss, akl, cf, vcf, rsum, ent] = sums;
    let tok = mb_tokens.max(1) as f64;
    s.approxkl = akl / tok;
    s.clipfrac = cf / tok;
    s.vf_clipfrac = vcf / tok;
    s.ratio_mean = rsum / tok;
    s.entropy = ent / tok;
    s.grad_norm = update.grad_norm;
    Ok(s)
}

/// What one micro-batch's policy pass leaves for the statistics (all detached).
struct PolicyTerms {
    logp: Tensor,
    old: Tensor,
    pg_loss: Tensor,
    clipped: Tensor,
    /// Shared critic: the value loss and its clip mask.
    vf: Option<(Tensor, Tensor)>,
    kl_loss: Option<Tensor>,
    entropy: Option<Tensor>,
}

fn rows_tensor(rows: &[usize], data: &[Vec<f64>], width: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; rows.len() * width];
    for (k, &i) in rows.iter().enumerate() {
        for (t, x) in data[i].iter().enumerate().take(width) {
            v[k * width + t] = *x as f32;
        }
    }
    Ok(Tensor::from_vec(v, (rows.len(), width), dev)?)
}
