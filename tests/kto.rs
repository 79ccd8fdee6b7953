//! `rlft kto`: the examples' and their mismatched KL pairs' log-probs equal each sequence
//! scored alone, the first step's loss is 0.5 with a zero KL (policy = reference), training
//! separates desirable from undesirable completions, the shipped config runs, and bad input
//! is explained. The loss itself is held to TRL's code in tests/trl_losses.rs.

mod common;
use common::*;
use rlft::config::{self, preference::KtoConfig};
use rlft::data::unpaired::Example;
use rlft::policies::candle_core::{DType, Device};
use rlft::policies::{generate, ForwardCtx};
use rlft::preference::kto::{self, KtoBatch};
use rlft::preference::RunOptions;
use serde_json::json;
use std::path::{Path, PathBuf};

/// 64 unpaired rows from 32 sums: the right answer desirable, a wrong one not, a quarter
/// of them as conversations.
fn examples_file(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..32u32 {
        let (a, b) = ((i * 7) % 41, (i * 13) % 37);
        let wrong = if i % 2 == 0 { a + b + 1 } else { a + b + 10 };
        for (answer, label) in [(a + b, true), (wrong, false)] {
            let row = if i % 4 == 3 {
                json!({"prompt": [{"role": "user", "content": format!("{a}+{b}=")}],
                       "completion": [{"role": "assistant", "content": answer.to_string()}],
                       "label": label})
            } else {
                json!({"prompt": format!("{a}+{b}="), "completion": answer.to_string(), "label": label})
            };
            s += &row.to_string();
            s.push('\n');
        }
    }
    let p = dir.join("kto.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn sets(dir: &Path, extra: &[&str]) -> Vec<String> {
    let data = examples_file(dir);
    let mut s = vec![
        format!("model.path={:?}", fixture("llama").display().to_string()),
        format!("data.train_file={:?}", data.display().to_string()),
        format!(
            "training.output_dir={:?}",
            dir.join("out").display().to_string()
        ),
        "training.learning_rate=5e-3".into(),
        "training.max_steps=24".into(),
        "training.per_device_train_batch_size=8".into(),
        "training.logging_steps=1".into(),
        "training.lr_scheduler=\"constant\"".into(),
        "adapter.target_modules=\"all-linear\"".into(),
        "adapter.lora_dropout=0.0".into(),
    ];
    s.extend(extra.iter().map(|e| e.to_string()));
    s
}

fn quiet() -> RunOptions {
    RunOptions {
        resume: None,
        quiet: true,
    }
}

/// Example i's sequence and its KL pair (prompt i with completion i − 1, cyclically) in one
/// left-padded batch equal each sequence scored alone, adapter on.
#[test]
fn example_and_kl_pair_logps_equal_each_sequence_alone() {
    let pre = load("llama", DType::F32);
    let adapter = adapter_with_nonzero_b(&pre, 0.0);
    let ex = [
        Example {
            prompt: vec![1, 5, 9, 13],
            completion: vec![20, 2],
            desirable: true,
        },
        Example {
            prompt: vec![1, 7],
            completion: vec![30, 31, 32, 33, 2],
            desirable: false,
        },
        Example {
            prompt: vec![1, 8, 8],
            completion: vec![40, 41, 2],
            desirable: true,
        },
    ];
    let refs: Vec<&Example> = ex.iter().collect();
    let model = pre.model.as_ref();
    let b = KtoBatch::new(&refs, true, 0, &Device::Cpu).unwrap();
    let ctx = ForwardCtx::inference(Some(&adapter));
    let hidden = model.forward_hidden(&b.batch.input, &ctx, None).unwrap();
    let (pi, kl) = b.logps(model, &hidden, &ctx).unwrap();
    let (pi, kl): (Vec<f32>, Vec<f32>) = (pi.to_vec1().unwrap(), kl.unwrap().to_vec1().unwrap());
    let alone = |prompt: &[u32], completion: &[u32]| -> f32 {
        let ids = [prompt, completion].concat();
        let lp = generate::score(model, Some(&adapter), &[ids], 0, 1.0).unwrap();
        lp[0][lp[0].len() - completion.len()..].iter().sum()
    };
    for i in 0..3 {
        let want = alone(&ex[i].prompt, &ex[i].completion);
        assert!(
            (pi[i] - want).abs() < 1e-4,
            "example {i}: {} vs {want}",
            pi[i]
        );
        let other = &ex[(i + 2) % 3].completion;
        let want = alone(&ex[i].prompt, other);
        assert!(
            (kl[i] - want).abs() < 1e-4,
            "KL pair {i}: {} vs {want}",
            kl[i]
        );
    }
    assert_eq!(b.desirable.to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 1.0]);
}

#[test]
fn kto_starts_at_one_half_and_separates_the_classes() {
    let d = TempDir::new("kto-learns");
    let cfg: KtoConfig = config::load(None, &sets(&d.0, &[])).unwrap();
    let out = kto::run(&cfg, &quiet()).unwrap();
    assert_eq!(out.steps, 24);
    let m = metrics(&d.0);
    let lines: Vec<&serde_json::Value> = m.iter().filter(|r| !r["train/loss"].is_null()).collect();
    // Step 1: policy = reference (LoRA B = 0), so r = 0, z0 = 0 and every loss is σ(0).
    let first = lines[0];
    assert!(
        (first["train/loss"].as_f64().unwrap() - 0.5).abs() < 1e-6,
        "{first}"
    );
    assert_eq!(first["kl"].as_f64().unwrap(), 0.0);
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
    ] {
        assert!(
            lines
                .iter()
                .all(|r| r[key].as_f64().is_some_and(f64::is_finite)),
            "{key}"
        );
    }
    // Trained: the loss falls and desirable completions gain implicit reward over the rest.
    let tail = &lines[lines.len() - 6..];
    let mean =
        |k: &str| tail.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>() / tail.len() as f64;
    eprintln!(
        "kto: loss {:.4}, margin {:.4}, kl {:.4}",
        mean("train/loss"),
        mean("rewards/margins"),
        mean("kl")
    );
    assert!(mean("train/loss") < 0.49, "loss {}", mean("train/loss"));
    assert!(
        mean("rewards/margins") > 0.05,
        "margin {}",
        mean("rewards/margins")
    );
    assert!(mean("kl") >= 0.0);
    assert!(d.0.join("out/adapter/adapter_model.safetensors").is_file());

    // APO-zero's unpaired loss also starts at σ(0) and has no KL term.
    let d = TempDir::new("kto-apo");
    let s = sets(
        &d.0,
        &[
            "kto.loss_type=\"apo_zero_unpaired\"",
            "training.max_steps=2",
        ],
    );
    let cfg: KtoConfig = config::load(None, &s).unwrap();
    kto::run(&cfg, &quiet()).unwrap();
    let m = metrics(&d.0);
    let first = m.iter().find(|r| !r["train/loss"].is_null()).unwrap();
    assert!((first["train/loss"].as_f64().unwrap() - 0.5).abs() < 1e-6);
    assert!(m.iter().filter_map(|r| r["kl"].as_f64()).all(|k| k == 0.0));
}

#[test]
fn the_shipped_kto_config_runs() {
    let tmp = TempDir::new("shipped-kto");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlft"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "kto",
            "--config",
            "configs/kto.toml",
            "--quiet",
            "--set",
            "training.max_steps=3",
            "--set",
        ])
        .arg(format!(
            "training.output_dir={:?}",
            tmp.0.display().to_string()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("kto: 3 steps"), "{}", stdout(&o));
    assert!(tmp.0.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn bad_kto_input_is_explained() {
    let d = TempDir::new("kto-bad");
    let cases: [(&[&str], &str); 2] = [
        (
            &["training.per_device_train_batch_size=1"],
            "per_device_train_batch_size must be at least 2",
        ),
        (
            &["kto.desirable_weight=0"],
            "kto.desirable_weight must be positive",
        ),
    ];
    for (extra, want) in cases {
        let cfg: KtoConfig = config::load(None, &sets(&d.0, extra)).unwrap();
        let err = format!("{:#}", kto::run(&cfg, &quiet()).unwrap_err());
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let err = config::load::<KtoConfig>(None, &["kto.loss_type=\"sigmoid\"".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kto.loss_type") && err.contains("`kto` or `apo_zero_unpaired`"),
        "{err}"
    );
    // A label that is not a boolean names the file, line and field.
    let bad = d.0.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"1+1=\", \"completion\": \"2\", \"label\": true}\n{\"prompt\": \"1+2=\", \"completion\": \"3\", \"label\": \"yes\"}\n").unwrap();
    let mut s = sets(&d.0, &[]);
    s.push(format!("data.train_file={:?}", bad.display().to_string()));
    let cfg: KtoConfig = config::load(None, &s).unwrap();
    let err = format!("{:#}", kto::run(&cfg, &quiet()).unwrap_err());
    assert!(
        err.contains("bad.jsonl:2") && err.contains("`label`") && err.contains("true or false"),
        "{err}"
    );
}
