//! `rlft ppo` and `rlft grpo`: the RL stage (RLOO via `rl.algorithm = "rloo"`).

use crate::config::{self, rl::RlConfig};
use crate::rl::trainer::{run as run_rl, RunOptions};
use anyhow::Result;
use rlft_reward::Registry;

pub use super::common::StageArgs as Args;

/// `defaults` are applied where the config file is silent (`rlft grpo` → GRPO).
pub fn run(args: Args, defaults: &[&str], registry: &Registry) -> Result<()> {
    let cfg: RlConfig =
        config::load_with_defaults(args.config.as_deref(), defaults, &args.overrides)?;
    let out = run_rl(
        &cfg,
        registry,
        &RunOptions {
            resume: args.resume,
            quiet: args.quiet,
            separate_old_pass: false,
        },
    )?;
    // Rank 0 reports for a data-parallel run.
    if !crate::dist::is_main() {
        return Ok(());
    }
    if out.interrupted {
        println!(
            "{:?}: interrupted after step {}; checkpoint {} written. Resume with the same command and --resume",
            cfg.rl.algorithm,
            out.steps,
            out.output.display()
        );
        return Ok(());
    }
    println!(
        "{:?}: {} steps, score {:.4} → {:.4}, KL {:.4} nats, {:.2} s/step{} → {}",
        cfg.rl.algorithm,
        out.steps,
        out.first_score,
        out.last_score,
        out.last_kl,
        out.seconds_per_step,
        match (out.eval_before, out.eval_after) {
            (Some(a), Some(b)) => format!(", eval score {a:.4} → {b:.4}"),
            (None, Some(b)) => format!(", eval score {b:.4}"),
            _ => String::new(),
        },
        out.output.display()
    );
    Ok(())
}
