//! The training-loop pieces every stage shares: optimizer, schedule, gradient accumulation
//! and clipping, checkpoints, the trainable set.

pub mod checkpoint;
pub mod grads;
pub mod optimizer;
pub mod order;
pub mod schedule;
pub mod trainable;

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
