//! SwiGLU's gate, `y = silu(g) ⊙ u` (the MLP of Llama, Mistral and Qwen2:
//! `down(silu(x W_gᵀ) ⊙ x W_uᵀ)`), as one op on the CPU.
//!
//! The composed ops keep `silu(g)` for the product's backward and, in candle's silu backward,
//! make eight more `[n, intermediate]` tensors (σ by neg/exp/+1/recip, then the derivative
//! and its product with the upstream gradient), each a pass over memory and a fresh
//! allocation. Here the forward is one pass and the backward one pass, with σ = 1/(1 + e^{−g}):
//!
//! `dg = dy ⊙ u ⊙ σ (1 + g (1 − σ))`, `du = dy ⊙ g σ`.
//!
//! f32 uses the vectorised `exp` of the fused attention (`flash_attention::rows::exp`, Cephes'
//! `expf`, ≤ 2 ulp) built for AVX-512, AVX2 or portable code and chosen at run time; f64 uses
//! `f64::exp` (the finite-difference and autograd checks). Other devices and dtypes run the
//! composed ops.

use super::flash_attention::exp_f32;
use super::{simd_level, SimdLevel};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `silu(gate) ⊙ up` for two tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = gate.device().is_cpu()
        && matches!(gate.dtype(), DType::F32 | DType::F64)
        && gate.dtype() == up.dtype()
        && gate.shape() == up.shape();
    if !fused {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// A contiguous operand's values of type `T`.
fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    super::contiguous_values(s, l, "swiglu")
}

/// The element kernels of one float type.
trait Gate: candle_core::WithDType + Copy + Send + Sync {
    fn forward(g: &[Self], u: &[Self], y: &mut [Self]);
    fn backward(g: &[Self], u: &[Self], dy: &[Self], dg: &mut [Self], du: &mut [Self]);
}

#[inline(always)]
fn forward_body(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g / (1.0 + exp_f32(-g)) * u;
    }
}

#[inline(always)]
fn backward_body(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let (g, u, dy) = (g[i], u[i], dy[i]);
        let s = 1.0 / (1.0 + exp_f32(-g));
        dg[i] = dy * u * (s * (1.0 + g * (1.0 - s)));
        du[i] = dy * (g * s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_avx512(g: &[f32], u: &[f32], y: &mut [f32]) {
    forward_body(g, u, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn backward_avx512(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    backward_body(g, u, dy, dg, du)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(g: &[f32], u: &[f32], y: &mut [f32]) {
    forward_body(g, u, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    backward_body(g, u, dy, dg, du)
}

fn forward_f32(build: SimdLevel, g: &[f32], u: &[f32], y: &mut [f32]) {
    match build {
        // SAFETY: each build is chosen only where the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { forward_avx512(g, u, y) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { forward_avx2(g, u, y) },
        _ => forward_body(g, u, y),
    }
}

fn backward_f32(
    build: SimdLevel,
    g: &[f32],
    u: &[f32],
    dy: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) {
    match build {
        // SAFETY: as in forward_f32.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { backward_avx512(g, u, dy, dg, du) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { backward_avx2(g, u, dy, dg, du) },
        _ => backward_body(g, u, dy, dg, du),
    }
}

impl Gate for f32 {
    fn forward(g: &[f32], u: &[f32], y: &mut [f32]) {
        forward_f32(simd_level(), g, u, y)
    }
    fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        backward_f32(simd_level(), g, u, dy, dg, du)
    }
}

impl Gate for f64 {
    fn forward(g: &[f64], u: &[f64], y: &mut [f64]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + (-g).exp()) * u;
        }
    }
    fn backward(g: &[f64], u: &[f64], dy: &[f64], dg: &mut [f64], du: &mut [f64]) {
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + (-g[i]).exp());
            dg[i] = dy[i] * u[i] * (s * (1.0 + g[i] * (1.0 - s)));
            du[i] = dy[i] * (g[i] * s);
        }
    }
}

fn forward<T: Gate>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.len()];
    if g.len() <= CHUNK {
        // One task: on this thread (a decoding step's rows), not through rayon's pool.
        T::forward(g, u, &mut y);
        return y;
    }
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| T::forward(g, u, y));
    y
}

fn backward<T: Gate>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut dg, mut du) = (vec![T::zero(); g.len()], vec![T::zero(); g.len()]);
    if g.len() <= CHUNK {
        T::backward(g, u, dy, &mut dg, &mut du);
        return (dg, du);
    }
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dy)| T::backward(g, u, dy, dg, du));
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = lg.shape().clone();
        let y = match (sg, su) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward(slice::<f32>(sg, lg)?, slice::<f32>(su, lu)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward(slice::<f64>(sg, lg)?, slice::<f64>(su, lu)?))
            }
            _ => candle_core::bail!("swiglu: f32 or f64 operands of one dtype"),
        };
        Ok((y, shape))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (sg, lg) = gate.storage_and_layout();
        let (su, lu) = up.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        use candle_core::Storage::Cpu;
        let (Cpu(sg), Cpu(su), Cpu(sd)) = (&*sg, &*su, &*sd) else {
            candle_core::bail!("swiglu: CPU operands");
        };
        let (dg, du) = match gate.dtype() {
            DType::F32 => {
                let (dg, du) = backward(slice::<f32>(sg, lg)?, slice(su, lu)?, slice(sd, ld)?);
                (CpuStorage::F32(dg), CpuStorage::F32(du))
            }
            DType::F64 => {
                let (dg, du) = backward(slice::<f64>(sg, lg)?, slice(su, lu)?, slice(sd, ld)?);
                (CpuStorage::F64(dg), CpuStorage::F64(du))
            }
            d => candle_core::bail!("swiglu: no backward in {d:?}"),
        };
        let tensor = |s: CpuStorage| match s {
            CpuStorage::F32(v) => Tensor::from_vec(v, gate.shape(), gate.device()),
            CpuStorage::F64(v) => Tensor::from_vec(v, gate.shape(), gate.device()),
            _ => unreachable!("swiglu: f32 or f64 only"),
        };
        Ok((Some(tensor(dg)?), Some(tensor(du)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::max_diff;
    use candle_core::{Device, Var};

    fn composed(g: &Tensor, u: &Tensor) -> Tensor {
        (g.silu().unwrap() * u).unwrap()
    }

    /// Values and both gradients against candle's autograd of `silu(g) ⊙ u`, in f64 (1e-12)
    /// and, from the same values, in f32 (within f32 rounding of the f64 result), on values
    /// up to ±40 so σ's tails are exercised.
    #[test]
    fn equals_the_composed_ops_and_their_autograd() {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17; // several tasks and a ragged last one
        let g64 = Var::from_tensor(&(Tensor::randn(0f64, 8.0, (n / 7, 7), &dev).unwrap())).unwrap();
        let u64_ = Var::randn(0f64, 1.0, (n / 7, 7), &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (n / 7, 7), &dev).unwrap();
        let want = composed(&g64, &u64_);
        let want_g = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (wg, wu) = (want_g.get(&g64).unwrap(), want_g.get(&u64_).unwrap());
        // f32 results against the f64 reference.
        let diff = |a: &Tensor, b: &Tensor| max_diff(&a.to_dtype(DType::F64).unwrap(), b);
        let got = swiglu(&g64, &u64_).unwrap();
        let gg = (&got * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(&got, &want) < 1e-12);
        assert!(diff(gg.get(&g64).unwrap(), wg) < 1e-12);
        assert!(diff(gg.get(&u64_).unwrap(), wu) < 1e-12);

        let g32 = Var::from_tensor(&g64.to_dtype(DType::F32).unwrap()).unwrap();
        let u32_ = Var::from_tensor(&u64_.to_dtype(DType::F32).unwrap()).unwrap();
        let got = swiglu(&g32, &u32_).unwrap();
        let r32 = r.to_dtype(DType::F32).unwrap();
        let gg = (&got * &r32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // |y| reaches ~100 here: a few f32 ulps of it.
        assert!(diff(&got, &want) < 1e-4, "{}", diff(&got, &want));
        assert!(diff(gg.get(&g32).unwrap(), wg) < 1e-4);
        assert!(diff(gg.get(&u32_).unwrap(), wu) < 1e-4);
    }

    /// Every build this CPU runs gives the portable build's bits.
    #[test]
    fn the_builds_agree_bit_for_bit() {
        let n = 1000;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.19).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let dy: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 11) as f32 * 0.25 - 1.0)
            .collect();
        let run = |b: SimdLevel| {
            let mut y = vec![0f32; n];
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            forward_f32(b, &g, &u, &mut y);
            backward_f32(b, &g, &u, &dy, &mut dg, &mut du);
            (y, dg, du)
        };
        let portable = run(SimdLevel::Portable);
        assert_eq!(run(simd_level()), portable);
        // Against f64's silu: the vectorised exp is within a few ulp.
        for i in 0..n {
            let (g, u) = (g[i] as f64, u[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((portable.0[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
        }
    }
}
