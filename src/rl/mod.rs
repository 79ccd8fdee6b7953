//! The RL stages (`rlft ppo`, `rlft grpo`; RLOO by config): rollouts from the policy, the
//! reference and reward scores, shaping, advantages, and clipped updates of the adapter.
//! `trainer.rs` is the stage and its step; each numbered stage of the step has its file.

pub mod advantages;
pub mod algorithm;
pub mod experience;
pub mod gather;
pub mod kl;
pub mod layout;
pub mod losses;
pub mod micro_batch;
pub mod report;
pub mod rollout;
pub mod scoring;
pub mod selection;
pub mod shaping;
pub mod trainer;
pub mod update;
pub mod value_head;
