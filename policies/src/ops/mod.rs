//! Differentiable building blocks. Each op's forward uses candle's fast kernel where one
//! exists and its backward is written out here (see `bridge`), so gradients reach the
//! adapter exactly and frozen weights cost no gradient work.

pub mod bf16_dot;
pub mod bridge;
pub mod flash_attention;
pub mod gemm;
pub mod half_weight;
pub mod head_logprob;
pub mod logprob;
pub mod lora_linear;
pub mod matmul;
pub mod norm;
mod norm_rows;
pub mod quant_linear;
pub mod rope;
pub mod rowdot;
pub mod softmax;
pub mod swiglu;

use candle_core::DType;

/// The dtype reductions run in: f32 for f32/bf16/f16 models, f64 for f64 (used by the
/// finite-difference checks).
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

pub use head_logprob::{head_logprobs, FrozenHead};
pub use logprob::{entropy, gather_logprobs};
pub use matmul::frozen_matmul_t;
pub use norm::{layer_norm, rms_norm};
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

/// The largest |a − b| of two equally long slices (the ops' unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests;
