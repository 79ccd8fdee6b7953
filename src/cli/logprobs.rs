//! `rlft logprobs`: per-token log-probabilities of texts.

use super::common::ModelArgs;
use anyhow::Result;
use rlft_policies::score;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text to score (repeat for several; they are scored as one left-padded batch).
    #[arg(long = "text", required = true)]
    pub texts: Vec<String>,
    /// One JSON object per text: {"input_ids": [...], "logprobs": [...]}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (pre, adapter) = args.model.load()?;
    let rows = args
        .texts
        .iter()
        .map(|t| pre.tokenizer.encode(t, true))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = rows.iter().position(|r| r.is_empty()) {
        anyhow::bail!("--text #{}: encodes to no tokens", i + 1);
    }
    let lps = score(
        pre.model.as_ref(),
        adapter.as_ref(),
        &rows,
        pre.tokenizer.pad_or_eos(),
        1.0,
    )?;
    for (ids, lp) in rows.iter().zip(&lps) {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "input_ids": ids, "logprobs": lp })
            );
        } else {
            let sum: f64 = lp.iter().map(|&x| x as f64).sum();
            println!("{} tokens, sum log-prob {sum:.4}", ids.len());
            for (t, &id) in ids.iter().enumerate().skip(1) {
                let tok = pre.tokenizer.decode(&[id], false)?;
                println!("  {t:>4} {id:>6} {:>10.4}  {tok:?}", lp[t - 1]);
            }
        }
    }
    Ok(())
}
