//! `rlft rm`: a reward model from preference pairs (TRL's `RewardTrainer`). The model is
//! the base — with a LoRA adapter, or its own weights trained (`full`, `last_n_layers`) — and
//! a `score` head (a bias-free Linear hidden → 1, trained in full) read at each sequence's
//! last real token; the loss is `−log σ(r_chosen − r_rejected − margin)`
//! (+ `center_rewards_coefficient` · mean((r_c + r_r)²)), averaged over the pairs of a step.
//! With LoRA the output is a PEFT `SEQ_CLS` adapter with the head in `modules_to_save`, which
//! `[[reward]] kind = "model"` takes and `rlft merge` turns into a
//! `…ForSequenceClassification` folder; otherwise it is that folder.

use super::logps::PairBatch;
use super::losses::reward_model_loss;
use super::{load_pairs, pair_memory_needs, PairStats, RunOptions};
use crate::config::preference::{RmConfig, ScoreInit};
use crate::data::preference::Pair;
use crate::rewards::{score_pad_id, scores_from_hidden};
use crate::telemetry::METRICS;
use crate::train::checkpoint::save_tensors;
use crate::train::order::DataOrder;
use crate::train::stage::{self, MemoryNeed, Resume, Stage, StepCtx, StepOutcome};
use crate::train::trainable::Trainable;
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::params::save_pretrained_classifier;
use rlft_policies::{Adapter, CausalLm, ForwardCtx, Pretrained};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RmOutcome {
    /// The adapter folder, or the classifier folder of a full / last-N-layer run (or the
    /// checkpoint written when interrupted).
    pub output: PathBuf,
    pub steps: u64,
    pub final_train_loss: f64,
    /// Pairwise accuracy on `data.eval_file` after the last step.
    pub eval_accuracy: Option<f64>,
    pub interrupted: bool,
}

/// Pairwise figures of a reward model on `pairs` (no gradients).
#[derive(Debug, Clone, Copy)]
pub struct RmEval {
    pub loss: f64,
    /// Fraction of pairs with r_chosen > r_rejected.
    pub accuracy: f64,
    /// Mean r_chosen − r_rejected.
    pub margin: f64,
}

/// Scores `(r_chosen, r_rejected)` `[n]` of a batch from its final hidden states, each read
/// at its last token that is not `pad` ([`scores_from_hidden`]).
fn pair_scores(
    batch: &PairBatch,
    hidden: &Tensor,
    score: &Tensor,
    pad: u32,
) -> Result<(Tensor, Tensor)> {
    let s = scores_from_hidden(batch.input(), hidden, score, pad)?.squeeze(1)?;
    let n = batch.pairs;
    Ok((s.narrow(0, 0, n)?, s.narrow(0, n, n)?))
}

fn margins(pairs: &[&Pair], dev: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = pairs.iter().map(|p| p.margin).collect();
    Ok(Tensor::from_vec(m, pairs.len(), dev)?)
}

/// The loss, accuracy and margin on `pairs` (in batches of `batch`) of the reward model
/// `score · h` on `model` with `adapter` (if any).
pub fn evaluate_pairs(
    model: &dyn CausalLm,
    adapter: Option<&Adapter>,
    score: &Tensor,
    pairs: &[Pair],
    batch: usize,
    pad: u32,
    center: f64,
) -> Result<RmEval> {
    let score = score.detach();
    let ctx = ForwardCtx::inference(adapter);
    let dev = model.info().device.clone();
    let (mut loss, mut correct, mut margin) = (0f64, 0usize, 0f64);
    // Each rank scores its share of the chunks; the sums are added over ranks.
    let world = crate::dist::world();
    let chunks: Vec<&[Pair]> = pairs.chunks(batch.max(1)).collect();
    for chunk in crate::dist::shard(&chunks, world.rank(), world.size()) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let b = PairBatch::new(&refs, pad, false, &dev)?;
        let hidden = model.forward_hidden(b.input(), &ctx, None)?;
        let (rc, rr) = pair_scores(&b, &hidden, &score, pad)?;
        let l = reward_model_loss(&rc, &rr, Some(&margins(&refs, &dev)?), center)?;
        loss += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let (c, r): (Vec<f32>, Vec<f32>) = (rc.to_vec1()?, rr.to_vec1()?);
        correct += c.iter().zip(&r).filter(|(c, r)| c > r).count();
        margin += c.iter().zip(&r).map(|(c, r)| (c - r) as f64).sum::<f64>();
    }
    let mut sums = [loss, correct as f64, margin];
    crate::dist::sum(&mut sums)?;
    let n = pairs.len().max(1) as f64;
    Ok(RmEval {
        loss: sums[0] / n,
        accuracy: sums[1] / n,
        margin: sums[2] / n,
    })
}

/// A fresh `score` head `[1, hidden]`: N(0, initializer_range²) as transformers initialises
/// it, or zeros.
fn new_score_head(model: &dyn CausalLm, init: ScoreInit, seed: u64) -> Result<Var> {
    let hidden = model.info().hidden_size;
    let dev = model.info().device.clone();
    let values = match init {
        ScoreInit::Zeros => vec![0f32; hidden],
        ScoreInit::Normal => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(3));
            rlft_policies::init::normal(&mut rng, hidden, model.info().initializer_range)
        }
    };
    Ok(Var::from_tensor(&Tensor::from_vec(
        values,
        (1, hidden),
        &dev,
    )?)?)
}

/// A file in a checkpoint of a full / last-N-layer reward model: the `score` head.
const SCORE_FILE: &str = "score.safetensors";

struct RmStage<'a> {
    cfg: &'a RmConfig,
    pre: Pretrained,
    /// The LoRA adapter, which carries the head too (`Adapter::head("score")`), or the
    /// trained base weights.
    trainable: Trainable,
    /// `[1, hidden]`, f32.
    score: Var,
    train: Vec<Pair>,
    eval: Option<Vec<Pair>>,
    order: DataOrder,
    /// The pad id: left padding, and what the score reader skips.
    pad: u32,
    /// The logging interval's figures.
    window: PairStats,
    /// Real tokens trained on since the run began (TRL's `num_tokens`), over every rank.
    num_tokens: u64,
    /// The logging interval's sums of each step's lowest and highest reward.
    extremes: [f64; 2],
    last_loss: f64,
    last_eval: Option<RmEval>,
}

impl Stage for RmStage<'_> {
    fn name(&self) -> String {
        "rm".into()
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut vars = self.trainable.named_vars();
        if self.trainable.adapter().is_none() {
            vars.push(("score.weight".into(), self.score.clone()));
        }
        vars
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
            false,
        )
    }

    fn uses_dropout(&self) -> bool {
        self.cfg.adapter.lora_dropout > 0.0
    }

    fn begin(&mut self, _step: u64) -> Result<()> {
        let t = &self.cfg.training;
        tracing::info!(
            "rm: {} train pairs, steps of {} × {} pairs",
            self.train.len(),
            t.gradient_accumulation_steps,
            t.per_device_train_batch_size
        );
        Ok(())
    }

    /// One update over `gradient_accumulation_steps` micro-batches of pairs: each
    /// micro-batch's mean loss weighted by its share of the step's pairs.
    fn step(&mut self, ctx: StepCtx) -> Result<StepOutcome> {
        let accum = self.cfg.training.gradient_accumulation_steps as u64;
        let batches = self.order.step_batches(ctx.position, accum);
        let n_total: usize = batches.iter().map(Vec::len).sum();
        // Every rank's slice of each batch; the loss is normalised by the pairs of all.
        let batches = crate::dist::my_slices(&batches);
        let mut step_tokens = 0f64;
        let model = self.pre.model.as_ref();
        let dev = model.info().device.clone();
        let (score, pad) = (self.score.clone(), self.pad);
        let center = self.cfg.rm.center_rewards_coefficient;
        let fwd = ForwardCtx::train(self.trainable.adapter(), ctx.dropout);
        let mut acc = ctx.updater.accumulator();
        let mut loss_sum = 0f64;
        let mut step_rewards: Vec<f32> = Vec::new();
        for b in &batches {
            let pairs: Vec<&Pair> = b.iter().map(|&i| &self.train[i]).collect();
            let batch = PairBatch::new(&pairs, self.pad, false, &dev)?;
            step_tokens += batch.tokens as f64;
            let m = margins(&pairs, &dev)?;
            let share = pairs.len() as f64 / n_total.max(1) as f64;
            let params = ctx.updater.params();
            let window = &mut self.window;
            backward_from_hidden::<anyhow::Error>(
                model,
                batch.input(),
                &fwd,
                self.cfg.training.gradient_checkpointing,
                &mut |hidden| {
                    let (rc, rr) = pair_scores(&batch, hidden, score.as_tensor(), pad)?;
                    let loss = reward_model_loss(&rc, &rr, Some(&m), center)?;
                    loss_sum += loss.to_scalar::<f32>()? as f64 * share;
                    let (c, r): (Vec<f32>, Vec<f32>) = (rc.to_vec1()?, rr.to_vec1()?);
                    let right: Vec<f32> = c.iter().zip(&r).map(|(c, r)| f32::from(c > r)).collect();
                    let diff: Vec<f32> = c.iter().zip(&r).map(|(c, r)| c - r).collect();
                    window.add("accuracy", &right);
                    window.add("margin", &diff);
                    window.add("reward", &c);
                    window.add("reward", &r);
                    step_rewards.extend(c.iter().chain(&r));
                    window.pairs += c.len();
                    Ok((loss * share)?)
                },
                &mut |grads| acc.add(params, grads),
            )?;
        }
        let update = ctx.updater.apply(acc, loss_sum, "loss", ctx.lr, ctx.step)?;
        let loss_sum = update.loss;
        self.last_loss = loss_sum;
        self.window.end_update(loss_sum, update.grad_norm);
        // TRL's min_reward / max_reward: each step's extremes (over every rank), averaged
        // over the window.
        let (lo, hi) = step_rewards
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &r| {
                (lo.min(r), hi.max(r))
            });
        let all = crate::dist::all_gather(&[lo as f64, hi as f64, step_tokens])?;
        self.extremes[0] += all.iter().map(|v| v[0]).fold(f64::INFINITY, f64::min);
        self.extremes[1] += all.iter().map(|v| v[1]).fold(f64::NEG_INFINITY, f64::max);
        self.num_tokens += all.iter().map(|v| v[2]).sum::<f64>() as u64;
        if ctx.log {
            let step = ctx.step + 1;
            let w = std::mem::take(&mut self.window).over_ranks()?;
            let extremes = std::mem::take(&mut self.extremes);
            let (loss, grad_norm) = w.update_means();
            let accuracy = w.mean("accuracy", 1);
            ctx.progress
                .set_message(format!("loss {loss:.4} acc {accuracy:.3}"));
            tracing::info!(
                target: METRICS,
                step,
                epoch = *ctx.position as f64 / self.order.per_epoch() as f64,
                "train/loss" = loss,
                accuracy,
                margin = w.mean("margin", 1),
                min_reward = extremes[0] / w.updates(),
                mean_reward = w.mean("reward", 2),
                max_reward = extremes[1] / w.updates(),
                num_tokens = self.num_tokens,
                lr = ctx.lr,
                grad_norm,
                "step {step}/{} loss {loss:.4} accuracy {accuracy:.3}",
                ctx.total_steps
            );
        }
        Ok(update.outcome("loss"))
    }

    fn evaluate(&mut self, step: u64) -> Result<()> {
        if let Some(ev) = &self.eval {
            let e = evaluate_pairs(
                self.pre.model.as_ref(),
                self.trainable.adapter(),
                self.score.as_tensor(),
                ev,
                self.cfg.training.per_device_train_batch_size,
                self.pad,
                self.cfg.rm.center_rewards_coefficient,
            )?;
            self.last_eval = Some(e);
            tracing::info!(
                target: METRICS,
                step,
                "eval/loss" = e.loss,
                "eval/accuracy" = e.accuracy,
                "eval/margin" = e.margin,
                "step {step} eval loss {:.4} accuracy {:.3}",
                e.loss,
                e.accuracy
            );
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.trainable.save_checkpoint(dir)?;
        if self.trainable.adapter().is_none() {
            let t = HashMap::from([("score.weight".to_string(), self.score.as_tensor().clone())]);
            save_tensors(&t, &dir.join(SCORE_FILE))?;
        }
        Ok(())
    }

    fn extra_state(&self) -> serde_json::Value {
        serde_json::json!({ "num_tokens": self.num_tokens })
    }

    fn finish(&mut self, _step: u64) -> Result<PathBuf> {
        let out = &self.cfg.training.output_dir;
        if let Some(a) = self.trainable.adapter() {
            let dir = out.join("adapter");
            a.save(&dir)?;
            return Ok(dir);
        }
        let dir = out.join("model");
        let pad = self.pad;
        let base_dir = self.pre.dir.clone();
        save_pretrained_classifier(
            self.pre.model.as_mut(),
            self.score.as_tensor(),
            pad,
            &base_dir,
            &dir,
        )?;
        Ok(dir)
    }
}

pub fn run(cfg: &RmConfig, opts: &RunOptions) -> Result<RmOutcome> {
    cfg.validate()?;
    let t = &cfg.training;
    let (mut pre, device) = stage::load_model(&cfg.model, t)?;
    let len = stage::max_len(cfg.model.max_seq_len, pre.model.as_ref());
    let train = load_pairs(&cfg.data.train_file, &pre.tokenizer, len)?;
    let eval = match &cfg.data.eval_file {
        Some(p) => Some(load_pairs(p, &pre.tokenizer, len)?),
        None => None,
    };
    // Left padding and the score reader's skipped id: the classifier config's pad.
    let pad = score_pad_id(&pre);
    let config_json = serde_json::to_value(cfg)?;
    let resume = Resume::find(opts.resume.as_deref(), &t.output_dir)?;
    let ckpt = resume.as_ref().map(|r| r.dir.as_path());
    let mode = cfg
        .adapter
        .mode(&pre.model.info().model_type.clone(), &cfg.model.path);
    let mut trainable = Trainable::build_without_head(pre.model.as_mut(), &mode, t.seed, ckpt)?;
    let model = pre.model.as_ref();
    // The head: in the adapter with LoRA (a checkpoint's adapter has it), else its own file.
    let score = match (&mut trainable, ckpt) {
        (Trainable::Lora(a), Some(dir)) => a
            .head("score")
            .with_context(|| {
                format!(
                    "{}: the checkpoint has no score head (not an `rlft rm` run?)",
                    dir.display()
                )
            })?
            .clone(),
        (_, Some(dir)) => {
            let p = dir.join(SCORE_FILE);
            let t = candle_core::safetensors::load(&p, &model.info().device)
                .with_context(|| format!("reading {}", p.display()))?;
            let w = t
                .get("score.weight")
                .with_context(|| format!("{}: no tensor `score.weight`", p.display()))?;
            Var::from_tensor(w)?
        }
        (_, None) => new_score_head(model, cfg.rm.score_init, t.seed)?,
    };
    if let Trainable::Lora(a) = &mut trainable {
        a.set_head("score", score.clone())?;
    }
    // One seeded order of global batches (per rank × ranks); each rank takes its slice.
    let order = DataOrder::new(
        train.len(),
        t.per_device_train_batch_size * crate::dist::world().size(),
        t.seed,
        cfg.data.shuffle,
    );
    let mut stage = RmStage {
        cfg,
        pre,
        trainable,
        score,
        train,
        eval,
        order,
        pad,
        window: PairStats::default(),
        num_tokens: resume
            .as_ref()
            .and_then(|r| r.state.extra["num_tokens"].as_u64())
            .unwrap_or(0),
        extremes: [0.0; 2],
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
    Ok(RmOutcome {
        output: out.output,
        steps: out.steps,
        final_train_loss: stage.last_loss,
        eval_accuracy: stage.last_eval.map(|e| e.accuracy),
        interrupted: out.interrupted,
    })
}
