//! `overlong`: DAPO's soft over-length punishment (Yu et al. 2025, eq. 13; TRL's
//! `get_soft_overlong_punishment`). With L = the completion's tokens, L_max = `max_len`,
//! L_cache = `cache_len`:
//! `0` for L ≤ L_max − L_cache, `(L_max − L_cache − L) / L_cache` up to L_max, `−1` beyond.

use crate::{Options, Reward, RewardError, Sample};

/// Options: `max_len` (required; usually `generation.max_new_tokens`), `cache_len`
/// (required, 0 ≤ cache_len ≤ max_len; 0 is a hard −1 beyond max_len).
pub struct Overlong {
    max_len: usize,
    cache_len: usize,
}

impl Overlong {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["max_len", "cache_len"])?;
        let bad = |option: &str, msg: String| RewardError::BadOption {
            name: "overlong".into(),
            option: option.into(),
            msg,
        };
        let count = |key: &str| -> Result<usize, RewardError> {
            let v = o
                .opt_f64(key)?
                .ok_or_else(|| bad(key, "required (a number of tokens)".into()))?;
            if !(v >= 0.0 && v.fract() == 0.0) {
                return Err(bad(
                    key,
                    format!("{v}: expected a whole number of tokens ≥ 0"),
                ));
            }
            Ok(v as usize)
        };
        let (max_len, cache_len) = (count("max_len")?, count("cache_len")?);
        if cache_len > max_len {
            return Err(bad(
                "cache_len",
                format!("{cache_len} exceeds max_len {max_len}"),
            ));
        }
        Ok(Self { max_len, cache_len })
    }

    fn penalty(&self, len: usize) -> f64 {
        let free = self.max_len - self.cache_len;
        if len <= free {
            0.0
        } else if len <= self.max_len {
            (free as f64 - len as f64) / self.cache_len as f64
        } else {
            -1.0
        }
    }
}

impl Reward for Overlong {
    fn name(&self) -> &str {
        "overlong"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        Ok(samples
            .iter()
            .map(|s| self.penalty(s.completion_ids.len()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;
    use serde_json::json;

    fn overlong(v: serde_json::Value) -> Result<Overlong, RewardError> {
        Overlong::new(&Options::new("overlong", v.as_object().unwrap().clone()))
    }

    #[test]
    fn soft_punishment_as_trl() {
        // TRL's docstring example: max 100, cache 20, 90 tokens → −0.5.
        let r = overlong(json!({"max_len": 100, "cache_len": 20})).unwrap();
        let s: Vec<Sample> = [80, 81, 90, 100, 101]
            .iter()
            .map(|&n| sample(&"x".repeat(n), json!({})))
            .collect();
        assert_eq!(r.score(&s).unwrap(), vec![0.0, -0.05, -0.5, -1.0, -1.0]);
        // cache_len 0: free up to max_len, then −1.
        let r = overlong(json!({"max_len": 4, "cache_len": 0})).unwrap();
        let s = [sample("abcd", json!({})), sample("abcde", json!({}))];
        assert_eq!(r.score(&s).unwrap(), vec![0.0, -1.0]);
        assert!(overlong(json!({"max_len": 4, "cache_len": 5})).is_err());
        assert!(overlong(json!({"max_len": 4})).is_err());
        assert!(overlong(json!({"max_len": 4.5, "cache_len": 1})).is_err());
    }
}
