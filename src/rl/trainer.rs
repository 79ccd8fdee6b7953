//! The RL loop: a step samples prompts, generates rollouts with the policy (KV-cached), scores
//! them (old log-probs and values, reference log-probs, rewards), shapes rewards with the KL
//! penalty, computes advantages, and runs `num_ppo_epochs` × shuffled mini-batches ×
//! micro-batches of clipped updates on the adapter (and value head). docs/ALGORITHMS.md §3–7.

use super::advantages::{gae, group_advantages, rloo_advantages, whiten};
use super::kl::{KlController, KlEstimator};
use super::losses::{agg_weights, policy_loss, value_loss, weighted_sum, ClipParams};
use super::rollout::{critic_values, response_logprobs, score, Rollouts};
use super::value_head::ValueHead;
use crate::config::rl::{Algorithm, Critic, RlConfig};
use crate::data::prompts::{load_prompts, Prompt};
use crate::telemetry::{self, METRICS};
use crate::train::checkpoint::{self, Checkpointer, TrainerState};
use crate::train::grads::{clip, GradAccumulator};
use crate::train::optimizer::Optimizer;
use crate::train::order::DataOrder;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::device::{parse_device, parse_dtype};
use rlft_policies::{
    generate, Adapter, CausalLm, ForwardCtx, GenerationConfig, Pretrained, SamplingParams,
    Tokenizer,
};
use rlft_reward::{Combined, Options, Registry, Sample, WeightedReward};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct RunOptions {
    pub resume: Option<String>,
    pub quiet: bool,
    /// Always run the separate old-policy pass, even where a GRPO step's single update
    /// could supply the old log-probs itself (a check that both give the same run).
    pub separate_old_pass: bool,
}

#[derive(Debug, Clone)]
pub struct RlOutcome {
    pub output: PathBuf,
    pub steps: u64,
    /// Mean score of the first and last step's rollouts.
    pub first_score: f64,
    pub last_score: f64,
    /// Mean sequence KL to the reference at the last step (nats).
    pub last_kl: f64,
    pub seconds_per_step: f64,
    /// Greedy mean score on the eval prompts before and after training (with an eval file).
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    /// Stopped by SIGINT/SIGTERM; `output` is then the checkpoint written.
    pub interrupted: bool,
}

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

fn samples(
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
        let s = rewards.score(&samples(prompts, chunk, &r, tok)?)?;
        total += s.total.iter().sum::<f64>();
    }
    Ok(total / prompts.len().max(1) as f64)
}

fn gen_config(cfg: &RlConfig, tok: &Tokenizer, seed: u64, greedy: bool) -> GenerationConfig {
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

/// A seed for (run seed, step, purpose) so every step's randomness is reproducible on resume.
fn mix(seed: u64, step: u64, purpose: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ purpose.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

fn rows_tensor(rows: &[usize], data: &[Vec<f64>], width: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; rows.len() * width];
    for (k, &i) in rows.iter().enumerate() {
        for (t, x) in data[i].iter().enumerate().take(width) {
            v[k * width + t] = *x as f32;
        }
    }
    Ok(Tensor::from_vec(v, (rows.len(), width), dev)?)
}

fn to_rows(t: &Tensor, lens: &[usize]) -> Result<Vec<Vec<f64>>> {
    let v: Vec<Vec<f32>> = t.to_vec2()?;
    Ok(v.into_iter()
        .zip(lens)
        .map(|(r, &n)| r[..n].iter().map(|&x| x as f64).collect())
        .collect())
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Per-rollout host data of one step.
struct StepData {
    lens: Vec<usize>,
    logp_old: Vec<Vec<f64>>,
    logp_ref: Option<Vec<Vec<f64>>>,
    values: Option<Vec<Vec<f64>>>,
    advantages: Vec<Vec<f64>>,
    returns: Option<Vec<Vec<f64>>>,
    kl: Vec<Vec<f64>>,
    scores: Vec<f64>,
}

pub fn run(cfg: &RlConfig, registry: &Registry, opts: &RunOptions) -> Result<RlOutcome> {
    telemetry::init();
    cfg.validate()?;
    let t = &cfg.training;
    let r = &cfg.rl;
    let dtype = parse_dtype(&cfg.model.dtype)?;
    let device = parse_device(&cfg.model.device)?;
    crate::train::check_writable(&t.output_dir)?;
    let mut pre = Pretrained::load(&cfg.model.path, dtype, &device)
        .with_context(|| format!("loading model {}", cfg.model.path.display()))?;
    if let Some(sft) = &r.sft_adapter {
        let a = Adapter::load(sft, pre.model.as_ref())
            .with_context(|| format!("loading sft_adapter {}", sft.display()))?;
        a.merge_into(pre.model.as_mut())?;
        tracing::info!(
            "merged the SFT adapter {} into the base: it is the reference",
            sft.display()
        );
    }
    let max_positions = cfg.model.max_seq_len.min(pre.model.info().max_positions);
    let prompt_max = max_positions.checked_sub(cfg.generation.max_new_tokens).filter(|&m| m > 0).with_context(|| {
        format!("generation.max_new_tokens {} leaves no room for a prompt within {max_positions} positions", cfg.generation.max_new_tokens)
    })?;
    let tok = &pre.tokenizer;
    let prompts = load_prompts(&cfg.data.prompt_file, tok, prompt_max)?;
    let eval_prompts = match &cfg.data.eval_file {
        Some(p) => Some(load_prompts(p, tok, prompt_max)?),
        None => None,
    };
    let per_step = cfg.prompts_per_step();
    if prompts.len() < per_step {
        bail!("{}: {} prompts, fewer than the {per_step} a step needs (rl.batch_size / rl.num_generations)", cfg.data.prompt_file.display(), prompts.len());
    }
    let rewards = build_rewards(cfg, registry)?;
    let config_json = serde_json::to_value(cfg)?;

    let resume_dir = match &opts.resume {
        Some(x) => Some(checkpoint::resolve(x, &t.output_dir)?),
        None => None,
    };
    let state = resume_dir
        .as_deref()
        .map(checkpoint::read_state)
        .transpose()?;
    let model = pre.model.as_ref();
    let hidden = model.info().hidden_size;
    let lora = match cfg.adapter.mode(&model.info().model_type, &cfg.model.path) {
        crate::train::trainable::Mode::Lora(c) => c,
        _ => unreachable!("validated: RL trains LoRA"),
    };
    let policy = match &resume_dir {
        Some(d) => Adapter::load(d, model)?,
        None => Adapter::new(model, lora.clone(), t.seed)?,
    };
    let uses_critic = r.algorithm == Algorithm::Ppo;
    let critic = if uses_critic && r.critic == Critic::Separate {
        Some(match &resume_dir {
            Some(d) => Adapter::load(&d.join("critic"), model)?,
            None => Adapter::new(model, lora.clone(), t.seed.wrapping_add(7))?,
        })
    } else {
        None
    };
    let head = if uses_critic {
        Some(match &resume_dir {
            Some(d) => ValueHead::load(d, hidden, &device)?,
            None => ValueHead::zeros(hidden, &device)?,
        })
    } else {
        None
    };
    let mut params: Vec<(String, Var)> = policy.named_vars();
    if let Some(c) = &critic {
        params.extend(
            c.named_vars()
                .into_iter()
                .map(|(k, v)| (format!("critic.{k}"), v)),
        );
    }
    if let Some(h) = &head {
        params.extend(h.named_vars());
    }
    let mut optimizer = Optimizer::new(t.optimizer_kind(), params.clone());
    let mut kl_ctl = KlController {
        beta: r.kl_coef,
        target: r.adaptive_kl.then_some(r.kl_target),
        horizon: r.kl_horizon,
    };
    let (mut step, mut position) = (0u64, 0u64);
    if let (Some(d), Some(s)) = (&resume_dir, &state) {
        optimizer.load_state(
            checkpoint::read_optimizer(d, &device)?,
            s.optimizer_step.unwrap_or(s.global_step),
        )?;
        step = s.global_step;
        position = s.data_position;
        if let Some(b) = s.extra.get("beta").and_then(|b| b.as_f64()) {
            kl_ctl.beta = b;
        }
        if s.config != config_json {
            tracing::warn!("resuming with a configuration that differs from the checkpoint's");
        }
        tracing::info!("resuming from {} at step {step}", d.display());
    }
    // Resource checks before the first step: disk for checkpoints, memory for the
    // generation batch (KV cache) and the training micro-batch.
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    crate::train::check_disk_space(&t.output_dir, n_params)?;
    let seq =
        prompts.iter().map(|p| p.ids.len()).max().unwrap_or(1) + cfg.generation.max_new_tokens;
    let dev = model.info().device.clone();
    crate::train::memory::check(
        &dev,
        crate::train::memory::generation_bytes(model, r.batch_size, seq),
        &format!("generating {} rollouts of up to {seq} tokens", r.batch_size),
        "rl.batch_size or generation.max_new_tokens",
    )?;
    crate::train::memory::check(
        &dev,
        crate::train::memory::training_bytes(model, t.per_device_train_batch_size, seq, n_params),
        &format!("a training micro-batch of {} × {seq} tokens", t.per_device_train_batch_size),
        "training.per_device_train_batch_size (more rl.num_mini_batches keep the step the same size), generation.max_new_tokens or model.max_seq_len",
    )?;
    let mut order = DataOrder::new(prompts.len(), per_step, t.seed, cfg.data.shuffle).drop_last();
    let schedule = crate::train::plan(t, order.per_epoch(), 1);
    let total_steps = schedule.total_steps;
    let ckpt = crate::train::open_run(t, &config_json)?;
    let mut rollout_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(t.output_dir.join("rollouts.jsonl"))
        .context("opening rollouts.jsonl")?;
    tracing::info!(
        "{:?}: {} prompts, {} rollouts per step ({} × {}), {total_steps} steps, {} trainable parameters",
        r.algorithm,
        prompts.len(),
        r.batch_size,
        per_step,
        r.num_generations,
        params.iter().map(|(_, v)| v.elem_count()).sum::<usize>()
    );

    let temperature = if cfg.generation.temperature > 0.0 {
        cfg.generation.temperature
    } else {
        1.0
    };
    let mb = t.per_device_train_batch_size;
    let need_ref = !(r.algorithm == Algorithm::Grpo && kl_ctl.beta == 0.0);
    let est = if r.algorithm == Algorithm::Grpo {
        KlEstimator::K3
    } else {
        r.kl_estimator
    };
    let clip_params = ClipParams {
        eps_low: r.cliprange,
        eps_high: r.cliprange_high.unwrap_or(r.cliprange),
        dual_clip: r.clip_ratio_c,
    };
    let eval_before = match &eval_prompts {
        Some(ep) if step == 0 => {
            let s = evaluate(model, Some(&policy), tok, ep, &rewards, cfg)?;
            tracing::info!(target: METRICS, step, "eval/score" = s, "step 0 eval score {s:.4}");
            Some(s)
        }
        _ => None,
    };
    let base_hash = if r.verify_base_weights {
        Some(hash_base(model)?)
    } else {
        None
    };
    let pb = telemetry::progress(
        total_steps,
        &format!("{:?}", r.algorithm).to_lowercase(),
        opts.quiet,
    );
    pb.set_position(step);
    let started = Instant::now();
    let start_step = step;
    let (mut first_score, mut last_score, mut last_kl) = (f64::NAN, f64::NAN, f64::NAN);
    let mut eval_after = None;
    let mut bad_steps = 0u64;
    let mut bad_cause = String::new();

    // GRPO with one update per step and no dropout: that update's own forward pass yields
    // the old log-probs (the same weights, inputs and kernels give the same values; the ratio
    // is 1), so the separate policy pass is skipped — as TRL does with num_iterations = 1.
    // The KL of the step is then computed after the update, from those log-probs.
    let old_from_update = r.algorithm == Algorithm::Grpo
        && r.num_ppo_epochs == 1
        && r.num_mini_batches == 1
        && cfg.adapter.lora_dropout == 0.0
        && !opts.separate_old_pass;
    crate::train::interrupt::install();
    let mut interrupted = false;
    while step < total_steps {
        let step_start = Instant::now();
        // 1. Prompts, each repeated num_generations times (consecutive groups).
        let chosen = order.batch(position);
        position += 1;
        let idx: Vec<usize> = chosen
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, r.num_generations))
            .collect();
        let rows: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].ids.clone()).collect();
        // 2. Rollouts.
        let t0 = Instant::now();
        let gens = generate(
            model,
            Some(&policy),
            &rows,
            &gen_config(cfg, tok, mix(t.seed, step, 1), false),
        )?;
        let ro = Rollouts::new(idx.clone(), gens, tok.pad_or_eos());
        let n = ro.len();
        let lens: Vec<usize> = (0..n).map(|i| ro.resp_len(i)).collect();
        let t_generate = t0.elapsed().as_secs_f64();
        // 3. Old log-probs and values (policy), reference log-probs (adapter off).
        let t0 = Instant::now();
        let all: Vec<usize> = (0..n).collect();
        let (mut logp_old, mut values) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for chunk in all.chunks(mb).filter(|_| !old_from_update) {
            let input = ro.input(chunk, &device)?;
            let lens_c: Vec<usize> = chunk.iter().map(|&i| lens[i]).collect();
            let shared_head = if critic.is_none() {
                head.as_ref()
            } else {
                None
            };
            let s = score(
                model,
                &ForwardCtx::inference(Some(&policy)),
                &input,
                ro.p_len,
                ro.r_len,
                temperature,
                shared_head,
                false,
            )?;
            logp_old.extend(to_rows(&s.logp, &lens_c)?);
            let v = match (&critic, &head) {
                (Some(c), Some(h)) => Some(critic_values(
                    model,
                    &ForwardCtx::inference(Some(c)),
                    &input,
                    ro.p_len,
                    ro.r_len,
                    h,
                )?),
                _ => s.values,
            };
            if let Some(v) = v {
                values.extend(to_rows(&v, &lens_c)?);
            }
        }
        let t_policy = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let logp_ref = if need_ref {
            Some(response_logprobs(
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
        let t_reference = t0.elapsed().as_secs_f64();
        // 4. Rewards. A non-finite score skips the step's update (a bad step, like a
        // non-finite loss); any other reward failure ends the run.
        let t0 = Instant::now();
        let smp = samples(&prompts, &idx, &ro, tok)?;
        'update: {
            let scored = match rewards.score(&smp) {
                Ok(s) => s,
                Err(e @ rlft_reward::RewardError::NotFinite { .. }) => {
                    bad_steps += 1;
                    bad_cause = e.to_string();
                    tracing::warn!("step {}: {e}; update skipped", step + 1);
                    step += 1;
                    pb.inc(1);
                    break 'update;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("scoring the rollouts of step {}", step + 1))
                }
            };
            let mut scores = scored.total.clone();
            for (i, s) in scores.iter_mut().enumerate() {
                if !ro.stopped[i] {
                    *s -= r.missing_eos_penalty.unwrap_or(0.0);
                }
                if let Some(c) = r.reward_clip {
                    *s = s.clamp(-c, c);
                }
            }
            let t_score = t0.elapsed().as_secs_f64();
            // 5. KL per token and advantages.
            let beta = kl_ctl.beta;
            let kl_of = |logp_old: &[Vec<f64>], logp_ref: Option<&Vec<Vec<f64>>>| {
                (0..n)
                    .map(|i| match (logp_ref, logp_old.get(i)) {
                        (Some(lr), Some(lo)) => lo
                            .iter()
                            .zip(&lr[i])
                            .map(|(&a, &b)| est.per_token(a, b))
                            .collect(),
                        _ => vec![0.0; lens[i]],
                    })
                    .collect::<Vec<Vec<f64>>>()
            };
            let kl = kl_of(&logp_old, logp_ref.as_ref());
            let mut seq_kl: Vec<f64> = kl.iter().map(|k| k.iter().sum()).collect();
            let mask_rows: Vec<Vec<bool>> = lens.iter().map(|&l| vec![true; l]).collect();
            let (advantages, returns) = match r.algorithm {
                Algorithm::Ppo => {
                    let mut rew: Vec<Vec<f64>> = kl
                        .iter()
                        .map(|k| k.iter().map(|x| -beta * x).collect())
                        .collect();
                    for (i, rw) in rew.iter_mut().enumerate() {
                        *rw.last_mut().expect("≥ 1 response token") += scores[i];
                    }
                    if r.whiten_rewards {
                        whiten(&mut rew, &mask_rows, false);
                    }
                    let (mut adv, mut ret) = (Vec::with_capacity(n), Vec::with_capacity(n));
                    for i in 0..n {
                        let (a, rt) = gae(&rew[i], &values[i], r.gamma, r.lam);
                        adv.push(a);
                        ret.push(rt);
                    }
                    if r.whiten_advantages {
                        whiten(&mut adv, &mask_rows, true);
                    }
                    (adv, Some(ret))
                }
                Algorithm::Grpo => {
                    let a = group_advantages(&scores, r.num_generations, r.scale_rewards);
                    (
                        lens.iter().zip(&a).map(|(&l, &x)| vec![x; l]).collect(),
                        None,
                    )
                }
                Algorithm::Rloo => {
                    let seq_r: Vec<f64> = scores
                        .iter()
                        .zip(&seq_kl)
                        .map(|(s, k)| s - beta * k)
                        .collect();
                    let a = rloo_advantages(&seq_r, r.num_generations);
                    let mut adv: Vec<Vec<f64>> =
                        lens.iter().zip(&a).map(|(&l, &x)| vec![x; l]).collect();
                    if r.whiten_advantages {
                        whiten(&mut adv, &mask_rows, true);
                    }
                    (adv, None)
                }
            };
            let mut data = StepData {
                lens: lens.clone(),
                logp_old,
                logp_ref,
                values: uses_critic.then_some(values),
                advantages,
                returns,
                kl,
                scores,
            };
            // 6. Updates.
            let t0 = Instant::now();
            let lr = schedule.lr(step);
            let stats = train_on_step(
                cfg,
                model,
                &policy,
                critic.as_ref(),
                head.as_ref(),
                &mut optimizer,
                &params,
                &ro,
                &data,
                lr,
                beta,
                temperature,
                &clip_params,
                step,
                &mut bad_steps,
            )?;
            let t_train = t0.elapsed().as_secs_f64();
            if bad_steps > 0 {
                bad_cause = "a non-finite policy loss or gradient norm".into();
            }
            if old_from_update {
                data.logp_old = stats.logp_from_update.clone();
                data.kl = kl_of(&data.logp_old, data.logp_ref.as_ref());
                seq_kl = data.kl.iter().map(|k| k.iter().sum()).collect();
            }
            // 7. β controller, metrics, rollouts log.
            let mean_kl = mean(&seq_kl);
            kl_ctl.update(mean_kl, n);
            step += 1;
            pb.inc(1);
            let score_mean = mean(&data.scores);
            if first_score.is_nan() {
                first_score = score_mean;
            }
            last_score = score_mean;
            last_kl = mean_kl;
            let resp_tokens: usize = lens.iter().sum();
            let stop_rate = ro.stopped.iter().filter(|&&s| s).count() as f64 / n as f64;
            let step_secs = step_start.elapsed().as_secs_f64();
            let ev = explained_variance(&data);
            pb.set_message(format!("score {score_mean:.3} kl {mean_kl:.3}"));
            if step % t.logging_steps == 0 || step == total_steps {
                tracing::info!(
                    target: METRICS,
                    step,
                    "objective/scores" = score_mean,
                    "objective/kl" = mean_kl,
                    "objective/non_score_reward" = -beta * mean_kl,
                    "objective/rlhf_reward" = score_mean - beta * mean_kl,
                    "objective/entropy" = stats.entropy,
                    "policy/approxkl" = stats.approxkl,
                    "policy/clipfrac" = stats.clipfrac,
                    "policy/ratio_mean" = stats.ratio_mean,
                    "val/vf_loss" = stats.vf_loss,
                    "val/clipfrac" = stats.vf_clipfrac,
                    "val/explained_variance" = ev,
                    "loss/policy" = stats.pg_loss,
                    "loss/value" = stats.vf_loss * r.vf_coef,
                    "loss/kl" = stats.kl_loss,
                    beta,
                    "response/length_mean" = resp_tokens as f64 / n as f64,
                    "response/stop_rate" = stop_rate,
                    lr,
                    grad_norm = stats.grad_norm,
                    "time/generate" = t_generate,
                    "time/policy" = t_policy,
                    "time/reference" = t_reference,
                    "time/score" = t_score,
                    "time/train" = t_train,
                    "time/step" = step_secs,
                    tokens_per_s = (resp_tokens + ro.p_len * n) as f64 / step_secs.max(1e-9),
                    elapsed = started.elapsed().as_secs_f64(),
                    "step {step}/{total_steps} score {score_mean:.4} kl {mean_kl:.4} β {beta:.4} ({step_secs:.2} s)"
                );
                for (name, s) in &scored.parts {
                    tracing::info!(target: METRICS, step, reward = name.as_str(), value = mean(s), "reward {name}: {:.4}", mean(s));
                }
            }
            if r.log_rollouts_every > 0 && step % r.log_rollouts_every == 0 {
                write_rollouts(&mut rollout_log, step, &smp, &data, r.rollouts_per_log)?;
            }
            let eval_now = r.eval_steps > 0 && step % r.eval_steps == 0;
            if let Some(ep) = eval_prompts
                .as_ref()
                .filter(|_| eval_now || step == total_steps)
            {
                let s = evaluate(model, Some(&policy), tok, ep, &rewards, cfg)?;
                tracing::info!(target: METRICS, step, "eval/score" = s, "step {step} eval score {s:.4}");
                eval_after = Some(s);
            }
        }
        // Checkpoint on schedule, at the end, when interrupted, and before stopping after
        // too many bad steps (then with the last good state).
        let too_many_bad = bad_steps >= t.max_bad_steps.max(1);
        let stop = crate::train::interrupt::requested() && step < total_steps;
        if (t.save_steps > 0 && step % t.save_steps == 0)
            || step == total_steps
            || stop
            || too_many_bad
        {
            let dir = save_rl(
                &ckpt,
                step,
                position,
                &optimizer,
                &policy,
                critic.as_ref(),
                head.as_ref(),
                kl_ctl.beta,
                &config_json,
            )?;
            if too_many_bad {
                telemetry::finish_progress();
                bail!("{bad_steps} consecutive bad steps up to step {step} (last: {bad_cause}); the last good state is in {}", dir.display());
            }
        }
        if stop {
            interrupted = true;
            break;
        }
    }
    telemetry::finish_progress();
    if interrupted {
        tracing::info!(target: METRICS, step, status = "interrupted", "interrupted at step {step}");
        telemetry::close_metrics();
        return Ok(RlOutcome {
            output: t.output_dir.join(format!("checkpoint-{step}")),
            steps: step,
            first_score,
            last_score,
            last_kl,
            seconds_per_step: started.elapsed().as_secs_f64() / (step - start_step).max(1) as f64,
            eval_before,
            eval_after,
            interrupted: true,
        });
    }
    if let Some(h) = base_hash {
        let same = hash_base(model)? == h;
        tracing::info!(target: METRICS, step, "check/base_weights_unchanged" = same, "base weights bitwise unchanged: {same}");
    }
    let out = t.output_dir.join("adapter");
    policy.save(&out)?;
    if let Some(c) = &critic {
        c.save(&t.output_dir.join("critic"))?;
    }
    if let Some(h) = &head {
        h.save(&t.output_dir)?;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(target: METRICS, step, status = "finished", elapsed = secs, "{:?} finished: {} written", r.algorithm, out.display());
    telemetry::close_metrics();
    Ok(RlOutcome {
        output: out,
        steps: step,
        first_score,
        last_score,
        last_kl,
        seconds_per_step: secs / (step - start_step).max(1) as f64,
        eval_before,
        eval_after,
        interrupted: false,
    })
}

#[allow(clippy::too_many_arguments)]
fn save_rl(
    ckpt: &Checkpointer,
    step: u64,
    position: u64,
    optimizer: &Optimizer,
    policy: &Adapter,
    critic: Option<&Adapter>,
    head: Option<&ValueHead>,
    beta: f64,
    config: &serde_json::Value,
) -> Result<PathBuf> {
    let state = TrainerState {
        global_step: step,
        data_position: position,
        dropout_rng_word_pos: "0".into(),
        optimizer_step: Some(optimizer.step),
        config: config.clone(),
        extra: serde_json::json!({ "beta": beta }),
    };
    let payload = |dir: &Path| -> Result<()> {
        policy.save(dir)?;
        if let Some(c) = critic {
            c.save(&dir.join("critic"))?;
        }
        if let Some(h) = head {
            h.save(dir)?;
        }
        Ok(())
    };
    ckpt.save(step, &payload, optimizer, &state)
}

/// FNV-1a over the bits of every base linear weight and bias.
fn hash_base(model: &dyn CausalLm) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for lin in model.linears() {
        for t in std::iter::once(&lin.weight).chain(lin.bias.as_ref()) {
            let v: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            for x in v {
                h = (h ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    Ok(h)
}

/// `1 − Var(R − V) / Var(R)` over response tokens (0 when Var(R) is 0 or there is no critic).
fn explained_variance(d: &StepData) -> f64 {
    let (Some(v), Some(ret)) = (&d.values, &d.returns) else {
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

fn write_rollouts(
    f: &mut std::fs::File,
    step: u64,
    smp: &[Sample],
    d: &StepData,
    limit: usize,
) -> Result<()> {
    use std::io::Write;
    let mut buf = String::new();
    for i in 0..smp.len().min(limit) {
        let line = serde_json::json!({
            "step": step,
            "prompt": smp[i].prompt,
            "completion": smp[i].completion,
            "score": d.scores[i],
            "kl": d.kl[i].iter().sum::<f64>(),
            "advantage": mean(&d.advantages[i]),
            "length": d.lens[i],
            "stopped": smp[i].stopped,
        });
        buf.push_str(&line.to_string());
        buf.push('\n');
    }
    f.write_all(buf.as_bytes())?;
    f.flush()?;
    Ok(())
}

#[derive(Default)]
struct TrainStats {
    pg_loss: f64,
    vf_loss: f64,
    kl_loss: f64,
    approxkl: f64,
    clipfrac: f64,
    vf_clipfrac: f64,
    ratio_mean: f64,
    entropy: f64,
    grad_norm: f64,
    /// The first micro-batch's ratios (a check: exactly 1 before any update).
    first_ratio: Option<Vec<f32>>,
    /// The update's log-probs, in rollout order, when they serve as the old ones.
    logp_from_update: Vec<Vec<f64>>,
}

/// `num_ppo_epochs` × shuffled mini-batches × micro-batches. Returns means over updates.
#[allow(clippy::too_many_arguments)]
fn train_on_step(
    cfg: &RlConfig,
    model: &dyn CausalLm,
    policy: &Adapter,
    critic: Option<&Adapter>,
    head: Option<&ValueHead>,
    optimizer: &mut Optimizer,
    params: &[(String, Var)],
    ro: &Rollouts,
    d: &StepData,
    lr: f64,
    beta: f64,
    temperature: f64,
    clip_params: &ClipParams,
    step: u64,
    bad_steps: &mut u64,
) -> Result<TrainStats> {
    let r = &cfg.rl;
    let t = &cfg.training;
    let dev = model.info().device.clone();
    let n = ro.len();
    let width = ro.r_len;
    let mini = n / r.num_mini_batches;
    let mb = t.per_device_train_batch_size;
    let mut stats = TrainStats::default();
    let mut updates = 0usize;
    let mut sums = TrainStats::default();
    for epoch in 0..r.num_ppo_epochs {
        // The first epoch keeps rollout order, so its first micro-batches are exactly the
        // chunks `logp_old` was computed on (the first ratio is exactly 1); later epochs
        // shuffle (rollouts are i.i.d.; the order matters only for bitwise reproducibility).
        let mut perm: Vec<usize> = (0..n).collect();
        if epoch > 0 {
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                t.seed,
                step,
                100 + epoch as u64,
            )));
        }
        let mut epoch_kl = Vec::new();
        for m in perm.chunks(mini) {
            let mb_tokens: usize = m.iter().map(|&i| d.lens[i]).sum();
            let mut acc = GradAccumulator::new(params.len());
            let (mut pg_sum, mut vf_sum, mut kl_sum, mut ent_sum) = (0f64, 0f64, 0f64, 0f64);
            let (mut akl, mut cf, mut vcf, mut rsum) = (0f64, 0f64, 0f64, 0f64);
            for micro in m.chunks(mb) {
                let input = ro.input(micro, &dev)?;
                let lens: Vec<usize> = micro.iter().map(|&i| d.lens[i]).collect();
                let w = agg_weights(
                    r.loss_aggregation,
                    &lens,
                    width,
                    mb_tokens,
                    m.len(),
                    cfg.generation.max_new_tokens,
                );
                let w = Tensor::from_vec(w, (micro.len(), width), &dev)?;
                let mask = ro.mask(micro, &dev)?;
                let ctx = ForwardCtx::train(Some(policy), None);
                let shared_head = if critic.is_none() { head } else { None };
                let s = score(
                    model,
                    &ctx,
                    &input,
                    ro.p_len,
                    width,
                    temperature,
                    shared_head,
                    r.entropy_coef > 0.0,
                )?;
                let old = if d.logp_old.is_empty() {
                    // One update per step: its own log-probs are the old ones.
                    stats.logp_from_update.extend(to_rows(&s.logp, &lens)?);
                    s.logp.detach()
                } else {
                    rows_tensor(micro, &d.logp_old, width, &dev)?
                };
                let adv = rows_tensor(micro, &d.advantages, width, &dev)?;
                let (pg, clipped) = policy_loss(&s.logp, &old, &adv, clip_params)?;
                let pg_loss = weighted_sum(&pg, &w)?;
                let mut loss = pg_loss.clone();
                if let (Some(h), Some(vold), Some(ret)) = (head, &d.values, &d.returns) {
                    let v = match critic {
                        Some(c) => critic_values(
                            model,
                            &ForwardCtx::train(Some(c), None),
                            &input,
                            ro.p_len,
                            width,
                            h,
                        )?,
                        None => s.values.clone().expect("shared head gives values"),
                    };
                    let (vf, vclipped) = value_loss(
                        &v,
                        &rows_tensor(micro, vold, width, &dev)?,
                        &rows_tensor(micro, ret, width, &dev)?,
                        r.cliprange_value,
                    )?;
                    let vf_loss = weighted_sum(&vf, &w)?;
                    vf_sum += vf_loss.to_scalar::<f32>()? as f64;
                    vcf += (vclipped * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
                    loss = (loss + (vf_loss * r.vf_coef)?)?;
                }
                if r.algorithm == Algorithm::Grpo && beta > 0.0 {
                    let lref = rows_tensor(
                        micro,
                        d.logp_ref.as_ref().expect("reference computed when β > 0"),
                        width,
                        &dev,
                    )?;
                    // k3 = exp(logr) − 1 − logr, logr = logp_ref − logp.
                    let logr = (lref - &s.logp)?;
                    let k3 = ((logr.exp()? - 1.0)? - &logr)?;
                    let kl_loss = weighted_sum(&k3, &w)?;
                    kl_sum += kl_loss.to_scalar::<f32>()? as f64;
                    loss = (loss + (kl_loss * beta)?)?;
                }
                if let Some(h) = &s.entropy {
                    let e = weighted_sum(h, &w)?;
                    ent_sum += e.to_scalar::<f32>()? as f64;
                    loss = (loss - (e * r.entropy_coef)?)?;
                }
                let grads = loss.backward()?;
                acc.add(params, &grads)?;
                pg_sum += pg_loss.to_scalar::<f32>()? as f64;
                let diff = (s.logp.detach() - &old)?;
                akl += ((diff.sqr()? * &mask)?.sum_all()?.to_scalar::<f32>()? as f64) * 0.5;
                cf += (clipped * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
                let ratio = diff.exp()?;
                rsum += (&ratio * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
                if stats.first_ratio.is_none() {
                    // Response tokens only (padding has no old log-prob).
                    let r: Vec<f32> = ratio.flatten_all()?.to_vec1()?;
                    let m: Vec<f32> = mask.flatten_all()?.to_vec1()?;
                    stats.first_ratio = Some(
                        r.into_iter()
                            .zip(m)
                            .filter(|(_, k)| *k > 0.0)
                            .map(|(x, _)| x)
                            .collect(),
                    );
                }
            }
            let mut grads = acc.finish(params)?;
            let norm = clip(&mut grads, t.max_grad_norm)?;
            let tok = mb_tokens.max(1) as f64;
            if pg_sum.is_finite() && norm.is_finite() {
                optimizer.apply(&grads, lr)?;
                *bad_steps = 0;
            } else {
                *bad_steps += 1;
                tracing::warn!("step {}: non-finite policy loss ({pg_sum}) or gradient norm ({norm}); update skipped", step + 1);
            }
            epoch_kl.push(akl / tok);
            sums.pg_loss += pg_sum;
            sums.vf_loss += vf_sum;
            sums.kl_loss += kl_sum;
            sums.entropy += ent_sum;
            sums.approxkl += akl / tok;
            sums.clipfrac += cf / tok;
            sums.vf_clipfrac += vcf / tok;
            sums.ratio_mean += rsum / tok;
            sums.grad_norm += norm;
            updates += 1;
        }
        if let Some(target) = r.target_kl {
            let k = mean(&epoch_kl);
            if k > target {
                tracing::info!("step {}: approx KL {k:.4} > target_kl {target} after epoch {}; stopping this step's updates", step + 1, epoch + 1);
                break;
            }
        }
    }
    let u = updates.max(1) as f64;
    stats.pg_loss = sums.pg_loss / u;
    stats.vf_loss = sums.vf_loss / u;
    stats.kl_loss = sums.kl_loss / u;
    stats.entropy = sums.entropy / u;
    stats.approxkl = sums.approxkl / u;
    stats.clipfrac = sums.clipfrac / u;
    stats.vf_clipfrac = sums.vf_clipfrac / u;
    stats.ratio_mean = sums.ratio_mean / u;
    stats.grad_norm = sums.grad_norm / u;
    if step == 0 {
        if let Some(ratios) = &stats.first_ratio {
            let ok = ratios.iter().all(|&x| x == 1.0);
            tracing::info!(target: METRICS, step = 0u64, "check/first_ratio_exactly_one" = ok, "first update: ratio exactly 1: {ok}");
        }
    }
    Ok(stats)
}
