//! CPU matrix products with a thread count chosen per product. candle's matmul hands every
//! product to gemm with all rayon threads; for weights that fit in cache (the small models
//! this project tests and benches on) the threads cost more than they save — 2-core
//! measurements in docs/performance.md: small-model decoding 1,900 → 4,500 tokens/s on one
//! thread, while a 1024-wide model decodes 1.5× faster on two. So: one thread when the
//! weight has fewer than `PARALLEL_MIN_WEIGHT` elements, all of them otherwise. Off the
//! CPU, or for dtypes other than f32, candle's matmul.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// Weights (n × k) at least this large are multiplied with every rayon thread.
pub const PARALLEL_MIN_WEIGHT: usize = 1 << 19;

/// `a · bᵀ` (`transpose_b`) or `a · b`: `a` [m, k]; `b` [n, k] or [k, n] → [m, n].
pub fn matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    let cpu_f32 =
        matches!(a.device(), Device::Cpu) && a.dtype() == DType::F32 && b.dtype() == DType::F32;
    if !cpu_f32 || a.rank() != 2 || b.rank() != 2 {
        return if transpose_b {
            a.matmul(&b.t()?)
        } else {
            a.matmul(b)
        };
    }
    let (m, k) = a.dims2()?;
    let (n, kb) = if transpose_b {
        b.dims2()?
    } else {
        let (r, c) = b.dims2()?;
        (c, r)
    };
    if k != kb {
        return a.matmul(&if transpose_b { b.t()? } else { b.clone() }); // candle's shape error
    }
    let a = a.contiguous()?;
    let b = b.contiguous()?;
    let threads = if n * k >= PARALLEL_MIN_WEIGHT {
        candle_core::utils::get_num_threads()
    } else {
        1
    };
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) = (&*sa, &*sb)
    else {
        unreachable!("checked: both f32 on the CPU");
    };
    let av = &av[la.start_offset()..la.start_offset() + m * k];
    let bv = &bv[lb.start_offset()..lb.start_offset() + n * k];
    let mut dst = vec![0f32; m * n];
    // Row-major: a[i, p] at i·k + p; b[p, j] at p·n + j, or for bᵀ, b[j, p] at j·k + p.
    let (b_cs, b_rs) = if transpose_b {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices above hold m·k and n·k elements laid out as the strides say, and
    // `dst` holds m·n; gemm writes only dst (alpha 0: not read).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            av.as_ptr(),
            1,
            k as isize,
            bv.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    drop((sa, sb));
    Tensor::from_vec(dst, (m, n), a.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Agrees with candle's matmul for both layouts, for a view at an offset (a narrowed
    /// tensor) and a transposed (non-contiguous) input, on both sides of the thread cut-off.
    #[test]
    fn agrees_with_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [(3, 5, 4), (17, 64, 33), (8, 1024, 640)] {
            let a = Tensor::randn(0f32, 1.0, (m + 2, k), &dev)
                .unwrap()
                .narrow(0, 2, m)
                .unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = a.matmul(&w.t().unwrap()).unwrap();
            assert!(close(&matmul(&a, &w, true).unwrap(), &want) < 1e-3);
            let wt = w.t().unwrap(); // [k, n], not contiguous
            assert!(close(&matmul(&a, &wt, false).unwrap(), &want) < 1e-3);
        }
    }
}
