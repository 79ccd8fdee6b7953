//! Gradients on a GPU summed over ranks with NCCL (`--features cuda,nccl`, which includes
//! MPI): the MPI world of `dist::mpi` reduces a CUDA tensor with `ncclAllReduce` on the
//! device instead of through the host. The communicator is made on first use, for the
//! device the gradients are on (each rank's `cuda:LOCAL_RANK`, see
//! `rlft_policies::device`): NCCL's unique id comes from `NCCL_COMM_ID` when it is set
//! (NCCL's own bootstrap: every rank derives the same id) or is made by rank 0 and broadcast
//! over MPI.

use super::Collective;
use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// One communicator per process (a rank drives one GPU).
static COMM: Mutex<Option<SharedComm>> = Mutex::new(None);

#[derive(Clone)]
struct SharedComm(Arc<Comm>);
// SAFETY: the communicator is used from the training loop's thread only (MPI is
// initialised FUNNELED and every collective call comes from that thread).
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

/// `t` (contiguous, f32/bf16/f16/f64, on a CUDA device) summed over the ranks of `host`.
pub fn all_reduce_device(host: &dyn Collective, t: &Tensor) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = t.device() else {
        bail!("all_reduce_device needs a CUDA tensor");
    };
    let comm = {
        let mut slot = COMM.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(c) => c.clone(),
            None => {
                let id = unique_id(host)?;
                let comm = Comm::from_rank(dev.cuda_stream(), host.rank(), host.size(), id)
                    .map_err(|e| anyhow!("NCCL: ncclCommInitRank failed: {e:?}"))?;
                let c = SharedComm(Arc::new(comm));
                *slot = Some(c.clone());
                c
            }
        }
    };
    Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce(comm))?)
}

/// NCCL's unique id: from `NCCL_COMM_ID` (every rank asks NCCL), else rank 0's, broadcast.
fn unique_id(host: &dyn Collective) -> Result<Id> {
    if std::env::var_os("NCCL_COMM_ID").is_some() {
        return Id::new().map_err(|e| anyhow!("NCCL: ncclGetUniqueId failed: {e:?}"));
    }
    let mut bytes = [0f64; 128];
    if host.rank() == 0 {
        let id = Id::new().map_err(|e| anyhow!("NCCL: ncclGetUniqueId failed: {e:?}"))?;
        for (b, &c) in bytes.iter_mut().zip(id.internal().iter()) {
            *b = c as u8 as f64;
        }
    }
    host.broadcast_f64(&mut bytes, 0)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (c, &b) in internal.iter_mut().zip(bytes.iter()) {
        *c = b as u8 as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

/// `ncclAllReduce(sum)` of a contiguous CUDA buffer into a new one.
struct AllReduce(SharedComm);

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use half::{bf16, f16};
        let n = l.shape().elem_count();
        if l.contiguous_offsets() != Some((0, n)) {
            candle_core::bail!("the NCCL all-reduce needs a contiguous buffer");
        }
        let dev = s.device.clone();
        let comm = &self.0 .0;
        macro_rules! reduce {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?;
                // SAFETY: every element is written by the all-reduce before it is read.
                let mut dst = unsafe { dev.alloc::<$t>(n)? };
                comm.all_reduce(src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => reduce!(f32),
            DType::F64 => reduce!(f64),
            DType::BF16 => reduce!(bf16),
            DType::F16 => reduce!(f16),
            other => candle_core::bail!("the NCCL all-reduce does not take {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}
