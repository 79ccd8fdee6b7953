//! The one linear layer of every family: a base weight (frozen, or a variable when the base
//! is trained) plus the LoRA path of the active adapter, looked up by module path.
//!
//! `y = x Wᵀ + b + (α/r) · B A dropout(x)`

use crate::ctx::ForwardCtx;
use crate::lora::{Adapter, LoraModule};
use crate::ops::frozen_matmul_t;
use crate::quant::QuantWeight;
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// A linear layer's weight `[out, in]`.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A tensor in the model's dtype (a variable when the base is trained).
    Dense(Tensor),
    /// Frozen k-bit codes (`model.quantization`): products dequantize a block of rows at a
    /// time on the CPU; off the CPU the weight is dequantized for each product.
    Quantized(Arc<QuantWeight>),
}

impl LinearWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(t) => (t.dims()[0], t.dims()[1]),
            LinearWeight::Quantized(q) => q.dims(),
        }
    }

    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            LinearWeight::Dense(t) => Some(t),
            LinearWeight::Quantized(_) => None,
        }
    }

    /// A weight tensor `[out, in]` held as `cfg` says: the tensor itself for `none`, else its
    /// codes, quantized from its values in its own dtype (as bitsandbytes quantizes the weight
    /// transformers loaded).
    pub fn from_tensor(w: Tensor, cfg: crate::quant::QuantConfig) -> Result<Self> {
        if cfg.is_none() {
            return Ok(LinearWeight::Dense(w));
        }
        let (n, k) = w.dims2()?;
        let v: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        drop(w);
        Ok(match QuantWeight::quantize(&v, n, k, cfg) {
            Some(q) => LinearWeight::Quantized(Arc::new(q)),
            None => unreachable!("cfg is not none"),
        })
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, LinearWeight::Quantized(_))
    }

    /// Bytes held: the tensor's, or the codes and scales of a quantized weight.
    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path as Hugging Face names it, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `[out, in]` (GPT-2's Conv1D weights are transposed at load).
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    /// Stored `[in, out]` in the checkpoint (GPT-2 Conv1D): PEFT's `fan_in_fan_out`.
    pub conv1d: bool,
}

/// The single CPU op [`Linear::one_op`] found for a layer.
enum OneOp {
    /// The LoRA op with the adapter's (tracked or detached) `A`, `B`, its scale and mask.
    Lora {
        a: Tensor,
        b: Tensor,
        scale: f64,
        mask: Option<Vec<f32>>,
    },
    /// The frozen op with the (detached) weight.
    Frozen(Tensor),
}

impl Linear {
    /// A layer with a dense weight.
    pub fn dense(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            path: path.into(),
            weight: LinearWeight::Dense(weight),
            bias,
            conv1d: false,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// The dense weight, or an error naming the layer when it is quantized (an output head,
    /// a merge or an export needs the tensor).
    pub fn dense_weight(&self) -> Result<&Tensor> {
        self.weight.dense().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: the weight is quantized; this needs the full-precision base (load it with quantization = \"none\")",
                self.path
            ))
        })
    }

    /// The adapter's module for this layer, if the active adapter has one.
    fn lora<'a>(&self, ctx: &ForwardCtx<'a>) -> Option<(&'a Adapter, &'a LoraModule)> {
        ctx.adapter
            .and_then(|a| a.module(&self.path).map(|m| (a, m)))
    }

    /// The one CPU op that computes this layer on `x`, when there is one: the LoRA op
    /// (`ops::lora_linear`, its dropout mask drawn here, where the composed path would draw
    /// it) or, without an adapter module, the frozen op (`ops::matmul`; the bias is added
    /// after it). Both take `x` as it comes: no reshapes in the graph.
    fn one_op(&self, x: &Tensor, ctx: &ForwardCtx) -> Option<OneOp> {
        match (self.lora(ctx), &self.weight) {
            (Some((adapter, module)), w) => {
                let (a, b) = (
                    ctx.param(module.a.as_tensor()),
                    ctx.param(module.b.as_tensor()),
                );
                crate::ops::lora_linear::applies(x, w, self.bias.as_ref(), &a, &b).then(|| {
                    let mask = ctx.dropout_mask(adapter.config.lora_dropout, x.elem_count());
                    OneOp::Lora {
                        a,
                        b,
                        scale: adapter.scale(),
                        mask,
                    }
                })
            }
            (None, LinearWeight::Dense(w)) => (!(w.is_variable() && ctx.grad)
                && crate::ops::matmul::takes_any_rank(x, w))
            .then(|| OneOp::Frozen(w.detach())),
            (None, LinearWeight::Quantized(_)) => None,
        }
    }

    /// `x`: [..., in] → [..., out].
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        match self.one_op(x, ctx) {
            // One op for base + adapter: one output in the graph.
            Some(OneOp::Lora { a, b, scale, mask }) => {
                return crate::ops::lora_linear::lora_linear(
                    x,
                    &self.weight,
                    bias,
                    &a,
                    &b,
                    scale,
                    mask,
                );
            }
            Some(OneOp::Frozen(w)) => {
                let y = frozen_matmul_t(x, &w)?;
                return match bias {
                    Some(b) => y.broadcast_add(&ctx.param(b)),
                    None => Ok(y),
                };
            }
            None => {}
        }
        let out_dims = crate::ops::with_last(x.dims(), self.out_features());
        let x2 = x.reshape(((), self.in_features()))?;
        let mut y = self.base_product(&x2, ctx)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&ctx.param(b))?;
        }
        if let Some((adapter, module)) = self.lora(ctx) {
            let delta = module.delta(&x2, adapter.scale(), adapter.config.lora_dropout, ctx)?;
            y = (y + delta.to_dtype(x.dtype())?)?;
        }
        y.reshape(out_dims)
    }

    /// A scalar whose gradients are those of `Σ g ⊙ forward(x)` (`g` [.., out], the gradient
    /// at the layer's output): the vector–Jacobian product a checkpointed backward needs of a
    /// block's last layer. Where one CPU op computes the layer (LoRA or frozen), its backward
    /// runs without its forward product and the scalar's value is 0 ([`crate::ops::vjp`]);
    /// elsewhere it is the sum itself. LoRA dropout draws its mask as [`Linear::forward`] does.
    pub fn vjp_surrogate(&self, x: &Tensor, g: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        let trainable_bias = bias.is_some_and(|b| b.is_variable() && ctx.grad);
        match self.one_op(x, ctx) {
            Some(OneOp::Lora { a, b, scale, mask }) => crate::ops::lora_linear::lora_linear_vjp(
                x,
                &self.weight,
                bias,
                &a,
                &b,
                scale,
                mask,
                g,
            ),
            // A frozen bias adds a constant: no gradient.
            Some(OneOp::Frozen(w)) if !trainable_bias => {
                crate::ops::matmul::frozen_matmul_t_vjp(x, &w, g)
            }
            _ => (self.forward(x, ctx)? * g)?.sum_all(),
        }
    }

    /// `x Wᵀ` for `x` [n, in].
    fn base_product(&self, x2: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) if w.is_variable() && ctx.grad => x2.matmul(&w.t()?),
            // Frozen base: no weight gradient is ever computed.
            LinearWeight::Dense(w) => frozen_matmul_t(x2, &w.detach()),
            LinearWeight::Quantized(q) if x2.device().is_cpu() && x2.dtype() == DType::F32 => {
                crate::ops::quant_linear::quant_matmul_t(x2, q)
            }
            LinearWeight::Quantized(q) => {
                // Off the CPU (or in another dtype): the weight dequantized for this product.
                let (n, k) = q.dims();
                let w =
                    Tensor::from_vec(q.dequantize(), (n, k), x2.device())?.to_dtype(x2.dtype())?;
                frozen_matmul_t(x2, &w)
            }
        }
    }

    /// `W ← W + scale · B A` in f32, stored back in the weight's dtype.
    pub fn merge(&mut self, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
        let w = self.dense_weight()?;
        let dtype = w.dtype();
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        self.weight = LinearWeight::Dense((w.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?);
        Ok(())
    }

    /// Replaces a dense weight by its `cfg` quantization (a no-op for `none` or a weight
    /// already quantized).
    pub fn quantize(&mut self, cfg: crate::quant::QuantConfig) -> Result<()> {
        if let LinearWeight::Dense(w) = &self.weight {
            self.weight = LinearWeight::from_tensor(w.clone(), cfg)?;
        }
        Ok(())
    }
}

/// `(path.weight, W)` and `(path.bias, b)` of a linear layer; a quantized weight is not a
/// parameter (it is frozen and has no tensor) and is not listed.
pub fn linear_params(lin: &mut Linear) -> Vec<(String, &mut Tensor)> {
    let mut out = Vec::new();
    if let LinearWeight::Dense(w) = &mut lin.weight {
        out.push((format!("{}.weight", lin.path), w));
    }
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
