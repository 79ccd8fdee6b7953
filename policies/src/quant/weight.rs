//! [`QuantWeight`]: a frozen k-bit weight ready to multiply, through `ops::half_weight`'s
//! block loop (many rows) or the few-row decoding kernels.

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::{FourBit, FourBitWeight, Int8Weight, QuantConfig, Quantization, BLOCK};
use rayon::prelude::*;

/// A frozen k-bit weight `[rows, cols]` ready to multiply: its codes and, for 4 bits, the
/// absmax values dequantized once. Products write a block of rows out as f32 at a time into
/// a reused buffer and run the f32 kernels on it (`ops::half_weight`'s block loop), so the
/// whole weight never exists in f32.
#[derive(Debug, Clone)]
pub enum QuantWeight {
    FourBit(FourBitWeight, Vec<f32>),
    Int8(Int8Weight),
}

impl QuantWeight {
    pub fn four_bit(w: FourBitWeight) -> Self {
        let absmax = w.absmax.values();
        QuantWeight::FourBit(w, absmax)
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            QuantWeight::FourBit(w, _) => (w.rows, w.cols),
            QuantWeight::Int8(w) => (w.rows, w.cols),
        }
    }

    /// Bytes held (codes, scales; the dequantized absmax of a 4-bit weight included).
    pub fn bytes(&self) -> usize {
        match self {
            QuantWeight::FourBit(w, a) => w.bytes() + 4 * a.len(),
            QuantWeight::Int8(w) => w.values.len() + 4 * w.row_absmax.len(),
        }
    }

    /// `x · Wᵀ` for a row-major `x` [m, cols]: [m, rows].
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        use crate::ops::rowdot::{rowdot_widened, ROWDOT_MAX_ROWS};
        let (n, k) = self.dims();
        #[cfg(target_arch = "x86_64")]
        if let QuantWeight::FourBit(w, absmax) = self {
            if m <= ROWDOT_MAX_ROWS && m > 0 && k % BLOCK == 0 && simd::dot_available() {
                return four_bit_rowdot(w, absmax, x, m);
            }
        }
        if m <= ROWDOT_MAX_ROWS && k > 0 {
            // Decoding's few rows: each task dequantizes a few weight rows (≈ 64 KiB, in
            // cache) and dots them with every input row; no gemm packing.
            let parallel = n * k >= crate::ops::gemm::PARALLEL_MIN_WEIGHT;
            return rowdot_widened(x, self, (16_384 / k).clamp(1, 32), (m, n, k), parallel);
        }
        self.matmul_t_blocks(x, m, crate::ops::half_weight::BLOCK_ELEMS)
    }

    /// `a · W` for a row-major `a` [m, rows]: [m, cols] (the input gradient of `x · Wᵀ`).
    pub fn matmul_n(&self, a: &[f32], m: usize) -> Vec<f32> {
        self.matmul_n_blocks(a, m, crate::ops::half_weight::BLOCK_ELEMS)
    }

    pub(super) fn matmul_t_blocks(&self, x: &[f32], m: usize, block: usize) -> Vec<f32> {
        crate::ops::half_weight::source_matmul_t(x, m, self, self.dims(), block)
    }

    pub(super) fn matmul_n_blocks(&self, a: &[f32], m: usize, block: usize) -> Vec<f32> {
        crate::ops::half_weight::source_matmul_n(a, m, self, self.dims(), block)
    }
}

/// Decoding's `x Wᵀ` for a 4-bit weight whose rows start at block boundaries: each weight
/// row's codes are read once, dequantized in registers and dotted with every input row (up to
/// 8 at a time), the rows split across rayon's threads.
#[cfg(target_arch = "x86_64")]
fn four_bit_rowdot(w: &FourBitWeight, absmax: &[f32], x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let xp = simd::interleave_for_dot(x, m, k);
    let code = w.kind.code();
    // Output column j (all m rows) into `col`.
    let column = |j: usize, col: &mut [f32]| {
        let bytes = &w.packed[j * k / 2..(j + 1) * k / 2];
        let am = &absmax[j * k / BLOCK..(j + 1) * k / BLOCK];
        for (g, out) in col.chunks_mut(8).enumerate() {
            let xr = &xp[g * 8 * k..];
            // SAFETY: AVX2 + FMA were detected; k % 64 == 0; xr holds out.len() · k values.
            unsafe {
                macro_rules! rows {
                    ($($r:literal)+) => {
                        match out.len() {
                            $($r => out.copy_from_slice(&simd::dot_rows::<$r>(xr, k, code, bytes, am)),)+
                            _ => unreachable!(),
                        }
                    };
                }
                rows!(1 2 3 4 5 6 7 8);
            }
        }
    };
    // Columns in tasks of 32 weight rows, written transposed ([n, m]), then turned around.
    const ROWS_PER_TASK: usize = 32;
    let mut t = vec![0f32; n * m];
    let task = |(c, chunk): (usize, &mut [f32])| {
        for (r, col) in chunk.chunks_mut(m).enumerate() {
            column(c * ROWS_PER_TASK + r, col);
        }
    };
    if n * k >= crate::ops::gemm::PARALLEL_MIN_WEIGHT {
        t.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(task);
    } else {
        t.chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(task);
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

impl crate::ops::half_weight::RowSource for QuantWeight {
    fn widen(&self, start: usize, dst: &mut [f32]) {
        match self {
            QuantWeight::FourBit(w, absmax) => w.dequantize_range(start, absmax, dst),
            QuantWeight::Int8(w) => {
                // Row by row: `q · (absmax_r / 127)`, as `Int8Weight::dequantize_rows`.
                let mut e = start;
                let mut rest = dst;
                while !rest.is_empty() {
                    let r = e / w.cols;
                    let take = ((r + 1) * w.cols - e).min(rest.len());
                    let (d, tail) = rest.split_at_mut(take);
                    let s = w.row_absmax[r] / 127.0;
                    for (o, &q) in d.iter_mut().zip(&w.values[e..e + take]) {
                        *o = q as f32 * s;
                    }
                    e += take;
                    rest = tail;
                }
            }
        }
    }
}

impl QuantWeight {
    /// A row-major `[rows, cols]` weight held as `cfg` says; `None` for no quantization.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, cfg: QuantConfig) -> Option<Self> {
        let four = |kind| FourBitWeight::quantize(w, rows, cols, kind, cfg.double_quant);
        Some(match cfg.kind {
            Quantization::None => return None,
            Quantization::Int8 => QuantWeight::Int8(Int8Weight::quantize(w, rows, cols)),
            Quantization::Nf4 => QuantWeight::four_bit(four(FourBit::Nf4)),
            Quantization::Fp4 => QuantWeight::four_bit(four(FourBit::Fp4)),
        })
    }

    /// The whole weight in f32 (for the products off the CPU, and merging).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantWeight::FourBit(w, _) => w.dequantize(),
            QuantWeight::Int8(w) => w.dequantize(),
        }
    }

    /// `x Wᵀ` (`transpose`, `x` [m, cols]) or `x W` (`x` [m, rows]) for an f32 CPU tensor;
    /// no gradient.
    pub fn matmul(
        &self,
        x: &candle_core::Tensor,
        transpose: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::{CpuStorage, Storage, Tensor};
        let x = x.contiguous()?;
        let (m, k) = x.dims2()?;
        let (rows, cols) = self.dims();
        let (want, out_cols) = if transpose {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if k != want {
            candle_core::bail!("k-bit matmul: weight [{rows}, {cols}] for inputs of width {k}");
        }
        let (s, l) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(v)) = &*s else {
            candle_core::bail!("k-bit matmul: expected an f32 CPU input");
        };
        let v = &v[l.start_offset()..l.start_offset() + m * k];
        let out = if transpose {
            self.matmul_t(v, m)
        } else {
            self.matmul_n(v, m)
        };
        drop(s);
        Tensor::from_vec(out, (m, out_cols), x.device())
    }
}
