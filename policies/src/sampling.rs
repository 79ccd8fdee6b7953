//! Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (`None` or 1: all).
    pub top_p: Option<f64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        Ok(())
    }
}

/// Index of the largest value (first on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws one token id from `logits` (one row, any scale).
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    // Candidates sorted by logit, descending; ties keep index order.
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = p.top_k.filter(|&k| k > 0) {
        idx.truncate(k.min(idx.len()));
    }
    let max = logits[idx[0]] as f64 * inv_t;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (logits[i] as f64 * inv_t - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if let Some(top_p) = p.top_p.filter(|&q| q < 1.0) {
        // Keep tokens until the cumulative probability reaches top_p (at least one).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (n, q) in probs.iter().enumerate() {
        u -= q;
        if u <= 0.0 {
            return idx[n] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_argmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            sample(&[0.1, 3.0, 2.9], &SamplingParams::greedy(), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            top_p: None,
        };
        for _ in 0..50 {
            assert_eq!(sample(&[0.0, 1.0, 0.5, 0.9], &p, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // probs ≈ [0.6, 0.3, 0.1]: top_p 0.8 keeps tokens 0 and 1, never 2.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.8),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        // Renormalised 2:1 between tokens 0 and 1.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((ratio - 2.0).abs() < 0.25, "ratio {ratio}");
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        let logits = [0.0f32, 1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let ones = (0..20000)
            .filter(|_| sample(&logits, &p, &mut rng) == 1)
            .count();
        let expect = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((ones as f64 / 20000.0 - expect).abs() < 0.015);
    }
}
