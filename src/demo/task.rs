//! The demo task: two-number addition, prompt `47+38=`, answer `85` and end of sequence;
//! scored by exact match of the whole completion.
//!
//! Every pair (a, b) with a, b < 100 is either held out (the evaluation set, used by no
//! training data) or available for training. The pretraining corpus is plain equations
//! `a+b=c` in which, when the units digits carry, the carry is dropped half the time
//! (`47+38=75`), and equations run on line after line: the base model learns addition with
//! a systematic flaw and never stops after an answer. SFT's modest set of demonstrations
//! teaches the answer format (the answer, then EOS); RL, rewarded for right answers, can
//! repair the flaw.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

pub const MAX_OPERAND: u32 = 50;

/// Whether (a, b) belongs to the held-out evaluation set (about 10% of pairs).
pub fn held_out(a: u32, b: u32) -> bool {
    // A fixed hash, so the split never depends on a seed.
    (a.wrapping_mul(2_654_435_761) ^ b.wrapping_mul(40_503)).wrapping_mul(2_246_822_519) % 10 == 0
}

pub fn prompt(a: u32, b: u32) -> String {
    format!("{a}+{b}=")
}

pub fn carries(a: u32, b: u32) -> bool {
    a % 10 + b % 10 >= 10
}

fn training_pair(rng: &mut ChaCha8Rng) -> (u32, u32) {
    loop {
        let (a, b) = (
            rng.random_range(0..MAX_OPERAND),
            rng.random_range(0..MAX_OPERAND),
        );
        if !held_out(a, b) {
            return (a, b);
        }
    }
}

/// Pretraining rows `{"text"}`, each `per_line` equations, carries dropped with probability
/// `flaw`.
pub fn corpus(lines: usize, per_line: usize, flaw: f64, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..lines)
        .map(|_| {
            let text: String = (0..per_line)
                .map(|_| {
                    let (a, b) = training_pair(&mut rng);
                    let c = if carries(a, b) && rng.random_bool(flaw) {
                        a + b - 10
                    } else {
                        a + b
                    };
                    format!("{a}+{b}={c}\n")
                })
                .collect();
            json!({ "text": text })
        })
        .collect()
}

/// SFT demonstrations `{"prompt", "completion"}` with correct answers.
pub fn demonstrations(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = training_pair(&mut rng);
            json!({ "prompt": prompt(a, b), "completion": (a + b).to_string() })
        })
        .collect()
}

/// RL prompts `{"prompt", "answer"}` from the training pairs.
pub fn rl_prompts(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = training_pair(&mut rng);
            json!({ "prompt": prompt(a, b), "answer": (a + b).to_string() })
        })
        .collect()
}

/// The kinds of wrong answer in the preference pairs.
pub const REJECTED_KINDS: usize = 4;

/// A preference pair for the problem (a, b): the right answer chosen over a wrong one, of
/// kind `kind` mod [`REJECTED_KINDS`]: the dropped-carry answer the base model learned (or,
/// without a carry, one ten too high); an off-by-one; a run-on (the right answer, then the
/// start of the next equation, as the base model writes them); an answer cut short (its first digit; an
/// off-by-one for a one-digit answer) — the SFT model's own mistakes.
fn preference_pair(a: u32, b: u32, kind: usize, rng: &mut ChaCha8Rng) -> serde_json::Value {
    let c = a + b;
    let off_by_one = |rng: &mut ChaCha8Rng| {
        if c == 0 || rng.random_bool(0.5) {
            c + 1
        } else {
            c - 1
        }
    };
    let rejected = match kind % REJECTED_KINDS {
        0 if carries(a, b) => (c - 10).to_string(),
        0 => (c + 10).to_string(),
        1 => off_by_one(rng).to_string(),
        2 => {
            let (a2, _) = training_pair(rng);
            format!("{c}\n{a2}+")
        }
        _ if c >= 10 => (c / 10).to_string(),
        _ => off_by_one(rng).to_string(),
    };
    json!({ "prompt": prompt(a, b), "chosen": c.to_string(), "rejected": rejected })
}

/// Preference pairs `{"prompt", "chosen", "rejected"}` on training problems.
pub fn preference_pairs(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let (a, b) = training_pair(&mut rng);
            preference_pair(a, b, i, &mut rng)
        })
        .collect()
}

/// One preference pair per held-out problem, the kinds of wrong answer in turn.
pub fn eval_preference_pairs() -> Vec<serde_json::Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut out = Vec::new();
    for a in 0..MAX_OPERAND {
        for b in 0..MAX_OPERAND {
            if held_out(a, b) {
                let kind = out.len();
                out.push(preference_pair(a, b, kind, &mut rng));
            }
        }
    }
    out
}

/// Every held-out pair as `{"prompt", "answer"}`.
pub fn eval_set() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for a in 0..MAX_OPERAND {
        for b in 0..MAX_OPERAND {
            if held_out(a, b) {
                out.push(json!({ "prompt": prompt(a, b), "answer": (a + b).to_string() }));
            }
        }
    }
    out
}

pub fn write_jsonl(path: &std::path::Path, rows: &[serde_json::Value]) -> std::io::Result<()> {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_pairs_never_reach_training_data() {
        let eval = eval_set();
        assert!(eval.len() > 200 && eval.len() < 300, "{}", eval.len());
        let seen = |rows: &[serde_json::Value], key: &str| -> Vec<String> {
            rows.iter()
                .map(|r| r[key].as_str().unwrap().to_string())
                .collect()
        };
        let eval_prompts = seen(&eval, "prompt");
        assert_eq!(seen(&eval_preference_pairs(), "prompt"), eval_prompts);
        for p in seen(&demonstrations(2000, 1), "prompt")
            .iter()
            .chain(&seen(&rl_prompts(2000, 2), "prompt"))
            .chain(&seen(&preference_pairs(2000, 3), "prompt"))
        {
            assert!(!eval_prompts.contains(p), "{p}");
        }
        for row in corpus(200, 8, 0.5, 3) {
            for eq in row["text"].as_str().unwrap().lines() {
                let (ab, _) = eq.split_once('=').unwrap();
                let (a, b) = ab.split_once('+').unwrap();
                assert!(!held_out(a.parse().unwrap(), b.parse().unwrap()), "{eq}");
            }
        }
    }

    /// The chosen answer is the sum; the rejected one is each kind of wrong answer.
    #[test]
    fn preference_pairs_prefer_the_right_sum() {
        let (mut carry, mut off_by_one, mut run_on, mut short) = (0, 0, 0, 0);
        for row in preference_pairs(400, 5) {
            let (a, b) = row["prompt"]
                .as_str()
                .unwrap()
                .trim_end_matches('=')
                .split_once('+')
                .unwrap();
            let c: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
            assert_eq!(row["chosen"], c.to_string());
            let r = row["rejected"].as_str().unwrap();
            assert_ne!(r, c.to_string());
            match r.parse::<u32>() {
                Ok(x) if c >= 10 && x == c / 10 => short += 1,
                Ok(x) if x + 10 == c || x == c + 10 => carry += 1,
                Ok(x) if x.abs_diff(c) == 1 => off_by_one += 1,
                Ok(x) => panic!("{x} for {c}"),
                Err(_) => {
                    assert!(r.starts_with(&format!("{c}\n")), "{r}");
                    run_on += 1;
                }
            }
        }
        assert_eq!((carry, run_on), (100, 100));
        // One-digit answers are not cut short but off by one.
        assert_eq!(off_by_one + short, 200);
        assert!(short > 80, "{short}");
    }

    #[test]
    fn the_flaw_drops_carries_at_the_given_rate() {
        let (mut carry, mut dropped) = (0, 0);
        for row in corpus(500, 8, 0.5, 4) {
            for eq in row["text"].as_str().unwrap().lines() {
                let (ab, c) = eq.split_once('=').unwrap();
                let (a, b) = ab.split_once('+').unwrap();
                let (a, b, c): (u32, u32, u32) =
                    (a.parse().unwrap(), b.parse().unwrap(), c.parse().unwrap());
                if carries(a, b) {
                    carry += 1;
                    dropped += usize::from(c == a + b - 10);
                } else {
                    assert_eq!(c, a + b);
                }
            }
        }
        let rate = dropped as f64 / carry as f64;
        assert!((rate - 0.5).abs() < 0.05, "{rate}");
    }
}
