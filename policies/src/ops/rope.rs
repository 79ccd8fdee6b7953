//! Rotary position embedding (the "rotate half" layout of Llama/Qwen2/Mistral) with backward.
//!
//! The rotation of each (x_i, x_{i+d/2}) pair by angle θ is orthogonal, so its transpose, the
//! gradient map, is the rotation by −θ: `dx = rope(dy, cos, −sin)`.

use super::bridge::{bridge1, Backward1};
use candle_core::{
    CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

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

/// A projection's output `x` [b, t, heads·d] as attention reads it, `[b, heads, t, d]`
/// contiguous, rotated by [`rope`] when `rotary` (`cos`, `sin` as for [`rope`]) is given.
///
/// One node in the graph where reshape, transpose, copy and rope made four: candle's backward
/// gives every node a zeroed gradient and adds into it (the transpose's add strided), so at a
/// real size those nodes cost more than the rotation. Backward: `dy` rotated by −θ and laid
/// back out as [b, t, heads·d]. CPU f32/f64; elsewhere the composed ops.
pub fn split_heads(x: &Tensor, heads: usize, rotary: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    if heads == 0
        || !w.is_multiple_of(heads)
        || (rotary.is_some() && !(w / heads).is_multiple_of(2))
    {
        candle_core::bail!("split_heads: width {w} is not {heads} heads of an even size");
    }
    let d = w / heads;
    let cpu = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && rotary.is_none_or(|(c, s)| {
            c.dtype() == x.dtype() && s.dtype() == x.dtype() && c.device().is_cpu()
        });
    if !cpu {
        let xh = x.reshape((b, t, heads, d))?.transpose(1, 2)?;
        return match rotary {
            Some((cos, sin)) => rope(&xh, cos, sin),
            None => xh.contiguous(),
        };
    }
    let rotary = rotary
        .map(|(c, s)| -> Result<_> { Ok((c.contiguous()?, s.contiguous()?)) })
        .transpose()?;
    x.contiguous()?.apply_op1(SplitHeads {
        dims: (b, t, heads, d),
        rotary,
    })
}

struct SplitHeads {
    /// (b, t, heads, d).
    dims: (usize, usize, usize, usize),
    /// `cos`, `sin`: [b, t, d/2] or [t, d/2], contiguous.
    rotary: Option<(Tensor, Tensor)>,
}

impl SplitHeads {
    /// Moves rows between `[b, t, h, d]` (`to_heads`: from it) and `[b, h, t, d]`, rotating
    /// each by θ (`sign` = 1) or −θ (`sign` = −1) where there is a rotation.
    fn run<T: WithDType>(&self, src: &[T], to_heads: bool, sign: T) -> Result<Vec<T>> {
        let (b, t, h, d) = self.dims;
        let half = d / 2;
        let guards = self
            .rotary
            .as_ref()
            .map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let tables: Option<(&[T], &[T], bool)> = match &guards {
            Some(((cg, cl), (sg, sl))) => {
                let (Storage::Cpu(c), Storage::Cpu(s)) = (&**cg, &**sg) else {
                    candle_core::bail!("split_heads: CPU rotary tables");
                };
                let c = &c.as_slice::<T>()?[cl.start_offset()..];
                let s = &s.as_slice::<T>()?[sl.start_offset()..];
                Some((c, s, cl.dims().len() == 3))
            }
            None => None,
        };
        if let Some((c, s, batched)) = tables {
            let need = if batched { b * t * half } else { t * half };
            if c.len() < need || s.len() < need {
                candle_core::bail!("split_heads: rotary tables shorter than {need}");
            }
        }
        let mut dst = vec![T::zero(); b * t * h * d];
        // Each task writes one [t, d] block of the [b, h, t, d] side (to_heads) or one
        // [h, d] row of the [b, t, h, d] side.
        let block = if to_heads { t * d } else { h * d };
        let fill = |(i, out): (usize, &mut [T])| {
            let rows = if to_heads { t } else { h };
            for r in 0..rows {
                // (bi, ti, hi) of this row.
                let (bi, ti, hi) = if to_heads {
                    (i / h, r, i % h)
                } else {
                    (i / t, i % t, r)
                };
                let from = if to_heads {
                    ((bi * t + ti) * h + hi) * d
                } else {
                    ((bi * h + hi) * t + ti) * d
                };
                let x = &src[from..from + d];
                let y = &mut out[r * d..(r + 1) * d];
                match tables {
                    None => y.copy_from_slice(x),
                    Some((cos, sin, batched)) => {
                        let cs = if batched {
                            (bi * t + ti) * half
                        } else {
                            ti * half
                        };
                        for j in 0..half {
                            let (c, s) = (cos[cs + j], sin[cs + j] * sign);
                            // candle's rope kernel's expressions, so the bits are its bits.
                            y[j] = x[j] * c - x[j + half] * s;
                            y[j + half] = x[j] * s + x[j + half] * c;
                        }
                    }
                }
            }
        };
        if dst.len() <= 1 << 14 {
            // A decoding step's few rows: on this thread, not through rayon's pool.
            dst.chunks_mut(block.max(1)).enumerate().for_each(fill);
        } else {
            dst.par_chunks_mut(block.max(1)).enumerate().for_each(fill);
        }
        Ok(dst)
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, d) = self.dims;
        let (o1, o2) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("split_heads: contiguous input".into()))?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[o1..o2], true, 1f32)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[o1..o2], true, 1f64)?),
            _ => candle_core::bail!("split_heads: f32 or f64"),
        };
        Ok((out, Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let (s, l) = dy.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            candle_core::bail!("split_heads: CPU gradient");
        };
        let (o1, o2) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("split_heads: contiguous gradient".into()))?;
        let dx = match s {
            CpuStorage::F32(v) => {
                Tensor::from_vec(self.run(&v[o1..o2], false, -1f32)?, x.shape(), x.device())?
            }
            CpuStorage::F64(v) => {
                Tensor::from_vec(self.run(&v[o1..o2], false, -1f64)?, x.shape(), x.device())?
            }
            _ => candle_core::bail!("split_heads: f32 or f64"),
        };
        Ok(Some(dx))
    }
}
