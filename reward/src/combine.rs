//! The weighted sum of several rewards: `s = Σ_k w_k · s_k`.

use crate::{score_checked, Reward, RewardError, Sample};

pub struct WeightedReward {
    pub reward: Box<dyn Reward>,
    pub weight: f64,
}

pub struct Combined {
    pub parts: Vec<WeightedReward>,
}

/// Scores of one batch: the total and each reward's own (unweighted) scores.
pub struct Scores {
    pub total: Vec<f64>,
    pub parts: Vec<(String, Vec<f64>)>,
}

impl Combined {
    /// Runs every reward (each checked for count and finiteness) and sums them with weights.
    pub fn score(&self, samples: &[Sample]) -> Result<Scores, RewardError> {
        let mut total = vec![0.0; samples.len()];
        let mut parts = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let s = score_checked(p.reward.as_ref(), samples)?;
            for (t, x) in total.iter_mut().zip(&s) {
                *t += p.weight * x;
            }
            parts.push((p.reward.name().to_string(), s));
        }
        Ok(Scores { total, parts })
    }
}
