//! `contains`: keywords in the completion.

use crate::{Options, Reward, RewardError, Sample};

/// Options: `keywords` (required), `mode` ("any" → 1/0, "all" → 1/0, "fraction" → share
/// found; default any), `case_sensitive` (false).
pub struct Contains {
    keywords: Vec<String>,
    mode: String,
    case_sensitive: bool,
}

impl Contains {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["keywords", "mode", "case_sensitive"])?;
        let mode = o.str_or("mode", "any")?;
        if !["any", "all", "fraction"].contains(&mode.as_str()) {
            return Err(RewardError::BadOption {
                name: "contains".into(),
                option: "mode".into(),
                msg: format!("`{mode}`: expected any, all or fraction"),
            });
        }
        let case_sensitive = o.bool_or("case_sensitive", false)?;
        let mut keywords = o.str_list("keywords")?;
        if !case_sensitive {
            keywords.iter_mut().for_each(|k| *k = k.to_lowercase());
        }
        Ok(Self {
            keywords,
            mode,
            case_sensitive,
        })
    }
}

impl Reward for Contains {
    fn name(&self) -> &str {
        "contains"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        Ok(samples
            .iter()
            .map(|s| {
                let text = if self.case_sensitive {
                    s.completion.clone()
                } else {
                    s.completion.to_lowercase()
                };
                let found = self
                    .keywords
                    .iter()
                    .filter(|k| text.contains(k.as_str()))
                    .count();
                match self.mode.as_str() {
                    "all" => f64::from(u8::from(found == self.keywords.len())),
                    "fraction" => found as f64 / self.keywords.len().max(1) as f64,
                    _ => f64::from(u8::from(found > 0)),
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
    fn keyword_modes() {
        let o = |m: &str| {
            Options::new(
                "contains",
                json!({"keywords": ["Cat", "dog"], "mode": m})
                    .as_object()
                    .unwrap()
                    .clone(),
            )
        };
        let s = [
            sample("a cat and a DOG", json!({})),
            sample("a cat", json!({})),
            sample("none", json!({})),
        ];
        assert_eq!(
            Contains::new(&o("any")).unwrap().score(&s).unwrap(),
            vec![1.0, 1.0, 0.0]
        );
        assert_eq!(
            Contains::new(&o("all")).unwrap().score(&s).unwrap(),
            vec![1.0, 0.0, 0.0]
        );
        assert_eq!(
            Contains::new(&o("fraction")).unwrap().score(&s).unwrap(),
            vec![1.0, 0.5, 0.0]
        );
    }
}
