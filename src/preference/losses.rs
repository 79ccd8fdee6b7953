//! The pairwise losses, as TRL names and computes them, on per-pair tensors `[n]`
//! (differentiable; any float dtype).
//!
//! Reward model (`RewardTrainer`), with scores `r_c`, `r_r` and an optional margin `m`:
//!
//! `L = −log σ(r_c − r_r − m) + c · mean((r_c + r_r)²)`, `c` = `center_rewards_coefficient`.
//!
//! DPO (`DPOTrainer`), with `Δ = (log π_c − log π_ref,c) − (log π_r − log π_ref,r)`:
//!
//! - `sigmoid`: `−(1 − ε) log σ(βΔ) − ε log σ(−βΔ)` (ε = `label_smoothing`: cDPO);
//! - `hinge`: `relu(1 − βΔ)`;
//! - `ipo`: `(Δ − 1/(2β))²`, where the log-probs are per-token means, not sums (the caller
//!   passes them so: [`DpoLoss::averages_log_probs`]).
//!
//! Implicit rewards `β (log π − log π_ref)` give the metrics `rewards/chosen`,
//! `rewards/rejected`, `rewards/margins` and `rewards/accuracies`.

use candle_core::{Result, Tensor};

/// `log σ(x)`, stable for large |x| and with the right gradient `1 − σ(x)` everywhere, 0
/// included: `−log(1 + e^{−x})` for x ≥ 0, `x − log(1 + e^{x})` for x < 0, each branch fed
/// only its own half of the line so neither overflows. (A form with `|x|` and `min(x, 0)`
/// has the right values but a gradient of 1 instead of ½ at exactly 0 — where a DPO pair
/// sits at step 0, when the policy is the reference.)
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let pos = x.ge(0.0)?;
    let zeros = x.zeros_like()?;
    let (xp, xn) = (pos.where_cond(x, &zeros)?, pos.where_cond(&zeros, x)?);
    let upper = (xp.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let lower = (&xn - (xn.exp()? + 1.0)?.log()?)?;
    pos.where_cond(&upper, &lower)
}

/// The reward-model loss, a mean over pairs.
pub fn reward_model_loss(
    r_chosen: &Tensor,
    r_rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: f64,
) -> Result<Tensor> {
    let mut diff = (r_chosen - r_rejected)?;
    if let Some(m) = margin {
        diff = (diff - m)?;
    }
    let mut loss = log_sigmoid(&diff)?.neg()?.mean_all()?;
    if center_rewards_coefficient != 0.0 {
        let centre = (r_chosen + r_rejected)?.sqr()?.mean_all()?;
        loss = (loss + (centre * center_rewards_coefficient)?)?;
    }
    Ok(loss)
}

/// TRL's `loss_type`s that rlft computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
}

impl DpoLoss {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sigmoid" => Ok(DpoLoss::Sigmoid),
            "hinge" => Ok(DpoLoss::Hinge),
            "ipo" => Ok(DpoLoss::Ipo),
            other => Err(format!(
                "unknown loss_type `{other}`; expected sigmoid, hinge or ipo"
            )),
        }
    }

    /// IPO compares per-token mean log-probs; the others sums over completion tokens.
    pub fn averages_log_probs(self) -> bool {
        self == DpoLoss::Ipo
    }
}

/// Per-pair DPO losses `[n]` from the policy's and the reference's sequence log-probs.
pub fn dpo_losses(
    kind: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    (pi_c, pi_r): (&Tensor, &Tensor),
    (ref_c, ref_r): (&Tensor, &Tensor),
) -> Result<Tensor> {
    let delta = ((pi_c - ref_c)? - (pi_r - ref_r)?)?;
    match kind {
        DpoLoss::Sigmoid => {
            let z = (&delta * beta)?;
            let pos = (log_sigmoid(&z)? * (-(1.0 - label_smoothing)))?;
            if label_smoothing == 0.0 {
                Ok(pos)
            } else {
                pos - (log_sigmoid(&z.neg()?)? * label_smoothing)?
            }
        }
        DpoLoss::Hinge => ((delta * (-beta))? + 1.0)?.relu(),
        DpoLoss::Ipo => (delta - 1.0 / (2.0 * beta))?.sqr(),
    }
}

/// KTO's per-example losses `[n]` (TRL's `KTOTrainer`, Ethayarajh et al. 2024 eq. 7), with
/// `r = log π − log π_ref` and `z0` the batch's KL estimate (detached, ≥ 0):
/// desirable `λ_D (1 − σ(β (r − z0)))`, undesirable `λ_U (1 − σ(β (z0 − r)))`. APO-zero's
/// unpaired loss is the same with `z0 = 0` (`1 − σ(β r)` and `σ(β r)`). `desirable` holds
/// 1 or 0 per example.
pub fn kto_losses(
    beta: f64,
    (desirable_weight, undesirable_weight): (f64, f64),
    (pi, reference): (&Tensor, &Tensor),
    desirable: &Tensor,
    z0: f64,
) -> Result<Tensor> {
    // d = β (r − z0); 1 − σ(d) = σ(−d) for the desirable, 1 − σ(−d) = σ(d) for the others.
    let d = (((pi - reference)? - z0)? * beta)?;
    let sigmoid = |x: &Tensor| log_sigmoid(x)?.exp();
    let good = (sigmoid(&d.neg()?)? * desirable_weight)?;
    let bad = (sigmoid(&d)? * undesirable_weight)?;
    let undesirable = (desirable.ones_like()? - desirable)?;
    (good * desirable)? + (bad * undesirable)?
}

/// KTO's KL estimate `z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x)))` over mismatched
/// pairs (each prompt with another example's completion), as a number (no gradient).
pub fn kto_kl(pi_kl: &Tensor, ref_kl: &Tensor) -> Result<f64> {
    let mean = (pi_kl.detach() - ref_kl.detach())?
        .to_dtype(candle_core::DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(mean.max(0.0))
}

/// The implicit rewards `β (log π − log π_ref)` of one side, detached.
pub fn implicit_rewards(beta: f64, pi: &Tensor, reference: &Tensor) -> Result<Tensor> {
    (pi.detach() - reference.detach())? * beta
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn vals(x: &Tensor) -> Vec<f64> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    fn ln_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let x = t(&[-800.0, -3.0, 0.0, 2.5, 800.0]);
        let got = vals(&log_sigmoid(&x).unwrap());
        close(
            &got[1..4],
            &[ln_sigmoid(-3.0), ln_sigmoid(0.0), ln_sigmoid(2.5)],
        );
        assert_eq!(got[0], -800.0);
        assert_eq!(got[4], 0.0);
        // The gradient 1 − σ(x), at 0 too (a kinked form gives 1 there) and far out.
        let v = Var::from_tensor(&x).unwrap();
        let g = log_sigmoid(v.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        close(
            &vals(g.get(&v).unwrap()),
            &[1.0, 1.0 - s(-3.0), 0.5, 1.0 - s(2.5), 0.0],
        );
    }

    /// Two pairs by hand: r = (2, 0.5) chosen, (1, 1.5) rejected, margins (0.5, 0).
    #[test]
    fn reward_model_loss_by_hand() {
        let (c, r) = (t(&[2.0, 0.5]), t(&[1.0, 1.5]));
        let l = reward_model_loss(&c, &r, None, 0.0).unwrap();
        let want = -(ln_sigmoid(1.0) + ln_sigmoid(-1.0)) / 2.0;
        close(&vals(&l), &[want]);
        let m = t(&[0.5, 0.0]);
        let l = reward_model_loss(&c, &r, Some(&m), 0.01).unwrap();
        let want = -(ln_sigmoid(0.5) + ln_sigmoid(-1.0)) / 2.0 + 0.01 * (9.0 + 4.0) / 2.0;
        close(&vals(&l), &[want]);
        // d/dr_c of −log σ(d) is −(1 − σ(d)): pair 0 at d = 1, mean over 2.
        let cv = Var::from_tensor(&c).unwrap();
        let g = reward_model_loss(cv.as_tensor(), &r, None, 0.0)
            .unwrap()
            .backward()
            .unwrap();
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        close(
            &vals(g.get(&cv).unwrap()),
            &[-(1.0 - s(1.0)) / 2.0, -(1.0 - s(-1.0)) / 2.0],
        );
    }

    /// Δ = (−3 − −4) − (−5 − −4.5) = 1.5 and (−2 − −2) − (−1 − −2) = −1 with β = 0.1.
    #[test]
    fn dpo_losses_by_hand() {
        let (pc, pr) = (t(&[-3.0, -2.0]), t(&[-5.0, -1.0]));
        let (rc, rr) = (t(&[-4.0, -2.0]), t(&[-4.5, -2.0]));
        let d = [1.5, -1.0];
        let beta = 0.1;
        let run = |k, eps| vals(&dpo_losses(k, beta, eps, (&pc, &pr), (&rc, &rr)).unwrap());
        close(
            &run(DpoLoss::Sigmoid, 0.0),
            &d.map(|d| -ln_sigmoid(beta * d)),
        );
        let eps = 0.2;
        close(
            &run(DpoLoss::Sigmoid, eps),
            &d.map(|d| -(1.0 - eps) * ln_sigmoid(beta * d) - eps * ln_sigmoid(-beta * d)),
        );
        close(
            &run(DpoLoss::Hinge, 0.0),
            &d.map(|d| (1.0 - beta * d).max(0.0)),
        );
        close(
            &run(DpoLoss::Ipo, 0.0),
            &d.map(|d| (d - 1.0 / (2.0 * beta)).powi(2)),
        );
        close(
            &vals(&implicit_rewards(beta, &pc, &rc).unwrap()),
            &[0.1, 0.0],
        );
        assert_eq!(DpoLoss::parse("ipo"), Ok(DpoLoss::Ipo));
        assert!(DpoLoss::parse("kto")
            .unwrap_err()
            .contains("sigmoid, hinge or ipo"));
        assert!(DpoLoss::Ipo.averages_log_probs() && !DpoLoss::Sigmoid.averages_log_probs());
    }
}
