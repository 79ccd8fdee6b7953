//! Kills and interrupts: SIGTERM finishes the step, checkpoints and exits 0; SIGKILL at any
//! moment leaves only complete checkpoints; either way `--resume` ends bit-identical to an
//! uninterrupted run (CPU).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let rows: String = (0..40u32)
        .map(|i| format!("{}\n", serde_json::json!({"prompt": format!("{}+{}=", i % 13, i % 7), "completion": format!("{}", i % 13 + i % 7)})))
        .collect();
    std::fs::write(&p, rows).unwrap();
    p
}

fn sft(out: &Path, train: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["sft", "--config", "configs/sft.toml", "--quiet"])
        .arg(format!(
            "--set=data.train_file={:?}",
            train.display().to_string()
        ))
        .arg(format!(
            "--set=training.output_dir={:?}",
            out.display().to_string()
        ))
        .args([
            "--set=training.max_steps=300",
            "--set=training.save_steps=7",
            "--set=training.save_total_limit=1000",
            "--set=training.logging_steps=1",
            "--set=adapter.lora_dropout=0.1",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|s| s.matches("train/loss").count())
        .unwrap_or(0)
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn sigterm_checkpoints_and_resume_is_bit_identical() {
    let tmp = TempDir::new("sigterm");
    let train = data(&tmp.0);
    let full = tmp.0.join("full");
    let o = sft(&full, &train, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let out = tmp.0.join("interrupted");
    let child = sft(&out, &train, &[]).spawn().unwrap();
    wait_for("a few logged steps", Duration::from_secs(60), || {
        logged_steps(&out) >= 10
    });
    signal(&child, "-TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let msg = String::from_utf8_lossy(&o.stdout);
    assert!(
        msg.contains("interrupted after step") && msg.contains("--resume"),
        "{msg}"
    );
    let steps = complete_checkpoints(&out);
    let last = *steps.last().unwrap();
    assert!(
        last < 300 && last >= 10,
        "checkpoint at the interrupted step: {steps:?}"
    );
    assert!(
        !out.join("adapter").exists(),
        "no final adapter from an interrupted run"
    );

    let o = sft(&out, &train, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        adapter(&out) == adapter(&full),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn sigkill_leaves_only_complete_checkpoints_and_resume_is_bit_identical() {
    let tmp = TempDir::new("sigkill");
    let train = data(&tmp.0);
    let full = tmp.0.join("full");
    let o = sft(&full, &train, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for (i, after) in [3usize, 17, 40].into_iter().enumerate() {
        let out = tmp.0.join(format!("killed-{i}"));
        let child = sft(&out, &train, &[]).spawn().unwrap();
        wait_for("logged steps", Duration::from_secs(60), || {
            logged_steps(&out) >= after
        });
        let mut child = child;
        signal(&child, "-KILL");
        let _ = child.wait();
        // Only complete checkpoints carry the checkpoint-N name.
        let steps = complete_checkpoints(&out);
        let o = sft(
            &out,
            &train,
            if steps.is_empty() { &[] } else { &["--resume"] },
        )
        .output()
        .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            adapter(&out) == adapter(&full),
            "kill after {after} steps: resumed run differs"
        );
    }
}

/// SIGKILL inside a checkpoint write (the writer pauses after the weights, so the kill
/// lands mid-write): the partial folder never carries a checkpoint name, and resuming from
/// the previous complete one still ends bit-identical.
#[test]
fn sigkill_inside_a_checkpoint_write_leaves_no_partial_checkpoint() {
    let tmp = TempDir::new("sigkill-write");
    let train = data(&tmp.0);
    let full = tmp.0.join("full");
    let o = sft(&full, &train, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.0.join("killed");
    let mut child = sft(&out, &train, &[])
        .env("RLFT_CHECKPOINT_PAUSE_MS", "400")
        .spawn()
        .unwrap();
    // The second checkpoint's temporary folder: step 14.
    let partial = out.join(".checkpoint-14.tmp");
    wait_for(
        "the second checkpoint write",
        Duration::from_secs(60),
        || partial.join("adapter_model.safetensors").is_file(),
    );
    signal(&child, "-KILL");
    let _ = child.wait();
    assert!(partial.is_dir(), "killed while writing");
    assert_eq!(
        complete_checkpoints(&out),
        vec![7],
        "only the complete checkpoint counts"
    );
    let o = sft(&out, &train, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !partial.exists(),
        "the partial folder is cleared when that step is written again"
    );
    assert!(adapter(&out) == adapter(&full), "resumed run differs");
}

fn ppo(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["ppo", "--config", "configs/ppo.toml", "--quiet"])
        .arg(format!(
            "--set=training.output_dir={:?}",
            out.display().to_string()
        ))
        .args([
            "--set=training.max_steps=24",
            "--set=training.save_steps=3",
            "--set=training.save_total_limit=100",
            "--set=adapter.lora_dropout=0.1",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn rl_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|s| s.matches("objective/scores").count())
        .unwrap_or(0)
}

/// PPO (sampling, a value head, the adaptive pieces of a step) killed at two points, one of
/// them inside a checkpoint write, resumes to the uninterrupted run's adapter and value head.
#[test]
fn sigkill_of_a_ppo_run_resumes_bit_identically() {
    let tmp = TempDir::new("sigkill-ppo");
    let full = tmp.0.join("full");
    let o = ppo(&full, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |d: &Path| {
        (
            std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap(),
            std::fs::read(d.join("value_head.safetensors")).unwrap(),
        )
    };
    for (i, pause) in [(0, None), (1, Some("300"))] {
        let out = tmp.0.join(format!("killed-{i}"));
        let mut cmd = ppo(&out, &[]);
        if let Some(ms) = pause {
            cmd.env("RLFT_CHECKPOINT_PAUSE_MS", ms);
        }
        let mut child = cmd.spawn().unwrap();
        match pause {
            None => wait_for("a few RL steps", Duration::from_secs(60), || {
                rl_steps(&out) >= 7
            }),
            Some(_) => wait_for("a checkpoint write", Duration::from_secs(60), || {
                out.join(".checkpoint-6.tmp/adapter_model.safetensors")
                    .is_file()
            }),
        }
        signal(&child, "-KILL");
        let _ = child.wait();
        let o = ppo(&out, &["--resume"]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            read(&out) == read(&full),
            "kill {i}: resumed PPO run differs"
        );
    }
}

/// `rlft rm` and `rlft dpo` take SIGTERM as every stage does: a checkpoint at the step
/// reached, exit 0, and a resumed run bit-identical to one never stopped.
#[test]
fn preference_stages_checkpoint_on_sigterm_and_resume_bit_identically() {
    for stage in ["rm", "dpo"] {
        let tmp = TempDir::new("pref-sigterm");
        let run = |out: &Path, extra: &[&str]| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
            c.current_dir(env!("CARGO_MANIFEST_DIR"))
                .args([
                    stage,
                    "--config",
                    &format!("configs/{stage}.toml"),
                    "--quiet",
                ])
                .arg(format!(
                    "--set=training.output_dir={:?}",
                    out.display().to_string()
                ))
                .args([
                    "--set=training.max_steps=400",
                    "--set=training.save_steps=7",
                    "--set=training.save_total_limit=1000",
                    "--set=training.logging_steps=1",
                    "--set=training.eval_steps=0",
                    "--set=adapter.lora_dropout=0.1",
                ])
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c
        };
        let full = tmp.0.join("full");
        let o = run(&full, &[]).output().unwrap();
        assert!(o.status.success(), "{stage}: {}", stderr(&o));
        let out = tmp.0.join("interrupted");
        let child = run(&out, &[]).spawn().unwrap();
        wait_for("a few logged steps", Duration::from_secs(60), || {
            logged_steps(&out) >= 10
        });
        signal(&child, "-TERM");
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{stage}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stdout).contains("interrupted after step"));
        let last = *complete_checkpoints(&out).last().unwrap();
        assert!(
            (10..400).contains(&last),
            "{stage}: checkpoint at step {last}"
        );
        let o = run(&out, &["--resume"]).output().unwrap();
        assert!(o.status.success(), "{stage}: {}", stderr(&o));
        assert!(
            adapter(&out) == adapter(&full),
            "{stage}: the resumed run differs"
        );
    }
}
