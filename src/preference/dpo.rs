//! `rlft dpo`: Direct Preference Optimization (Rafailov et al. 2023; TRL's `DPOTrainer`).
//! The policy learns from the pairs themselves, no reward model: with
//! `Δ = (log π_c − log π_ref,c) − (log π_r − log π_ref,r)` (sequence log-probs summed over
//! completion tokens; per-token means for IPO), the loss is `−log σ(βΔ)` (or hinge, IPO,
//! label-smoothed: [`super::losses`]), averaged over the pairs of a step.
//!
//! The reference is the base weights with the adapter off — after `dpo.sft_adapter` is merged
//! into them, the SFT model — so one copy of the weights serves both. With
//! `dpo.precompute_ref_log_probs` every pair is scored under the reference once, before the
//! first step (needed when the base weights themselves are trained).

use super::logps::{pair_logps, PairBatch};
use super::losses::{dpo_losses, implicit_rewards, DpoLoss};
use super::{load_pairs, pair_memory_needs, policy_and_order, PairStats, RunOptions};
use crate::config::preference::DpoConfig;
use crate::data::preference::Pair;
use crate::telemetry::METRICS;
use crate::train::order::DataOrder;
use crate::train::stage::{self, MemoryNeed, Resume, Stage, StepCtx, StepOutcome};
use crate::train::trainable::Trainable;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::{CausalLm, ForwardCtx, Pretrained};
use std::path::{Path, PathBuf};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct DpoOutcome {
    /// The adapter folder (or the checkpoint written when interrupted).
    pub output: PathBuf,
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval: Option<DpoEval>,
    pub interrupted: bool,
}

/// The DPO figures of a policy on a set of pairs.
#[derive(Debug, Clone, Copy)]
pub struct DpoEval {
    pub loss: f64,
    /// Fraction of pairs whose implicit reward ranks chosen above rejected.
    pub accuracy: f64,
    /// Mean implicit reward margin `β Δ`.
    pub margin: f64,
}

/// How the reference log-probs of a batch are had.
enum Reference {
    /// Scored at each step with the adapter off (the same base weights).
    AdapterOff,
    /// Scored once before training: `(chosen, rejected)` per pair of the train and eval sets.
    Precomputed {
        train: Vec<(f32, f32)>,
        eval: Vec<(f32, f32)>,
    },
}

/// The DPO quantities of one batch, from the policy's and the reference's log-probs.
struct BatchFigures {
    /// Per-pair losses `[n]`.
    losses: Tensor,
    chosen_rewards: Vec<f32>,
    rejected_rewards: Vec<f32>,
    logps_chosen: Vec<f32>,
    logps_rejected: Vec<f32>,
}

fn figures(
    kind: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    (pc, pr): (&Tensor, &Tensor),
    (rc, rr): (&Tensor, &Tensor),
) -> Result<BatchFigures> {
    Ok(BatchFigures {
        losses: dpo_losses(kind, beta, label_smoothing, (pc, pr), (rc, rr))?,
        chosen_rewards: implicit_rewards(beta, pc, rc)?.to_vec1()?,
        rejected_rewards: implicit_rewards(beta, pr, rr)?.to_vec1()?,
        logps_chosen: pc.detach().to_vec1()?,
        logps_rejected: pr.detach().to_vec1()?,
    })
}

impl BatchFigures {
    /// Adds this batch to a window under TRL's metric names.
    fn record(&self, w: &mut PairStats) {
        let (c, r) = (&self.chosen_rewards, &self.rejected_rewards);
        let right: Vec<f32> = c.iter().zip(r).map(|(c, r)| f32::from(c > r)).collect();
        let margin: Vec<f32> = c.iter().zip(r).map(|(c, r)| c - r).collect();
        w.add("rewards/chosen", c);
        w.add("rewards/rejected", r);
        w.add("rewards/accuracies", &right);
        w.add("rewards/margins", &margin);
        w.add("logps/chosen", &self.logps_chosen);
        w.add("logps/rejected", &self.logps_rejected);
        w.pairs += c.len();
    }
}

/// Reference log-probs of `pairs` (adapter off), one `(chosen, rejected)` per pair.
fn score_reference(
    model: &dyn CausalLm,
    pairs: &[Pair],
    batch: usize,
    pad: u32,
    average: bool,
) -> Result<Vec<(f32, f32)>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let (c, r) = pair_logps(model, &refs, &ForwardCtx::inference(None), pad, average)?;
        let (c, r): (Vec<f32>, Vec<f32>) = (c.to_vec1()?, r.to_vec1()?);
        out.extend(c.into_iter().zip(r));
    }
    Ok(out)
}

fn as_tensors(v: &[(f32, f32)], dev: &Device) -> Result<(Tensor, Tensor)> {
    let c: Vec<f32> = v.iter().map(|p| p.0).collect();
    let r: Vec<f32> = v.iter().map(|p| p.1).collect();
    Ok((
        Tensor::from_vec(c, v.len(), dev)?,
        Tensor::from_vec(r, v.len(), dev)?,
    ))
}

struct DpoStage<'a> {
    cfg: &'a DpoConfig,
    pre: Pretrained,
    trainable: Trainable,
    train: Vec<Pair>,
    eval: Option<Vec<Pair>>,
    order: DataOrder,
    pad: u32,
    loss: DpoLoss,
    reference: Reference,
    /// The logging interval's figures.
    window: PairStats,
    last_loss: f64,
    last_eval: Option<DpoEval>,
}

impl DpoStage<'_> {
    /// The reference log-probs of `batch`, the pairs `idx` of the train (or eval) set: the
    /// stored ones, or a pass over the same batch with the adapter off.
    fn reference_logps(
        &self,
        batch: &PairBatch,
        idx: &[usize],
        eval: bool,
    ) -> Result<(Tensor, Tensor)> {
        let model = self.pre.model.as_ref();
        match &self.reference {
            Reference::Precomputed { train, eval: ev } => {
                let set = if eval { ev } else { train };
                let v: Vec<(f32, f32)> = idx.iter().map(|&i| set[i]).collect();
                as_tensors(&v, &model.info().device)
            }
            Reference::AdapterOff => {
                let ctx = ForwardCtx::inference(None);
                let hidden = model.forward_hidden(batch.input(), &ctx, None)?;
                Ok(batch.logps(model, &hidden, &ctx)?)
            }
        }
    }

    fn evaluate_pairs(&self) -> Result<Option<DpoEval>> {
        let Some(ev) = &self.eval else {
            return Ok(None);
        };
        let d = &self.cfg.dpo;
        let model = self.pre.model.as_ref();
        let ctx = ForwardCtx::inference(self.trainable.adapter());
        let mut w = PairStats::default();
        let mut loss = 0f64;
        let batch = self.cfg.training.per_device_train_batch_size.max(1);
        let all: Vec<usize> = (0..ev.len()).collect();
        let dev = model.info().device.clone();
        // Each rank scores its share of the chunks; the figures are added over ranks.
        let world = crate::dist::world();
        let chunks: Vec<&[usize]> = all.chunks(batch).collect();
        for idx in crate::dist::shard(&chunks, world.rank(), world.size()) {
            let refs: Vec<&Pair> = idx.iter().map(|&i| &ev[i]).collect();
            let b = PairBatch::new(&refs, self.pad, self.loss.averages_log_probs(), &dev)?;
            let hidden = model.forward_hidden(b.input(), &ctx, None)?;
            let (pc, pr) = b.logps(model, &hidden, &ctx)?;
            let (rc, rr) = self.reference_logps(&b, idx, true)?;
            let f = figures(self.loss, d.beta, d.label_smoothing, (&pc, &pr), (&rc, &rr))?;
            loss += f.losses.sum_all()?.to_scalar::<f32>()? as f64;
            f.record(&mut w);
        }
        let mut sum = [loss];
        crate::dist::sum(&mut sum)?;
        let w = w.over_ranks()?;
        Ok(Some(DpoEval {
            loss: sum[0] / ev.len().max(1) as f64,
            accuracy: w.mean("rewards/accuracies", 1),
            margin: w.mean("rewards/margins", 1),
        }))
    }
}

impl Stage for DpoStage<'_> {
    fn name(&self) -> String {
        "dpo".into()
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
        pair_memory_needs(
            self.pre.model.as_ref(),
            &self.train,
            &self.cfg.training,
            trainable_params,
            true,
        )
    }

    fn uses_dropout(&self) -> bool {
        self.cfg.adapter.lora_dropout > 0.0
    }

    fn begin(&mut self, _step: u64) -> Result<()> {
        let t = &self.cfg.training;
        tracing::info!(
            "dpo: {} train pairs, steps of {} × {} pairs, loss_type {:?}, β {}",
            self.train.len(),
            t.gradient_accumulation_steps,
            t.per_device_train_batch_size,
            self.loss,
            self.cfg.dpo.beta
        );
        Ok(())
    }

    /// One update over `gradient_accumulation_steps` micro-batches of pairs: each
    /// micro-batch's summed per-pair losses divided by the step's pair count.
    fn step(&mut self, ctx: StepCtx) -> Result<StepOutcome> {
        let accum = self.cfg.training.gradient_accumulation_steps as u64;
        let batches = self.order.step_batches(ctx.position, accum);
        let n_total: usize = batches.iter().map(Vec::len).sum();
        // Every rank's slice of each batch; the loss is normalised by the pairs of all.
        let batches = crate::dist::my_slices(&batches);
        let model = self.pre.model.as_ref();
        let dev = model.info().device.clone();
        let d = &self.cfg.dpo;
        let average = self.loss.averages_log_probs();
        let mut acc = ctx.updater.accumulator();
        let mut loss_sum = 0f64;
        for idx in &batches {
            let pairs: Vec<&Pair> = idx.iter().map(|&i| &self.train[i]).collect();
            let batch = PairBatch::new(&pairs, self.pad, average, &dev)?;
            // 1. The reference's log-probs (adapter off, no graph), or the stored ones.
            let (rc, rr) = self.reference_logps(&batch, idx, false)?;
            // 2. The policy's, with gradients, and the loss.
            let fwd = ForwardCtx::train(self.trainable.adapter(), ctx.dropout);
            let params = ctx.updater.params();
            let window = &mut self.window;
            let kind = self.loss;
            backward_from_hidden::<anyhow::Error>(
                model,
                batch.input(),
                &fwd,
                self.cfg.training.gradient_checkpointing,
                &mut |hidden| {
                    let (pc, pr) = batch.logps(model, hidden, &fwd)?;
                    let f = figures(kind, d.beta, d.label_smoothing, (&pc, &pr), (&rc, &rr))?;
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
        let loss = update.loss;
        self.last_loss = loss;
        self.window.end_update(loss, update.grad_norm);
        if ctx.log {
            let step = ctx.step + 1;
            let w = std::mem::take(&mut self.window).over_ranks()?;
            let (loss, grad_norm) = w.update_means();
            let accuracy = w.mean("rewards/accuracies", 1);
            let margin = w.mean("rewards/margins", 1);
            ctx.progress
                .set_message(format!("loss {loss:.4} acc {accuracy:.3}"));
            tracing::info!(
                target: METRICS,
                step,
                epoch = *ctx.position as f64 / self.order.per_epoch() as f64,
                "train/loss" = loss,
                "rewards/chosen" = w.mean("rewards/chosen", 1),
                "rewards/rejected" = w.mean("rewards/rejected", 1),
                "rewards/accuracies" = accuracy,
                "rewards/margins" = margin,
                "logps/chosen" = w.mean("logps/chosen", 1),
                "logps/rejected" = w.mean("logps/rejected", 1),
                lr = ctx.lr,
                grad_norm,
                "step {step}/{} loss {loss:.4} reward accuracy {accuracy:.3} margin {margin:.3}",
                ctx.total_steps
            );
        }
        Ok(update.outcome("loss"))
    }

    fn evaluate(&mut self, step: u64) -> Result<()> {
        if let Some(e) = self.evaluate_pairs()? {
            self.last_eval = Some(e);
            tracing::info!(
                target: METRICS,
                step,
                "eval/loss" = e.loss,
                "eval/rewards/accuracies" = e.accuracy,
                "eval/rewards/margins" = e.margin,
                "step {step} eval loss {:.4} reward accuracy {:.3}",
                e.loss,
                e.accuracy
            );
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.trainable.save_checkpoint(dir)
    }

    fn finish(&mut self, _step: u64) -> Result<PathBuf> {
        // The folder the base was read from (a Hub id's cached snapshot): its config and
        // tokenizer files go with a saved model.
        let base_dir = self.pre.dir.clone();
        self.trainable.save_final(
            self.pre.model.as_mut(),
            &base_dir,
            &self.cfg.training.output_dir,
        )
    }
}

pub fn run(cfg: &DpoConfig, opts: &RunOptions) -> Result<DpoOutcome> {
    cfg.validate()?;
    let t = &cfg.training;
    let d = &cfg.dpo;
    let loss = cfg.loss()?;
    let (mut pre, device) = stage::load_base(&cfg.model, t, d.sft_adapter.as_deref())?;
    let len = stage::max_len(cfg.model.max_seq_len, pre.model.as_ref());
    let train = load_pairs(&cfg.data.train_file, &pre.tokenizer, len)?;
    let eval = match &cfg.data.eval_file {
        Some(p) => Some(load_pairs(p, &pre.tokenizer, len)?),
        None => None,
    };
    let pad = pre.tokenizer.pad_or_eos();
    let batch = t.per_device_train_batch_size;
    // Before the trainable set is built (which, resuming a full fine-tune, restores trained
    // base weights): the reference is the weights as loaded.
    let reference = if d.precompute_ref_log_probs {
        tracing::info!("dpo: scoring {} pairs under the reference", train.len());
        let average = loss.averages_log_probs();
        let model = pre.model.as_ref();
        Reference::Precomputed {
            train: score_reference(model, &train, batch, pad, average)?,
            eval: match &eval {
                Some(e) => score_reference(model, e, batch, pad, average)?,
                None => Vec::new(),
            },
        }
    } else {
        Reference::AdapterOff
    };
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
    let mut stage = DpoStage {
        cfg,
        pre,
        trainable,
        train,
        eval,
        order,
        pad,
        loss,
        reference,
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
    Ok(DpoOutcome {
        output: out.output,
        steps: out.steps,
        final_train_loss: stage.last_loss,
        eval: stage.last_eval,
        interrupted: out.interrupted,
    })
}
