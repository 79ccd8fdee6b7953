//! `rlft`: LoRA fine-tuning and reinforcement learning from feedback for causal language
//! models. The binary's commands live in [`cli`]; model code is in `rlft-policies`, the
//! reward trait in `rlft-reward`.

pub mod bench;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod data;
pub mod demo;
pub mod dist;
pub mod preference;
pub mod rewards;
pub mod rl;
pub mod runtime;
pub mod sft;
pub mod telemetry;
pub mod tensorboard;
pub mod train;

pub use rlft_policies as policies;
pub use rlft_reward as reward;
