//! What distinguishes PPO, GRPO and RLOO, in one place: the step reads these flags instead
//! of checking the algorithm's name (docs/ALGORITHMS.md §4–6).

use super::kl::KlEstimator;
use crate::config::rl::{Algorithm, RlConfig};

/// Where the KL penalty to the reference enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlPlacement {
    /// Subtracted from the reward before the advantages: per token (PPO) or summed over the
    /// sequence (RLOO), `r = score − β · KL`.
    InReward,
    /// Added to the loss as `β · k3` per token (GRPO).
    InLoss,
}

/// How rewards become per-token advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvantageKind {
    /// GAE over the critic's values (PPO).
    Gae,
    /// `(r − mean_group) / std_group`, the same for every token (GRPO).
    Group,
    /// Leave-one-out baseline within the group (RLOO).
    LeaveOneOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmSpec {
    pub algorithm: Algorithm,
    /// A value head (and, with `rl.critic = "separate"`, a critic adapter) is trained.
    pub needs_critic: bool,
    pub kl: KlPlacement,
    /// The per-token KL estimator (GRPO's loss always uses k3).
    pub kl_estimator: KlEstimator,
    pub advantages: AdvantageKind,
}

impl AlgorithmSpec {
    pub fn of(cfg: &RlConfig) -> Self {
        let algorithm = cfg.rl.algorithm;
        match algorithm {
            Algorithm::Ppo => Self {
                algorithm,
                needs_critic: true,
                kl: KlPlacement::InReward,
                kl_estimator: cfg.rl.kl_estimator,
                advantages: AdvantageKind::Gae,
            },
            Algorithm::Grpo => Self {
                algorithm,
                needs_critic: false,
                kl: KlPlacement::InLoss,
                kl_estimator: KlEstimator::K3,
                advantages: AdvantageKind::Group,
            },
            Algorithm::Rloo => Self {
                algorithm,
                needs_critic: false,
                kl: KlPlacement::InReward,
                kl_estimator: cfg.rl.kl_estimator,
                advantages: AdvantageKind::LeaveOneOut,
            },
        }
    }

    /// The reference pass is needed unless the KL is a loss term with β = 0 (GRPO's
    /// default in TRL).
    pub fn needs_reference(&self, beta: f64) -> bool {
        !(self.kl == KlPlacement::InLoss && beta == 0.0)
    }

    /// With one update per step and no dropout, that update's own forward pass yields the
    /// old log-probs (same weights, inputs and kernels; the ratio is 1), so the separate
    /// old-policy pass is skipped — as TRL does with `num_iterations = 1`. Only where the
    /// advantages do not need the old log-probs (KL in the loss, no critic), and where the
    /// update sees every rollout (dynamic sampling may drop some, whose old log-probs the
    /// step's KL still needs).
    pub fn old_logprobs_from_update(&self, cfg: &RlConfig, dropout: bool) -> bool {
        self.kl == KlPlacement::InLoss
            && !self.needs_critic
            && cfg.rl.num_ppo_epochs == 1
            && cfg.rl.num_mini_batches == 1
            && !dropout
            && !cfg.rl.dynamic_sampling
    }

    /// The name for logs and the progress bar: "ppo", "grpo", "rloo".
    pub fn name(&self) -> String {
        format!("{:?}", self.algorithm).to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_papers() {
        let mut cfg = RlConfig::default();
        let ppo = AlgorithmSpec::of(&cfg);
        assert!(ppo.needs_critic && ppo.kl == KlPlacement::InReward);
        assert!(
            ppo.needs_reference(0.0),
            "PPO's reward always has the KL term"
        );
        cfg.rl.algorithm = Algorithm::Grpo;
        let grpo = AlgorithmSpec::of(&cfg);
        assert_eq!(grpo.kl_estimator, KlEstimator::K3);
        assert!(!grpo.needs_reference(0.0) && grpo.needs_reference(0.04));
        cfg.rl.num_ppo_epochs = 1;
        assert!(grpo.old_logprobs_from_update(&cfg, false));
        assert!(
            !grpo.old_logprobs_from_update(&cfg, true),
            "dropout: the update's pass differs"
        );
        cfg.rl.dynamic_sampling = true;
        assert!(
            !grpo.old_logprobs_from_update(&cfg, false),
            "dynamic sampling: the update skips rollouts"
        );
        cfg.rl.dynamic_sampling = false;
        cfg.rl.algorithm = Algorithm::Rloo;
        let rloo = AlgorithmSpec::of(&cfg);
        assert!(!rloo.needs_critic && rloo.advantages == AdvantageKind::LeaveOneOut);
        assert!(!rloo.old_logprobs_from_update(&cfg, false));
    }
}
