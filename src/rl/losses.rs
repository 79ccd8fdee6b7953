//! PPO/GRPO losses (docs/ALGORITHMS.md §6): the policy objectives of TRL's `loss_type`s per
//! token, with token- or sequence-level importance ratios, and their aggregation as a weighted
//! sum so a mini-batch split into micro-batches gives exactly the mini-batch's loss.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// How per-token losses are summed over a mini-batch (set through `rl.loss_type`;
/// `rl.loss_aggregation` is its older name).
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

/// TRL's `GRPOConfig.loss_type`: the policy objective and its aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Clipped surrogate, each sequence's token mean, then the mean over sequences.
    Grpo,
    /// Clipped surrogate, Σ over tokens / (B · max_new_tokens).
    DrGrpo,
    /// Clipped surrogate, token mean over the mini-batch.
    Bnpo,
    /// Clipped surrogate, token mean over the mini-batch (TRL's default; see docs for bnpo).
    #[default]
    Dapo,
    /// `−sg(min(ρ, ε_max)) · A · log π`, token mean (MiniMax-M1, ScaleRL).
    Cispo,
    /// `−(4/τ) σ(τ (ρ − 1)) · A`, τ by the sign of A, as grpo's aggregation (SAPO).
    Sapo,
}

impl LossType {
    pub const NAMES: &'static str = "grpo, dr_grpo, bnpo, dapo, cispo, sapo";

    pub fn aggregation(self) -> LossAggregation {
        match self {
            LossType::Grpo | LossType::Sapo => LossAggregation::SeqMeanTokenMean,
            LossType::DrGrpo => LossAggregation::SeqMeanTokenSumNorm,
            LossType::Bnpo | LossType::Dapo | LossType::Cispo => LossAggregation::TokenMean,
        }
    }

    /// The loss type an older `rl.loss_aggregation` setting stands for.
    pub fn of_aggregation(a: LossAggregation) -> Self {
        match a {
            LossAggregation::TokenMean => LossType::Dapo,
            LossAggregation::SeqMeanTokenMean => LossType::Grpo,
            LossAggregation::SeqMeanTokenSumNorm => LossType::DrGrpo,
        }
    }

    /// The clipped-surrogate family (grpo, dr_grpo, bnpo, dapo).
    pub fn clips(self) -> bool {
        !matches!(self, LossType::Cispo | LossType::Sapo)
    }
}

/// TRL's `importance_sampling_level`: the ratio ρ per token, or one per sequence (GSPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// `ρ_t = exp(logp_t − logp_old_t)`.
    #[default]
    Token,
    /// `ρ = exp(Σ_t m_t (logp_t − logp_old_t) / Σ_t m_t)` for every token of the sequence.
    Sequence,
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

/// The policy objective: `rl.loss_type`, the importance level and their parameters.
#[derive(Debug, Clone, Copy)]
pub struct PolicyObjective {
    pub loss_type: LossType,
    pub level: ImportanceSamplingLevel,
    pub eps_low: f64,
    /// ε_high of the clip; for cispo the cap ε_max on ρ itself (TRL's `epsilon_high`).
    pub eps_high: f64,
    /// Dual clip (veRL): for A < 0, the clipped loss is at most `−A · c`.
    pub dual_clip: Option<f64>,
    /// SAPO's temperatures for A > 0 and A ≤ 0.
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
}

impl PolicyObjective {
    /// The clipped surrogate on token ratios (PPO's objective; tests).
    pub fn clipped(eps_low: f64, eps_high: f64, dual_clip: Option<f64>) -> Self {
        Self {
            loss_type: LossType::Dapo,
            level: ImportanceSamplingLevel::Token,
            eps_low,
            eps_high,
            dual_clip,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
        }
    }
}

/// `log ρ` per token `[b, R]`: `logp − logp_old`, or with sequence-level sampling each
/// row's masked mean of it, broadcast over the row (GSPO).
pub fn log_importance_weights(
    logp: &Tensor,
    logp_old: &Tensor,
    mask: &Tensor,
    level: ImportanceSamplingLevel,
) -> Result<Tensor> {
    let log_ratio = (logp - logp_old)?;
    Ok(match level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => {
            let mask = mask.to_dtype(logp.dtype())?;
            let n = mask.sum_keepdim(D::Minus1)?.maximum(1.0)?;
            let mean = (log_ratio * &mask)?
                .sum_keepdim(D::Minus1)?
                .broadcast_div(&n)?;
            mean.broadcast_as(logp.shape())?.contiguous()?
        }
    })
}

/// The policy loss per token `[b, R]` (TRL's `per_token_loss`) and where the ratio was
/// clipped (1/0, f32), with `ρ` from [`log_importance_weights`]:
/// - grpo, dr_grpo, bnpo, dapo: `max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high))` (and the
///   dual clip); clipped where the second term is the larger;
/// - cispo: `−sg(min(ρ, ε_high)) · A · logp`; clipped where ρ > ε_high and A > 0;
/// - sapo: `−(4/τ) σ(τ (ρ − 1)) · A`, τ = τ_pos where A > 0, else τ_neg; never clipped.
pub fn policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    p: &PolicyObjective,
) -> Result<(Tensor, Tensor)> {
    let ratio = log_importance_weights(logp, logp_old, mask, p.level)?.exp()?;
    let neg_adv = adv.neg()?;
    match p.loss_type {
        LossType::Cispo => {
            let capped = ratio.minimum(p.eps_high)?.detach();
            let loss = ((&neg_adv * capped)? * logp)?;
            let clipped = (ratio.gt(p.eps_high)?.to_dtype(DType::F32)?
                * adv.gt(0.0)?.to_dtype(DType::F32)?)?;
            Ok((loss, clipped))
        }
        LossType::Sapo => {
            let ones = adv.ones_like()?;
            let tau = adv.gt(0.0)?.where_cond(
                &(&ones * p.sapo_temperature_pos)?,
                &(&ones * p.sapo_temperature_neg)?,
            )?;
            // σ(τ (ρ − 1)) · 4 / τ
            let z = ((ratio - 1.0)? * &tau)?;
            let sigmoid = (z.neg()?.exp()? + 1.0)?.recip()?;
            let soft = ((sigmoid * 4.0)? / tau)?;
            Ok(((neg_adv * soft)?, adv.zeros_like()?.to_dtype(DType::F32)?))
        }
        _ => {
            let pg1 = (&neg_adv * &ratio)?;
            let pg2 = (&neg_adv * ratio.clamp(1.0 - p.eps_low, 1.0 + p.eps_high)?)?;
            let clipped = pg2.gt(&pg1)?.to_dtype(DType::F32)?;
            let mut loss = pg1.maximum(&pg2)?;
            if let Some(c) = p.dual_clip {
                let cap = (&neg_adv * c)?;
                let capped = loss.minimum(&cap)?;
                let negative = adv.lt(0.0)?;
                loss = negative.where_cond(&capped, &loss)?;
            }
            Ok((loss, clipped))
        }
    }
}

/// k3 per token, `exp(logr) − 1 − logr` with `logr = logp_ref − logp` (≥ 0; GRPO's KL
/// loss term, added with the policy loss's weights).
pub fn kl_k3(logp: &Tensor, logp_ref: &Tensor) -> Result<Tensor> {
    let logr = (logp_ref - logp)?;
    Ok(((logr.exp()? - 1.0)? - &logr)?)
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
        let mask = t(&[1.0; 4]);
        let p = PolicyObjective::clipped(0.2, 0.2, None);
        let (l, c) = policy_loss(&logp, &logp_old, &adv, &mask, &p).unwrap();
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
        let p = PolicyObjective::clipped(0.2, 0.28, None);
        let l = policy_loss(&logp, &logp_old, &adv, &mask, &p).unwrap().0;
        assert!((v(&l)[0] + 1.28).abs() < 1e-5);
        // Dual clip c = 3 with A = −1, ρ = 5: max(5, 1.2) = 5 → min(5, 3) = 3.
        let p = PolicyObjective::clipped(0.2, 0.2, Some(3.0));
        let one = t(&[1.0]);
        let (l, _) = policy_loss(&t(&[5f32.ln()]), &t(&[0.0]), &t(&[-1.0]), &one, &p).unwrap();
        assert!((v(&l)[0] - 3.0).abs() < 1e-5);
    }

    #[test]
    fn cispo_sapo_and_sequence_ratios_by_hand() {
        // One row of three tokens, the last padding: log ρ = [ln 2, ln 0.5, 7].
        let logp = Tensor::new(&[[-1.0f32, -2.0, 5.0]], &Device::Cpu).unwrap();
        let old = Tensor::new(
            &[[-1.0 - 2f32.ln(), -2.0 - 0.5f32.ln(), -2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let adv = Tensor::new(&[[1.5f32, 1.5, 1.5]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0, 0.0]], &Device::Cpu).unwrap();
        let row = |x: Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Sequence level: ρ = exp((ln 2 + ln 0.5) / 2) = 1 on every token, padding too.
        let lw = log_importance_weights(&logp, &old, &mask, ImportanceSamplingLevel::Sequence);
        assert!(row(lw.unwrap()).iter().all(|x| x.abs() < 1e-6));
        // CISPO with ε_max = 1.5: −min(ρ, 1.5) · A · logp = [−1.5·1.5·(−1), −0.5·1.5·(−2)].
        let mut p = PolicyObjective::clipped(0.2, 1.5, None);
        p.loss_type = LossType::Cispo;
        let (l, c) = policy_loss(&logp, &old, &adv, &mask, &p).unwrap();
        let (l, c) = (row(l), row(c));
        assert!(
            (l[0] - 2.25).abs() < 1e-5 && (l[1] - 1.5).abs() < 1e-5,
            "{l:?}"
        );
        assert_eq!(&c[..2], &[1.0, 0.0]);
        // SAPO, τ_pos = 1 (A > 0): −(4/1) σ(ρ − 1) · A; at ρ = 2: −4 σ(1) · 1.5.
        p.loss_type = LossType::Sapo;
        let (l, _) = policy_loss(&logp, &old, &adv, &mask, &p).unwrap();
        let want = -4.0 / (1.0 + (-1f32).exp()) * 1.5;
        assert!((row(l)[0] - want).abs() < 1e-5);
        // τ_neg applies where A ≤ 0: A = −1, ρ = 0.5, τ = 1.05: (4/1.05) σ(−0.525).
        let neg = Tensor::new(&[[-1.0f32, -1.0, -1.0]], &Device::Cpu).unwrap();
        let (l, _) = policy_loss(&logp, &old, &neg, &mask, &p).unwrap();
        let want = 4.0 / 1.05 / (1.0 + 0.525f32.exp());
        assert!((row(l)[1] - want).abs() < 1e-5);
    }

    #[test]
    fn loss_types_aggregate_as_trl() {
        use LossAggregation::*;
        let agg = |t: LossType| t.aggregation();
        assert_eq!(agg(LossType::Grpo), SeqMeanTokenMean);
        assert_eq!(agg(LossType::Sapo), SeqMeanTokenMean);
        assert_eq!(agg(LossType::DrGrpo), SeqMeanTokenSumNorm);
        assert_eq!(agg(LossType::Dapo), TokenMean);
        assert_eq!(agg(LossType::Cispo), TokenMean);
        for a in [TokenMean, SeqMeanTokenMean, SeqMeanTokenSumNorm] {
            assert_eq!(LossType::of_aggregation(a).aggregation(), a);
        }
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
