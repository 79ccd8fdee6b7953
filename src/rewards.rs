//! The reward registry rlft's CLI uses: the built-ins of `rlft-reward`. A program that adds
//! its own rewards registers them on [`default_registry`]'s result and hands it to
//! [`crate::cli::main_with_registry`] (see examples/custom_reward.rs).

use rlft_reward::Registry;

pub fn default_registry() -> Registry {
    Registry::default()
}
