//! Rotary position embedding (the "rotate half" layout of Llama/Qwen2/Mistral) with backward.
//!
//! The rotation of each (x_i, x_{i+d/2}) pair by angle θ is orthogonal, so its transpose, the
//! gradient map, is the rotation by −θ: `dx = rope(dy, cos, −sin)`.

use super::bridge::{bridge1, Backward1};
use candle_core::{Result, Tensor};

/// `x`: [b, heads, t, d]; `cos`, `sin`: [b, t, d/2] (per-sequence positions) or [t, d/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let out = candle_nn::rotary_emb::rope(&x.detach(), cos, sin)?;
    bridge1(
        &x,
        out,
        RopeBwd {
            cos: cos.clone(),
            neg_sin: sin.neg()?,
        },
    )
}

struct RopeBwd {
    cos: Tensor,
    neg_sin: Tensor,
}

impl Backward1 for RopeBwd {
    fn name(&self) -> &'static str {
        "rope-bridge"
    }
    fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&dy.contiguous()?, &self.cos, &self.neg_sin)
    }
}
