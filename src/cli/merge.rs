//! `rlft merge`: fold an adapter into the base weights and write a Hugging Face folder.

use super::common::ModelArgs;
use anyhow::{Context, Result};
use rlft_policies::params::{save_pretrained, save_pretrained_classifier};
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
    let pad = crate::rewards::score_pad_id(&pre);
    // A reward-model adapter (`rlft rm`: SEQ_CLS with a `score` head) merges into a
    // `…ForSequenceClassification` folder; a causal-LM adapter into a causal LM.
    match adapter.head("score") {
        Some(score) => save_pretrained_classifier(
            pre.model.as_mut(),
            score.as_tensor(),
            pad,
            &args.model.model,
            &args.out,
        ),
        None => save_pretrained(pre.model.as_mut(), &args.model.model, &args.out),
    }
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
