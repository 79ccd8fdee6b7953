//! One optimizer update, the same in every stage: the summed gradients of a (mini-)batch
//! are clipped to `max_grad_norm`, the loss and the norm are checked to be finite, and the
//! update is applied — or skipped with one warning naming the step and the cause.

use super::grads::{clip, GradAccumulator};
use super::optimizer::Optimizer;
use anyhow::Result;
use candle_core::Var;

/// The optimizer and the trainable variables it updates.
pub struct Updater {
    pub optimizer: Optimizer,
    max_grad_norm: f64,
}

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the loss or the norm was not finite and the update was skipped.
    pub applied: bool,
    /// The loss summed over ranks (the step's loss when each rank passes its share).
    pub loss: f64,
    /// Seconds spent summing the gradients over ranks (0 with one rank).
    pub allreduce_seconds: f64,
}

/// The cause a skipped update gives to the loop's bad-step count.
pub fn skipped_cause(loss_name: &str) -> String {
    format!("a non-finite {loss_name} or gradient norm")
}

impl Update {
    /// The step's outcome: trained, or a bad step naming the skipped update's cause.
    pub fn outcome(&self, loss_name: &str) -> crate::train::stage::StepOutcome {
        use crate::train::stage::StepOutcome;
        if self.applied {
            StepOutcome::Trained
        } else {
            StepOutcome::Bad(skipped_cause(loss_name))
        }
    }
}

impl Updater {
    pub fn new(optimizer: Optimizer, max_grad_norm: f64) -> Self {
        Self {
            optimizer,
            max_grad_norm,
        }
    }

    pub fn params(&self) -> &[(String, Var)] {
        self.optimizer.params()
    }

    /// An empty gradient sum over the trainable variables.
    pub fn accumulator(&self) -> GradAccumulator {
        GradAccumulator::new(self.params().len())
    }

    /// Sums the gradients and `loss` over ranks (one all-reduce of the gradients; nothing with one rank),
    /// clips the gradients, checks the loss (named `loss_name` in the warning) and the norm,
    /// and applies the update at `lr` when both are finite: every rank takes the same
    /// decision on the same numbers. `step` is the 0-based index of the stage step (the
    /// warning shows it 1-based, as the metrics do).
    pub fn apply(
        &mut self,
        acc: GradAccumulator,
        loss: f64,
        loss_name: &str,
        lr: f64,
        step: u64,
    ) -> Result<Update> {
        let mut grads = acc.finish(self.optimizer.params())?;
        let mut sums = [loss];
        let t0 = std::time::Instant::now();
        crate::dist::all_reduce_grads(&mut grads, &mut sums)?;
        let allreduce_seconds = t0.elapsed().as_secs_f64();
        let loss = sums[0];
        let grad_norm = clip(&mut grads, self.max_grad_norm)?;
        let applied = loss.is_finite() && grad_norm.is_finite();
        if applied {
            self.optimizer.apply(&grads, lr)?;
        } else {
            tracing::warn!(
                "step {}: non-finite {loss_name} or gradient norm ({loss_name} {loss}, grad norm {grad_norm}); update skipped",
                step + 1
            );
        }
        Ok(Update {
            grad_norm,
            applied,
            loss,
            allreduce_seconds,
        })
    }
}
