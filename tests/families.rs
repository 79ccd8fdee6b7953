//! Loading variants that the fixtures do not cover directly: Mistral (the Llama block with a
//! sliding window), sharded safetensors, Llama 3 rope scaling.

mod common;
use common::*;
use rlft::policies::candle_core::{safetensors, DType, Device, Tensor};
use rlft::policies::{generate, score, GenerationConfig, Pretrained, SamplingParams};
use std::collections::HashMap;
use std::path::Path;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn ref_case(model: &str) -> (Vec<u32>, Vec<f32>) {
    let r = reference(model);
    let c = &r["base"][1];
    (u32s(&c["input_ids"]), f32s(&c["next_token_logprobs"]))
}

#[test]
fn mistral_is_llama_with_a_sliding_window() {
    let (ids, want) = ref_case("llama");
    assert!(ids.len() > 8);
    let tmp = TempDir::new("mistral");
    copy_dir(&fixture("llama"), &tmp.0);
    // A window wider than the text: exactly Llama.
    edit_config(&tmp.0, |c| {
        c["model_type"] = "mistral".into();
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        c["sliding_window"] = 4096.into();
    });
    let pre = Pretrained::load(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pre.model.info().model_type, "mistral");
    let got = score(pre.model.as_ref(), None, &[ids.clone()], 0, 1.0).unwrap();
    assert!(max_abs_diff(&got[0], &want) < 1e-4);
    // A window of 4: the first 4 positions see the same keys as Llama, later ones fewer.
    edit_config(&tmp.0, |c| c["sliding_window"] = 4.into());
    let pre = Pretrained::load(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    let got = score(pre.model.as_ref(), None, &[ids.clone()], 0, 1.0).unwrap();
    assert!(
        max_abs_diff(&got[0][..3], &want[..3]) < 1e-4,
        "positions < window unchanged"
    );
    assert!(
        max_abs_diff(&got[0][4..], &want[4..]) > 1e-3,
        "later positions differ"
    );
    // The window is honoured in cached decoding too.
    let cfg = |use_cache| GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingParams::greedy(),
        seed: 0,
        stop_ids: vec![],
        pad_id: 0,
        use_cache,
    };
    let a = generate(pre.model.as_ref(), None, &[ids.clone()], &cfg(true)).unwrap();
    let b = generate(pre.model.as_ref(), None, &[ids], &cfg(false)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let (ids, want) = ref_case("qwen2");
    let tmp = TempDir::new("sharded");
    copy_dir(&fixture("qwen2"), &tmp.0);
    let all = safetensors::load(tmp.0.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(tmp.0.join("model.safetensors")).unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let s = i % 2;
        shards[s].insert((*name).clone(), all[*name].clone());
        weight_map.insert(
            (*name).clone(),
            format!("model-0000{}-of-00002.safetensors", s + 1).into(),
        );
    }
    for (s, shard) in shards.iter().enumerate() {
        safetensors::save(
            shard,
            tmp.0
                .join(format!("model-0000{}-of-00002.safetensors", s + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        tmp.0.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let pre = Pretrained::load(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    let got = score(pre.model.as_ref(), None, &[ids], 0, 1.0).unwrap();
    assert!(max_abs_diff(&got[0], &want) < 1e-4);
    // A shard that is missing is named.
    std::fs::remove_file(tmp.0.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Pretrained::load(&tmp.0, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn llama3_rope_scaling_changes_only_long_wavelengths() {
    let (ids, want) = ref_case("llama");
    let tmp = TempDir::new("llama3");
    copy_dir(&fixture("llama"), &tmp.0);
    // With original_max_position_embeddings tiny, every wavelength is "short": no change.
    edit_config(&tmp.0, |c| {
        c["rope_parameters"] = serde_json::json!({
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8
        });
    });
    let pre = Pretrained::load(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    let got = score(pre.model.as_ref(), None, &[ids.clone()], 0, 1.0).unwrap();
    // Wavelengths of head_dim 16, theta 1e4 run from 2π to ~2e4; with an original context of
    // 8 tokens the high-frequency limit is 2 and everything above 8 is divided by the factor,
    // so the outputs must change.
    assert!(max_abs_diff(&got[0], &want) > 1e-4);
    // With a huge original context nothing is scaled: the outputs are Llama's.
    edit_config(&tmp.0, |c| {
        c["rope_parameters"]["original_max_position_embeddings"] = 1e9.into()
    });
    let pre = Pretrained::load(&tmp.0, DType::F32, &Device::Cpu).unwrap();
    let got = score(pre.model.as_ref(), None, &[ids], 0, 1.0).unwrap();
    assert!(max_abs_diff(&got[0], &want) < 1e-5);
}
