//! GGUF in and out on the bundled models (issue 23; the real model is `tests/real_model.rs`):
//! a fine-tune merged and exported as an f32 GGUF reads back bit for bit as the merged folder
//! (Llama: q/k rows permuted and unpermuted; Qwen2: biases, no permutation), and every bad
//! file is an error that names it, never a panic.

mod common;
use common::*;
use rlft::policies::candle_core::quantized::gguf_file::{self, Value};
use std::path::{Path, PathBuf};
use std::process::Output;

/// The GGUF cache inside `work` (removed with it).
fn cache(work: &Path) -> PathBuf {
    work.join("gguf-cache")
}

/// `rlft ARGS` with the GGUF cache inside `work`.
fn run(work: &Path, args: &[&str]) -> Output {
    rlft_cached(&cache(work), args)
}

const TEXTS: [&str; 2] = ["12+35=47", "The quick brown fox jumps over the lazy dog."];

fn logprobs(work: &Path, model: &Path) -> Vec<serde_json::Value> {
    logprobs_json(Some(&cache(work)), model, &TEXTS)
}

#[test]
fn an_f32_export_reads_back_exactly() {
    for m in ["llama", "qwen2"] {
        let work = TempDir::new(&format!("gguf-roundtrip-{m}"));
        let (folder, file) = (work.0.join("merged"), work.0.join("merged.gguf"));
        let (model, adapter) = (fixture(m), fixture(&format!("{m}-lora")));
        for out in [&folder, &file] {
            merge(&cache(&work.0), &model, &adapter, out, "f32");
        }
        // What a GGUF holds: llama.cpp's keys and names, the chat template, no temp files left.
        let mut f = std::fs::File::open(&file).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let arch = if m == "llama" { "llama" } else { "qwen2" };
        assert_eq!(
            content.metadata["general.architecture"]
                .to_string()
                .unwrap(),
            arch
        );
        assert!(content
            .metadata
            .contains_key(&format!("{arch}.attention.head_count_kv")));
        assert!(content.metadata.contains_key("tokenizer.ggml.merges"));
        assert!(content.tensor_infos.contains_key("blk.0.attn_q.weight"));
        assert!(content.tensor_infos.contains_key("token_embd.weight"));
        let files: Vec<_> = std::fs::read_dir(&work.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            files.len(),
            2,
            "{m}: only merged/ and merged.gguf: {files:?}"
        );
        // Log-probs and token ids of the export are the folder's, bit for bit.
        assert_eq!(logprobs(&work.0, &file), logprobs(&work.0, &folder), "{m}");
        // The second read comes from the cache, converted once.
        let cached: Vec<_> = std::fs::read_dir(work.0.join("gguf-cache"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(cached.len(), 1, "{m}: one converted folder");
        assert_eq!(
            logprobs(&work.0, &file),
            logprobs(&work.0, &folder),
            "{m}, cached"
        );
    }
}

/// A damaged, foreign or unsupported file is an error naming the file, with no panic and no
/// half-converted folder left in the cache.
#[test]
fn bad_gguf_files_are_clear_errors() {
    let work = TempDir::new("gguf-errors");
    let file = work.0.join("good.gguf");
    let (model, adapter) = (fixture("llama"), fixture("llama-lora"));
    merge(&cache(&work.0), &model, &adapter, &file, "q8_0");
    let bytes = std::fs::read(&file).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = work.0.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let mut foreign = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut foreign,
        &[("general.architecture", &Value::String("falcon".into()))],
        &[],
    )
    .unwrap();
    let cases = [
        (
            write("truncated.gguf", &bytes[..bytes.len() * 2 / 3]),
            "remaining",
        ),
        (
            write("header.gguf", &bytes[..64]),
            "not a readable GGUF file",
        ),
        (
            write("noise.gguf", &[7u8; 4096]),
            "not a readable GGUF file",
        ),
        (
            write("falcon.gguf", foreign.get_ref()),
            "unsupported architecture `falcon`",
        ),
        (work.0.join("missing.gguf"), "missing.gguf"),
    ];
    for (path, says) in cases {
        let o = run(
            &work.0,
            &[
                "logprobs",
                "--model",
                path.to_str().unwrap(),
                "--text",
                "hi",
            ],
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{}: accepted", path.display());
        assert!(!err.contains("panicked"), "{}: {err}", path.display());
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()),
            "{}: {err}",
            path.display()
        );
        assert!(err.contains(says), "{}: {err}", path.display());
    }
    let entries: Vec<_> = std::fs::read_dir(work.0.join("gguf-cache"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "failed conversions left {entries:?}");

    let o = run(
        &work.0,
        &[
            "merge",
            "--model",
            fixture("llama").to_str().unwrap(),
            "--adapter",
            fixture("llama-lora").to_str().unwrap(),
            "--out",
            work.0.join("x.gguf").to_str().unwrap(),
            "--gguf-type",
            "q3",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q4_k_m"), "{}", stderr(&o));
}

/// A GGUF that llama.cpp's own gguf-py wrote (`tests/fixtures/make_gguf_sp.py`): a
/// SentencePiece vocabulary (byte fallback, merges recovered from the scores, BOS added), f16
/// matrices, q/k permuted by convert_hf_to_gguf.py's rule. Token ids equal transformers' GGUF
/// loader's and log-probs are within 1e-4 of its f32 ones.
#[test]
fn a_sentencepiece_gguf_reads_as_transformers_reads_it() {
    let work = TempDir::new("gguf-sp");
    let file = fixture("gguf-sp/tiny-sp.gguf");
    let text = std::fs::read_to_string(fixture("gguf-sp/reference.json")).unwrap();
    let reference: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let texts: Vec<&str> = reference
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    let lines = logprobs_json(Some(&cache(&work.0)), &file, &texts);
    for (got, r) in lines.iter().zip(&reference) {
        assert_eq!(u32s(&got["input_ids"]), u32s(&r["ids"]), "{}", r["text"]);
        let d = max_abs_diff(&f32s(&got["logprobs"]), &f32s(&r["logprobs"]));
        assert!(d <= 1e-4, "{}: log-probs {d} from transformers'", r["text"]);
    }
}
