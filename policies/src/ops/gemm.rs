//! CPU matrix products with a thread count chosen per product. candle's matmul hands every
//! product to gemm with all rayon threads; for weights that fit in cache (the small models
//! this project tests and benches on) the threads cost more than they save — 2-core
//! measurements in docs/performance.md: small-model decoding 1,900 → 4,500 tokens/s on one
//! thread, while a 1024-wide model decodes 1.5× faster on two. So: one thread when the
//! weight has fewer than `PARALLEL_MIN_WEIGHT` elements, all of them otherwise. Off the
//! CPU, or for dtypes other than f32, candle's matmul; a bf16/f16 weight times f32 inputs on
//! the CPU goes to [`super::half_weight`].

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// Weights (n × k) at least this large are multiplied with every rayon thread.
pub const PARALLEL_MIN_WEIGHT: usize = 1 << 19;

/// Products of at least this many multiply-adds are split across threads too.
pub const PARALLEL_MIN_MACS: usize = 1 << 22;

/// All on the CPU in f32: where these paths apply.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// `a · bᵀ` (`transpose_b`) or `a · b`, no gradient: `a` [m, k]; `b` [n, k] or [k, n].
pub fn matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    if super::half_weight::applies(a, b) {
        return super::half_weight::matmul(a, b, transpose_b);
    }
    if transpose_b {
        if let Some(out) = few_rows(a, b)? {
            return Ok(out);
        }
        bmm_no_grad(a, &b.t()?)
    } else {
        bmm_no_grad(a, b)
    }
}

/// `x · wᵀ` for a contiguous row-major `x` [m, k] slice and a contiguous f32 CPU weight
/// `w` [n, k]: the row-dot path for few rows, gemm otherwise. Returns the [m, n] values.
pub fn matmul_t_f32(x: &[f32], m: usize, k: usize, w: &Tensor) -> Result<Vec<f32>> {
    use super::rowdot::{f32_max_rows, rowdot};
    let (n, kw) = w.dims2()?;
    if kw != k || !w.is_contiguous() {
        candle_core::bail!(
            "matmul_t_f32: weight {:?} for inputs of width {k}",
            w.dims()
        );
    }
    let (sw, lw) = w.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(wv)) = &*sw else {
        candle_core::bail!("matmul_t_f32: expected an f32 CPU weight");
    };
    let wv = &wv[lw.start_offset()..lw.start_offset() + n * k];
    if m <= f32_max_rows() {
        let parallel = n * k >= PARALLEL_MIN_WEIGHT || m * n * k >= PARALLEL_MIN_MACS;
        return Ok(rowdot(x, wv, m, n, k, parallel));
    }
    if k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: x holds m·k values (row-major), wv n·k (row-major, read as wᵀ with column
    // stride k); gemm writes all m·n values of dst before set_len.
    unsafe {
        gemm_f32(
            dst.as_mut_ptr(),
            (m, n, k),
            (x.as_ptr(), 1, k as isize),
            (wv.as_ptr(), k as isize, 1),
            parallelism(m, n, k),
        );
        dst.set_len(m * n);
    }
    Ok(dst)
}

/// `dst = a · b` for an `m × n` row-major `dst`, with `a` (m × k) and `b` (k × n) given as
/// (pointer, column stride, row stride). dst is only written (gemm's read_dst = false).
///
/// # Safety
/// Every element the strides address for i < m, p < k (a) and p < k, j < n (b) must be
/// readable, and `dst` must have room for m·n values.
unsafe fn gemm_f32(
    dst: *mut f32,
    mnk: (usize, usize, usize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    parallelism: gemm::Parallelism,
) {
    gemm_f32_strided(dst, mnk.1 as isize, false, mnk, a, b, parallelism)
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`) for a row-major `dst` whose rows are
/// `dst_rs` apart, `a` and `b` as in [`gemm_f32`].
///
/// # Safety
/// As [`gemm_f32`]; `dst[i·dst_rs + j]` must be writable (and initialized with
/// `accumulate`) for i < m, j < n.
pub(super) unsafe fn gemm_f32_strided(
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    (a, a_cs, a_rs): (*const f32, isize, isize),
    (b, b_cs, b_rs): (*const f32, isize, isize),
    parallelism: gemm::Parallelism,
) {
    // gemm: dst = alpha·dst + beta·a·b, dst read only when read_dst.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// `dst (+)= a · b` as [`gemm_f32_strided`], with the larger of the output's two dimensions
/// cut into one part per thread (when [`parallelism`] would thread the product), each part a
/// single-threaded gemm. For the thin products of a low-rank adapter (rank 16 as one of m, n,
/// k) gemm's own threading splits the work unevenly: in a W5 step on 2 cores the LoRA op's
/// products took ~13% less time cut this way (docs/performance.md). Each output value is
/// summed as the single-threaded gemm sums it.
///
/// # Safety
/// As [`gemm_f32_strided`].
pub(super) unsafe fn gemm_f32_split(
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    (a, a_cs, a_rs): (*const f32, isize, isize),
    (b, b_cs, b_rs): (*const f32, isize, isize),
) {
    let threads = match parallelism(m, n, k) {
        gemm::Parallelism::Rayon(t) => t,
        _ => 1,
    };
    // Parts start on whole 16-value vectors; one part is the whole product.
    let along_m = m >= n;
    let len = if along_m { m } else { n };
    let part = len.div_ceil(threads).next_multiple_of(16).min(len).max(1);
    let (d, pa, pb) = (
        super::SendPtr(dst),
        super::SendPtr(a as *mut f32),
        super::SendPtr(b as *mut f32),
    );
    let run = |t: usize| {
        let (s, e) = (t * part, ((t + 1) * part).min(len));
        let s_ = s as isize;
        // Part t: output rows (or columns) s..e, from the same rows of a (or columns of b).
        let (d_at, a_at, b_at, mnk) = if along_m {
            (s_ * dst_rs, s_ * a_rs, 0, (e - s, n, k))
        } else {
            (s_, 0, s_ * b_cs, (m, e - s, k))
        };
        // SAFETY: part t writes its own rows (or columns) of dst; its operands lie inside
        // what the caller's strides address.
        unsafe {
            gemm_f32_strided(
                d.get().offset(d_at),
                dst_rs,
                accumulate,
                mnk,
                ((pa.get() as *const f32).offset(a_at), a_cs, a_rs),
                ((pb.get() as *const f32).offset(b_at), b_cs, b_rs),
                gemm::Parallelism::None,
            )
        }
    };
    let parts = len.div_ceil(part);
    if parts <= 1 {
        run(0)
    } else {
        use rayon::prelude::*;
        (0..parts).into_par_iter().for_each(run);
    }
}

pub(super) fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if n * k >= PARALLEL_MIN_WEIGHT || m * n * k >= PARALLEL_MIN_MACS {
        match candle_core::utils::get_num_threads() {
            t if t > 1 => gemm::Parallelism::Rayon(t),
            _ => gemm::Parallelism::None,
        }
    } else {
        gemm::Parallelism::None
    }
}

/// `a · bᵀ` by [`super::rowdot`] when `a` has at most `f32_max_rows()` rows (CPU, f32,
/// both contiguous); None otherwise.
fn few_rows(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !cpu_f32(&[a, b])
        || a.rank() != 2
        || b.rank() != 2
        || !a.is_contiguous()
        || !b.is_contiguous()
    {
        return Ok(None);
    }
    let ((m, k), (n, kb)) = (a.dims2()?, b.dims2()?);
    if m > super::rowdot::f32_max_rows() || k != kb {
        return Ok(None);
    }
    let (sa, la) = a.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(av)) = &*sa else {
        return Ok(None);
    };
    let out = matmul_t_f32(&av[la.start_offset()..la.start_offset() + m * k], m, k, b)?;
    drop(sa);
    Ok(Some(Tensor::from_vec(out, (m, n), a.device())?))
}

/// Differentiable batched `a · b` (candle's matmul semantics: `a` [..., m, k], `b`
/// [..., k, n], the same leading dims) computed by [`strided_bmm`] on the CPU in f32 —
/// strided views such as `k.t()` or a narrowed cache go in without a copy — and by candle's
/// matmul elsewhere. The backward is `da = dy · bᵀ`, `db = aᵀ · dy`, by the same routine.
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = match strided_bmm(&a.detach(), &b.detach())? {
        Some(o) => o,
        None => return candle_matmul(a, b),
    };
    super::bridge::bridge2(
        a,
        b,
        out,
        BmmBwd {
            a: a.detach(),
            b: b.detach(),
        },
    )
}

struct BmmBwd {
    a: Tensor,
    b: Tensor,
}

impl super::bridge::Backward2 for BmmBwd {
    fn name(&self) -> &'static str {
        "bmm-bridge"
    }
    fn backward(&self, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = self.a.rank();
        let bt = self.b.transpose(r - 2, r - 1)?;
        let at = self.a.transpose(r - 2, r - 1)?;
        let da = bmm_no_grad(dy, &bt)?;
        let db = bmm_no_grad(&at, dy)?;
        Ok((Some(da), Some(db)))
    }
}

fn bmm_no_grad(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match strided_bmm(a, b)? {
        Some(o) => Ok(o),
        None => candle_matmul(a, b),
    }
}

/// candle's matmul, which takes transposed operands but not every strided view (e.g. a
/// narrowed cache's values): those are made contiguous first.
fn candle_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.matmul(b)
        .or_else(|_| a.contiguous()?.matmul(&b.contiguous()?))
}

/// The CPU f32 product of [`bmm`], reading each operand's strides as they are; None when
/// it does not apply (another device or dtype, ranks or leading dims that differ).
fn strided_bmm(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let r = a.rank();
    if !cpu_f32(&[a, b]) || r < 2 || b.rank() != r || a.dims()[..r - 2] != b.dims()[..r - 2] {
        return Ok(None);
    }
    let (m, k) = (a.dims()[r - 2], a.dims()[r - 1]);
    let (kb, n) = (b.dims()[r - 2], b.dims()[r - 1]);
    if k != kb {
        return Ok(None);
    }
    let batch_dims = &a.dims()[..r - 2];
    let batches: usize = batch_dims.iter().product();
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) = (&*sa, &*sb)
    else {
        return Ok(None);
    };
    let (ast, bst) = (la.stride(), lb.stride());
    let parallelism = parallelism(m, n, k);
    if k == 0 {
        let mut shape = batch_dims.to_vec();
        shape.extend([m, n]);
        return Ok(Some(Tensor::zeros(shape, DType::F32, a.device())?));
    }
    // Not zeroed: gemm writes every element (read_dst = false) before `set_len` below.
    let total = batches * m * n;
    let mut dst: Vec<f32> = Vec::with_capacity(total);
    let mut idx = vec![0usize; batch_dims.len()];
    for bi in 0..batches {
        // Offsets of this batch's matrices from the multi-index `idx`.
        let oa: usize = la.start_offset() + idx.iter().zip(ast).map(|(i, s)| i * s).sum::<usize>();
        let ob: usize = lb.start_offset() + idx.iter().zip(bst).map(|(i, s)| i * s).sum::<usize>();
        // SAFETY: every element a[oa + i·ast[r−2] + p·ast[r−1]] (i < m, p < k) lies in the
        // storage the layout describes, likewise for b; dst's block bi holds m·n values.
        unsafe {
            gemm_f32(
                dst.as_mut_ptr().add(bi * m * n),
                (m, n, k),
                (
                    av.as_ptr().add(oa),
                    ast[r - 1] as isize,
                    ast[r - 2] as isize,
                ),
                (
                    bv.as_ptr().add(ob),
                    bst[r - 1] as isize,
                    bst[r - 2] as isize,
                ),
                parallelism,
            );
        }
        // Next multi-index, last dim fastest.
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < batch_dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    // SAFETY: the gemm calls above wrote all `total` elements of the allocation.
    unsafe { dst.set_len(total) };
    drop((sa, sb));
    let mut shape = batch_dims.to_vec();
    shape.extend([m, n]);
    Ok(Some(Tensor::from_vec(dst, shape, a.device())?))
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

    /// The split product equals the plain single-threaded one, cut along m or along n, with
    /// and without accumulation, strided operands (a transposed lhs), small and large enough
    /// to be cut.
    #[test]
    fn split_product_equals_the_whole() {
        let val = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
        // (m, n, k): cut along m (a LoRA xa), along n (a LoRA dA) — both past
        // PARALLEL_MIN_MACS, so cut wherever there are two threads — and too small to cut.
        for (m, n, k) in [(1000, 16, 300), (16, 600, 1000), (40, 16, 30)] {
            let a: Vec<f32> = (0..m * k).map(val).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i + 17)).collect();
            for (transposed, accumulate) in [(false, false), (true, true)] {
                // a as [m, k] row-major, or read as the transpose of a [k, m] row-major array.
                let (a_cs, a_rs) = if transposed {
                    (m as isize, 1)
                } else {
                    (1, k as isize)
                };
                let init: Vec<f32> = (0..m * n).map(|i| val(i + 5)).collect();
                let (mut whole, mut split) = (init.clone(), init);
                // SAFETY: a holds m·k values, b k·n (row-major, [k, n]), dst m·n.
                unsafe {
                    gemm_f32_strided(
                        whole.as_mut_ptr(),
                        n as isize,
                        accumulate,
                        (m, n, k),
                        (a.as_ptr(), a_cs, a_rs),
                        (b.as_ptr(), 1, n as isize),
                        gemm::Parallelism::None,
                    );
                    gemm_f32_split(
                        split.as_mut_ptr(),
                        n as isize,
                        accumulate,
                        (m, n, k),
                        (a.as_ptr(), a_cs, a_rs),
                        (b.as_ptr(), 1, n as isize),
                    );
                }
                let worst = whole
                    .iter()
                    .zip(&split)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-4, "({m}, {n}, {k}) {transposed}: {worst}");
                // The reference itself: one entry by hand.
                let (i, j) = (m - 1, n - 1);
                let mut want = if accumulate { val(i * n + j + 5) } else { 0.0 };
                for p in 0..k {
                    let av = if transposed {
                        a[p * m + i]
                    } else {
                        a[i * k + p]
                    };
                    want += av * b[p * n + j];
                }
                assert!((split[i * n + j] - want).abs() <= 1e-3, "({m}, {n}, {k})");
            }
        }
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

    /// Batched, strided (transposed, narrowed) operands give candle's matmul, and the
    /// gradients match candle's autograd.
    #[test]
    fn bmm_matches_candle_values_and_gradients() {
        let dev = Device::Cpu;
        let q = candle_core::Var::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let cache = Tensor::randn(0f32, 1.0, (2, 3, 9, 8), &dev).unwrap();
        let kv = candle_core::Var::from_tensor(&cache).unwrap();
        let k = kv.narrow(2, 0, 7).unwrap(); // [2, 3, 7, 8], a narrowed view
        let kt = k.transpose(2, 3).unwrap(); // strided
        let ours = bmm(&q, &kt).unwrap();
        let want = q.matmul(&kt.contiguous().unwrap()).unwrap();
        assert!(close(&ours, &want) < 1e-4);
        let w = Tensor::randn(0f32, 1.0, ours.shape(), &dev).unwrap();
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [q.as_tensor(), kv.as_tensor()] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(close(a, b) < 1e-4, "gradient differs");
        }
    }
}
