//! AdamW (PyTorch's, decoupled weight decay) and SGD over named variables, with state that
//! checkpoints exactly.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerKind {
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    Sgd {
        momentum: f64,
        weight_decay: f64,
    },
}

pub struct Optimizer {
    kind: OptimizerKind,
    params: Vec<(String, Var)>,
    /// AdamW: first and second moments; SGD: the momentum buffer in `m`.
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Number of updates applied (AdamW's bias correction uses it).
    pub step: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: Vec<(String, Var)>) -> Self {
        let n = params.len();
        Self {
            kind,
            params,
            m: vec![None; n],
            v: vec![None; n],
            step: 0,
        }
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Applies one update with `grads[i]` for `params[i]` at learning rate `lr`.
    ///
    /// AdamW: `θ ← θ(1 − lr·wd)`; `m ← β1 m + (1−β1) g`; `v ← β2 v + (1−β2) g²`;
    /// `θ ← θ − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)`.
    /// SGD: `b ← μ b + g` (b = g at first), `θ ← θ − lr (b + wd θ)`.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let t = self.step as i32;
        for (i, ((name, var), g)) in self.params.iter().zip(grads).enumerate() {
            let dtype = var.dtype();
            let theta = var.as_tensor().detach().to_dtype(DType::F32)?;
            let g = g.to_dtype(DType::F32)?;
            let new = match self.kind {
                OptimizerKind::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let theta = if weight_decay != 0.0 {
                        (theta * (1.0 - lr * weight_decay))?
                    } else {
                        theta
                    };
                    let m = match &self.m[i] {
                        Some(m) => ((m * beta1)? + (&g * (1.0 - beta1))?)?,
                        None => (&g * (1.0 - beta1))?,
                    };
                    let v = match &self.v[i] {
                        Some(v) => ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        None => (g.sqr()? * (1.0 - beta2))?,
                    };
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2 = 1.0 - beta2.powi(t);
                    let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
                    let upd = ((m.div(&denom))? * (lr / bc1))?;
                    self.m[i] = Some(m);
                    self.v[i] = Some(v);
                    (theta - upd)?
                }
                OptimizerKind::Sgd {
                    momentum,
                    weight_decay,
                } => {
                    let g = if weight_decay != 0.0 {
                        (g + (&theta * weight_decay)?)?
                    } else {
                        g
                    };
                    let d = if momentum != 0.0 {
                        let b = match &self.m[i] {
                            Some(b) => ((b * momentum)? + &g)?,
                            None => g,
                        };
                        self.m[i] = Some(b.clone());
                        b
                    } else {
                        g
                    };
                    (theta - (d * lr)?)?
                }
            };
            var.set(&new.to_dtype(dtype)?)
                .with_context(|| format!("updating {name}"))?;
        }
        Ok(())
    }

    /// Moments by `<param>.exp_avg` / `<param>.exp_avg_sq` (SGD: `.momentum_buffer`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        let (m_name, v_name) = match self.kind {
            OptimizerKind::AdamW { .. } => ("exp_avg", "exp_avg_sq"),
            OptimizerKind::Sgd { .. } => ("momentum_buffer", "unused"),
        };
        for (i, (name, _)) in self.params.iter().enumerate() {
            if let Some(m) = &self.m[i] {
                out.insert(format!("{name}.{m_name}"), m.clone());
            }
            if let Some(v) = &self.v[i] {
                out.insert(format!("{name}.{v_name}"), v.clone());
            }
        }
        out
    }

    /// Restores what [`Self::state_tensors`] saved, after `step` updates.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        let (m_name, v_name) = match self.kind {
            OptimizerKind::AdamW { .. } => ("exp_avg", "exp_avg_sq"),
            OptimizerKind::Sgd { .. } => ("momentum_buffer", "unused"),
        };
        let dev = self.params.first().map(|(_, v)| v.device().clone());
        for (i, (name, _)) in self.params.iter().enumerate() {
            let to_dev = |t: Tensor| -> Result<Tensor> {
                Ok(match &dev {
                    Some(d) => t.to_device(d)?,
                    None => t,
                })
            };
            self.m[i] = tensors
                .remove(&format!("{name}.{m_name}"))
                .map(to_dev)
                .transpose()?;
            self.v[i] = tensors
                .remove(&format!("{name}.{v_name}"))
                .map(to_dev)
                .transpose()?;
            if step > 0 && self.m[i].is_none() && matches!(self.kind, OptimizerKind::AdamW { .. }) {
                bail!("optimizer state has no moments for `{name}`");
            }
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("optimizer state has `{extra}`, which is not a trainable parameter of this run");
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step by hand: with m0 = v0 = 0, the first update is lr·sign(g) (up to ε).
    #[test]
    fn adamw_first_steps_by_hand() {
        let v = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let kind = OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = Optimizer::new(kind, vec![("w".into(), v.clone())]);
        let g = Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap();
        opt.apply(&[g.clone()], 0.01).unwrap();
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        // θ(1 − lr·wd) − lr·g/|g|
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // Second step with the same gradient: m̂ = g, v̂ = g², same step size again.
        opt.apply(&[g], 0.01).unwrap();
        let got2 = v.as_tensor().to_vec1::<f32>().unwrap();
        let want2 = [
            want[0] * (1.0 - 0.001) - 0.01,
            want[1] * (1.0 - 0.001) + 0.01,
        ];
        for (a, b) in got2.iter().zip(want2) {
            assert!((a - b).abs() < 1e-5, "{got2:?} vs {want2:?}");
        }
    }

    #[test]
    fn sgd_with_momentum() {
        let v = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.5,
                weight_decay: 0.0,
            },
            vec![("w".into(), v.clone())],
        );
        let g = Tensor::new(&[2.0f32], &Device::Cpu).unwrap();
        opt.apply(&[g.clone()], 0.1).unwrap(); // b = 2, θ = 1 − 0.2
        opt.apply(&[g], 0.1).unwrap(); // b = 3, θ = 0.8 − 0.3
        assert!((v.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.5).abs() < 1e-6);
    }
}
