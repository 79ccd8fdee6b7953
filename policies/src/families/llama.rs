//! `model_type: "llama"` (Llama 1–3, incl. Llama 3 rope scaling and explicit `head_dim`).

use super::rotary::{RotaryDecoder, RotarySpec};
use super::{Activation, ConfigReader};
use crate::error::{PolicyError, Result};
use crate::rope::parse_rope;
use crate::weights::WeightFiles;

/// The fields Llama, Mistral and Qwen2 configs share.
pub(super) fn base_spec(
    r: &ConfigReader,
    model_type: &str,
    default_theta: f64,
) -> Result<RotarySpec> {
    let hidden = r.usize("hidden_size")?;
    let heads = r.usize("num_attention_heads")?;
    if heads == 0 || hidden % heads != 0 && r.opt_usize("head_dim")?.is_none() {
        return Err(PolicyError::config(
            r.path,
            "num_attention_heads",
            "must divide hidden_size",
        ));
    }
    let kv = r.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    if kv == 0 || heads % kv != 0 {
        return Err(PolicyError::config(
            r.path,
            "num_key_value_heads",
            format!("{kv} does not divide num_attention_heads {heads}"),
        ));
    }
    let head_dim = r.opt_usize("head_dim")?.unwrap_or(hidden / heads);
    let rope = parse_rope(r.cfg, head_dim, default_theta)
        .map_err(|(k, m)| PolicyError::config(r.path, &k, m))?;
    let layers = r.usize("num_hidden_layers")?;
    Ok(RotarySpec {
        model_type: model_type.to_string(),
        vocab_size: r.usize("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: r.usize("intermediate_size")?,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: r.f64_or("rms_norm_eps", 1e-6)?,
        rope,
        max_positions: r.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        layer_windows: vec![None; layers],
        headless_ok: r
            .cfg
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter().any(|x| {
                    x.as_str()
                        .is_some_and(|s| s.ends_with("ForSequenceClassification"))
                })
            }),
        act: Activation::parse(r, "hidden_act", "silu")?,
    })
}

pub(super) fn load(r: &ConfigReader, w: &WeightFiles) -> Result<RotaryDecoder> {
    let mut spec = base_spec(r, "llama", 10000.0)?;
    let attention_bias = r.bool_or("attention_bias", false)?;
    spec.qkv_bias = attention_bias;
    spec.o_bias = attention_bias;
    spec.mlp_bias = r.bool_or("mlp_bias", false)?;
    RotaryDecoder::load(spec, w)
}
