//! The training-loop pieces every stage shares: optimizer, schedule, gradient accumulation
//! and clipping, checkpoints, the trainable set.

pub mod checkpoint;
pub mod grads;
pub mod optimizer;
pub mod schedule;
pub mod trainable;
