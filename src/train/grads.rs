//! Gradient accumulation over micro-batches and global-norm clipping.

use anyhow::Result;
use candle_core::{backprop::GradStore, Tensor, Var};

/// Running sum of gradients, one slot per trainable variable.
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        Self {
            sums: vec![None; n],
        }
    }

    /// Adds the gradients of `params` found in `store`.
    pub fn add(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (slot, (_, v)) in self.sums.iter_mut().zip(params) {
            if let Some(g) = store.get(v) {
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients; a variable that received none gets zeros.
    pub fn finish(self, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
        self.sums
            .into_iter()
            .zip(params)
            .map(|(s, (_, v))| match s {
                Some(s) => Ok(s),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }
}

/// Global L2 norm of `grads` (before clipping), computed in f64 on the host.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clipping_scales_to_the_limit() {
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let n = clip(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let mut small = vec![Tensor::new(&[0.3f32, 0.4], &Device::Cpu).unwrap()];
        clip(&mut small, 1.0).unwrap();
        assert_eq!(small[0].to_vec1::<f32>().unwrap(), vec![0.3, 0.4]);
    }
}
