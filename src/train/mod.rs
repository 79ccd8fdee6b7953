//! The training-loop pieces every stage shares: optimizer, schedule, gradient accumulation
//! and clipping, checkpoints, the trainable set.

pub mod checkpoint;
pub mod grads;
pub mod interrupt;
pub mod memory;
pub mod optimizer;
pub mod order;
pub mod schedule;
pub mod stage;
pub mod trainable;
pub mod update;

use anyhow::{Context, Result};
use std::path::Path;

/// Creates `dir` and checks a file can be written there, before any training starts.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output_dir {}", dir.display()))?;
    let probe = dir.join(".rlft-write-test");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("output_dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Free bytes on the file system holding `dir` (None where it cannot be asked).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a NUL-terminated path and `st` a zeroed statvfs that the call fills.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Bytes one checkpoint takes: the trainable values and AdamW's two moments, f32, plus a
/// margin for the JSON state and the safetensors headers.
pub fn checkpoint_bytes(trainable_params: usize) -> u64 {
    12 * trainable_params as u64 + (1 << 20)
}

/// Fails before training when `dir` cannot hold two checkpoints (a new one is written
/// beside the last before the older is rotated out).
pub fn check_disk_space(dir: &Path, trainable_params: usize) -> Result<()> {
    let need = 2 * checkpoint_bytes(trainable_params);
    if let Some(free) = free_bytes(dir) {
        if free < need {
            anyhow::bail!(
                "output_dir {} has {:.1} MiB free but checkpoints need about {:.1} MiB (two of {:.1} MiB); free some space or choose another training.output_dir",
                dir.display(),
                free as f64 / 1048576.0,
                need as f64 / 1048576.0,
                checkpoint_bytes(trainable_params) as f64 / 1048576.0
            );
        }
    }
    Ok(())
}

use crate::config::common::TrainingSection;

/// The learning-rate schedule of a run, whose total is `max_steps`, else
/// ⌈num_train_epochs × batches per epoch / batches per update⌉.
pub fn plan(
    t: &TrainingSection,
    batches_per_epoch: u64,
    batches_per_update: u64,
) -> schedule::Schedule {
    let total_steps = if t.max_steps > 0 {
        t.max_steps
    } else {
        ((t.num_train_epochs * batches_per_epoch as f64) / batches_per_update.max(1) as f64)
            .ceil()
            .max(1.0) as u64
    };
    schedule::Schedule {
        kind: t.lr_scheduler,
        base_lr: t.learning_rate,
        warmup_steps: t.warmup_for(total_steps),
        total_steps,
    }
}

/// Starts a run folder: writes the resolved `config.json`, opens `metrics.jsonl` for the
/// metric events, and returns the checkpointer.
pub fn open_run(
    t: &TrainingSection,
    config: &serde_json::Value,
) -> Result<checkpoint::Checkpointer> {
    std::fs::write(
        t.output_dir.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )?;
    let metrics = t.output_dir.join("metrics.jsonl");
    crate::telemetry::open_metrics(&metrics)
        .with_context(|| format!("opening {}", metrics.display()))?;
    if t.report_to.iter().any(|r| r == "tensorboard") {
        let runs = t.output_dir.join("runs");
        crate::telemetry::open_tensorboard(&runs)
            .with_context(|| format!("opening a TensorBoard event file in {}", runs.display()))?;
    }
    Ok(checkpoint::Checkpointer {
        output_dir: t.output_dir.clone(),
        save_total_limit: t.save_total_limit,
    })
}
