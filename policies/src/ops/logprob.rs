//! Per-token log-probabilities of chosen tokens, in f32, with a fused backward.
//!
//! `lp[i] = logits[i, y_i] − logsumexp(logits[i, :])`;
//! `d logits[i, v] = g_i · (1[v = y_i] − softmax(logits[i])_v)`.

use super::bridge::{bridge1, Backward1};
use candle_core::{Result, Tensor, D};

/// `logits`: [n, V] (any float dtype; computed in f32), `targets`: [n] u32 → [n] f32.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits
        .to_dtype(super::compute_dtype(logits.dtype()))?
        .contiguous()?;
    let det = logits.detach();
    let lse = det.log_sum_exp(D::Minus1)?;
    let idx = targets.unsqueeze(1)?;
    let picked = det.gather(&idx, 1)?.squeeze(1)?;
    let out = (picked - &lse)?;
    bridge1(
        &logits,
        out,
        LogprobBwd {
            logits: det,
            lse,
            idx,
        },
    )
}

/// Entropy `H = −Σ p log p` of each row of `logits` ([n, V]) in f32, differentiable through
/// candle's ops.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(super::compute_dtype(logits.dtype()))?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()
}

struct LogprobBwd {
    logits: Tensor,
    lse: Tensor,
    idx: Tensor,
}

impl Backward1 for LogprobBwd {
    fn name(&self) -> &'static str {
        "logprob-bridge"
    }
    fn backward(&self, g: &Tensor) -> Result<Tensor> {
        let g = g.unsqueeze(1)?;
        let p = self.logits.broadcast_sub(&self.lse.unsqueeze(1)?)?.exp()?;
        let minus = p.broadcast_mul(&g)?.neg()?;
        minus.scatter_add(&self.idx, &g, 1)
    }
}
