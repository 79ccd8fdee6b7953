//! The `config.json` keys Llama, Mistral and Qwen2 share ([`RotaryConfig`]), and what the
//! decoder is built from once a family has added its own keys ([`RotarySpec`]).

use crate::error::{PolicyError, Result};
use crate::families::config::{parse, Activation};
use crate::rope::{parse_rope, RopeConfig};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The shared keys, by their transformers names; absent (or `null`) ones take transformers'
/// defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RotaryConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `num_attention_heads` when absent (no grouped-query attention).
    pub num_key_value_heads: Option<usize>,
    /// `hidden_size / num_attention_heads` when absent.
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> Activation {
    Activation::Silu
}

#[derive(Debug, Clone)]
pub struct RotarySpec {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Load without `lm_head.weight` when the file has none (sequence-classification
    /// checkpoints); otherwise its absence is an error.
    pub headless_ok: bool,
    /// Sliding-window size per layer (`None`: full attention).
    pub layer_windows: Vec<Option<usize>>,
    pub act: Activation,
}

impl RotaryConfig {
    /// The shared keys of `cfg` (read from `path`), checked, as the spec of a decoder without
    /// biases or windows. The rope (`rope_parameters`, `rope_scaling`, `rope_theta`, whose
    /// default is `default_theta`) and `architectures` are read from `cfg` itself.
    pub fn spec(
        cfg: &Value,
        path: &Path,
        model_type: &str,
        default_theta: f64,
    ) -> Result<RotarySpec> {
        let c: RotaryConfig = parse(cfg, path)?;
        let (hidden, heads) = (c.hidden_size, c.num_attention_heads);
        if heads == 0 || hidden % heads != 0 && c.head_dim.is_none() {
            return Err(PolicyError::config(
                path,
                "num_attention_heads",
                "must divide hidden_size",
            ));
        }
        let kv = c.num_key_value_heads.unwrap_or(heads);
        if kv == 0 || heads % kv != 0 {
            return Err(PolicyError::config(
                path,
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = c.head_dim.unwrap_or(hidden / heads);
        let rope = parse_rope(cfg, head_dim, default_theta)
            .map_err(|(k, m)| PolicyError::config(path, &k, m))?;
        Ok(RotarySpec {
            model_type: model_type.to_string(),
            vocab_size: c.vocab_size,
            hidden_size: hidden,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope,
            max_positions: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            layer_windows: vec![None; c.num_hidden_layers],
            headless_ok: is_sequence_classifier(cfg),
            act: c.hidden_act,
        })
    }
}

/// `architectures` names a `…ForSequenceClassification` (entries that are not strings, or a
/// value that is not a list, are ignored).
fn is_sequence_classifier(cfg: &Value) -> bool {
    cfg.get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter().any(|x| {
                x.as_str()
                    .is_some_and(|s| s.ends_with("ForSequenceClassification"))
            })
        })
}
