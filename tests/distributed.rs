//! Data parallelism without MPI: N ranks as threads of this process (`dist::threads`) train
//! what one process trains with N times the per-rank batch (docs/distributed.md), resume
//! bit-identically, and refuse a resume on another number of ranks. tests/mpi.rs runs the
//! same under `mpirun` with the `mpi` feature.

mod common;
use common::*;
use rlft::config::{self, sft::SftConfig};
use rlft::dist::{self, threads::ThreadGroup, Collective};
use rlft::policies::candle_core::{safetensors, DType, Device};
use rlft::sft::{run, RunOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Runs `f(rank)` on `n` in-process ranks; a rank that fails releases the others.
fn on_ranks<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> anyhow::Result<T> + Send + Sync + 'static,
) -> Vec<anyhow::Result<T>> {
    let f = Arc::new(f);
    let handles: Vec<_> = ThreadGroup::new(n)
        .into_iter()
        .enumerate()
        .map(|(rank, g)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let world: Arc<dyn Collective> = g.clone();
                let out = dist::with_world(world, || f(rank));
                if out.is_err() {
                    g.abort(1);
                }
                out
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn sft_data(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..24u32 {
        let (a, b) = ((i * 7) % 41, (i * 13) % 37);
        s +=
            &serde_json::json!({"prompt": format!("{a}+{b}="), "completion": format!("{}", a + b)})
                .to_string();
        s.push('\n');
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

/// SFT on the Llama fixture: 6 steps of `accum` × `batch` examples per rank, an evaluation
/// every 3 steps on the training file.
fn sft_config(dir: &Path, batch: usize, accum: usize, extra: &[&str]) -> SftConfig {
    let train = sft_data(dir);
    let mut sets = vec![
        format!("model.path={:?}", fixture("llama").display().to_string()),
        format!("data.train_file={:?}", train.display().to_string()),
        format!("data.eval_file={:?}", train.display().to_string()),
        format!(
            "training.output_dir={:?}",
            dir.join("out").display().to_string()
        ),
        "training.learning_rate=5e-3".into(),
        "training.max_steps=6".into(),
        format!("training.per_device_train_batch_size={batch}"),
        format!("training.gradient_accumulation_steps={accum}"),
        "training.eval_steps=3".into(),
        "training.logging_steps=1".into(),
        "training.lr_scheduler=\"constant\"".into(),
        "adapter.target_modules=\"all-linear\"".into(),
        // Dropout draws one stream per rank: the runs would differ by their masks.
        "adapter.lora_dropout=0.0".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

fn quiet(resume: Option<&str>) -> RunOptions {
    RunOptions {
        resume: resume.map(String::from),
        quiet: true,
    }
}

fn tensors(path: &Path) -> Vec<(String, Vec<f64>)> {
    let t = safetensors::load(path, &Device::Cpu).unwrap();
    let mut v: Vec<_> = t
        .into_iter()
        .map(|(k, x)| {
            let x = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            (k, x.to_vec1().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Each tensor within `rel` of `a`'s in norm: ‖a − b‖₂ ≤ rel · ‖a‖₂.
fn assert_close(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let err = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f64>()
            .sqrt();
        assert!(
            err <= rel * norm,
            "{what} {name}: ‖Δ‖ {err:e}, ‖a‖ {norm:e}"
        );
    }
}

fn series(dir: &Path, key: &str) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|r| r[key].as_f64())
        .collect()
}

/// Two ranks with half the per-rank batch train the one-process run: losses, evaluation and
/// adapter within 1e-5 relative (f32), with and without gradient accumulation; rank 0 alone
/// writes the run folder.
#[test]
fn two_ranks_train_what_one_process_trains_with_twice_the_batch() {
    for accum in [1, 2] {
        let one = TempDir::new(&format!("dp-one-{accum}"));
        if let Err(e) = run(&sft_config(&one.0, 4, accum, &[]), &quiet(None)) {
            panic!("{e:?}");
        }
        let two = TempDir::new(&format!("dp-two-{accum}"));
        let dir = two.0.clone();
        let outs = on_ranks(2, move |_| {
            run(&sft_config(&dir, 2, accum, &[]), &quiet(None))
        });
        for o in outs {
            o.unwrap();
        }
        let adapter = |d: &Path| tensors(&d.join("out/adapter/adapter_model.safetensors"));
        assert_close(&adapter(&one.0), &adapter(&two.0), 1e-5, "adapter");
        for key in ["train/loss", "eval/loss"] {
            let (a, b) = (series(&one.0, key), series(&two.0, key));
            assert!(!a.is_empty() && a.len() == b.len(), "{key}: {a:?} vs {b:?}");
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs(),
                    "accum {accum} {key}: {a:?} vs {b:?}"
                );
            }
        }
        // One metrics line per step (rank 0's), not two.
        assert_eq!(series(&two.0, "train/loss").len(), 6);
    }
}

/// A two-rank run resumed on two ranks from its checkpoint ends bit-identical to the
/// uninterrupted one; resuming it on one rank is refused, naming the ranks.
#[test]
fn two_rank_runs_resume_exactly_and_only_on_two_ranks() {
    let whole = TempDir::new("dp-whole");
    let dir = whole.0.clone();
    for o in on_ranks(2, move |_| {
        run(
            &sft_config(&dir, 2, 1, &["training.save_steps=3"]),
            &quiet(None),
        )
    }) {
        o.unwrap();
    }
    let resumed = TempDir::new("dp-resumed");
    copy_dir(
        &whole.0.join("out/checkpoint-3"),
        &resumed.0.join("out/checkpoint-3"),
    );
    let dir = resumed.0.clone();
    for o in on_ranks(2, move |_| {
        run(
            &sft_config(&dir, 2, 1, &["training.save_steps=3"]),
            &quiet(Some("latest")),
        )
    }) {
        o.unwrap();
    }
    let file = "out/adapter/adapter_model.safetensors";
    assert!(
        std::fs::read(whole.0.join(file)).unwrap() == std::fs::read(resumed.0.join(file)).unwrap(),
        "the resumed two-rank run differs"
    );
    let one = TempDir::new("dp-resume-one");
    copy_dir(
        &whole.0.join("out/checkpoint-3"),
        &one.0.join("out/checkpoint-3"),
    );
    let err = run(
        &sft_config(&one.0, 2, 1, &["training.save_steps=3"]),
        &quiet(Some("latest")),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("2 rank(s)") && msg.contains("this run has 1"),
        "{msg}"
    );
}
