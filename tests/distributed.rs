//! Data parallelism without MPI: N ranks as threads of this process (`dist::threads`) train
//! what one process trains with N times the per-rank batch (docs/distributed.md), resume
//! bit-identically, and refuse a resume on another number of ranks. tests/mpi.rs runs the
//! same under `mpirun` with the `mpi` feature.

mod common;
use common::*;
use rlft::config::{self, sft::SftConfig};
use rlft::dist::{self, threads::ThreadGroup, Collective};
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
    common::write_atomic(&p, s);
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
        // The runs sum the batch's gradients in different orders (two halves summed across
        // ranks, or one product over the whole batch); through six Adam steps, whose update
        // divides by √v, f32 rounding reaches ~1.4e-5 of a tensor's norm. A rank's share lost
        // or counted twice moves the adapter by far more (checked below).
        const TOL: f64 = 3e-5;
        assert_tensors_close(&adapter(&one.0), &adapter(&two.0), TOL, "adapter");
        for key in ["train/loss", "eval/loss"] {
            assert_series_close(&one.0, &two.0, key, 1e-5, 0.0, &format!("accum {accum}"));
        }
        // One metrics line per step (rank 0's), not two.
        assert_eq!(metric(&two.0, "train/loss").len(), 6);
        if accum == 1 {
            // The bound tells a right run from a wrong one: training on one rank's half of
            // each batch alone (what a lost all-reduce would do) lands 100× beyond it.
            let half = TempDir::new("dp-half");
            run(&sft_config(&half.0, 2, 1, &[]), &quiet(None)).unwrap();
            let worst = max_relative_diff(&adapter(&one.0), &adapter(&half.0));
            assert!(
                worst > 100.0 * TOL,
                "half a batch differs by only {worst:e}"
            );
        }
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

/// 24 pairs: the right sum chosen over a wrong one.
fn pair_sets(dir: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut s = String::new();
    for i in 0..24u32 {
        let (a, b) = ((i * 7) % 41, (i * 13) % 37);
        let wrong = if i % 2 == 0 { a + b + 1 } else { a + b + 10 };
        s += &serde_json::json!({"prompt": format!("{a}+{b}="), "chosen": (a + b).to_string(), "rejected": wrong.to_string()}).to_string();
        s.push('\n');
    }
    let data = dir.join("pairs.jsonl");
    common::write_atomic(&data, s);
    let mut sets = vec![
        format!("model.path={:?}", fixture("llama").display().to_string()),
        format!("data.train_file={:?}", data.display().to_string()),
        format!("data.eval_file={:?}", data.display().to_string()),
        format!(
            "training.output_dir={:?}",
            dir.join("out").display().to_string()
        ),
        "training.learning_rate=5e-3".into(),
        "training.max_steps=6".into(),
        format!("training.per_device_train_batch_size={batch}"),
        "training.eval_steps=3".into(),
        "training.logging_steps=1".into(),
        "training.lr_scheduler=\"constant\"".into(),
        "adapter.target_modules=\"all-linear\"".into(),
        "adapter.lora_dropout=0.0".into(),
    ];
    sets.extend(extra.iter().map(|e| e.to_string()));
    sets
}

/// The reward model and DPO on two ranks with half the per-rank batch: the one-process
/// run's losses, metrics (reward accuracy and margins, over every rank's pairs), evaluation
/// and adapter within 1e-5 relative — with SGD, whose update is the gradient's. With AdamW
/// they are held to 1e-4: Adam divides each gradient by its own magnitude, so an element
/// whose gradient is near zero moves by its f32 rounding, and the later steps' figures with
/// it.
#[test]
fn reward_model_and_dpo_on_two_ranks_equal_one_process() {
    use rlft::config::preference::{DpoConfig, RmConfig};
    use rlft::preference::{dpo, rm, RunOptions as PrefOptions};
    type Stage = fn(&Path, usize, &str) -> anyhow::Result<()>;
    let rm_run: Stage = |d, b, opt| {
        let cfg: RmConfig = config::load(None, &pair_sets(d, b, &[opt]))?;
        rm::run(
            &cfg,
            &PrefOptions {
                resume: None,
                quiet: true,
            },
        )
        .map(|_| ())
    };
    let dpo_run: Stage = |d, b, opt| {
        let cfg: DpoConfig = config::load(None, &pair_sets(d, b, &[opt]))?;
        dpo::run(
            &cfg,
            &PrefOptions {
                resume: None,
                quiet: true,
            },
        )
        .map(|_| ())
    };
    let rm_keys = [
        "train/loss",
        "accuracy",
        "margin",
        "min_reward",
        "max_reward",
        "eval/loss",
        "eval/accuracy",
    ];
    let dpo_keys = [
        "train/loss",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "eval/loss",
        "eval/rewards/margins",
    ];
    let stages: [(&str, Stage, &[&str]); 2] =
        [("rm", rm_run, &rm_keys), ("dpo", dpo_run, &dpo_keys)];
    for (opt, tol) in [("sgd", 1e-5), ("adamw", 1e-4)] {
        let opt_set: &'static str = if opt == "sgd" {
            "training.optimizer=\"sgd\""
        } else {
            "training.optimizer=\"adamw\""
        };
        for (name, stage, keys) in stages {
            let one = TempDir::new(&format!("dp-{name}-{opt}-one"));
            stage(&one.0, 4, opt_set).unwrap();
            let two = TempDir::new(&format!("dp-{name}-{opt}-two"));
            let dir = two.0.clone();
            for o in on_ranks(2, move |_| stage(&dir, 2, opt_set)) {
                o.unwrap();
            }
            let adapter = |d: &Path| tensors(&d.join("out/adapter/adapter_model.safetensors"));
            let what = format!("{name} {opt}");
            assert_tensors_close(&adapter(&one.0), &adapter(&two.0), tol, &what);
            for key in keys.iter() {
                // Floor 0.1: DPO's rewards are β × differences of summed log-probs (~30 in
                // size, an f32 ulp 2e-6), near zero at first: their rounding is ~2e-7, so
                // the allowance is 1e-6 with SGD's 1e-5 (1e-2 allowed 1e-7, which the
                // rounding alone can exceed).
                assert_series_close(&one.0, &two.0, key, tol, 0.1, &what);
            }
        }
    }
}

/// PPO and GRPO on two ranks train what one process trains on the same rollouts: greedy
/// generation (`top_k = 1`) makes every rank's rollouts those of the one-process run, so
/// scores, KL, losses, statistics (PPO's whitened advantages over the whole batch) and the
/// adapter, value head included, must agree — with two mini-batches and two epochs, whose
/// shuffled mini-batches mix both ranks' rollouts. Figures within 1e-4 relative, PPO's
/// adapter and value head too. (A greedy GRPO group's completions are alike, so its
/// advantages are 0 and its adapter moves only by the KL term's rounding-sized gradients:
/// GRPO is held to its figures.)
#[test]
fn rl_on_two_ranks_trains_what_one_process_trains_on_the_same_rollouts() {
    use common::rl_run::config as rl_config;
    for alg in ["ppo", "grpo"] {
        let sets: Vec<String> = vec![
            "generation.top_k=1".into(),
            "rl.num_mini_batches=2".into(),
            "rl.num_ppo_epochs=2".into(),
            "training.max_steps=3".into(),
            "training.per_device_train_batch_size=8".into(),
            format!("rl.num_generations={}", if alg == "grpo" { 4 } else { 1 }),
        ];
        let run_rl = move |dir: &Path| {
            let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
            let cfg = rl_config(dir, alg, &refs);
            rlft::rl::trainer::run(
                &cfg,
                &rlft::rewards::default_registry(),
                &common::rl_run::quiet(),
            )
            .map(|_| ())
        };
        let one = TempDir::new(&format!("dp-{alg}-one"));
        run_rl(&one.0).unwrap();
        let two = TempDir::new(&format!("dp-{alg}-two"));
        let dir = two.0.clone();
        let run2 = run_rl.clone();
        for o in on_ranks(2, move |_| run2(&dir)) {
            o.unwrap();
        }
        let m = |d: &Path, k: &str| metric(d, k);
        assert_eq!(
            m(&one.0, "objective/scores"),
            m(&two.0, "objective/scores"),
            "{alg}: the same rollouts"
        );
        for key in [
            "objective/kl",
            "loss/policy",
            "policy/approxkl",
            "policy/clipfrac",
            "response/length_mean",
            "val/vf_loss",
        ] {
            assert_series_close(&one.0, &two.0, key, 1e-4, 1e-2, alg);
        }
        if alg == "ppo" {
            let adapter = |d: &Path| tensors(&d.join("out/adapter/adapter_model.safetensors"));
            assert_tensors_close(&adapter(&one.0), &adapter(&two.0), 1e-4, alg);
            let head = |d: &Path| tensors(&d.join("out/value_head.safetensors"));
            assert_tensors_close(&head(&one.0), &head(&two.0), 1e-4, "value head");
        }
    }
}

/// A step's prompts that do not divide among the ranks are refused, naming the keys.
#[test]
fn rl_batches_that_do_not_split_across_ranks_are_refused() {
    use common::rl_run::config as rl_config;
    let tmp = TempDir::new("dp-rl-split");
    let dir = tmp.0.clone();
    let outs = on_ranks(2, move |_| {
        let cfg = rl_config(
            &dir,
            "grpo",
            &[
                "rl.num_generations=4",
                "rl.batch_size=12",
                "training.per_device_train_batch_size=4",
            ],
        );
        rlft::rl::trainer::run(
            &cfg,
            &rlft::rewards::default_registry(),
            &common::rl_run::quiet(),
        )
    });
    for o in outs {
        let msg = format!("{:#}", o.err().expect("refused"));
        assert!(
            msg.contains("rl.batch_size 12") && msg.contains("2 ranks"),
            "{msg}"
        );
    }
}

/// PPO on two ranks resumed on two ranks from its checkpoint ends bit-identical to the
/// uninterrupted run: adapter and value head (each rank's sampling stream is a function of
/// the seed, its rank and the step; β and the data position are in the checkpoint).
#[test]
fn rl_on_two_ranks_resumes_exactly() {
    use common::rl_run::config as rl_config;
    let run_rl = |dir: &Path, resume: Option<&str>| {
        let cfg = rl_config(
            dir,
            "ppo",
            &[
                "rl.batch_size=16",
                "training.per_device_train_batch_size=8",
                "training.max_steps=3",
                "training.save_steps=1",
                "rl.adaptive_kl=true",
            ],
        );
        let opts = rlft::rl::trainer::RunOptions {
            resume: resume.map(String::from),
            quiet: true,
            separate_old_pass: false,
        };
        rlft::rl::trainer::run(&cfg, &rlft::rewards::default_registry(), &opts).map(|_| ())
    };
    let whole = TempDir::new("dp-rl-whole");
    let dir = whole.0.clone();
    for o in on_ranks(2, move |_| run_rl(&dir, None)) {
        o.unwrap();
    }
    let resumed = TempDir::new("dp-rl-resumed");
    copy_dir(
        &whole.0.join("out/checkpoint-1"),
        &resumed.0.join("out/checkpoint-1"),
    );
    let dir = resumed.0.clone();
    for o in on_ranks(2, move |_| run_rl(&dir, Some("latest"))) {
        o.unwrap();
    }
    for f in [
        "out/adapter/adapter_model.safetensors",
        "out/value_head.safetensors",
    ] {
        assert!(
            std::fs::read(whole.0.join(f)).unwrap() == std::fs::read(resumed.0.join(f)).unwrap(),
            "{f}: the resumed two-rank run differs"
        );
    }
}
