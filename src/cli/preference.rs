//! `rlft rm`, `rlft dpo` and `rlft kto`: learning from preferences, from a TOML config.

use crate::config::{self, preference::DpoConfig, preference::KtoConfig, preference::RmConfig};
use crate::preference::{dpo, kto, rm, RunOptions};
use anyhow::Result;

pub use super::common::StageArgs as Args;

fn options(args: &Args) -> RunOptions {
    RunOptions {
        resume: args.resume.clone(),
        quiet: args.quiet,
    }
}

fn interrupted(stage: &str, steps: u64, out: &std::path::Path) {
    println!(
        "{stage}: interrupted after step {steps}; checkpoint {} written. Resume with the same command and --resume",
        out.display()
    );
}

pub fn run_rm(args: Args) -> Result<()> {
    let cfg: RmConfig = config::load(args.config.as_deref(), &args.overrides)?;
    let out = rm::run(&cfg, &options(&args))?;
    // Rank 0 reports for a data-parallel run.
    if !crate::dist::is_main() {
        return Ok(());
    }
    if out.interrupted {
        interrupted("rm", out.steps, &out.output);
        return Ok(());
    }
    let what = if out.output.ends_with("adapter") {
        "a PEFT SEQ_CLS adapter; `rlft merge` makes it a ForSequenceClassification folder"
    } else {
        "a ForSequenceClassification folder"
    };
    println!(
        "rm: {} steps, final train loss {:.4}{} → {} ({what})",
        out.steps,
        out.final_train_loss,
        out.eval_accuracy
            .map(|a| format!(", eval accuracy {:.1}%", 100.0 * a))
            .unwrap_or_default(),
        out.output.display()
    );
    Ok(())
}

pub fn run_dpo(args: Args) -> Result<()> {
    let cfg: DpoConfig = config::load(args.config.as_deref(), &args.overrides)?;
    let out = dpo::run(&cfg, &options(&args))?;
    // Rank 0 reports for a data-parallel run.
    if !crate::dist::is_main() {
        return Ok(());
    }
    if out.interrupted {
        interrupted("dpo", out.steps, &out.output);
        return Ok(());
    }
    println!(
        "dpo: {} steps, final train loss {:.4}{} → {}",
        out.steps,
        out.final_train_loss,
        out.eval
            .map(|e| format!(
                ", eval loss {:.4}, reward accuracy {:.1}%, margin {:.3}",
                e.loss,
                100.0 * e.accuracy,
                e.margin
            ))
            .unwrap_or_default(),
        out.output.display()
    );
    Ok(())
}

pub fn run_kto(args: Args) -> Result<()> {
    let cfg: KtoConfig = config::load(args.config.as_deref(), &args.overrides)?;
    let out = kto::run(&cfg, &options(&args))?;
    // Rank 0 reports for a data-parallel run.
    if !crate::dist::is_main() {
        return Ok(());
    }
    if out.interrupted {
        interrupted("kto", out.steps, &out.output);
        return Ok(());
    }
    println!(
        "kto: {} steps, final train loss {:.4}{} → {}",
        out.steps,
        out.final_train_loss,
        out.eval
            .map(|e| format!(
                ", eval loss {:.4}, kl {:.3}, rewards chosen {:.3} rejected {:.3}",
                e.loss, e.kl, e.rewards_chosen, e.rewards_rejected
            ))
            .unwrap_or_default(),
        out.output.display()
    );
    Ok(())
}
