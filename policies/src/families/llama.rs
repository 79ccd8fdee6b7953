//! `model_type: "llama"` (Llama 1–3, incl. Llama 3 rope scaling and explicit `head_dim`).

use super::config::parse;
use super::rotary::{RotaryConfig, RotaryDecoder};
use crate::error::Result;
use crate::weights::WeightFiles;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The keys Llama reads besides the shared [`RotaryConfig`].
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate, up and down.
    #[serde(default)]
    pub mlp_bias: bool,
}

pub(super) fn load(cfg: &Value, path: &Path, w: &WeightFiles) -> Result<RotaryDecoder> {
    let mut spec = RotaryConfig::spec(cfg, path, "llama", 10000.0)?;
    let c: LlamaConfig = parse(cfg, path)?;
    spec.qkv_bias = c.attention_bias;
    spec.o_bias = c.attention_bias;
    spec.mlp_bias = c.mlp_bias;
    RotaryDecoder::load(spec, w)
}
