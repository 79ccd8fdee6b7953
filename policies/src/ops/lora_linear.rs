//! The LoRA linear layer as one op on the CPU (f32 activations, f32 adapter, a frozen f32,
//! bf16/f16 or k-bit base weight):
//!
//! `y = x Wᵀ + b + s · (m ⊙ x) Aᵀ Bᵀ`
//!
//! computed as `x Wᵀ`, `+ b`, then `(s · xa) Bᵀ` accumulated into `y` (`xa = (m ⊙ x) Aᵀ`,
//! [n, r]), so a layer leaves one [n, out] tensor in the graph where the composed ops leave
//! four (the base product, `xa Bᵀ`, its scaled copy, the sum): at real size those copies are
//! most of what a forward keeps for its backward. The op keeps `s · xa` ([n, r]: r/out of the
//! output's size) for the backward, which, with `g = dy B` [n, r], computes
//!
//! `dx = dy W + s · m ⊙ (g A)`, `dA = s · gᵀ (m ⊙ x)`, `dB = s · dyᵀ xa`.
//!
//! `m` is the inverted-dropout keep-mask (entries 0 or 1/(1−p)), drawn by the caller exactly
//! where the composed path draws it.

use super::gemm::gemm_f32_split;
use crate::linear::LinearWeight;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

/// Whether the fused op computes this layer: CPU, `x` [.., in] f32, a frozen base weight
/// (f32, bf16/f16 or k-bit codes) and bias, an f32 adapter.
pub fn applies(
    x: &Tensor,
    w: &LinearWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
) -> bool {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let frozen_base = match w {
        LinearWeight::Dense(w) => {
            w.device().is_cpu()
                && w.rank() == 2
                && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
                && !w.is_variable()
        }
        LinearWeight::Quantized(_) => true,
    };
    cpu_f32(x)
        && x.rank() >= 2
        && frozen_base
        && bias.is_none_or(|b| cpu_f32(b) && !b.is_variable())
        && cpu_f32(a)
        && cpu_f32(b)
}

/// `x` [.., in] (any leading dims: n rows), `w` [out, in], `bias` [out], `a` [r, in], `b`
/// [out, r], `scale` = α/r, `mask` [n·in] → `y` [.., out]; gradients reach `x`, `a` and `b`
/// (when they are tracked). Taking `x` as it comes keeps reshapes out of the graph: candle's
/// backward gives every node a zeroed gradient and an add.
pub fn lora_linear(
    x: &Tensor,
    w: &LinearWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear::new(&x, w, bias, scale, mask)?;
    x.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// A scalar with the gradients of `Σ g ⊙ lora_linear(x, ..)` (`g` [.., out]) with respect to
/// `x`, `a` and `b`, computed without the layer's product (value 0: [`super::vjp`]).
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_vjp(
    x: &Tensor,
    w: &LinearWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
    g: &Tensor,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear::new(&x, w, bias, scale, mask)?;
    if g.dims() != super::with_last(x.dims(), w.dims().0).dims() {
        candle_core::bail!(
            "lora-linear: an output gradient {:?} for inputs {:?}",
            g.dims(),
            x.dims()
        );
    }
    let vjp = super::vjp::Vjp3 {
        op,
        g: g.contiguous()?,
    };
    x.apply_op3(&a.contiguous()?, &b.contiguous()?, vjp)
}

struct LoraLinear {
    w: LinearWeight,
    bias: Option<Vec<f32>>,
    scale: f64,
    /// The keep-mask's values, [n·in] like `x`.
    mask: Option<Vec<f32>>,
    /// `s · xa` [n, r] from the forward, for the backward's `dB` (a backward without a
    /// forward before it, or a second one, recomputes it).
    xa: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LoraLinear {
    fn new(
        x: &Tensor,
        w: &LinearWeight,
        bias: Option<&Tensor>,
        scale: f64,
        mask: Option<Vec<f32>>,
    ) -> Result<Self> {
        if mask.as_ref().is_some_and(|m| m.len() != x.elem_count()) {
            candle_core::bail!("lora-linear: a dropout mask of the wrong length");
        }
        let w = match w {
            LinearWeight::Dense(t) => LinearWeight::Dense(t.contiguous()?),
            q => q.clone(),
        };
        Ok(LoraLinear {
            w,
            bias: bias.map(|b| b.to_vec1::<f32>()).transpose()?,
            scale,
            mask,
            xa: std::sync::Mutex::new(None),
        })
    }
}

/// A CPU tensor's storage.
fn host(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("lora-linear: CPU tensors"),
    }
}

/// A contiguous f32 CPU operand's values.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lora-linear: {what} must be f32");
    };
    if !l.is_contiguous() {
        candle_core::bail!("lora-linear: {what} must be contiguous");
    }
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = lx.shape().dims();
        let (n, k) = super::rows_of(lx.shape());
        let (r, ka) = la.shape().dims2()?;
        let (out, rb) = lb.shape().dims2()?;
        if ka != k || rb != r || self.w.dims() != (out, k) {
            candle_core::bail!(
                "lora-linear: x [{n}, {k}], A [{r}, {ka}], B [{out}, {rb}], W {:?}",
                self.w.dims()
            );
        }
        let (x, a, b) = (
            values(sx, lx, "x")?,
            values(sa, la, "A")?,
            values(sb, lb, "B")?,
        );
        // y = x Wᵀ (+ b), by the frozen linear's own kernels.
        let mut y = match &self.w {
            LinearWeight::Dense(w) if w.dtype() == DType::F32 => {
                super::gemm::matmul_t_f32(x, n, k, w)?
            }
            LinearWeight::Dense(w) => super::half_weight::matmul_t(x, n, k, w)?,
            LinearWeight::Quantized(q) => q.matmul_t(x, n),
        };
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        if n == 0 || r == 0 || k == 0 {
            return Ok((CpuStorage::F32(y), super::with_last(dims, out)));
        }
        // xa = (m ⊙ x) Aᵀ, scaled by s: [n, r].
        let masked;
        let xd = match &self.mask {
            Some(m) => {
                masked = x.iter().zip(m).map(|(x, m)| x * m).collect::<Vec<f32>>();
                &masked[..]
            }
            None => x,
        };
        let mut xa: Vec<f32> = Vec::with_capacity(n * r);
        // SAFETY: xd holds n·k values, A r·k (read as Aᵀ: column stride k); xa has room for
        // n·r, all written (accumulate = false) before set_len.
        unsafe {
            gemm_f32_split(
                xa.as_mut_ptr(),
                r as isize,
                false,
                (n, r, k),
                (xd.as_ptr(), 1, k as isize),
                (a.as_ptr(), k as isize, 1),
            );
            xa.set_len(n * r);
        }
        let s = self.scale as f32;
        xa.iter_mut().for_each(|v| *v *= s);
        // y += (s·xa) Bᵀ.
        // SAFETY: xa holds n·r values, B out·r (read as Bᵀ: column stride r); y holds n·out
        // initialized values.
        unsafe {
            gemm_f32_split(
                y.as_mut_ptr(),
                out as isize,
                true,
                (n, out, r),
                (xa.as_ptr(), 1, r as isize),
                (b.as_ptr(), r as isize, 1),
            );
        }
        *self.xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(xa);
        Ok((CpuStorage::F32(y), super::with_last(dims, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // On raw slices, so the scale and the sum of the base and adapter terms are folded
        // into the products: candle's element-wise ops would run on one thread each.
        let wants_dx = x.track_op();
        let (x_shape, dev) = (x.shape().clone(), x.device().clone());
        let (n, k) = super::rows_of(&x_shape);
        let out = dy.dim(candle_core::D::Minus1)?;
        let r = a.dim(0)?;
        let (x, a, b, dy) = (
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            dy.contiguous()?,
        );
        let (gx, gx_l) = x.storage_and_layout();
        let (ga, ga_l) = a.storage_and_layout();
        let (gb, gb_l) = b.storage_and_layout();
        let (gd, gd_l) = dy.storage_and_layout();
        let xv = values(host(&gx)?, gx_l, "x")?;
        let av = values(host(&ga)?, ga_l, "A")?;
        let bv = values(host(&gb)?, gb_l, "B")?;
        let dyv = values(host(&gd)?, gd_l, "dy")?;
        let s = self.scale as f32;
        let masked;
        let xd = match &self.mask {
            Some(m) => {
                masked = xv.iter().zip(m).map(|(x, m)| x * m).collect::<Vec<f32>>();
                &masked[..]
            }
            None => xv,
        };
        // The products below, dst = lhs · rhs ([m, n] = [m, k] · [k, n]); each operand is
        // (pointer, column stride, row stride).
        let product = |dst: &mut [f32],
                       accumulate: bool,
                       mnk: (usize, usize, usize),
                       lhs: (&[f32], isize, isize),
                       rhs: (&[f32], isize, isize)| {
            debug_assert!(dst.len() >= mnk.0 * mnk.1);
            // SAFETY: every operand holds the [rows, cols] its strides describe (checked by the
            // shapes above); dst holds m·n initialized values.
            unsafe {
                gemm_f32_split(
                    dst.as_mut_ptr(),
                    mnk.1 as isize,
                    accumulate,
                    mnk,
                    (lhs.0.as_ptr(), lhs.1, lhs.2),
                    (rhs.0.as_ptr(), rhs.1, rhs.2),
                )
            }
        };
        let (ki, oi, ri) = (k as isize, out as isize, r as isize);
        // gs = s · dy B: [n, r].
        let mut gs = vec![0f32; n * r];
        product(&mut gs, false, (n, r, out), (dyv, 1, oi), (bv, 1, ri));
        gs.iter_mut().for_each(|v| *v *= s);
        // dx = dy W + m ⊙ (gs A).
        let dx = if wants_dx {
            let mut dx = match &self.w {
                LinearWeight::Dense(w) if w.dtype() == DType::F32 => {
                    let (gw, gw_l) = w.storage_and_layout();
                    let wv = values(host(&gw)?, gw_l, "W")?;
                    let mut dx = vec![0f32; n * k];
                    product(&mut dx, false, (n, k, out), (dyv, 1, oi), (wv, 1, ki));
                    dx
                }
                LinearWeight::Dense(w) => super::half_weight::matmul_n(dyv, n, out, w)?,
                LinearWeight::Quantized(q) => q.matmul_n(dyv, n),
            };
            match &self.mask {
                None => product(&mut dx, true, (n, k, r), (&gs, 1, ri), (av, 1, ki)),
                Some(m) => {
                    let mut t = vec![0f32; n * k];
                    product(&mut t, false, (n, k, r), (&gs, 1, ri), (av, 1, ki));
                    dx.iter_mut()
                        .zip(t.iter().zip(m))
                        .for_each(|(d, (t, m))| *d += m * t);
                }
            }
            Some(Tensor::from_vec(dx, x_shape, &dev)?)
        } else {
            None
        };
        // dA = gsᵀ (m ⊙ x): [r, k].
        let mut da = vec![0f32; r * k];
        product(&mut da, false, (r, k, n), (&gs, ri, 1), (xd, 1, ki));
        // dB = dyᵀ (s · (m ⊙ x) Aᵀ): [out, r], from the forward's xa.
        let kept = self.xa.lock().unwrap_or_else(|e| e.into_inner()).take();
        let xa = kept.filter(|v| v.len() == n * r).unwrap_or_else(|| {
            let mut xa = vec![0f32; n * r];
            product(&mut xa, false, (n, r, k), (xd, 1, ki), (av, ki, 1));
            xa.iter_mut().for_each(|v| *v *= s);
            xa
        });
        let mut db = vec![0f32; out * r];
        product(&mut db, false, (out, r, n), (dyv, oi, 1), (&xa, 1, ri));
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, k), &dev)?),
            Some(Tensor::from_vec(db, (out, r), &dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// On k-bit codes the fused layer equals the composed layer on the dequantized weight:
    /// values and the gradients of x, A and B, with a dropout mask, few rows and many.
    #[test]
    fn fused_on_a_quantized_base_equals_the_composed_dequantized_layer() {
        use crate::quant::{QuantConfig, QuantWeight, Quantization};
        let dev = Device::Cpu;
        let (k, out, r, s) = (128, 24, 4, 0.5);
        let wv: Vec<f32> = Tensor::randn(0f32, 0.1, out * k, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        for kind in [Quantization::Nf4, Quantization::Int8] {
            let cfg = QuantConfig {
                kind,
                double_quant: true,
            };
            let q = std::sync::Arc::new(QuantWeight::quantize(&wv, out, k, cfg).unwrap());
            let wt = Tensor::from_vec(q.dequantize(), (out, k), &dev).unwrap();
            for n in [2, 33] {
                let mask: Vec<f32> = (0..n * k)
                    .map(|i| if i % 4 == 1 { 0.0 } else { 4.0 / 3.0 })
                    .collect();
                let x = Var::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let a = Var::randn(0f32, 0.3, (r, k), &dev).unwrap();
                let b = Var::randn(0f32, 0.3, (out, r), &dev).unwrap();
                let c = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
                let grads = |y: &Tensor| {
                    let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                    [x.as_tensor(), a.as_tensor(), b.as_tensor()].map(|v| vals(g.get(v).unwrap()))
                };
                let w = LinearWeight::Quantized(q.clone());
                let fused =
                    lora_linear(x.as_tensor(), &w, None, &a, &b, s, Some(mask.clone())).unwrap();
                let m = Tensor::from_vec(mask, (n, k), &dev).unwrap();
                let xd = (x.as_tensor() * m).unwrap();
                let delta = (xd
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap()
                    * s)
                    .unwrap();
                let composed = (x.as_tensor().matmul(&wt.t().unwrap()).unwrap() + delta).unwrap();
                assert!(
                    max_diff(&vals(&fused), &vals(&composed)) < 1e-4,
                    "{kind:?} n={n}"
                );
                for (gf, gc) in grads(&fused).iter().zip(grads(&composed).iter()) {
                    assert!(max_diff(gf, gc) < 1e-4, "{kind:?} n={n}: gradients");
                }
            }
        }
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    use crate::ops::max_abs_diff as max_diff;

    /// The fused layer against the composed ops it replaces (candle's matmul, broadcast add,
    /// mask multiply), in values and in the gradients of x, A and B: with and without a bias
    /// and a dropout mask, an f32 and a bf16 base, few rows (the row-dot path) and many.
    #[test]
    fn fused_equals_the_composed_layer() {
        // The widened path for bf16 (the bf16 kernels: half_weight's tests).
        crate::ops::bf16_dot::with_engine(None, || {
            let dev = Device::Cpu;
            let (k, out, r, s) = (24, 19, 4, 0.75);
            for n in [3, 40] {
                for wdt in [DType::F32, DType::BF16] {
                    for (with_bias, with_mask) in [(false, false), (true, false), (true, true)] {
                        let w = Tensor::randn(0f32, 1.0, (out, k), &dev)
                            .unwrap()
                            .to_dtype(wdt)
                            .unwrap();
                        let bias = with_bias.then(|| Tensor::randn(0f32, 1.0, out, &dev).unwrap());
                        let mask: Option<Vec<f32>> = with_mask.then(|| {
                            (0..n * k)
                                .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
                                .collect()
                        });
                        let x = Var::randn(0f32, 1.0, (n, k), &dev).unwrap();
                        let a = Var::randn(0f32, 0.5, (r, k), &dev).unwrap();
                        let b = Var::randn(0f32, 0.5, (out, r), &dev).unwrap();
                        let c = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
                        let grads = |y: &Tensor| {
                            let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                            [x.as_tensor(), a.as_tensor(), b.as_tensor()]
                                .map(|v| vals(g.get(v).unwrap()))
                        };
                        let dense = LinearWeight::Dense(w.clone());
                        let fused = lora_linear(
                            x.as_tensor(),
                            &dense,
                            bias.as_ref(),
                            &a,
                            &b,
                            s,
                            mask.clone(),
                        )
                        .unwrap();
                        // The composed reference, on the widened weight.
                        let w32 = w.to_dtype(DType::F32).unwrap();
                        let mut y = x.as_tensor().matmul(&w32.t().unwrap()).unwrap();
                        if let Some(bias) = &bias {
                            y = y.broadcast_add(bias).unwrap();
                        }
                        let xd = match &mask {
                            Some(m) => (x.as_tensor()
                                * Tensor::from_vec(m.clone(), (n, k), &dev).unwrap())
                            .unwrap(),
                            None => x.as_tensor().clone(),
                        };
                        let delta = (xd
                            .matmul(&a.t().unwrap())
                            .unwrap()
                            .matmul(&b.t().unwrap())
                            .unwrap()
                            * s)
                            .unwrap();
                        let composed = (y + delta).unwrap();
                        let what = format!("n={n} {wdt:?} bias={with_bias} mask={with_mask}");
                        assert!(
                            max_diff(&vals(&fused), &vals(&composed)) < 1e-4,
                            "{what}: values"
                        );
                        for (i, (gf, gc)) in grads(&fused)
                            .iter()
                            .zip(grads(&composed).iter())
                            .enumerate()
                        {
                            assert!(max_diff(gf, gc) < 1e-4, "{what}: gradient {i}");
                        }
                    }
                }
            }
        });
    }
}
