//! Parsing `--device` and `--dtype`.

use crate::error::{PolicyError, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda` or `cuda:N` (the latter two need the `cuda` feature).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    PolicyError::InvalidArgument(format!("device `{s}`: expected cuda:N"))
                })?,
                // Plain `cuda` is the launcher's local rank's GPU when several processes
                // share a machine (mpirun's OMPI_COMM_WORLD_LOCAL_RANK, torchrun's and
                // Slurm's LOCAL_RANK), else GPU 0.
                None => local_rank(),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(PolicyError::InvalidArgument(format!(
                    "device `{s}`: this rlft was built without CUDA; rebuild with `--features cuda`"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        _ => Err(PolicyError::InvalidArgument(format!(
            "unknown device `{s}`; expected cpu, cuda or cuda:N"
        ))),
    }
}

/// This process's rank among those on its machine, as a launcher says (0 without one).
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "LOCAL_RANK",
        "SLURM_LOCALID",
        "MPI_LOCALRANKID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
    .unwrap_or(0)
}

/// `f32` (the CPU default), `bf16` or `f16`; transformers' names are accepted too.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        _ => Err(PolicyError::InvalidArgument(format!(
            "unknown dtype `{s}`; expected f32, bf16 or f16"
        ))),
    }
}

/// The dtype a model whose weights are in `dtype` computes in on `device`: on the CPU a
/// bf16/f16 model stores its matrices in half precision and runs in f32 (the CPU has no
/// fast half-precision arithmetic besides widening loads; `ops::half_weight`); on a GPU
/// everything runs in the weights' dtype.
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    match dtype {
        DType::BF16 | DType::F16 if device.is_cpu() => DType::F32,
        d => d,
    }
}
