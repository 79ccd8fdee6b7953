//! A reward's options (the keys of its `[[reward]]` table besides `name` and `weight`), with
//! typed getters whose errors name the reward and option, and a check for unknown keys.

use crate::RewardError;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default)]
pub struct Options {
    reward: String,
    map: Map<String, Value>,
}

impl Options {
    pub fn new(reward: &str, map: Map<String, Value>) -> Self {
        Self {
            reward: reward.to_string(),
            map,
        }
    }

    pub fn reward(&self) -> &str {
        &self.reward
    }

    fn bad(&self, option: &str, msg: impl Into<String>) -> RewardError {
        RewardError::BadOption {
            name: self.reward.clone(),
            option: option.to_string(),
            msg: msg.into(),
        }
    }

    /// Errors on any key not in `known`, suggesting the closest.
    pub fn allow_only(&self, known: &[&str]) -> Result<(), RewardError> {
        for k in self.map.keys() {
            if !known.contains(&k.as_str()) {
                let hint = known
                    .iter()
                    .min_by_key(|c| strsim::levenshtein(k, c))
                    .filter(|c| strsim::levenshtein(k, c) <= (k.len().max(c.len()) / 2).max(2))
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_default();
                return Err(self.bad(
                    k,
                    format!("unknown option (known: {}){hint}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    pub fn str_or(&self, key: &str, default: &str) -> Result<String, RewardError> {
        match self.map.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.bad(key, format!("expected a string, got {v}"))),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<String, RewardError> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.bad(key, format!("expected a string, got {v}"))),
            None => Err(self.bad(key, "required")),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64, RewardError> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(key, format!("expected a number, got {v}"))),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, RewardError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected a number, got {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, RewardError> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(key, format!("expected true or false, got {v}"))),
        }
    }

    pub fn str_list(&self, key: &str) -> Result<Vec<String>, RewardError> {
        match self.map.get(key) {
            None => Err(self.bad(key, "required")),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.bad(key, "expected a list of strings"))
                })
                .collect(),
            Some(v) => Err(self.bad(key, format!("expected a list of strings, got {v}"))),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }
}
