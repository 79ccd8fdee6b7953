//! Model families behind one trait. A family is one file: it reads its `config.json`, loads
//! its weights by their Hugging Face names and runs the forward pass.

pub mod attention;
pub mod batch;
pub mod config;
pub mod gpt2;
pub mod llama;
pub mod mistral;
pub mod norm;
pub mod pass;
pub mod qwen2;
pub mod rotary;

pub use batch::{attention_bias, BatchInput};
pub use config::Activation;
pub use pass::PassCtx;

use crate::ctx::ForwardCtx;
use crate::error::{PolicyError, Result};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::weights::WeightFiles;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// What callers need to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Longest sequence the model's positions allow.
    pub max_positions: usize,
    /// Module path of the output projection (`lm_head`), excluded from `all-linear`.
    pub output_head: String,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
    pub device: Device,
}

/// A causal language model. Base weights are immutable during a forward pass; the active
/// adapter (if any) comes with the [`ForwardCtx`], so one model serves policy and reference.
pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Final hidden states (after the last norm), `[b, t, hidden]`. With a cache, `input`
    /// holds only the new tokens and the cache is extended.
    fn forward_hidden(
        &self,
        input: &BatchInput,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// Output head: `[.., hidden]` → logits `[.., vocab]` in the model dtype.
    fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;

    /// Every linear layer (LoRA candidates), in a stable order.
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;

    /// Every distinct parameter with its Hugging Face name, in the model's own layout
    /// (GPT-2's Conv1D weights are `[out, in]` here). A tied output head is not listed.
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)>;

    /// Re-points a tied output head at the embedding after the embedding was replaced.
    fn sync_tied(&mut self) {}

    /// A fresh KV cache for up to `max_len` positions.
    fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(self.info().num_layers, max_len)
    }

    /// Logits for every position of `input` (no cache).
    fn forward(&self, input: &BatchInput, ctx: &ForwardCtx) -> Result<Tensor> {
        let h = self.forward_hidden(input, ctx, None)?;
        self.logits(&h, ctx)
    }
}

/// The `model_type`s rlft can load, and the file that implements each.
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "gpt2"];

/// Parses `config.json` of `dir` and loads the weights into the matching family.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Box<dyn CausalLm>> {
    let cfg_path = dir.join("config.json");
    let cfg: Value = crate::error::read_json(&cfg_path)?;
    let model_type = cfg
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| PolicyError::config(&cfg_path, "model_type", "missing"))?
        .to_string();
    if !SUPPORTED.contains(&model_type.as_str()) {
        return Err(PolicyError::UnsupportedModel {
            path: cfg_path,
            model_type,
            supported: SUPPORTED.join(", "),
        });
    }
    let weights = WeightFiles::open(dir, dtype, device)?;
    Ok(match model_type.as_str() {
        "llama" => Box::new(llama::load(&cfg, &cfg_path, &weights)?),
        "mistral" => Box::new(mistral::load(&cfg, &cfg_path, &weights)?),
        "qwen2" => Box::new(qwen2::load(&cfg, &cfg_path, &weights)?),
        "gpt2" => Box::new(gpt2::load(&cfg, &cfg_path, &weights)?),
        _ => unreachable!("checked against SUPPORTED"),
    })
}
