//! `x · Wᵀ` for a frozen weight: the backward computes only the input gradient
//! (`dx = dy · W`), never the weight's, which candle's matmul backward would.

use super::bridge::{bridge1, Backward1};
use candle_core::{Result, Tensor};

/// `x`: [n, in], `w`: [out, in] (not a variable) → [n, out].
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let out = super::gemm::matmul(&x.detach(), w, true)?;
    bridge1(x, out, FrozenBwd { w: w.clone() })
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
