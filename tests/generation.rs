//! Batched KV-cached generation: the cache changes nothing, padding changes nothing,
//! seeds repeat, stop tokens end sequences; the `rlft generate` CLI contract.

mod common;
use common::*;
use rlft::policies::candle_core::DType;
use rlft::policies::{generate, generate_unshared, GenerationConfig, SamplingParams};
use serde_json::Value;

fn prompts(pre: &rlft::policies::Pretrained) -> Vec<Vec<u32>> {
    ["12+35=", "The quick brown fox jumps", "7+8="]
        .iter()
        .map(|p| pre.tokenizer.encode(p, true).unwrap())
        .collect()
}

fn cfg(sampling: SamplingParams, use_cache: bool) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 12,
        sampling,
        seed: 42,
        stop_ids: vec![],
        pad_id: 0,
        use_cache,
    }
}

#[test]
fn cached_and_uncached_decoding_agree() {
    let sampled = SamplingParams {
        temperature: 0.9,
        top_k: Some(50),
        top_p: Some(0.95),
    };
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let adapter = load_adapter(m, &pre);
        let ps = prompts(&pre);
        for sampling in [SamplingParams::greedy(), sampled.clone()] {
            for a in [None, Some(&adapter)] {
                let cached =
                    generate(pre.model.as_ref(), a, &ps, &cfg(sampling.clone(), true)).unwrap();
                let full =
                    generate(pre.model.as_ref(), a, &ps, &cfg(sampling.clone(), false)).unwrap();
                assert_eq!(cached, full, "{m} {sampling:?} adapter={}", a.is_some());
                assert!(cached.iter().all(|g| g.completion_ids.len() == 12));
            }
        }
    }
}

/// GRPO's groups: rows that repeat a prompt consecutively share one prefill. The completions
/// equal those of prefilling every row and those of decoding without a cache, with ragged
/// prompt lengths (left padding), a prompt repeated again after another group (its own
/// group), sampling and greedy, with and without an adapter, in f32 and bf16.
#[test]
fn groups_share_their_prompt_prefill_exactly() {
    let sampled = SamplingParams {
        temperature: 0.9,
        top_k: Some(50),
        top_p: Some(0.95),
    };
    for m in FAMILIES {
        for dtype in [DType::F32, DType::BF16] {
            let pre = load(m, dtype);
            let adapter = load_adapter(m, &pre);
            let p = prompts(&pre);
            let rows: Vec<Vec<u32>> = [0, 0, 0, 1, 1, 2, 0, 0]
                .iter()
                .map(|&i| p[i].clone())
                .collect();
            for sampling in [SamplingParams::greedy(), sampled.clone()] {
                for a in [None, Some(&adapter)] {
                    let what = format!("{m} {dtype:?} {sampling:?} adapter={}", a.is_some());
                    let c = cfg(sampling.clone(), true);
                    let shared = generate(pre.model.as_ref(), a, &rows, &c).unwrap();
                    let each = generate_unshared(pre.model.as_ref(), a, &rows, &c).unwrap();
                    assert_eq!(shared, each, "{what}");
                    if dtype == DType::F32 {
                        let full =
                            generate(pre.model.as_ref(), a, &rows, &cfg(sampling.clone(), false))
                                .unwrap();
                        assert_eq!(shared, full, "{what}: uncached");
                    }
                    if sampling.temperature > 0.0 {
                        // Sampled rows of one group differ: each row draws its own tokens.
                        assert_ne!(shared[0].completion_ids, shared[1].completion_ids, "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn batching_with_left_padding_matches_one_prompt_at_a_time() {
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let ps = prompts(&pre);
        let batch = generate(
            pre.model.as_ref(),
            None,
            &ps,
            &cfg(SamplingParams::greedy(), true),
        )
        .unwrap();
        for (i, p) in ps.iter().enumerate() {
            let one = generate(
                pre.model.as_ref(),
                None,
                &[p.clone()],
                &cfg(SamplingParams::greedy(), true),
            )
            .unwrap();
            assert_eq!(one[0], batch[i], "{m} prompt {i}");
        }
    }
}

#[test]
fn greedy_generation_follows_the_argmax_of_full_forward_passes() {
    // Independent of the generator: extend the sequence by the argmax of a plain scoring pass.
    use rlft::policies::{BatchInput, ForwardCtx};
    let pre = load("qwen2", DType::F32);
    let p = pre.tokenizer.encode("12+35=", true).unwrap();
    let got = generate(
        pre.model.as_ref(),
        None,
        &[p.clone()],
        &cfg(SamplingParams::greedy(), true),
    )
    .unwrap();
    let mut seq = p.clone();
    for _ in 0..12 {
        let input = BatchInput::left_padded(&[seq.clone()], 0, &pre.model.info().device).unwrap();
        let logits = pre
            .model
            .forward(&input, &ForwardCtx::inference(None))
            .unwrap();
        let last = logits
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .pop()
            .unwrap();
        seq.push(rlft::policies::sampling::argmax(&last));
    }
    assert_eq!(got[0].completion_ids, seq[p.len()..].to_vec());
}

#[test]
fn seeds_repeat_and_differ() {
    let pre = load("llama", DType::F32);
    let ps = prompts(&pre);
    let s = SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: None,
    };
    let mut c = cfg(s, true);
    let a = generate(pre.model.as_ref(), None, &ps, &c).unwrap();
    let b = generate(pre.model.as_ref(), None, &ps, &c).unwrap();
    assert_eq!(a, b);
    c.seed = 43;
    let d = generate(pre.model.as_ref(), None, &ps, &c).unwrap();
    assert_ne!(a, d);
}

#[test]
fn each_sequence_stops_at_its_own_stop_token() {
    let pre = load("llama", DType::F32);
    let ps = prompts(&pre);
    let free = generate(
        pre.model.as_ref(),
        None,
        &ps,
        &cfg(SamplingParams::greedy(), true),
    )
    .unwrap();
    // Stop on the third token that prompt 0 generates freely.
    let stop = free[0].completion_ids[2];
    let mut c = cfg(SamplingParams::greedy(), true);
    c.stop_ids = vec![stop];
    let got = generate(pre.model.as_ref(), None, &ps, &c).unwrap();
    for (g, f) in got.iter().zip(&free) {
        match f.completion_ids.iter().position(|&t| t == stop) {
            Some(k) => {
                assert!(g.stopped);
                assert_eq!(
                    g.completion_ids,
                    f.completion_ids[..=k].to_vec(),
                    "stop token included"
                );
            }
            None => {
                assert!(!g.stopped);
                assert_eq!(g.completion_ids, f.completion_ids);
            }
        }
    }
    assert!(got[0].completion_ids.len() <= 3);
}

#[test]
fn cli_generate_json_contract() {
    let model = fixture("gpt2");
    let adapter = fixture("gpt2-lora");
    let out = rlft(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "12+35=",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let pre = load("gpt2", DType::F32);
    for (line, p) in lines.iter().zip(["12+35=", "Hello"]) {
        assert_eq!(
            u32s(&line["prompt_ids"]),
            pre.tokenizer.encode(p, true).unwrap()
        );
        let ids = u32s(&line["completion_ids"]);
        assert!(!ids.is_empty() && ids.len() <= 5);
        let stopped = line["stopped"].as_bool().unwrap();
        assert_eq!(
            stopped,
            ids.last() == Some(&2),
            "stopped iff it ends with EOS"
        );
        assert_eq!(
            line["completion"].as_str().unwrap(),
            pre.tokenizer.decode(&ids, true).unwrap()
        );
    }
    // Same seed, same output.
    let again = rlft(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "12+35=",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(stdout(&again), stdout(&out));
}
