//! Reliability, run against the real binary (issue 8): bad inputs, each of which must exit
//! non-zero with a message naming the file/key/line and never panic — one `#[test]` per case,
//! grouped by category (one module each, e.g. `cargo test --release --test reliability
//! config::unknown_key -- --exact` runs one) — and failures mid-run (`mid_run`): a disk that
//! fills, NaN rewards and an overflowing learning rate. Kills and interrupts are in
//! tests/interrupt.rs.

#[path = "../common/mod.rs"]
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `bad_input!(name, |d| case)`: a test that builds `case` in a fresh temporary folder `d` and
/// checks it (see [`check`]).
macro_rules! bad_input {
    ($name:ident, |$d:ident| $case:expr) => {
        #[test]
        fn $name() {
            let tmp = $crate::common::TempDir::new(concat!("bad-", stringify!($name)));
            let $d: &std::path::Path = &tmp.0;
            $crate::check($case);
        }
    };
}

mod adapter;
mod cli;
mod config;
mod data;
mod memory;
mod mid_run;
mod model;
mod output;
mod preference;
mod prompts;
mod rewards;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .env_remove("RLFT_MEMORY_LIMIT_MB")
        .stdin(Stdio::null());
    c
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// One bad input: the command line (after `rlft`), extra environment, and the pieces the
/// error must contain.
struct Case {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    want: Vec<String>,
}

fn case(name: &'static str, args: Vec<String>, want: &[&str]) -> Case {
    Case {
        name,
        args,
        env: vec![],
        want: want.iter().map(|s| s.to_string()).collect(),
    }
}

fn sft(out: &Path, sets: &[String]) -> Vec<String> {
    let mut a: Vec<String> = ["sft", "--config", "configs/sft.toml", "--quiet"]
        .map(String::from)
        .to_vec();
    a.push(format!("--set=training.output_dir={}", q(out)));
    a.push("--set=training.max_steps=2".into());
    a.extend(sets.iter().map(|s| format!("--set={s}")));
    a
}

fn ppo(out: &Path, sets: &[String]) -> Vec<String> {
    let mut a: Vec<String> = ["ppo", "--config", "configs/ppo.toml", "--quiet"]
        .map(String::from)
        .to_vec();
    a.push(format!("--set=training.output_dir={}", q(out)));
    a.extend(
        [
            "training.max_steps=1",
            "rl.batch_size=8",
            "rl.num_mini_batches=1",
            "training.per_device_train_batch_size=8",
        ]
        .map(|s| format!("--set={s}")),
    );
    a.extend(sets.iter().map(|s| format!("--set={s}")));
    a
}

fn s(x: &str) -> String {
    x.to_string()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A copy of the llama fixture with `edit` applied.
fn broken_model(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let p = dir.join(name);
    copy_dir(&fixture("llama"), &p);
    edit(&p);
    p
}

/// A Python reward over the `command` protocol with `body` computing `scores` from `n`.
fn py_reward(dir: &Path, name: &str, body: &str) -> String {
    let p = write(
        dir,
        name,
        format!(
            "import sys, json, time\nfor line in sys.stdin:\n    n = len(json.loads(line)['samples'])\n{body}\n    print(json.dumps({{'scores': scores}}), flush=True)\n"
        )
        .as_bytes(),
    );
    format!(
        "reward=[{{name = \"command\", cmd = [\"python3\", {}], timeout_s = 2}}]",
        q(&p)
    )
}

fn train_file(p: &Path) -> String {
    format!("data.train_file={}", q(p))
}

fn prompt_file(p: &Path) -> String {
    format!("data.prompt_file={}", q(p))
}

fn model_path(p: &Path) -> String {
    format!("model.path={}", q(p))
}

/// The run folder the cases point `training.output_dir` at.
fn out(d: &Path) -> PathBuf {
    d.join("out")
}

fn run(c: &Case) -> Output {
    let mut cmd = bin();
    cmd.args(&c.args);
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Runs one bad input: it must exit non-zero (not by a signal), never panic, and its stderr
/// must contain every wanted piece.
fn check(c: Case) {
    let o = run(&c);
    let err = stderr(&o);
    let problems: Vec<String> = [
        (o.status.success()).then(|| "exited 0".to_string()),
        (o.status.code().is_none()).then(|| "killed by a signal".to_string()),
        (err.contains("panicked") || err.contains("RUST_BACKTRACE"))
            .then(|| "panicked".to_string()),
    ]
    .into_iter()
    .flatten()
    .chain(
        c.want
            .iter()
            .filter(|w| !err.contains(w.as_str()))
            .map(|w| format!("stderr lacks `{w}`")),
    )
    .collect();
    assert!(
        problems.is_empty(),
        "{}: {}\n--- stderr:\n{err}",
        c.name,
        problems.join("; ")
    );
}
