//! `length`: `−scale · |len − target|`, or with `max` only, `−scale · max(0, len − max)`.

use crate::{Options, Reward, RewardError, Sample};

/// Options: `target` or `max` (one required), `unit` ("tokens" | "chars", default tokens),
/// `scale` (default 1).
pub struct Length {
    target: Option<f64>,
    max: Option<f64>,
    chars: bool,
    scale: f64,
}

impl Length {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["target", "max", "unit", "scale"])?;
        let (target, max) = (o.opt_f64("target")?, o.opt_f64("max")?);
        if target.is_none() && max.is_none() {
            return Err(RewardError::BadOption {
                name: "length".into(),
                option: "target".into(),
                msg: "set `target` (distance penalty) or `max` (overflow penalty)".into(),
            });
        }
        let chars = match o.str_or("unit", "tokens")?.as_str() {
            "tokens" => false,
            "chars" => true,
            u => {
                return Err(RewardError::BadOption {
                    name: "length".into(),
                    option: "unit".into(),
                    msg: format!("`{u}`: expected tokens or chars"),
                })
            }
        };
        Ok(Self {
            target,
            max,
            chars,
            scale: o.f64_or("scale", 1.0)?,
        })
    }
}

impl Reward for Length {
    fn name(&self) -> &str {
        "length"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        Ok(samples
            .iter()
            .map(|s| {
                let len = if self.chars {
                    s.completion.chars().count()
                } else {
                    s.completion_ids.len()
                } as f64;
                let pen = match (self.target, self.max) {
                    (Some(t), _) => (len - t).abs(),
                    (None, Some(m)) => (len - m).max(0.0),
                    (None, None) => 0.0,
                };
                -self.scale * pen
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
    fn length_penalties() {
        let o = |v: serde_json::Value| Options::new("length", v.as_object().unwrap().clone());
        let s = [sample("abcd", json!({})), sample("ab", json!({}))];
        let r = Length::new(&o(json!({"target": 3, "unit": "chars", "scale": 0.5}))).unwrap();
        assert_eq!(r.score(&s).unwrap(), vec![-0.5, -0.5]);
        let r = Length::new(&o(json!({"max": 3}))).unwrap();
        assert_eq!(r.score(&s).unwrap(), vec![-1.0, 0.0]);
        assert!(Length::new(&o(json!({}))).is_err());
    }
}
