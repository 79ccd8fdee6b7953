//! Learning from preference pairs (issue 14): the losses of reward-model training and DPO,
//! and the sequence log-probs DPO compares.
//! The stages that use them (`rlft rm`, `rlft dpo`) are not written yet.

pub mod logps;
pub mod losses;
