//! Vector–Jacobian products of a layer without its forward product.
//!
//! The checkpointed backward ([`crate::backward`]) differentiates each recomputed block
//! through the surrogate `Σ y ⊙ g` (`g` the gradient at the block's output `y`). A block ends
//! `y = x + f(a)` with `f` a linear layer, whose backward reads its input and the gradient at
//! its output, never the output itself: computing `f(a)` there is a wasted product (the
//! down projection: a quarter of a Llama block's products). [`Vjp1`] and [`Vjp3`] put an op's
//! backward behind a scalar node with `g` fixed as the gradient at the op's output:
//!
//! `∂s/∂args = gᵀ ∂op(args)/∂args`, the gradients of `Σ g ⊙ op(args)`,
//!
//! while the node's value is 0 (not that sum: only its gradients are meant). The inner op's
//! forward is never run, so only ops whose backward ignores their output may be wrapped.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// `g` times the scalar gradient that reached the surrogate (1 when it is the loss itself).
fn upstream(g: &Tensor, ds: &Tensor) -> Result<Tensor> {
    match ds.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? {
        1.0 => Ok(g.clone()),
        s => g.affine(s, 0.0),
    }
}

/// The scalar 0 every surrogate holds.
fn zero() -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0.0]), Shape::from(()))
}

/// The surrogate of a one-input op whose backward does not read its output.
pub struct Vjp1<O> {
    pub op: O,
    /// The gradient at the op's output, shaped as that output.
    pub g: Tensor,
}

impl<O: CustomOp1> CustomOp1 for Vjp1<O> {
    fn name(&self) -> &'static str {
        "vjp1"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(zero())
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, ds: &Tensor) -> Result<Option<Tensor>> {
        self.op.bwd(x, res, &upstream(&self.g, ds)?)
    }
}

/// The surrogate of a three-input op whose backward does not read its output.
pub struct Vjp3<O> {
    pub op: O,
    /// The gradient at the op's output, shaped as that output.
    pub g: Tensor,
}

impl<O: CustomOp3> CustomOp3 for Vjp3<O> {
    fn name(&self) -> &'static str {
        "vjp3"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(zero())
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        ds: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.op.bwd(a1, a2, a3, res, &upstream(&self.g, ds)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::linear::LinearWeight;
    use crate::ops::lora_linear::{lora_linear, lora_linear_vjp};
    use crate::ops::matmul::{frozen_matmul_t, frozen_matmul_t_vjp};
    use candle_core::{DType, Device, Tensor, Var};

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The gradients of `c · s` for each of `vars`.
    fn grads(s: &Tensor, c: f64, vars: &[&Var]) -> Vec<Vec<f32>> {
        let g = (s * c).unwrap().backward().unwrap();
        vars.iter()
            .map(|v| vals(g.get(v.as_tensor()).unwrap()))
            .collect()
    }

    /// The LoRA layer's surrogate gives, bit for bit, the gradients of `Σ g ⊙ layer(x)` for
    /// x, A and B — with a dropout mask and a bias, an f32 and a bf16 base, few rows and
    /// many, the surrogate scaled — while its value is 0 (no product was computed).
    #[test]
    fn lora_surrogate_has_the_gradients_of_the_sum() {
        let dev = Device::Cpu;
        let (k, out, r, s) = (40, 24, 4, 0.5);
        for n in [3, 70] {
            for wdt in [DType::F32, DType::BF16] {
                let w = LinearWeight::Dense(
                    Tensor::randn(0f32, 0.2, (out, k), &dev)
                        .unwrap()
                        .to_dtype(wdt)
                        .unwrap(),
                );
                let bias = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
                let x = Var::randn(0f32, 1.0, (1, n, k), &dev).unwrap();
                let a = Var::randn(0f32, 0.3, (r, k), &dev).unwrap();
                let b = Var::randn(0f32, 0.3, (out, r), &dev).unwrap();
                let g = Tensor::randn(0f32, 1.0, (1, n, out), &dev).unwrap();
                let mask: Vec<f32> = (0..n * k)
                    .map(|i| if i % 3 == 1 { 0.0 } else { 1.5 })
                    .collect();
                let vars = [&x, &a, &b];
                for c in [1.0, -2.5] {
                    let y =
                        lora_linear(&x, &w, Some(&bias), &a, &b, s, Some(mask.clone())).unwrap();
                    let sum = (y * &g).unwrap().sum_all().unwrap();
                    let sur =
                        lora_linear_vjp(&x, &w, Some(&bias), &a, &b, s, Some(mask.clone()), &g)
                            .unwrap();
                    assert_eq!(sur.to_scalar::<f32>().unwrap(), 0.0);
                    assert_eq!(
                        grads(&sum, c, &vars),
                        grads(&sur, c, &vars),
                        "n={n} {wdt:?} c={c}"
                    );
                }
                let short = Tensor::zeros((1, n, out - 1), DType::F32, &dev).unwrap();
                assert!(lora_linear_vjp(&x, &w, None, &a, &b, s, None, &short).is_err());
            }
        }
    }

    /// The frozen layer's surrogate gives the input gradient of `Σ g ⊙ x Wᵀ`, bit for bit.
    #[test]
    fn frozen_surrogate_has_the_gradient_of_the_sum() {
        let dev = Device::Cpu;
        let (k, out) = (40, 24);
        for n in [3, 70] {
            for wdt in [DType::F32, DType::BF16] {
                let w = Tensor::randn(0f32, 0.2, (out, k), &dev)
                    .unwrap()
                    .to_dtype(wdt)
                    .unwrap();
                let x = Var::randn(0f32, 1.0, (2, n, k), &dev).unwrap();
                let g = Tensor::randn(0f32, 1.0, (2, n, out), &dev).unwrap();
                let sum = (frozen_matmul_t(&x, &w).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let sur = frozen_matmul_t_vjp(&x, &w, &g).unwrap();
                assert_eq!(sur.to_scalar::<f32>().unwrap(), 0.0);
                assert_eq!(grads(&sum, 1.0, &[&x]), grads(&sur, 1.0, &[&x]), "n={n}");
            }
        }
    }
}
