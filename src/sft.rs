//! `rlft sft`: supervised fine-tuning on demonstrations. The stage supplies its data and
//! loss (token-mean NLL over the effective batch); the loop pieces come from [`crate::train`].

use crate::config::sft::SftConfig;
use crate::data::read_jsonl;
use crate::data::sft::{tokenize, Tokenized};
use crate::telemetry::{self, METRICS};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::grads::{clip, GradAccumulator};
use crate::train::optimizer::Optimizer;
use crate::train::order::DataOrder;
use crate::train::trainable::Trainable;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::device::{parse_device, parse_dtype};
use rlft_policies::logprobs::token_logprobs;
use rlft_policies::{BatchInput, CausalLm, ForwardCtx, Pretrained};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

pub struct RunOptions {
    /// "latest" or a checkpoint folder.
    pub resume: Option<String>,
    pub quiet: bool,
}

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

/// Reads and tokenizes a JSONL file; warns once with the number of truncated examples.
pub fn load_examples(
    path: &Path,
    tok: &rlft_policies::Tokenizer,
    completion_only: bool,
    max_len: usize,
) -> Result<Vec<Tokenized>> {
    let rows = read_jsonl(path)?;
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
            path.display(),
            rows.len()
        );
    }
    if out.iter().all(|e| e.n_trained() == 0) {
        bail!(
            "{}: no example has a token to train on (all prompt, or truncated away)",
            path.display()
        );
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
    let lp = token_logprobs(model, input, ctx, 1.0)?;
    Ok((lp * w.to_dtype(DType::F32)?)?.sum_all()?.neg()?)
}

/// Token-mean NLL of `examples` under the current weights (no gradients).
pub fn evaluate(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    examples: &[Tokenized],
    batch: usize,
    pad: u32,
) -> Result<f64> {
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in examples.chunks(batch) {
        let refs: Vec<&Tokenized> = chunk.iter().collect();
        let (input, w, n) = make_batch(&refs, pad, &model.info().device)?;
        if n == 0 {
            continue;
        }
        total += nll_sum(model, &input, &w, ctx)?.to_scalar::<f32>()? as f64;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

pub fn run(cfg: &SftConfig, opts: &RunOptions) -> Result<SftOutcome> {
    // metrics.jsonl is written by a tracing layer: make sure one is installed.
    telemetry::init();
    cfg.validate()?;
    let t = &cfg.training;
    let dtype = parse_dtype(&cfg.model.dtype)?;
    let device = parse_device(&cfg.model.device)?;
    crate::train::check_writable(&t.output_dir)?;
    let mut pre = Pretrained::load(&cfg.model.path, dtype, &device)
        .with_context(|| format!("loading model {}", cfg.model.path.display()))?;
    let max_len = cfg.model.max_seq_len.min(pre.model.info().max_positions);
    if cfg.model.max_seq_len > pre.model.info().max_positions {
        tracing::warn!(
            "model.max_seq_len {} exceeds the model's {} positions; using {max_len}",
            cfg.model.max_seq_len,
            pre.model.info().max_positions
        );
    }
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

    // Resume: restore trainable values, optimizer, data and RNG positions.
    let resume_dir = match &opts.resume {
        Some(r) => Some(checkpoint::resolve(r, &t.output_dir)?),
        None => None,
    };
    let state = match &resume_dir {
        Some(d) => Some(checkpoint::read_state(d)?),
        None => None,
    };
    if let Some(s) = &state {
        if s.config != config_json {
            tracing::warn!("resuming with a configuration that differs from the checkpoint's; the result will not match an uninterrupted run");
        }
    }
    let mode = cfg
        .adapter
        .mode(&pre.model.info().model_type.clone(), &cfg.model.path);
    let trainable = Trainable::build(pre.model.as_mut(), &mode, t.seed, resume_dir.as_deref())?;
    let params = trainable.named_vars();
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    // Resource checks before the first step: disk for checkpoints, memory for the
    // largest micro-batch.
    crate::train::check_disk_space(&t.output_dir, n_params)?;
    let longest = train.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let micro = t.per_device_train_batch_size.min(train.len()).max(1);
    crate::train::memory::check(
        &device,
        crate::train::memory::training_bytes(pre.model.as_ref(), micro, longest, n_params),
        &format!("a micro-batch of {micro} × {longest} tokens"),
        "training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective batch) or model.max_seq_len",
    )?;
    let mut optimizer = Optimizer::new(t.optimizer_kind(), params.clone());
    let dropout_rng = Mutex::new(ChaCha8Rng::seed_from_u64(t.seed.wrapping_add(1)));
    let (mut step, mut position) = (0u64, 0u64);
    if let (Some(dir), Some(s)) = (&resume_dir, &state) {
        optimizer.load_state(
            checkpoint::read_optimizer(dir, &device)?,
            s.optimizer_step.unwrap_or(s.global_step),
        )?;
        step = s.global_step;
        position = s.data_position;
        let pos: u128 = s
            .dropout_rng_word_pos
            .parse()
            .context("trainer_state.json: dropout_rng_word_pos")?;
        dropout_rng.lock().expect("not poisoned").set_word_pos(pos);
        tracing::info!("resuming from {} at step {step}", dir.display());
    }

    let mut order = DataOrder::new(
        train.len(),
        t.per_device_train_batch_size,
        t.seed,
        cfg.data.shuffle,
    );
    let accum = t.gradient_accumulation_steps as u64;
    let schedule = crate::train::plan(t, order.per_epoch(), accum);
    let total_steps = schedule.total_steps;
    let ckpt = crate::train::open_run(t, &config_json)?;
    tracing::info!(
        "sft: {} train examples, {} trainable parameters, {total_steps} steps of {} × {} examples",
        train.len(),
        n_params,
        accum,
        t.per_device_train_batch_size
    );

    let pb = telemetry::progress(total_steps, "sft", opts.quiet);
    pb.set_position(step);
    let started = Instant::now();
    let start_step = step;
    let (mut win_loss, mut win_tokens, mut win_norm, mut win_steps) = (0f64, 0usize, 0f64, 0u64);
    let mut run_tokens = 0usize;
    let mut win_start = Instant::now();
    let mut last_loss = f64::NAN;
    let mut last_eval = None;
    let mut bad_steps = 0u64;
    let model = pre.model.as_ref();

    let save = |step: u64, position: u64, optimizer: &Optimizer| -> Result<PathBuf> {
        let state = TrainerState {
            global_step: step,
            data_position: position,
            dropout_rng_word_pos: dropout_rng
                .lock()
                .expect("not poisoned")
                .get_word_pos()
                .to_string(),
            optimizer_step: Some(optimizer.step),
            config: config_json.clone(),
            extra: serde_json::Value::Null,
        };
        ckpt.save(
            step,
            &|dir| trainable.save_checkpoint(dir),
            optimizer,
            &state,
        )
    };

    crate::train::interrupt::install();
    let mut interrupted = false;
    while step < total_steps {
        // One optimizer update over `accum` micro-batches; the loss is the token mean over
        // all of them, so each micro-batch contributes Σ nll / N_total.
        let batches: Vec<Vec<usize>> = (0..accum).map(|k| order.batch(position + k)).collect();
        position += accum;
        let n_total: usize = batches
            .iter()
            .flatten()
            .map(|&i| train[i].n_trained())
            .sum();
        let mut acc = GradAccumulator::new(params.len());
        let mut loss_sum = 0f64;
        let rng = (cfg.adapter.lora_dropout > 0.0).then_some(&dropout_rng);
        let ctx = ForwardCtx::train(trainable.adapter(), rng);
        for b in &batches {
            let exs: Vec<&Tokenized> = b.iter().map(|&i| &train[i]).collect();
            run_tokens += exs.iter().map(|e| e.ids.len()).sum::<usize>();
            let (input, w, n) = make_batch(&exs, pad, &device)?;
            if n == 0 {
                continue;
            }
            let nll = nll_sum(model, &input, &w, &ctx)?;
            loss_sum += nll.to_scalar::<f32>()? as f64;
            let grads = (nll / n_total.max(1) as f64)?.backward()?;
            acc.add(&params, &grads)?;
        }
        let mut grads = acc.finish(&params)?;
        let loss = loss_sum / n_total.max(1) as f64;
        let norm = clip(&mut grads, t.max_grad_norm)?;
        let lr = schedule.lr(step);
        if !loss.is_finite() || !norm.is_finite() {
            bad_steps += 1;
            let cause = if loss.is_finite() {
                "gradient norm"
            } else {
                "loss"
            };
            tracing::warn!(
                "step {}: non-finite {cause} ({loss}, grad norm {norm}); update skipped",
                step + 1
            );
            if bad_steps >= t.max_bad_steps.max(1) {
                let dir = save(step, position, &optimizer)?;
                telemetry::finish_progress();
                bail!("{bad_steps} consecutive updates with a non-finite loss or gradient at step {}; the last good state is in {}", step + 1, dir.display());
            }
        } else {
            bad_steps = 0;
            optimizer.apply(&grads, lr)?;
        }
        step += 1;
        pb.inc(1);
        last_loss = loss;
        win_loss += loss_sum;
        win_tokens += n_total;
        win_norm += norm;
        win_steps += 1;
        if step % t.logging_steps == 0 || step == total_steps {
            let secs = win_start.elapsed().as_secs_f64();
            let train_loss = win_loss / win_tokens.max(1) as f64;
            pb.set_message(format!("loss {train_loss:.4}"));
            tracing::info!(
                target: METRICS,
                step,
                epoch = position as f64 / order.per_epoch() as f64,
                "train/loss" = train_loss,
                lr,
                grad_norm = win_norm / win_steps as f64,
                tokens_per_s = run_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                steps_per_s = win_steps as f64 / secs.max(1e-9),
                elapsed = started.elapsed().as_secs_f64(),
                "step {step}/{total_steps} loss {train_loss:.4} lr {lr:.3e}"
            );
            (win_loss, win_tokens, win_norm, win_steps) = (0.0, 0, 0.0, 0);
            win_start = Instant::now();
        }
        let eval_now = t.eval_steps > 0 && step % t.eval_steps == 0;
        if let Some(ev) = eval.as_ref().filter(|_| eval_now || step == total_steps) {
            let l = evaluate(
                model,
                &ForwardCtx::inference(trainable.adapter()),
                ev,
                t.per_device_train_batch_size,
                pad,
            )?;
            last_eval = Some(l);
            tracing::info!(target: METRICS, step, "eval/loss" = l, "step {step} eval loss {l:.4}");
        }
        if (t.save_steps > 0 && step % t.save_steps == 0) || step == total_steps {
            save(step, position, &optimizer)?;
        } else if crate::train::interrupt::requested() {
            save(step, position, &optimizer)?;
        }
        if crate::train::interrupt::requested() && step < total_steps {
            interrupted = true;
            break;
        }
    }
    telemetry::finish_progress();
    if interrupted {
        tracing::info!(target: METRICS, step, status = "interrupted", "sft interrupted at step {step}");
        telemetry::close_metrics();
        return Ok(SftOutcome {
            output: t.output_dir.join(format!("checkpoint-{step}")),
            steps: step,
            final_train_loss: last_loss,
            eval_loss: last_eval,
            tokens_per_s: run_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            steps_per_s: (step - start_step) as f64 / started.elapsed().as_secs_f64().max(1e-9),
            interrupted: true,
        });
    }
    let out = trainable.save_final(pre.model.as_mut(), &cfg.model.path, &t.output_dir)?;
    let secs = started.elapsed().as_secs_f64();
    let done = step - start_step;
    tracing::info!(target: METRICS, step, status = "finished", elapsed = secs, "sft finished: {} written", out.display());
    telemetry::close_metrics();
    Ok(SftOutcome {
        output: out,
        steps: step,
        final_train_loss: last_loss,
        eval_loss: last_eval,
        tokens_per_s: run_tokens as f64 / secs.max(1e-9),
        steps_per_s: done as f64 / secs.max(1e-9),
        interrupted: false,
    })
}
