//! `rlft sft`: the loss falls, masking is right, accumulation is exact, resume is
//! bit-identical, outputs reload, frozen layers stay frozen, bad input is explained.

mod common;
use common::*;
use rlft::config::{self, sft::SftConfig};
use rlft::data::{read_jsonl, sft::tokenize};
use rlft::policies::candle_core::{safetensors, DType, Device};
use rlft::policies::{Adapter, ForwardCtx, Pretrained};
use rlft::sft::{evaluate, load_examples, run, RunOptions};
use std::path::{Path, PathBuf};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Sums data: 24 prompt/completion rows and 8 chat rows.
fn data(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..32u32 {
        let (a, b) = ((i * 7) % 41, (i * 13) % 37);
        if i % 4 == 3 {
            s += &serde_json::json!({"messages": [{"role": "user", "content": format!("{a}+{b}=")}, {"role": "assistant", "content": format!("{}", a + b)}]}).to_string();
        } else {
            s += &serde_json::json!({"prompt": format!("{a}+{b}="), "completion": format!("{}", a + b)}).to_string();
        }
        s.push('\n');
    }
    let p = dir.join("train.jsonl");
    write(&p, &s);
    p
}

fn config(model: &str, dir: &Path, extra: &[&str]) -> SftConfig {
    let train = data(dir);
    let mut sets = vec![
        format!("model.path={:?}", fixture(model).display().to_string()),
        format!("data.train_file={:?}", train.display().to_string()),
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
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

fn quiet() -> RunOptions {
    RunOptions {
        resume: None,
        quiet: true,
    }
}

#[test]
fn loss_falls_and_the_saved_adapter_lowers_nll_on_its_data() {
    for m in FAMILIES {
        let tmp = TempDir::new(&format!("sft-falls-{m}"));
        let cfg = config(
            m,
            &tmp.0,
            &["training.max_steps=30", "adapter.lora_dropout=0.0"],
        );
        let out = run(&cfg, &quiet()).unwrap();
        let losses: Vec<f64> = metrics(&tmp.0)
            .iter()
            .filter_map(|r| r["train/loss"].as_f64())
            .collect();
        assert_eq!(losses.len(), 30);
        let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = losses[27..].iter().sum::<f64>() / 3.0;
        assert!(last < first - 1.0, "{m}: loss {first:.3} → {last:.3}");
        // Reload the PEFT adapter written to output_dir/adapter.
        assert_eq!(out.output, tmp.0.join("out/adapter"));
        let pre = Pretrained::load(&fixture(m), DType::F32, &Device::Cpu).unwrap();
        let adapter = Adapter::load(&out.output, pre.model.as_ref()).unwrap();
        let exs = load_examples(&cfg.data.train_file, &pre.tokenizer, true, 128).unwrap();
        let base = evaluate(pre.model.as_ref(), &ForwardCtx::inference(None), &exs, 8, 0).unwrap();
        let tuned = evaluate(
            pre.model.as_ref(),
            &ForwardCtx::inference(Some(&adapter)),
            &exs,
            8,
            0,
        )
        .unwrap();
        assert!(tuned < base - 1.0, "{m}: NLL {base:.3} → {tuned:.3}");
    }
}

/// QLoRA: an adapter trained on a k-bit base (NF4 with double quantization, FP4, int8) lowers
/// the loss, is an ordinary PEFT adapter (no quantization in its config; the base weights are
/// not in it), and lowers the NLL of its data on the quantized base it was trained on and on
/// the full-precision base it is then served on. The memory estimate counts the quantized
/// weights: below the bf16 base's.
#[test]
fn qlora_on_a_quantized_base_learns_and_the_adapter_serves_the_full_precision_base() {
    use rlft::policies::quant::{QuantConfig, Quantization};
    for (m, kind, double_quant) in [
        ("llama", Quantization::Nf4, true),
        ("qwen2", Quantization::Fp4, false),
        ("gpt2", Quantization::Int8, false),
    ] {
        let tmp = TempDir::new(&format!("qlora-{m}"));
        let cfg = config(
            m,
            &tmp.0,
            &[
                "training.max_steps=30",
                "adapter.lora_dropout=0.0",
                &format!("model.quantization={:?}", kind.name()),
                &format!("model.bnb_4bit_use_double_quant={double_quant}"),
            ],
        );
        let out = run(&cfg, &quiet()).unwrap();
        let losses: Vec<f64> = metrics(&tmp.0)
            .iter()
            .filter_map(|r| r["train/loss"].as_f64())
            .collect();
        let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = losses[27..].iter().sum::<f64>() / 3.0;
        assert!(last < first - 1.0, "{m}: loss {first:.3} → {last:.3}");
        let peft: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.output.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(peft["peft_type"], "LORA");
        assert!(
            !peft.to_string().contains("quant"),
            "{m}: the adapter config is PEFT's own: {peft}"
        );
        let q = QuantConfig { kind, double_quant };
        for (what, pre) in [
            (
                "full precision",
                Pretrained::load(&fixture(m), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "quantized",
                Pretrained::load_quantized(&fixture(m), DType::F32, q, &Device::Cpu).unwrap(),
            ),
        ] {
            let adapter = Adapter::load(&out.output, pre.model.as_ref()).unwrap();
            let exs = load_examples(&cfg.data.train_file, &pre.tokenizer, true, 128).unwrap();
            let ctx = ForwardCtx::inference(None);
            let base = evaluate(pre.model.as_ref(), &ctx, &exs, 8, 0).unwrap();
            let ctx = ForwardCtx::inference(Some(&adapter));
            let tuned = evaluate(pre.model.as_ref(), &ctx, &exs, 8, 0).unwrap();
            assert!(
                tuned < base - 1.0,
                "{m} on the {what} base: NLL {base:.3} → {tuned:.3}"
            );
        }
        // `rlft merge` merges into the full-precision base and says the adapter was trained
        // on a quantized one (its run's config.json).
        let merged = tmp.0.join("merged");
        let o = rlft(&[
            "merge",
            "--model",
            fixture(m).to_str().unwrap(),
            "--adapter",
            out.output.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            said.contains(&format!("trained on a {} base", kind.name()))
                && said.contains("full-precision"),
            "{said}"
        );
        assert!(merged.join("model.safetensors").is_file());
        // In bf16 both hold a widening buffer per thread; the quantized blocks are smaller.
        let full = Pretrained::load(&fixture(m), DType::BF16, &Device::Cpu).unwrap();
        let quant = Pretrained::load_quantized(&fixture(m), DType::BF16, q, &Device::Cpu).unwrap();
        let (wf, wq) = (
            rlft::train::memory::weight_bytes(full.model.as_ref()),
            rlft::train::memory::weight_bytes(quant.model.as_ref()),
        );
        assert!(wq < wf, "{m}: {wq} quantized bytes vs {wf}");
    }
}

#[test]
fn completion_only_masking_of_a_hand_built_case() {
    let pre = Pretrained::load(&fixture("llama"), DType::F32, &Device::Cpu).unwrap();
    let tok = &pre.tokenizer;
    let tmp = TempDir::new("mask");
    let p = tmp.0.join("d.jsonl");
    write(
        &p,
        concat!(
            r#"{"prompt": "12+35=", "completion": "47"}"#,
            "\n",
            r#"{"messages": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "12+35="}, {"role": "assistant", "content": "47"}]}"#,
            "\n",
            r#"{"text": "7+8=15"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}"#,
            "\n",
        ),
    );
    let rows = read_jsonl(&p).unwrap();
    // Prompt/completion: "12+35=47" is <s> 12 + 3 5 = 47; only "47" and the appended EOS train.
    let (ex, cut) = tokenize(&rows[0], tok, true, 64).unwrap();
    assert!(!cut);
    assert_eq!(ex.ids, vec![1, 308, 16, 24, 26, 34, 459, 2]);
    assert_eq!(
        ex.trained,
        vec![false, false, false, false, false, false, true, true]
    );
    // Without completion_only_loss every token is a target.
    let (all, _) = tokenize(&rows[0], tok, false, 64).unwrap();
    assert!(all.trained.iter().all(|&b| b));
    // Chat: the ids are those transformers' template gives; only the assistant turn
    // ("47</s>\n") trains.
    let (ex, _) = tokenize(&rows[1], tok, true, 64).unwrap();
    let r = reference("llama");
    assert_eq!(ex.ids, u32s(&r["chat_example"]["ids_no_special"]));
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), "47</s>\n");
    // Text: everything trains, EOS appended.
    let (ex, _) = tokenize(&rows[2], tok, true, 64).unwrap();
    assert_eq!(ex.ids.last(), Some(&2));
    assert!(ex.trained.iter().all(|&b| b));
    // Conversational prompt/completion: only the completion's assistant turn.
    let (ex, _) = tokenize(&rows[3], tok, true, 64).unwrap();
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), "2</s>\n");
    // Truncation is reported.
    let (ex, cut) = tokenize(&rows[0], tok, true, 5).unwrap();
    assert!(cut && ex.ids.len() == 5 && ex.n_trained() == 0);
}

#[test]
fn accumulating_k_micro_batches_equals_one_k_times_larger_batch() {
    let run_with = |tag: &str, bs: &str, accum: &str| {
        let tmp = TempDir::new(tag);
        let cfg = config(
            "qwen2",
            &tmp.0,
            &[
                &format!("training.per_device_train_batch_size={bs}"),
                &format!("training.gradient_accumulation_steps={accum}"),
                "data.shuffle=false",
                "adapter.lora_dropout=0.0",
                "training.max_steps=4",
            ],
        );
        run(&cfg, &quiet()).unwrap();
        let w = safetensors::load(
            tmp.0.join("out/adapter/adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        (w, metrics(&tmp.0))
    };
    let (one, m1) = run_with("accum-1", "8", "1");
    let (four, m4) = run_with("accum-4", "2", "4");
    for (k, a) in &one {
        let d = (a - &four[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Equal up to rounding: the two batchings sum in different orders, and AdamW's
        // division by √v amplifies rounding in small gradients (1.1e-4 relative seen with
        // gemm's AVX-512 kernels).
        assert!(d <= 5e-4 * scale.max(1e-3), "{k}: {d} (scale {scale})");
    }
    let losses = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|r| r["train/loss"].as_f64()).collect()
    };
    let (l1, l4) = (losses(&m1), losses(&m4));
    assert_eq!(l1.len(), 4);
    for (la, lb) in l1.iter().zip(&l4) {
        assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    }
}

#[test]
fn resuming_after_an_interruption_is_bit_identical() {
    for extra in [
        &["adapter.lora_dropout=0.1"][..],
        &[
            "adapter.trainable=\"last_n_layers\"",
            "adapter.last_n_layers=1",
        ],
        &[
            "adapter.lora_dropout=0.1",
            "training.gradient_checkpointing=true",
        ],
        &["model.dtype=\"bf16\"", "adapter.lora_dropout=0.1"],
        &[
            "model.quantization=\"nf4\"",
            "model.bnb_4bit_use_double_quant=true",
            "adapter.lora_dropout=0.1",
        ],
    ] {
        let mut sets = vec![
            "training.save_steps=3",
            "training.max_steps=8",
            "training.lr_scheduler=\"cosine\"",
            "training.warmup_steps=2",
        ];
        sets.extend_from_slice(extra);
        let a = TempDir::new("resume-a");
        let cfg_a = config("llama", &a.0, &sets);
        let out_a = run(&cfg_a, &quiet()).unwrap();
        // Run B is "killed" after its step-3 checkpoint: start it from a copy of that one.
        let b = TempDir::new("resume-b");
        let mut cfg_b = config("llama", &b.0, &sets);
        cfg_b.data.train_file = cfg_a.data.train_file.clone();
        let ck = b.0.join("out/checkpoint-3");
        std::fs::create_dir_all(&ck).unwrap();
        for e in std::fs::read_dir(a.0.join("out/checkpoint-3")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
        }
        // The saved config names run A's output_dir; the resumed run writes to B's.
        let resumed = run(
            &cfg_b,
            &RunOptions {
                resume: Some("latest".into()),
                quiet: true,
            },
        )
        .unwrap();
        assert_eq!(resumed.steps, 8);
        let file = if out_a.output.ends_with("adapter") {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        let wa = std::fs::read(out_a.output.join(file)).unwrap();
        let wb = std::fs::read(resumed.output.join(file)).unwrap();
        assert!(
            wa == wb,
            "{extra:?}: resumed weights differ from the uninterrupted run"
        );
        // Steps 4–8 were logged by the resumed run only.
        let steps: Vec<u64> = metrics(&b.0)
            .iter()
            .filter_map(|r| r["train/loss"].as_f64().and(r["step"].as_u64()))
            .collect();
        assert_eq!(steps, vec![4, 5, 6, 7, 8]);
    }
}

/// Every tensor of a safetensors file, flattened to f64.
fn tensors(path: &Path) -> Vec<(String, Vec<f64>)> {
    use rlft::policies::candle_core::{DType, Device};
    let mut all: Vec<(String, Vec<f64>)> =
        rlft::policies::candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            })
            .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn gradient_checkpointing_trains_as_keeping_the_activations() {
    // The same run with and without per-block recompute, LoRA dropout on (the recompute
    // draws the same masks): losses and the final adapter agree within f32 rounding.
    let run_with = |name: &str, on: bool| {
        let tmp = TempDir::new(name);
        let ckpt = format!("training.gradient_checkpointing={on}");
        let cfg = config(
            "llama",
            &tmp.0,
            &["training.max_steps=6", "adapter.lora_dropout=0.1", &ckpt],
        );
        let out = run(&cfg, &quiet()).unwrap();
        let losses: Vec<f64> = metrics(&tmp.0)
            .iter()
            .filter_map(|r| r["train/loss"].as_f64())
            .collect();
        (
            tensors(&out.output.join("adapter_model.safetensors")),
            losses,
            tmp,
        )
    };
    let (whole, loss_w, _a) = run_with("ckpt-off", false);
    let (ckpt, loss_c, _b) = run_with("ckpt-on", true);
    assert_eq!(loss_w.len(), loss_c.len());
    for (a, b) in loss_w.iter().zip(&loss_c) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "train/loss {a} vs {b}");
    }
    assert_eq!(whole.len(), ckpt.len());
    let mut moved = 0f64;
    for ((name, a), (_, b)) in whole.iter().zip(&ckpt) {
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
        let worst = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "{name}: differs by {worst:e} (scale {scale:e})"
        );
        moved = moved.max(scale);
    }
    assert!(moved > 0.0, "the adapter trained");
}

#[test]
fn last_n_layers_leaves_the_frozen_layers_bitwise_unchanged() {
    let tmp = TempDir::new("last-n");
    let cfg = config(
        "llama",
        &tmp.0,
        &[
            "adapter.trainable=\"last_n_layers\"",
            "adapter.last_n_layers=1",
            "training.max_steps=3",
        ],
    );
    let out = run(&cfg, &quiet()).unwrap();
    assert_eq!(out.output, tmp.0.join("out/model"));
    let before =
        safetensors::load(fixture("llama").join("model.safetensors"), &Device::Cpu).unwrap();
    let after = safetensors::load(out.output.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(before.len(), after.len());
    let (mut same, mut changed) = (0, 0);
    for (k, a) in &before {
        let b = &after[k];
        let equal = a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if k.contains("layers.0.") || k.contains("embed_tokens") {
            assert!(equal, "frozen {k} changed");
            same += 1;
        } else if k.contains("layers.1.") && k.ends_with("proj.weight") {
            assert!(!equal, "trained {k} did not change");
            changed += 1;
        }
    }
    assert!(
        same >= 10 && changed == 7,
        "{same} frozen, {changed} trained"
    );
    // The written folder is a loadable model.
    let pre = Pretrained::load(&out.output, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pre.model.info().num_layers, 2);
}

/// bf16 on the CPU (matrices stored in bf16, f32 compute): LoRA SFT learns as in f32, and
/// full training keeps f32 master weights and writes a bf16 folder that loads.
#[test]
fn bf16_on_the_cpu_learns_and_full_training_writes_bf16() {
    let tmp = TempDir::new("sft-bf16");
    let cfg = config(
        "llama",
        &tmp.0,
        &[
            "training.max_steps=30",
            "adapter.lora_dropout=0.0",
            "model.dtype=\"bf16\"",
        ],
    );
    run(&cfg, &quiet()).unwrap();
    let losses: Vec<f64> = metrics(&tmp.0)
        .iter()
        .filter_map(|r| r["train/loss"].as_f64())
        .collect();
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[27..].iter().sum::<f64>() / 3.0;
    assert!(last < first - 1.0, "bf16: loss {first:.3} → {last:.3}");

    let tmp = TempDir::new("full-bf16");
    let cfg = config(
        "gpt2",
        &tmp.0,
        &[
            "adapter.trainable=\"full\"",
            "training.max_steps=3",
            "training.learning_rate=1e-3",
            "model.dtype=\"bf16\"",
        ],
    );
    let out = run(&cfg, &quiet()).unwrap();
    let after = safetensors::load(out.output.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &after {
        assert_eq!(t.dtype(), DType::BF16, "{name}");
    }
    // Against the fixture's own file, rounded to bf16 (same names and layouts).
    let before =
        safetensors::load(fixture("gpt2").join("model.safetensors"), &Device::Cpu).unwrap();
    let flat = |t: &rlft::policies::candle_core::Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let changed = after
        .iter()
        .filter(|(name, t)| before.get(*name).is_some_and(|b| flat(b) != flat(t)))
        .count();
    assert!(changed > 0, "full bf16 training changed no weight");
    let o = rlft(&[
        "logprobs",
        "--model",
        out.output.to_str().unwrap(),
        "--text",
        "12+35=47",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn full_training_on_gpt2_writes_a_loadable_folder() {
    let tmp = TempDir::new("full");
    let cfg = config(
        "gpt2",
        &tmp.0,
        &[
            "adapter.trainable=\"full\"",
            "training.max_steps=3",
            "training.learning_rate=1e-3",
        ],
    );
    let out = run(&cfg, &quiet()).unwrap();
    let after = safetensors::load(out.output.join("model.safetensors"), &Device::Cpu).unwrap();
    // Conv1D weights are written back in transformers' [in, out] layout.
    assert_eq!(
        after["transformer.h.0.attn.c_attn.weight"].dims(),
        &[64, 192]
    );
    let o = rlft(&[
        "logprobs",
        "--model",
        out.output.to_str().unwrap(),
        "--text",
        "12+35=47",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn merge_writes_a_folder_equal_to_base_plus_adapter() {
    let tmp = TempDir::new("merge");
    let out = tmp.0.join("merged");
    let o = rlft(&[
        "merge",
        "--model",
        fixture("gpt2").to_str().unwrap(),
        "--adapter",
        fixture("gpt2-lora").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = reference("gpt2");
    let c = &r["lora"]["outputs"][1];
    let o = rlft(&[
        "logprobs",
        "--model",
        out.to_str().unwrap(),
        "--text",
        c["text"].as_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let err = max_abs_diff(&f32s(&line["logprobs"]), &f32s(&c["next_token_logprobs"]));
    assert!(err < 1e-4, "merged model off by {err}");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn bad_config_keys_and_values_are_explained() {
    let err = config::load::<SftConfig>(None, &["training.lerning_rate=1".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lerning_rate") && err.contains("did you mean `learning_rate`"),
        "{err}"
    );
    let tmp = TempDir::new("badcfg");
    let p = tmp.0.join("c.toml");
    write(&p, "[adapter]\nr = 4\ntarget_modulez = [\"q_proj\"]\n");
    let err = config::load::<SftConfig>(Some(&p), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("c.toml") && err.contains("did you mean `target_modules`"),
        "{err}"
    );
    let mut cfg = config("llama", &tmp.0, &[]);
    cfg.training.learning_rate = -1.0;
    assert!(run(&cfg, &quiet())
        .unwrap_err()
        .to_string()
        .contains("learning_rate must be ≥ 0"));
    let mut cfg = config("llama", &tmp.0, &[]);
    cfg.adapter.r = 0;
    assert!(run(&cfg, &quiet())
        .unwrap_err()
        .to_string()
        .contains("adapter.r must be at least 1"));
    let mut cfg = config("llama", &tmp.0, &[]);
    cfg.model.quantization = "nf3".into();
    let err = run(&cfg, &quiet()).unwrap_err().to_string();
    assert!(
        err.contains("model.quantization") && err.contains("\"nf3\"") && err.contains("nf4, fp4"),
        "{err}"
    );
    let mut cfg = config("llama", &tmp.0, &["adapter.trainable=\"full\""]);
    cfg.model.quantization = "nf4".into();
    let err = run(&cfg, &quiet()).unwrap_err().to_string();
    assert!(
        err.contains("adapter.trainable = \"full\"") && err.contains("QLoRA"),
        "{err}"
    );
    let mut cfg = config("llama", &tmp.0, &[]);
    cfg.adapter.bias = "all".into();
    assert!(run(&cfg, &quiet())
        .unwrap_err()
        .to_string()
        .contains("only \"none\""));
}

#[test]
fn bad_data_lines_name_the_file_line_and_field() {
    let tmp = TempDir::new("baddata");
    let cases: [(&str, &[u8], &str); 6] = [
        (
            "json",
            b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \n",
            ":2: invalid JSON",
        ),
        (
            "field",
            b"{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"a\"}\n",
            ":3: field `completion`: missing",
        ),
        (
            "type",
            b"{\"prompt\": \"a\", \"completion\": 5}\n",
            ":1: field `prompt`: prompt and completion must both be strings",
        ),
        (
            "utf8",
            b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n",
            ":2: not valid UTF-8",
        ),
        (
            "shape",
            b"{\"question\": \"a\"}\n",
            ":1: expected `prompt`+`completion`, `messages` or `text`",
        ),
        ("empty", b"\n\n", "no examples"),
    ];
    for (name, bytes, want) in cases {
        let p = tmp.0.join(format!("{name}.jsonl"));
        std::fs::write(&p, bytes).unwrap();
        let mut cfg = config("llama", &tmp.0, &[]);
        cfg.data.train_file = p.clone().into();
        let err = format!("{:#}", run(&cfg, &quiet()).unwrap_err());
        assert!(
            err.contains(&format!("{name}.jsonl")) && err.contains(want),
            "{name}: {err}"
        );
    }
    let p = tmp.0.join("msg.jsonl");
    write(&p, r#"{"messages": [{"role": "user", "content": 3}]}"#);
    let mut cfg = config("llama", &tmp.0, &[]);
    cfg.data.train_file = p.into();
    let err = format!("{:#}", run(&cfg, &quiet()).unwrap_err());
    assert!(
        err.contains("msg.jsonl:1: field `messages[0].content`: expected a string, got a number"),
        "{err}"
    );
}

#[test]
fn the_shipped_config_runs() {
    let tmp = TempDir::new("shipped");
    let out_dir = tmp.0.join("run");
    let root = env!("CARGO_MANIFEST_DIR");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlft"))
        .current_dir(root)
        .args(["sft", "--config", "configs/sft.toml", "--quiet", "--set"])
        .arg(format!(
            "training.output_dir={:?}",
            out_dir.display().to_string()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out_dir.join("adapter/adapter_model.safetensors").is_file());
    assert!(out_dir.join("metrics.jsonl").is_file());
    // save_total_limit = 2 keeps the newest two checkpoints.
    let ckpts: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    let eval = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert!(eval.contains("eval/loss"));
}

#[test]
fn an_empty_string_unsets_an_optional_file() {
    let cfg: SftConfig = config::load(
        Some(Path::new("configs/sft.toml")),
        &["data.eval_file=\"\"".into()],
    )
    .unwrap();
    assert_eq!(cfg.data.eval_file, None);
    let cfg: SftConfig = config::load(Some(Path::new("configs/sft.toml")), &[]).unwrap();
    assert!(cfg.data.eval_file.is_some(), "the shipped config names one");
}
