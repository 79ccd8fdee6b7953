//! PPO/GRPO losses (docs/ALGORITHMS.md §6), per token, and their aggregation as a weighted
//! sum so a mini-batch split into micro-batches gives exactly the mini-batch's loss.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Σ over masked tokens of the mini-batch / their count.
    #[default]
    TokenMean,
    /// Mean over sequences of each sequence's token mean (GRPO's original).
    SeqMeanTokenMean,
    /// Σ over masked tokens / (B · max_new_tokens) (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// Per-token weights `w` such that `agg(l) = Σ w · l` over a mini-batch.
/// `lens[i]`: response tokens of row i; `mb_tokens`, `mb_rows`: the mini-batch's totals.
pub fn agg_weights(
    mode: LossAggregation,
    lens: &[usize],
    width: usize,
    mb_tokens: usize,
    mb_rows: usize,
    max_new_tokens: usize,
) -> Vec<f32> {
    let mut w = vec![0f32; lens.len() * width];
    for (i, &n) in lens.iter().enumerate() {
        let v = match mode {
            LossAggregation::TokenMean => 1.0 / mb_tokens.max(1) as f64,
            LossAggregation::SeqMeanTokenMean => 1.0 / (n.max(1) * mb_rows.max(1)) as f64,
            LossAggregation::SeqMeanTokenSumNorm => {
                1.0 / (mb_rows.max(1) * max_new_tokens.max(1)) as f64
            }
        };
        for t in 0..n.min(width) {
            w[i * width + t] = v as f32;
        }
    }
    w
}

#[derive(Debug, Clone, Copy)]
pub struct ClipParams {
    pub eps_low: f64,
    pub eps_high: f64,
    /// Dual clip (veRL): for A < 0, the loss is at most `−A · c`.
    pub dual_clip: Option<f64>,
}

/// Clipped surrogate per token: `max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high))` with
/// `ρ = exp(logp − logp_old)`. Returns (loss, clipped) where `clipped` is 1 where the
/// clipped term was the larger.
pub fn policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    p: &ClipParams,
) -> Result<(Tensor, Tensor)> {
    let ratio = (logp - logp_old)?.exp()?;
    let neg_adv = adv.neg()?;
    let pg1 = (&neg_adv * &ratio)?;
    let pg2 = (&neg_adv * ratio.clamp(1.0 - p.eps_low, 1.0 + p.eps_high)?)?;
    let clipped = pg2.gt(&pg1)?.to_dtype(candle_core::DType::F32)?;
    let mut loss = pg1.maximum(&pg2)?;
    if let Some(c) = p.dual_clip {
        let cap = (&neg_adv * c)?;
        let capped = loss.minimum(&cap)?;
        let negative = adv.lt(0.0)?;
        loss = negative.where_cond(&capped, &loss)?;
    }
    Ok((loss, clipped))
}

/// Clipped value loss per token: `½ max((V − R)², (clip(V, V_old ± ε) − R)²)`.
/// Returns (loss, clipped).
pub fn value_loss(v: &Tensor, v_old: &Tensor, ret: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let lo = (v_old - eps)?;
    let hi = (v_old + eps)?;
    let vclip = v.maximum(&lo)?.minimum(&hi)?;
    let l1 = (v - ret)?.sqr()?;
    let l2 = (vclip - ret)?.sqr()?;
    let clipped = l2.gt(&l1)?.to_dtype(candle_core::DType::F32)?;
    Ok(((l1.maximum(&l2)? * 0.5)?, clipped))
}

/// `Σ w · x` as a scalar tensor.
pub fn weighted_sum(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok((x * w)?.sum_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn v(x: &Tensor) -> Vec<f32> {
        x.to_vec1().unwrap()
    }

    #[test]
    fn clipped_policy_loss_by_hand() {
        // ρ = e^{logp − logp_old} = [1.5, 0.5, 1.1, 0.5] via logs.
        let logp_old = t(&[0.0, 0.0, 0.0, 0.0]);
        let logp = t(&[1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln(), 0.5f32.ln()]);
        let adv = t(&[1.0, 1.0, -2.0, -1.0]);
        let p = ClipParams {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
        };
        let (l, c) = policy_loss(&logp, &logp_old, &adv, &p).unwrap();
        // A=1, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped)
        // A=1, ρ=0.5: max(−0.5, −0.8) = −0.5
        // A=−2, ρ=1.1: max(2.2, 2.2) = 2.2 (inside the range)
        // A=−1, ρ=0.5: max(0.5, 0.8) = 0.8 (clipped)
        let want = [-1.2, -0.5, 2.2, 0.8];
        for (a, b) in v(&l).iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{:?}", v(&l));
        }
        assert_eq!(v(&c), vec![1.0, 0.0, 0.0, 1.0]);
        // ε_high = 0.28 (DAPO's clip-higher): A=1, ρ=1.5 → max(−1.5, −1.28) = −1.28.
        let p = ClipParams {
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: None,
        };
        assert!((v(&policy_loss(&logp, &logp_old, &adv, &p).unwrap().0)[0] + 1.28).abs() < 1e-5);
        // Dual clip c = 3 with A = −1, ρ = 5: max(5, 1.2) = 5 → min(5, 3) = 3.
        let p = ClipParams {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: Some(3.0),
        };
        let (l, _) = policy_loss(&t(&[5f32.ln()]), &t(&[0.0]), &t(&[-1.0]), &p).unwrap();
        assert!((v(&l)[0] - 3.0).abs() < 1e-5);
    }

    #[test]
    fn clipped_value_loss_by_hand() {
        // V_old = 0, ε = 0.2. V = 1, R = 1: clip(V) = 0.2 → max(0, 0.64) / 2 = 0.32.
        // V = 0.1, R = 1: inside → 0.81 / 2 = 0.405.  V = −1, R = −1: clip = −0.2 → 0.32.
        let (l, c) = value_loss(
            &t(&[1.0, 0.1, -1.0]),
            &t(&[0.0, 0.0, 0.0]),
            &t(&[1.0, 1.0, -1.0]),
            0.2,
        )
        .unwrap();
        for (a, b) in v(&l).iter().zip([0.32, 0.405, 0.32]) {
            assert!((a - b).abs() < 1e-6, "{:?}", v(&l));
        }
        assert_eq!(v(&c), vec![1.0, 0.0, 1.0]);
    }

    #[test]
    fn the_three_aggregations_by_hand() {
        // Two rows of lengths 1 and 3, width 3; per-token loss l = [[4, ·, ·], [1, 2, 3]].
        let l = Tensor::new(&[[4f32, 9.0, 9.0], [1.0, 2.0, 3.0]], &Device::Cpu).unwrap();
        let lens = [1, 3];
        let agg = |mode| {
            let w = agg_weights(mode, &lens, 3, 4, 2, 5);
            let w = Tensor::from_vec(w, (2, 3), &Device::Cpu).unwrap();
            weighted_sum(&l, &w).unwrap().to_scalar::<f32>().unwrap()
        };
        // token mean: (4 + 1 + 2 + 3) / 4 = 2.5
        assert!((agg(LossAggregation::TokenMean) - 2.5).abs() < 1e-6);
        // seq mean of token means: (4/1 + 6/3) / 2 = 3
        assert!((agg(LossAggregation::SeqMeanTokenMean) - 3.0).abs() < 1e-6);
        // sum / (B · max_new_tokens) = 10 / (2 · 5) = 1
        assert!((agg(LossAggregation::SeqMeanTokenSumNorm) - 1.0).abs() < 1e-6);
        // Splitting the mini-batch into micro-batches sums to the same value.
        let w = agg_weights(LossAggregation::SeqMeanTokenMean, &lens[1..], 3, 4, 2, 5);
        let part = (6.0 * w[0]) as f64;
        assert!((part - 1.0).abs() < 1e-6);
    }
}
