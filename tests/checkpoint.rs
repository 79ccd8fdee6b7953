//! Checkpoint manifests, through the binary: `manifest.json` lists every file of a
//! checkpoint (subfolders included) with its size and SHA-256; `--resume` skips a damaged
//! newest checkpoint for the one before it, naming the checkpoint and the file, and still
//! ends bit-identical to an uninterrupted run; `--resume PATH` of a damaged one is refused;
//! a checkpoint from before manifests resumes with a warning.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// SFT on the bundled config: 8 steps, a checkpoint every 4 (dropout on, so the RNG
/// position matters on resume).
fn sft(out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["sft", "--config", "configs/sft.toml", "--quiet"])
        .arg(format!("--set=training.output_dir={}", q(out)))
        .args([
            "--set=training.max_steps=8",
            "--set=training.save_steps=4",
            "--set=training.save_total_limit=10",
            "--set=training.logging_steps=1",
            "--set=adapter.lora_dropout=0.1",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Halves a file.
fn truncate(p: &Path) -> (usize, usize) {
    let b = std::fs::read(p).unwrap();
    std::fs::write(p, &b[..b.len() / 2]).unwrap();
    (b.len() / 2, b.len())
}

/// A finished run with checkpoints 4 and 8; returns (run folder, its final adapter).
fn finished_run(tmp: &TempDir) -> (PathBuf, Vec<u8>) {
    let out = tmp.0.join("run");
    let o = sft(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(complete_checkpoints(&out), [4, 8]);
    let a = adapter(&out);
    (out, a)
}

#[test]
fn resume_skips_a_damaged_newest_checkpoint_and_ends_bit_identical() {
    let tmp = TempDir::new("ckpt-damaged");
    let (out, uninterrupted) = finished_run(&tmp);
    let (now, was) = truncate(&out.join("checkpoint-8/adapter_model.safetensors"));
    std::fs::remove_dir_all(out.join("adapter")).unwrap();

    let o = bin()
        .env("RUST_LOG", "info")
        .args(["sft", "--config", "configs/sft.toml", "--quiet"])
        .arg(format!("--set=training.output_dir={}", q(&out)))
        .args([
            "--set=training.max_steps=8",
            "--set=training.save_steps=4",
            "--set=training.save_total_limit=10",
            "--set=training.logging_steps=1",
            "--set=adapter.lora_dropout=0.1",
            "--resume",
        ])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "skipping checkpoint-8: adapter_model.safetensors is {now} bytes, the manifest says {was}"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "resuming from {}",
            out.join("checkpoint-4").display()
        )),
        "{err}"
    );
    assert!(
        adapter(&out) == uninterrupted,
        "the run resumed from checkpoint-4 differs from the uninterrupted one"
    );
    // Step 8 was written again, whole.
    let o = sft(&out, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("skipping"), "{}", stderr(&o));
}

#[test]
fn resume_of_a_damaged_checkpoint_by_path_names_the_file() {
    let tmp = TempDir::new("ckpt-path");
    let (out, _) = finished_run(&tmp);
    let ckpt = out.join("checkpoint-8");
    // Same size, different bytes: only the hash can tell.
    let p = ckpt.join("optimizer.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&p, b).unwrap();

    let resume = format!("--resume={}", ckpt.display());
    let o = sft(&out, &[&resume]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(&format!("--resume {}", ckpt.display()))
            && err.contains("optimizer.safetensors: SHA-256 mismatch"),
        "{err}"
    );
    // Not silently another checkpoint: nothing was trained.
    assert!(!err.contains("checkpoint-4"), "{err}");

    // With every checkpoint damaged, `--resume` lists what it tried.
    truncate(&out.join("checkpoint-4/trainer_state.json"));
    let o = sft(&out, &["--resume"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("no checkpoint in")
            && err.contains("checkpoint-8: optimizer.safetensors: SHA-256 mismatch")
            && err.contains("checkpoint-4: trainer_state.json is"),
        "{err}"
    );
}

/// Every file under `dir`, recursively, as relative path → (size, SHA-256 hex).
fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, (u64, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let rel = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            walk(&e.path(), &format!("{rel}/"), out);
        } else {
            let bytes = std::fs::read(e.path()).unwrap();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            out.insert(rel, (bytes.len() as u64, hex));
        }
    }
}

#[test]
fn the_manifest_lists_every_file_with_its_size_and_sha256() {
    let tmp = TempDir::new("ckpt-manifest");
    let out = tmp.0.join("ppo");
    // PPO with a separate critic: a `critic/` subfolder and the value head.
    let o = bin()
        .args(["ppo", "--config", "configs/ppo.toml", "--quiet"])
        .arg(format!("--set=training.output_dir={}", q(&out)))
        .args([
            "--set=training.max_steps=1",
            "--set=rl.batch_size=8",
            "--set=rl.num_mini_batches=1",
            "--set=training.per_device_train_batch_size=8",
            "--set=rl.critic=\"separate\"",
            "--set=data.eval_file=\"\"",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = out.join("checkpoint-1");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["version"], 1);
    let listed: BTreeMap<String, (u64, String)> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                (
                    f["bytes"].as_u64().unwrap(),
                    f["sha256"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    let mut on_disk = BTreeMap::new();
    walk(&ckpt, "", &mut on_disk);
    on_disk.remove("manifest.json");
    assert_eq!(listed, on_disk);
    for f in [
        "trainer_state.json",
        "optimizer.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
        "critic/adapter_model.safetensors",
        "critic/adapter_config.json",
    ] {
        assert!(listed.contains_key(f), "{f} not listed: {listed:?}");
    }
    assert!(
        listed.keys().any(|k| k.contains("value_head")),
        "value head not listed: {listed:?}"
    );
}

#[test]
fn a_checkpoint_from_before_manifests_resumes_with_a_warning() {
    let tmp = TempDir::new("ckpt-old");
    let (out, uninterrupted) = finished_run(&tmp);
    // checkpoint-4 as an older rlft wrote it; no checkpoint-8.
    let c4 = out.join("checkpoint-4");
    std::fs::remove_file(c4.join("manifest.json")).unwrap();
    let sp = c4.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("manifest").unwrap();
    std::fs::write(&sp, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-8")).unwrap();
    std::fs::remove_dir_all(out.join("adapter")).unwrap();

    let o = sft(&out, &["--resume"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("checkpoint-4: no manifest.json") && err.contains("could not be verified"),
        "{err}"
    );
    assert!(adapter(&out) == uninterrupted);

    // Its manifest deleted from a checkpoint that had one: damaged, not "older".
    std::fs::remove_file(out.join("checkpoint-8/manifest.json")).unwrap();
    let resume = format!("--resume={}", out.join("checkpoint-8").display());
    let o = sft(&out, &[&resume]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("manifest.json is missing"), "{err}");
}
