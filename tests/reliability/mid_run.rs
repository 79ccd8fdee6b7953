//! Failures in the middle of a run: a disk that fills, NaN rewards, an overflowing learning
//! rate. Each stops (or skips an update) with a message and leaves complete checkpoints.

use super::*;
use std::process::{Command, Stdio};

fn hidden_leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".checkpoint-"))
        .collect()
}

/// A tmpfs of `size`, unmounted when dropped. None where mounting is not allowed (not root,
/// or a container without CAP_SYS_ADMIN): the disk-full tests then say so and return.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (needs root); the disk-full test did not run"
            );
        }
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 16 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn sft_long(out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["sft", "--config", "configs/sft.toml", "--quiet"])
        .arg(format!("--set=training.output_dir={}", q(out)))
        .args([
            "--set=training.max_steps=300",
            "--set=training.save_steps=5",
            "--set=training.save_total_limit=2",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_full_disk_is_caught_before_training_and_mid_run_loses_nothing() {
    let tmp = TempDir::new("disk-full");
    // Before training: a disk too small for two checkpoints of a fully trained model.
    if let Some(tiny) = SmallDisk::mount(&tmp.0.join("tiny"), "256k") {
        let o = bin()
            .args(sft(&tiny.0.join("run"), &[s("adapter.trainable=\"full\"")]))
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(
            err.contains("tiny/run") && err.contains("MiB free") && err.contains("output_dir"),
            "{err}"
        );
        assert!(
            !tiny.0.join("run").join("metrics.jsonl").exists(),
            "failed before training started"
        );
    } else {
        return;
    }
    let reference = tmp.0.join("reference");
    let o = sft_long(&reference, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // Mid-run: the disk fills after the first checkpoint.
    let disk = SmallDisk::mount(&tmp.0.join("disk"), "8m").unwrap();
    let out = disk.0.join("run");
    let mut child = sft_long(&out, &[]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("checkpoint-5").is_dir() {
        assert!(t0.elapsed().as_secs() < 60, "no first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let filler = disk.fill();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the run cannot finish on a full disk");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("the disk is full")
            && err.contains("--resume")
            && err.contains("newest complete checkpoint"),
        "{err}"
    );
    let kept = complete_checkpoints(&out);
    assert!(!kept.is_empty(), "the completed checkpoints survive");
    assert!(
        hidden_leftovers(&out).is_empty(),
        "partial checkpoint left: {:?}",
        hidden_leftovers(&out)
    );

    // Space freed: resuming reaches the adapter of the run that was never interrupted.
    std::fs::remove_file(filler).unwrap();
    let o = sft_long(&out, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let a = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a(&out) == a(&reference),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn nan_rewards_skip_the_update_and_repeated_ones_stop_the_run_with_a_checkpoint() {
    let tmp = TempDir::new("nan-reward");
    let d = &tmp.0;
    // NaN on the first training batch only (8 rollouts; the eval set has 16 prompts).
    let once = py_reward(
        d,
        "nan_once.py",
        "    global calls\n    calls = globals().get('calls', 0) + (n == 8)\n    scores = [float('nan')] * n if (n == 8 and calls == 1) else [0.5] * n",
    );
    let o = bin()
        .args(ppo(&d.join("once"), &[once, s("training.max_steps=3")]))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("step 1: reward `command` returned a non-finite score (NaN)")
            && err.contains("update skipped"),
        "{err}"
    );
    assert!(d.join("once/adapter/adapter_model.safetensors").is_file());

    // NaN every time: after max_bad_steps the run stops, keeping a complete checkpoint.
    let always = py_reward(
        d,
        "nan_always.py",
        "    scores = [float('nan') if n == 8 else 0.5] * n",
    );
    let out = d.join("always");
    let o = bin()
        .args(ppo(
            &out,
            &[
                always,
                s("training.max_steps=10"),
                s("training.max_bad_steps=3"),
            ],
        ))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("3 consecutive bad steps")
            && err.contains("NaN")
            && err.contains("last good state"),
        "{err}"
    );
    assert_eq!(err.matches("update skipped").count(), 3, "{err}");
    assert!(!complete_checkpoints(&out).is_empty());
}

#[test]
fn an_overflowing_learning_rate_is_caught_and_stops_with_a_checkpoint() {
    let tmp = TempDir::new("overflow");
    let out = tmp.0.join("run");
    let o = bin()
        .args(sft(
            &out,
            &[
                s("training.learning_rate=1e30"),
                s("training.warmup_ratio=0.0"),
                s("training.max_steps=50"),
                s("training.max_bad_steps=3"),
            ],
        ))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    // Each bad update is logged with its step and cause, then the run stops.
    assert!(
        err.contains("non-finite loss") && err.contains("update skipped"),
        "{err}"
    );
    assert!(
        err.contains("3 consecutive bad steps")
            && err.contains("a non-finite loss or gradient norm"),
        "{err}"
    );
    let kept = complete_checkpoints(&out);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        err.contains(&format!("checkpoint-{}", kept[0])),
        "the message names the checkpoint: {err}"
    );

    // The same in RL (GRPO): skipped updates, then a stop with a checkpoint.
    let out = tmp.0.join("grpo");
    let mut args: Vec<String> = ["grpo", "--config", "configs/grpo.toml", "--quiet"]
        .map(String::from)
        .to_vec();
    args.extend(
        [
            format!("training.output_dir={}", q(&out)),
            s("training.learning_rate=1e30"),
            s("training.max_bad_steps=2"),
            s("data.eval_file=\"\""),
        ]
        .map(|x| format!("--set={x}")),
    );
    let o = bin().args(&args).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("non-finite policy loss") && err.contains("update skipped"),
        "{err}"
    );
    assert!(err.contains("2 consecutive bad steps"), "{err}");
    let kept = complete_checkpoints(&out);
    let last = format!("checkpoint-{}", kept.last().unwrap());
    assert!(err.contains(&last), "{err}");
}
