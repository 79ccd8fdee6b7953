//! Learning from preference pairs (issue 14): the losses of reward-model training and DPO.
//! The stages that use them (`rlft rm`, `rlft dpo`) are not written yet.

pub mod losses;
