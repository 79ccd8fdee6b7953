//! Bad input gives a clear error naming the file and key, exit code 1, and no panic.

mod common;
use common::*;
use std::path::Path;

/// Runs `rlft logprobs` and returns stderr, asserting a clean failure.
fn fails(args: &[&str]) -> String {
    let out = rlft(args);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {:?}: {err}",
        out.status
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

fn logprobs(model: &Path, adapter: Option<&Path>) -> String {
    let mut args = vec![
        "logprobs",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "hi",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    fails(&args)
}

#[test]
fn missing_model_folder() {
    let err = logprobs(Path::new("/nonexistent/model"), None);
    assert!(
        err.contains("/nonexistent/model") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn missing_files_in_the_model_folder() {
    for (file, words) in [
        ("model.safetensors", "model weights"),
        ("tokenizer.json", "tokenizer"),
        ("config.json", "configuration"),
    ] {
        let tmp = TempDir::new(&format!("missing-{file}"));
        copy_dir(&fixture("llama"), &tmp.0);
        std::fs::remove_file(tmp.0.join(file)).unwrap();
        let err = logprobs(&tmp.0, None);
        assert!(err.contains(file) && err.contains(words), "{file}: {err}");
    }
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let tmp = TempDir::new("unsupported");
    copy_dir(&fixture("llama"), &tmp.0);
    let cfg = std::fs::read_to_string(tmp.0.join("config.json")).unwrap();
    std::fs::write(
        tmp.0.join("config.json"),
        cfg.replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    let err = logprobs(&tmp.0, None);
    assert!(
        err.contains("config.json") && err.contains("falcon"),
        "{err}"
    );
    assert!(err.contains("llama, mistral, qwen2, gpt2"), "{err}");
}

#[test]
fn a_weight_with_the_wrong_shape_or_a_truncated_file() {
    let tmp = TempDir::new("badshape");
    copy_dir(&fixture("llama"), &tmp.0);
    let cfg = std::fs::read_to_string(tmp.0.join("config.json")).unwrap();
    std::fs::write(
        tmp.0.join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let err = logprobs(&tmp.0, None);
    assert!(
        err.contains("model.safetensors")
            && err.contains("mlp.gate_proj.weight")
            && err.contains("[128, 64]"),
        "{err}"
    );

    let tmp = TempDir::new("truncated");
    copy_dir(&fixture("llama"), &tmp.0);
    let bytes = std::fs::read(tmp.0.join("model.safetensors")).unwrap();
    std::fs::write(tmp.0.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = logprobs(&tmp.0, None);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn an_adapter_for_another_architecture_names_the_key() {
    let err = logprobs(&fixture("llama"), Some(&fixture("gpt2-lora")));
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    assert!(
        err.contains("transformer.h.0.attn.c_attn.lora_A.weight")
            && err.contains("another architecture"),
        "{err}"
    );
}

#[test]
fn an_adapter_whose_shapes_do_not_fit_names_the_key() {
    let tmp = TempDir::new("adapter-r");
    copy_dir(&fixture("llama-lora"), &tmp.0);
    let cfg = std::fs::read_to_string(tmp.0.join("adapter_config.json")).unwrap();
    std::fs::write(
        tmp.0.join("adapter_config.json"),
        cfg.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    let err = logprobs(&fixture("llama"), Some(&tmp.0));
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("lora_A.weight")
            && err.contains("[8, 64]"),
        "{err}"
    );
}

#[test]
fn a_missing_adapter_file() {
    let tmp = TempDir::new("adapter-missing");
    copy_dir(&fixture("llama-lora"), &tmp.0);
    std::fs::remove_file(tmp.0.join("adapter_config.json")).unwrap();
    let err = logprobs(&fixture("llama"), Some(&tmp.0));
    assert!(
        err.contains("adapter_config.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn a_sequence_longer_than_the_positions() {
    let long = "1+1=2 ".repeat(200);
    let out = rlft(&[
        "logprobs",
        "--model",
        fixture("gpt2").to_str().unwrap(),
        "--text",
        &long,
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("256 positions"), "{err}");
}

#[test]
fn bad_sampling_arguments() {
    let out = rlft(&[
        "generate",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "1.5",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("top_p must be in (0, 1]"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["logprobs", "--help"],
        &["generate", "--help"],
    ] {
        let out = rlft(cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(stdout(&out).contains("Usage: rlft"), "{cmd:?}");
    }
    let out = rlft(&["generate", "--help"]);
    for flag in [
        "--model",
        "--adapter",
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--json",
    ] {
        assert!(stdout(&out).contains(flag), "{flag}");
    }
}

/// `--quantization`: an unknown kind lists the known ones; `rlft merge` refuses to write a
/// quantized model (it merges into the base as stored); `logprobs` on an NF4 base runs and
/// its log-probs move from the full-precision ones.
#[test]
fn quantization_flags() {
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let err = fails(&[
        "logprobs",
        "--model",
        m,
        "--text",
        "hi",
        "--quantization",
        "nf3",
    ]);
    assert!(
        err.contains("--quantization") && err.contains("\"nf3\"") && err.contains("int8, nf4, fp4"),
        "{err}"
    );
    let adapter = fixture("llama-lora");
    let tmp = TempDir::new("merge-q");
    let out = tmp.0.join("m");
    let err = fails(&[
        "merge",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quantization",
        "nf4",
    ]);
    assert!(
        err.contains("full-precision") && err.contains("drop --quantization"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    let run = |q: &str| -> Vec<f64> {
        let o = rlft(&[
            "logprobs",
            "--model",
            m,
            "--text",
            "12+35=47",
            "--json",
            "--quantization",
            q,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap())
                .unwrap();
        v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (full, nf4) = (run("none"), run("nf4"));
    assert_eq!(full.len(), nf4.len());
    assert!(
        full.iter().zip(&nf4).any(|(a, b)| (a - b).abs() > 1e-4),
        "{full:?} vs {nf4:?}"
    );
}
