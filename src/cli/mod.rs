//! The command line: one subcommand per file.

mod common;
mod generate;
mod logprobs;

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
    init_tracing();
    let result = match cli.command {
        Command::Logprobs(a) => logprobs::run(a),
        Command::Generate(a) => generate::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Human-readable logs on stderr; `RUST_LOG` sets the level (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
