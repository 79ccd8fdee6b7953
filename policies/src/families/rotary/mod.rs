//! The pre-norm rotary decoder that Llama, Mistral and Qwen2 share; their files differ only
//! in how `config.json` maps onto [`RotarySpec`].
//!
//! block: `x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`,
//!        `x += down(act(gate(n2(x))) · up(n2(x)))`; then `norm(x)`, `lm_head`.

mod config;

pub use config::{RotaryConfig, RotarySpec};

use super::attention::attend;
use super::batch::{attention_bias, BatchInput};
use super::{check_positions, CausalLm, ModelInfo};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{linear_params, Embedding, Linear};
use crate::ops::{rms_norm, rope};
use crate::rope::RopeTables;
use crate::weights::WeightFiles;
use candle_core::Tensor;

struct Block {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    window: Option<usize>,
}

pub struct RotaryDecoder {
    info: ModelInfo,
    spec: RotarySpec,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    /// `None` for a checkpoint without an LM head (a sequence-classification model).
    lm_head: Option<Linear>,
    rope: RopeTables,
}

fn linear(w: &WeightFiles, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    Ok(Linear {
        path: path.to_string(),
        weight: w.get(&format!("{path}.weight"), &[out, inp])?,
        bias: if bias {
            Some(w.get(&format!("{path}.bias"), &[out])?)
        } else {
            None
        },
        conv1d: false,
    })
}

impl RotaryDecoder {
    pub fn load(spec: RotarySpec, w: &WeightFiles) -> Result<Self> {
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let (nq, nkv, inter) = (
            spec.num_heads * hd,
            spec.num_kv_heads * hd,
            spec.intermediate_size,
        );
        let embed = Embedding {
            path: "model.embed_tokens".into(),
            weight: w.get("model.embed_tokens.weight", &[spec.vocab_size, h])?,
        };
        let mut blocks = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: linear(w, &format!("{p}.self_attn.q_proj"), nq, h, spec.qkv_bias)?,
                k: linear(w, &format!("{p}.self_attn.k_proj"), nkv, h, spec.qkv_bias)?,
                v: linear(w, &format!("{p}.self_attn.v_proj"), nkv, h, spec.qkv_bias)?,
                o: linear(w, &format!("{p}.self_attn.o_proj"), h, nq, spec.o_bias)?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: linear(w, &format!("{p}.mlp.gate_proj"), inter, h, spec.mlp_bias)?,
                up: linear(w, &format!("{p}.mlp.up_proj"), inter, h, spec.mlp_bias)?,
                down: linear(w, &format!("{p}.mlp.down_proj"), h, inter, spec.mlp_bias)?,
                window: spec.layer_windows.get(i).copied().flatten(),
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = if spec.tie_word_embeddings {
            Some(Linear {
                path: "lm_head".into(),
                weight: embed.weight.clone(),
                bias: None,
                conv1d: false,
            })
        } else if w.contains("lm_head.weight") || !spec.headless_ok {
            Some(linear(w, "lm_head", spec.vocab_size, h, false)?)
        } else {
            None
        };
        let rope = RopeTables::new(&spec.rope, spec.max_positions, w.dtype(), w.device())?;
        let info = ModelInfo {
            model_type: spec.model_type.clone(),
            vocab_size: spec.vocab_size,
            hidden_size: h,
            num_layers: spec.num_layers,
            max_positions: spec.max_positions,
            output_head: "lm_head".into(),
            tie_word_embeddings: spec.tie_word_embeddings,
            dtype: w.dtype(),
            device: w.device().clone(),
        };
        Ok(Self {
            info,
            spec,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
        })
    }
}

impl CausalLm for RotaryDecoder {
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
        let dev = &self.info.device;
        let full_bias = attention_bias(&keys, t, offset, None, dev)?;
        let mut window_bias: Option<(usize, Tensor)> = None;
        let (cos, sin) = self.rope.lookup(&input.positions)?;
        let (nh, nkv, hd) = (
            self.spec.num_heads,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        );
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = self.spec.rms_norm_eps;

        let mut x = self.embed.forward(&input.ids, ctx)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &ctx.param(&blk.input_norm), eps)?;
            let q = blk
                .q
                .forward(&h, ctx)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?;
            let k = blk
                .k
                .forward(&h, ctx)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?;
            let v = blk
                .v
                .forward(&h, ctx)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?;
            let q = rope(&q, &cos, &sin)?;
            let k = rope(&k, &cos, &sin)?;
            let (k, v) = match cache.as_mut() {
                Some(c) => c.append(i, &k, &v)?,
                None => (k, v),
            };
            let bias = match blk.window {
                None => &full_bias,
                Some(w) => {
                    if window_bias.as_ref().is_none_or(|(ww, _)| *ww != w) {
                        window_bias = Some((w, attention_bias(&keys, t, offset, Some(w), dev)?));
                    }
                    &window_bias.as_ref().expect("just set").1
                }
            };
            let a = attend(&q, &k, &v, bias, scale)?;
            x = (x + blk.o.forward(&a, ctx)?)?;
            let h = rms_norm(&x, &ctx.param(&blk.post_norm), eps)?;
            let g = self.spec.act.apply(&blk.gate.forward(&h, ctx)?)?;
            let u = blk.up.forward(&h, ctx)?;
            x = (x + blk.down.forward(&(g * u)?, ctx)?)?;
        }
        Ok(rms_norm(&x, &ctx.param(&self.norm), eps)?)
    }

    fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => Ok(head.forward(hidden, ctx)?),
            None => Err(crate::PolicyError::InvalidArgument(format!(
                "this {} checkpoint has no LM head (lm_head.weight); it can give hidden states only",
                self.info.model_type
            ))),
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            out.extend([&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]);
        }
        out.extend(self.lm_head.as_ref());
        out
    }

    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> =
            vec![("model.embed_tokens.weight".into(), &mut self.embed.weight)];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &mut b.input_norm));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &mut b.post_norm,
            ));
            for lin in [
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.gate,
                &mut b.up,
                &mut b.down,
            ] {
                out.extend(linear_params(lin));
            }
        }
        out.push(("model.norm.weight".into(), &mut self.norm));
        if !self.spec.tie_word_embeddings {
            if let Some(head) = self.lm_head.as_mut() {
                out.extend(linear_params(head));
            }
        }
        out
    }

    fn sync_tied(&mut self) {
        if self.spec.tie_word_embeddings {
            if let Some(head) = self.lm_head.as_mut() {
                head.weight = self.embed.weight.clone();
            }
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            out.extend([
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.gate,
                &mut b.up,
                &mut b.down,
            ]);
        }
        out.extend(self.lm_head.as_mut());
        out
    }
}
