//! `rlft sft`: supervised fine-tuning on demonstrations. The stage supplies its data and
//! loss (token-mean NLL over the effective batch); the loop pieces come from [`crate::train`].

use crate::config::sft::SftConfig;
use crate::data::sft::{tokenize, Tokenized};
use crate::data::{read_rows, Columns, DataFiles};
use crate::dist;
use crate::telemetry::METRICS;
use crate::train::memory;
use crate::train::order::DataOrder;
use crate::train::stage::{self, MemoryNeed, Resume, Stage, StepCtx, StepOutcome};
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::logprobs::next_token_logprobs;
use rlft_policies::{BatchInput, CausalLm, ForwardCtx, Pretrained};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use crate::train::stage::RunOptions;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct SftOutcome {
    pub output: PathBuf,
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub steps_per_s: f64,
    /// Stopped by SIGINT/SIGTERM; `output` is then the checkpoint written.
    pub interrupted: bool,
}

/// Reads and tokenizes the examples of every file `files` names (JSONL or parquet); warns
/// once with the number of truncated examples.
pub fn load_examples(
    files: &DataFiles,
    tok: &rlft_policies::Tokenizer,
    completion_only: bool,
    max_len: usize,
) -> Result<Vec<Tokenized>> {
    let rows = read_rows(files, Columns::Only(crate::data::sft::COLUMNS))?;
    let mut out = Vec::with_capacity(rows.len());
    let mut truncated = 0;
    for row in &rows {
        let (ex, cut) = tokenize(row, tok, completion_only, max_len)?;
        truncated += usize::from(cut);
        out.push(ex);
    }
    if truncated > 0 {
        tracing::warn!(
            "{}: {truncated} of {} examples truncated to max_seq_len = {max_len} tokens",
            files,
            rows.len()
        );
    }
    if out.iter().all(|e| e.n_trained() == 0) {
        bail!("{files}: no example has a token to train on (all prompt, or truncated away)");
    }
    Ok(out)
}

/// A left-padded batch and its loss weights `[b, t−1]` (1 where the target is trained).
pub fn make_batch(
    examples: &[&Tokenized],
    pad: u32,
    dev: &Device,
) -> Result<(BatchInput, Tensor, usize)> {
    let rows: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let input = BatchInput::left_padded(&rows, pad, dev)?;
    let t = input.seq_len();
    let mut w = vec![0f32; examples.len() * (t - 1).max(0)];
    let mut n = 0;
    for (i, e) in examples.iter().enumerate() {
        let pad_len = t - e.ids.len();
        for p in 1..t {
            if p >= pad_len && e.trained[p - pad_len] {
                w[i * (t - 1) + p - 1] = 1.0;
                n += 1;
            }
        }
    }
    let w = Tensor::from_vec(w, (examples.len(), t - 1), dev)?;
    Ok((input, w, n))
}

/// Summed NLL of the weighted targets: `−Σ w·logp` (a differentiable scalar).
pub fn nll_sum(
    model: &dyn CausalLm,
    input: &BatchInput,
    w: &Tensor,
    ctx: &ForwardCtx,
) -> Result<Tensor> {
    let hidden = model.forward_hidden(input, ctx, None)?;
    nll_from_hidden(model, input, &hidden, w, ctx)
}

/// [`nll_sum`] from the final hidden states of `input`.
pub fn nll_from_hidden(
    model: &dyn CausalLm,
    input: &BatchInput,
    hidden: &Tensor,
    w: &Tensor,
    ctx: &ForwardCtx,
) -> Result<Tensor> {
    let lp = next_token_logprobs(model, input, hidden, ctx, 1.0)?;
    Ok((lp * w.to_dtype(DType::F32)?)?.sum_all()?.neg()?)
}

/// Token-mean NLL of `examples` under the current weights (no gradients). With several
/// ranks each scores its share of the batches and the sums are added over ranks.
pub fn evaluate(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    examples: &[Tokenized],
    batch: usize,
    pad: u32,
) -> Result<f64> {
    let world = dist::world();
    let chunks: Vec<&[Tokenized]> = examples.chunks(batch).collect();
    let mut sums = [0f64, 0f64];
    for chunk in dist::shard(&chunks, world.rank(), world.size()) {
        let refs: Vec<&Tokenized> = chunk.iter().collect();
        let (input, w, n) = make_batch(&refs, pad, &model.info().device)?;
        if n == 0 {
            continue;
        }
        sums[0] += nll_sum(model, &input, &w, ctx)?.to_scalar::<f32>()? as f64;
        sums[1] += n as f64;
    }
    dist::sum(&mut sums)?;
    Ok(sums[0] / sums[1].max(1.0))
}

/// The SFT stage on the shared loop: its data order, batches and loss.
struct SftStage<'a> {
    cfg: &'a SftConfig,
    pre: Pretrained,
    trainable: Trainable,
    train: Vec<Tokenized>,
    eval: Option<Vec<Tokenized>>,
    order: DataOrder,
    pad: u32,
    /// Running sums over the current logging window.
    window: Window,
    run_tokens: usize,
    started: Instant,
    last_loss: f64,
    last_eval: Option<f64>,
}

#[derive(Default)]
struct Window {
    loss_sum: f64,
    tokens: usize,
    grad_norm: f64,
    /// Seconds in the all-reduce of the gradients (several ranks).
    allreduce: f64,
    steps: u64,
    started: Option<Instant>,
}

impl Stage for SftStage<'_> {
    fn name(&self) -> String {
        "sft".into()
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
        let longest = self.train.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let micro = self
            .cfg
            .training
            .per_device_train_batch_size
            .min(self.train.len())
            .max(1);
        let model = self.pre.model.as_ref();
        let ckpt = self.cfg.training.gradient_checkpointing;
        let bytes = |c| memory::training_bytes(model, micro, longest, trainable_params, c);
        vec![MemoryNeed {
            bytes: bytes(ckpt),
            with_checkpointing: (!ckpt).then(|| bytes(true)),
            what: format!("a micro-batch of {micro} × {longest} tokens"),
            lower: "training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective batch) or model.max_seq_len".into(),
        }]
    }

    fn uses_dropout(&self) -> bool {
        self.cfg.adapter.lora_dropout > 0.0
    }

    fn begin(&mut self, _step: u64) -> Result<()> {
        let t = &self.cfg.training;
        tracing::info!(
            "sft: {} train examples, steps of {} × {} examples",
            self.train.len(),
            t.gradient_accumulation_steps,
            t.per_device_train_batch_size
        );
        self.started = Instant::now();
        self.window.started = Some(Instant::now());
        Ok(())
    }

    /// One optimizer update over `gradient_accumulation_steps` batches of every rank; the
    /// loss is the token mean over all of them, so each micro-batch contributes
    /// Σ nll / N_total, N_total counted over every rank's batches (each rank knows them: one
    /// seeded order, each rank its slice of every batch).
    fn step(&mut self, ctx: StepCtx) -> Result<StepOutcome> {
        let accum = self.cfg.training.gradient_accumulation_steps as u64;
        let batches = self.order.step_batches(ctx.position, accum);
        let n_total: usize = batches
            .iter()
            .flatten()
            .map(|&i| self.train[i].n_trained())
            .sum();
        self.run_tokens += batches
            .iter()
            .flatten()
            .map(|&i| self.train[i].ids.len())
            .sum::<usize>();
        let batches = dist::my_slices(&batches);
        let model = self.pre.model.as_ref();
        let device = model.info().device.clone();
        let mut acc = ctx.updater.accumulator();
        let mut loss_sum = 0f64;
        let fwd = ForwardCtx::train(self.trainable.adapter(), ctx.dropout);
        for b in &batches {
            let exs: Vec<&Tokenized> = b.iter().map(|&i| &self.train[i]).collect();
            let (input, w, n) = make_batch(&exs, self.pad, &device)?;
            if n == 0 {
                continue;
            }
            let params = ctx.updater.params();
            backward_from_hidden::<anyhow::Error>(
                model,
                &input,
                &fwd,
                self.cfg.training.gradient_checkpointing,
                &mut |hidden| {
                    let nll = nll_from_hidden(model, &input, hidden, &w, &fwd)?;
                    loss_sum += nll.to_scalar::<f32>()? as f64;
                    Ok((nll / n_total.max(1) as f64)?)
                },
                &mut |grads| acc.add(params, grads),
            )?;
        }
        let loss = loss_sum / n_total.max(1) as f64;
        // The step's loss: the ranks' shares summed.
        let update = ctx.updater.apply(acc, loss, "loss", ctx.lr, ctx.step)?;
        let loss = update.loss;
        self.last_loss = loss;
        let w = &mut self.window;
        w.loss_sum += loss * n_total as f64;
        w.tokens += n_total;
        w.grad_norm += update.grad_norm;
        w.allreduce += update.allreduce_seconds;
        w.steps += 1;
        if ctx.log {
            let step = ctx.step + 1;
            let secs = w.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let train_loss = w.loss_sum / w.tokens.max(1) as f64;
            let elapsed = self.started.elapsed().as_secs_f64();
            ctx.progress.set_message(format!("loss {train_loss:.4}"));
            tracing::info!(
                target: METRICS,
                step,
                epoch = *ctx.position as f64 / self.order.per_epoch() as f64,
                "train/loss" = train_loss,
                lr = ctx.lr,
                grad_norm = w.grad_norm / w.steps as f64,
                tokens_per_s = self.run_tokens as f64 / elapsed.max(1e-9),
                steps_per_s = w.steps as f64 / secs.max(1e-9),
                "time/allreduce" = w.allreduce / w.steps as f64,
                elapsed,
                "step {step}/{} loss {train_loss:.4} lr {:.3e}",
                ctx.total_steps,
                ctx.lr
            );
            *w = Window {
                started: Some(Instant::now()),
                ..Window::default()
            };
        }
        Ok(update.outcome("loss"))
    }

    fn evaluate(&mut self, step: u64) -> Result<()> {
        if let Some(ev) = &self.eval {
            let l = evaluate(
                self.pre.model.as_ref(),
                &ForwardCtx::inference(self.trainable.adapter()),
                ev,
                self.cfg.training.per_device_train_batch_size,
                self.pad,
            )?;
            self.last_eval = Some(l);
            tracing::info!(target: METRICS, step, "eval/loss" = l, "step {step} eval loss {l:.4}");
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

pub fn run(cfg: &SftConfig, opts: &RunOptions) -> Result<SftOutcome> {
    cfg.validate()?;
    let t = &cfg.training;
    let (mut pre, device) = stage::load_model(&cfg.model, t)?;
    let max_len = stage::max_len(cfg.model.max_seq_len, pre.model.as_ref());
    let completion_only = cfg.data.completion_only_loss;
    let train = load_examples(
        &cfg.data.train_file,
        &pre.tokenizer,
        completion_only,
        max_len,
    )?;
    let eval = match &cfg.data.eval_file {
        Some(p) => Some(load_examples(p, &pre.tokenizer, completion_only, max_len)?),
        None => None,
    };
    let pad = pre.tokenizer.pad_or_eos();
    let config_json = serde_json::to_value(cfg)?;
    let resume = Resume::find(opts.resume.as_deref(), &t.output_dir)?;
    let mode = cfg
        .adapter
        .mode(&pre.model.info().model_type.clone(), &cfg.model.path);
    let trainable = Trainable::build(
        pre.model.as_mut(),
        &mode,
        t.seed,
        resume.as_ref().map(|r| r.dir.as_path()),
    )?;
    // One seeded order of global batches (per rank × ranks); each rank takes its slice.
    let order = DataOrder::new(
        train.len(),
        t.per_device_train_batch_size * dist::world().size(),
        t.seed,
        cfg.data.shuffle,
    );
    let mut stage = SftStage {
        cfg,
        pre,
        trainable,
        train,
        eval,
        order,
        pad,
        window: Window::default(),
        run_tokens: 0,
        started: Instant::now(),
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
    let secs = stage.started.elapsed().as_secs_f64().max(1e-9);
    Ok(SftOutcome {
        output: out.output,
        steps: out.steps,
        final_train_loss: stage.last_loss,
        eval_loss: stage.last_eval,
        tokens_per_s: stage.run_tokens as f64 / secs,
        steps_per_s: out.steps_run as f64 / secs,
        interrupted: out.interrupted,
    })
}
