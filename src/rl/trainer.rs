//! The RL stage (`rlft ppo`, `rlft grpo`, RLOO by config) on the shared loop
//! ([`crate::train::stage`]). A step reads as CleanRL's and TRL's do:
//!
//! 1. experience: generate rollouts, the old-policy / value and reference passes, rewards;
//! 2. shaping: the KL penalty and the advantages;
//! 3. update: epochs × mini-batches × micro-batches of clipped updates;
//! 4. the KL controller, metrics and the rollout log.
//!
//! docs/ALGORITHMS.md §3–7.

use super::algorithm::AlgorithmSpec;
use super::experience::{self, Actors, Request};
use super::gather;
use super::kl::KlController;
use super::losses::PolicyObjective;
use super::report::{self, StepReport};
use super::scoring;
pub use super::scoring::{build_rewards, evaluate};
use super::selection::Selection;
use super::shaping::{self, ShapeInputs};
use super::update::{mix, train_on_rollouts, Trained, UpdatePlan};
use super::value_head::ValueHead;
use crate::config::rl::{Critic, RlConfig};
use crate::data::prompts::{load_prompts, Prompt};
use crate::telemetry::METRICS;
use crate::train::memory;
use crate::train::order::DataOrder;
use crate::train::stage::{self, MemoryNeed, Resume, Stage, StepCtx, StepOutcome};
use anyhow::{bail, Context, Result};
use candle_core::Var;
use rlft_policies::linear::LinearWeight;
use rlft_policies::{Adapter, CausalLm, Pretrained};
use rlft_reward::{Combined, Registry};
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

/// The RL stage: one base model, the policy adapter, the critic, and the step's pieces.
struct RlStage<'a> {
    cfg: &'a RlConfig,
    spec: AlgorithmSpec,
    pre: Pretrained,
    policy: Adapter,
    critic: Option<Adapter>,
    value_head: Option<ValueHead>,
    prompts: Vec<Prompt>,
    eval_prompts: Option<Vec<Prompt>>,
    rewards: Combined,
    order: DataOrder,
    kl_ctl: KlController,
    objective: PolicyObjective,
    separate_old_pass: bool,
    rollout_log: Option<std::fs::File>,
    base_hash: Option<u64>,
    started: Instant,
    first_score: f64,
    last_score: f64,
    last_kl: f64,
    eval_before: Option<f64>,
    eval_after: Option<f64>,
}

impl RlStage<'_> {
    fn actors(&self) -> Actors<'_> {
        Actors {
            model: self.pre.model.as_ref(),
            policy: &self.policy,
            critic: self.critic.as_ref(),
            value_head: self.value_head.as_ref(),
        }
    }

    fn dropout(&self) -> bool {
        !self.cfg.rl.disable_dropout && self.cfg.adapter.lora_dropout > 0.0
    }

    /// Whether the old-policy and training passes compute a group's prompt once: asked for,
    /// and without dropout (a packed prompt would draw one dropout mask for its group, not
    /// one per completion).
    fn share_prompts(&self) -> bool {
        self.cfg.rl.share_prompts && !self.dropout()
    }

    /// The step's figures: the run's first/last score and KL, the first-ratio check, the
    /// metrics line and the rollout log.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        ctx: &StepCtx,
        x: &experience::Experience,
        shaped: &shaping::Shaped,
        trained: &Trained,
        parts: &[(String, Vec<f64>)],
        (beta, dropped_groups): (f64, Option<(usize, usize)>),
        started: Instant,
    ) -> Result<()> {
        let step = ctx.step + 1;
        let (score_mean, mean_kl) = (shaping::mean(&shaped.scores), shaped.mean_kl());
        if self.first_score.is_nan() {
            self.first_score = score_mean;
        }
        (self.last_score, self.last_kl) = (score_mean, mean_kl);
        if ctx.step == 0 {
            let ok = trained.first_ratio.iter().all(|&v| v == 1.0);
            tracing::info!(target: METRICS, step = 0u64, "check/first_ratio_exactly_one" = ok, "first update: ratio exactly 1: {ok}");
        }
        ctx.progress
            .set_message(format!("score {score_mean:.3} kl {mean_kl:.3}"));
        if ctx.log {
            report::log_step(&StepReport {
                step,
                total_steps: ctx.total_steps,
                x,
                shaped,
                stats: &trained.stats,
                parts,
                beta,
                dropped_groups,
                lr: ctx.lr,
                vf_coef: self.cfg.rl.vf_coef,
                timing: x.timing,
                step_secs: started.elapsed().as_secs_f64(),
                elapsed: self.started.elapsed().as_secs_f64(),
            });
        }
        let every = self.cfg.rl.log_rollouts_every;
        let limit = self.cfg.rl.rollouts_per_log;
        if let Some(f) = self.rollout_log.as_mut().filter(|_| step % every == 0) {
            report::write_rollouts(f, step, &x.samples, x, shaped, limit)?;
        }
        Ok(())
    }

    fn eval_score(&self) -> Result<Option<f64>> {
        let Some(ep) = &self.eval_prompts else {
            return Ok(None);
        };
        let model = self.pre.model.as_ref();
        let tok = &self.pre.tokenizer;
        Ok(Some(evaluate(
            model,
            Some(&self.policy),
            tok,
            ep,
            &self.rewards,
            self.cfg,
        )?))
    }
}

impl Stage for RlStage<'_> {
    fn name(&self) -> String {
        self.spec.name()
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut params = self.policy.named_vars();
        if let Some(c) = &self.critic {
            params.extend(
                c.named_vars()
                    .into_iter()
                    .map(|(k, v)| (format!("critic.{k}"), v)),
            );
        }
        if let Some(h) = &self.value_head {
            params.extend(h.named_vars());
        }
        params
    }

    fn batches(&self) -> (u64, u64) {
        (self.order.per_epoch(), 1)
    }

    fn memory_needs(&self, trainable_params: usize) -> Vec<MemoryNeed> {
        let (r, t) = (&self.cfg.rl, &self.cfg.training);
        let model = self.pre.model.as_ref();
        let seq = self.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(1)
            + self.cfg.generation.max_new_tokens;
        let mb = t.per_device_train_batch_size;
        let ckpt = t.gradient_checkpointing;
        let training = |c| memory::training_bytes(model, mb, seq, trainable_params, c);
        // Each rank generates its share of the step's rollouts.
        let per_rank = r.batch_size / crate::dist::world().size();
        vec![
            MemoryNeed {
                bytes: memory::generation_bytes(model, per_rank, seq),
                with_checkpointing: None,
                what: format!("generating {per_rank} rollouts of up to {seq} tokens"),
                lower: "rl.batch_size or generation.max_new_tokens".into(),
            },
            MemoryNeed {
                bytes: training(ckpt),
                with_checkpointing: (!ckpt).then(|| training(true)),
                what: format!("a training micro-batch of {mb} × {seq} tokens"),
                lower: "training.per_device_train_batch_size (more rl.num_mini_batches keep the step the same size), generation.max_new_tokens or model.max_seq_len".into(),
            },
        ]
    }

    fn uses_dropout(&self) -> bool {
        self.dropout()
    }

    fn begin(&mut self, step: u64) -> Result<()> {
        let r = &self.cfg.rl;
        tracing::info!(
            "{}: {} prompts, {} rollouts per step ({} × {})",
            self.spec.name(),
            self.prompts.len(),
            r.batch_size,
            self.cfg.prompts_per_step(),
            r.num_generations,
        );
        // Rank 0 writes the rollout log (its own rollouts).
        if r.log_rollouts_every > 0 && crate::dist::is_main() {
            let path = self.cfg.training.output_dir.join("rollouts.jsonl");
            self.rollout_log = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?,
            );
        }
        if step == 0 {
            self.eval_before = self.eval_score()?;
            if let Some(s) = self.eval_before {
                tracing::info!(target: METRICS, step, "eval/score" = s, "step 0 eval score {s:.4}");
            }
        }
        if r.verify_base_weights {
            self.base_hash = Some(hash_base(self.pre.model.as_ref())?);
        }
        self.started = Instant::now();
        Ok(())
    }

    fn step(&mut self, ctx: StepCtx) -> Result<StepOutcome> {
        let started = Instant::now();
        let (cfg, spec, beta) = (self.cfg, self.spec, self.kl_ctl.beta);
        let old_from_update =
            spec.old_logprobs_from_update(cfg, self.dropout()) && !self.separate_old_pass;
        // 1. Experience: rollouts of the step's prompts (with several ranks, each rank its
        //    share of them, whole groups, sampled from its own stream), the scoring passes,
        //    the rewards.
        let world = crate::dist::world();
        let chosen =
            crate::dist::shard(&self.order.batch(*ctx.position), world.rank(), world.size());
        *ctx.position += 1;
        let seed = match world.size() {
            1 => mix(cfg.training.seed, ctx.step, 1),
            _ => crate::dist::rank_seed(mix(cfg.training.seed, ctx.step, 1), world.rank(), 0),
        };
        let request = Request {
            prompts: &self.prompts,
            chosen: &chosen,
            seed,
            old_from_update,
            reference: spec.needs_reference(beta),
            share_prompts: self.share_prompts(),
        };
        let mut x = experience::collect(self.actors(), &self.pre.tokenizer, cfg, &request)?;
        let scored = scoring::score_step(&self.rewards, &mut x, ctx.step)?;
        // A bad step on any rank is a bad step on all (they must make the same updates).
        if crate::dist::any(scored.is_err())? && scored.is_ok() {
            let cause = "a non-finite reward on another rank".to_string();
            return Ok(StepOutcome::Bad(cause));
        }
        let mut scored = match scored {
            Ok(s) => s,
            Err(bad) => return Ok(bad),
        };
        // Every rank's figures, so shaping and metrics see the whole batch.
        gather::gather_experience(&mut x, &mut scored)?;
        // 2. Shaping: scores, the KL penalty, advantages (and PPO's returns).
        let inputs = ShapeInputs {
            lens: &x.lens,
            logp_old: &x.logp_old,
            logp_ref: x.logp_ref.as_ref(),
            values: x.values.as_ref(),
            scores: shaping::adjust_scores(&cfg.rl, &scored.total, &x.stopped),
        };
        let mut shaped = shaping::shape(&spec, &cfg.rl, beta, inputs);
        let selection = Selection::of(&cfg.rl, &shaped.scores, &x.lens, &x.stopped);
        if selection.rows.is_empty() {
            tracing::info!(
                "step {}: every group's scores are equal (dynamic sampling): no update",
                ctx.step + 1
            );
        }
        // 3. Update: epochs × mini-batches × micro-batches.
        let t0 = Instant::now();
        let plan = UpdatePlan {
            cfg,
            spec: &spec,
            objective: self.objective,
            lr: ctx.lr,
            beta,
            step: ctx.step,
            dropout: ctx.dropout,
            entropy_metric: ctx.log,
            share_prompts: self.share_prompts(),
            selection: &selection,
        };
        let mut trained = train_on_rollouts(self.actors(), ctx.updater, &x, &shaped, &plan)?;
        x.timing.train = t0.elapsed().as_secs_f64();
        if old_from_update {
            // The step's KL, from the log-probs the update computed.
            let own = std::mem::take(&mut trained.logp_from_update);
            x.logp_old = gather::gather_logp(own, &x.lens)?;
            shaped.kl =
                shaping::token_kl(spec.kl_estimator, &x.lens, &x.logp_old, x.logp_ref.as_ref());
        }
        // 4. The KL controller, metrics and the rollout log.
        self.kl_ctl.update(shaped.mean_kl(), x.lens.len());
        let dropped = cfg
            .rl
            .dynamic_sampling
            .then(|| (selection.dropped_groups, selection.groups(&cfg.rl)));
        self.record(
            &ctx,
            &x,
            &shaped,
            &trained,
            &scored.parts,
            (beta, dropped),
            started,
        )?;
        Ok(match trained.skipped {
            None => StepOutcome::Trained,
            Some(cause) => StepOutcome::Bad(cause),
        })
    }

    fn evaluate(&mut self, step: u64) -> Result<()> {
        if let Some(s) = self.eval_score()? {
            tracing::info!(target: METRICS, step, "eval/score" = s, "step {step} eval score {s:.4}");
            self.eval_after = Some(s);
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.policy.save(dir)?;
        if let Some(c) = &self.critic {
            c.save(&dir.join("critic"))?;
        }
        if let Some(h) = &self.value_head {
            h.save(dir)?;
        }
        Ok(())
    }

    fn extra_state(&self) -> serde_json::Value {
        serde_json::json!({ "beta": self.kl_ctl.beta })
    }

    fn finish(&mut self, step: u64) -> Result<PathBuf> {
        if let Some(h) = self.base_hash {
            let same = hash_base(self.pre.model.as_ref())? == h;
            tracing::info!(target: METRICS, step, "check/base_weights_unchanged" = same, "base weights bitwise unchanged: {same}");
        }
        let out_dir = &self.cfg.training.output_dir;
        let out = out_dir.join("adapter");
        self.policy.save(&out)?;
        if let Some(c) = &self.critic {
            c.save(&out_dir.join("critic"))?;
        }
        if let Some(h) = &self.value_head {
            h.save(out_dir)?;
        }
        Ok(out)
    }
}

pub fn run(cfg: &RlConfig, registry: &Registry, opts: &RunOptions) -> Result<RlOutcome> {
    cfg.validate()?;
    check_ranks(cfg)?;
    let (t, r) = (&cfg.training, &cfg.rl);
    let spec = AlgorithmSpec::of(cfg);
    let (pre, device) = stage::load_base(&cfg.model, t, r.sft_adapter.as_deref())?;
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
        bail!("{}: {} prompts, fewer than the {per_step} a step needs (rl.batch_size / rl.num_generations)", cfg.data.prompt_file, prompts.len());
    }
    let rewards = build_rewards(cfg, registry)?;
    let config_json = serde_json::to_value(cfg)?;
    let resume = Resume::find(opts.resume.as_deref(), &t.output_dir)?;
    let ckpt = resume.as_ref().map(|r| r.dir.as_path());

    // The trainable set: the policy adapter, and PPO's critic (value head, maybe its own
    // adapter), each restored from the checkpoint when resuming.
    let model = pre.model.as_ref();
    let lora = match cfg.adapter.mode(&model.info().model_type, &cfg.model.path) {
        crate::train::trainable::Mode::Lora(c) => c,
        _ => unreachable!("validated: RL trains LoRA"),
    };
    let policy = match ckpt {
        Some(d) => Adapter::load(d, model)?,
        None => Adapter::new(model, lora.clone(), t.seed)?,
    };
    let critic = match ckpt {
        _ if !(spec.needs_critic && r.critic == Critic::Separate) => None,
        Some(d) => Some(Adapter::load(&d.join("critic"), model)?),
        None => Some(Adapter::new(model, lora.clone(), t.seed.wrapping_add(7))?),
    };
    let hidden = model.info().hidden_size;
    let value_head = match ckpt {
        _ if !spec.needs_critic => None,
        Some(d) => Some(ValueHead::load(d, hidden, &device)?),
        None => Some(ValueHead::zeros(hidden, &device)?),
    };
    let mut kl_ctl = KlController {
        beta: r.kl_coef,
        target: r.adaptive_kl.then_some(r.kl_target),
        horizon: r.kl_horizon,
    };
    if let Some(b) = resume
        .as_ref()
        .and_then(|r| r.state.extra.get("beta"))
        .and_then(|b| b.as_f64())
    {
        kl_ctl.beta = b;
    }
    let order = DataOrder::new(prompts.len(), per_step, t.seed, cfg.data.shuffle).drop_last();
    let mut stage = RlStage {
        cfg,
        spec,
        pre,
        policy,
        critic,
        value_head,
        prompts,
        eval_prompts,
        rewards,
        order,
        kl_ctl,
        objective: r.objective()?,
        separate_old_pass: opts.separate_old_pass,
        rollout_log: None,
        base_hash: None,
        started: Instant::now(),
        first_score: f64::NAN,
        last_score: f64::NAN,
        last_kl: f64::NAN,
        eval_before: None,
        eval_after: None,
    };
    let out = stage::run(
        &mut stage,
        t,
        &config_json,
        resume.as_ref(),
        &device,
        opts.quiet,
    )?;
    Ok(RlOutcome {
        output: out.output,
        steps: out.steps,
        first_score: stage.first_score,
        last_score: stage.last_score,
        last_kl: stage.last_kl,
        seconds_per_step: out.seconds / out.steps_run.max(1) as f64,
        eval_before: stage.eval_before,
        eval_after: stage.eval_after,
        interrupted: out.interrupted,
    })
}

/// FNV-1a over the bits of every base linear weight and bias.
fn hash_base(model: &dyn CausalLm) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for lin in model.linears() {
        let weight = match &lin.weight {
            LinearWeight::Dense(t) => t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            LinearWeight::Quantized(q) => q.dequantize(),
        };
        let bias: Vec<f32> = match &lin.bias {
            Some(b) => b
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            None => Vec::new(),
        };
        for v in [weight, bias] {
            for x in v {
                h = (h ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    Ok(h)
}

/// With several ranks each takes whole groups of the step's prompts and trains its rollouts
/// in micro-batches: the prompts must divide among the ranks, and each rank's rollouts into
/// micro-batches (so the old-policy pass and the first epoch cut them alike).
fn check_ranks(cfg: &RlConfig) -> Result<()> {
    let ranks = crate::dist::world().size();
    let (r, t) = (&cfg.rl, &cfg.training);
    if ranks == 1 {
        return Ok(());
    }
    let prompts = cfg.prompts_per_step();
    if prompts % ranks != 0 {
        anyhow::bail!(
            "rl.batch_size {} is {prompts} prompts × rl.num_generations {} per step, which do not divide among {ranks} ranks (each rank takes whole groups): make the prompts per step a multiple of {ranks}",
            r.batch_size,
            r.num_generations
        );
    }
    let per_rank = r.batch_size / ranks;
    if per_rank % t.per_device_train_batch_size != 0 {
        anyhow::bail!(
            "each of the {ranks} ranks has rl.batch_size / {ranks} = {per_rank} rollouts, not a multiple of training.per_device_train_batch_size {}",
            t.per_device_train_batch_size
        );
    }
    Ok(())
}
