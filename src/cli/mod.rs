//! The command line: one subcommand per file.

mod bench;
mod common;
mod dashboard;
mod demo;
mod generate;
mod logprobs;
mod merge;
mod pairs;
mod preference;
mod rl;
mod sft;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rlft",
    version,
    about = "LoRA fine-tuning and RL from feedback for causal LMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-token log-probabilities of texts under a model (and adapter).
    Logprobs(logprobs::Args),
    /// Generate a completion for one or more prompts.
    Generate(generate::Args),
    /// Supervised fine-tuning (LoRA by default) from a TOML config.
    Sft(sft::Args),
    /// Merge an adapter into the base weights and write a Hugging Face folder.
    Merge(merge::Args),
    /// Watch and compare runs in the browser (metrics, rollouts), live.
    Dashboard(dashboard::Args),
    /// Speed workloads W1–W4 on a small Llama (docs/performance.md).
    Bench(bench::Args),
    /// The built-in demo: SFT then PPO on a tiny model of our own, with held-out accuracy.
    Demo(demo::Args),
    /// RL against reward functions with PPO (or RLOO via rl.algorithm), KL to a frozen reference.
    Ppo(rl::Args),
    /// RL with GRPO (critic-free, group-normalised advantages).
    Grpo(rl::Args),
    /// Train a reward model (LoRA + score head) on preference pairs; writes a PEFT SEQ_CLS adapter.
    Rm(preference::Args),
    /// Direct Preference Optimization of a LoRA adapter on preference pairs.
    Dpo(preference::Args),
    /// Kahneman–Tversky Optimization of a LoRA adapter on completions labelled desirable or not.
    Kto(preference::Args),
    /// Per-pair log-probs (policy and reference), DPO losses and reward-model scores.
    Pairs(pairs::Args),
    /// Print a shell completion script: `rlft completions bash > ~/.local/share/bash-completion/completions/rlft`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `rlft --version`: the version, whether the build has CUDA and MPI, and the CPU features
/// the kernels detected at run time (`avx2`, `fma`, `f16c`, …; rlft picks its kernels by
/// them).
pub fn version_line() -> String {
    let yes = |on: bool| if on { "yes" } else { "no" };
    let (cuda, mpi) = (yes(cfg!(feature = "cuda")), yes(cfg!(feature = "mpi")));
    let mpi = if cfg!(feature = "nccl") {
        "yes, NCCL"
    } else {
        mpi
    };
    let cpu = crate::bench::cpu_features();
    format!(
        "{} (cuda: {cuda}; mpi: {mpi}; CPU features: {})",
        env!("CARGO_PKG_VERSION"),
        if cpu.is_empty() {
            "none detected".to_string()
        } else {
            cpu.join(", ")
        }
    )
}

/// Parses `args`, runs the command, and turns any error into a message and exit code 1
/// (never a panic or a backtrace).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    main_with_registry(args, crate::rewards::default_registry())
}

/// As [`main_with_args`], with the rewards of `registry` available to `[[reward]]` tables:
/// the entry point for a program that registers its own rewards.
pub fn main_with_registry<I, T>(args: I, registry: rlft_reward::Registry) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // The version line is built at run time (the CPU's features): leaked once, as clap
    // keeps a `&'static str`.
    let version: &'static str = Box::leak(version_line().into_boxed_str());
    let parsed = Cli::command()
        .version(version)
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    crate::telemetry::init();
    let result = match cli.command {
        Command::Logprobs(a) => logprobs::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Demo(a) => demo::run_cmd(a),
        Command::Bench(a) => bench::run(a),
        Command::Dashboard(a) => dashboard::run(a),
        Command::Ppo(a) => rl::run(a, &[], &registry),
        Command::Grpo(a) => rl::run(
            a,
            &["rl.algorithm=\"grpo\"", "rl.num_generations=4"],
            &registry,
        ),
        Command::Rm(a) => preference::run_rm(a),
        Command::Dpo(a) => preference::run_dpo(a),
        Command::Kto(a) => preference::run_kto(a),
        Command::Pairs(a) => pairs::run(a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "rlft", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::telemetry::finish_progress();
            crate::telemetry::mark_failed(&format!("{e:#}"));
            eprintln!("error: {e:#}");
            // The other ranks would wait for this one in their next all-reduce forever.
            let world = crate::dist::world();
            if world.size() > 1 {
                eprintln!(
                    "rank {} of {} failed: stopping every rank",
                    world.rank(),
                    world.size()
                );
                world.abort(1);
            }
            ExitCode::FAILURE
        }
    }
}
