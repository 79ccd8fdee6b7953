//! Softmax over the last dimension with a hand-written backward.

use super::bridge::{bridge1, Backward1};
use candle_core::{Result, Tensor, D};

/// `y = softmax(x)` along the last dim; `dx = y · (dy − Σ dy·y)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    bridge1(&x, y.clone(), SoftmaxBwd { y })
}

struct SoftmaxBwd {
    y: Tensor,
}

impl Backward1 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bridge"
    }
    fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        let dot = (dy * &self.y)?.sum_keepdim(D::Minus1)?;
        self.y.mul(&dy.broadcast_sub(&dot)?)
    }
}
