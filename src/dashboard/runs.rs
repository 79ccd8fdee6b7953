//! Finding runs under the folders the dashboard was given and reading their JSONL logs.
//! Only files named `metrics.jsonl`, `rollouts.jsonl` and `config.json` inside a discovered
//! run folder are ever read; a half-written last line is left for the next read.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct Run {
    /// Stable name: the folder's path relative to its root, prefixed by the root's name.
    pub name: String,
    pub dir: PathBuf,
}

fn walk(dir: &Path, rel: &str, depth: usize, out: &mut Vec<Run>) {
    if dir.join("metrics.jsonl").is_file() {
        out.push(Run {
            name: rel.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    if depth == 0 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subs: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, _)| !n.starts_with('.') && !n.starts_with("checkpoint-"))
        .collect();
    subs.sort();
    for (n, p) in subs {
        walk(&p, &format!("{rel}/{n}"), depth - 1, out);
    }
}

/// Every folder with a `metrics.jsonl` under `roots` (up to 3 levels down).
pub fn discover(roots: &[PathBuf]) -> Vec<Run> {
    let mut out = Vec::new();
    for root in roots {
        let base = root
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| root.display().to_string());
        walk(root, &base, 3, &mut out);
    }
    out
}

/// Complete JSON lines of `path` from byte `offset` on, and the offset after the last
/// complete line. Malformed lines are skipped.
pub fn read_lines(path: &Path, offset: u64) -> (Vec<Value>, u64) {
    let Ok(bytes) = std::fs::read(path) else {
        return (Vec::new(), offset);
    };
    let start = (offset as usize).min(bytes.len());
    let Some(last_nl) = bytes[start..].iter().rposition(|&b| b == b'\n') else {
        return (Vec::new(), start as u64);
    };
    let end = start + last_nl + 1;
    let rows = bytes[start..end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    (rows, end as u64)
}

/// `finished`, `failed` or `interrupted` (the run's last status line), else `running`
/// (written in the last 30 s) or `stopped`; and the last step.
pub fn status(run: &Run) -> (String, u64) {
    let metrics = run.dir.join("metrics.jsonl");
    let (rows, _) = read_lines(&metrics, 0);
    let last_step = rows
        .iter()
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0);
    let ended = rows
        .iter()
        .rev()
        .find_map(|r| r["status"].as_str().map(str::to_string));
    let fresh = std::fs::metadata(&metrics)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|d| d < Duration::from_secs(30));
    let s = match ended {
        Some(s) if s == "finished" || s == "failed" || s == "interrupted" => s,
        _ if fresh => "running".into(),
        _ => "stopped".into(),
    };
    (s, last_step)
}

/// The stage that wrote the run, from its config.
pub fn kind(config: &Value) -> &'static str {
    if config.get("rl").is_some() {
        match config["rl"]["algorithm"].as_str() {
            Some("grpo") => "grpo",
            Some("rloo") => "rloo",
            _ => "ppo",
        }
    } else if config.get("rm").is_some() {
        "rm"
    } else if config.get("dpo").is_some() {
        "dpo"
    } else if config.get("kto").is_some() {
        "kto"
    } else if config.get("data").is_some() {
        "sft"
    } else {
        "run"
    }
}

pub fn config(run: &Run) -> Value {
    std::fs::read_to_string(run.dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each stage's saved configuration names its kind (the sections only it has).
    #[test]
    fn every_stage_is_recognised_by_its_config() {
        use crate::config::{preference, rl, sft};
        let kinds = [
            (
                serde_json::to_value(sft::SftConfig::default()).unwrap(),
                "sft",
            ),
            (
                serde_json::to_value(rl::RlConfig::default()).unwrap(),
                "ppo",
            ),
            (
                serde_json::to_value(preference::RmConfig::default()).unwrap(),
                "rm",
            ),
            (
                serde_json::to_value(preference::DpoConfig::default()).unwrap(),
                "dpo",
            ),
            (
                serde_json::to_value(preference::KtoConfig::default()).unwrap(),
                "kto",
            ),
            (serde_json::json!({}), "run"),
        ];
        for (cfg, want) in kinds {
            assert_eq!(kind(&cfg), want);
        }
    }

    #[test]
    fn a_half_written_last_line_waits_for_the_next_read() {
        let dir = std::env::temp_dir().join(format!("rlft-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.jsonl");
        std::fs::write(&p, "{\"step\":1}\nnot json\n{\"step\":2}\n{\"step\":3,\"lo").unwrap();
        let (rows, off) = read_lines(&p, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(off as usize, "{\"step\":1}\nnot json\n{\"step\":2}\n".len());
        std::fs::write(
            &p,
            "{\"step\":1}\nnot json\n{\"step\":2}\n{\"step\":3,\"loss\":1}\n",
        )
        .unwrap();
        let (rows, _) = read_lines(&p, off);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["step"], 3);
        let _ = std::fs::remove_dir_all(dir);
    }
}
