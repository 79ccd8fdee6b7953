//! The pre-norm rotary decoder that Llama, Mistral and Qwen2 share; their files differ only
//! in how `config.json` maps onto [`RotarySpec`].
//!
//! block: `x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`,
//!        `x += down(act(gate(n2(x))) · up(n2(x)))`; then `norm(x)`, `lm_head`.
//!
//! The model is `embed_tokens`, a [`Block`] per layer ([`block`]), the final `norm` and
//! `lm_head`; the keys of `config.json` are in [`config`].

mod block;
mod config;

pub use block::{Attention, Block, Mlp};
pub use config::{RotaryConfig, RotarySpec};

use super::batch::BatchInput;
use super::norm::RmsNorm;
use super::parts::{self, Part, PartMut, PartRef};
use super::pass::PassCtx;
use super::{nth_block, CausalLm, ModelInfo};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{Embedding, Linear, LinearWeight};
use crate::rope::RopeTables;
use crate::weights::WeightFiles;
use candle_core::Tensor;

pub struct RotaryDecoder {
    info: ModelInfo,
    spec: RotarySpec,
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` for a checkpoint without an LM head (a sequence-classification model).
    lm_head: Option<Linear>,
    rope: RopeTables,
}

/// A block's linear layer `{path}.weight` `[out, inp]` (and `{path}.bias` `[out]`), its
/// weight quantized when the load is.
fn linear(w: &WeightFiles, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    Ok(Linear {
        path: path.to_string(),
        weight: w.block_linear(&format!("{path}.weight"), [out, inp], false)?,
        bias: if bias {
            Some(w.get(&format!("{path}.bias"), &[out])?)
        } else {
            None
        },
        conv1d: false,
    })
}

/// The weights of the decoder `$m` in checkpoint order, written once for either borrow
/// (`$r`: `&` or `&mut`; `$parts`: the matching [`Block`] method): the embedding, every
/// block's, the final norm, the head (when tied, a LoRA candidate but not a parameter).
macro_rules! parts {
    ($m:expr, $parts:ident, $($r:tt)+) => {{
        let tied = $m.spec.tie_word_embeddings;
        std::iter::once(Part::Param(&$m.embed_tokens.path, "weight", $($r)+ $m.embed_tokens.weight))
            .chain(($($r)+ $m.blocks).into_iter().flat_map(Block::$parts))
            .chain([Part::Param(&$m.norm.path, "weight", $($r)+ $m.norm.weight)])
            .chain(($($r)+ $m.lm_head).into_iter().map(move |h| {
                if tied {
                    Part::Tied(h)
                } else {
                    Part::Linear(h)
                }
            }))
    }};
}

impl RotaryDecoder {
    pub fn load(spec: RotarySpec, w: &WeightFiles) -> Result<Self> {
        let h = spec.hidden_size;
        let embed_tokens = Embedding {
            path: "model.embed_tokens".into(),
            weight: w.get("model.embed_tokens.weight", &[spec.vocab_size, h])?,
        };
        let blocks = (0..spec.num_layers)
            .map(|i| Block::new(&spec, w, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(w, "model.norm", h, spec.rms_norm_eps)?;
        let lm_head = if spec.tie_word_embeddings {
            Some(Linear::dense("lm_head", embed_tokens.weight.clone(), None))
        } else if w.contains("lm_head.weight") || !spec.headless_ok {
            // The output head stays in the model's dtype, quantized load or not.
            let head = w.get("lm_head.weight", &[spec.vocab_size, h])?;
            Some(Linear::dense("lm_head", head, None))
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
            weight_dtype: w.weight_dtype(),
            device: w.device().clone(),
            // Set by `load_model` from config.json.
            pad_token_id: None,
            initializer_range: 0.02,
        };
        Ok(Self {
            info,
            spec,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
        })
    }

    pub fn spec(&self) -> &RotarySpec {
        &self.spec
    }

    /// The decoder layers, in order.
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

impl CausalLm for RotaryDecoder {
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
        let windows = self.blocks.iter().map(|b| b.self_attn.window);
        let mut pass = PassCtx::new(&self.info, input, cache, windows)?;
        pass.rope = Some(self.rope.lookup(&input.positions)?);
        Ok((self.embed_tokens.forward(&input.ids, ctx)?, pass))
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
        self.norm.forward(x, ctx)
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

    fn output_head(&self) -> Option<&Linear> {
        self.lm_head.as_ref()
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
        if self.spec.tie_word_embeddings {
            if let Some(head) = self.lm_head.as_mut() {
                head.weight = LinearWeight::Dense(self.embed_tokens.weight.clone());
            }
        }
    }
}
