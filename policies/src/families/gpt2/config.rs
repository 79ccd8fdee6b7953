//! GPT-2's `config.json`.

use crate::error::{PolicyError, Result};
use crate::families::config::{parse, Activation};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The keys GPT-2 reads, by their transformers names; absent (or `null`) ones take
/// transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub n_positions: usize,
    /// MLP width; `4 · n_embd` when absent (see [`Gpt2Config::inner`]).
    pub n_inner: Option<usize>,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation_function")]
    pub activation_function: Activation,
    /// Attention scores of layer i are further divided by i + 1.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Attention scores are divided by √head_dim.
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
}

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_activation_function() -> Activation {
    Activation::GeluTanh
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    /// Reads and checks the config `cfg` read from `path`.
    pub fn parse(cfg: &Value, path: &Path) -> Result<Self> {
        let c: Gpt2Config = parse(cfg, path)?;
        let (h, n_head) = (c.n_embd, c.n_head);
        if n_head == 0 || h % n_head != 0 {
            return Err(PolicyError::config(path, "n_head", "must divide n_embd"));
        }
        Ok(c)
    }

    /// The MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}
