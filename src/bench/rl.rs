//! The RL workloads: W3 (PPO) and W4 (GRPO) on the small model, W7 (a GRPO step as the
//! chat recipe runs it) on a model folder, each through the trainer `rlft ppo`/`rlft grpo`
//! run, timed from its metrics.

use super::{median, random_ids};
use crate::config::{self, rl::RlConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlft_policies::Pretrained;
use serde_json::{json, Value};
use std::path::Path;

/// W3 (PPO) and W4 (GRPO): whole RL steps through `rlft ppo` / `rlft grpo` on prompts of 7
/// random tokens, 16 response tokens, the `length` reward; the median of steps after the first.
pub fn rl_step(dir: &Path, work: &Path, grpo: bool, steps: usize, device: &str) -> Result<Value> {
    let prompts = work.join("prompts.jsonl");
    let pre = Pretrained::load(dir, DType::F32, &Device::Cpu)?;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let rows: String = random_ids(&mut rng, 64, 6, pre.model.info().vocab_size)
        .iter()
        .map(|ids| {
            format!(
                "{}\n",
                json!({"prompt": pre.tokenizer.decode(ids, true).unwrap_or_default()})
            )
        })
        .collect();
    std::fs::write(&prompts, rows)?;
    let out = work.join(if grpo { "grpo" } else { "ppo" });
    let _ = std::fs::remove_dir_all(&out);
    let mut sets = vec![
        format!("model.path={:?}", dir.display().to_string()),
        format!("data.prompt_file={:?}", prompts.display().to_string()),
        format!("training.output_dir={:?}", out.display().to_string()),
        "adapter.r=4".into(),
        "adapter.lora_alpha=8".into(),
        "adapter.target_modules=[\"q_proj\", \"v_proj\"]".into(),
        "generation.max_new_tokens=16".into(),
        "generation.stop_token_ids=[]".into(),
        format!("training.max_steps={}", steps + 1),
        "training.save_steps=0".into(),
        "training.learning_rate=1e-5".into(),
        "rl.log_rollouts_every=0".into(),
        format!("model.device={device:?}"),
        "reward=[{name = \"length\", target = 8}]".into(),
    ];
    if grpo {
        sets.extend(
            [
                "rl.algorithm=\"grpo\"",
                "rl.batch_size=8",
                "rl.num_generations=4",
                "rl.kl_coef=0.04",
                "rl.num_ppo_epochs=1",
                "training.per_device_train_batch_size=8",
            ]
            .map(String::from),
        );
    } else {
        sets.extend(
            [
                "rl.batch_size=8",
                "rl.num_ppo_epochs=4",
                "rl.num_mini_batches=1",
                "training.per_device_train_batch_size=8",
            ]
            .map(String::from),
        );
    }
    let m = run_rl(&sets, &out)?;
    let med = |k: &str| median(m.iter().filter_map(|v| v[k].as_f64()).collect());
    let s = med("time/step");
    Ok(
        json!({"workload": if grpo { "W4" } else { "W3" }, "seconds_per_step": s, "tokens_per_s": null, "samples_per_s": 8.0 / s,
              "phases": {"generate": med("time/generate"), "policy": med("time/policy"), "reference": med("time/reference"),
                         "score": med("time/score"), "train": med("time/train")}}),
    )
}

/// Runs `rlft ppo`/`rlft grpo` with the `--set` overrides `sets`, quietly, into `out`, and
/// returns the metrics of its steps after the first (the warm-up).
fn run_rl(sets: &[String], out: &Path) -> Result<Vec<Value>> {
    let cfg: RlConfig = config::load(None, sets)?;
    crate::rl::trainer::run(
        &cfg,
        &crate::rewards::default_registry(),
        &crate::rl::trainer::RunOptions {
            resume: None,
            quiet: true,
            separate_old_pass: false,
        },
    )?;
    let m: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v.get("time/step").is_some() && v["step"].as_u64().unwrap_or(0) > 1)
        .collect();
    if m.is_empty() {
        bail!("no step timings in {}", out.display());
    }
    Ok(m)
}

/// W7: GRPO steps on a model folder (the real model) as the chat recipe runs them: 4 chat
/// prompts ("What is a + b?", the template's system turn included) × 8 completions of
/// exactly 24 tokens (no stop token), LoRA r = 16 on every linear layer, the `length` reward,
/// β = 0.04, one epoch of one mini-batch; the median of the steps after the first.
/// `scripts/trl_bench.py --workload W7` runs TRL's GRPOTrainer on the same settings.
pub fn w7(dir: &Path, work: &Path, steps: usize, device: &str, dtype: &str) -> Result<Value> {
    std::fs::create_dir_all(work)
        .with_context(|| format!("creating the bench's work folder {}", work.display()))?;
    let prompts = work.join("w7-prompts.jsonl");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rows: String = (0..64)
        .map(|_| {
            let (a, b) = (rng.random_range(1..50), rng.random_range(1..50));
            format!(
                "{}\n",
                json!({"prompt": [{"role": "user", "content": format!("What is {a} + {b}?")}]})
            )
        })
        .collect();
    std::fs::write(&prompts, rows).with_context(|| format!("writing {}", prompts.display()))?;
    let out = work.join("w7");
    let _ = std::fs::remove_dir_all(&out);
    let sets: Vec<String> = [
        format!("model.path={:?}", dir.display().to_string()),
        format!("model.dtype={dtype:?}"),
        format!("model.device={device:?}"),
        format!("data.prompt_file={:?}", prompts.display().to_string()),
        format!("training.output_dir={:?}", out.display().to_string()),
        "adapter.r=16".into(),
        "adapter.lora_alpha=32".into(),
        "adapter.target_modules=\"all-linear\"".into(),
        format!("generation.max_new_tokens={W7_NEW_TOKENS}"),
        "generation.stop_token_ids=[]".into(),
        "generation.temperature=1.0".into(),
        format!("training.max_steps={}", steps + 1),
        "training.save_steps=0".into(),
        "training.learning_rate=1e-5".into(),
        "training.per_device_train_batch_size=32".into(),
        "rl.log_rollouts_every=0".into(),
        "rl.algorithm=\"grpo\"".into(),
        "rl.batch_size=32".into(),
        format!("rl.num_generations={W7_GROUP}"),
        "rl.kl_coef=0.04".into(),
        "rl.num_ppo_epochs=1".into(),
        "rl.num_mini_batches=1".into(),
        "reward=[{name = \"length\", target = 8}]".into(),
    ]
    .into();
    let m = run_rl(&sets, &out)?;
    let med = |k: &str| median(m.iter().filter_map(|v| v[k].as_f64()).collect());
    let s = med("time/step");
    // Every token of every row: the padded prompts and the completions.
    let tokens = med("tokens_per_s") * s;
    // The positions the step's passes compute: each group's prompt once (shared-prompt
    // groups), every row's completion positions (up to W7_NEW_TOKENS).
    let completions = med("response/length_mean") * 32.0;
    let prompt_len = ((tokens - completions) / 32.0).max(0.0);
    let computed = prompt_len * (32 / W7_GROUP) as f64 + (32 * W7_NEW_TOKENS) as f64;
    Ok(json!({
        "workload": "W7", "seconds_per_step": s, "tokens_per_s": tokens / s,
        "samples_per_s": 32.0 / s, "batch": 32, "new_tokens": W7_NEW_TOKENS,
        "tokens_per_step": tokens, "computed_tokens_per_step": computed.round(),
        "phases": {"generate": med("time/generate"), "policy": med("time/policy"),
                   "reference": med("time/reference"), "score": med("time/score"),
                   "train": med("time/train")},
    }))
}

/// W7's completion length.
const W7_NEW_TOKENS: usize = 24;

/// W7's group size (completions per prompt).
const W7_GROUP: usize = 8;
