//! `rlft merge`: fold an adapter into the base weights and write a Hugging Face folder.

use super::common::ModelArgs;
use anyhow::{Context, Result};
use rlft_policies::params::save_pretrained;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder (model.safetensors, config and tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let (mut pre, adapter) = args.model.load()?;
    let adapter = adapter.context("rlft merge needs --adapter")?;
    adapter.merge_into(pre.model.as_mut())?;
    save_pretrained(pre.model.as_mut(), &args.model.model, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "merged {} into {} → {}",
        args.model
            .adapter
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        args.model.model.display(),
        args.out.display()
    );
    Ok(())
}
