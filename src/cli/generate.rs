//! `rlft generate`: sample completions with the KV cache.

use super::common::ModelArgs;
use anyhow::{Context, Result};
use rlft_policies::{generate, GenerationConfig, SamplingParams};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt (repeat for several; they are generated as one left-padded batch).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra token ids that end a sequence (besides the model's EOS ids).
    #[arg(long = "stop-token-id")]
    pub stop_token_ids: Vec<u32>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Recompute every position each step instead of using the KV cache.
    #[arg(long)]
    pub no_cache: bool,
    /// One JSON object per prompt: {"prompt_ids", "completion_ids", "completion", "stopped"}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (pre, adapter) = args.model.load()?;
    let tok = &pre.tokenizer;
    let mut rows = Vec::with_capacity(args.prompts.len());
    for (i, p) in args.prompts.iter().enumerate() {
        let ids = if args.chat {
            let messages = serde_json::json!([{ "role": "user", "content": p }]);
            let text = tok.apply_chat_template(&messages, true)?;
            // The template writes its own BOS, as transformers' apply_chat_template does.
            tok.encode(&text, false)?
        } else {
            tok.encode(p, true)?
        };
        if ids.is_empty() {
            anyhow::bail!("--prompt #{}: encodes to no tokens", i + 1);
        }
        rows.push(ids);
    }
    let mut stop_ids = tok.stop_ids.clone();
    stop_ids.extend(&args.stop_token_ids);
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        seed: args.seed,
        stop_ids,
        pad_id: tok.pad_or_eos(),
        use_cache: !args.no_cache,
    };
    let start = std::time::Instant::now();
    let outs =
        generate(pre.model.as_ref(), adapter.as_ref(), &rows, &cfg).context("generation failed")?;
    let new_tokens: usize = outs.iter().map(|g| g.completion_ids.len()).sum();
    let secs = start.elapsed().as_secs_f64();
    for g in &outs {
        let completion = tok.decode(&g.completion_ids, true)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "prompt_ids": g.prompt_ids,
                    "completion_ids": g.completion_ids,
                    "completion": completion,
                    "stopped": g.stopped,
                })
            );
        } else {
            println!("{completion}");
        }
    }
    tracing::info!(
        "generated {new_tokens} tokens in {secs:.3} s ({:.0} new tokens/s)",
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
