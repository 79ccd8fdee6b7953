//! `rlft demo`: the whole pipeline on the built-in task (SFT, then PPO) with a summary table;
//! `rlft demo build-base` rebuilds the committed base model from scratch.

use crate::demo::{build_base, run, DemoOptions};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Folder with the demo's configs and base model.
    #[arg(long, default_value = "configs/demo", global = true)]
    pub configs: PathBuf,
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// A shortened run (seconds): a few steps and a sample of the held-out problems.
    #[arg(long)]
    pub quick: bool,
    /// No progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// The base's dtype in every stage: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The base's quantization in every stage: none, int8, nf4 or fp4 (4 bits with double
    /// quantization, as QLoRA sets it).
    #[arg(long, default_value = "none")]
    pub quantization: String,
}

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Rebuild the base model: corpus, tokenizer, random init, full-parameter pretraining.
    BuildBase {
        /// Where the Hugging Face folder goes.
        #[arg(long, default_value = "configs/demo/model")]
        out: PathBuf,
        /// Scratch folder (corpus, checkpoints).
        #[arg(long, default_value = "runs/demo-base")]
        work: PathBuf,
    },
}

pub fn run_cmd(args: Args) -> Result<()> {
    if let Some(Action::BuildBase { out, work }) = &args.action {
        return build_base(&args.configs, work, out, args.quiet);
    }
    let s = run(&DemoOptions {
        dtype: args.dtype.clone(),
        quantization: args.quantization.clone(),
        ..DemoOptions::new(
            args.configs.clone(),
            args.out.clone(),
            args.quick,
            args.quiet,
        )
    })?;
    let secs = |k: &str| s.seconds.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    println!();
    println!(
        "rlft demo — two-number addition, {} held-out problems (greedy, exact match)",
        s.eval_problems
    );
    println!("  {:<28} {:>8}", "stage", "accuracy");
    println!("  {:<28} {:>7.1}%", "base model", 100.0 * s.base_accuracy);
    println!(
        "  {:<28} {:>7.1}%",
        "after SFT (LoRA)",
        100.0 * s.sft_accuracy
    );
    println!(
        "  {:<28} {:>7.1}%   KL to the SFT model {:.2} nats per answer",
        "after PPO (exact match)",
        100.0 * s.ppo_accuracy,
        s.ppo_kl
    );
    println!(
        "  learning from {} preference pairs:",
        crate::demo::PREFERENCE_PAIRS
    );
    println!(
        "  {:<28} {:>7.1}%   pairwise, {} held-out pairs",
        "reward model",
        100.0 * s.rm_accuracy,
        s.eval_pairs
    );
    println!(
        "  {:<28} {:>7.1}%   KL to the SFT model {:.2} nats per answer",
        "after PPO (reward model)",
        100.0 * s.ppo_rm_accuracy,
        s.ppo_rm_kl
    );
    println!(
        "  {:<28} {:>7.1}%   KL to the SFT model {:.2} nats per answer",
        "after DPO",
        100.0 * s.dpo_accuracy,
        s.dpo_kl
    );
    println!(
        "  {:<28} {:>7.1}%   KL to the SFT model {:.2} nats per answer",
        "after KTO (pairs unpaired)",
        100.0 * s.kto_accuracy,
        s.kto_kl
    );
    println!(
        "  wall time: SFT {:.0} s, PPO {:.0} s, RM {:.0} s, PPO (RM) {:.0} s, DPO {:.0} s, KTO {:.0} s, evaluation {:.0} s",
        secs("sft"),
        secs("ppo"),
        secs("rm"),
        secs("ppo_rm"),
        secs("dpo"),
        secs("kto"),
        secs("eval")
    );
    println!(
        "  results: {}/summary.json; metrics and rollouts in {}/{{sft,ppo,rm,ppo-rm,dpo,kto}}",
        args.out.display(),
        args.out.display()
    );
    println!(
        "  watch them: cargo run --release -- dashboard {}",
        args.out.display()
    );
    Ok(())
}
