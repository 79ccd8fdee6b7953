//! PEFT adapter files: rlft writes what PEFT writes, reads it back bit for bit; merging
//! equals the unmerged adapter; initialisation and targeting follow PEFT.

mod common;
use common::*;
use rlft::policies::candle_core::{DType, Device, Tensor};
use rlft::policies::lora::LoraInit;
use rlft::policies::{score, Adapter, LoraConfig, Targets};
use serde_json::Value;
use std::collections::BTreeMap;

fn shapes(path: &std::path::Path) -> BTreeMap<String, (Vec<usize>, DType)> {
    rlft::policies::candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, (t.dims().to_vec(), t.dtype())))
        .collect()
}

fn read_json(p: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn saving_a_peft_adapter_reproduces_peft_s_files() {
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let adapter = load_adapter(m, &pre);
        let tmp = TempDir::new(&format!("save-{m}"));
        adapter.save(&tmp.0).unwrap();
        let src = fixture(&format!("{m}-lora"));
        // Same tensor names, shapes and dtype as the file PEFT wrote.
        assert_eq!(
            shapes(&tmp.0.join("adapter_model.safetensors")),
            shapes(&src.join("adapter_model.safetensors")),
            "{m}"
        );
        // The same values, bit for bit.
        let a = rlft::policies::candle_core::safetensors::load(
            tmp.0.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let b = rlft::policies::candle_core::safetensors::load(
            src.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for (k, t) in &a {
            let d = (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{m} {k}");
        }
        // The configuration fields PEFT reads agree with PEFT's own file.
        let ours = read_json(&tmp.0.join("adapter_config.json"));
        let theirs = read_json(&src.join("adapter_config.json"));
        for key in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "fan_in_fan_out",
            "bias",
            "use_rslora",
            "use_dora",
            "base_model_name_or_path",
            "modules_to_save",
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
        ] {
            let (o, t) = (&ours[key], &theirs[key]);
            let same = o == t || (o.as_f64().is_some() && o.as_f64() == t.as_f64());
            assert!(
                same,
                "{m}: adapter_config.json `{key}`: ours {o}, PEFT's {t}"
            );
        }
        assert!(no_temp_files(&tmp.0), "no temporary file left behind");
    }
}

fn no_temp_files(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"))
}

#[test]
fn a_trained_adapter_round_trips_through_peft_format() {
    for m in FAMILIES {
        let pre = load(m, DType::F32);
        let cfg = LoraConfig {
            r: 3,
            lora_alpha: 6.0,
            use_rslora: true,
            target_modules: Targets::all_linear(),
            base_model_name_or_path: Some(format!("../{m}")),
            ..LoraConfig::default()
        };
        let adapter = Adapter::new(pre.model.as_ref(), cfg, 11).unwrap();
        // Give B values as training would.
        for (_, module) in adapter.modules() {
            let b = Tensor::randn(0f32, 0.3, module.b.as_tensor().shape(), &Device::Cpu).unwrap();
            module.b.set(&b).unwrap();
        }
        let tmp = TempDir::new(&format!("roundtrip-{m}"));
        adapter.save(&tmp.0).unwrap();
        let back = Adapter::load(&tmp.0, pre.model.as_ref()).unwrap();
        assert_eq!(back.config.r, 3);
        assert!(back.config.use_rslora);
        assert_eq!(back.config.fan_in_fan_out, m == "gpt2");
        assert_eq!(back.named_vars().len(), adapter.named_vars().len());
        let ids = pre.tokenizer.encode("The quick brown fox", true).unwrap();
        let before = score(pre.model.as_ref(), Some(&adapter), &[ids.clone()], 0, 1.0).unwrap();
        let after = score(pre.model.as_ref(), Some(&back), &[ids.clone()], 0, 1.0).unwrap();
        assert_eq!(
            before, after,
            "{m}: identical log-probs after the round trip"
        );
        let base = score(pre.model.as_ref(), None, &[ids], 0, 1.0).unwrap();
        assert!(
            max_abs_diff(&base[0], &before[0]) > 1e-3,
            "{m}: the adapter matters"
        );
        // PEFT's target_modules records leaf names; all-linear never includes lm_head.
        let cfg = read_json(&tmp.0.join("adapter_config.json"));
        let targets: Vec<&str> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(!targets.contains(&"lm_head"));
        let want: &[&str] = if m == "gpt2" {
            &["c_attn", "c_fc", "c_proj"]
        } else {
            &[
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj",
            ]
        };
        assert_eq!(targets, want, "{m}");
    }
}

#[test]
fn merging_equals_the_unmerged_adapter_and_disabling_restores_the_base() {
    for m in FAMILIES {
        let mut pre = load(m, DType::F32);
        let adapter = load_adapter(m, &pre);
        let r = reference(m);
        let ids = u32s(&r["lora"]["outputs"][1]["input_ids"]);
        let want = f32s(&r["lora"]["outputs"][1]["next_token_logprobs"]);
        let base_want = f32s(&r["base"][1]["next_token_logprobs"]);
        // Enable/disable on the same base tensors: no copy, both answers right.
        let on = score(pre.model.as_ref(), Some(&adapter), &[ids.clone()], 0, 1.0).unwrap();
        let off = score(pre.model.as_ref(), None, &[ids.clone()], 0, 1.0).unwrap();
        assert!(max_abs_diff(&on[0], &want) < 1e-4);
        assert!(max_abs_diff(&off[0], &base_want) < 1e-4);
        adapter.merge_into(pre.model.as_mut()).unwrap();
        let merged = score(pre.model.as_ref(), None, &[ids], 0, 1.0).unwrap();
        let err = max_abs_diff(&merged[0], &want);
        assert!(
            err < 1e-4,
            "{m}: merged model differs from base + adapter by {err}"
        );
    }
}

#[test]
fn peft_initialisation_b_zero_and_a_in_kaiming_bounds() {
    let pre = load("llama", DType::F32);
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..LoraConfig::default()
    };
    let a = Adapter::new(pre.model.as_ref(), cfg.clone(), 1).unwrap();
    let ids = pre.tokenizer.encode("12+35=47", true).unwrap();
    let base = score(pre.model.as_ref(), None, &[ids.clone()], 0, 1.0).unwrap();
    let fresh = score(pre.model.as_ref(), Some(&a), &[ids], 0, 1.0).unwrap();
    assert_eq!(base, fresh, "a fresh adapter is the identity (B = 0)");
    let paths: Vec<&String> = a.modules().map(|(p, _)| p).collect();
    assert_eq!(paths.len(), 4, "q_proj and v_proj of 2 layers");
    assert!(paths
        .iter()
        .all(|p| p.ends_with("q_proj") || p.ends_with("v_proj")));
    let mut all = Vec::new();
    for (_, m) in a.modules() {
        let b =
            m.b.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(b.iter().all(|&x| x == 0.0));
        all.extend(
            m.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    // U(−1/√64, 1/√64): within the bound, and spread across it (variance bound²/3).
    let bound = 1.0 / 8.0;
    assert!(all.iter().all(|x| x.abs() <= bound));
    let var = all.iter().map(|x| x * x).sum::<f32>() / all.len() as f32;
    assert!(
        (var - bound * bound / 3.0).abs() < 0.15 * bound * bound / 3.0,
        "variance {var}"
    );
    // Seeded: the same seed gives the same A.
    let again = Adapter::new(pre.model.as_ref(), cfg.clone(), 1).unwrap();
    let x = again
        .modules()
        .next()
        .unwrap()
        .1
        .a
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(x[..], all[..x.len()]);
    // Gaussian init: N(0, 1/r).
    let g = Adapter::new(
        pre.model.as_ref(),
        LoraConfig {
            init: LoraInit::Gaussian,
            ..cfg
        },
        2,
    )
    .unwrap();
    let vals: Vec<f32> = g
        .modules()
        .flat_map(|(_, m)| {
            m.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let std = (vals.iter().map(|x| x * x).sum::<f32>() / vals.len() as f32).sqrt();
    assert!((std - 0.25).abs() < 0.02, "std {std}");
}

#[test]
fn target_module_matching_follows_peft() {
    let t = Targets::List(vec!["q_proj".into()]);
    assert!(t.matches("model.layers.0.self_attn.q_proj", false).unwrap());
    assert!(t.matches("q_proj", false).unwrap());
    assert!(!t
        .matches("model.layers.0.self_attn.qq_proj", false)
        .unwrap());
    let all = Targets::all_linear();
    assert!(all.matches("model.layers.0.mlp.up_proj", false).unwrap());
    assert!(!all.matches("lm_head", true).unwrap());
    let re = Targets::Pattern(r".*\.0\.self_attn\.(q|v)_proj".into());
    assert!(re
        .matches("model.layers.0.self_attn.v_proj", false)
        .unwrap());
    assert!(!re
        .matches("model.layers.1.self_attn.v_proj", false)
        .unwrap());
    let pre = load("llama", DType::F32);
    let cfg = LoraConfig {
        target_modules: Targets::List(vec!["nope".into()]),
        ..LoraConfig::default()
    };
    let err = Adapter::new(pre.model.as_ref(), cfg, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("selects no module") && err.contains("q_proj"),
        "{err}"
    );
    let scale = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: true,
        ..LoraConfig::default()
    }
    .scale();
    assert_eq!(scale, 4.0, "rsLoRA: α/√r");
}
