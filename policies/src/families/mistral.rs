//! `model_type: "mistral"`: the Llama block with an optional sliding attention window.

use super::config::parse;
use super::rotary::{RotaryConfig, RotaryDecoder};
use crate::error::Result;
use crate::weights::WeightFiles;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The keys Mistral reads besides the shared [`RotaryConfig`].
#[derive(Debug, Clone, Deserialize)]
pub struct MistralConfig {
    /// Every layer's attention window; `None`: full attention.
    pub sliding_window: Option<usize>,
}

pub(super) fn load(cfg: &Value, path: &Path, w: &WeightFiles) -> Result<RotaryDecoder> {
    let mut spec = RotaryConfig::spec(cfg, path, "mistral", 10000.0)?;
    let c: MistralConfig = parse(cfg, path)?;
    spec.layer_windows = vec![c.sliding_window; spec.num_layers];
    RotaryDecoder::load(spec, w)
}
