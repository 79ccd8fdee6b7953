//! A Hugging Face folder (a merged fine-tune) as a GGUF file llama.cpp and Ollama run: what
//! llama.cpp's `convert_hf_to_gguf.py` writes — `general.*` and `{arch}.*` hyper-parameter
//! keys, llama.cpp's tensor names, Llama's q/k rows permuted back to llama.cpp's order, the
//! byte-level BPE vocabulary, merges, token types, special ids and chat template — with the
//! 2-D weights in the chosen type (vectors stay F32, as there) and `q4_k_m` mixing types as
//! `llama-quantize` does (Q6_K for the output head and for some layers' `attn_v` and
//! `ffn_down`, and its fallbacks where a row is not a multiple of 256).
//!
//! The file is written beside `out` and renamed when complete.

use super::tensors::{gguf_name, permute_rows};
use super::{err, io};
use crate::error::{read_json, PolicyError, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// `--gguf-type`: the type of the exported 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4KM,
}

impl GgufType {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_k_m";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_k_m" => Self::Q4KM,
            _ => return None,
        })
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Bf16 => 32,
        }
    }
}

/// llama.cpp's `use_more_bits`: the layers `q4_k_m` keeps in Q6_K.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i >= n / 8 && (i - n / 8) % 3 == 2)
}

/// The type of the 2-D tensor `name` (of layer `layer` of `n_layers`) with rows of `cols`.
fn tensor_type(
    ty: GgufType,
    name: &str,
    layer: Option<usize>,
    n_layers: usize,
    cols: usize,
) -> GgmlDType {
    let want = match ty {
        GgufType::F32 => GgmlDType::F32,
        GgufType::F16 => GgmlDType::F16,
        GgufType::Bf16 => GgmlDType::BF16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4KM => {
            let more = layer.is_some_and(|i| use_more_bits(i, n_layers));
            if name == "output.weight"
                || (more && (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight")))
            {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    // llama.cpp's fallbacks for rows that do not fill whole blocks.
    let fits = |t: GgmlDType| cols % t.block_size() == 0;
    if fits(want) {
        return want;
    }
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlDType::F16
    }
}

fn key<'a>(cfg: &'a Json, path: &Path, k: &str) -> Result<&'a Json> {
    cfg.get(k)
        .filter(|v| !v.is_null())
        .ok_or_else(|| PolicyError::config(path, k, "missing"))
}

fn usize_key(cfg: &Json, path: &Path, k: &str) -> Result<usize> {
    key(cfg, path, k)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| PolicyError::config(path, k, "not an integer"))
}

/// Writes the GGUF of the model folder `dir` to `out`, its 2-D weights as `ty`.
pub fn export(dir: &Path, out: &Path, ty: GgufType) -> Result<()> {
    let cfg_path = dir.join("config.json");
    let cfg: Json = read_json(&cfg_path)?;
    let model_type = key(&cfg, &cfg_path, "model_type")?.as_str().unwrap_or("");
    let arch = match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        other => {
            return Err(PolicyError::UnsupportedModel {
                path: cfg_path,
                model_type: other.to_string(),
                supported: "llama, mistral, qwen2 (GGUF export)".into(),
            })
        }
    };
    let hidden = usize_key(&cfg, &cfg_path, "hidden_size")?;
    let heads = usize_key(&cfg, &cfg_path, "num_attention_heads")?;
    let kv_heads = cfg
        .get("num_key_value_heads")
        .and_then(Json::as_u64)
        .map_or(heads, |v| v as usize);
    let layers = usize_key(&cfg, &cfg_path, "num_hidden_layers")?;
    let vocab = usize_key(&cfg, &cfg_path, "vocab_size")?;
    let head_dim = cfg
        .get("head_dim")
        .and_then(Json::as_u64)
        .map_or(hidden / heads, |v| v as usize);
    let rope = cfg
        .get("rope_parameters")
        .or_else(|| cfg.get("rope_scaling"))
        .filter(|v| v.is_object());
    let rope_type = rope
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Json::as_str)
        .unwrap_or("default");
    if !matches!(rope_type, "default" | "linear") {
        return Err(PolicyError::config(
            &cfg_path,
            "rope_scaling",
            &format!("rope_type `{rope_type}` has no GGUF export here (default, linear)"),
        ));
    }
    let theta = rope
        .and_then(|r| r.get("rope_theta"))
        .or_else(|| cfg.get("rope_theta"))
        .and_then(Json::as_f64)
        .unwrap_or(10_000.0);
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(Json::as_bool)
        .unwrap_or(false);

    let a = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        (
            "general.name".into(),
            Value::String(
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("model")
                    .into(),
            ),
        ),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (a("block_count"), Value::U32(layers as u32)),
        (
            a("context_length"),
            Value::U32(
                cfg.get("max_position_embeddings")
                    .and_then(Json::as_u64)
                    .unwrap_or(2048) as u32,
            ),
        ),
        (a("embedding_length"), Value::U32(hidden as u32)),
        (
            a("feed_forward_length"),
            Value::U32(usize_key(&cfg, &cfg_path, "intermediate_size")? as u32),
        ),
        (a("attention.head_count"), Value::U32(heads as u32)),
        (a("attention.head_count_kv"), Value::U32(kv_heads as u32)),
        (a("rope.freq_base"), Value::F32(theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(
                cfg.get("rms_norm_eps")
                    .and_then(Json::as_f64)
                    .unwrap_or(1e-6) as f32,
            ),
        ),
        (a("vocab_size"), Value::U32(vocab as u32)),
        (a("rope.dimension_count"), Value::U32(head_dim as u32)),
    ];
    if head_dim != hidden / heads {
        meta.push((a("attention.key_length"), Value::U32(head_dim as u32)));
        meta.push((a("attention.value_length"), Value::U32(head_dim as u32)));
    }
    if rope_type == "linear" {
        let factor = rope
            .and_then(|r| r.get("factor"))
            .and_then(Json::as_f64)
            .unwrap_or(1.0);
        meta.push((a("rope.scaling.type"), Value::String("linear".into())));
        meta.push((a("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    meta.extend(tokenizer_meta(dir, vocab)?);

    // Tensors: one QTensor each, in the file's order (sorted, as safetensors lists them).
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(PolicyError::MissingFile {
            path: weights,
            what: "the merged weights (one model.safetensors)".into(),
        });
    }
    let all = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
        PolicyError::Safetensors {
            path: weights.clone(),
            msg: e.to_string(),
        }
    })?;
    let fail = |name: &str, e: candle_core::Error| err(out, format!("tensor `{name}`: {e}"));
    let mut tensors: BTreeMap<String, QTensor> = BTreeMap::new();
    for (name, t) in all {
        if tied && name == "lm_head.weight" {
            continue;
        }
        let Some(g) = gguf_name(&name) else {
            return Err(PolicyError::config(
                &weights,
                &name,
                "a tensor with no GGUF name rlft knows",
            ));
        };
        let t = t.to_dtype(DType::F32).map_err(|e| fail(&name, e))?;
        let t = match (arch, g.contains(".attn_q."), g.contains(".attn_k.")) {
            ("llama", true, _) | ("llama", _, true) => {
                let h = if g.contains(".attn_q.") {
                    heads
                } else {
                    kv_heads
                };
                let dims = t.dims().to_vec();
                let cols = dims[1..].iter().product::<usize>().max(1);
                let v: Vec<f32> = t
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(|e| fail(&name, e))?;
                Tensor::from_vec(permute_rows(&v, dims[0], cols, h), dims, &Device::Cpu)
                    .map_err(|e| fail(&name, e))?
            }
            _ => t,
        };
        let dtype = if t.rank() < 2 {
            GgmlDType::F32
        } else {
            let layer = g
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse().ok());
            tensor_type(ty, &g, layer, layers, t.dim(1).unwrap_or(1))
        };
        let q = QTensor::quantize(&t, dtype).map_err(|e| fail(&name, e))?;
        tensors.insert(g, q);
    }

    let tmp = out.with_extension("gguf.part");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let written = gguf_file::write(&mut f, &meta_refs, &tensor_refs)
        .map_err(|e| err(&tmp, format!("writing: {e}")))
        .and_then(|()| f.sync_all().map_err(|e| io(&tmp, e)));
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| io(out, e))
}

/// llama.cpp's name for a byte-level BPE pre-tokenizer (`tokenizer.ggml.pre`).
fn pre_name(tok: &Json, tok_cfg: &Json) -> &'static str {
    if let Some(p) = tok_cfg.get("gguf_pre").and_then(Json::as_str) {
        // Kept from the GGUF this folder was converted from.
        return match p {
            "smollm" => "smollm",
            "llama-bpe" | "llama3" => "llama-bpe",
            "qwen2" => "qwen2",
            "gpt2" => "gpt2",
            _ => "default",
        };
    }
    let pre = &tok["pre_tokenizer"];
    let parts: Vec<&Json> = match pre.get("pretokenizers").and_then(Json::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![pre],
    };
    let types: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get("type").and_then(Json::as_str))
        .collect();
    let regex = parts.iter().find_map(|p| {
        p.get("pattern")
            .and_then(|r| r.get("Regex"))
            .and_then(Json::as_str)
    });
    match (types.as_slice(), regex) {
        (["ByteLevel"], _) => "gpt2",
        (["Digits", "ByteLevel"], _) => "smollm",
        (["Split", "ByteLevel"], Some(r)) if r == super::tokenizer::LLAMA3_SPLIT => "llama-bpe",
        (["Split", "ByteLevel"], Some(r)) if r == super::tokenizer::QWEN2_SPLIT => "qwen2",
        _ => "default",
    }
}

/// The `tokenizer.*` keys of the folder's byte-level BPE tokenizer.
fn tokenizer_meta(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tok_path = dir.join("tokenizer.json");
    let tok: Json = read_json(&tok_path)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg: Json = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        Json::Null
    };
    let model = &tok["model"];
    let byte_level = serde_json::to_string(&tok["pre_tokenizer"])
        .unwrap_or_default()
        .contains("ByteLevel");
    if model.get("type").and_then(Json::as_str) != Some("BPE") || !byte_level {
        return Err(PolicyError::Tokenizer {
            path: tok_path,
            msg: "GGUF export handles byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM); this one is not".into(),
        });
    }
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    if let Some(v) = model.get("vocab").and_then(Json::as_object) {
        for (t, id) in v {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as usize, (t.clone(), 1));
            }
        }
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            let ty = if a["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
            by_id.insert(id as usize, (c.to_string(), ty));
        }
    }
    let n = vocab_size.max(by_id.keys().map(|k| k + 1).max().unwrap_or(0));
    let (mut tokens, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        // Ids the tokenizer never produces (a padded embedding) get placeholders, as
        // convert_hf_to_gguf.py writes them.
        let (t, ty) = by_id
            .get(&i)
            .cloned()
            .unwrap_or_else(|| (format!("[PAD{i}]"), 4));
        tokens.push(Value::String(t));
        types.push(Value::I32(ty));
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    let id_of = |name: &str| -> Option<u32> {
        let t = match tok_cfg.get(name)? {
            Json::String(s) => s.clone(),
            Json::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        by_id
            .iter()
            .find(|(_, (c, _))| *c == t)
            .map(|(&i, _)| i as u32)
    };
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_name(&tok, &tok_cfg).into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let gen_path = dir.join("generation_config.json");
    let gen_eos = if gen_path.is_file() {
        let g: Json = read_json(&gen_path)?;
        match &g["eos_token_id"] {
            Json::Number(n) => n.as_u64().map(|v| v as u32),
            Json::Array(a) => a.first().and_then(Json::as_u64).map(|v| v as u32),
            _ => None,
        }
    } else {
        None
    };
    for (name, k) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        let id = id_of(name).or(if name == "eos_token" { gen_eos } else { None });
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{k}"), Value::U32(id)));
        }
    }
    // BOS is added when the folder's post-processor adds it (or its config says so).
    let post = serde_json::to_string(&tok["post_processor"]).unwrap_or_default();
    let add_bos = tok_cfg
        .get("add_bos_token")
        .and_then(Json::as_bool)
        .unwrap_or_else(|| {
            post.contains("TemplateProcessing")
                && tok_cfg
                    .get("bos_token")
                    .and_then(|b| {
                        b.as_str()
                            .or_else(|| b.get("content").and_then(Json::as_str))
                    })
                    .is_some_and(|b| post.contains(&format!("\"{b}\"")))
        });
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    let template = match tok_cfg.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(out)
}
