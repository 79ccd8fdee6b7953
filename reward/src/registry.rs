//! Rewards by name: the built-ins, plus any a user registers.

use crate::{Options, Reward, RewardError};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Builds a reward from its options.
pub type Factory = Arc<dyn Fn(&Options) -> Result<Box<dyn Reward>, RewardError> + Send + Sync>;

#[derive(Clone)]
pub struct Registry {
    factories: BTreeMap<String, Factory>,
}

impl Default for Registry {
    /// The built-in rewards: `exact_match`, `numeric_match`, `regex`, `length`, `contains`,
    /// `command`.
    fn default() -> Self {
        let mut r = Self {
            factories: BTreeMap::new(),
        };
        crate::builtin::register_all(&mut r);
        r
    }
}

impl Registry {
    /// An empty registry (no built-ins).
    pub fn empty() -> Self {
        Self {
            factories: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) the reward called `name`.
    pub fn register<F>(&mut self, name: &str, factory: F)
    where
        F: Fn(&Options) -> Result<Box<dyn Reward>, RewardError> + Send + Sync + 'static,
    {
        self.factories.insert(name.to_string(), Arc::new(factory));
    }

    pub fn names(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    pub fn build(&self, name: &str, options: &Options) -> Result<Box<dyn Reward>, RewardError> {
        let f = self
            .factories
            .get(name)
            .ok_or_else(|| RewardError::Unknown {
                name: name.to_string(),
                known: self.names().join(", "),
            })?;
        f(options)
    }
}
