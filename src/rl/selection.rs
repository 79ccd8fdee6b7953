//! Which rollouts the update trains on, and with how many loss tokens each (DAPO's tricks,
//! docs/ALGORITHMS.md §6):
//! - `rl.dynamic_sampling` drops every group whose scores are all equal (its group
//!   advantages are 0, so it only dilutes the loss's normaliser). No refill: the step trains
//!   on the groups kept (raise `rl.batch_size` to keep the update's size); a step whose
//!   groups are all dropped makes no update.
//! - `rl.mask_truncated_completions` gives responses that hit `max_new_tokens` without a
//!   stop token no loss tokens (TRL zeroes their completion mask): they still count as rows
//!   for grpo's and dr_grpo's normalisers, as in TRL.

use crate::config::rl::RlSection;

#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Indices of the rollouts the update trains on, in rollout order.
    pub rows: Vec<usize>,
    /// Loss tokens of every rollout of the batch (its response length, or 0 when masked).
    pub loss_lens: Vec<usize>,
    /// Groups dropped by dynamic sampling.
    pub dropped_groups: usize,
}

impl Selection {
    /// Every rollout, every response token.
    pub fn all(lens: &[usize]) -> Self {
        Self {
            rows: (0..lens.len()).collect(),
            loss_lens: lens.to_vec(),
            dropped_groups: 0,
        }
    }

    /// The selection `r` asks for over a batch of consecutive groups of `r.num_generations`
    /// rollouts with final `scores`, response `lens` and `stopped` flags.
    pub fn of(r: &RlSection, scores: &[f64], lens: &[usize], stopped: &[bool]) -> Self {
        let mut sel = Self::all(lens);
        if r.mask_truncated_completions {
            for (n, &stop) in sel.loss_lens.iter_mut().zip(stopped) {
                if !stop {
                    *n = 0;
                }
            }
        }
        if r.dynamic_sampling {
            let g = r.num_generations.max(1);
            let mut rows = Vec::with_capacity(scores.len());
            for (k, group) in scores.chunks(g).enumerate() {
                let spread = group.iter().any(|&s| s != group[0]);
                if spread {
                    rows.extend(k * g..k * g + group.len());
                } else {
                    sel.dropped_groups += 1;
                }
            }
            sel.rows = rows;
        }
        sel
    }

    /// Groups in the batch.
    pub fn groups(&self, r: &RlSection) -> usize {
        self.loss_lens.len().div_ceil(r.num_generations.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_flat_groups_and_masks_truncated_rows() {
        let r = RlSection {
            num_generations: 2,
            dynamic_sampling: true,
            mask_truncated_completions: true,
            ..RlSection::default()
        };
        // Groups: [1, 1] flat, [0, 1] kept, [0.5, 0.5] flat.
        let scores = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5];
        let lens = [3, 4, 5, 6, 7, 8];
        let stopped = [true, false, true, false, true, true];
        let s = Selection::of(&r, &scores, &lens, &stopped);
        assert_eq!(s.rows, vec![2, 3]);
        assert_eq!(s.dropped_groups, 2);
        assert_eq!(s.groups(&r), 3);
        assert_eq!(s.loss_lens, vec![3, 0, 5, 0, 7, 8]);
        // Off: every row, every token.
        let s = Selection::of(&RlSection::default(), &scores, &lens, &stopped);
        assert_eq!(s, Selection::all(&lens));
    }
}
