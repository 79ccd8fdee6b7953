//! `regex`: a format reward — `score_match` when the completion matches `pattern`, else
//! `score_miss`.

use crate::{Options, Reward, RewardError, Sample};
use rayon::prelude::*;

/// Options: `pattern` (required), `full` (whole completion must match; default false),
/// `score_match` (1), `score_miss` (0).
pub struct RegexReward {
    re: regex::Regex,
    hit: f64,
    miss: f64,
}

impl RegexReward {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["pattern", "full", "score_match", "score_miss"])?;
        let p = o.required_str("pattern")?;
        let p = if o.bool_or("full", false)? {
            format!("^(?s:{p})$")
        } else {
            p
        };
        let re = regex::Regex::new(&p).map_err(|e| RewardError::BadOption {
            name: o.reward().to_string(),
            option: "pattern".into(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            re,
            hit: o.f64_or("score_match", 1.0)?,
            miss: o.f64_or("score_miss", 0.0)?,
        })
    }
}

impl Reward for RegexReward {
    fn name(&self) -> &str {
        "regex"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        Ok(samples
            .par_iter()
            .map(|s| {
                if self.re.is_match(&s.completion) {
                    self.hit
                } else {
                    self.miss
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;
    use serde_json::json;

    #[test]
    fn format_reward() {
        let o = Options::new(
            "regex",
            json!({"pattern": r"\d+", "full": true, "score_miss": -1})
                .as_object()
                .unwrap()
                .clone(),
        );
        let r = RegexReward::new(&o).unwrap();
        let s = [sample("123", json!({})), sample("12 apples", json!({}))];
        assert_eq!(r.score(&s).unwrap(), vec![1.0, -1.0]);
    }
}
