//! An RL run on the fixture model, for the tests of several files.

use super::fixture;
use rlft::config::{self, rl::RlConfig};
use rlft::rl::trainer::RunOptions;
use std::path::Path;

/// A tiny task on the fixture model: the response must start with a digit.
pub fn config(dir: &Path, algorithm: &str, extra: &[&str]) -> RlConfig {
    let prompts = dir.join("prompts.jsonl");
    let rows: String = (0..48)
        .map(|i| format!("{}\n", serde_json::json!({"prompt": format!("{}+{}=", i * 3 % 41, i * 7 % 23), "answer": "0"})))
        .collect();
    super::write_atomic(&prompts, rows);
    let mut sets = vec![
        format!("model.path={:?}", fixture("llama").display().to_string()),
        "model.max_seq_len=64".into(),
        "adapter.target_modules=\"all-linear\"".into(),
        format!("data.prompt_file={:?}", prompts.display().to_string()),
        "generation.max_new_tokens=4".into(),
        format!("rl.algorithm={algorithm:?}"),
        "rl.batch_size=32".into(),
        "training.per_device_train_batch_size=16".into(),
        "training.max_steps=30".into(),
        format!(
            "training.output_dir={:?}",
            dir.join("out").display().to_string()
        ),
        "reward=[{name = \"regex\", pattern = '^\\s*\\d'}]".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

pub fn quiet() -> RunOptions {
    RunOptions {
        resume: None,
        quiet: true,
        separate_old_pass: false,
    }
}

pub fn series(m: &[serde_json::Value], key: &str) -> Vec<f64> {
    m.iter().filter_map(|r| r[key].as_f64()).collect()
}

pub fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}
