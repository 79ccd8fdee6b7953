//! Per-token KL estimators between policy and reference, and the adaptive KL coefficient
//! (docs/ALGORITHMS.md §4).

use serde::{Deserialize, Serialize};

/// With `logr = logp_ref − logp` (J. Schulman, "Approximating KL divergence"):
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// k1 (TRL "kl"): `−logr`.
    #[default]
    K1,
    /// k2 (TRL "mse"): `½ logr²`.
    K2,
    /// k3 (veRL "low_var_kl"): `exp(logr) − 1 − logr`, always ≥ 0.
    K3,
    /// `|logr|`.
    Abs,
}

impl KlEstimator {
    pub fn per_token(self, logp: f64, logp_ref: f64) -> f64 {
        let logr = logp_ref - logp;
        match self {
            KlEstimator::K1 => -logr,
            KlEstimator::K2 => 0.5 * logr * logr,
            KlEstimator::K3 => logr.exp() - 1.0 - logr,
            KlEstimator::Abs => logr.abs(),
        }
    }
}

/// β, fixed or adapted toward a target KL (Ziegler et al. 2019; TRL ≤ 0.11, OpenRLHF, veRL):
/// after a batch of `n` rollouts with mean sequence KL `kl`,
/// `e = clip(kl / target − 1, −0.2, 0.2)`, `β ← β · (1 + e · n / horizon)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    /// `None`: β stays fixed.
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn update(&mut self, kl: f64, n: usize) {
        if let Some(target) = self.target {
            let e = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + e * n as f64 / self.horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_by_hand() {
        // logp = −1, logp_ref = −1.5: logr = −0.5.
        let (lp, lr) = (-1.0, -1.5);
        assert!((KlEstimator::K1.per_token(lp, lr) - 0.5).abs() < 1e-12);
        assert!((KlEstimator::K2.per_token(lp, lr) - 0.125).abs() < 1e-12);
        // e^−0.5 − 1 + 0.5 = 0.6065306597 − 0.5 = 0.1065306597
        assert!((KlEstimator::K3.per_token(lp, lr) - 0.106_530_659_7).abs() < 1e-9);
        assert!((KlEstimator::Abs.per_token(lp, lr) - 0.5).abs() < 1e-12);
        // k1 can be negative, k3 never is.
        assert!(KlEstimator::K1.per_token(-2.0, -1.0) < 0.0);
        assert!(KlEstimator::K3.per_token(-2.0, -1.0) > 0.0);
        assert_eq!(KlEstimator::K3.per_token(-1.0, -1.0), 0.0);
    }

    #[test]
    fn adaptive_beta_follows_the_formula() {
        let mut c = KlController {
            beta: 0.1,
            target: Some(6.0),
            horizon: 10000.0,
        };
        // KL 9 → e = clip(0.5) = 0.2; β = 0.1 · (1 + 0.2 · 64 / 10000) = 0.100128
        c.update(9.0, 64);
        assert!((c.beta - 0.100_128).abs() < 1e-12);
        // KL 5.4 → e = −0.1; β = 0.100128 · (1 − 0.1 · 100 / 10000) = 0.100027872
        c.update(5.4, 100);
        assert!((c.beta - 0.100_027_872).abs() < 1e-12);
        let mut fixed = KlController {
            beta: 0.1,
            target: None,
            horizon: 10000.0,
        };
        fixed.update(100.0, 64);
        assert_eq!(fixed.beta, 0.1);
    }
}
