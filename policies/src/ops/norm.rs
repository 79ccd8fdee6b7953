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
            need_dw: w.track_op(),
        },
    )
}

struct RmsNormBwd {
    x: Tensor,
    w: Tensor,
    eps: f64,
    /// The weight is trainable (full or last-N-layers training): compute its gradient.
    need_dw: bool,
}

impl Backward2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bridge"
    }
    // With r = 1/sqrt(mean(x²)+eps), x̂ = x·r, gw = g·w:
    //   dx = r·gw − x̂·r·mean(gw·x̂),   dw = Σ_rows g·x̂
    fn backward(&self, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !self.need_dw {
            if let Some(dx) = rms_norm_dx_cpu(&self.x, &self.w, g, self.eps)? {
                return Ok((Some(dx), None));
            }
        }
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
        let dw = if self.need_dw {
            Some(sum_to_last(&(&g * &xhat)?)?.to_dtype(self.w.dtype())?)
        } else {
            None
        };
        Ok((Some(dx.to_dtype(dtype)?), dw))
    }
}

/// RMSNorm's input gradient in one pass per row (CPU, f32, contiguous; None otherwise),
/// the same formula as the composed backward: r = 1/sqrt(mean(x²)+eps),
/// dx = r·(g·w − x·r·mean(g·w·x·r)).
fn rms_norm_dx_cpu(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    let ok = super::gemm::cpu_f32(&[x, w, g])
        && x.is_contiguous()
        && g.is_contiguous()
        && w.is_contiguous()
        && x.dims() == g.dims();
    if !ok {
        return Ok(None);
    }
    let n = x.dim(D::Minus1)?;
    let rows = x.elem_count() / n.max(1);
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (sg, lg) = g.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(xv)),
        Storage::Cpu(CpuStorage::F32(wv)),
        Storage::Cpu(CpuStorage::F32(gv)),
    ) = (&*sx, &*sw, &*sg)
    else {
        return Ok(None);
    };
    let (xv, wv, gv) = (
        &xv[lx.start_offset()..lx.start_offset() + rows * n],
        &wv[lw.start_offset()..lw.start_offset() + n],
        &gv[lg.start_offset()..lg.start_offset() + rows * n],
    );
    let mut dx = vec![0f32; rows * n];
    for row in 0..rows {
        let (xr, gr) = (&xv[row * n..(row + 1) * n], &gv[row * n..(row + 1) * n]);
        let ms: f32 = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (ms + eps as f32).sqrt();
        let proj: f32 = (0..n).map(|i| gr[i] * wv[i] * xr[i] * r).sum::<f32>() / n as f32;
        for i in 0..n {
            dx[row * n + i] = r * (gr[i] * wv[i] - xr[i] * r * proj);
        }
    }
    drop((sx, sw, sg));
    Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
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
