//! The command line: one subcommand per file.

mod common;
mod generate;
mod logprobs;
mod merge;
mod sft;

use clap::{Parser, Subcommand};
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
}

/// Parses `args`, runs the command, and turns any error into a message and exit code 1
/// (never a panic or a backtrace).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
