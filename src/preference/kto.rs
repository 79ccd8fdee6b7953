//! `rlft kto`: Kahneman–Tversky Optimization (Ethayarajh et al. 2024; TRL's `KTOTrainer`).
//! The policy learns from completions judged one by one — desirable or not — instead of
//! pairs. With `r = log π(y|x) − log π_ref(y|x)` (summed over completion tokens) and the
//! micro-batch's KL estimate `z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x)))` over
//! mismatched pairs (each prompt with the previous example's completion, TRL's rotation by
//! one), an example's loss is `λ_D (1 − σ(β (r − z0)))` if desirable, else
//! `λ_U (1 − σ(β (z0 − r)))` ([`super::losses::kto_losses`]); the step's loss is their mean.
//! At step 0 (policy = reference) it is 0.5.
//!
//! The reference is the base weights with the adapter off (after `kto.sft_adapter` is merged
//! into them: the SFT model). The examples and their KL pairs run as one batch of 2n
//! sequences through the policy and one through the reference.

use super::logps::CompletionBatch;
use super::losses::{kto_kl, kto_losses};
use super::{policy_and_order, sequence_memory_needs, PairStats, RunOptions};
use crate::config::preference::{KtoConfig, KtoLoss};
use crate::data::unpaired::{tokenize_all, Example, COLUMNS};
use crate::data::{read_rows, Columns, DataFiles};
use crate::telemetry::METRICS;
use crate::train::order::DataOrder;
use crate::train::stage::{self, MemoryNeed, Resume, Stage, StepCtx, StepOutcome};
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::{CausalLm, ForwardCtx, Pretrained, Tokenizer};
use std::path::{Path, PathBuf};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct KtoOutcome {
    /// The adapter folder (or the checkpoint written when interrupted).
    pub output: PathBuf,
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval: Option<KtoEval>,
    pub interrupted: bool,
}

/// The KTO figures of a policy on a set of examples.
#[derive(Debug, Clone, Copy)]
pub struct KtoEval {
    pub loss: f64,
    pub kl: f64,
    /// Mean implicit reward `β r` of the desirable and of the undesirable examples.
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
}

/// Reads and tokenizes a KTO file, warning with the number of cut and skipped rows.
pub fn load_examples(files: &DataFiles, tok: &Tokenizer, max_len: usize) -> Result<Vec<Example>> {
    let rows = read_rows(files, Columns::Only(COLUMNS))?;
    if rows.is_empty() {
        bail!("{files}: no examples (the file is empty)");
    }
    let (examples, report) = tokenize_all(&rows, tok, max_len)?;
    if report.truncated > 0 {
        tracing::warn!(
            "{files}: {} rows' completions cut to max_seq_len = {max_len} tokens",
            report.truncated
        );
    }
    if report.skipped > 0 {
        tracing::warn!(
            "{files}: {} of {} rows skipped (see the warnings above)",
            report.skipped,
            rows.len()
        );
    }
    Ok(examples)
}

/// One micro-batch: its n examples and, with the KL estimate, n mismatched pairs
/// (example i's prompt with example i − 1's completion, cyclically), as one batch.
pub struct KtoBatch {
    pub batch: CompletionBatch,
    n: usize,
    with_kl: bool,
    /// 1 for a desirable example, 0 otherwise `[n]` f32.
    pub desirable: Tensor,
}

impl KtoBatch {
    pub fn new(examples: &[&Example], with_kl: bool, pad: u32, dev: &Device) -> Result<Self> {
        let n = examples.len();
        let mut seqs: Vec<(&[u32], &[u32])> = examples
            .iter()
            .map(|e| (&e.prompt[..], &e.completion[..]))
            .collect();
        if with_kl {
            // TRL's KL pairs: (x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1}).
            seqs.extend((0..n).map(|i| {
                let other = examples[(i + n - 1) % n];
                (&examples[i].prompt[..], &other.completion[..])
            }));
        }
        let desirable: Vec<f32> = examples
            .iter()
            .map(|e| f32::from(u8::from(e.desirable)))
            .collect();
        Ok(Self {
            batch: CompletionBatch::new(&seqs, pad, false, dev)?,
            n,
            with_kl,
            desirable: Tensor::from_vec(desirable, n, dev)?,
        })
    }

    /// The examples' completion log-probs `[n]` and, with the KL estimate, the mismatched
    /// pairs' `[n]`.
    pub fn logps(
        &self,
        model: &dyn CausalLm,
        hidden: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let all = self.batch.logps(model, hidden, ctx)?;
        let kl = self
            .with_kl
            .then(|| all.narrow(0, self.n, self.n))
            .transpose()?;
        Ok((all.narrow(0, 0, self.n)?, kl))
    }
}

/// The KTO quantities of one micro-batch from the policy's and the reference's log-probs.
pub struct KtoFigures {
    /// Per-example losses `[n]`.
    pub losses: Tensor,
    /// The KL estimate z0 (0 for APO-zero).
    pub kl: f64,
    rewards: Vec<f32>,
    logps: Vec<f32>,
    desirable: Vec<bool>,
}

/// Computes a micro-batch's losses and figures. `pi`, `reference`: (examples, KL pairs).
pub fn figures(
    cfg: &crate::config::preference::KtoSection,
    (pi, pi_kl): (&Tensor, Option<&Tensor>),
    (reference, ref_kl): (&Tensor, Option<&Tensor>),
    desirable: &Tensor,
) -> Result<KtoFigures> {
    let kl = match (cfg.loss_type, pi_kl, ref_kl) {
        (KtoLoss::Kto, Some(p), Some(r)) => kto_kl(p, r)?,
        (KtoLoss::Kto, _, _) => bail!("kto: the KL pairs' log-probs are missing"),
        (KtoLoss::ApoZeroUnpaired, _, _) => 0.0,
    };
    let weights = (cfg.desirable_weight, cfg.undesirable_weight);
    let losses = kto_losses(cfg.beta, weights, (pi, reference), desirable, kl)?;
    let rewards = ((pi.detach() - reference.detach())? * cfg.beta)?;
    Ok(KtoFigures {
        losses,
        kl,
        rewards: rewards.to_vec1()?,
        logps: pi.detach().to_vec1()?,
        desirable: desirable
            .to_vec1::<f32>()?
            .iter()
            .map(|&d| d > 0.5)
            .collect(),
    })
}

impl KtoFigures {
    /// Adds this micro-batch to a window under TRL's metric names (`rewards/chosen` is the
    /// mean implicit reward of the desirable examples, `rewards/rejected` of the others).
    pub fn record(&self, w: &mut PairStats) {
        for (side, want) in [("chosen", true), ("rejected", false)] {
            let pick = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .zip(&self.desirable)
                    .filter(|(_, &d)| d == want)
                    .map(|(x, _)| *x)
                    .collect()
            };
            let rewards = pick(&self.rewards);
            let (r, l, c) = match side {
                "chosen" => ("rewards/chosen", "logps/chosen", "count/chosen"),
                _ => ("rewards/rejected", "logps/rejected", "count/rejected"),
            };
            w.add(c, &vec![1.0; rewards.len()]);
            w.add(r, &rewards);
            w.add(l, &pick(&self.logps));
        }
        w.add("kl", &[self.kl as f32]);
        w.add("count/kl", &[1.0]);
        w.pairs += self.desirable.len();
    }
}

/// A window's mean of `name` per example counted under `count` (NaN with none).
fn class_mean(w: &PairStats, name: &str, count: &str) -> f64 {
    let n = w.sum(count);
    if n > 0.0 {
        w.sum(name) / n
    } else {
        f64::NAN
    }
}

struct KtoStage<'a> {
    cfg: &'a KtoConfig,
    pre: Pretrained,
    trainable: Trainable,
    train: Vec<Example>,
    eval: Option<Vec<Example>>,
    order: DataOrder,
    pad: u32,
    /// The logging interval's figures.
    window: PairStats,
    last_loss: f64,
    last_eval: Option<KtoEval>,
}

impl KtoStage<'_> {
    fn with_kl(&self) -> bool {
        self.cfg.kto.loss_type == KtoLoss::Kto
    }

    /// The reference's log-probs of `batch`: a pass with the adapter off, no graph.
    fn reference_logps(&self, batch: &KtoBatch) -> Result<(Tensor, Option<Tensor>)> {
        let model = self.pre.model.as_ref();
        let ctx = ForwardCtx::inference(None);
        let hidden = model.forward_hidden(&batch.batch.input, &ctx, None)?;
        batch.logps(model, &hidden, &ctx)
    }

    fn evaluate_examples(&self) -> Result<Option<KtoEval>> {
        let Some(ev) = &self.eval else {
            return Ok(None);
        };
        let model = self.pre.model.as_ref();
        let ctx = ForwardCtx::inference(self.trainable.adapter());
        let dev = model.info().device.clone();
        let mut w = PairStats::default();
        let mut loss = 0f64;
        let all: Vec<usize> = (0..ev.len()).collect();
        let chunks: Vec<&[usize]> = all
            .chunks(self.cfg.training.per_device_train_batch_size.max(1))
            .collect();
        // Each rank scores its share of the chunks; the figures are added over ranks.
        let world = crate::dist::world();
        for idx in crate::dist::shard(&chunks, world.rank(), world.size()) {
            let examples: Vec<&Example> = idx.iter().map(|&i| &ev[i]).collect();
            let b = KtoBatch::new(&examples, self.with_kl(), self.pad, &dev)?;
            let hidden = model.forward_hidden(&b.batch.input, &ctx, None)?;
            let (pi, pi_kl) = b.logps(model, &hidden, &ctx)?;
            let (r, r_kl) = self.reference_logps(&b)?;
            let f = figures(
                &self.cfg.kto,
                (&pi, pi_kl.as_ref()),
                (&r, r_kl.as_ref()),
                &b.desirable,
            )?;
            loss += f.losses.sum_all()?.to_scalar::<f32>()? as f64;
            f.record(&mut w);
        }
        let mut sum = [loss];
        crate::dist::sum(&mut sum)?;
        let w = w.over_ranks()?;
        Ok(Some(KtoEval {
            loss: sum[0] / ev.len().max(1) as f64,
            kl: class_mean(&w, "kl", "count/kl"),
            rewards_chosen: class_mean(&w, "rewards/chosen", "count/chosen"),
            rewards_rejected: class_mean(&w, "rewards/rejected", "count/rejected"),
        }))
    }
}

impl Stage for KtoStage<'_> {
    fn name(&self) -> String {
        "kto".into()
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.trainable.named_vars()
    }

    fn batches(&self) -> (u64, u64) {
        (
            self.order.per_epoch(),
            self.cfg.training.gradient_accumulation_steps as u64,
        )
    }

    fn memory_needs(&self, trainable_params: usize) -> Vec<MemoryNeed> {
        // A KL pair joins the longest prompt to the longest completion at worst.
        let prompt = self.train.iter().map(|e| e.prompt.len()).max().unwrap_or(1);
        let completion = self
            .train
            .iter()
            .map(|e| e.completion.len())
            .max()
            .unwrap_or(0);
        let n = self
            .cfg
            .training
            .per_device_train_batch_size
            .min(self.train.len())
            .max(1);
        let seqs = if self.with_kl() { 2 * n } else { n };
        let longest = prompt + completion;
        let what = format!("a micro-batch of {n} examples ({seqs} × {longest} tokens)");
        let t = &self.cfg.training;
        sequence_memory_needs(
            self.pre.model.as_ref(),
            (seqs, longest),
            t,
            trainable_params,
            true,
            what,
        )
    }

    fn uses_dropout(&self) -> bool {
        self.cfg.adapter.lora_dropout > 0.0
    }

    fn begin(&mut self, _step: u64) -> Result<()> {
        let t = &self.cfg.training;
        let desirable = self.train.iter().filter(|e| e.desirable).count();
        tracing::info!(
            "kto: {} train examples ({desirable} desirable), steps of {} × {} examples, loss_type {:?}, β {}",
            self.train.len(),
            t.gradient_accumulation_steps,
            t.per_device_train_batch_size,
            self.cfg.kto.loss_type,
            self.cfg.kto.beta
        );
        Ok(())
    }

    /// One update over `gradient_accumulation_steps` micro-batches: each micro-batch's
    /// summed per-example losses divided by the step's example count.
    fn step(&mut self, ctx: StepCtx) -> Result<StepOutcome> {
        let accum = self.cfg.training.gradient_accumulation_steps as u64;
        let batches = self.order.step_batches(ctx.position, accum);
        let n_total: usize = batches.iter().map(Vec::len).sum();
        // Every rank's slice of each batch; the loss is normalised by the examples of all.
        let batches = crate::dist::my_slices(&batches);
        let model = self.pre.model.as_ref();
        let dev = model.info().device.clone();
        let mut acc = ctx.updater.accumulator();
        let mut loss_sum = 0f64;
        for idx in &batches {
            let examples: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let batch = KtoBatch::new(&examples, self.with_kl(), self.pad, &dev)?;
            // 1. The reference's log-probs of the examples and KL pairs (adapter off).
            let (r, r_kl) = self.reference_logps(&batch)?;
            // 2. The policy's, with gradients, the KL estimate (no gradient) and the loss.
            let fwd = ForwardCtx::train(self.trainable.adapter(), ctx.dropout);
            let params = ctx.updater.params();
            let window = &mut self.window;
            let kto = &self.cfg.kto;
            backward_from_hidden::<anyhow::Error>(
                model,
                &batch.batch.input,
                &fwd,
                self.cfg.training.gradient_checkpointing,
                &mut |hidden| {
                    let (pi, pi_kl) = batch.logps(model, hidden, &fwd)?;
                    let f = figures(
                        kto,
                        (&pi, pi_kl.as_ref()),
                        (&r, r_kl.as_ref()),
                        &batch.desirable,
                    )?;
                    f.record(window);
                    let sum = f.losses.sum_all()?;
                    loss_sum += sum.to_scalar::<f32>()? as f64;
                    Ok((sum / n_total.max(1) as f64)?)
                },
                &mut |grads| acc.add(params, grads),
            )?;
        }
        let loss = loss_sum / n_total.max(1) as f64;
        let update = ctx.updater.apply(acc, loss, "loss", ctx.lr, ctx.step)?;
        self.last_loss = update.loss;
        self.window.end_update(update.loss, update.grad_norm);
        if ctx.log {
            let step = ctx.step + 1;
            let w = std::mem::take(&mut self.window).over_ranks()?;
            let (loss, grad_norm) = w.update_means();
            let chosen = class_mean(&w, "rewards/chosen", "count/chosen");
            let rejected = class_mean(&w, "rewards/rejected", "count/rejected");
            let kl = class_mean(&w, "kl", "count/kl");
            ctx.progress
                .set_message(format!("loss {loss:.4} kl {kl:.3}"));
            tracing::info!(
                target: METRICS,
                step,
                epoch = *ctx.position as f64 / self.order.per_epoch() as f64,
                "train/loss" = loss,
                kl,
                "rewards/chosen" = chosen,
                "rewards/rejected" = rejected,
                "rewards/margins" = chosen - rejected,
                "logps/chosen" = class_mean(&w, "logps/chosen", "count/chosen"),
                "logps/rejected" = class_mean(&w, "logps/rejected", "count/rejected"),
                lr = ctx.lr,
                grad_norm,
                "step {step}/{} loss {loss:.4} kl {kl:.4} rewards chosen {chosen:.3} rejected {rejected:.3}",
                ctx.total_steps
            );
        }
        Ok(update.outcome("loss"))
    }

    fn evaluate(&mut self, step: u64) -> Result<()> {
        if let Some(e) = self.evaluate_examples()? {
            self.last_eval = Some(e);
            tracing::info!(
                target: METRICS,
                step,
                "eval/loss" = e.loss,
                "eval/kl" = e.kl,
                "eval/rewards/chosen" = e.rewards_chosen,
                "eval/rewards/rejected" = e.rewards_rejected,
                "eval/rewards/margins" = e.rewards_chosen - e.rewards_rejected,
                "step {step} eval loss {:.4} margin {:.3}",
                e.loss,
                e.rewards_chosen - e.rewards_rejected
            );
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.trainable.save_checkpoint(dir)
    }

    fn finish(&mut self, _step: u64) -> Result<PathBuf> {
        let base_dir = self.pre.dir.clone();
        self.trainable.save_final(
            self.pre.model.as_mut(),
            &base_dir,
            &self.cfg.training.output_dir,
        )
    }
}

/// TRL's advice when the classes are unbalanced: λ_D n_D / (λ_U n_U) should lie in
/// [1, 4/3] (Ethayarajh et al. 2024, eq. 8); a warning names the ranges that would.
fn check_balance(cfg: &KtoConfig, train: &[Example]) {
    let d = train.iter().filter(|e| e.desirable).count().max(1) as f64;
    let u = (train.len() as f64 - d).max(1.0);
    let (wd, wu) = (cfg.kto.desirable_weight, cfg.kto.undesirable_weight);
    let ratio = wd * d / (wu * u);
    if d != u && !(1.0 - 1e-9..=4.0 / 3.0 + 1e-9).contains(&ratio) {
        tracing::warn!(
            "kto: {d} desirable and {u} undesirable examples with weights {wd} and {wu}: λ_D·n_D / (λ_U·n_U) = {ratio:.2}, outside [1, 4/3] (the KTO paper's eq. 8); try kto.desirable_weight in [{:.2}, {:.2}] or kto.undesirable_weight in [{:.2}, {:.2}]",
            wu * u / d,
            wu * u / d * 4.0 / 3.0,
            wd * d / u * 3.0 / 4.0,
            wd * d / u
        );
    }
}

pub fn run(cfg: &KtoConfig, opts: &RunOptions) -> Result<KtoOutcome> {
    cfg.validate()?;
    let t = &cfg.training;
    let (mut pre, device) = stage::load_base(&cfg.model, t, cfg.kto.sft_adapter.as_deref())?;
    let len = stage::max_len(cfg.model.max_seq_len, pre.model.as_ref());
    let train = load_examples(&cfg.data.train_file, &pre.tokenizer, len)?;
    let eval = match &cfg.data.eval_file {
        Some(p) => Some(load_examples(p, &pre.tokenizer, len)?),
        None => None,
    };
    check_balance(cfg, &train);
    let pad = pre.tokenizer.pad_or_eos();
    let config_json = serde_json::to_value(cfg)?;
    let resume = Resume::find(opts.resume.as_deref(), &t.output_dir)?;
    let (trainable, order) = policy_and_order(
        &mut pre,
        &cfg.adapter,
        &cfg.model.path,
        t,
        (train.len(), cfg.data.shuffle),
        resume.as_ref(),
    )?;
    let mut stage = KtoStage {
        cfg,
        pre,
        trainable,
        train,
        eval,
        order,
        pad,
        window: PairStats::default(),
        last_loss: f64::NAN,
        last_eval: None,
    };
    let out = stage::run(
        &mut stage,
        t,
        &config_json,
        resume.as_ref(),
        &device,
        opts.quiet,
    )?;
    Ok(KtoOutcome {
        output: out.output,
        steps: out.steps,
        final_train_loss: stage.last_loss,
        eval: stage.last_eval,
        interrupted: out.interrupted,
    })
}
