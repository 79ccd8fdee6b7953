//! `rlft sft`: supervised LoRA fine-tuning from a TOML config.

use crate::config::{self, sft::SftConfig};
use crate::sft::{run as run_sft, RunOptions};
use anyhow::Result;

pub use super::common::StageArgs as Args;

pub fn run(args: Args) -> Result<()> {
    let cfg: SftConfig = config::load(args.config.as_deref(), &args.overrides)?;
    let out = run_sft(
        &cfg,
        &RunOptions {
            resume: args.resume,
            quiet: args.quiet,
        },
    )?;
    // Rank 0 reports for a data-parallel run.
    if !crate::dist::is_main() {
        return Ok(());
    }
    if out.interrupted {
        println!(
            "sft: interrupted after step {}; checkpoint {} written. Resume with the same command and --resume",
            out.steps,
            out.output.display()
        );
        return Ok(());
    }
    println!(
        "sft: {} steps, final train loss {:.4}{}, {:.1} tokens/s, {:.2} steps/s → {}",
        out.steps,
        out.final_train_loss,
        out.eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        out.tokens_per_s,
        out.steps_per_s,
        out.output.display()
    );
    Ok(())
}
