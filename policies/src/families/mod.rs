//! Model families behind one trait. A family (`rotary/`, `gpt2/`) is in candle-transformers'
//! shape: a serde config struct read from `config.json`, `Attention`, `Mlp` and `Block`
//! types loaded by their Hugging Face names, each with a `forward`, and a model of
//! embeddings, blocks, final norm and head. Llama, Mistral and Qwen2 are the rotary decoder
//! with their own keys (`llama.rs`, `mistral.rs`, `qwen2.rs`).

pub mod attention;
pub mod batch;
pub mod config;
pub mod gpt2;
pub mod llama;
pub mod mistral;
pub mod norm;
pub mod parts;
pub mod pass;
pub mod qwen2;
pub mod rotary;

pub use batch::{attention_bias, packed_attention_bias, BatchInput};
pub use config::Activation;
pub use pass::PassCtx;

use crate::ctx::ForwardCtx;
use crate::error::{PolicyError, Result};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::quant::QuantConfig;
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
    /// What activations are in and the model computes in (f32 on the CPU for a bf16/f16
    /// model: [`crate::device::activation_dtype`]).
    pub dtype: DType,
    /// What the matrices (linear weights, embeddings) are stored in: the dtype asked for.
    pub weight_dtype: DType,
    pub device: Device,
    /// `config.json`'s `pad_token_id`, if set (transformers' score readers skip it).
    pub pad_token_id: Option<u32>,
    /// `config.json`'s `initializer_range` (transformers' default 0.02): the std of a newly
    /// initialised head.
    pub initializer_range: f64,
}

/// A causal language model. Base weights are immutable during a forward pass; the active
/// adapter (if any) comes with the [`ForwardCtx`], so one model serves policy and reference.
pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn info_mut(&mut self) -> &mut ModelInfo;

    /// The embeddings of `input` `[b, t, hidden]`, and the [`PassCtx`] that every block of
    /// this pass reads (attention biases, rotary tables). With a cache, `input` holds only
    /// the new tokens: their positions are checked against what the cache holds and their
    /// validity is recorded in it; the blocks then append their keys and values.
    fn embed(
        &self,
        input: &BatchInput,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, PassCtx)>;

    /// Number of blocks (decoder layers).
    fn num_blocks(&self) -> usize {
        self.info().num_layers
    }

    /// Block `i` on hidden states `x` `[b, t, hidden]` → `[b, t, hidden]`, with the `pass`
    /// and the cache (if any) that [`CausalLm::embed`] was given. Blocks run in order
    /// `0..num_blocks()`; each may be run on its own, e.g. again for a recomputed backward.
    fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// A scalar whose gradients (with respect to `x` and the block's parameters) are those of
    /// `Σ block_forward(i, x) ⊙ g`, `g` being the gradient at the block's output: what a
    /// checkpointed backward differentiates for each recomputed block. Its value is not
    /// meant; a family may skip the products whose outputs no gradient reads (the last
    /// linear layer's, see [`crate::linear::Linear::vjp_surrogate`]). No cache.
    fn block_vjp(
        &self,
        i: usize,
        x: &Tensor,
        g: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        Ok((self.block_forward(i, x, pass, ctx, None)? * g)?.sum_all()?)
    }

    /// The norm after the last block.
    fn final_norm(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;

    /// Final hidden states (after the last norm), `[b, t, hidden]`: [`CausalLm::embed`],
    /// every block, [`CausalLm::final_norm`]. With a cache, `input` holds only the new tokens
    /// and the cache is extended.
    fn forward_hidden(
        &self,
        input: &BatchInput,
        ctx: &ForwardCtx,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (mut x, pass) = self.embed(input, ctx, cache.as_deref_mut())?;
        for i in 0..self.num_blocks() {
            x = self.block_forward(i, &x, &pass, ctx, cache.as_deref_mut())?;
        }
        self.final_norm(&x, ctx)
    }

    /// Output head: `[.., hidden]` → logits `[.., vocab]` in the model dtype.
    fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;

    /// The linear layer [`CausalLm::logits`] is, when it is exactly `head.forward(hidden)`
    /// (no soft-capping or scaling after it): log-probs can then be computed from its weight a
    /// chunk of rows at a time (`ops::head_logprob`). `None` (the default) keeps
    /// `logits` as the only way through the head.
    fn output_head(&self) -> Option<&Linear> {
        None
    }

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
    load_model_quantized(dir, dtype, QuantConfig::default(), device)
}

/// [`load_model`] with the blocks' linear weights quantized as `quant` says, one tensor at a
/// time as they are read (the embedding, norms and output head stay in `dtype`).
pub fn load_model_quantized(
    dir: &Path,
    dtype: DType,
    quant: QuantConfig,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
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
    let weights = WeightFiles::open(dir, dtype, device)?.with_quantization(quant);
    let mut model: Box<dyn CausalLm> = match model_type.as_str() {
        "llama" => Box::new(llama::load(&cfg, &cfg_path, &weights)?),
        "mistral" => Box::new(mistral::load(&cfg, &cfg_path, &weights)?),
        "qwen2" => Box::new(qwen2::load(&cfg, &cfg_path, &weights)?),
        "gpt2" => Box::new(gpt2::load(&cfg, &cfg_path, &weights)?),
        _ => unreachable!("checked against SUPPORTED"),
    };
    // The keys of config.json that are the model's whatever its family.
    let info = model.info_mut();
    info.pad_token_id = cfg
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .map(|p| p as u32);
    info.initializer_range = cfg
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02);
    Ok(model)
}

/// Quantizes the blocks' linear weights of a loaded model (after merging an SFT adapter into
/// the full-precision base); the output head, tied or not, stays as it is.
pub fn quantize_blocks(model: &mut dyn CausalLm, quant: QuantConfig) -> Result<()> {
    let head = model.info().output_head.clone();
    for lin in model.linears_mut() {
        if lin.path != head {
            lin.quantize(quant)?;
        }
    }
    Ok(())
}

/// Block `i` of a model's `blocks`, or an error saying how many there are.
pub(crate) fn nth_block<B>(blocks: &[B], i: usize) -> Result<&B> {
    blocks.get(i).ok_or_else(|| {
        PolicyError::InvalidArgument(format!(
            "block {i} does not exist; the model has {}",
            blocks.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    /// Embeddings, each block on its own, the final norm: the same bits as `forward_hidden`,
    /// with and without a cache.
    #[test]
    fn blocks_run_one_by_one_as_forward_hidden_does() {
        for name in ["llama", "qwen2", "gpt2"] {
            let model = load_model(&fixture(name), DType::F32, &Device::Cpu).unwrap();
            let rows = vec![vec![5u32, 9, 13, 2, 7, 11], vec![3, 4, 8]];
            let input = BatchInput::left_padded(&rows, 0, &Device::Cpu).unwrap();
            let ctx = ForwardCtx::inference(None);
            let by_blocks = |cache: Option<&mut KvCache>| -> Vec<f32> {
                let mut cache = cache;
                let (mut x, pass) = model.embed(&input, &ctx, cache.as_deref_mut()).unwrap();
                for i in 0..model.num_blocks() {
                    x = model
                        .block_forward(i, &x, &pass, &ctx, cache.as_deref_mut())
                        .unwrap();
                }
                let h = model.final_norm(&x, &ctx).unwrap();
                h.flatten_all().unwrap().to_vec1().unwrap()
            };
            let whole = |cache: Option<&mut KvCache>| -> Vec<f32> {
                let h = model.forward_hidden(&input, &ctx, cache).unwrap();
                h.flatten_all().unwrap().to_vec1().unwrap()
            };
            assert_eq!(by_blocks(None), whole(None), "{name}");
            let (mut c1, mut c2) = (model.new_cache(16), model.new_cache(16));
            assert_eq!(by_blocks(Some(&mut c1)), whole(Some(&mut c2)), "{name}");
            assert_eq!(c1.len(), c2.len());

            let (x, pass) = model.embed(&input, &ctx, None).unwrap();
            let err = model
                .block_forward(model.num_blocks(), &x, &pass, &ctx, None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("does not exist"), "{err}");
        }
    }
}
