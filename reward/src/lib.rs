//! `rlft-reward`: the interface between rlft's RL stages and reward functions.
//!
//! A [`Reward`] scores a batch of finished rollouts ([`Sample`]s: prompt and completion text
//! and ids, and the dataset row's other fields, e.g. a reference `answer`) with one finite
//! score per sample. A [`Registry`] builds rewards by name from their config options;
//! [`Combined`] is the weighted sum `s = Σ_k w_k · s_k` the RL stages optimise.
//!
//! A user-defined reward is a type implementing [`Reward`], registered under a name with
//! [`Registry::register`] (see `examples/custom_reward.rs` and `docs/rewards.md`).

mod builtin;
mod combine;
mod options;
mod registry;

pub use builtin::extract::{extract_number, Extract};
pub use combine::{Combined, Scores, WeightedReward};
pub use options::Options;
pub use registry::{Factory, Registry};

use std::collections::BTreeMap;

/// One finished rollout as a reward sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub prompt: String,
    pub completion: String,
    pub prompt_ids: Vec<u32>,
    /// Generated ids, including the stop token when one ended the completion.
    pub completion_ids: Vec<u32>,
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
    #[error("reward `{name}` returned a non-finite score ({value}) for sample {index}")]
    NotFinite {
        name: String,
        index: usize,
        value: f64,
    },
    #[error("reward `{name}`: option `{option}`: {msg}")]
    BadOption {
        name: String,
        option: String,
        msg: String,
    },
    #[error("unknown reward `{name}`; registered: {known}")]
    Unknown { name: String, known: String },
}

impl RewardError {
    pub fn failed(name: &str, msg: impl std::fmt::Display) -> Self {
        RewardError::Failed {
            name: name.to_string(),
            msg: msg.to_string(),
        }
    }
}

/// A reward function. Implementations return exactly one finite score per sample.
pub trait Reward: Send + Sync {
    /// Name used in metrics (`reward/<name>`).
    fn name(&self) -> &str;
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError>;
}

/// Runs `reward` and checks what it returned: one finite score per sample.
pub fn score_checked(reward: &dyn Reward, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
    let scores = reward.score(samples)?;
    if scores.len() != samples.len() {
        return Err(RewardError::WrongCount {
            name: reward.name().to_string(),
            got: scores.len(),
            expected: samples.len(),
        });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(RewardError::NotFinite {
            name: reward.name().to_string(),
            index,
            value,
        });
    }
    Ok(scores)
}

#[cfg(test)]
pub(crate) fn sample(completion: &str, fields: serde_json::Value) -> Sample {
    Sample {
        prompt: "p".into(),
        completion: completion.into(),
        prompt_ids: vec![1],
        completion_ids: vec![5; completion.len()],
        stopped: true,
        fields: fields
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    }
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

    struct Nan;
    impl Reward for Nan {
        fn name(&self) -> &str {
            "nan"
        }
        fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
            Ok(samples.iter().map(|_| f64::NAN).collect())
        }
    }

    #[test]
    fn wrong_count_and_nan_are_errors_naming_the_reward() {
        let s = sample("c", serde_json::json!({}));
        let err = score_checked(&Short, &[s.clone(), s.clone()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reward `short` returned 1 scores for 2 samples"
        );
        let err = score_checked(&Nan, &[s]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reward `nan` returned a non-finite score (NaN) for sample 0"
        );
    }
}
