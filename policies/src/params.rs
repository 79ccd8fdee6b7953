//! Training base weights (`trainable = full | last_n_layers`) and exporting a model back to
//! a Hugging Face folder (after training or merging an adapter).

use crate::error::{PolicyError, Result};
use crate::families::CausalLm;
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// The block index in a parameter name (`model.layers.3.…`, `transformer.h.3.…`).
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|w| w[0] == "layers" || w[0] == "h")
        .and_then(|w| w[1].parse().ok())
}

/// Replaces every parameter for which `select(name)` holds by a variable and returns them,
/// named as Hugging Face names them. The others stay frozen (no gradient work). Variables
/// are in the activation dtype: a CPU bf16 model trains f32 copies of what it trains (the
/// master weights of mixed precision) and keeps the frozen rest in bf16.
pub fn make_trainable(
    model: &mut dyn CausalLm,
    select: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Var)>> {
    let dtype = model.info().dtype;
    let mut vars = Vec::new();
    for (name, t) in model.params_mut() {
        if select(&name) {
            let v = Var::from_tensor(&t.to_dtype(dtype)?)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
        }
    }
    model.sync_tied();
    Ok(vars)
}

/// `select` for the last `n` blocks (the "freeze the first layers" variant); the final norm
/// and an untied output head count as part of the last block.
pub fn last_n_layers(num_layers: usize, n: usize) -> impl Fn(&str) -> bool {
    let first = num_layers.saturating_sub(n);
    move |name: &str| match layer_index(name) {
        Some(i) => i >= first,
        None => n > 0 && !name.contains("embed") && !name.contains("wte") && !name.contains("wpe"),
    }
}

/// All parameters under their Hugging Face names and layouts (Conv1D back to `[in, out]`),
/// in the dtype the model was loaded in (`weight_dtype`: a CPU bf16 model's f32 vectors
/// and trained variables go back to bf16, as transformers would save it).
pub fn export_weights(model: &mut dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
    if let Some(q) = model.linears().iter().find(|l| l.weight.is_quantized()) {
        return Err(PolicyError::InvalidArgument(format!(
            "{}: the base is quantized; a model folder is written from the full-precision base (load it with quantization = \"none\")",
            q.path
        )));
    }
    let dtype = model.info().weight_dtype;
    let conv1d: Vec<String> = model
        .linears()
        .iter()
        .filter(|l| l.conv1d)
        .map(|l| format!("{}.weight", l.path))
        .collect();
    let mut out = Vec::new();
    for (name, t) in model.params_mut() {
        let t = if conv1d.contains(&name) {
            t.t()?.contiguous()?
        } else {
            t.detach()
        };
        out.push((name, t.to_dtype(dtype)?));
    }
    Ok(out)
}

/// Writes a loadable Hugging Face folder: `model.safetensors` from `model`, and the
/// configuration and tokenizer files copied from `src_dir`.
pub fn save_pretrained(model: &mut dyn CausalLm, src_dir: &Path, out_dir: &Path) -> Result<()> {
    let tensors = export_weights(model)?;
    write_folder(tensors, src_dir, out_dir, None)
}

/// Writes `model` with the sequence-classification head `score` `[num_labels, hidden]` as
/// transformers' `…ForSequenceClassification` folder: the backbone's weights and
/// `score.weight` (no `lm_head`), `config.json` with that architecture, `num_labels` (as
/// `id2label`) and a `pad_token_id` (transformers reads each row's score at its last
/// non-padding token), the tokenizer files as they were.
pub fn save_pretrained_classifier(
    model: &mut dyn CausalLm,
    score: &Tensor,
    pad_token_id: u32,
    src_dir: &Path,
    out_dir: &Path,
) -> Result<()> {
    let dtype = model.info().weight_dtype;
    let mut tensors: Vec<(String, Tensor)> = export_weights(model)?
        .into_iter()
        .filter(|(k, _)| k != "lm_head.weight")
        .collect();
    tensors.push(("score.weight".into(), score.to_dtype(dtype)?));
    let labels = score.dim(0)?;
    let edit = move |cfg: &mut serde_json::Value| {
        let arch = cfg["architectures"]
            .get(0)
            .and_then(|a| a.as_str())
            .unwrap_or("LlamaForCausalLM")
            .to_string();
        let family = arch
            .strip_suffix("ForCausalLM")
            .or_else(|| arch.strip_suffix("LMHeadModel"))
            .or_else(|| arch.strip_suffix("ForSequenceClassification"))
            .unwrap_or(&arch)
            .to_string();
        cfg["architectures"] = serde_json::json!([format!("{family}ForSequenceClassification")]);
        let id2label: serde_json::Map<String, serde_json::Value> = (0..labels)
            .map(|i| (i.to_string(), serde_json::json!(format!("LABEL_{i}"))))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = (0..labels)
            .map(|i| (format!("LABEL_{i}"), serde_json::json!(i)))
            .collect();
        cfg["id2label"] = id2label.into();
        cfg["label2id"] = label2id.into();
        if cfg.get("pad_token_id").map_or(true, |v| v.is_null()) {
            cfg["pad_token_id"] = serde_json::json!(pad_token_id);
        }
    };
    write_folder(tensors, src_dir, out_dir, Some(&edit))
}

fn write_folder(
    tensors: Vec<(String, Tensor)>,
    src_dir: &Path,
    out_dir: &Path,
    edit_config: Option<&dyn Fn(&mut serde_json::Value)>,
) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| PolicyError::io(out_dir, e))?;
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let dst = out_dir.join("model.safetensors");
    let tmp = out_dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| PolicyError::Safetensors {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, &dst).map_err(|e| PolicyError::io(&dst, e))?;
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let s = src_dir.join(f);
        if s.is_file() {
            let mut bytes = std::fs::read(&s).map_err(|e| PolicyError::io(&s, e))?;
            if let (Some(edit), "config.json") = (edit_config, f) {
                let mut cfg: serde_json::Value = crate::error::read_json(&s)?;
                edit(&mut cfg);
                bytes = serde_json::to_string_pretty(&cfg)
                    .expect("JSON value serialises")
                    .into_bytes();
            }
            crate::fsutil::write_atomic(&out_dir.join(f), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("transformer.h.0.ln_1.bias"), Some(0));
        assert_eq!(layer_index("model.norm.weight"), None);
        let sel = last_n_layers(4, 1);
        assert!(sel("model.layers.3.mlp.up_proj.weight"));
        assert!(!sel("model.layers.2.mlp.up_proj.weight"));
        assert!(sel("model.norm.weight"));
        assert!(!sel("model.embed_tokens.weight"));
    }
}
