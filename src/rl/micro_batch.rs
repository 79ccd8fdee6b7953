//! One micro-batch of the update (stage 3, docs/ALGORITHMS.md §6): its targets, the
//! policy's pass (with the shared value head), a separate critic's pass, and what they add
//! to the mini-batch's figures.

use super::algorithm::KlPlacement;
use super::experience::{Actors, Experience};
use super::layout::Layout;
use super::losses::{agg_weights, kl_k3, policy_loss, value_loss, weighted_sum};
use super::rollout::score_hidden_states;
use super::shaping::Shaped;
use super::update::{UpdatePlan, UpdateStats};
use crate::train::grads::GradAccumulator;
use crate::train::update::Update;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::logprobs::Entropy;
use rlft_policies::ForwardCtx;

/// A micro-batch's layout and per-token targets, each `[b, R]`.
pub struct MicroBatch {
    pub layout: Layout,
    /// Response lengths of the rows.
    pub lens: Vec<usize>,
    /// Loss weights of `rl.loss_type`'s aggregation over the whole mini-batch (every rank's
    /// rows); 0 on tokens without loss (masked truncated responses).
    w: Tensor,
    /// 1 on response tokens.
    pub mask: Tensor,
    /// The old-policy pass's log-probs (`None`: the update's own, detached, serve).
    old: Option<Tensor>,
    advantages: Tensor,
    /// Old values and returns (PPO).
    value_targets: Option<(Tensor, Tensor)>,
    /// The reference's log-probs, when the KL is a loss term.
    logp_ref: Option<Tensor>,
}

impl MicroBatch {
    /// `micro`: indices into the step's batch, all held by this rank; `mb_tokens` (loss
    /// tokens) and `mb_rows` count the whole mini-batch.
    pub fn new(
        actors: Actors,
        x: &Experience,
        shaped: &Shaped,
        plan: &UpdatePlan,
        micro: &[usize],
        (mb_tokens, mb_rows): (usize, usize),
    ) -> Result<Self> {
        let ro = &x.rollouts;
        let dev = actors.model.info().device.clone();
        let width = ro.r_len;
        let local: Vec<usize> = micro.iter().map(|&i| i - x.local.start).collect();
        let layout = Layout::choose(ro, &local, actors.model.info(), plan.share_prompts)?;
        let lens: Vec<usize> = micro.iter().map(|&i| x.lens[i]).collect();
        let loss_lens: Vec<usize> = micro.iter().map(|&i| plan.selection.loss_lens[i]).collect();
        let w = agg_weights(
            plan.objective.loss_type.aggregation(),
            &loss_lens,
            width,
            mb_tokens,
            mb_rows,
            plan.cfg.generation.max_new_tokens,
        );
        let rows = |data: &[Vec<f64>]| rows_tensor(micro, data, width, &dev);
        let value_targets = match (&x.values, &shaped.returns) {
            (Some(v), Some(ret)) => Some((rows(v)?, rows(ret)?)),
            _ => None,
        };
        let logp_ref = match x.logp_ref.as_ref() {
            Some(lr) if plan.spec.kl == KlPlacement::InLoss && plan.beta > 0.0 => Some(rows(lr)?),
            _ => None,
        };
        Ok(Self {
            w: Tensor::from_vec(w, (micro.len(), width), &dev)?,
            mask: ro.mask(&local, &dev)?,
            old: (!x.logp_old.is_empty())
                .then(|| rows(&x.logp_old))
                .transpose()?,
            advantages: rows(&shaped.advantages)?,
            value_targets,
            logp_ref,
            layout,
            lens,
        })
    }
}

/// What one micro-batch's policy pass leaves for the statistics (all detached).
pub struct PolicyTerms {
    pub logp: Tensor,
    old: Tensor,
    pg_loss: Tensor,
    clipped: Tensor,
    /// Shared critic: the value loss and its clip mask.
    vf: Option<(Tensor, Tensor)>,
    kl_loss: Option<Tensor>,
    entropy: Option<Tensor>,
}

/// The policy's loss terms from its final hidden states, backpropagated into `acc`:
/// the clipped surrogate, the shared value head's loss, the KL term, the entropy bonus.
pub fn policy_pass(
    actors: Actors,
    plan: &UpdatePlan,
    mb: &MicroBatch,
    want_entropy: Entropy,
    acc: &mut GradAccumulator,
    params: &[(String, Var)],
) -> Result<PolicyTerms> {
    let r = &plan.cfg.rl;
    let ctx = ForwardCtx::train(Some(actors.policy), plan.dropout);
    let mut terms = None;
    backward_from_hidden::<anyhow::Error>(
        actors.model,
        &mb.layout.input,
        &ctx,
        plan.cfg.training.gradient_checkpointing,
        &mut |hidden| {
            let sc = score_hidden_states(
                actors.model,
                &ctx,
                hidden,
                &mb.layout,
                plan.cfg.generation.temperature,
                actors.shared_head(),
                want_entropy,
            )?;
            let old = mb.old.clone().unwrap_or_else(|| sc.logp.detach());
            // Clipped surrogate: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = exp(logp − logp_old).
            let (pg, clipped) =
                policy_loss(&sc.logp, &old, &mb.advantages, &mb.mask, &plan.objective)?;
            let pg_loss = weighted_sum(&pg, &mb.w)?;
            let mut loss = pg_loss.clone();
            let mut vf = None;
            if let (Some(v), Some((vold, ret))) = (&sc.values, &mb.value_targets) {
                let (vf_t, vclipped) = value_loss(v, vold, ret, r.cliprange_value)?;
                let vf_loss = weighted_sum(&vf_t, &mb.w)?;
                loss = (loss + (&vf_loss * r.vf_coef)?)?;
                vf = Some((vf_loss.detach(), vclipped));
            }
            let mut kl_loss = None;
            if let Some(lref) = &mb.logp_ref {
                let l = weighted_sum(&kl_k3(&sc.logp, lref)?, &mb.w)?;
                loss = (loss + (&l * plan.beta)?)?;
                kl_loss = Some(l.detach());
            }
            if let (Some(h), true) = (&sc.entropy, r.entropy_coef > 0.0) {
                let e = weighted_sum(h, &mb.w)?;
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
        &mut |grads| acc.add(params, grads),
    )?;
    Ok(terms.expect("the loss closure ran"))
}

/// A separate critic (`rl.critic = "separate"`): the value loss from its own hidden states,
/// backpropagated into `acc`; the loss and its clip mask. `None` without one.
pub fn critic_pass(
    actors: Actors,
    plan: &UpdatePlan,
    mb: &MicroBatch,
    acc: &mut GradAccumulator,
    params: &[(String, Var)],
) -> Result<Option<(Tensor, Tensor)>> {
    let (Some(c), Some(h), Some((vold, ret))) =
        (actors.critic, actors.value_head, &mb.value_targets)
    else {
        return Ok(None);
    };
    let r = &plan.cfg.rl;
    let ctx = ForwardCtx::train(Some(c), plan.dropout);
    let mut vf = None;
    backward_from_hidden::<anyhow::Error>(
        actors.model,
        &mb.layout.input,
        &ctx,
        plan.cfg.training.gradient_checkpointing,
        &mut |hidden| {
            let v = h.forward(&mb.layout.states(hidden)?, true)?;
            let (vf_t, vclipped) = value_loss(&v, vold, ret, r.cliprange_value)?;
            let vf_loss = weighted_sum(&vf_t, &mb.w)?;
            vf = Some((vf_loss.detach(), vclipped));
            Ok((vf_loss * r.vf_coef)?)
        },
        &mut |grads| acc.add(params, grads),
    )?;
    Ok(Some(vf.expect("the loss closure ran")))
}

/// A mini-batch's figures, summed over its micro-batches (and then over ranks).
#[derive(Default)]
pub struct Tally {
    pub pg_loss: f64,
    vf_loss: f64,
    kl_loss: f64,
    /// Σ ½ (logp − logp_old)² over response tokens.
    approxkl: f64,
    clipped: f64,
    vf_clipped: f64,
    ratio: f64,
    entropy: f64,
}

impl Tally {
    /// Adds a micro-batch's policy terms (and a separate critic's value loss); returns its
    /// ratios ρ = exp(logp − logp_old) `[b, R]`.
    pub fn add(
        &mut self,
        p: &PolicyTerms,
        critic: Option<&(Tensor, Tensor)>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let masked_sum =
            |t: &Tensor| -> Result<f64> { Ok((t * mask)?.sum_all()?.to_scalar::<f32>()? as f64) };
        for (vf_loss, vclipped) in critic.into_iter().chain(&p.vf) {
            self.vf_loss += vf_loss.to_scalar::<f32>()? as f64;
            self.vf_clipped += masked_sum(vclipped)?;
        }
        if let Some(l) = &p.kl_loss {
            self.kl_loss += l.to_scalar::<f32>()? as f64;
        }
        if let Some(h) = &p.entropy {
            self.entropy += masked_sum(h)?;
        }
        self.pg_loss += p.pg_loss.to_scalar::<f32>()? as f64;
        let diff = (&p.logp - &p.old)?;
        self.approxkl += masked_sum(&diff.sqr()?)? * 0.5;
        self.clipped += masked_sum(&p.clipped)?;
        let ratio = diff.exp()?;
        self.ratio += masked_sum(&ratio)?;
        Ok(ratio)
    }

    /// The mini-batch's statistics after `update`: the figures summed over ranks (the
    /// policy loss came back summed from the update), per response token of the mini-batch.
    pub fn into_stats(self, update: &Update, mb_tokens: usize) -> Result<UpdateStats> {
        let mut sums = [
            self.vf_loss,
            self.kl_loss,
            self.approxkl,
            self.clipped,
            self.vf_clipped,
            self.ratio,
            self.entropy,
        ];
        crate::dist::sum(&mut sums)?;
        let [vf_loss, kl_loss, approxkl, clipped, vf_clipped, ratio, entropy] = sums;
        let tok = mb_tokens.max(1) as f64;
        Ok(UpdateStats {
            pg_loss: update.loss,
            vf_loss,
            kl_loss,
            entropy: entropy / tok,
            approxkl: approxkl / tok,
            clipfrac: clipped / tok,
            vf_clipfrac: vf_clipped / tok,
            ratio_mean: ratio / tok,
            grad_norm: update.grad_norm,
            updates: 1,
        })
    }
}

/// The values of `t` `[b, R]` on response tokens (`mask` 1), row by row.
pub fn response_values(t: &Tensor, mask: &Tensor) -> Result<Vec<f32>> {
    let tv: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let mv: Vec<f32> = mask.flatten_all()?.to_vec1()?;
    Ok(tv
        .into_iter()
        .zip(mv)
        .filter(|(_, k)| *k > 0.0)
        .map(|(v, _)| v)
        .collect())
}

/// `[rows, width]` f32 of `data`'s rows `rows`, zero-padded.
fn rows_tensor(rows: &[usize], data: &[Vec<f64>], width: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; rows.len() * width];
    for (k, &i) in rows.iter().enumerate() {
        for (t, x) in data[i].iter().enumerate().take(width) {
            v[k * width + t] = *x as f32;
        }
    }
    Ok(Tensor::from_vec(v, (rows.len(), width), dev)?)
}
