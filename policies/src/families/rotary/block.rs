//! One layer of the rotary decoder: [`Attention`], [`Mlp`] and the [`Block`] that puts each
//! behind a pre-norm and a residual add.

use super::{linear, RotarySpec};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::families::config::Activation;
use crate::families::norm::RmsNorm;
use crate::families::parts::{Part, PartMut, PartRef};
use crate::families::pass::PassCtx;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::ops::rope::split_heads;
use crate::weights::WeightFiles;
use candle_core::Tensor;

/// `o(attn(rope(q(h)), rope(k(h)), v(h)))` with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (`None`: full attention).
    pub window: Option<usize>,
    /// The layer's index: its slot in a KV cache.
    pub layer: usize,
}

impl Attention {
    /// `model.layers.{layer}.self_attn.*`.
    pub fn new(spec: &RotarySpec, w: &WeightFiles, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.self_attn");
        let (h, nq, nkv) = (
            spec.hidden_size,
            spec.num_heads * spec.head_dim,
            spec.num_kv_heads * spec.head_dim,
        );
        Ok(Self {
            q_proj: linear(w, &format!("{p}.q_proj"), nq, h, spec.qkv_bias)?,
            k_proj: linear(w, &format!("{p}.k_proj"), nkv, h, spec.qkv_bias)?,
            v_proj: linear(w, &format!("{p}.v_proj"), nkv, h, spec.qkv_bias)?,
            o_proj: linear(w, &format!("{p}.o_proj"), h, nq, spec.o_bias)?,
            num_heads: spec.num_heads,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            window: spec.layer_windows.get(layer).copied().flatten(),
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
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, heads, t, d], rotated (ops::rope::split_heads: one node each).
        let (cos, sin) = pass.rope()?;
        let q = split_heads(&self.q_proj.forward(h, ctx)?, nh, Some((cos, sin)))?;
        let k = split_heads(&self.k_proj.forward(h, ctx)?, nkv, Some((cos, sin)))?;
        let v = split_heads(&self.v_proj.forward(h, ctx)?, nkv, None)?;
        let (k, v) = match cache {
            Some(c) => c.append(self.layer, &k, &v)?,
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let a = pass.attend(&q, &k, &v, self.window, scale)?;
        Ok(self.o_proj.forward(&a, ctx)?)
    }
}

/// `down(act(gate(h)) · up(h))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    /// `model.layers.{layer}.mlp.*`.
    pub fn new(spec: &RotarySpec, w: &WeightFiles, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.mlp");
        let (h, inter, bias) = (spec.hidden_size, spec.intermediate_size, spec.mlp_bias);
        Ok(Self {
            gate_proj: linear(w, &format!("{p}.gate_proj"), inter, h, bias)?,
            up_proj: linear(w, &format!("{p}.up_proj"), inter, h, bias)?,
            down_proj: linear(w, &format!("{p}.down_proj"), h, inter, bias)?,
            act: spec.act,
        })
    }

    /// `act(gate(h)) · up(h)`: the down projection's input (the MLP is
    /// `down_proj(activation(h))`).
    pub fn activation(&self, h: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let g = self.gate_proj.forward(h, ctx)?;
        let u = self.up_proj.forward(h, ctx)?;
        Ok(match self.act {
            // One op for silu(g) ⊙ u, forward and backward (ops::swiglu).
            Activation::Silu => crate::ops::swiglu(&g, &u)?,
            act => (act.apply(&g)? * u)?,
        })
    }
}

/// The weights of a [`Block`] `$b` in checkpoint order, written once for either borrow
/// (`$r`: `&` or `&mut`): the two norms, then q, k, v, o, gate, up, down.
macro_rules! parts {
    ($b:expr, $($r:tt)+) => {
        [
            Part::Param(&$b.input_layernorm.path, "weight", $($r)+ $b.input_layernorm.weight),
            Part::Param(
                &$b.post_attention_layernorm.path,
                "weight",
                $($r)+ $b.post_attention_layernorm.weight,
            ),
            Part::Linear($($r)+ $b.self_attn.q_proj),
            Part::Linear($($r)+ $b.self_attn.k_proj),
            Part::Linear($($r)+ $b.self_attn.v_proj),
            Part::Linear($($r)+ $b.self_attn.o_proj),
            Part::Linear($($r)+ $b.mlp.gate_proj),
            Part::Linear($($r)+ $b.mlp.up_proj),
            Part::Linear($($r)+ $b.mlp.down_proj),
        ]
    };
}

/// One decoder layer: `x += self_attn(n1(x))`, `x += mlp(n2(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    /// `model.layers.{layer}.*`.
    pub fn new(spec: &RotarySpec, w: &WeightFiles, layer: usize) -> Result<Self> {
        let (p, h, eps) = (
            format!("model.layers.{layer}"),
            spec.hidden_size,
            spec.rms_norm_eps,
        );
        Ok(Self {
            input_layernorm: RmsNorm::new(w, &format!("{p}.input_layernorm"), h, eps)?,
            self_attn: Attention::new(spec, w, layer)?,
            post_attention_layernorm: RmsNorm::new(
                w,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: Mlp::new(spec, w, layer)?,
        })
    }

    /// The block's weights: the norms, then its linears (see [`crate::families::parts`]).
    pub fn parts(&self) -> [PartRef<'_>; 9] {
        parts!(self, &)
    }

    pub fn parts_mut(&mut self) -> [PartMut<'_>; 9] {
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
        let (x, a) = self.mlp_input(x, pass, ctx, cache)?;
        Ok((x + self.mlp.down_proj.forward(&a, ctx)?)?)
    }

    /// The block up to its last product: the residual stream after the attention `x'` and
    /// the down projection's input `a`, so that `forward(x) = x' + down_proj(a)`.
    fn mlp_input(
        &self,
        x: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.input_layernorm.forward(x, ctx)?;
        let x = (x + self.self_attn.forward(&h, pass, ctx, cache)?)?;
        let h = self.post_attention_layernorm.forward(&x, ctx)?;
        let a = self.mlp.activation(&h, ctx)?;
        Ok((x, a))
    }

    /// The surrogate `Σ forward(x) ⊙ g` of [`CausalLm::block_vjp`], without the down
    /// projection's product: `forward(x) = x' + down(a)`, so it is `Σ x' ⊙ g` plus the down
    /// layer's [`Linear::vjp_surrogate`].
    ///
    /// [`CausalLm::block_vjp`]: crate::families::CausalLm::block_vjp
    /// [`Linear::vjp_surrogate`]: crate::linear::Linear::vjp_surrogate
    pub fn vjp_surrogate(
        &self,
        x: &Tensor,
        g: &Tensor,
        pass: &PassCtx,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (x, a) = self.mlp_input(x, pass, ctx, None)?;
        let down = self.mlp.down_proj.vjp_surrogate(&a, g, ctx)?;
        Ok(((x * g)?.sum_all()? + down)?)
    }
}
