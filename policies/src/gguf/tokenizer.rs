//! A GGUF's tokenizer metadata as `tokenizer.json` and `tokenizer_config.json`, built as
//! transformers' GGUF loader builds them (`integrations/gguf/gguf_tokenizer_mapping.py`):
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE (GPT-2's tokenizer) from the tokens and
//!   merges; a token not spelled in the byte alphabet is respelled in it; the pre-tokenizer is
//!   the split regex named by `tokenizer.ggml.pre` where transformers knows it (Llama 3's,
//!   Qwen2's), else GPT-2's byte-level split;
//! - `"llama"`: SentencePiece-style BPE with byte fallback (Llama's tokenizer), the merges
//!   taken from the file or recovered from the token scores (`generate_merges`);
//! - tokens typed control (3) become special added tokens, user-defined (4) plain added ones;
//!   BOS is prepended when `tokenizer.ggml.add_bos_token` says so (SentencePiece: by default).

use super::config::HfConfig;
use super::{err, Meta};
use crate::error::Result;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

pub struct HfTokenizer {
    pub tokenizer: Value,
    pub config: Value,
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("a valid code point")
        };
    }
    table
}

/// Llama 3's split regex (`llama3`, `llama-bpe`, …).
pub(super) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (`qwen2`, `deepseek-r1-qwen`).
pub(super) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

pub fn hf_tokenizer(meta: &Meta, cfg: &HfConfig) -> Result<HfTokenizer> {
    let kind = meta.str("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    if tokens.len() > cfg.vocab_size {
        return Err(err(meta.file, "more tokens than the model's vocabulary"));
    }
    let types = meta
        .opt_ints("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    let id_of = |key: &str| -> Result<Option<usize>> {
        let id = meta.opt_u64(key)?.map(|v| v as usize);
        match id {
            Some(i) if i >= tokens.len() => Err(err(
                meta.file,
                format!(
                    "metadata `{key}`: id {i} outside the {} tokens",
                    tokens.len()
                ),
            )),
            _ => Ok(id),
        }
    };
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let eos = id_of("tokenizer.ggml.eos_token_id")?;
    let unk = id_of("tokenizer.ggml.unknown_token_id")?;
    let pad = id_of("tokenizer.ggml.padding_token_id")?;
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(kind == "llama");
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let (model, pre, decoder, spelled): (Value, Value, Value, Vec<String>) = match kind {
        "gpt2" => {
            let spelled: Vec<String> = tokens
                .iter()
                .map(|t| {
                    if t.chars().all(|c| alphabet.contains(&c)) {
                        t.to_string()
                    } else {
                        t.bytes().map(|b| table[b as usize]).collect()
                    }
                })
                .collect();
            let merges = merges_from_file(meta)?.ok_or_else(|| {
                err(meta.file, "metadata `tokenizer.ggml.merges` missing (a byte-level BPE needs it)")
            })?;
            let pre_name = meta.str("tokenizer.ggml.pre").unwrap_or("default");
            let pre = match split_regex(pre_name) {
                Some(re) => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
                ]}),
                None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            };
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_json(&spelled), "merges": merges,
            });
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            (model, pre, decoder, spelled)
        }
        "llama" => {
            let spelled: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
            let merges = match merges_from_file(meta)? {
                Some(m) => m,
                None => {
                    let scores = meta.opt_floats("tokenizer.ggml.scores")?.ok_or_else(|| {
                        err(meta.file, "metadata: neither `tokenizer.ggml.merges` nor `tokenizer.ggml.scores`")
                    })?;
                    generate_merges(&spelled, &scores)
                }
            };
            let model = json!({
                "type": "BPE", "dropout": null,
                "unk_token": unk.map(|i| spelled[i].clone()),
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab_json(&spelled), "merges": merges,
            });
            let pre = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false});
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]});
            (model, pre, decoder, spelled)
        }
        other => {
            return Err(err(
                meta.file,
                format!("unsupported tokenizer.ggml.model `{other}`; supported: gpt2 (byte-level BPE), llama (SentencePiece)"),
            ))
        }
    };

    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        let special = match ty {
            // A control token outside the byte alphabet is a llama.cpp mislabel in a byte-level
            // vocabulary: transformers skips it, and so do we.
            3 if kind != "gpt2" || t.chars().all(|c| alphabet.contains(&c)) => true,
            4 => false,
            _ => continue,
        };
        added.push(
            json!({"id": i, "content": spelled[i], "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special}),
        );
    }
    let post = post_processor(
        &spelled,
        add_bos.then_some(bos).flatten(),
        add_eos.then_some(eos).flatten(),
    );
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null, "pre_tokenizer": pre,
        "post_processor": post, "decoder": decoder, "model": model,
    });
    let name = |id: Option<usize>| id.map(|i| spelled[i].clone());
    let mut config = json!({
        "bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk), "pad_token": name(pad),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
        // Not a transformers key: llama.cpp's pre-tokenizer name, for a GGUF export.
        "gguf_pre": meta.str("tokenizer.ggml.pre").ok(),
        "model_max_length": cfg.json["max_position_embeddings"],
    });
    if let Some(v) = meta.get("tokenizer.chat_template") {
        let t = v.to_string().map_err(|_| {
            err(
                meta.file,
                "metadata `tokenizer.chat_template`: not a string",
            )
        })?;
        config["chat_template"] = json!(t);
    }
    Ok(HfTokenizer { tokenizer, config })
}

fn vocab_json(spelled: &[String]) -> Value {
    let mut m = Map::new();
    for (i, t) in spelled.iter().enumerate() {
        m.entry(t.clone()).or_insert(json!(i));
    }
    Value::Object(m)
}

/// `tokenizer.ggml.merges` ("a b" each) as pairs, or `None` when the file has none.
fn merges_from_file(meta: &Meta) -> Result<Option<Vec<(String, String)>>> {
    if meta.get("tokenizer.ggml.merges").is_none() {
        return Ok(None);
    }
    meta.strings("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    err(
                        meta.file,
                        format!("tokenizer.ggml.merges[{i}] `{m}` is not two tokens"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// transformers' `generate_merges` with scores: every split of every token into two tokens of
/// the vocabulary, ordered by the merged token's score (best first), then the parts' lengths.
pub fn generate_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (t, &score) in tokens.iter().zip(scores) {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let mut local = Vec::new();
        for (i, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(i);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                local.push((l, r, score, a, b));
            }
        }
        local.sort_by_key(|x| (x.3, x.4));
        merges.extend(local.into_iter().map(|x| (x.0, x.1, x.2)));
    }
    let len = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        (b.2, len(b.0), len(b.1))
            .partial_cmp(&(a.2, len(a.0), len(a.1)))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(a, b, _)| (a.to_string(), b.to_string()))
        .collect()
}

/// A `TemplateProcessing` adding BOS (and EOS) around a sequence, or none.
fn post_processor(spelled: &[String], bos: Option<usize>, eos: Option<usize>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let tok = |i: usize| json!({"SpecialToken": {"id": spelled[i], "type_id": 0}});
    let seq = |id: &str, ty: u32| json!({"Sequence": {"id": id, "type_id": ty}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special = Map::new();
    if let Some(b) = bos {
        single.push(tok(b));
        pair.push(tok(b));
        special.insert(
            spelled[b].clone(),
            json!({"id": spelled[b], "ids": [b], "tokens": [spelled[b]]}),
        );
    }
    single.push(seq("A", 0));
    pair.push(seq("A", 0));
    if let Some(e) = eos {
        single.push(tok(e));
        pair.push(tok(e));
        special.insert(
            spelled[e].clone(),
            json!({"id": spelled[e], "ids": [e], "tokens": [spelled[e]]}),
        );
    }
    if let Some(b) = bos {
        pair.push(json!({"SpecialToken": {"id": spelled[b], "type_id": 1}}));
    }
    pair.push(seq("B", 1));
    if let Some(e) = eos {
        pair.push(json!({"SpecialToken": {"id": spelled[e], "type_id": 1}}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}
