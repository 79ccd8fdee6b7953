//! The RL stages (`rlft ppo`, `rlft grpo`; RLOO by config): rollouts from the policy, the
//! reference and reward scores, shaping, advantages, and clipped updates of the adapter.

pub mod advantages;
pub mod kl;
pub mod losses;
pub mod rollout;
pub mod trainer;
pub mod value_head;
