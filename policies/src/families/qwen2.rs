//! `model_type: "qwen2"`: the Llama block with q/k/v biases; sliding windows only on the
//! layers that `layer_types` (or `max_window_layers`) marks, when `use_sliding_window`.

use super::llama::base_spec;
use super::rotary::RotaryDecoder;
use super::ConfigReader;
use crate::error::Result;
use crate::weights::WeightFiles;
use serde_json::Value;

pub(super) fn load(r: &ConfigReader, w: &WeightFiles) -> Result<RotaryDecoder> {
    let mut spec = base_spec(r, "qwen2", 1_000_000.0)?;
    spec.qkv_bias = true;
    if r.bool_or("use_sliding_window", false)? {
        let window = r.opt_usize("sliding_window")?;
        let types = r.cfg.get("layer_types").and_then(Value::as_array);
        let max_window_layers = r.opt_usize("max_window_layers")?.unwrap_or(spec.num_layers);
        spec.layer_windows = (0..spec.num_layers)
            .map(|i| {
                let sliding = match types {
                    Some(t) => t.get(i).and_then(Value::as_str) == Some("sliding_attention"),
                    None => i >= max_window_layers,
                };
                if sliding {
                    window
                } else {
                    None
                }
            })
            .collect();
    }
    RotaryDecoder::load(spec, w)
}
