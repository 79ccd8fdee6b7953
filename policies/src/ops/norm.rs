//! RMSNorm and LayerNorm: a fused forward (our f64-statistics row kernels on the CPU, candle's
//! on the GPU), hand-written backward.
//!
//! Statistics are computed in f32 or better (as transformers does) whatever the model dtype;
//! on the CPU the row sums run in f64 ([`super::norm_rows`]: real models' outlier channels).

use super::bridge::{bridge2, Backward2};
use super::norm_rows;
use candle_core::{DType, Device, Result, Tensor, WithDType, D};

/// Whether the CPU row kernels take this norm: f32/bf16/f16 on the CPU, the per-feature
/// vectors in `x`'s dtype (candle's kernels serve the GPU).
fn on_cpu(x: &Tensor, vecs: &[&Tensor]) -> bool {
    matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && vecs.iter().all(|v| v.dtype() == x.dtype())
}

/// `f` on the elements of the CPU tensor `t` in place (made contiguous first if need be).
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("norm: a CPU tensor was expected");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("norm: not contiguous".into()))?;
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

fn rms_cpu<T: WithDType>(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let y = with_slice::<T, _>(w, |wv| {
        with_slice::<T, _>(x, |xv| norm_rows::rms_norm_forward(xv, wv, eps))
    })??;
    Tensor::from_vec(y, x.shape(), x.device())
}

fn layer_cpu<T: WithDType>(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let y = with_slice::<T, _>(w, |wv| {
        with_slice::<T, _>(x, |xv| norm_rows::layer_norm_forward(xv, wv, eps))
    })??;
    Tensor::from_vec(y, x.shape(), x.device())
}

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
    // candle's fused kernel serves the GPU; the composed version f64 (checks only).
    let out = match x.dtype() {
        DType::F64 => candle_nn::ops::rms_norm_slow(&x.detach(), &w.detach(), eps as f32)?,
        _ if !on_cpu(&x, &[w]) => candle_nn::ops::rms_norm(&x.detach(), &w.detach(), eps as f32)?,
        DType::BF16 => rms_cpu::<half::bf16>(&x, w, eps)?,
        DType::F16 => rms_cpu::<half::f16>(&x, w, eps)?,
        _ => rms_cpu::<f32>(&x, w, eps)?,
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
        if let Some(dxw) = rms_norm_backward_cpu(&self.x, &self.w, g, self.eps, self.need_dw)? {
            return Ok(dxw);
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

/// RMSNorm's gradients on the CPU in f32 (`None` otherwise), one pass per row with f64 sums
/// ([`norm_rows::rms_norm_backward`]): `dx`, and `dw` when the weight is trainable.
fn rms_norm_backward_cpu(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    need_dw: bool,
) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
    if !(super::gemm::cpu_f32(&[x, w, g]) && x.dims() == g.dims()) {
        return Ok(None);
    }
    let (dx, dw) = with_slice::<f32, _>(x, |xv| {
        with_slice::<f32, _>(w, |wv| {
            with_slice::<f32, _>(g, |gv| {
                norm_rows::rms_norm_backward(xv, wv, gv, eps, need_dw)
            })
        })
    })???;
    let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
    let dw = dw
        .map(|d| Tensor::from_vec(d, w.shape(), w.device()))
        .transpose()?;
    Ok(Some((Some(dx), dw)))
}

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · w + b`
///
/// The bias is added with a plain (differentiable) op; w and x go through the bridge.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let zero = || b.detach().zeros_like();
    let out = match x.dtype() {
        DType::F64 => {
            candle_nn::ops::layer_norm_slow(&x.detach(), &w.detach(), &zero()?, eps as f32)?
        }
        _ if !on_cpu(&x, &[w]) => {
            candle_nn::ops::layer_norm(&x.detach(), &w.detach(), &zero()?, eps as f32)?
        }
        DType::BF16 => layer_cpu::<half::bf16>(&x, w, eps)?,
        DType::F16 => layer_cpu::<half::f16>(&x, w, eps)?,
        _ => layer_cpu::<f32>(&x, w, eps)?,
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
