//! Checkpoints `output_dir/checkpoint-N/`: trainable weights, optimizer moments and
//! `trainer_state.json` (step, data position, RNG position, …). A checkpoint is written in
//! a hidden temporary folder and renamed into place, so a kill never leaves a partial one:
//! a folder named `checkpoint-N` is always complete.

use super::optimizer::Optimizer;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub global_step: u64,
    /// Micro-batches consumed from the (epoch-shuffled) data stream.
    pub data_position: u64,
    /// Word position of the dropout generator (decimal string: it is a u128).
    pub dropout_rng_word_pos: String,
    /// The run's configuration, to refuse resuming with a different one.
    pub config: serde_json::Value,
    /// Optimizer updates applied (differs from `global_step` when a step makes several, as
    /// RL steps do); AdamW's bias correction needs it. Absent: `global_step`.
    #[serde(default)]
    pub optimizer_step: Option<u64>,
    /// Stage-specific state (e.g. PPO's adaptive β).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// Saves tensors with `candle`'s safetensors writer, via a temporary file.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, path)
        .with_context(|| format!("writing {}", path.display()))
}

fn fsync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn sync_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            std::fs::File::open(&p)?.sync_all()?;
        }
    }
    Ok(())
}

pub struct Checkpointer {
    pub output_dir: PathBuf,
    pub save_total_limit: Option<usize>,
}

impl Checkpointer {
    /// Writes checkpoint `step`: `payload` writes the trainable weights into the folder.
    pub fn save(
        &self,
        step: u64,
        payload: &dyn Fn(&Path) -> Result<()>,
        optimizer: &Optimizer,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let final_dir = self.output_dir.join(format!("checkpoint-{step}"));
        let tmp = self.output_dir.join(format!(".checkpoint-{step}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let write = || -> Result<()> {
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            payload(&tmp)?;
            pause_for_tests();
            save_tensors(&optimizer.state_tensors(), &tmp.join(OPTIMIZER_FILE))?;
            let json = serde_json::to_string_pretty(state)?;
            std::fs::write(tmp.join(STATE_FILE), json)
                .with_context(|| format!("writing {}", tmp.join(STATE_FILE).display()))?;
            sync_files(&tmp)
        };
        if let Err(e) = write() {
            // Leave nothing half-written behind; the completed checkpoints stay as they are.
            let _ = std::fs::remove_dir_all(&tmp);
            let full = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    io.raw_os_error() == Some(libc::ENOSPC)
                        || io.raw_os_error() == Some(libc::EDQUOT)
                })
            }) || format!("{e:#}").contains("No space left");
            let newest = list(&self.output_dir).into_iter().max();
            let kept = match newest {
                Some((_, p)) => format!("the newest complete checkpoint is {}", p.display()),
                None => "no complete checkpoint exists yet".into(),
            };
            return Err(e.context(format!(
                "checkpoint-{step} could not be written{}; its partial files were removed and {kept}",
                if full { " (the disk is full: free space, then rerun with --resume)" } else { "" }
            )));
        }
        if final_dir.exists() {
            // Same step written again (a resumed run): swap the old one out first.
            let old = self.output_dir.join(format!(".checkpoint-{step}.old"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&final_dir, &old)?;
            std::fs::rename(&tmp, &final_dir)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &final_dir)
                .with_context(|| format!("renaming into {}", final_dir.display()))?;
        }
        fsync_dir(&self.output_dir);
        self.rotate()?;
        Ok(final_dir)
    }

    /// Keeps only the newest `save_total_limit` checkpoints.
    fn rotate(&self) -> Result<()> {
        let Some(limit) = self.save_total_limit else {
            return Ok(());
        };
        let mut all = list(&self.output_dir);
        if all.len() > limit.max(1) {
            all.sort();
            for (step, p) in &all[..all.len() - limit.max(1)] {
                // Renamed out of the checkpoint-N namespace first (atomic), so a kill during
                // the removal never leaves a partial folder under a checkpoint name.
                let old = self.output_dir.join(format!(".checkpoint-{step}.old"));
                let _ = std::fs::remove_dir_all(&old);
                std::fs::rename(p, &old)?;
                std::fs::remove_dir_all(&old)?;
            }
        }
        Ok(())
    }
}

/// `RLFT_CHECKPOINT_PAUSE_MS`: sleep this long inside every checkpoint write, after the
/// weights and before the optimizer state — only so tests can kill a run mid-write.
fn pause_for_tests() {
    if let Some(ms) = std::env::var("RLFT_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Complete checkpoints under `dir` as (step, path).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().to_string_lossy().into_owned();
        let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
        e.path()
            .join(STATE_FILE)
            .is_file()
            .then(|| (step, e.path()))
    })
    .collect()
}

/// `--resume` → a checkpoint folder: "latest" (the newest under `output_dir`) or a path.
pub fn resolve(resume: &str, output_dir: &Path) -> Result<PathBuf> {
    if resume == "latest" {
        return list(output_dir)
            .into_iter()
            .max()
            .map(|(_, p)| p)
            .with_context(|| {
                format!(
                    "--resume: no checkpoint-N folder in {}",
                    output_dir.display()
                )
            });
    }
    let p = PathBuf::from(resume);
    if !p.join(STATE_FILE).is_file() {
        bail!(
            "--resume {}: not a checkpoint folder (no {STATE_FILE})",
            p.display()
        );
    }
    Ok(p)
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid trainer state", p.display()))
}

pub fn read_optimizer(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let p = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&p, device).with_context(|| format!("reading {}", p.display()))
}
