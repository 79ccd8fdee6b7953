//! `rlft rm` and `rlft dpo`: reward-model adapters in PEFT's SEQ_CLS format score as PEFT
//! does, a trained one merges into a classifier that scores the same, DPO's first step is
//! the hand-computed value of an untrained policy, both stages learn and resume
//! bit-identically, and bad configuration is explained.

mod common;
use common::*;
use rlft::config::{self, preference::DpoConfig, preference::RmConfig};
use rlft::policies::candle_core::{safetensors, Device};
use rlft::preference::{dpo, rm, RunOptions};
use rlft::reward::Options;
use rlft::rewards::RewardModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// 32 pairs: the right sum chosen over a wrong one (off by one or by ten), a quarter of them
/// as conversations.
fn pairs(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..32u32 {
        let (a, b) = ((i * 7) % 41, (i * 13) % 37);
        let (right, wrong) = (a + b, if i % 2 == 0 { a + b + 1 } else { a + b + 10 });
        let row = if i % 4 == 3 {
            json!({"prompt": [{"role": "user", "content": format!("{a}+{b}=")}],
                   "chosen": [{"role": "assistant", "content": right.to_string()}],
                   "rejected": [{"role": "assistant", "content": wrong.to_string()}]})
        } else {
            json!({"prompt": format!("{a}+{b}="), "chosen": right.to_string(), "rejected": wrong.to_string()})
        };
        s += &row.to_string();
        s.push('\n');
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn sets(dir: &Path, extra: &[&str]) -> Vec<String> {
    let data = pairs(dir);
    let mut s = vec![
        format!("model.path={:?}", fixture("llama").display().to_string()),
        format!("data.train_file={:?}", data.display().to_string()),
        format!(
            "training.output_dir={:?}",
            dir.join("out").display().to_string()
        ),
        "training.learning_rate=5e-3".into(),
        "training.max_steps=8".into(),
        "training.per_device_train_batch_size=4".into(),
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

fn reward_model(options: Value) -> RewardModel {
    let Value::Object(map) = options else {
        panic!()
    };
    RewardModel::new(&Options::new("model", map)).unwrap()
}

fn series(dir: &Path, key: &str) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|r| r[key].as_f64())
        .collect()
}

/// An adapter PEFT wrote (`make_rm_fixture.py`: LoRA with B ≠ 0 and a random `score` in
/// `modules_to_save`) scores as PeftModel on LlamaForSequenceClassification did, with the
/// base given or found from `base_model_name_or_path` beside the adapter.
#[test]
fn a_peft_reward_adapter_scores_as_peft_does() {
    let reference = reference("llama-rm-lora");
    let cases = reference["scores"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<f32> = cases
        .iter()
        .map(|c| c["score"].as_f64().unwrap() as f32)
        .collect();
    let adapter = fixture("llama-rm-lora").display().to_string();
    for options in [
        json!({"path": adapter, "base": fixture("llama").display().to_string()}),
        json!({"path": adapter}),
    ] {
        let rm = reward_model(options);
        let got: Vec<f32> = rm
            .score_texts(&texts)
            .unwrap()
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert!(max_abs_diff(&got, &want) < 1e-4, "{got:?} vs {want:?}");
    }
    // A causal-LM adapter is not a reward model.
    let Value::Object(map) = json!({"path": fixture("llama-lora").display().to_string(), "base": fixture("llama").display().to_string()})
    else {
        panic!()
    };
    let err = RewardModel::new(&Options::new("model", map))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a reward model"), "{err}");
}

/// `rlft rm` learns to rank its pairs, writes a PEFT SEQ_CLS adapter with its `score` head,
/// and `rlft merge` makes of it a LlamaForSequenceClassification folder that scores every
/// sequence as the adapter does, through `[[reward]] kind = "model"` either way.
#[test]
fn rm_learns_and_merges_into_a_classifier_that_scores_the_same() {
    let d = TempDir::new("rm-learns");
    let cfg: RmConfig = config::load(None, &sets(&d.0, &["training.max_steps=24"])).unwrap();
    let out = rm::run(&cfg, &quiet()).unwrap();
    let loss = series(&d.0, "train/loss");
    let acc = series(&d.0, "accuracy");
    assert_eq!(loss.len(), 24);
    let (first, last) = (
        loss[..4].iter().sum::<f64>(),
        loss[20..].iter().sum::<f64>(),
    );
    assert!(last < 0.7 * first, "the loss did not fall: {loss:?}");
    assert!(
        acc[20..].iter().sum::<f64>() / 4.0 > 0.8,
        "accuracy {acc:?}"
    );
    for key in [
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
        "num_tokens",
    ] {
        assert!(!series(&d.0, key).is_empty(), "no `{key}` metric");
    }
    let tokens = series(&d.0, "num_tokens");
    assert!(
        tokens.windows(2).all(|w| w[1] > w[0]),
        "num_tokens counts up: {tokens:?}"
    );

    // The adapter: PEFT's SEQ_CLS format.
    let acfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.output.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(acfg["task_type"], "SEQ_CLS");
    assert_eq!(acfg["modules_to_save"], json!(["score"]));
    let w = safetensors::load(out.output.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(w["base_model.model.score.weight"].dims(), &[1, 64]);

    // Merged: a classifier folder.
    let merged = d.0.join("merged");
    let o = rlft(&[
        "merge",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--adapter",
        out.output.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mcfg: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        mcfg["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(mcfg["id2label"], json!({"0": "LABEL_0"}));
    let mw = safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(mw.contains_key("score.weight") && !mw.contains_key("lm_head.weight"));

    // Both forms score alike, and rank the training pairs as the accuracy says.
    let from_adapter = reward_model(json!({"path": out.output.display().to_string()}));
    let from_merged = reward_model(json!({"path": merged.display().to_string()}));
    let texts = ["3+4=7</s>", "3+4=8</s>", "12+35=47</s>", "12+35=57</s>"].map(String::from);
    let a: Vec<f32> = from_adapter
        .score_texts(&texts)
        .unwrap()
        .iter()
        .map(|&x| x as f32)
        .collect();
    let m: Vec<f32> = from_merged
        .score_texts(&texts)
        .unwrap()
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert!(max_abs_diff(&a, &m) < 1e-4, "{a:?} vs {m:?}");
    let evaluated = rlft::preference::rm::evaluate_pairs;
    let pre = load("llama", rlft::policies::candle_core::DType::F32);
    let adapter = rlft::policies::Adapter::load(&out.output, pre.model.as_ref()).unwrap();
    let train = rlft::preference::load_pairs(&cfg.data.train_file, &pre.tokenizer, 128).unwrap();
    let score = adapter.head("score").unwrap().as_tensor().clone();
    let e = evaluated(
        pre.model.as_ref(),
        Some(&adapter),
        &score,
        &train,
        8,
        0,
        0.0,
    )
    .unwrap();
    assert!(e.accuracy > 0.8, "train-pair accuracy {}", e.accuracy);
    // `input = "ids"` scores the token ids as given: the same as the text they encode.
    let ids = reward_model(json!({"path": out.output.display().to_string(), "input": "ids"}));
    let rows: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| pre.tokenizer.encode(t, true).unwrap())
        .collect();
    let by_ids: Vec<f32> = ids
        .score_ids(&rows)
        .unwrap()
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert!(max_abs_diff(&by_ids, &a) < 1e-6);
}

/// `adapter.trainable = "full"` (TRL's default) trains every weight and the head and writes
/// a `…ForSequenceClassification` folder; reloaded as a reward, it ranks the pairs as the
/// run's own evaluation did.
#[test]
fn a_fully_trained_reward_model_is_a_classifier_folder() {
    let d = TempDir::new("rm-full");
    let mut s = sets(
        &d.0,
        &["adapter.trainable=\"full\"", "training.learning_rate=1e-3"],
    );
    s.push(format!(
        "data.eval_file={:?}",
        d.0.join("pairs.jsonl").display().to_string()
    ));
    let cfg: RmConfig = config::load(None, &s).unwrap();
    let out = rm::run(&cfg, &quiet()).unwrap();
    assert!(out.output.ends_with("model"), "{}", out.output.display());
    let loss = series(&d.0, "train/loss");
    assert!(
        loss[6..].iter().sum::<f64>() < loss[..2].iter().sum::<f64>(),
        "{loss:?}"
    );
    let mcfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.output.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        mcfg["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    let reward = reward_model(json!({"path": out.output.display().to_string(), "input": "ids"}));
    let pre = load("llama", rlft::policies::candle_core::DType::F32);
    let pairs = rlft::preference::load_pairs(&cfg.data.train_file, &pre.tokenizer, 128).unwrap();
    let mut right = 0;
    for p in &pairs {
        let s = reward
            .score_ids(&[p.chosen_ids(), p.rejected_ids()])
            .unwrap();
        right += usize::from(s[0] > s[1]);
    }
    let reported = series(&d.0, "eval/accuracy");
    assert_eq!(right as f64 / pairs.len() as f64, *reported.last().unwrap());
}

/// With B = 0 the policy is the reference, so Δ = 0 for every pair and the first step's
/// loss is the hand-computed value of each loss type: sigmoid −log σ(0) = ln 2, hinge
/// relu(1 − 0) = 1, IPO (0 − 1/(2β))² = 25 at β = 0.1; rewards and margins are 0. Then the
/// sigmoid loss falls and the implicit reward accuracy rises.
#[test]
fn dpo_starts_at_the_hand_computed_loss_and_learns() {
    for (loss_type, first) in [
        ("sigmoid", std::f64::consts::LN_2),
        ("hinge", 1.0),
        ("ipo", 25.0),
    ] {
        let d = TempDir::new("dpo-first");
        let lt = format!("dpo.loss_type={loss_type:?}");
        let cfg: DpoConfig =
            config::load(None, &sets(&d.0, &[&lt, "training.max_steps=16"])).unwrap();
        dpo::run(&cfg, &quiet()).unwrap();
        let loss = series(&d.0, "train/loss");
        assert!(
            (loss[0] - first).abs() < 1e-5,
            "{loss_type}: first loss {}",
            loss[0]
        );
        let margins = series(&d.0, "rewards/margins");
        assert!(
            margins[0].abs() < 1e-6,
            "{loss_type}: first margin {}",
            margins[0]
        );
        if loss_type == "sigmoid" {
            assert!(
                loss[12..].iter().sum::<f64>() < 0.8 * 4.0 * first,
                "{loss:?}"
            );
            let acc = series(&d.0, "rewards/accuracies");
            assert!(acc[12..].iter().sum::<f64>() / 4.0 > 0.7, "{acc:?}");
            for key in [
                "rewards/chosen",
                "rewards/rejected",
                "logps/chosen",
                "logps/rejected",
            ] {
                assert_eq!(series(&d.0, key).len(), 16, "`{key}`");
            }
        }
    }
}

/// Scoring the reference once before training gives the run that scores it at every step.
#[test]
fn a_precomputed_reference_trains_as_the_adapter_off_reference() {
    let mut adapters = Vec::new();
    for pre in ["false", "true"] {
        let d = TempDir::new("dpo-precompute");
        let p = format!("dpo.precompute_ref_log_probs={pre}");
        let cfg: DpoConfig = config::load(None, &sets(&d.0, &[&p])).unwrap();
        let out = dpo::run(&cfg, &quiet()).unwrap();
        let mut t: Vec<(String, Vec<f32>)> =
            safetensors::load(out.output.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        adapters.push((t, series(&d.0, "train/loss")));
    }
    let ((a, la), (b, lb)) = (&adapters[0], &adapters[1]);
    for ((ka, va), (_, vb)) in a.iter().zip(b) {
        assert!(max_abs_diff(va, vb) < 1e-4, "{ka}");
    }
    let (la, lb): (Vec<f32>, Vec<f32>) = (
        la.iter().map(|&x| x as f32).collect(),
        lb.iter().map(|&x| x as f32).collect(),
    );
    assert!(max_abs_diff(&la, &lb) < 1e-4, "{la:?} vs {lb:?}");
}

/// A run resumed from a mid-run checkpoint ends with the same bytes as one never stopped
/// (with LoRA dropout, so the generator's position is restored too).
#[test]
fn rm_and_dpo_resume_bit_identically() {
    for (stage, trainable) in [("rm", "lora"), ("rm", "full"), ("dpo", "lora")] {
        let t = format!("adapter.trainable={trainable:?}");
        let extra = [
            "training.save_steps=3",
            "training.lr_scheduler=\"cosine\"",
            "adapter.lora_dropout=0.1",
            &t,
        ];
        let run = |dir: &Path, resume: Option<&str>| -> PathBuf {
            let opts = RunOptions {
                resume: resume.map(String::from),
                quiet: true,
            };
            let s = sets(dir, &extra);
            if stage == "rm" {
                let cfg: RmConfig = config::load(None, &s).unwrap();
                rm::run(&cfg, &opts).unwrap().output
            } else {
                let cfg: DpoConfig = config::load(None, &s).unwrap();
                dpo::run(&cfg, &opts).unwrap().output
            }
        };
        let a = TempDir::new("pref-resume-a");
        let out_a = run(&a.0, None);
        let b = TempDir::new("pref-resume-b");
        let ck = b.0.join("out/checkpoint-3");
        copy_dir(&a.0.join("out/checkpoint-3"), &ck);
        let out_b = run(&b.0, Some("latest"));
        let file = if trainable == "lora" {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        assert!(
            std::fs::read(out_a.join(file)).unwrap() == std::fs::read(out_b.join(file)).unwrap(),
            "{stage} ({trainable}): the resumed run's weights differ"
        );
        let steps: Vec<u64> = metrics(&b.0)
            .iter()
            .filter_map(|r| r["train/loss"].as_f64().and(r["step"].as_u64()))
            .collect();
        assert_eq!(steps, vec![4, 5, 6, 7, 8], "{stage}");
        if stage == "rm" {
            // num_tokens continues from the checkpoint.
            let ta = series(&a.0, "num_tokens");
            let tb = series(&b.0, "num_tokens");
            assert_eq!(ta.last(), tb.last());
        }
    }
}

/// Bad keys and values name the key and say what is expected.
#[test]
fn bad_preference_configs_are_explained() {
    let d = TempDir::new("pref-bad");
    let err = |stage: &str, extra: &[&str]| -> String {
        let s = sets(&d.0, extra);
        let e = if stage == "rm" {
            config::load::<RmConfig>(None, &s).and_then(|c| c.validate())
        } else {
            config::load::<DpoConfig>(None, &s).and_then(|c| c.validate())
        };
        format!("{:#}", e.unwrap_err())
    };
    let e = err("dpo", &["dpo.betta=0.2"]);
    assert!(e.contains("betta") && e.contains("beta"), "{e}");
    let e = err("dpo", &["dpo.loss_type=\"kto\""]);
    assert!(e.contains("dpo.loss_type") && e.contains("sigmoid"), "{e}");
    let e = err("dpo", &["dpo.loss_type=\"ipo\"", "dpo.label_smoothing=0.1"]);
    assert!(e.contains("label_smoothing"), "{e}");
    let e = err("dpo", &["dpo.beta=0"]);
    assert!(e.contains("dpo.beta"), "{e}");
    let e = err("dpo", &["adapter.trainable=\"full\""]);
    assert!(e.contains("precompute_ref_log_probs"), "{e}");
    let e = err("rm", &["rm.center_rewards_coefficient=-1"]);
    assert!(e.contains("center_rewards_coefficient"), "{e}");
    // A data line without `rejected` names the file, line and field.
    let bad = d.0.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"1+1=\", \"chosen\": \"2\", \"rejected\": \"3\"}\n{\"prompt\": \"1+2=\", \"chosen\": \"3\"}\n").unwrap();
    let mut s = sets(&d.0, &[]);
    s.push(format!("data.train_file={:?}", bad.display().to_string()));
    let cfg: DpoConfig = config::load(None, &s).unwrap();
    let e = format!("{:#}", dpo::run(&cfg, &quiet()).unwrap_err());
    assert!(
        e.contains("bad.jsonl") && e.contains(":2") && e.contains("rejected"),
        "{e}"
    );
}

/// `rlft pairs` prints the log-probs it compares, and losses that follow from them: without
/// an adapter the policy is the reference and every DPO loss is its Δ = 0 value.
#[test]
fn the_pairs_command_reports_consistent_figures() {
    let d = TempDir::new("pairs-cmd");
    let data = pairs(&d.0);
    let o = rlft(&[
        "pairs",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--adapter",
        fixture("llama-lora").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 32);
    for r in &rows {
        let p = f32s(&r["policy_logps"]);
        let q = f32s(&r["reference_logps"]);
        let delta = ((p[0] - q[0]) - (p[1] - q[1])) as f64;
        let sigmoid = (1.0 + (-0.1 * delta).exp()).ln();
        assert!((r["dpo_loss_sigmoid"].as_f64().unwrap() - sigmoid).abs() < 1e-5);
        assert!(
            (r["dpo_loss_hinge"].as_f64().unwrap() - (1.0 - 0.1 * delta).max(0.0)).abs() < 1e-5
        );
        assert!(p != q, "the adapter changes the log-probs");
    }
}

/// Per-block recompute changes no figure: the adapters after 8 steps with and without
/// `gradient_checkpointing` agree to rounding, for both stages.
#[test]
fn gradient_checkpointing_trains_both_stages_as_keeping_the_activations() {
    for stage in ["rm", "dpo"] {
        let mut outs = Vec::new();
        for ckpt in ["false", "true"] {
            let d = TempDir::new("pref-ckpt");
            let s = sets(&d.0, &[&format!("training.gradient_checkpointing={ckpt}")]);
            let out = if stage == "rm" {
                rm::run(&config::load::<RmConfig>(None, &s).unwrap(), &quiet())
                    .unwrap()
                    .output
            } else {
                dpo::run(&config::load::<DpoConfig>(None, &s).unwrap(), &quiet())
                    .unwrap()
                    .output
            };
            let mut t: Vec<(String, Vec<f32>)> =
                safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
                    .collect();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            outs.push((t, d));
        }
        let (a, b) = (&outs[0].0, &outs[1].0);
        assert_eq!(a.len(), b.len());
        for ((k, va), (_, vb)) in a.iter().zip(b) {
            assert!(
                max_abs_diff(va, vb) < 1e-5,
                "{stage} {k}: {}",
                max_abs_diff(va, vb)
            );
        }
    }
}

/// The score is read at each row's last token that is not the pad id, as transformers reads
/// it: with pad = EOS (GPT-2, Llama 3, Qwen2.5 base), a sequence ending in EOS is scored at
/// the token before it — the same as the sequence without its EOS.
#[test]
fn the_score_is_read_at_the_last_non_pad_token() {
    use rlft::policies::candle_core::{DType, Tensor};
    use rlft::policies::{BatchInput, ForwardCtx};
    use rlft::rewards::last_token_scores;
    let pre = load("llama", DType::F32);
    let model = pre.model.as_ref();
    let score = Tensor::randn(0f32, 1.0, (1, 64), &Device::Cpu).unwrap();
    let ctx = ForwardCtx::inference(None);
    let read = |rows: &[Vec<u32>], pad: u32| -> Vec<f32> {
        let input = BatchInput::left_padded(rows, pad, &Device::Cpu).unwrap();
        last_token_scores(model, &input, &ctx, &score, pad)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (with_eos, without) = (vec![1, 300, 301, 302, 2], vec![1, 300, 301, 302]);
    let other = vec![1, 40, 2];
    // pad = EOS (2): the final EOS is skipped.
    let a = read(&[with_eos.clone(), other.clone()], 2);
    let b = read(&[without.clone(), vec![1, 40]], 0);
    assert!(max_abs_diff(&a, &b) < 1e-5, "{a:?} vs {b:?}");
    // pad distinct from EOS (0): the EOS itself is read, which scores differently.
    let c = read(&[with_eos, other], 0);
    assert!((c[0] - b[0]).abs() > 1e-4, "{c:?} vs {b:?}");
}

/// QLoRA for preferences: a reward model and DPO (from an SFT adapter, merged into the
/// full-precision base and then quantized, the reference) train on an NF4 base: the losses
/// fall, and DPO's first loss is exactly ln 2 (policy = reference on the quantized base).
#[test]
fn rm_and_dpo_learn_on_a_quantized_base() {
    let q = [
        "model.quantization=\"nf4\"",
        "model.bnb_4bit_use_double_quant=true",
    ];
    let d = TempDir::new("rm-nf4");
    let mut extra = q.to_vec();
    extra.push("training.max_steps=24");
    let cfg: RmConfig = config::load(None, &sets(&d.0, &extra)).unwrap();
    rm::run(&cfg, &quiet()).unwrap();
    let loss = series(&d.0, "train/loss");
    let (first, last) = (
        loss[..4].iter().sum::<f64>(),
        loss[20..].iter().sum::<f64>(),
    );
    assert!(last < 0.7 * first, "rm on nf4: {loss:?}");

    let d = TempDir::new("dpo-nf4");
    let sft = format!(
        "dpo.sft_adapter={:?}",
        fixture("llama-lora").display().to_string()
    );
    let mut extra = q.to_vec();
    extra.extend([sft.as_str(), "training.max_steps=16"]);
    let cfg: DpoConfig = config::load(None, &sets(&d.0, &extra)).unwrap();
    dpo::run(&cfg, &quiet()).unwrap();
    let loss = series(&d.0, "train/loss");
    assert!((loss[0] - std::f64::consts::LN_2).abs() < 1e-5, "{loss:?}");
    assert!(
        loss[12..].iter().sum::<f64>() < 0.8 * 4.0 * std::f64::consts::LN_2,
        "dpo on nf4: {loss:?}"
    );
}
