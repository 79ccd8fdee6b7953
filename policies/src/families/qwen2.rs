//! `model_type: "qwen2"`: the Llama block with q/k/v biases; sliding windows only on the
//! layers that `layer_types` (or `max_window_layers`) marks, when `use_sliding_window`.

use super::config::parse;
use super::rotary::{RotaryConfig, RotaryDecoder};
use crate::error::Result;
use crate::weights::WeightFiles;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The keys Qwen2 reads besides the shared [`RotaryConfig`]. `layer_types` (a list of
/// `"sliding_attention"` / `"full_attention"`, entries of another kind meaning full) is read
/// from the raw config.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen2Config {
    #[serde(default)]
    pub use_sliding_window: bool,
    pub sliding_window: Option<usize>,
    /// Without `layer_types`, layers from this index on slide; none when absent.
    pub max_window_layers: Option<usize>,
}

pub(super) fn load(cfg: &Value, path: &Path, w: &WeightFiles) -> Result<RotaryDecoder> {
    let mut spec = RotaryConfig::spec(cfg, path, "qwen2", 1_000_000.0)?;
    let c: Qwen2Config = parse(cfg, path)?;
    spec.qkv_bias = true;
    if c.use_sliding_window {
        let types = cfg.get("layer_types").and_then(Value::as_array);
        let max_window_layers = c.max_window_layers.unwrap_or(spec.num_layers);
        spec.layer_windows = (0..spec.num_layers)
            .map(|i| {
                let sliding = match types {
                    Some(t) => t.get(i).and_then(Value::as_str) == Some("sliding_attention"),
                    None => i >= max_window_layers,
                };
                if sliding {
                    c.sliding_window
                } else {
                    None
                }
            })
            .collect();
    }
    RotaryDecoder::load(spec, w)
}
