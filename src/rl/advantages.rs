//! Advantages (docs/ALGORITHMS.md §5): GAE with returns, masked whitening, GRPO's group
//! normalisation and RLOO's leave-one-out baseline. Rows are rollouts; `mask[i][t]` marks
//! response tokens.

use serde::{Deserialize, Serialize};

/// GAE over one rollout's `n` response tokens:
/// `δ_t = r_t + γ V_{t+1} − V_t` (V past the last token is 0), `A_t = δ_t + γλ A_{t+1}`,
/// `R_t = A_t + V_t`. Returns (advantages, returns).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_v - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// `x ← (x − mean) / sqrt(var + 1e-8)` over the masked entries (variance with Bessel's
/// correction, as TRL's `masked_whiten`); with `shift_mean = false` the mean is added back.
/// Masked-out entries become 0.
pub fn whiten(x: &mut [Vec<f64>], mask: &[Vec<bool>], shift_mean: bool) {
    let vals: Vec<f64> = x
        .iter()
        .zip(mask)
        .flat_map(|(r, m)| r.iter().zip(m).filter(|(_, &k)| k).map(|(v, _)| *v))
        .collect();
    let n = vals.len() as f64;
    if n == 0.0 {
        return;
    }
    let mean = vals.iter().sum::<f64>() / n;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let inv = 1.0 / (var + 1e-8).sqrt();
    for (r, m) in x.iter_mut().zip(mask) {
        for (v, &k) in r.iter_mut().zip(m) {
            *v = if k {
                let w = (*v - mean) * inv;
                if shift_mean {
                    w
                } else {
                    w + mean
                }
            } else {
                0.0
            };
        }
    }
}

/// How GRPO scales group-centred scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation (GRPO).
    #[default]
    Group,
    /// Divide by the whole batch's standard deviation.
    Batch,
    /// No division (Dr. GRPO).
    None,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Unbiased standard deviation (as `torch.std`).
fn std(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() as f64 - 1.0).max(1.0)).sqrt()
}

/// GRPO: `A_i = (s_i − mean_g(s)) / (std + 1e-4)` over consecutive groups of `g` scores.
pub fn group_advantages(scores: &[f64], g: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = std(scores);
    scores
        .chunks(g)
        .flat_map(|grp| {
            let m = mean(grp);
            let d = match scale {
                ScaleRewards::Group => std(grp) + 1e-4,
                ScaleRewards::Batch => batch_std + 1e-4,
                ScaleRewards::None => 1.0,
            };
            grp.iter().map(move |s| (s - m) / d).collect::<Vec<_>>()
        })
        .collect()
}

/// RLOO: `A_i = R_i − mean_{j≠i} R_j` within consecutive groups of `g` (g ≥ 2).
pub fn rloo_advantages(rewards: &[f64], g: usize) -> Vec<f64> {
    rewards
        .chunks(g)
        .flat_map(|grp| {
            let total: f64 = grp.iter().sum();
            let k = (grp.len() as f64 - 1.0).max(1.0);
            grp.iter()
                .map(move |r| r - (total - r) / k)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_by_hand() {
        // r = [0, 0, 1], V = [0.5, 0.2, 0.4], γ = 1, λ = 0.95:
        // δ2 = 1 − 0.4 = 0.6;            A2 = 0.6
        // δ1 = 0 + 0.4 − 0.2 = 0.2;      A1 = 0.2 + 0.95·0.6 = 0.77
        // δ0 = 0 + 0.2 − 0.5 = −0.3;     A0 = −0.3 + 0.95·0.77 = 0.4315
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 1.0, 0.95);
        for (x, y) in a.iter().zip([0.4315, 0.77, 0.6]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        for (x, y) in r.iter().zip([0.9315, 0.97, 1.0]) {
            assert!((x - y).abs() < 1e-12, "{r:?}");
        }
        // γ = 0.5, λ = 0: one-step TD. δ1 = 1 − 0.2 = 0.8; δ0 = 0 + 0.5·0.2 − 0.5 = −0.4.
        let (a, _) = gae(&[0.0, 1.0], &[0.5, 0.2], 0.5, 0.0);
        assert!((a[0] + 0.4).abs() < 1e-12 && (a[1] - 0.8).abs() < 1e-12);
    }

    #[test]
    fn whitening_by_hand() {
        // Masked values 1, 2, 3 (the 9 is padding): mean 2, unbiased var 1.
        let mut x = vec![vec![1.0, 2.0], vec![3.0, 9.0]];
        let m = vec![vec![true, true], vec![true, false]];
        whiten(&mut x, &m, true);
        let s = 1.0 / (1.0f64 + 1e-8).sqrt();
        assert!(
            (x[0][0] + s).abs() < 1e-12 && x[0][1].abs() < 1e-12 && (x[1][0] - s).abs() < 1e-12
        );
        assert_eq!(x[1][1], 0.0);
        let mut y = vec![vec![1.0, 2.0, 3.0]];
        whiten(&mut y, &[vec![true; 3]], false);
        assert!((y[0][0] - (2.0 - s)).abs() < 1e-12);
    }

    #[test]
    fn group_advantages_by_hand() {
        // Group [1, 0, 0, 1]: mean 0.5, std = sqrt(1/3) = 0.57735; group [2, 2, 2, 2]: 0.
        let a = group_advantages(
            &[1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0],
            4,
            ScaleRewards::Group,
        );
        let d = (1.0f64 / 3.0).sqrt() + 1e-4;
        assert!((a[0] - 0.5 / d).abs() < 1e-12 && (a[1] + 0.5 / d).abs() < 1e-12);
        assert!(a[4..].iter().all(|&x| x == 0.0));
        let none = group_advantages(&[1.0, 0.0, 3.0, 1.0], 2, ScaleRewards::None);
        assert_eq!(none, vec![0.5, -0.5, 1.0, -1.0]);
        // Batch std of [1, 0, 3, 1]: mean 1.25, Σ(x−m)² = 0.0625+1.5625+3.0625+0.0625 = 4.75, /3.
        let b = group_advantages(&[1.0, 0.0, 3.0, 1.0], 2, ScaleRewards::Batch);
        let bd = (4.75f64 / 3.0).sqrt() + 1e-4;
        assert!((b[2] - 1.0 / bd).abs() < 1e-12);
    }

    #[test]
    fn rloo_by_hand() {
        // [1, 2, 6]: 1 − 4 = −3, 2 − 3.5 = −1.5, 6 − 1.5 = 4.5
        assert_eq!(rloo_advantages(&[1.0, 2.0, 6.0], 3), vec![-3.0, -1.5, 4.5]);
    }
}
