//! Attaching a hand-written backward to a result computed without autograd.
//!
//! candle's fused kernels (rms-norm, layer-norm, softmax, rope) record no backward edge, and its
//! matmul backward also computes the gradient of a frozen weight. The bridge lets us run the
//! fast forward on detached inputs and then splice the result back into the graph with a
//! backward we write ourselves:
//!
//! `out = bridge(inputs, out_detached, backward)` has the value of `out_detached` and the
//! gradient `backward(grad_out)` with respect to each input.
//!
//! When no input tracks gradients the result is returned as is: inference pays nothing.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// A backward for one tracked input.
pub trait Backward1: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn backward(&self, grad_out: &Tensor) -> Result<Tensor>;
}

/// A backward for two inputs (e.g. activation and a trainable weight).
pub trait Backward2: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn backward(&self, grad_out: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// Copies `s` (any layout) into fresh contiguous storage.
fn copy_contiguous<S>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = l.shape().clone();
    let mut dst = s.device().zeros_impl(&shape, s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, shape))
}

struct Bridge1<B: Backward1>(B);

impl<B: Backward1> CustomOp2 for Bridge1<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        out: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_contiguous(out, l)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        out: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_contiguous(out, l)
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.backward(grad)?), None))
    }
}

struct Bridge2<B: Backward2>(B);

impl<B: Backward2> CustomOp3 for Bridge2<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        out: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_contiguous(out, l)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        out: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_contiguous(out, l)
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = self.0.backward(grad)?;
        Ok((a, b, None))
    }
}

/// `out` (computed from detached inputs) with `backward` as its gradient w.r.t. `input`.
pub fn bridge1<B: Backward1>(input: &Tensor, out: Tensor, backward: B) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(out);
    }
    input.apply_op2(&out, Bridge1(backward))
}

/// Two-input version of [`bridge1`]; an input that tracks nothing receives no gradient.
pub fn bridge2<B: Backward2>(a: &Tensor, b: &Tensor, out: Tensor, backward: B) -> Result<Tensor> {
    match (a.track_op(), b.track_op()) {
        (false, false) => Ok(out),
        _ => a.apply_op3(b, &out, Bridge2(backward)),
    }
}
