//! A frozen k-bit linear on the CPU: `y = x Wᵀ` with `W` held as NF4 / FP4 / int8 codes
//! ([`crate::quant::QuantWeight`]), dequantized a block of rows at a time inside each product
//! (never whole). The input gradient `dx = dy W` goes through the same codes; `W` gets no
//! gradient (it is frozen: QLoRA trains only the adapter).

use crate::quant::QuantWeight;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x` [m, in] f32 on the CPU → `x Wᵀ` [m, out], differentiable in `x`.
pub fn quant_matmul_t(x: &Tensor, w: &Arc<QuantWeight>) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (n, kw) = w.dims();
    if k != kw {
        candle_core::bail!("k-bit linear: weight [{n}, {kw}] for inputs of width {k}");
    }
    x.contiguous()?.apply_op1(QuantLinear { w: w.clone() })
}

struct QuantLinear {
    w: Arc<QuantWeight>,
}

fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("k-bit linear: expected f32 {what}");
    };
    let (m, k) = l.shape().dims2()?;
    let o = l.start_offset();
    Ok((&v[o..o + m * k], m, k))
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "k-bit-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m, _) = f32_rows(s, l, "input")?;
        let out = self.w.matmul_t(x, m);
        Ok((CpuStorage::F32(out), Shape::from((m, self.w.dims().0))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let (m, n) = dy.dims2()?;
        let (s, l) = dy.storage_and_layout();
        let candle_core::Storage::Cpu(cs) = &*s else {
            candle_core::bail!("k-bit linear: the gradient is not on the CPU");
        };
        let (dv, _, _) = f32_rows(cs, l, "gradient")?;
        debug_assert_eq!(n, self.w.dims().0);
        let dx = self.w.matmul_n(dv, m);
        drop(s);
        Ok(Some(Tensor::from_vec(
            dx,
            (m, self.w.dims().1),
            dy.device(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{FourBit, FourBitWeight, Int8Weight};
    use candle_core::{Device, Var};

    /// Value and input gradient equal those of the dequantized weight through candle's own
    /// matmul and autograd (to f32 rounding).
    #[test]
    fn value_and_input_gradient_equal_the_dequantized_product() {
        let dev = Device::Cpu;
        let (m, n, k) = (6, 40, 96);
        let w: Vec<f32> = Tensor::randn(0f32, 0.05, n * k, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        for q in [
            QuantWeight::four_bit(FourBitWeight::quantize(&w, n, k, FourBit::Nf4, true)),
            QuantWeight::Int8(Int8Weight::quantize(&w, n, k)),
        ] {
            let deq = q.dequantize();
            let wt = Tensor::from_vec(deq, (n, k), &dev).unwrap();
            let q = Arc::new(q);
            let x = Var::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let c = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
            let run = |y: Tensor| {
                let l = (y * &c).unwrap().sum_all().unwrap();
                let g = l.backward().unwrap();
                let gx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                (l.to_scalar::<f32>().unwrap(), gx)
            };
            let (lq, gq) = run(quant_matmul_t(x.as_tensor(), &q).unwrap());
            let (lr, gr) = run(x.as_tensor().matmul(&wt.t().unwrap()).unwrap());
            assert!((lq - lr).abs() < 1e-4 * lr.abs().max(1.0), "{lq} vs {lr}");
            assert!(crate::ops::max_abs_diff(&gq, &gr) < 1e-5);
        }
    }

    #[test]
    fn a_width_mismatch_is_an_error() {
        let w = vec![0.1f32; 4 * 64];
        let q = Arc::new(QuantWeight::Int8(Int8Weight::quantize(&w, 4, 64)));
        let x = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = quant_matmul_t(&x, &q).unwrap_err().to_string();
        assert!(e.contains("[4, 64]") && e.contains("width 32"), "{e}");
    }
}
