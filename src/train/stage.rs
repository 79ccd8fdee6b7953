//! The loop every training stage runs on (SFT, PPO, GRPO, RLOO). A stage supplies its
//! trainable parameters, its step, its extra checkpointed state and its outputs; the loop
//! owns everything else:
//!
//! 1. resume: the checkpoint to continue from (found before the stage is built, since the
//!    stage restores its weights from it), the optimizer state, the step and data position,
//!    the dropout generator's position;
//! 2. resource checks before the first step (disk for two checkpoints, memory per stage);
//! 3. the run folder (`config.json`, `metrics.jsonl`) and the learning-rate schedule;
//! 4. per step: the stage's step at the scheduled learning rate, evaluation every
//!    `training.eval_steps`, the bad-step count (one rule: a step is bad when an update was
//!    skipped for a non-finite loss or gradient, or its rewards were not finite; after
//!    `training.max_bad_steps` bad steps in a row the run stops with a checkpoint);
//! 5. checkpoints on schedule, at the end and on SIGINT/SIGTERM;
//! 6. the final save of the stage's outputs.
//!
//! With several ranks (docs/distributed.md) every rank runs this loop in step: the adapter
//! starts from rank 0's values, the updater sums the gradients over ranks, a stop signal on
//! any rank stops all at the same step, dropout draws from a stream per (seed, rank, step),
//! and rank 0 alone writes the run folder, checkpoints and outputs.

use super::checkpoint::{self, Checkpointer, TrainerState};
use super::optimizer::Optimizer;
use super::update::Updater;
use crate::config::common::{ModelSection, TrainingSection};
use crate::dist;
use crate::telemetry::{self, METRICS};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::device::{parse_device, parse_dtype};
use rlft_policies::quant::QuantConfig;
use rlft_policies::Pretrained;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Before a stage is built: checks that `training.output_dir` is writable (before the
/// slow model load), then loads `model.path` in `model.dtype` on `model.device`, its block
/// linears quantized as `model.quantization` says.
pub fn load_model(model: &ModelSection, t: &TrainingSection) -> Result<(Pretrained, Device)> {
    load_base(model, t, None)
}

/// [`load_model`], with an SFT adapter merged into the base first when `sft` is given (so that
/// the reference, the base with the adapter off, is the SFT model). On a quantized base the
/// adapter is merged into the full-precision weights, which are then quantized: one rounding,
/// as quantizing the merged model would; the load then peaks at the full-precision model.
pub fn load_base(
    model: &ModelSection,
    t: &TrainingSection,
    sft: Option<&Path>,
) -> Result<(Pretrained, Device)> {
    telemetry::init();
    let dtype = parse_dtype(&model.dtype)?;
    let device = parse_device(&model.device)?;
    let quant = model.quant_config()?;
    super::check_writable(&t.output_dir)?;
    let at_load = if sft.is_some() {
        QuantConfig::default()
    } else {
        quant
    };
    let dir = rlft_policies::hub::resolve(&model.path, &model.revision)
        .with_context(|| format!("model.path {}", model.path.display()))?;
    let mut pre = Pretrained::load_quantized(&dir, dtype, at_load, &device)
        .with_context(|| format!("loading model {}", model.path.display()))?;
    if let Some(sft) = sft {
        let sft = rlft_policies::hub::resolve(sft, "main")
            .with_context(|| format!("sft_adapter {}", sft.display()))?;
        merge_sft_adapter(&mut pre, &sft)?;
        rlft_policies::families::quantize_blocks(pre.model.as_mut(), quant)?;
    }
    if !quant.is_none() {
        let blocks: Vec<_> = pre
            .model
            .linears()
            .into_iter()
            .filter(|l| l.weight.is_quantized())
            .collect();
        let bytes = blocks.iter().map(|l| l.weight.bytes()).sum::<usize>();
        tracing::info!(
            "base quantized: {} linear weights in {} ({:.1} MB, {:.2} bytes a weight)",
            blocks.len(),
            quant.describe(),
            bytes as f64 / 1e6,
            bytes as f64
                / blocks
                    .iter()
                    .map(|l| l.in_features() * l.out_features())
                    .sum::<usize>()
                    .max(1) as f64
        );
    }
    Ok((pre, device))
}

/// Options of a stage's run besides its configuration.
pub struct RunOptions {
    /// "latest" or a checkpoint folder.
    pub resume: Option<String>,
    pub quiet: bool,
}

/// `model.max_seq_len`, capped at the model's positions (with a warning).
pub fn max_len(configured: usize, model: &dyn rlft_policies::CausalLm) -> usize {
    let positions = model.info().max_positions;
    if configured > positions {
        tracing::warn!(
            "model.max_seq_len {configured} exceeds the model's {positions} positions; using {positions}"
        );
    }
    configured.min(positions)
}

/// Merges an SFT adapter into the base weights, so that the reference (the base with the
/// adapter off) is the SFT model and a new adapter starts from it.
pub fn merge_sft_adapter(pre: &mut Pretrained, sft: &Path) -> Result<()> {
    let a = rlft_policies::Adapter::load(sft, pre.model.as_ref())
        .with_context(|| format!("loading sft_adapter {}", sft.display()))?;
    a.merge_into(pre.model.as_mut())?;
    tracing::info!(
        "merged the SFT adapter {} into the base: it is the reference",
        sft.display()
    );
    Ok(())
}

/// The checkpoint a run continues from.
pub struct Resume {
    pub dir: PathBuf,
    pub state: TrainerState,
}

impl Resume {
    /// `--resume` (`"latest"` or a checkpoint folder) → the checkpoint and its state.
    pub fn find(resume: Option<&str>, output_dir: &Path) -> Result<Option<Self>> {
        let Some(r) = resume else { return Ok(None) };
        let dir = checkpoint::resolve(r, output_dir)?;
        let state = checkpoint::read_state(&dir)?;
        Ok(Some(Self { dir, state }))
    }
}

/// A memory requirement checked before the first step.
pub struct MemoryNeed {
    pub bytes: u64,
    /// The need with `training.gradient_checkpointing`, where it is off and would lower it.
    pub with_checkpointing: Option<u64>,
    /// What needs it ("a micro-batch of 8 × 128 tokens").
    pub what: String,
    /// The settings that lower it.
    pub lower: String,
}

/// What a step of the loop hands to the stage.
pub struct StepCtx<'a> {
    /// 0-based index of this step; the step is reported as `step + 1`.
    pub step: u64,
    pub total_steps: u64,
    /// The scheduled learning rate of this step.
    pub lr: f64,
    /// Data batches consumed so far; the stage advances it by what it takes.
    pub position: &'a mut u64,
    pub updater: &'a mut Updater,
    /// The seeded LoRA dropout generator (checkpointed), or `None` when the stage trains
    /// without dropout.
    pub dropout: Option<&'a Mutex<ChaCha8Rng>>,
    /// Whether this step's metrics are logged (`training.logging_steps` and the last step).
    pub log: bool,
    pub progress: &'a ProgressBar,
}

/// How a step went.
pub enum StepOutcome {
    Trained,
    /// A bad step: an update skipped, or rewards that could not be used. The cause is named
    /// in the message that stops the run.
    Bad(String),
}

pub trait Stage {
    /// "sft", "ppo", …: the progress bar's label and the log prefix.
    fn name(&self) -> String;
    /// Every trainable variable with its checkpoint name, in a fixed order.
    fn params(&self) -> Vec<(String, Var)>;
    /// Data batches per epoch and per step: the schedule's length when `max_steps` is 0.
    fn batches(&self) -> (u64, u64);
    /// Memory the stage's largest passes need.
    fn memory_needs(&self, trainable_params: usize) -> Vec<MemoryNeed>;
    /// Whether the training passes use LoRA dropout (masks from the loop's generator).
    fn uses_dropout(&self) -> bool;
    /// Once, after the run folder is open and before the first step (of this process).
    fn begin(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }
    /// One step: usually one optimizer update (RL: several).
    fn step(&mut self, ctx: StepCtx) -> Result<StepOutcome>;
    /// Evaluation after `step` updates (every `training.eval_steps` and at the end).
    fn evaluate(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }
    /// Writes the trainable values (and the stage's own files) into a checkpoint folder.
    fn save_checkpoint(&self, dir: &Path) -> Result<()>;
    /// The stage's own state for `trainer_state.json` (`extra`), e.g. PPO's β.
    fn extra_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// After the last step: writes the run's outputs; returns the main one's folder.
    fn finish(&mut self, step: u64) -> Result<PathBuf>;
}

/// What the loop reports; the stage's own figures are on the stage.
#[derive(Debug, Clone)]
pub struct LoopOutcome {
    /// The final output folder, or the checkpoint written when interrupted.
    pub output: PathBuf,
    pub steps: u64,
    /// Steps run by this process (less than `steps` after a resume).
    pub steps_run: u64,
    pub seconds: f64,
    pub interrupted: bool,
}

/// Runs `stage` to the end of its schedule.
pub fn run(
    stage: &mut dyn Stage,
    t: &TrainingSection,
    config: &serde_json::Value,
    resume: Option<&Resume>,
    device: &Device,
    quiet: bool,
) -> Result<LoopOutcome> {
    let name = stage.name();
    let params = stage.params();
    // 1. Resume: optimizer state, step, data and dropout positions.
    let mut updater = Updater::new(
        Optimizer::new(t.optimizer_kind(), params.clone()),
        t.max_grad_norm,
    );
    let dropout_rng = Mutex::new(ChaCha8Rng::seed_from_u64(t.seed.wrapping_add(1)));
    let (mut step, mut position) = (0u64, 0u64);
    if let Some(r) = resume {
        let s = &r.state;
        updater.optimizer.load_state(
            checkpoint::read_optimizer(&r.dir, device)?,
            s.optimizer_step.unwrap_or(s.global_step),
        )?;
        step = s.global_step;
        position = s.data_position;
        let pos: u128 = s
            .dropout_rng_word_pos
            .parse()
            .context("trainer_state.json: dropout_rng_word_pos")?;
        dropout_rng.lock().expect("not poisoned").set_word_pos(pos);
        dist::check_resume_size(s.world_size, &r.dir)?;
        if &s.config != config {
            tracing::warn!("resuming with a configuration that differs from the checkpoint's; the result will not match an uninterrupted run");
        }
        tracing::info!("resuming from {} at step {step}", r.dir.display());
    }
    let world = dist::world();
    let main = world.rank() == 0;
    dist::broadcast_vars(&params)?;
    // 2. Resource checks before the first step.
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    if main {
        super::check_disk_space(&t.output_dir, n_params)?;
    }
    for need in stage.memory_needs(n_params) {
        super::memory::check(
            device,
            need.bytes,
            need.with_checkpointing,
            &need.what,
            &need.lower,
        )?;
    }
    // 3. The schedule and the run folder.
    let (per_epoch, per_step) = stage.batches();
    let schedule = super::plan(t, per_epoch, per_step);
    let total_steps = schedule.total_steps;
    let ckpt = main.then(|| super::open_run(t, config)).transpose()?;
    tracing::info!(
        "{name}: {total_steps} steps, {n_params} trainable parameters ({})",
        world.describe()
    );
    stage.begin(step)?;

    let pb = telemetry::progress(total_steps, &name, quiet || !main);
    pb.set_position(step);
    let started = Instant::now();
    let start_step = step;
    let (mut bad_steps, mut bad_cause) = (0u64, String::new());
    let use_dropout = stage.uses_dropout();
    let save = |stage: &dyn Stage, step: u64, position: u64, updater: &Updater| {
        let state = TrainerState {
            global_step: step,
            data_position: position,
            dropout_rng_word_pos: dropout_rng
                .lock()
                .expect("not poisoned")
                .get_word_pos()
                .to_string(),
            optimizer_step: Some(updater.optimizer.step),
            config: config.clone(),
            extra: stage.extra_state(),
            world_size: (world.size() > 1).then_some(world.size()),
        };
        match &ckpt {
            Some(c) => save_checkpoint(c, stage, step, &updater.optimizer, &state),
            // Rank 0 writes; the others name the folder it writes.
            None => Ok(t.output_dir.join(format!("checkpoint-{step}"))),
        }
    };
    super::interrupt::install();
    let mut interrupted = None;
    while step < total_steps {
        if world.size() > 1 && use_dropout {
            let seed = dist::rank_seed(t.seed.wrapping_add(1), world.rank(), step);
            *dropout_rng.lock().expect("not poisoned") = ChaCha8Rng::seed_from_u64(seed);
        }
        // 4. The step, then evaluation and the bad-step count.
        let outcome = stage.step(StepCtx {
            step,
            total_steps,
            lr: schedule.lr(step),
            position: &mut position,
            updater: &mut updater,
            dropout: use_dropout.then_some(&dropout_rng),
            log: (step + 1) % t.logging_steps.max(1) == 0 || step + 1 == total_steps,
            progress: &pb,
        })?;
        step += 1;
        pb.inc(1);
        match outcome {
            StepOutcome::Trained => bad_steps = 0,
            StepOutcome::Bad(cause) => {
                bad_steps += 1;
                bad_cause = cause;
            }
        }
        if (t.eval_steps > 0 && step % t.eval_steps == 0) || step == total_steps {
            stage.evaluate(step)?;
        }
        // 5. Checkpoint on schedule, at the end, when interrupted, and before stopping
        // after too many bad steps (then with the last good state).
        let too_many_bad = bad_steps >= t.max_bad_steps.max(1);
        // A signal may reach one rank first: every rank stops at the same step.
        let stop = dist::any(super::interrupt::requested())? && step < total_steps;
        if (t.save_steps > 0 && step % t.save_steps == 0)
            || step == total_steps
            || stop
            || too_many_bad
        {
            let dir = save(&*stage, step, position, &updater)?;
            if too_many_bad {
                telemetry::finish_progress();
                bail!("{bad_steps} consecutive bad steps up to step {step} (last: {bad_cause}); the last good state is in {}", dir.display());
            }
            if stop {
                interrupted = Some(dir);
                break;
            }
        }
    }
    telemetry::finish_progress();
    let seconds = started.elapsed().as_secs_f64();
    let steps_run = step - start_step;
    if let Some(dir) = interrupted {
        tracing::info!(target: METRICS, step, status = "interrupted", "{name} interrupted at step {step}");
        telemetry::close_metrics();
        return Ok(LoopOutcome {
            output: dir,
            steps: step,
            steps_run,
            seconds,
            interrupted: true,
        });
    }
    // 6. The outputs (rank 0's).
    let output = if main {
        stage.finish(step)?
    } else {
        t.output_dir.clone()
    };
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(target: METRICS, step, status = "finished", elapsed = seconds, "{name} finished: {} written", output.display());
    telemetry::close_metrics();
    Ok(LoopOutcome {
        output,
        steps: step,
        steps_run,
        seconds,
        interrupted: false,
    })
}

fn save_checkpoint(
    ckpt: &Checkpointer,
    stage: &dyn Stage,
    step: u64,
    optimizer: &Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    ckpt.save(step, &|dir| stage.save_checkpoint(dir), optimizer, state)
}
