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
    sample_with(logits, p, draw(p, rng))
}

/// The uniform draw one token takes from `rng` (none when greedy).
pub fn draw(p: &SamplingParams, rng: &mut ChaCha8Rng) -> f64 {
    if p.temperature == 0.0 {
        0.0
    } else {
        rng.random::<f64>()
    }
}

/// The token that the uniform draw `r` ∈ [0, 1) picks: candidates in descending logit order
/// (ties by index), the first whose cumulative probability reaches `r` (inverse-CDF
/// sampling). One draw per token, so rows can be sampled in parallel from pre-drawn `r`s.
pub fn sample_with(logits: &[f32], p: &SamplingParams, r: f64) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 * inv_t;
    let top_k = p.top_k.filter(|&k| k > 0 && k < logits.len());
    let top_p = p.top_p.filter(|&q| q < 1.0);
    if top_k.is_none() && top_p.is_none() {
        // The whole vocabulary: no sort needed, see `pick_by_mass`.
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (l as f64 * inv_t - max).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut cands: Vec<u32> = (0..logits.len() as u32).collect();
        return pick_by_mass(&mut cands, &w, logits, r * total);
    }
    // Candidates sorted by logit, descending; ties keep index order. With top-k only the
    // k best are selected first (O(V)), then sorted.
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let before = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if let Some(k) = top_k {
        idx.select_nth_unstable_by(k - 1, before);
        idx.truncate(k);
    }
    idx.sort_by(before);
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (logits[i] as f64 * inv_t - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if let Some(top_p) = top_p {
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
    let mut u = r * total;
    for (n, q) in probs.iter().enumerate() {
        u -= q;
        if u <= 0.0 {
            return idx[n] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// The candidate at which the cumulative weight, in descending logit order (ties by index),
/// first reaches `u` — the same token a full sort and scan would give, found by
/// quickselect-style partitioning in expected O(V): split around a pivot, and go left if
/// the mass of the candidates ranked before it reaches `u`, else subtract that mass and go
/// right. Past the end (rounding), the lowest-ranked candidate.
fn pick_by_mass(cands: &mut [u32], w: &[f64], logits: &[f32], mut u: f64) -> u32 {
    let before = |a: u32, b: u32| {
        let (la, lb) = (logits[a as usize], logits[b as usize]);
        la > lb || (la == lb && a < b)
    };
    let mut s = cands;
    loop {
        if s.len() <= 32 {
            s.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            for &c in s.iter() {
                u -= w[c as usize];
                if u <= 0.0 {
                    return c;
                }
            }
            return s[s.len() - 1];
        }
        let last = s.len() - 1;
        s.swap(s.len() / 2, last);
        let pivot = s[last];
        let mut i = 0;
        for j in 0..last {
            if before(s[j], pivot) {
                s.swap(i, j);
                i += 1;
            }
        }
        s.swap(i, last);
        let left: f64 = s[..i].iter().map(|&c| w[c as usize]).sum();
        if u <= left {
            s = &mut s[..i];
            continue;
        }
        u -= left + w[pivot as usize];
        if u <= 0.0 || i + 1 == s.len() {
            return pivot;
        }
        s = &mut s[i + 1..];
    }
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

    /// The sort-free path picks exactly the token of a full sort and scan, for every draw.
    #[test]
    fn partition_pick_equals_the_sorted_scan() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for v in [1usize, 2, 31, 33, 100, 5000] {
            // Logits with ties (rounded) and a spread of scales.
            let logits: Vec<f32> = (0..v)
                .map(|_| (rng.random::<f32>() * 8.0).round() / 2.0 - 2.0)
                .collect();
            for t in [0.5, 1.0, 3.0] {
                let p = SamplingParams {
                    temperature: t,
                    top_k: None,
                    top_p: None,
                };
                // Reference: sort all candidates, scan the normalised probabilities.
                let mut idx: Vec<usize> = (0..v).collect();
                idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                let max = logits[idx[0]] as f64 / t;
                let w: Vec<f64> = idx
                    .iter()
                    .map(|&i| (logits[i] as f64 / t - max).exp())
                    .collect();
                let total: f64 = w.iter().sum();
                for k in 0..200 {
                    let r = if k == 0 {
                        0.0
                    } else if k == 1 {
                        1.0 - 1e-12
                    } else {
                        rng.random::<f64>()
                    };
                    let mut u = r * total;
                    let mut want = idx[v - 1];
                    for (n, q) in w.iter().enumerate() {
                        u -= q;
                        if u <= 0.0 {
                            want = idx[n];
                            break;
                        }
                    }
                    assert_eq!(
                        sample_with(&logits, &p, r) as usize,
                        want,
                        "v {v} t {t} r {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_k_selects_the_k_best_in_order() {
        let logits = [0.5f32, 3.0, 1.0, 3.0, -1.0, 2.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(3),
            top_p: None,
        };
        // Ranked: 1 (3.0), 3 (3.0, later index), 5 (2.0); r = 0 takes the first.
        assert_eq!(sample_with(&logits, &p, 0.0), 1);
        assert_eq!(sample_with(&logits, &p, 1.0 - 1e-12), 5);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..500 {
            assert!([1, 3, 5].contains(&sample(&logits, &p, &mut rng)));
        }
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
