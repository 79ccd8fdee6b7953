//! Stage 1 of an RL step, experience: generate rollouts with the policy, then the scoring
//! passes over them — old log-probs and values (policy, critic), reference log-probs
//! (adapter off) — and the rewards.

use super::layout::Layout;
use super::rollout::{critic_values, response_logprobs_shared, score, to_rows, Rollouts};
use super::value_head::ValueHead;
use crate::config::rl::RlConfig;
use crate::data::prompts::Prompt;
use anyhow::Result;
use rlft_policies::logprobs::Entropy;
use rlft_policies::{
    generate, Adapter, CausalLm, ForwardCtx, GenerationConfig, SamplingParams, Tokenizer,
};
use rlft_reward::Sample;
use std::time::Instant;

/// The models of an RL run: one base, the policy adapter, and the critic (a value head on
/// the policy's hidden states, or on a separate adapter's).
#[derive(Clone, Copy)]
pub struct Actors<'a> {
    pub model: &'a dyn CausalLm,
    pub policy: &'a Adapter,
    /// The separate critic adapter (`rl.critic = "separate"`).
    pub critic: Option<&'a Adapter>,
    pub value_head: Option<&'a ValueHead>,
}

impl Actors<'_> {
    /// The value head when it reads the policy's own hidden states.
    pub fn shared_head(&self) -> Option<&ValueHead> {
        if self.critic.is_none() {
            self.value_head
        } else {
            None
        }
    }
}

/// One step's rollouts and what the scoring passes computed over them (host data, one
/// row per rollout, as long as its response).
pub struct Experience {
    /// Prompt index of each rollout (prompts repeated `num_generations` times).
    pub prompt_index: Vec<usize>,
    pub rollouts: Rollouts,
    pub lens: Vec<usize>,
    /// Old log-probs; empty when the step's single update supplies them.
    pub logp_old: Vec<Vec<f64>>,
    pub values: Option<Vec<Vec<f64>>>,
    pub logp_ref: Option<Vec<Vec<f64>>>,
    pub samples: Vec<Sample>,
    pub timing: Timing,
    /// Whether each response ended with a stop token.
    pub stopped: Vec<bool>,
    /// The longest prompt.
    pub p_len: usize,
    /// This rank's rollouts (`rollouts`, `samples`) in the step's batch; the other fields
    /// cover the whole batch after `rl::gather` (all of it with one rank).
    pub local: std::ops::Range<usize>,
}

#[derive(Default, Clone, Copy)]
pub struct Timing {
    pub generate: f64,
    pub policy: f64,
    pub reference: f64,
    pub score: f64,
    pub train: f64,
}

/// What the experience stage is asked to compute.
pub struct Request<'a> {
    pub prompts: &'a [Prompt],
    /// The step's prompts (indices into `prompts`).
    pub chosen: &'a [usize],
    pub seed: u64,
    /// Skip the old-policy pass (the single update computes the old log-probs).
    pub old_from_update: bool,
    pub reference: bool,
    /// Pack each group's prompt once into the old-policy pass ([`Layout::choose`]).
    pub share_prompts: bool,
}

/// Generates the step's rollouts and runs the scoring passes.
pub fn collect(
    actors: Actors,
    tok: &Tokenizer,
    cfg: &RlConfig,
    req: &Request,
) -> Result<Experience> {
    let mut timing = Timing::default();
    let model = actors.model;
    let (g, mb) = (
        cfg.rl.num_generations,
        cfg.training.per_device_train_batch_size,
    );
    let temperature = cfg.generation.temperature;
    // Each prompt repeated num_generations times (consecutive groups).
    let prompt_index: Vec<usize> = req
        .chosen
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, g))
        .collect();
    let rows: Vec<Vec<u32>> = prompt_index
        .iter()
        .map(|&i| req.prompts[i].ids.clone())
        .collect();
    let t0 = Instant::now();
    let gens = generate(
        model,
        Some(actors.policy),
        &rows,
        &gen_config(cfg, tok, req.seed, false),
    )?;
    let ro = Rollouts::new(prompt_index.clone(), gens, tok.pad_or_eos());
    let n = ro.len();
    let lens: Vec<usize> = (0..n).map(|i| ro.resp_len(i)).collect();
    timing.generate = t0.elapsed().as_secs_f64();

    // Old log-probs and values (policy, critic).
    let t0 = Instant::now();
    let all: Vec<usize> = (0..n).collect();
    let (mut logp_old, mut values) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for chunk in all.chunks(mb).filter(|_| !req.old_from_update) {
        // The training pass's micro-batches and layout, so the first ratio is exactly 1.
        let layout = Layout::choose(&ro, chunk, model.info(), req.share_prompts)?;
        let lens_c: Vec<usize> = chunk.iter().map(|&i| lens[i]).collect();
        let s = score(
            model,
            &ForwardCtx::inference(Some(actors.policy)),
            &layout,
            temperature,
            actors.shared_head(),
            Entropy::Skip,
        )?;
        logp_old.extend(to_rows(&s.logp, &lens_c)?);
        let v = match (actors.critic, actors.value_head) {
            (Some(c), Some(h)) => Some(critic_values(
                model,
                &ForwardCtx::inference(Some(c)),
                &layout,
                h,
            )?),
            _ => s.values,
        };
        if let Some(v) = v {
            values.extend(to_rows(&v, &lens_c)?);
        }
    }
    timing.policy = t0.elapsed().as_secs_f64();

    // Reference log-probs: the same base with the adapter off, each group's prompt once.
    let t0 = Instant::now();
    let logp_ref = if req.reference {
        Some(response_logprobs_shared(
            model,
            &ForwardCtx::inference(None),
            &ro,
            &all,
            mb,
            temperature,
        )?)
    } else {
        None
    };
    timing.reference = t0.elapsed().as_secs_f64();
    let samples = samples(req.prompts, &prompt_index, &ro, tok)?;
    let (stopped, p_len) = (ro.stopped.clone(), ro.p_len);
    Ok(Experience {
        prompt_index,
        rollouts: ro,
        lens,
        logp_old,
        values: actors.value_head.map(|_| values),
        logp_ref,
        samples,
        timing,
        stopped,
        p_len,
        local: 0..n,
    })
}

/// Reward inputs: prompt and decoded completion of each rollout, with the prompt's fields.
pub fn samples(
    prompts: &[Prompt],
    idx: &[usize],
    r: &Rollouts,
    tok: &Tokenizer,
) -> Result<Vec<Sample>> {
    (0..r.len())
        .map(|i| {
            let p = &prompts[idx[i]];
            Ok(Sample {
                prompt: p.text.clone(),
                completion: tok.decode(&r.response_ids[i], true)?,
                prompt_ids: p.ids.clone(),
                completion_ids: r.response_ids[i].clone(),
                stopped: r.stopped[i],
                fields: p.fields.clone(),
            })
        })
        .collect()
}

pub fn gen_config(cfg: &RlConfig, tok: &Tokenizer, seed: u64, greedy: bool) -> GenerationConfig {
    let g = &cfg.generation;
    let mut stop_ids = tok.stop_ids.clone();
    stop_ids.extend(&g.stop_token_ids);
    GenerationConfig {
        max_new_tokens: g.max_new_tokens,
        sampling: if greedy {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature: g.temperature,
                top_k: (g.top_k > 0).then_some(g.top_k),
                top_p: (g.top_p < 1.0).then_some(g.top_p),
            }
        },
        seed,
        stop_ids,
        pad_id: tok.pad_or_eos(),
        use_cache: true,
    }
}
