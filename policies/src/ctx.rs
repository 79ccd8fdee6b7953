//! What a forward pass needs besides its input: which adapter is active, whether this is a
//! training pass (LoRA dropout on) and whether gradients should be recorded.

use crate::lora::Adapter;
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

pub struct ForwardCtx<'a> {
    /// The active adapter; `None` runs the base weights alone (the reference model).
    pub adapter: Option<&'a Adapter>,
    /// Record gradients to the adapter (and to any trainable base weight).
    pub grad: bool,
    /// LoRA dropout masks are drawn from this seeded generator; `None` disables dropout.
    pub dropout_rng: Option<&'a Mutex<ChaCha8Rng>>,
}

impl<'a> ForwardCtx<'a> {
    /// Inference: no gradients, no dropout.
    pub fn inference(adapter: Option<&'a Adapter>) -> Self {
        Self {
            adapter,
            grad: false,
            dropout_rng: None,
        }
    }

    /// Training: gradients recorded; dropout when `rng` is given and the adapter's p > 0.
    pub fn train(adapter: Option<&'a Adapter>, rng: Option<&'a Mutex<ChaCha8Rng>>) -> Self {
        Self {
            adapter,
            grad: true,
            dropout_rng: rng,
        }
    }

    /// A weight as this pass uses it: the tensor itself when gradients are recorded (so a
    /// trainable weight gets one), detached otherwise.
    pub fn param(&self, t: &Tensor) -> Tensor {
        if self.grad {
            t.clone()
        } else {
            t.detach()
        }
    }

    /// A keep-mask scaled by 1/(1−p) (inverted dropout), or `None` when dropout is off.
    pub(crate) fn dropout_mask(&self, p: f64, len: usize) -> Option<Vec<f32>> {
        if p <= 0.0 {
            return None;
        }
        let rng = self.dropout_rng?;
        let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
        let keep = (1.0 / (1.0 - p)) as f32;
        Some(
            (0..len)
                .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
                .collect(),
        )
    }
}
