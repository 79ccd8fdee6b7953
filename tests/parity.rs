//! Parity with transformers + PEFT: log-probs of every fixture model, with and without its
//! PEFT adapter, through the `rlft logprobs` CLI contract; the tokenizer and chat template.

mod common;
use common::*;
use rlft::policies::candle_core::DType;
use rlft::policies::score;
use serde_json::Value;

const TOL: f32 = 1e-4;

/// Runs `rlft logprobs --json` on every reference text and compares with `outputs`.
fn check_cli(model: &str, adapter: Option<&str>, outputs: &Value) -> f32 {
    let mut args = vec!["logprobs".to_string(), "--model".into()];
    args.push(fixture(model).to_string_lossy().into_owned());
    if let Some(a) = adapter {
        args.push("--adapter".into());
        args.push(fixture(a).to_string_lossy().into_owned());
    }
    let cases = outputs.as_array().unwrap();
    for c in cases {
        args.push("--text".into());
        args.push(c["text"].as_str().unwrap().to_string());
    }
    args.push("--json".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = rlft(&argv);
    assert!(out.status.success(), "rlft failed: {}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len(), "one JSON line per text");
    let mut worst = 0.0f32;
    for (line, c) in lines.iter().zip(cases) {
        let ids = u32s(&line["input_ids"]);
        assert_eq!(ids, u32s(&c["input_ids"]), "input_ids of {:?}", c["text"]);
        let got = f32s(&line["logprobs"]);
        assert_eq!(got.len(), ids.len() - 1);
        let want = f32s(&c["next_token_logprobs"]);
        let err = max_abs_diff(&got, &want);
        assert!(
            err < TOL,
            "{model} {adapter:?} {:?}: max error {err}",
            c["text"]
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn base_and_adapter_logprobs_match_transformers() {
    for m in FAMILIES {
        let r = reference(m);
        let base = check_cli(m, None, &r["base"]);
        let lora = check_cli(m, Some(&format!("{m}-lora")), &r["lora"]["outputs"]);
        eprintln!("{m}: max |Δ logprob| base {base:.2e}, with adapter {lora:.2e}");
    }
}

#[test]
fn the_adapter_changes_the_outputs() {
    // Guards the test above: reference base and adapter outputs differ, so the adapter
    // really was applied.
    for m in FAMILIES {
        let r = reference(m);
        let a = f32s(&r["base"][0]["next_token_logprobs"]);
        let b = f32s(&r["lora"]["outputs"][0]["next_token_logprobs"]);
        assert!(max_abs_diff(&a, &b) > 1e-2, "{m}");
    }
}

#[test]
fn left_padded_batch_matches_single_sequences() {
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let adapter = load_adapter(m, &pre);
        let r = reference(m);
        let rows: Vec<Vec<u32>> = r["lora"]["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| u32s(&c["input_ids"]))
            .collect();
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        assert!(
            lens.iter().min() != lens.iter().max(),
            "texts of different lengths"
        );
        let batch = score(pre.model.as_ref(), Some(&adapter), &rows, 0, 1.0).unwrap();
        for (i, c) in r["lora"]["outputs"].as_array().unwrap().iter().enumerate() {
            let err = max_abs_diff(&batch[i], &f32s(&c["next_token_logprobs"]));
            assert!(err < TOL, "{m} row {i} in a padded batch: {err}");
        }
    }
}

#[test]
fn logits_at_first_positions_match() {
    // Independent of the log-softmax: raw logits statistics at positions 0 and 1.
    use rlft::policies::{BatchInput, ForwardCtx};
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let r = reference(m);
        let case = &r["base"][1];
        let ids = u32s(&case["input_ids"]);
        let input = BatchInput::left_padded(&[ids], 0, &pre.model.info().device).unwrap();
        let logits = pre
            .model
            .forward(&input, &ForwardCtx::inference(None))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for p in case["logits_first2"].as_array().unwrap() {
            let pos = p["position"].as_u64().unwrap() as usize;
            let head = f32s(&p["head16"]);
            let err = max_abs_diff(&logits[pos][..16], &head);
            assert!(err < TOL, "{m} logits at {pos}: {err}");
            let max = logits[pos].iter().cloned().fold(f32::MIN, f32::max);
            assert!((max - p["max"].as_f64().unwrap() as f32).abs() < TOL);
            let argmax = rlft::policies::sampling::argmax(&logits[pos]);
            assert_eq!(
                argmax as u64,
                p["argmax"].as_u64().unwrap(),
                "{m} argmax at {pos}"
            );
        }
    }
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let r = reference(m);
        for c in r["base"].as_array().unwrap() {
            let ids = pre
                .tokenizer
                .encode(c["text"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(ids, u32s(&c["input_ids"]), "{m} {:?}", c["text"]);
        }
        let chat = &r["chat_example"];
        let rendered = pre
            .tokenizer
            .apply_chat_template(&chat["messages"], false)
            .unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap());
        // The fixture renders the first two messages (system, user) with the prompt.
        let first_two =
            serde_json::Value::Array(chat["messages"].as_array().unwrap()[..2].to_vec());
        let with_prompt = pre.tokenizer.apply_chat_template(&first_two, true).unwrap();
        assert_eq!(
            with_prompt,
            chat["rendered_generation_prompt"].as_str().unwrap()
        );
        let ids = pre.tokenizer.encode(&rendered, false).unwrap();
        assert_eq!(ids, u32s(&chat["ids_no_special"]));
        assert_eq!(pre.tokenizer.stop_ids, vec![2]);
        assert_eq!(pre.tokenizer.pad_id, Some(0));
    }
}

#[test]
fn bf16_and_f16_stay_close_to_f32() {
    for m in FAMILIES {
        let r = reference(m);
        let case = &r["lora"]["outputs"][1];
        let ids = u32s(&case["input_ids"]);
        let want = f32s(&case["next_token_logprobs"]);
        for dt in [DType::BF16, DType::F16] {
            let pre = load(m, dt);
            let adapter = load_adapter(m, &pre);
            let got = score(pre.model.as_ref(), Some(&adapter), &[ids.clone()], 0, 1.0).unwrap();
            let err = max_abs_diff(&got[0], &want);
            // bf16 keeps 8 bits of mantissa: errors of a few hundredths are expected.
            assert!(err < 0.15, "{m} {dt:?}: {err}");
        }
    }
}

/// On the CPU a bf16/f16 model keeps its matrices (linear weights, embeddings) in half
/// precision, its vectors in f32, and, with the widening kernels (`RLFT_BF16_KERNEL=f32`, or
/// a CPU without AVX512-BF16 or AMX), computes in f32: its log-probs equal, to f32 rounding,
/// those of the f32 model whose matrices were rounded to that dtype. (The bf16 kernels round
/// the activations to bf16 too: `bf16_and_f16_stay_close_to_f32` bounds them, the kernels'
/// own tests check their arithmetic.)
#[test]
fn half_precision_weights_compute_in_f32() {
    rlft_policies::ops::bf16_dot::with_engine(None, half_precision_weights_compute_in_f32_body)
}

fn half_precision_weights_compute_in_f32_body() {
    for m in FAMILIES {
        let r = reference(m);
        let case = &r["lora"]["outputs"][1];
        let ids = u32s(&case["input_ids"]);
        for dt in [DType::BF16, DType::F16] {
            let mut half = load(m, dt);
            assert_eq!(half.model.info().dtype, DType::F32, "{m} {dt:?}");
            assert_eq!(half.model.info().weight_dtype, dt);
            for (name, t) in half.model.params_mut() {
                let want = if t.rank() >= 2 { dt } else { DType::F32 };
                assert_eq!(t.dtype(), want, "{m} {dt:?} {name}");
            }
            let mut rounded = load(m, DType::F32);
            for (_, t) in rounded.model.params_mut() {
                if t.rank() >= 2 {
                    *t = t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
                }
            }
            rounded.model.sync_tied();
            let (ah, ar) = (load_adapter(m, &half), load_adapter(m, &rounded));
            let got = score(half.model.as_ref(), Some(&ah), &[ids.clone()], 0, 1.0).unwrap();
            let want = score(rounded.model.as_ref(), Some(&ar), &[ids.clone()], 0, 1.0).unwrap();
            let err = max_abs_diff(&got[0], &want[0]);
            assert!(err < 1e-5, "{m} {dt:?}: {err}");
        }
    }
}
