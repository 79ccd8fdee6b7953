//! Stage 4 of an RL step, metrics and the rollout log: the step's line in `metrics.jsonl`
//! (TRL's names, docs/metrics.md) and sample rollouts in `rollouts.jsonl`.

use super::experience::{Experience, Timing};
use super::shaping::{mean, Shaped};
use super::update::UpdateStats;
use crate::telemetry::METRICS;
use anyhow::Result;
use rlft_reward::Sample;

/// Everything one step's metrics line reads.
pub struct StepReport<'a> {
    /// 1-based step number.
    pub step: u64,
    pub total_steps: u64,
    pub x: &'a Experience,
    pub shaped: &'a Shaped,
    pub stats: &'a UpdateStats,
    /// Per reward part: (name, scores).
    pub parts: &'a [(String, Vec<f64>)],
    pub beta: f64,
    /// Dynamic sampling's (groups dropped, groups in the batch) (`None`: off).
    pub dropped_groups: Option<(usize, usize)>,
    pub lr: f64,
    pub vf_coef: f64,
    pub timing: Timing,
    pub step_secs: f64,
    pub elapsed: f64,
}

/// Writes the step's metrics line and one line per reward part.
pub fn log_step(s: &StepReport) {
    // The whole step's rollouts (every rank's, after rl::gather).
    let (x, n) = (s.x, s.x.lens.len());
    let step = s.step;
    let score_mean = mean(&s.shaped.scores);
    let mean_kl = s.shaped.mean_kl();
    let beta = s.beta;
    let resp_tokens: usize = x.lens.iter().sum();
    let stop_rate = x.stopped.iter().filter(|&&v| v).count() as f64 / n as f64;
    let t = s.timing;
    tracing::info!(
        target: METRICS,
        step,
        "objective/scores" = score_mean,
        "objective/kl" = mean_kl,
        "objective/non_score_reward" = -beta * mean_kl,
        "objective/rlhf_reward" = score_mean - beta * mean_kl,
        "objective/entropy" = s.stats.entropy,
        "policy/approxkl" = s.stats.approxkl,
        "policy/clipfrac" = s.stats.clipfrac,
        "policy/ratio_mean" = s.stats.ratio_mean,
        "val/vf_loss" = s.stats.vf_loss,
        "val/clipfrac" = s.stats.vf_clipfrac,
        "val/explained_variance" = explained_variance(x, s.shaped),
        "loss/policy" = s.stats.pg_loss,
        "loss/value" = s.stats.vf_loss * s.vf_coef,
        "loss/kl" = s.stats.kl_loss,
        beta,
        "response/length_mean" = resp_tokens as f64 / n as f64,
        "response/stop_rate" = stop_rate,
        lr = s.lr,
        grad_norm = s.stats.grad_norm,
        "time/generate" = t.generate,
        "time/policy" = t.policy,
        "time/reference" = t.reference,
        "time/score" = t.score,
        "time/train" = t.train,
        "time/step" = s.step_secs,
        tokens_per_s = (resp_tokens + x.p_len * n) as f64 / s.step_secs.max(1e-9),
        elapsed = s.elapsed,
        "step {step}/{} score {score_mean:.4} kl {mean_kl:.4} β {beta:.4} ({:.2} s)",
        s.total_steps,
        s.step_secs
    );
    if let Some((dropped, groups)) = s.dropped_groups {
        tracing::info!(target: METRICS, step, "dynamic_sampling/dropped_groups" = dropped, "dynamic_sampling/kept_fraction" = 1.0 - dropped as f64 / groups.max(1) as f64, "dynamic sampling dropped {dropped} of {groups} groups");
    }
    for (name, v) in s.parts {
        tracing::info!(target: METRICS, step, reward = name.as_str(), value = mean(v), "reward {name}: {:.4}", mean(v));
    }
}

/// `1 − Var(R − V) / Var(R)` over response tokens (0 when Var(R) is 0; NaN without a
/// critic).
pub fn explained_variance(x: &Experience, shaped: &Shaped) -> f64 {
    let (Some(v), Some(ret)) = (&x.values, &shaped.returns) else {
        return f64::NAN;
    };
    let rs: Vec<f64> = ret.iter().flatten().copied().collect();
    let diff: Vec<f64> = ret
        .iter()
        .flatten()
        .zip(v.iter().flatten())
        .map(|(a, b)| a - b)
        .collect();
    let var = |x: &[f64]| {
        let m = mean(x);
        x.iter().map(|y| (y - m).powi(2)).sum::<f64>() / x.len().max(1) as f64
    };
    let vr = var(&rs);
    if vr == 0.0 {
        0.0
    } else {
        1.0 - var(&diff) / vr
    }
}

/// Appends up to `limit` rollouts of the step to `rollouts.jsonl`.
pub fn write_rollouts(
    f: &mut std::fs::File,
    step: u64,
    smp: &[Sample],
    x: &Experience,
    shaped: &Shaped,
    limit: usize,
) -> Result<()> {
    use std::io::Write;
    let mut buf = String::new();
    for i in 0..smp.len().min(limit) {
        let line = serde_json::json!({
            "step": step,
            "prompt": smp[i].prompt,
            "completion": smp[i].completion,
            "score": shaped.scores[i],
            "kl": shaped.kl[i].iter().sum::<f64>(),
            "advantage": mean(&shaped.advantages[i]),
            "length": x.lens[i],
            "stopped": smp[i].stopped,
        });
        buf.push_str(&line.to_string());
        buf.push('\n');
    }
    f.write_all(buf.as_bytes())?;
    f.flush()?;
    Ok(())
}
