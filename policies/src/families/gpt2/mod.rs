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
use super::pass::PassCtx;
use super::{nth_block, CausalLm, ModelInfo};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{linear_params, Embedding, Linear};
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
    let weight = w.get_any(&names(&format!("{p}.weight")), &[inp, out])?;
    Ok(Linear {
        path: format!("transformer.{p}"),
        weight: weight.t()?.contiguous()?,
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

impl Gpt2 {
    pub fn load(cfg: Gpt2Config, w: &WeightFiles) -> Result<Self> {
        let h = cfg.n_embd;
        let wte = embedding(w, "wte", cfg.vocab_size, h)?;
        let wpe = embedding(w, "wpe", cfg.n_positions, h)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(&cfg, w, i))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = Linear {
            path: "lm_head".into(),
            weight: wte.weight.clone(),
            bias: None,
            conv1d: false,
        };
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
            device: w.device().clone(),
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
}

impl CausalLm for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
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

    fn final_norm(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.ln_f.forward(x, ctx)
    }

    fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden, ctx)?)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            out.extend([&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj]);
        }
        out.push(&self.lm_head);
        out
    }

    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![
            ("transformer.wte.weight".into(), &mut self.wte.weight),
            ("transformer.wpe.weight".into(), &mut self.wpe.weight),
        ];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            for (name, n) in [("ln_1", &mut b.ln_1), ("ln_2", &mut b.ln_2)] {
                out.push((format!("{p}.{name}.weight"), &mut n.weight));
                out.push((format!("{p}.{name}.bias"), &mut n.bias));
            }
            for lin in [
                &mut b.attn.c_attn,
                &mut b.attn.c_proj,
                &mut b.mlp.c_fc,
                &mut b.mlp.c_proj,
            ] {
                out.extend(linear_params(lin));
            }
        }
        out.push(("transformer.ln_f.weight".into(), &mut self.ln_f.weight));
        out.push(("transformer.ln_f.bias".into(), &mut self.ln_f.bias));
        out
    }

    fn sync_tied(&mut self) {
        self.lm_head.weight = self.wte.weight.clone();
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            out.extend([
                &mut b.attn.c_attn,
                &mut b.attn.c_proj,
                &mut b.mlp.c_fc,
                &mut b.mlp.c_proj,
            ]);
        }
        out.push(&mut self.lm_head);
        out
    }
}
