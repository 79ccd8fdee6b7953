//! `rlft pairs`: what a policy and a reward model make of preference pairs — each pair's
//! completion log-probs under the policy (adapter on) and the reference (adapter off), the
//! DPO losses and implicit rewards at `--beta`, and the reward model's scores. One JSON object
//! per pair with `--json` (scripts/preference_check.py compares them with transformers + PEFT).

use super::common::ModelArgs;
use crate::data::preference::Pair;
use crate::preference::logps::pair_logps;
use crate::preference::losses::{dpo_losses, DpoLoss};
use crate::rewards::RewardModel;
use anyhow::{Context, Result};
use candle_core::Tensor;
use rlft_policies::ForwardCtx;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A JSONL or parquet file of preference pairs (the shapes of `rlft dpo`'s data.train_file).
    #[arg(long)]
    pub data: PathBuf,
    /// A reward model to score both sequences: a `…ForSequenceClassification` folder or an
    /// `rlft rm` adapter (on its base_model_name_or_path).
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// The base model of a reward-model adapter (default: its base_model_name_or_path).
    #[arg(long, requires = "reward_model")]
    pub reward_base: Option<PathBuf>,
    /// β of the DPO losses and implicit rewards.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Pairs longer than this are truncated as `rlft dpo` truncates them (default: the
    /// model's positions).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// One JSON object per pair.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (pre, adapter) = args.model.load()?;
    let model = pre.model.as_ref();
    let max_len = match args.max_seq_len {
        Some(n) => crate::train::stage::max_len(n, model),
        None => model.info().max_positions,
    };
    let pairs =
        crate::preference::load_pairs(&args.data.as_path().into(), &pre.tokenizer, max_len)?;
    let rm = match &args.reward_model {
        Some(p) => {
            let mut o = serde_json::Map::new();
            o.insert("path".into(), json!(p.display().to_string()));
            o.insert("input".into(), json!("ids"));
            if let Some(b) = &args.reward_base {
                o.insert("base".into(), json!(b.display().to_string()));
            }
            Some(
                RewardModel::new(&rlft_reward::Options::new("model", o))
                    .with_context(|| format!("loading reward model {}", p.display()))?,
            )
        }
        None => None,
    };
    let pad = pre.tokenizer.pad_or_eos();
    let policy = ForwardCtx::inference(adapter.as_ref());
    let reference = ForwardCtx::inference(None);
    let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_vec1()?) };
    for (i, p) in pairs.iter().enumerate() {
        let one: [&Pair; 1] = [p];
        let mut out = json!({
            "pair": i,
            "prompt_ids": p.prompt,
            "chosen_ids": p.chosen,
            "rejected_ids": p.rejected,
        });
        let mut sums = Vec::new();
        for (name, ctx) in [("policy", &policy), ("reference", &reference)] {
            for (suffix, average) in [("", false), ("_mean", true)] {
                let (c, r) = pair_logps(model, &one, ctx, pad, average)?;
                out[format!("{name}_logps{suffix}")] = json!([v(&c)?[0], v(&r)?[0]]);
                sums.push((c, r));
            }
        }
        // sums: policy sum, policy mean, reference sum, reference mean.
        for kind in [DpoLoss::Sigmoid, DpoLoss::Hinge, DpoLoss::Ipo] {
            let (pi, re) = if kind.averages_log_probs() {
                (&sums[1], &sums[3])
            } else {
                (&sums[0], &sums[2])
            };
            let l = dpo_losses(kind, args.beta, 0.0, (&pi.0, &pi.1), (&re.0, &re.1))?;
            out[format!("dpo_loss_{kind:?}").to_lowercase()] = json!(v(&l)?[0]);
        }
        if let Some(rm) = &rm {
            let s = rm.score_ids(&[p.chosen_ids(), p.rejected_ids()])?;
            out["rm_scores"] = json!(s);
        }
        if args.json {
            println!("{out}");
        } else {
            println!(
                "pair {i}: policy log-probs {} reference {}{}",
                out["policy_logps"],
                out["reference_logps"],
                out.get("rm_scores")
                    .map(|s| format!(", reward-model scores {s}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
