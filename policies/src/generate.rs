//! Batched generation for left-padded prompts, with or without the KV cache.

use crate::ctx::ForwardCtx;
use crate::error::{PolicyError, Result};
use crate::families::{BatchInput, CausalLm};
use crate::lora::Adapter;
use crate::sampling::{draw, sample_with, SamplingParams};
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Sample rows in parallel when batch × vocabulary reaches this many logits.
const PARALLEL_SAMPLING_MIN: usize = 1 << 18;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// A sequence ends at the first of these (EOS and any extra stop ids).
    pub stop_ids: Vec<u32>,
    /// Id fed for padding and after a sequence has stopped.
    pub pad_id: u32,
    /// Reuse keys/values of earlier positions (off only to check the cache).
    pub use_cache: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// The generated tokens, including the stop token when one ended the sequence.
    pub completion_ids: Vec<u32>,
    /// Whether a stop token ended it (false: it hit `max_new_tokens`).
    pub stopped: bool,
}

/// Generates a completion for each prompt. Sampling draws from one generator seeded with
/// `cfg.seed`, row by row at each step, so a run is repeatable.
///
/// Rows that repeat a prompt consecutively (GRPO's and RLOO's groups) share its prefill: with
/// the KV cache the prompt runs once per group and each of the group's rows starts from its
/// keys and values, so the completions are those of [`generate_unshared`], which prefills every
/// row (a row's products do not depend on the other rows of the batch).
pub fn generate(
    model: &dyn CausalLm,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    generate_with(model, adapter, prompts, cfg, true)
}

/// [`generate`] prefilling every row's prompt, repeated ones too (the reference the shared
/// prefill is tested against).
pub fn generate_unshared(
    model: &dyn CausalLm,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    generate_with(model, adapter, prompts, cfg, false)
}

/// Each row's group (runs of equal consecutive prompts: GRPO's and RLOO's groups) and each
/// group's first row; None when no prompt repeats.
pub fn prompt_groups<P: AsRef<[u32]>>(prompts: &[P]) -> Option<(Vec<u32>, Vec<usize>)> {
    let mut row_group = Vec::with_capacity(prompts.len());
    let mut firsts: Vec<usize> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        if firsts
            .last()
            .is_none_or(|&f| prompts[f].as_ref() != p.as_ref())
        {
            firsts.push(i);
        }
        row_group.push((firsts.len() - 1) as u32);
    }
    (firsts.len() < prompts.len()).then_some((row_group, firsts))
}

fn generate_with(
    model: &dyn CausalLm,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    share_prefill: bool,
) -> Result<Vec<Generation>> {
    cfg.sampling
        .validate()
        .map_err(PolicyError::InvalidArgument)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let info = model.info();
    let dev = info.device.clone();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + cfg.max_new_tokens > info.max_positions {
        return Err(PolicyError::InvalidArgument(format!(
            "prompt of {longest} tokens + max_new_tokens {} exceeds the model's {} positions",
            cfg.max_new_tokens, info.max_positions
        )));
    }
    let ctx = ForwardCtx::inference(adapter);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let b = prompts.len();
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_ids: p.clone(),
            completion_ids: Vec::new(),
            stopped: false,
        })
        .collect();
    let mut done = vec![false; b];
    let mut cache = cfg
        .use_cache
        .then(|| model.new_cache(longest + cfg.max_new_tokens));
    // Shared prefill: the groups' prompts, padded to the same longest prompt as the rows.
    let shared = (cfg.use_cache && share_prefill)
        .then(|| prompt_groups(prompts))
        .flatten();
    let mut input = BatchInput::left_padded(prompts, cfg.pad_id, &dev)?;
    for step in 0..cfg.max_new_tokens {
        let last = match (&shared, cache.as_mut()) {
            (Some((row_group, firsts)), Some(rows_cache)) if step == 0 => {
                // 1. Prefill each group's prompt once, 2. give every row its group's keys,
                //    values and last hidden state.
                let heads: Vec<Vec<u32>> = firsts.iter().map(|&f| prompts[f].clone()).collect();
                let mut group_cache = model.new_cache(longest + cfg.max_new_tokens);
                let input_g = BatchInput::left_padded(&heads, cfg.pad_id, &dev)?;
                let hidden = model.forward_hidden(&input_g, &ctx, Some(&mut group_cache))?;
                let idx = Tensor::new(row_group.as_slice(), &dev)?;
                *rows_cache = group_cache.select_rows(row_group, &idx)?;
                let t = hidden.dim(1)?;
                hidden
                    .narrow(1, t - 1, 1)?
                    .contiguous()?
                    .index_select(&idx, 0)?
            }
            _ => {
                let hidden = model.forward_hidden(&input, &ctx, cache.as_mut())?;
                let t = hidden.dim(1)?;
                hidden.narrow(1, t - 1, 1)?
            }
        };
        let logits: Vec<Vec<f32>> = model
            .logits(&last, &ctx)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        // One uniform draw per live row, in row order (the seeded stream), then the rows'
        // tokens — in parallel when the vocabulary makes sampling worth it.
        let draws: Vec<Option<f64>> = done
            .iter()
            .map(|&d| (!d).then(|| draw(&cfg.sampling, &mut rng)))
            .collect();
        let pick =
            |(row, r): (&Vec<f32>, &Option<f64>)| r.map(|r| sample_with(row, &cfg.sampling, r));
        let picked: Vec<Option<u32>> = if b * logits[0].len() >= PARALLEL_SAMPLING_MIN {
            logits.par_iter().zip(&draws).map(pick).collect()
        } else {
            logits.iter().zip(&draws).map(pick).collect()
        };
        let mut next = Vec::with_capacity(b);
        for (i, tok) in picked.into_iter().enumerate() {
            let Some(tok) = tok else {
                next.push(cfg.pad_id);
                continue;
            };
            out[i].completion_ids.push(tok);
            if cfg.stop_ids.contains(&tok) {
                done[i] = true;
                out[i].stopped = true;
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        input = if cfg.use_cache {
            let positions: Vec<u32> = (0..b).map(|i| (prompts[i].len() + step) as u32).collect();
            BatchInput::from_parts(next, positions, vec![vec![true]; b], &dev)?
        } else {
            let rows: Vec<Vec<u32>> = (0..b)
                .map(|i| {
                    let mut r = prompts[i].clone();
                    r.extend(&out[i].completion_ids);
                    r.resize(prompts[i].len() + step + 1, cfg.pad_id);
                    r
                })
                .collect();
            BatchInput::left_padded(&rows, cfg.pad_id, &dev)?
        };
    }
    Ok(out)
}

/// Per-token log-probabilities `lp[b][t] = log p(ids[t+1] | ids[..=t])` of each row, from
/// logits divided by `temperature` (1 for scoring greedy samples), computed in f32.
/// Rows are left-padded into one batch; each result has `len − 1` entries.
pub fn score(
    model: &dyn CausalLm,
    adapter: Option<&Adapter>,
    rows: &[Vec<u32>],
    pad_id: u32,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let input = BatchInput::left_padded(rows, pad_id, &model.info().device)?;
    let ctx = ForwardCtx::inference(adapter);
    let lp = crate::logprobs::token_logprobs(model, &input, &ctx, temperature)?;
    let lp: Vec<Vec<f32>> = lp.to_vec2()?;
    let t = input.seq_len();
    Ok(rows
        .iter()
        .zip(lp)
        .map(|(r, row)| row[t - r.len()..].to_vec())
        .collect())
}

/// Helper for tests and tools: the `[b, t]` u32 tensor of `rows` (all the same length).
pub fn ids_tensor(rows: &[Vec<u32>], dev: &candle_core::Device) -> Result<Tensor> {
    let t = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), t), dev)?)
}
