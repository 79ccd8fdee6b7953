//! The value head: `V = w · h + b`, a Linear(hidden → 1) in f32 on the last hidden state.
//! Initialised to zero, so the first values are 0 and the first advantages come from the
//! rewards alone.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub const FILE: &str = "value_head.safetensors";

pub struct ValueHead {
    pub weight: Var,
    pub bias: Var,
}

impl ValueHead {
    pub fn zeros(hidden: usize, dev: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::zeros((1, hidden), DType::F32, dev)?,
            bias: Var::zeros(1, DType::F32, dev)?,
        })
    }

    /// `h`: [b, t, hidden] (any float dtype) → [b, t] f32.
    pub fn forward(&self, h: &Tensor, grad: bool) -> Result<Tensor> {
        let (w, b) = if grad {
            (
                self.weight.as_tensor().clone(),
                self.bias.as_tensor().clone(),
            )
        } else {
            (
                self.weight.as_tensor().detach(),
                self.bias.as_tensor().detach(),
            )
        };
        let (bs, t, hd) = h.dims3()?;
        let v = h
            .to_dtype(DType::F32)?
            .reshape((bs * t, hd))?
            .matmul(&w.t()?)?;
        Ok(v.broadcast_add(&b)?.reshape((bs, t))?)
    }

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("value_head.weight".into(), self.weight.clone()),
            ("value_head.bias".into(), self.bias.clone()),
        ]
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let t: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        crate::train::checkpoint::save_tensors(&t, &dir.join(FILE))
    }

    pub fn load(dir: &Path, hidden: usize, dev: &Device) -> Result<Self> {
        let p = dir.join(FILE);
        let t = candle_core::safetensors::load(&p, dev)
            .with_context(|| format!("reading {}", p.display()))?;
        let get = |k: &str| {
            t.get(k)
                .with_context(|| format!("{}: no tensor `{k}`", p.display()))
        };
        let w = get("value_head.weight")?;
        anyhow::ensure!(
            w.dims() == [1, hidden],
            "{}: value_head.weight has shape {:?}, expected [1, {hidden}]",
            p.display(),
            w.dims()
        );
        Ok(Self {
            weight: Var::from_tensor(w)?,
            bias: Var::from_tensor(get("value_head.bias")?)?,
        })
    }
}
