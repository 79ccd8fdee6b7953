//! Frozen base weights stored in bf16 or f16 on the CPU (half the memory, half the bytes a
//! decoded token reads) multiplied with f32 activations. Each product widens the weight to
//! f32 a block of rows at a time into a reused scratch buffer and runs the f32 kernels on it
//! (gemm for many rows, [`super::rowdot`] for decoding's few), so every product accumulates
//! in f32 and the f32 copy of a weight never exists whole: for `x · Wᵀ` with `W` [n, k],
//!
//! `y[:, j0..j1] = x · f32(W[j0..j1])ᵀ`, and for `dy · W`: `dx = Σ_blocks dy[:, j0..j1] · f32(W[j0..j1])`.
//!
//! Widening bf16 is exact (a bf16 is the top half of an f32), so these products equal the
//! f32 products of the widened weights. Where the CPU multiplies bf16 natively (AMX, or
//! AVX512-BF16's `VDPBF16PS`), a bf16 weight's products go to [`super::bf16_dot`] instead:
//! the activations are rounded to bf16 as PyTorch's bf16 model holds them, the sums stay
//! f32. f16 weights, k-bit codes and CPUs without those instructions keep the widening path.

use super::bf16_dot;
use super::gemm::{gemm_f32_strided, parallelism, PARALLEL_MIN_WEIGHT};
use super::rowdot::{rowdot_half, ROWDOT_MAX_ROWS};
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

/// A weight block widened at once holds at most this many values (16 MiB of f32): every
/// per-layer weight of a 0.5 B model is one block; a 151,936-row head is 33.
pub const BLOCK_ELEMS: usize = 1 << 22;

/// A half-precision weight's values, row-major.
#[derive(Clone, Copy)]
pub enum HalfRows<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HalfRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            HalfRows::Bf16(w) => w.len(),
            HalfRows::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw 16-bit patterns (both types are `repr(transparent)` over `u16`).
    pub fn bits(&self) -> &[u16] {
        match self {
            HalfRows::Bf16(w) => {
                // SAFETY: bf16 is a transparent u16: same size, alignment and validity.
                unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) }
            }
            // SAFETY: as above, for f16.
            HalfRows::F16(w) => unsafe {
                std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len())
            },
        }
    }

    /// `dst[i] = f32(w[start + i])`.
    pub fn widen(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match self {
            HalfRows::Bf16(w) => widen_bf16(&w[start..end], dst),
            // F16C when the CPU has it (half detects it at run time).
            HalfRows::F16(w) => w[start..end].convert_to_f32_slice(dst),
        }
    }
}

/// A weight whose values can be written out as f32 a run at a time: half precision widened,
/// k-bit codes dequantized. The block loop below runs the f32 kernels on what it writes.
pub trait RowSource: Sync {
    /// `dst[i] = f32(w[start + i])` for the row-major weight's values from `start`.
    fn widen(&self, start: usize, dst: &mut [f32]);

    /// [`Self::widen`] split across rayon's threads for large blocks.
    fn widen_par(&self, start: usize, dst: &mut [f32]) {
        const PIECE: usize = 1 << 16;
        if dst.len() < 4 * PIECE {
            return self.widen(start, dst);
        }
        dst.par_chunks_mut(PIECE)
            .enumerate()
            .for_each(|(c, d)| self.widen(start + c * PIECE, d));
    }
}

impl RowSource for HalfRows<'_> {
    fn widen(&self, start: usize, dst: &mut [f32]) {
        HalfRows::widen(self, start, dst)
    }
}

/// A bf16 is the upper 16 bits of an f32: widening is a shift, which the compiler vectorizes.
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// Where these products apply: `x` f32 and `w` bf16/f16, both 2-D on the CPU.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    operands(x, w) && x.rank() == 2 && w.rank() == 2
}

/// `x` f32 and `w` bf16/f16, both on the CPU (any ranks).
pub fn operands(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && matches!(w.dtype(), DType::BF16 | DType::F16)
}

/// `a · wᵀ` (`transpose_w`, `a` [m, k]) or `a · w` (`a` [m, n]) for a half-precision `w`
/// [n, k]; no gradient. See [`applies`].
pub fn matmul(a: &Tensor, w: &Tensor, transpose_w: bool) -> Result<Tensor> {
    let a = a.contiguous()?;
    let (m, ka) = a.dims2()?;
    let (sa, la) = a.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(av)) = &*sa else {
        candle_core::bail!("half-weight matmul: expected an f32 CPU input");
    };
    let av = &av[la.start_offset()..la.start_offset() + m * ka];
    let (out, cols) = if transpose_w {
        (matmul_t(av, m, ka, w)?, w.dim(0)?)
    } else {
        (matmul_n(av, m, ka, w)?, w.dim(1)?)
    };
    drop(sa);
    Tensor::from_vec(out, (m, cols), a.device())
}

/// `x · wᵀ` for a row-major `x` [m, k] and a half-precision `w` [n, k]: [m, n] values.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &Tensor) -> Result<Vec<f32>> {
    matmul_t_blocks(x, m, k, w, BLOCK_ELEMS)
}

/// [`matmul_t`] widening at most `block` values at a time.
fn matmul_t_blocks(x: &[f32], m: usize, k: usize, w: &Tensor, block: usize) -> Result<Vec<f32>> {
    with_rows(w, |rows, n, kw| {
        if kw != k {
            candle_core::bail!("half-weight matmul: weight [{n}, {kw}] for inputs of width {k}");
        }
        if let Some(y) = bf16_dot::weight::matmul_t(x, m, w, rows, (n, k), block) {
            return Ok(y);
        }
        if m <= ROWDOT_MAX_ROWS {
            return Ok(rowdot_half(x, rows, m, n, k, n * k >= PARALLEL_MIN_WEIGHT));
        }
        Ok(source_matmul_t(x, m, &rows, (n, k), block))
    })
}

/// `x · wᵀ` for `x` [m, k] and any [`RowSource`] weight [n, k], a block of at most `block`
/// values of the weight written out as f32 at a time.
pub fn source_matmul_t(
    x: &[f32],
    m: usize,
    rows: &impl RowSource,
    (n, k): (usize, usize),
    block: usize,
) -> Vec<f32> {
    if k == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    widened_blocks(rows, (n, k), block, |j0, rb, blk| {
        // SAFETY: x holds m·k values; blk rb·k (read as its transpose: column stride
        // k); columns j0..j0+rb of the m × n row-major dst are in its capacity.
        unsafe {
            gemm_f32_strided(
                dst.as_mut_ptr().add(j0),
                n as isize,
                false,
                (m, rb, k),
                (x.as_ptr(), 1, k as isize),
                (blk.as_ptr(), k as isize, 1),
                parallelism(m, rb, k),
            );
        }
    });
    // SAFETY: the blocks wrote every column of every row (read_dst = false).
    unsafe { dst.set_len(m * n) };
    dst
}

/// `a · w` for a row-major `a` [m, n] and a half-precision `w` [n, k]: [m, k] values (the
/// input gradient of `x · wᵀ`), accumulated over blocks of `w`'s rows.
pub fn matmul_n(a: &[f32], m: usize, n: usize, w: &Tensor) -> Result<Vec<f32>> {
    matmul_n_blocks(a, m, n, w, BLOCK_ELEMS)
}

/// [`matmul_n`] widening at most `block` values at a time.
fn matmul_n_blocks(a: &[f32], m: usize, n: usize, w: &Tensor, block: usize) -> Result<Vec<f32>> {
    with_rows(w, |rows, nw, k| {
        if nw != n {
            candle_core::bail!("half-weight matmul: weight [{nw}, {k}] for inputs of width {n}");
        }
        if let Some(dx) = bf16_dot::weight::matmul_n(a, m, w, rows, (n, k), block) {
            return Ok(dx);
        }
        Ok(source_matmul_n(a, m, &rows, (n, k), block))
    })
}

/// `a · w` for `a` [m, n] and any [`RowSource`] weight [n, k], accumulated over blocks of at
/// most `block` values of the weight.
pub fn source_matmul_n(
    a: &[f32],
    m: usize,
    rows: &impl RowSource,
    (n, k): (usize, usize),
    block: usize,
) -> Vec<f32> {
    let mut dst = vec![0f32; m * k];
    if k == 0 || n == 0 || m == 0 {
        return dst;
    }
    widened_blocks(rows, (n, k), block, |j0, rb, blk| {
        // SAFETY: a's columns j0..j0+rb (row stride n) and blk (rb × k, row-major) are
        // in bounds; dst holds m·k values (read from the second block on).
        unsafe {
            gemm_f32_strided(
                dst.as_mut_ptr(),
                k as isize,
                j0 > 0,
                (m, k, rb),
                (a.as_ptr().add(j0), 1, n as isize),
                (blk.as_ptr(), 1, k as isize),
                parallelism(m, k, rb),
            );
        }
    });
    dst
}

/// `f(j0, rb, block)` for consecutive blocks of `rb` rows of the weight [n, k] (n, k > 0),
/// each widened to f32 into this thread's scratch buffer; at most `block` values a block.
fn widened_blocks(
    rows: &impl RowSource,
    (n, k): (usize, usize),
    block: usize,
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    let nb = (block / k).clamp(1, n);
    with_scratch(nb * k, |buf| {
        for j0 in (0..n).step_by(nb) {
            let rb = nb.min(n - j0);
            let blk = &mut buf[..rb * k];
            rows.widen_par(j0 * k, blk);
            f(j0, rb, blk);
        }
    });
}

/// Runs `f` on the values of a contiguous half-precision CPU weight [n, k].
fn with_rows<R>(w: &Tensor, f: impl FnOnce(HalfRows<'_>, usize, usize) -> Result<R>) -> Result<R> {
    let w = w.contiguous()?;
    let (n, k) = w.dims2()?;
    let (s, l) = w.storage_and_layout();
    let (o, len) = (l.start_offset(), n * k);
    let rows = match &*s {
        Storage::Cpu(CpuStorage::BF16(v)) => HalfRows::Bf16(&v[o..o + len]),
        Storage::Cpu(CpuStorage::F16(v)) => HalfRows::F16(&v[o..o + len]),
        _ => candle_core::bail!("half-weight matmul: expected a bf16/f16 CPU weight"),
    };
    f(rows, n, k)
}

thread_local! {
    /// The widened block, reused across products on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `len` scratch values: this thread's buffer, or a fresh one when it is in use (a
/// product started from inside another's rayon task).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn widened(w: &Tensor) -> Tensor {
        w.to_dtype(DType::F32).unwrap()
    }

    use crate::ops::max_abs_diff as max_diff;

    /// Both products, both half dtypes, the row-dot (m ≤ 16) and gemm paths, one block and
    /// several (a block smaller than a row included), against the f32 product of the
    /// widened weight: equal to f32 rounding (the same products, summed in another order).
    #[test]
    fn products_equal_the_f32_product_of_the_widened_weight() {
        // The widened path; the bf16 kernels have their own test below.
        crate::ops::bf16_dot::with_engine(None, || {
            let dev = Device::Cpu;
            for dtype in [DType::BF16, DType::F16] {
                for (m, n, k) in [(3, 37, 19), (16, 50, 33), (40, 70, 24), (17, 9, 130)] {
                    let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let w32 = widened(&w);
                    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                    let dy = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
                    let want_t: Vec<f32> = x
                        .matmul(&w32.t().unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let want_n: Vec<f32> = dy
                        .matmul(&w32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                    let dv: Vec<f32> = dy.flatten_all().unwrap().to_vec1().unwrap();
                    for block in [BLOCK_ELEMS, 5 * k, 1] {
                        let got = matmul_t_blocks(&xv, m, k, &w, block).unwrap();
                        assert!(
                            max_diff(&got, &want_t) < 1e-4,
                            "{dtype:?} t {m}x{n}x{k} block {block}"
                        );
                        let got = matmul_n_blocks(&dv, m, n, &w, block).unwrap();
                        assert!(
                            max_diff(&got, &want_n) < 1e-4,
                            "{dtype:?} n {m}x{n}x{k} block {block}"
                        );
                    }
                    // Through the tensor entry point too.
                    let got: Vec<f32> = matmul(&x, &w, true)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert!(max_diff(&got, &want_t) < 1e-4);
                }
            }
        });
    }

    /// Widening bf16 is exact, f16 too: every value comes back as candle's conversion gives it.
    #[test]
    fn widening_is_exact() {
        let dev = Device::Cpu;
        let v = Tensor::randn(0f32, 3.0, 1000, &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let w = v.to_dtype(dtype).unwrap().reshape((10, 100)).unwrap();
            let want: Vec<f32> = widened(&w).flatten_all().unwrap().to_vec1().unwrap();
            let got = with_rows(&w, |rows, n, k| {
                let mut d = vec![0f32; n * k];
                rows.widen_par(0, &mut d);
                Ok(d)
            })
            .unwrap();
            assert_eq!(got, want, "{dtype:?}");
        }
    }

    /// A frozen bf16 linear in a graph: the value and the input gradient equal those of the
    /// widened f32 weight (the weight gets none).
    #[test]
    fn frozen_linear_gradient_with_a_bf16_weight() {
        // The widened path; the bf16 kernels have their own test below.
        crate::ops::bf16_dot::with_engine(None, || {
            let dev = Device::Cpu;
            let w = Tensor::randn(0f32, 1.0, (23, 31), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            for m in [2, 24] {
                let x = Var::randn(0f32, 1.0, (m, 31), &dev).unwrap();
                let c = Tensor::randn(0f32, 1.0, (m, 23), &dev).unwrap();
                let loss = |w: &Tensor| {
                    let y = crate::ops::frozen_matmul_t(x.as_tensor(), w).unwrap();
                    let l = (y * &c).unwrap().sum_all().unwrap();
                    let g = l.backward().unwrap();
                    (
                        l.to_scalar::<f32>().unwrap(),
                        g.get(&x)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    )
                };
                let (l16, g16) = loss(&w);
                let (l32, g32) = loss(&widened(&w));
                assert!((l16 - l32).abs() < 1e-3 * l32.abs().max(1.0), "m={m}");
                assert!(max_diff(&g16, &g32) < 1e-4, "m={m}");
            }
        });
    }

    /// The chunked head (log-probs, entropy and their gradient) with a bf16 head equals it
    /// with the widened f32 head.
    #[test]
    fn chunked_head_with_a_bf16_weight() {
        // The widened path; the bf16 kernels have their own test below.
        crate::ops::bf16_dot::with_engine(None, || {
            use crate::logprobs::Entropy;
            use crate::ops::{head_logprobs, FrozenHead};
            let dev = Device::Cpu;
            let (n, h, v) = (7, 12, 50);
            let w = Tensor::randn(0f32, 1.0, (v, h), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let b = Tensor::randn(0f32, 1.0, v, &dev).unwrap();
            let y = Tensor::new(&[0u32, 3, 49, 7, 7, 20, 1], &dev).unwrap();
            let hidden = Var::randn(0f32, 1.0, (n, h), &dev).unwrap();
            let run = |w: &Tensor| {
                let head = FrozenHead {
                    weight: w.clone(),
                    bias: Some(b.clone()),
                    tau: 0.7,
                };
                let (lp, ent) =
                    head_logprobs(hidden.as_tensor(), &y, &head, 3, Entropy::Loss).unwrap();
                let ent = ent.unwrap();
                let loss =
                    (lp.sum_all().unwrap() + (ent.sum_all().unwrap() * 0.3).unwrap()).unwrap();
                let g = loss.backward().unwrap();
                let vals: Vec<f32> = Tensor::cat(&[&lp, &ent], 0).unwrap().to_vec1().unwrap();
                (
                    vals,
                    g.get(&hidden)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            };
            let (v16, g16) = run(&w);
            let (v32, g32) = run(&widened(&w));
            assert!(max_diff(&v16, &v32) < 1e-5);
            assert!(max_diff(&g16, &g32) < 1e-5);
        });
    }

    /// Rows rounded to bf16 (what the bf16 kernels multiply).
    fn rounded(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// The bf16 kernels (the emulated `VDPBF16PS` tiles on any host; the instruction and AMX
    /// where the CPU has them), through the entry points a model uses: `x · Wᵀ` equals the
    /// f32 product of the bf16-rounded rows and the widened weight, and the frozen linear's
    /// input gradient equals that of bf16-rounded `dy`, for decoding's few rows and many.
    #[test]
    fn bf16_kernels_multiply_bf16_rounded_activations() {
        use crate::ops::bf16_dot::{self, Engine, Kernels};
        let dev = Device::Cpu;
        let mut engines = vec![Engine::Tiles(Kernels::emulated())];
        engines.extend(Kernels::hardware().map(Engine::Tiles));
        if bf16_dot::amx::available() {
            engines.push(Engine::Amx);
        }
        for engine in engines {
            bf16_dot::with_engine(Some(engine), || {
                for (m, n, k) in [(3, 37, 19), (40, 70, 24), (70, 130, 65)] {
                    let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap();
                    let w32 = widened(&w);
                    // Rows are rounded on every path, decoding's few included.
                    let x = Var::randn(0f32, 1.0, (m, k), &dev).unwrap();
                    let xr = rounded(x.as_tensor());
                    let want: Vec<f32> = xr
                        .matmul(&w32.t().unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let y = crate::ops::frozen_matmul_t(x.as_tensor(), &w).unwrap();
                    let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                    let e = max_diff(&got, &want);
                    assert!(
                        e < 1e-4,
                        "{m}x{n}x{k} forward {} {e}",
                        match engine {
                            Engine::Amx => "amx",
                            _ => "tiles",
                        }
                    );
                    let c = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
                    let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                    let got: Vec<f32> =
                        g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let want: Vec<f32> = rounded(&c)
                        .matmul(&w32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert!(max_diff(&got, &want) < 1e-4, "{m}x{n}x{k} input gradient");
                }
            });
        }
    }
}
