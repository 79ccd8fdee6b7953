//! RMSNorm and LayerNorm: candle's fused forward, hand-written backward.
//!
//! Statistics are computed in f32 (as transformers does) whatever the model dtype.

use super::bridge::{bridge2, Backward2};
use candle_core::{DType, Result, Tensor, D};

fn internal(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Sums `g` over every dimension but the last: the gradient of a per-feature weight.
fn sum_to_last(g: &Tensor) -> Result<Tensor> {
    let n = g.dim(D::Minus1)?;
    g.reshape(((), n))?.sum(0)
}

/// `y = x / sqrt(mean(x²) + eps) · w`
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    // candle's fused kernel has no f64 path; the composed version serves f64 (checks only).
    let out = if x.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(&x.detach(), &w.detach(), eps as f32)?
    } else {
        candle_nn::ops::rms_norm(&x.detach(), &w.detach(), eps as f32)?
    };
    bridge2(
        &x,
        w,
        out,
        RmsNormBwd {
            x: x.detach(),
            w: w.detach(),
            eps,
        },
    )
}

struct RmsNormBwd {
    x: Tensor,
    w: Tensor,
    eps: f64,
}

impl Backward2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bridge"
    }
    // With r = 1/sqrt(mean(x²)+eps), x̂ = x·r, gw = g·w:
    //   dx = r·gw − x̂·r·mean(gw·x̂),   dw = Σ_rows g·x̂
    fn backward(&self, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dtype = self.x.dtype();
        let x = internal(&self.x)?;
        let g = internal(g)?;
        let w = self.w.to_dtype(super::compute_dtype(self.w.dtype()))?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(&w)?;
        let proj = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = (gw - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&r)?;
        let dw = sum_to_last(&(&g * &xhat)?)?;
        Ok((
            Some(dx.to_dtype(dtype)?),
            Some(dw.to_dtype(self.w.dtype())?),
        ))
    }
}

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · w + b`
///
/// The bias is added with a plain (differentiable) op; w and x go through the bridge.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let zero = b.detach().zeros_like()?;
    let out = if x.dtype() == DType::F64 {
        candle_nn::ops::layer_norm_slow(&x.detach(), &w.detach(), &zero, eps as f32)?
    } else {
        candle_nn::ops::layer_norm(&x.detach(), &w.detach(), &zero, eps as f32)?
    };
    let scaled = bridge2(
        &x,
        w,
        out,
        LayerNormBwd {
            x: x.detach(),
            w: w.detach(),
            eps,
        },
    )?;
    scaled.broadcast_add(b)
}

struct LayerNormBwd {
    x: Tensor,
    w: Tensor,
    eps: f64,
}

impl Backward2 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bridge"
    }
    // With x̂ = (x − μ)·r, gw = g·w:
    //   dx = r·(gw − mean(gw) − x̂·mean(gw·x̂)),   dw = Σ_rows g·x̂
    fn backward(&self, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dtype = self.x.dtype();
        let x = internal(&self.x)?;
        let g = internal(g)?;
        let w = self.w.to_dtype(super::compute_dtype(self.w.dtype()))?;
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = centered.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(&w)?;
        let mean_gw = gw.mean_keepdim(D::Minus1)?;
        let proj = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&mean_gw)?
            .sub(&xhat.broadcast_mul(&proj)?)?
            .broadcast_mul(&r)?;
        let dw = sum_to_last(&(&g * &xhat)?)?;
        Ok((
            Some(dx.to_dtype(dtype)?),
            Some(dw.to_dtype(self.w.dtype())?),
        ))
    }
}
