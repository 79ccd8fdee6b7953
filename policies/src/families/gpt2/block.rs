//! One GPT-2 layer: [`Attention`] (fused q/k/v), [`Mlp`] and the [`Block`] that puts each
//! behind a LayerNorm and a residual add.

use super::{conv1d, layer_norm, Gpt2Config};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::families::config::Activation;
use crate::families::norm::LayerNorm;
use crate::families::parts::{Part, PartMut, PartRef};
use crate::families::pass::PassCtx;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::weights::WeightFiles;
use candle_core::Tensor;

/// `c_proj(attn(split(c_attn(h))))`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v in one `[3·hidden, hidden]` projection.
    pub c_attn: Linear,
    pub c_proj: Linear,
    pub num_heads: usize,
    pub head_dim: usize,
    /// `1/√head_dim` (when `scale_attn_weights`), divided by `layer + 1` when
    /// `scale_attn_by_inverse_layer_idx`.
    pub scale: f64,
    /// The layer's index: its slot in a KV cache.
    pub layer: usize,
}

impl Attention {
    /// `h.{layer}.attn.*`.
    pub fn new(cfg: &Gpt2Config, w: &WeightFiles, layer: usize) -> Result<Self> {
        let (p, h, hd) = (format!("h.{layer}.attn"), cfg.n_embd, cfg.head_dim());
        let mut scale = if cfg.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            c_attn: conv1d(w, &format!("{p}.c_attn"), h, 3 * h)?,
            c_proj: conv1d(w, &format!("{p}.c_proj"), h, h)?,
            num_heads: cfg.n_head,
            head_dim: hd,
            scale,
            layer,
        })
    }

    /// `h`: normed hidden states `[b, t, hidden]` → `[b, t, hidden]`. With a cache, this
    /// step's keys and values are appended to the layer's slot and all of them attended.
    pub fn forward(
        &self,
        h: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        let n = nh * hd;
        let qkv = self.c_attn.forward(h, ctx)?;
        let split = |j: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, j * n, n)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = match cache {
            Some(c) => c.append(self.layer, &k, &v)?,
            None => (k, v),
        };
        let a = pass.attend(&q, &k, &v, None, self.scale)?;
        Ok(self.c_proj.forward(&a, ctx)?)
    }
}

/// `c_proj(act(c_fc(h)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    /// `h.{layer}.mlp.*`.
    pub fn new(cfg: &Gpt2Config, w: &WeightFiles, layer: usize) -> Result<Self> {
        let (p, h, inner) = (format!("h.{layer}.mlp"), cfg.n_embd, cfg.inner());
        Ok(Self {
            c_fc: conv1d(w, &format!("{p}.c_fc"), h, inner)?,
            c_proj: conv1d(w, &format!("{p}.c_proj"), inner, h)?,
            act: cfg.activation_function,
        })
    }

    /// `act(c_fc(h))`: the output projection's input (the MLP is `c_proj(activation(h))`).
    pub fn activation(&self, h: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(self.act.apply(&self.c_fc.forward(h, ctx)?)?)
    }
}

/// The weights of a [`Block`] `$b` in checkpoint order, written once for either borrow
/// (`$r`: `&` or `&mut`): both LayerNorms, then c_attn, attn.c_proj, c_fc, mlp.c_proj.
macro_rules! parts {
    ($b:expr, $($r:tt)+) => {
        [
            Part::Param(&$b.ln_1.path, "weight", $($r)+ $b.ln_1.weight),
            Part::Param(&$b.ln_1.path, "bias", $($r)+ $b.ln_1.bias),
            Part::Param(&$b.ln_2.path, "weight", $($r)+ $b.ln_2.weight),
            Part::Param(&$b.ln_2.path, "bias", $($r)+ $b.ln_2.bias),
            Part::Linear($($r)+ $b.attn.c_attn),
            Part::Linear($($r)+ $b.attn.c_proj),
            Part::Linear($($r)+ $b.mlp.c_fc),
            Part::Linear($($r)+ $b.mlp.c_proj),
        ]
    };
}

/// One layer: `x += attn(ln_1(x))`, `x += mlp(ln_2(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    /// `h.{layer}.*` (with or without the `transformer.` prefix).
    pub fn new(cfg: &Gpt2Config, w: &WeightFiles, layer: usize) -> Result<Self> {
        let (p, h, eps) = (format!("h.{layer}"), cfg.n_embd, cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: layer_norm(w, &format!("{p}.ln_1"), h, eps)?,
            attn: Attention::new(cfg, w, layer)?,
            ln_2: layer_norm(w, &format!("{p}.ln_2"), h, eps)?,
            mlp: Mlp::new(cfg, w, layer)?,
        })
    }

    /// The block's weights: the norms, then its linears (see [`crate::families::parts`]).
    pub fn parts(&self) -> [PartRef<'_>; 8] {
        parts!(self, &)
    }

    pub fn parts_mut(&mut self) -> [PartMut<'_>; 8] {
        parts!(self, &mut)
    }

    /// Hidden states `[b, t, hidden]` in and out; see [`CausalLm::block_forward`].
    ///
    /// [`CausalLm::block_forward`]: crate::families::CausalLm::block_forward
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (x, m) = self.mlp_input(x, pass, ctx, cache)?;
        Ok((x + self.mlp.c_proj.forward(&m, ctx)?)?)
    }

    /// The block up to its last product: the residual stream after the attention `x'` and
    /// the MLP's output projection's input `m`, so that `forward(x) = x' + c_proj(m)`.
    fn mlp_input(
        &self,
        x: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.ln_1.forward(x, ctx)?;
        let x = (x + self.attn.forward(&h, pass, ctx, cache)?)?;
        let h = self.ln_2.forward(&x, ctx)?;
        let m = self.mlp.activation(&h, ctx)?;
        Ok((x, m))
    }

    /// The surrogate `Σ forward(x) ⊙ g` of [`CausalLm::block_vjp`], without the MLP's output
    /// projection's product (see the rotary block's).
    ///
    /// [`CausalLm::block_vjp`]: crate::families::CausalLm::block_vjp
    pub fn vjp_surrogate(
        &self,
        x: &Tensor,
        g: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (x, m) = self.mlp_input(x, pass, ctx, None)?;
        let proj = self.mlp.c_proj.vjp_surrogate(&m, g, ctx)?;
        Ok(((x * g)?.sum_all()? + proj)?)
    }
}
