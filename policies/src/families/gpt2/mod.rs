//! `model_type: "gpt2"`: learned positions, pre-LayerNorm blocks, fused q/k/v projection,
//! Conv1D weights stored `[in, out]` (transposed at load; PEFT's `fan_in_fan_out`), tied head.
//!
//! block: `x += c_proj(attn(split(c_attn(ln_1(x)))))`, `x += c_proj(act(c_fc(ln_2(x))))`;
//! the input is `wte(ids) + wpe(positions)`, the output `ln_f(x)`, then the tied `lm_head`.
//!
//! The model is `wte`, `wpe`, a [`Block`] per layer ([`block`]), `ln_f` and `lm_head`; the
//! keys of `config.json` are in [`config`].

mod block;
mod config;

pub use block::{Attention, Block, Mlp};
pub use config::Gpt2Config;

use super::batch::BatchInput;
use super::norm::LayerNorm;
use super::parts::{self, Part, PartMut, PartRef};
use super::pass::PassCtx;
use super::{nth_block, CausalLm, ModelInfo};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{Embedding, Linear, LinearWeight};
use crate::weights::WeightFiles;
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

pub struct Gpt2 {
    info: ModelInfo,
    cfg: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
}

/// Names with and without the `transformer.` prefix (original GPT-2 checkpoints lack it).
fn names(name: &str) -> Vec<String> {
    vec![format!("transformer.{name}"), name.to_string()]
}

/// The LayerNorm `transformer.{p}` of width `n`.
fn layer_norm(w: &WeightFiles, p: &str, n: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        path: format!("transformer.{p}"),
        weight: w.get_any(&names(&format!("{p}.weight")), &[n])?,
        bias: w.get_any(&names(&format!("{p}.bias")), &[n])?,
        eps,
    })
}

/// The Conv1D `transformer.{p}` (`[inp, out]` in the file), as a linear layer `[out, inp]`.
fn conv1d(w: &WeightFiles, p: &str, inp: usize, out: usize) -> Result<Linear> {
    let candidates = names(&format!("{p}.weight"));
    let name = candidates
        .iter()
        .find(|n| w.contains(n))
        .unwrap_or(&candidates[0]);
    Ok(Linear {
        path: format!("transformer.{p}"),
        weight: w.block_linear(name, [out, inp], true)?,
        bias: Some(w.get_any(&names(&format!("{p}.bias")), &[out])?),
        conv1d: true,
    })
}

/// The embedding table `transformer.{p}` `[n, h]`.
fn embedding(w: &WeightFiles, p: &str, n: usize, h: usize) -> Result<Embedding> {
    Ok(Embedding {
        path: format!("transformer.{p}"),
        weight: w.get_any(&names(&format!("{p}.weight")), &[n, h])?,
    })
}

pub(super) fn load(cfg: &Value, path: &Path, w: &WeightFiles) -> Result<Gpt2> {
    Gpt2::load(Gpt2Config::parse(cfg, path)?, w)
}

/// The weights of the model `$m` in checkpoint order, written once for either borrow
/// (`$r`: `&` or `&mut`; `$parts`: the matching [`Block`] method): `wte`, `wpe`, every
/// block's, `ln_f`, and the tied head (a LoRA candidate but not a parameter).
macro_rules! parts {
    ($m:expr, $parts:ident, $($r:tt)+) => {
        [
            Part::Param(&$m.wte.path, "weight", $($r)+ $m.wte.weight),
            Part::Param(&$m.wpe.path, "weight", $($r)+ $m.wpe.weight),
        ]
        .into_iter()
        .chain(($($r)+ $m.blocks).into_iter().flat_map(Block::$parts))
        .chain([
            Part::Param(&$m.ln_f.path, "weight", $($r)+ $m.ln_f.weight),
            Part::Param(&$m.ln_f.path, "bias", $($r)+ $m.ln_f.bias),
            Part::Tied($($r)+ $m.lm_head),
        ])
    };
}

impl Gpt2 {
    pub fn load(cfg: Gpt2Config, w: &WeightFiles) -> Result<Self> {
        let h = cfg.n_embd;
        let wte = embedding(w, "wte", cfg.vocab_size, h)?;
        let wpe = embedding(w, "wpe", cfg.n_positions, h)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(&cfg, w, i))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = Linear::dense("lm_head", wte.weight.clone(), None);
        let ln_f = layer_norm(w, "ln_f", h, cfg.layer_norm_epsilon)?;
        let info = ModelInfo {
            model_type: "gpt2".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            num_layers: cfg.n_layer,
            max_positions: cfg.n_positions,
            output_head: "lm_head".into(),
            tie_word_embeddings: true,
            dtype: w.dtype(),
            weight_dtype: w.weight_dtype(),
            device: w.device().clone(),
            // Set by `load_model` from config.json.
            pad_token_id: None,
            initializer_range: 0.02,
        };
        Ok(Self {
            info,
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// The layers, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Every weight, in checkpoint order: the one list `linears`, `linears_mut` and
    /// `params_mut` read.
    pub fn parts(&self) -> impl Iterator<Item = PartRef<'_>> {
        parts!(self, parts, &)
    }

    pub fn parts_mut(&mut self) -> impl Iterator<Item = PartMut<'_>> {
        parts!(self, parts_mut, &mut)
    }
}

impl CausalLm for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn info_mut(&mut self) -> &mut ModelInfo {
        &mut self.info
    }

    fn embed(
        &self,
        input: &BatchInput,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, PassCtx)> {
        let pass = PassCtx::new(&self.info, input, cache, [])?;
        let pos = self.wpe.forward(&input.positions, ctx)?;
        let x = (self.wte.forward(&input.ids, ctx)? + pos)?;
        Ok((x, pass))
    }

    fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        nth_block(&self.blocks, i)?.forward(x, pass, ctx, cache)
    }

    fn block_vjp(
        &self,
        i: usize,
        x: &Tensor,
        g: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        nth_block(&self.blocks, i)?.vjp_surrogate(x, g, pass, ctx)
    }

    fn final_norm(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.ln_f.forward(x, ctx)
    }

    fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden, ctx)?)
    }

    fn output_head(&self) -> Option<&Linear> {
        Some(&self.lm_head)
    }

    fn linears(&self) -> Vec<&Linear> {
        parts::linears(self.parts())
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        parts::linears_mut(self.parts_mut())
    }

    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        parts::params(self.parts_mut())
    }

    fn sync_tied(&mut self) {
        self.lm_head.weight = LinearWeight::Dense(self.wte.weight.clone());
    }
}
