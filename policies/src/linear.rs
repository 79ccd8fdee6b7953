//! The one linear layer of every family: a base weight (frozen, or a variable when the base
//! is trained) plus the LoRA path of the active adapter, looked up by module path.
//!
//! `y = x Wᵀ + b + (α/r) · B A dropout(x)`

use crate::ctx::ForwardCtx;
use crate::ops::frozen_matmul_t;
use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path as Hugging Face names it, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `[out, in]` (GPT-2's Conv1D weights are transposed at load).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Stored `[in, out]` in the checkpoint (GPT-2 Conv1D): PEFT's `fan_in_fan_out`.
    pub conv1d: bool,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x`: [..., in] → [..., out].
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let x2 = x.reshape(((), self.in_features()))?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("linear input has a last dim") = self.out_features();
        let lora = ctx
            .adapter
            .and_then(|a| a.module(&self.path).map(|m| (a, m)));
        if let Some((adapter, module)) = lora {
            let (a, b) = (
                ctx.param(module.a.as_tensor()),
                ctx.param(module.b.as_tensor()),
            );
            if crate::ops::lora_linear::applies(&x2, &self.weight, self.bias.as_ref(), &a, &b) {
                // One op for base + adapter (ops::lora_linear): one output in the graph.
                let p = adapter.config.lora_dropout;
                let mask = ctx.dropout_mask(p, x2.elem_count());
                let w = self.weight.detach();
                let y = crate::ops::lora_linear::lora_linear(
                    &x2,
                    &w,
                    self.bias.as_ref(),
                    &a,
                    &b,
                    adapter.scale(),
                    mask,
                )?;
                return y.reshape(out_dims);
            }
        }
        let mut y = if self.weight.is_variable() && ctx.grad {
            x2.matmul(&self.weight.t()?)?
        } else {
            // Frozen base: no weight gradient is ever computed.
            frozen_matmul_t(&x2, &self.weight.detach())?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&ctx.param(b))?;
        }
        if let Some((adapter, module)) = lora {
            let delta = module.delta(&x2, adapter.scale(), adapter.config.lora_dropout, ctx)?;
            y = (y + delta.to_dtype(x.dtype())?)?;
        }
        y.reshape(out_dims)
    }

    /// `W ← W + scale · B A` in f32, stored back in the weight's dtype.
    pub fn merge(&mut self, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
        let dtype = self.weight.dtype();
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        self.weight = (self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
        Ok(())
    }
}

/// `(path.weight, W)` and `(path.bias, b)` of a linear layer.
pub fn linear_params(lin: &mut Linear) -> Vec<(String, &mut Tensor)> {
    let mut out = vec![(format!("{}.weight", lin.path), &mut lin.weight)];
    if let Some(b) = lin.bias.as_mut() {
        out.push((format!("{}.bias", lin.path), b));
    }
    out
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub path: String,
    pub weight: Tensor,
}

impl Embedding {
    /// `ids`: [b, t] u32 → [b, t, hidden], in the activation dtype (a half-precision table
    /// on the CPU is widened row by row here).
    pub fn forward(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let w = &self.weight;
        ctx.param(w)
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(crate::device::activation_dtype(w.dtype(), w.device()))?
            .reshape((b, t, ()))
    }
}
