//! A GGUF's hyper-parameters as transformers' `config.json` (what transformers' GGUF loader
//! builds: `{arch}.embedding_length` → `hidden_size`, …; the head is tied when the file has
//! no `output.weight`).

use super::{err, Meta};
use crate::error::Result;
use candle_core::quantized::gguf_file::Content;
use serde_json::{json, Value};

/// The converted configuration and what the tensor conversion needs of it.
pub struct HfConfig {
    pub json: Value,
    pub generation: Value,
    pub arch: String,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
}

pub fn hf_config(meta: &Meta, arch: &str, content: &Content) -> Result<HfConfig> {
    let k = |name: &str| format!("{arch}.{name}");
    let hidden = meta.u64(&k("embedding_length"))? as usize;
    let heads = meta.u64(&k("attention.head_count"))? as usize;
    let kv_heads = meta
        .opt_u64(&k("attention.head_count_kv"))?
        .map_or(heads, |v| v as usize);
    let layers = meta.u64(&k("block_count"))? as usize;
    let tokens = meta.strings("tokenizer.ggml.tokens")?.len();
    let embd_rows = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| {
            err(
                meta.file,
                "tensor `token_embd.weight` (the embedding) is missing",
            )
        })?;
    let vocab = meta
        .opt_u64(&k("vocab_size"))?
        .map_or(embd_rows, |v| v as usize);
    if vocab != embd_rows || tokens > vocab {
        return Err(err(
            meta.file,
            format!(
                "{arch}.vocab_size {vocab}, token_embd.weight {embd_rows} rows and \
                 {tokens} tokens disagree"
            ),
        ));
    }
    if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
        return Err(err(
            meta.file,
            format!("{heads} heads, {kv_heads} KV heads and width {hidden} do not fit"),
        ));
    }
    let head_dim = meta
        .opt_u64(&k("attention.key_length"))?
        .map_or(hidden / heads, |v| v as usize);
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(err(
            meta.file,
            "tensor `rope_freqs.weight` (Llama 3.1-style per-frequency rope scaling) is not \
             supported; convert the model from its Hugging Face folder instead",
        ));
    }
    let tied = !content.tensor_infos.contains_key("output.weight");
    let id = |key: &str| meta.opt_u64(key);
    let (bos, eos, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    let (model_type, class) = match arch {
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    };
    let mut json = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.u64(&k("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.opt_u64(&k("context_length"))?.unwrap_or(2048),
        "rms_norm_eps": meta.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "rope_theta": meta.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    });
    if arch == "llama" {
        json["attention_bias"] = json!(content.tensor_infos.contains_key("blk.0.attn_q.bias"));
        json["mlp_bias"] = json!(false);
    } else {
        json["use_sliding_window"] = json!(false);
    }
    match meta.get(&k("rope.scaling.type")) {
        None => {}
        Some(_) => match meta.str(&k("rope.scaling.type"))? {
            "none" => {}
            "linear" => {
                let factor = meta
                    .opt_f64(&k("rope.scaling.factor"))?
                    .ok_or_else(|| err(meta.file, format!("{arch}.rope.scaling.factor missing")))?;
                json["rope_scaling"] = json!({"type": "linear", "factor": factor});
            }
            other => {
                return Err(err(
                    meta.file,
                    format!("{arch}.rope.scaling.type `{other}` is not supported (none, linear)"),
                ))
            }
        },
    }
    let generation = json!({
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    });
    Ok(HfConfig {
        json,
        generation,
        arch: arch.to_string(),
        num_heads: heads,
        num_kv_heads: kv_heads,
        vocab_size: vocab,
        num_layers: layers,
    })
}
