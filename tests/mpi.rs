//! The `mpi` build under `mpirun -n 2` (`.ci/run`: `cargo test --release --features mpi
//! --test mpi`): two ranks train what one process trains with twice the per-rank batch,
//! resume bit-identically on two ranks and refuse one, a killed rank stops the run with the
//! last checkpoint intact, and `--version` says the build has MPI. Needs Open MPI's
//! `mpirun`; as root, Open MPI also needs `OMPI_ALLOW_RUN_AS_ROOT=1` and
//! `OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1` (set here).
#![cfg(feature = "mpi")]

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let rows: String = (0..24u32)
        .map(|i| {
            let (a, b) = ((i * 7) % 41, (i * 13) % 37);
            format!("{}\n", serde_json::json!({"prompt": format!("{a}+{b}="), "completion": format!("{}", a + b)}))
        })
        .collect();
    std::fs::write(&p, rows).unwrap();
    p
}

/// `rlft` on `ranks` ranks (`mpirun -n ranks --oversubscribe`, or the binary alone for 0),
/// allowed to run as root, logging warnings only.
fn launch(ranks: usize) -> Command {
    let bin = env!("CARGO_BIN_EXE_rlft");
    let mut c = if ranks == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-n", &ranks.to_string(), "--oversubscribe", bin]);
        c
    };
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `rlft sft` on the Llama fixture, on `ranks` ranks ([`launch`]), `batch` examples per
/// rank.
fn sft(ranks: usize, dir: &Path, batch: usize, extra: &[&str]) -> Command {
    let mut c = launch(ranks);
    let train = data(dir);
    c.args(["sft", "--quiet"])
        .arg(format!(
            "--set=model.path={:?}",
            fixture("llama").display().to_string()
        ))
        .arg(format!(
            "--set=data.train_file={:?}",
            train.display().to_string()
        ))
        .arg(format!(
            "--set=training.output_dir={:?}",
            dir.join("out").display().to_string()
        ))
        .args([
            "--set=training.learning_rate=5e-3",
            "--set=training.max_steps=6",
            &format!("--set=training.per_device_train_batch_size={batch}"),
            "--set=training.logging_steps=1",
            "--set=training.lr_scheduler=\"constant\"",
            "--set=adapter.target_modules=\"all-linear\"",
            "--set=adapter.lora_dropout=0.0",
        ])
        .args(extra);
    c
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    o
}

#[test]
fn the_build_says_it_has_mpi() {
    let o = ok(rlft(&["--version"]));
    assert!(stdout(&o).contains("mpi: yes"), "{}", stdout(&o));
}

/// `mpirun -n 2` with 2 examples per rank trains the one-process run with 4: losses within
/// 1e-5 and the adapter within 3e-5 relative (f32: the runs sum the gradients in different
/// orders, and Adam's √v amplifies the rounding over six steps, as in tests/distributed.rs);
/// one metrics line per step, one summary line.
#[test]
fn two_mpi_ranks_train_what_one_process_trains() {
    let one = TempDir::new("mpi-one");
    ok(sft(0, &one.0, 4, &[]).output().unwrap());
    let two = TempDir::new("mpi-two");
    let o = ok(sft(2, &two.0, 2, &[]).output().unwrap());
    assert_eq!(
        stdout(&o).matches("sft: 6 steps").count(),
        1,
        "{}",
        stdout(&o)
    );
    assert_eq!(metric(&two.0, "train/loss").len(), 6);
    assert_series_close(&one.0, &two.0, "train/loss", 1e-5, 0.0, "sft");
    let adapter = |d: &Path| tensors(&d.join("out/adapter/adapter_model.safetensors"));
    const TOL: f64 = 3e-5;
    assert_tensors_close(&adapter(&one.0), &adapter(&two.0), TOL, "adapter");
    // The bound tells a right run from a wrong one: one rank's half of each batch alone
    // (what a lost all-reduce would train) lands 100× beyond it.
    let half = TempDir::new("mpi-half");
    ok(sft(0, &half.0, 2, &[]).output().unwrap());
    let worst = max_relative_diff(&adapter(&one.0), &adapter(&half.0));
    assert!(
        worst > 100.0 * TOL,
        "half a batch differs by only {worst:e}"
    );
}

/// Resumed on two ranks from its checkpoint, a two-rank run ends bit-identical to the
/// uninterrupted one; on one rank the resume is refused.
#[test]
fn an_mpi_run_resumes_exactly_on_as_many_ranks() {
    let save = ["--set=training.save_steps=3"];
    let whole = TempDir::new("mpi-whole");
    ok(sft(2, &whole.0, 2, &save).output().unwrap());
    let resumed = TempDir::new("mpi-resumed");
    copy_dir(
        &whole.0.join("out/checkpoint-3"),
        &resumed.0.join("out/checkpoint-3"),
    );
    let mut args = save.to_vec();
    args.extend(["--resume", "latest"]);
    ok(sft(2, &resumed.0, 2, &args).output().unwrap());
    let f = "out/adapter/adapter_model.safetensors";
    assert!(
        std::fs::read(whole.0.join(f)).unwrap() == std::fs::read(resumed.0.join(f)).unwrap(),
        "the resumed run differs"
    );
    let single = TempDir::new("mpi-resume-one");
    copy_dir(
        &whole.0.join("out/checkpoint-3"),
        &single.0.join("out/checkpoint-3"),
    );
    let o = sft(0, &single.0, 2, &args).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("resume it on 2"), "{}", stderr(&o));
}

/// The process of `rank` under an `mpirun` whose ranks run `bin` with `tag` in their
/// arguments (tests run at once: each kills its own run's rank).
fn rank_pid(bin: &str, rank: usize, tag: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()? {
        let Ok(pid) = e.ok()?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        if exe.as_deref() != Some(Path::new(bin)) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(tag) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// SIGKILL of rank 1 mid-run: `mpirun` stops rank 0 too and fails, naming the killed rank;
/// every checkpoint folder left is complete.
#[test]
fn a_killed_rank_stops_the_run_and_leaves_complete_checkpoints() {
    let tmp = TempDir::new("mpi-kill");
    let child = sft(
        2,
        &tmp.0,
        2,
        &[
            "--set=training.max_steps=100000",
            "--set=training.save_steps=5",
            "--set=training.save_total_limit=1000",
        ],
    )
    .spawn()
    .unwrap();
    let out = tmp.0.join("out");
    let t0 = Instant::now();
    while !out.join("checkpoint-10").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint-10");
        std::thread::sleep(Duration::from_millis(20));
    }
    let bin = std::fs::canonicalize(env!("CARGO_BIN_EXE_rlft")).unwrap();
    let tag = out.display().to_string();
    let pid = rank_pid(bin.to_str().unwrap(), 1, &tag).expect("rank 1's process");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        !o.status.success(),
        "mpirun must fail when a rank is killed"
    );
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        text.contains("signal 9") || text.contains("Killed"),
        "{text}"
    );
    let steps = complete_checkpoints(&out);
    assert!(
        steps.len() >= 2 && steps.iter().all(|s| s % 5 == 0),
        "{steps:?}"
    );
}

/// `rlft ppo` on two MPI ranks with greedy generation (each rank's rollouts are then those of
/// the one-process run): the same scores, and KL, losses and approx KL within 1e-4; one
/// summary line and one metrics line per step.
#[test]
fn ppo_on_two_mpi_ranks_trains_what_one_process_trains() {
    let run = |ranks: usize, dir: &Path| -> Output {
        let prompts = dir.join("prompts.jsonl");
        let rows: String = (0..48)
            .map(|i| {
                format!(
                    "{}\n",
                    serde_json::json!({"prompt": format!("{}+{}=", i * 3 % 41, i * 7 % 23)})
                )
            })
            .collect();
        std::fs::write(&prompts, rows).unwrap();
        let mut c = launch(ranks);
        c.args(["ppo", "--quiet"])
            .arg(format!(
                "--set=model.path={:?}",
                fixture("llama").display().to_string()
            ))
            .arg(format!(
                "--set=data.prompt_file={:?}",
                prompts.display().to_string()
            ))
            .arg(format!(
                "--set=training.output_dir={:?}",
                dir.join("out").display().to_string()
            ))
            .args([
                "--set=model.max_seq_len=64",
                "--set=adapter.target_modules=\"all-linear\"",
                "--set=generation.max_new_tokens=4",
                "--set=generation.top_k=1",
                "--set=rl.batch_size=16",
                "--set=rl.num_mini_batches=2",
                "--set=training.per_device_train_batch_size=4",
                "--set=training.max_steps=3",
                "--set=reward=[{name = \"regex\", pattern = '^\\s*\\d'}]",
            ]);
        ok(c.output().unwrap())
    };
    let one = TempDir::new("mpi-ppo-one");
    run(0, &one.0);
    let two = TempDir::new("mpi-ppo-two");
    let o = run(2, &two.0);
    assert_eq!(
        stdout(&o).matches("Ppo: 3 steps").count(),
        1,
        "{}",
        stdout(&o)
    );
    assert_eq!(
        metric(&one.0, "objective/scores"),
        metric(&two.0, "objective/scores")
    );
    assert_eq!(metric(&two.0, "objective/scores").len(), 3);
    for key in [
        "objective/kl",
        "loss/policy",
        "policy/approxkl",
        "val/vf_loss",
    ] {
        assert_series_close(&one.0, &two.0, key, 1e-4, 1e-2, "ppo");
    }
}
