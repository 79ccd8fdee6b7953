//! Stage 2 of an RL step, shaping: the scores adjusted (missing-EOS penalty, clipping), the
//! per-token KL to the reference, and the advantages (and PPO's returns) that the update
//! trains on (docs/ALGORITHMS.md §4–6).

use super::advantages::{gae, group_advantages, rloo_advantages, whiten};
use super::algorithm::{AdvantageKind, AlgorithmSpec, KlPlacement};
use super::kl::KlEstimator;
use crate::config::rl::RlSection;

/// Per-rollout training targets of one step.
pub struct Shaped {
    /// Scores after the penalty and clip.
    pub scores: Vec<f64>,
    /// Per-token KL estimate `KL_t` (zeros without a reference or before the old log-probs
    /// are known).
    pub kl: Vec<Vec<f64>>,
    pub advantages: Vec<Vec<f64>>,
    /// PPO's value targets.
    pub returns: Option<Vec<Vec<f64>>>,
}

impl Shaped {
    /// Mean over rollouts of the summed per-token KL (nats).
    pub fn mean_kl(&self) -> f64 {
        mean(&self.kl.iter().map(|k| k.iter().sum()).collect::<Vec<f64>>())
    }
}

/// `score − missing_eos_penalty` for a response that never stopped, then clipped to
/// ±`reward_clip`.
pub fn adjust_scores(r: &RlSection, total: &[f64], stopped: &[bool]) -> Vec<f64> {
    total
        .iter()
        .zip(stopped)
        .map(|(&s, &stop)| {
            let s = if stop {
                s
            } else {
                s - r.missing_eos_penalty.unwrap_or(0.0)
            };
            match r.reward_clip {
                Some(c) => s.clamp(-c, c),
                None => s,
            }
        })
        .collect()
}

/// `KL_t = est(logp_old_t, logp_ref_t)` per response token.
pub fn token_kl(
    est: KlEstimator,
    lens: &[usize],
    logp_old: &[Vec<f64>],
    logp_ref: Option<&Vec<Vec<f64>>>,
) -> Vec<Vec<f64>> {
    (0..lens.len())
        .map(|i| match (logp_ref, logp_old.get(i)) {
            (Some(lr), Some(lo)) => lo
                .iter()
                .zip(&lr[i])
                .map(|(&a, &b)| est.per_token(a, b))
                .collect(),
            _ => vec![0.0; lens[i]],
        })
        .collect()
}

/// What shaping reads from the experience.
pub struct ShapeInputs<'a> {
    pub lens: &'a [usize],
    pub logp_old: &'a [Vec<f64>],
    pub logp_ref: Option<&'a Vec<Vec<f64>>>,
    pub values: Option<&'a Vec<Vec<f64>>>,
    pub scores: Vec<f64>,
}

/// The KL penalty and the advantages.
pub fn shape(spec: &AlgorithmSpec, r: &RlSection, beta: f64, x: ShapeInputs) -> Shaped {
    let n = x.lens.len();
    let kl = token_kl(spec.kl_estimator, x.lens, x.logp_old, x.logp_ref);
    let mask: Vec<Vec<bool>> = x.lens.iter().map(|&l| vec![true; l]).collect();
    let per_token =
        |a: &[f64]| -> Vec<Vec<f64>> { x.lens.iter().zip(a).map(|(&l, &v)| vec![v; l]).collect() };
    let (advantages, returns) = match spec.advantages {
        AdvantageKind::Gae => {
            // Per-token reward: r_t = −β·KL_t, plus the score on the last token.
            let mut rew: Vec<Vec<f64>> = kl
                .iter()
                .map(|k| k.iter().map(|v| -beta * v).collect())
                .collect();
            for (i, rw) in rew.iter_mut().enumerate() {
                *rw.last_mut().expect("≥ 1 response token") += x.scores[i];
            }
            if r.whiten_rewards {
                whiten(&mut rew, &mask, false);
            }
            let values = x.values.expect("GAE needs the critic's values");
            let (mut adv, mut ret) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for i in 0..n {
                let (a, rt) = gae(&rew[i], &values[i], r.gamma, r.lam);
                adv.push(a);
                ret.push(rt);
            }
            if r.whiten_advantages {
                whiten(&mut adv, &mask, true);
            }
            (adv, Some(ret))
        }
        AdvantageKind::Group => {
            // The KL is a loss term here (KlPlacement::InLoss), not part of the reward.
            debug_assert_eq!(spec.kl, KlPlacement::InLoss);
            let a = group_advantages(&x.scores, r.num_generations, r.scale_rewards);
            (per_token(&a), None)
        }
        AdvantageKind::LeaveOneOut => {
            // Sequence reward: R = score − β · Σ_t KL_t.
            let seq_r: Vec<f64> = x
                .scores
                .iter()
                .zip(&kl)
                .map(|(s, k)| s - beta * k.iter().sum::<f64>())
                .collect();
            let mut adv = per_token(&rloo_advantages(&seq_r, r.num_generations));
            if r.whiten_advantages {
                whiten(&mut adv, &mask, true);
            }
            (adv, None)
        }
    };
    Shaped {
        scores: x.scores,
        kl,
        advantages,
        returns,
    }
}

pub fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}
