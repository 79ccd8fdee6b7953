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
pub mod vjp;

use candle_core::{CpuStorage, DType, Layout, Shape};

/// An output pointer shared by the tasks of a parallel kernel, each writing its own
/// disjoint part of the destination (tiles, columns).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: the kernels that share one write disjoint elements through it.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// The widest x86 vector build this CPU runs, chosen once: the element-wise kernels
/// (the fused attention's row passes, SwiGLU) are each built for AVX-512, for AVX2 + FMA and
/// portably, and pick their build by it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SimdLevel {
    Avx512,
    Avx2,
    Portable,
}

pub(crate) fn simd_level() -> SimdLevel {
    static CHOSEN: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    })
}

/// A contiguous CPU operand's values as `T` (`op` names the op in the error).
pub(crate) fn contiguous_values<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: non-contiguous input")))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// A `[.., k]` shape as `n` rows of width `k`.
pub(crate) fn rows_of(shape: &Shape) -> (usize, usize) {
    let k = shape.dims().last().copied().unwrap_or(0);
    (shape.elem_count() / k.max(1), k)
}

/// `dims` with the last replaced by `last`: a row-wise product's output shape.
pub(crate) fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

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
