//! `model_type: "gpt2"`: learned positions, pre-LayerNorm blocks, fused q/k/v projection,
//! Conv1D weights stored `[in, out]` (transposed at load; PEFT's `fan_in_fan_out`), tied head.

mod config;

pub use config::Gpt2Config;

use super::attention::attend;
use super::batch::{attention_bias, BatchInput};
use super::config::Activation;
use super::pass::check_positions;
use super::{CausalLm, ModelInfo};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{linear_params, Embedding, Linear};
use crate::ops::layer_norm;
use crate::weights::WeightFiles;
use candle_core::Tensor;

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Block {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2 {
    info: ModelInfo,
    n_head: usize,
    eps: f64,
    act: Activation,
    scale_by_layer: bool,
    scale_weights: bool,
    wte: Embedding,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Linear,
}

/// Names with and without the `transformer.` prefix (original GPT-2 checkpoints lack it).
fn names(name: &str) -> Vec<String> {
    vec![format!("transformer.{name}"), name.to_string()]
}

fn norm(w: &WeightFiles, p: &str, n: usize) -> Result<Norm> {
    Ok(Norm {
        w: w.get_any(&names(&format!("{p}.weight")), &[n])?,
        b: w.get_any(&names(&format!("{p}.bias")), &[n])?,
    })
}

fn conv1d(w: &WeightFiles, p: &str, inp: usize, out: usize) -> Result<Linear> {
    let weight = w.get_any(&names(&format!("{p}.weight")), &[inp, out])?;
    Ok(Linear {
        path: format!("transformer.{p}"),
        weight: weight.t()?.contiguous()?,
        bias: Some(w.get_any(&names(&format!("{p}.bias")), &[out])?),
        conv1d: true,
    })
}

pub(super) fn load(
    cfg: &serde_json::Value,
    path: &std::path::Path,
    w: &WeightFiles,
) -> Result<Gpt2> {
    let c = Gpt2Config::parse(cfg, path)?;
    let (h, n_head, layers, vocab, n_pos) =
        (c.n_embd, c.n_head, c.n_layer, c.vocab_size, c.n_positions);
    let inner = c.inner();
    let wte = Embedding {
        path: "transformer.wte".into(),
        weight: w.get_any(&names("wte.weight"), &[vocab, h])?,
    };
    let wpe = w.get_any(&names("wpe.weight"), &[n_pos, h])?;
    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("h.{i}");
        blocks.push(Block {
            ln_1: norm(w, &format!("{p}.ln_1"), h)?,
            c_attn: conv1d(w, &format!("{p}.attn.c_attn"), h, 3 * h)?,
            attn_proj: conv1d(w, &format!("{p}.attn.c_proj"), h, h)?,
            ln_2: norm(w, &format!("{p}.ln_2"), h)?,
            c_fc: conv1d(w, &format!("{p}.mlp.c_fc"), h, inner)?,
            mlp_proj: conv1d(w, &format!("{p}.mlp.c_proj"), inner, h)?,
        });
    }
    let lm_head = Linear {
        path: "lm_head".into(),
        weight: wte.weight.clone(),
        bias: None,
        conv1d: false,
    };
    let info = ModelInfo {
        model_type: "gpt2".into(),
        vocab_size: vocab,
        hidden_size: h,
        num_layers: layers,
        max_positions: n_pos,
        output_head: "lm_head".into(),
        tie_word_embeddings: true,
        dtype: w.dtype(),
        device: w.device().clone(),
    };
    Ok(Gpt2 {
        info,
        n_head,
        eps: c.layer_norm_epsilon,
        act: c.activation_function,
        scale_by_layer: c.scale_attn_by_inverse_layer_idx,
        scale_weights: c.scale_attn_weights,
        wte,
        wpe,
        blocks,
        ln_f: norm(w, "ln_f", h)?,
        lm_head,
    })
}

impl Gpt2 {
    fn ln(&self, x: &Tensor, n: &Norm, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(layer_norm(x, &ctx.param(&n.w), &ctx.param(&n.b), self.eps)?)
    }
}

impl CausalLm for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_hidden(
        &self,
        input: &BatchInput,
        ctx: &ForwardCtx,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = (input.batch_size(), input.seq_len());
        let offset = cache.as_ref().map_or(0, |c| c.len());
        check_positions(&self.info, input, offset + t)?;
        let keys: Vec<Vec<bool>> = match cache.as_mut() {
            Some(c) => c.push_valid(&input.valid).to_vec(),
            None => input.valid.clone(),
        };
        let bias = attention_bias(&keys, t, offset, None, &self.info.device)?;
        let h = self.info.hidden_size;
        let (nh, hd) = (self.n_head, h / self.n_head);
        let pos = ctx
            .param(&self.wpe)
            .index_select(&input.positions.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let mut x = (self.wte.forward(&input.ids, ctx)? + pos)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let a_in = self.ln(&x, &blk.ln_1, ctx)?;
            let qkv = blk.c_attn.forward(&a_in, ctx)?;
            let split = |j: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, j * h, h)?
                    .reshape((b, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let (k, v) = match cache.as_mut() {
                Some(c) => c.append(i, &k, &v)?,
                None => (k, v),
            };
            let mut scale = if self.scale_weights {
                1.0 / (hd as f64).sqrt()
            } else {
                1.0
            };
            if self.scale_by_layer {
                scale /= (i + 1) as f64;
            }
            let a = attend(&q, &k, &v, &bias, scale)?;
            x = (x + blk.attn_proj.forward(&a, ctx)?)?;
            let m_in = self.ln(&x, &blk.ln_2, ctx)?;
            let m = self.act.apply(&blk.c_fc.forward(&m_in, ctx)?)?;
            x = (x + blk.mlp_proj.forward(&m, ctx)?)?;
        }
        self.ln(&x, &self.ln_f, ctx)
    }

    fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden, ctx)?)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            out.extend([&b.c_attn, &b.attn_proj, &b.c_fc, &b.mlp_proj]);
        }
        out.push(&self.lm_head);
        out
    }

    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![
            ("transformer.wte.weight".into(), &mut self.wte.weight),
            ("transformer.wpe.weight".into(), &mut self.wpe),
        ];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            for (name, n) in [("ln_1", &mut b.ln_1), ("ln_2", &mut b.ln_2)] {
                out.push((format!("{p}.{name}.weight"), &mut n.w));
                out.push((format!("{p}.{name}.bias"), &mut n.b));
            }
            for lin in [
                &mut b.c_attn,
                &mut b.attn_proj,
                &mut b.c_fc,
                &mut b.mlp_proj,
            ] {
                out.extend(linear_params(lin));
            }
        }
        out.push(("transformer.ln_f.weight".into(), &mut self.ln_f.w));
        out.push(("transformer.ln_f.bias".into(), &mut self.ln_f.b));
        out
    }

    fn sync_tied(&mut self) {
        self.lm_head.weight = self.wte.weight.clone();
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            out.extend([
                &mut b.c_attn,
                &mut b.attn_proj,
                &mut b.c_fc,
                &mut b.mlp_proj,
            ]);
        }
        out.push(&mut self.lm_head);
        out
    }
}
