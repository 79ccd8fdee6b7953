//! The rewards an RL run optimises: built from the `[[reward]]` tables, scoring a step's
//! rollouts (a non-finite score makes a bad step, any other failure ends the run), and the
//! greedy evaluation on held-out prompts.

use super::experience::{self, gen_config, Experience};
use super::rollout::Rollouts;
use crate::config::rl::RlConfig;
use crate::data::prompts::Prompt;
use crate::train::stage::StepOutcome;
use anyhow::{Context, Result};
use rlft_policies::{generate, Adapter, CausalLm, Tokenizer};
use rlft_reward::{Combined, Options, Registry, RewardError, Scores, WeightedReward};
use std::time::Instant;

/// Builds the weighted reward sum from the `[[reward]]` tables.
pub fn build_rewards(cfg: &RlConfig, registry: &Registry) -> Result<Combined> {
    let mut parts = Vec::new();
    for (i, spec) in cfg.reward.iter().enumerate() {
        let opts = Options::new(&spec.name, spec.options.clone());
        let reward = registry
            .build(&spec.name, &opts)
            .with_context(|| format!("[[reward]] #{} (`{}`)", i + 1, spec.name))?;
        parts.push(WeightedReward {
            reward,
            weight: spec.weight,
        });
    }
    Ok(Combined { parts })
}

/// Greedy completions of `prompts` scored by the rewards: the mean total score.
pub fn evaluate(
    model: &dyn CausalLm,
    adapter: Option<&Adapter>,
    tok: &Tokenizer,
    prompts: &[Prompt],
    rewards: &Combined,
    cfg: &RlConfig,
) -> Result<f64> {
    let mut total = 0.0;
    for chunk in (0..prompts.len()).collect::<Vec<_>>().chunks(64) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].ids.clone()).collect();
        let gens = generate(model, adapter, &rows, &gen_config(cfg, tok, 0, true))?;
        let r = Rollouts::new(chunk.to_vec(), gens, tok.pad_or_eos());
        let s = rewards.score(&experience::samples(prompts, chunk, &r, tok)?)?;
        total += s.total.iter().sum::<f64>();
    }
    Ok(total / prompts.len().max(1) as f64)
}

/// The rewards of step `step`'s rollouts (and the time they took, into `x.timing`). A
/// non-finite score makes the step a bad one (inner `Err`); any other reward failure ends
/// the run.
pub fn score_step(
    rewards: &Combined,
    x: &mut Experience,
    step: u64,
) -> Result<std::result::Result<Scores, StepOutcome>> {
    let t0 = Instant::now();
    let scored = match rewards.score(&x.samples) {
        Ok(s) => s,
        Err(e @ RewardError::NotFinite { .. }) => {
            tracing::warn!("step {}: {e}; update skipped", step + 1);
            return Ok(Err(StepOutcome::Bad(e.to_string())));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("scoring the rollouts of step {}", step + 1))
        }
    };
    x.timing.score = t0.elapsed().as_secs_f64();
    Ok(Ok(scored))
}
