//! The built-in demo: the committed base model loads and reproduces the accuracy quoted in
//! docs/demo.md, and a shortened `rlft demo --quick` runs the whole pipeline.

mod common;
use common::*;
use rlft::demo::task;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_committed_base_model_reproduces_the_documented_accuracy() {
    use rlft::config::{self, rl::RlConfig};
    use rlft::policies::candle_core::{DType, Device};
    use rlft::policies::Pretrained;
    let tmp = TempDir::new("demo-base-acc");
    let eval = tmp.0.join("eval.jsonl");
    task::write_jsonl(&eval, &task::eval_set()).unwrap();
    // The corpus's own format: the first line of the continuation must be the sum (the base
    // never stops after an answer, so whole-completion exact match is 0 by design).
    let cfg: RlConfig = config::load(
        Some(&root().join("configs/demo/ppo.toml")),
        &[
            format!("data.eval_file={:?}", eval.display().to_string()),
            "reward=[{name = \"exact_match\", field = \"answer\", extract = \"first_line\"}]"
                .into(),
        ],
    )
    .unwrap();
    let pre =
        Pretrained::load(&root().join("configs/demo/model"), DType::F32, &Device::Cpu).unwrap();
    let prompts =
        rlft::data::prompts::load_prompts(&eval.clone().into(), &pre.tokenizer, 64).unwrap();
    let rewards =
        rlft::rl::trainer::build_rewards(&cfg, &rlft::rewards::default_registry()).unwrap();
    let eq_acc = rlft::rl::trainer::evaluate(
        pre.model.as_ref(),
        None,
        &pre.tokenizer,
        &prompts,
        &rewards,
        &cfg,
    )
    .unwrap();
    eprintln!("base first-line accuracy on the held-out pairs: {eq_acc}");
    let doc = std::fs::read_to_string(root().join("docs/demo.md")).unwrap();
    let quoted: f64 = doc
        .lines()
        .find_map(|l| l.strip_prefix("<!-- base_equation_accuracy: "))
        .and_then(|l| l.strip_suffix(" -->"))
        .expect("docs/demo.md quotes the base model's equation accuracy")
        .parse()
        .unwrap();
    assert!(
        (eq_acc - quoted).abs() < 1e-9,
        "base equation accuracy {eq_acc} vs {quoted} in docs/demo.md"
    );
}

#[test]
fn a_quick_demo_runs_the_whole_pipeline() {
    let tmp = TempDir::new("demo-quick");
    let out = tmp.0.join("demo");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlft"))
        .current_dir(root())
        .args(["demo", "--quick", "--quiet", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    for row in [
        "base model",
        "after SFT",
        "after PPO (exact match)",
        "reward model",
        "after PPO (reward model)",
        "after DPO",
        "after KTO",
        "KL to the SFT model",
        "-- dashboard ",
    ] {
        assert!(table.contains(row), "{table}");
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for k in [
        "base_accuracy",
        "sft_accuracy",
        "ppo_accuracy",
        "ppo_rm_accuracy",
        "dpo_accuracy",
        "kto_accuracy",
    ] {
        let v = s[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        // Accuracy over 40 problems is a multiple of 1/40.
        assert!((v * 40.0 - (v * 40.0).round()).abs() < 1e-9, "{k} = {v}");
    }
    assert_eq!(s["eval_problems"].as_u64(), Some(40));
    assert_eq!(s["eval_pairs"].as_u64(), Some(40));
    let rm = s["rm_accuracy"].as_f64().unwrap();
    assert!(
        (rm * 40.0 - (rm * 40.0).round()).abs() < 1e-9,
        "rm_accuracy = {rm}"
    );
    for k in ["ppo_kl", "ppo_rm_kl", "dpo_kl", "kto_kl"] {
        assert!(s[k].as_f64().unwrap().is_finite(), "{k}");
    }
    for k in ["sft", "ppo", "rm", "ppo_rm", "dpo", "kto", "eval"] {
        assert!(s["seconds"][k].as_f64().unwrap() > 0.0, "seconds.{k}");
    }
    // Each stage left its run folder: adapters, metrics, rollouts.
    assert!(out.join("sft/adapter/adapter_model.safetensors").is_file());
    assert!(out.join("ppo/adapter/adapter_model.safetensors").is_file());
    let m = std::fs::read_to_string(out.join("ppo/metrics.jsonl")).unwrap();
    assert!(m.contains("objective/scores") && m.contains("eval/score"));
    assert!(out.join("ppo/rollouts.jsonl").is_file());
    assert!(out.join("sft/metrics.jsonl").is_file());
    // The preference stages: a SEQ_CLS reward adapter, PPO against it, DPO.
    let rm_cfg = std::fs::read_to_string(out.join("rm/adapter/adapter_config.json")).unwrap();
    assert!(rm_cfg.contains("SEQ_CLS"), "{rm_cfg}");
    let m = std::fs::read_to_string(out.join("ppo-rm/metrics.jsonl")).unwrap();
    assert!(m.contains("objective/scores"), "{m}");
    let m = std::fs::read_to_string(out.join("dpo/metrics.jsonl")).unwrap();
    assert!(
        m.contains("rewards/accuracies") && m.contains("logps/chosen"),
        "{m}"
    );
    let m = std::fs::read_to_string(out.join("kto/metrics.jsonl")).unwrap();
    assert!(
        m.contains("\"kl\"") && m.contains("rewards/rejected"),
        "{m}"
    );
    // The held-out problems are the task's, in no training file.
    let eval = std::fs::read_to_string(out.join("data/eval.jsonl")).unwrap();
    let train = std::fs::read_to_string(out.join("data/prompts.jsonl")).unwrap()
        + &std::fs::read_to_string(out.join("data/sft.jsonl")).unwrap()
        + &std::fs::read_to_string(out.join("data/pairs.jsonl")).unwrap();
    for line in eval.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = v["prompt"].as_str().unwrap();
        assert!(
            !train.contains(&serde_json::to_string(p).unwrap()),
            "{p} leaked into training data"
        );
    }
}
