//! `rlft-reward`: the interface between rlft's RL stages and reward functions.
//!
//! A reward scores a batch of finished rollouts. It sees the prompt, the completion text and
//! any extra fields of the dataset row (e.g. a reference `answer`), and returns one score per
//! sample. The RL stages (PPO/GRPO) build on this trait.

use std::collections::BTreeMap;

/// One finished rollout as a reward sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub prompt: String,
    pub completion: String,
    /// Whether a stop token ended the completion (false: it ran out of tokens).
    pub stopped: bool,
    /// The dataset row's other fields, e.g. `answer`.
    pub fields: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward `{name}`: {msg}")]
    Failed { name: String, msg: String },
    #[error("reward `{name}` returned {got} scores for {expected} samples")]
    WrongCount {
        name: String,
        got: usize,
        expected: usize,
    },
}

/// A reward function. Implementations must return exactly one finite score per sample.
pub trait Reward: Send + Sync {
    /// Name used in configs and metrics (`reward/<name>`).
    fn name(&self) -> &str;
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError>;
}

/// Runs `reward` and checks the count of scores it returned.
pub fn score_checked(reward: &dyn Reward, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
    let scores = reward.score(samples)?;
    if scores.len() != samples.len() {
        return Err(RewardError::WrongCount {
            name: reward.name().to_string(),
            got: scores.len(),
            expected: samples.len(),
        });
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Short;
    impl Reward for Short {
        fn name(&self) -> &str {
            "short"
        }
        fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
            Ok(samples.iter().skip(1).map(|_| 1.0).collect())
        }
    }

    #[test]
    fn wrong_count_is_an_error_naming_the_reward() {
        let s = Sample {
            prompt: "p".into(),
            completion: "c".into(),
            stopped: true,
            fields: BTreeMap::new(),
        };
        let err = score_checked(&Short, &[s.clone(), s]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reward `short` returned 1 scores for 2 samples"
        );
    }
}
