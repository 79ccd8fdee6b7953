//! `exact_match` and `numeric_match`: 1 when the extracted answer equals a dataset field,
//! else 0.

use super::extract::{extract_number, Extract};
use crate::{Options, Reward, RewardError, Sample};
use rayon::prelude::*;
use serde_json::Value;

fn field_text(s: &Sample, field: &str, name: &str) -> Result<String, RewardError> {
    match s.fields.get(field) {
        Some(Value::String(v)) => Ok(v.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(v) => Err(RewardError::failed(
            name,
            format!("field `{field}` must be a string or number, got {v}"),
        )),
        None => Err(RewardError::failed(
            name,
            format!("the prompt row has no field `{field}`"),
        )),
    }
}

/// Options: `field` (default "answer"), `extract` (default "all"), `case_sensitive` (true).
pub struct ExactMatch {
    field: String,
    extract: Extract,
    case_sensitive: bool,
}

impl ExactMatch {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["field", "extract", "case_sensitive"])?;
        Ok(Self {
            field: o.str_or("field", "answer")?,
            extract: Extract::from_options(o, "all")?,
            case_sensitive: o.bool_or("case_sensitive", true)?,
        })
    }
}

impl Reward for ExactMatch {
    fn name(&self) -> &str {
        "exact_match"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        samples
            .par_iter()
            .map(|s| {
                let want = field_text(s, &self.field, self.name())?;
                let got = self.extract.apply(&s.completion);
                let eq = |a: &str, b: &str| {
                    if self.case_sensitive {
                        a == b
                    } else {
                        a.to_lowercase() == b.to_lowercase()
                    }
                };
                Ok(f64::from(u8::from(
                    got.is_some_and(|g| eq(&g, want.trim())),
                )))
            })
            .collect()
    }
}

/// Options: `field` (default "answer"), `extract` (default "first_number"), `tolerance`
/// (absolute, default 0).
pub struct NumericMatch {
    field: String,
    extract: Extract,
    tolerance: f64,
}

impl NumericMatch {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["field", "extract", "tolerance"])?;
        Ok(Self {
            field: o.str_or("field", "answer")?,
            extract: Extract::from_options(o, "first_number")?,
            tolerance: o.f64_or("tolerance", 0.0)?,
        })
    }
}

impl Reward for NumericMatch {
    fn name(&self) -> &str {
        "numeric_match"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        samples
            .par_iter()
            .map(|s| {
                let want_text = field_text(s, &self.field, self.name())?;
                let want = extract_number(&want_text).ok_or_else(|| {
                    RewardError::failed(
                        self.name(),
                        format!("field `{}` = {want_text:?} is not a number", self.field),
                    )
                })?;
                let got = self
                    .extract
                    .apply(&s.completion)
                    .and_then(|g| extract_number(&g));
                Ok(f64::from(u8::from(
                    got.is_some_and(|g| (g - want).abs() <= self.tolerance),
                )))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;
    use serde_json::json;

    fn opts(v: Value) -> Options {
        Options::new("t", v.as_object().unwrap().clone())
    }

    #[test]
    fn numeric_match_scores() {
        let r = NumericMatch::new(&opts(json!({}))).unwrap();
        let s = [
            sample("47", json!({"answer": "47"})),
            sample(" 47 and more 12", json!({"answer": 47})),
            sample("46", json!({"answer": "47"})),
            sample("none", json!({"answer": "47"})),
        ];
        assert_eq!(r.score(&s).unwrap(), vec![1.0, 1.0, 0.0, 0.0]);
        let missing = [sample("47", json!({}))];
        assert!(r
            .score(&missing)
            .unwrap_err()
            .to_string()
            .contains("no field `answer`"));
        let err = NumericMatch::new(&opts(json!({"tolerence": 1})))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("did you mean `tolerance`"), "{err}");
    }

    #[test]
    fn exact_match_scores() {
        let r = ExactMatch::new(&opts(
            json!({"extract": "first_line", "case_sensitive": false}),
        ))
        .unwrap();
        let s = [
            sample("Paris\nblah", json!({"answer": "paris"})),
            sample("Lyon", json!({"answer": "Paris"})),
        ];
        assert_eq!(r.score(&s).unwrap(), vec![1.0, 0.0]);
    }
}
