//! `x · Wᵀ` for a frozen weight: the backward computes only the input gradient
//! (`dx = dy · W`), never the weight's, which candle's matmul backward would.

use super::bridge::{bridge1, Backward1};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Whether [`frozen_matmul_t`] runs its CPU op, which takes `x` of any rank ≥ 2 as it comes
/// (no reshapes in the graph: candle's backward gives each node a zeroed gradient and an add):
/// f32 inputs that track gradients with an f32 weight, or f32 inputs with a bf16/f16 weight.
pub fn takes_any_rank(x: &Tensor, w: &Tensor) -> bool {
    x.rank() >= 2
        && w.rank() == 2
        && ((x.track_op() && super::gemm::cpu_f32(&[x, w])) || super::half_weight::operands(x, w))
}

/// `x`: [n, in] (any rank ≥ 2 where [`takes_any_rank`]), `w`: [out, in] (not a variable) →
/// [n, out] ([.., out]).
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if takes_any_rank(x, w) {
        // In training on the CPU the product is the op's own forward: no copy of the
        // output into the graph, as a bridge would make. A bf16/f16 weight with f32
        // inputs always takes this op (candle's matmul wants one dtype).
        return x
            .contiguous()?
            .apply_op1(FrozenLinear { w: w.contiguous()? });
    }
    let out = super::gemm::matmul(&x.detach(), w, true)?;
    bridge1(x, out, FrozenBwd { w: w.clone() })
}

/// A scalar with the gradient of `Σ g ⊙ frozen_matmul_t(x, w)` with respect to `x`
/// (`g` [.., out]); where the CPU op runs, computed without the product (value 0:
/// [`super::vjp`]).
pub fn frozen_matmul_t_vjp(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
    if takes_any_rank(x, w) && g.dims() == super::with_last(x.dims(), w.dim(0)?).dims() {
        let op = FrozenLinear { w: w.contiguous()? };
        return x.contiguous()?.apply_op1(super::vjp::Vjp1 {
            op,
            g: g.contiguous()?,
        });
    }
    (frozen_matmul_t(x, w)? * g)?.sum_all()
}

struct FrozenBwd {
    w: Tensor,
}

impl Backward1 for FrozenBwd {
    fn name(&self) -> &'static str {
        "frozen-linear-bridge"
    }
    fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        super::gemm::matmul(dy, &self.w, false)
    }
}

/// The CPU frozen linear as a custom op (forward by `gemm::matmul_t_f32`, or
/// `half_weight::matmul_t` for a bf16/f16 weight).
struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(xv) = s else {
            candle_core::bail!("frozen-linear: expected f32 input");
        };
        let (m, k) = super::rows_of(l.shape());
        let x = &xv[l.start_offset()..l.start_offset() + m * k];
        let out = match self.w.dtype() {
            candle_core::DType::F32 => super::gemm::matmul_t_f32(x, m, k, &self.w)?,
            _ => super::half_weight::matmul_t(x, m, k, &self.w)?,
        };
        Ok((
            CpuStorage::F32(out),
            super::with_last(l.shape().dims(), self.w.dim(0)?),
        ))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.reshape(((), self.w.dim(0)?))?;
        Ok(Some(
            super::gemm::matmul(&dy, &self.w, false)?.reshape(x.shape())?,
        ))
    }
}
