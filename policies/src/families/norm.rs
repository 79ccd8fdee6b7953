//! The normalisation layers of the families, each with the module path its weights carry.

use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::ops::{layer_norm, rms_norm};
use crate::weights::WeightFiles;
use candle_core::Tensor;

/// `x / rms(x) · w` (Llama's `LlamaRMSNorm`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Module path, e.g. `model.layers.0.input_layernorm`; the weight is `{path}.weight`.
    pub path: String,
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// `{path}.weight` of shape `[size]`.
    pub fn new(w: &WeightFiles, path: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            path: path.to_string(),
            weight: w.get(&format!("{path}.weight"), &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(rms_norm(x, &ctx.param(&self.weight), self.eps)?)
    }
}

/// `(x − mean) / std · w + b` (`nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Module path, e.g. `transformer.h.0.ln_1`; the tensors are `{path}.weight`, `{path}.bias`.
    pub path: String,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(layer_norm(
            x,
            &ctx.param(&self.weight),
            &ctx.param(&self.bias),
            self.eps,
        )?)
    }
}
