//! [`super::rowdot`] for weights stored in half precision (bf16, f16) or as codes
//! ([`RowSource`]): each weight row read once in its stored width and multiplied in f32,
//! by fused widen-and-FMA kernels (AVX2 + F16C) or by widening a block of rows at a time.

#[cfg(target_arch = "x86_64")]
use super::hsum256;
use super::{column, for_each_index, has_avx2_fma};
use crate::ops::half_weight::RowSource;
use crate::ops::SendPtr;
use rayon::prelude::*;

/// Weight rows widened to f32 per block in [`rowdot_half`]'s portable path.
pub(super) const HALF_BLOCK_ROWS: usize = 32;

/// [`super::rowdot`] for a bf16/f16 weight, each weight row read once, in half precision (half the
/// bytes of decoding's memory-bound products), and accumulated in f32. With AVX2, FMA and
/// F16C the kernels widen 8 values per load in registers; otherwise each task widens a
/// block of [`HALF_BLOCK_ROWS`] weight rows into its own f32 buffer for the f32 kernels.
pub fn rowdot_half(
    x: &[f32],
    w: crate::ops::half_weight::HalfRows<'_>,
    m: usize,
    n: usize,
    k: usize,
    parallel: bool,
) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k);
    #[cfg(target_arch = "x86_64")]
    if let Some(kernels) = half_kernels(w) {
        let bits = w.bits();
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let dst = SendPtr(out.as_mut_ptr());
        for_each_index(n.div_ceil(HALF_TILE_COLS), parallel, |t| {
            half_tile(x, bits, t * HALF_TILE_COLS, (m, n, k), dst, kernels)
        });
        // SAFETY: every one of the m·n elements was written above.
        unsafe { out.set_len(m * n) };
        return out;
    }
    rowdot_widened(x, &w, HALF_BLOCK_ROWS, (m, n, k), parallel)
}

/// [`super::rowdot`] for any [`RowSource`] weight [n, k] (k-bit codes; [`rowdot_half`]'s portable
/// path): blocks of `block_rows` weight rows widened into a buffer per task, then dotted
/// with every input row.
pub fn rowdot_widened(
    x: &[f32],
    w: &impl RowSource,
    block_rows: usize,
    (m, n, k): (usize, usize, usize),
    parallel: bool,
) -> Vec<f32> {
    assert!(x.len() >= m * k);
    let block_rows = block_rows.max(1);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let dst = SendPtr(out.as_mut_ptr());
    let block = |buf: &mut Vec<f32>, b: usize| {
        let (j0, j1) = (b * block_rows, ((b + 1) * block_rows).min(n));
        buf.resize((j1 - j0) * k, 0.0);
        w.widen(j0 * k, buf);
        for j in j0..j1 {
            let r = (j - j0) * k;
            column(x, &buf[r..r + k], j, (m, n, k), dst);
        }
    };
    let blocks = n.div_ceil(block_rows);
    if parallel {
        (0..blocks).into_par_iter().for_each_init(Vec::new, block);
    } else {
        let mut buf = Vec::new();
        (0..blocks).for_each(|b| block(&mut buf, b));
    }
    // SAFETY: every one of the m·n elements was written above (each block its columns).
    unsafe { out.set_len(m * n) };
    out
}

/// Weight rows per tile of the fused half-precision kernel: each load of an input row
/// serves this many weight rows, so the inputs are streamed from cache a third as often
/// (a 4 × 3 tile: 12 accumulators, 3 weight and 1 input register of the 16).
const HALF_TILE_COLS: usize = 3;

/// The 4-row × 3-weight-row tile kernel and the one-row kernel for a half-precision weight
/// row given as raw bits.
#[cfg(target_arch = "x86_64")]
type HalfKernels = (
    unsafe fn(&[f32], [&[u16]; HALF_TILE_COLS], usize) -> [[f32; HALF_TILE_COLS]; 4],
    unsafe fn(&[f32], &[u16]) -> f32,
);

/// The fused widen-and-multiply kernels for `w`'s dtype, when this CPU runs them.
#[cfg(target_arch = "x86_64")]
fn half_kernels(w: crate::ops::half_weight::HalfRows<'_>) -> Option<HalfKernels> {
    use crate::ops::half_weight::HalfRows;
    if !(has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")) {
        return None;
    }
    Some(match w {
        HalfRows::Bf16(_) => (tile4x3_half_avx2::<true>, dot_half_avx2::<true>),
        HalfRows::F16(_) => (tile4x3_half_avx2::<false>, dot_half_avx2::<false>),
    })
}

/// Output columns `j0..j0+3` (fewer at the end) for every row of `x`, from the
/// half-precision weight `bits` [n, k].
#[cfg(target_arch = "x86_64")]
fn half_tile(
    x: &[f32],
    bits: &[u16],
    j0: usize,
    (m, n, k): (usize, usize, usize),
    dst: SendPtr<f32>,
    (tile, dot1): HalfKernels,
) {
    // SAFETY (the writes): i < m, j < n; each (i, j) is written once, by the task of its tile.
    let put = |i: usize, j: usize, v: f32| unsafe { dst.get().add(i * n + j).write(v) };
    let row = |j: usize| &bits[j * k..(j + 1) * k];
    let cols = HALF_TILE_COLS.min(n - j0);
    let mut i = 0;
    if cols == HALF_TILE_COLS {
        let w = [row(j0), row(j0 + 1), row(j0 + 2)];
        while i + 4 <= m {
            // SAFETY: the kernels' CPU features were detected (half_kernels); rows
            // i..i+4 are in x and each weight row holds k values.
            let d = unsafe { tile(&x[i * k..(i + 4) * k], w, k) };
            for (r, vals) in d.into_iter().enumerate() {
                for (c, v) in vals.into_iter().enumerate() {
                    put(i + r, j0 + c, v);
                }
            }
            i += 4;
        }
    }
    for r in i..m {
        for j in j0..j0 + cols {
            // SAFETY: as above.
            put(r, j, unsafe { dot1(&x[r * k..(r + 1) * k], row(j)) });
        }
    }
}

/// Eight half-precision values at `p` widened to f32: bf16 by a 16-bit shift, f16 by F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load8_half<const BF16: bool>(p: *const u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let v = _mm_loadu_si128(p as *const __m128i);
    if BF16 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
    } else {
        _mm256_cvtph_ps(v)
    }
}

#[cfg(target_arch = "x86_64")]
fn half_bits_to_f32<const BF16: bool>(b: u16) -> f32 {
    if BF16 {
        f32::from_bits((b as u32) << 16)
    } else {
        half::f16::from_bits(b).to_f32()
    }
}

/// Four rows of `x4` (4 × k) against three half-precision weight rows: 12 dot products,
/// each weight vector widened once per 8 values and each input vector loaded once for all
/// three weight rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile4x3_half_avx2<const BF16: bool>(
    x4: &[f32],
    w: [&[u16]; HALF_TILE_COLS],
    k: usize,
) -> [[f32; HALF_TILE_COLS]; 4] {
    use std::arch::x86_64::*;
    assert!(x4.len() >= 4 * k && w.iter().all(|r| r.len() >= k));
    let pw = w.map(|r| r.as_ptr());
    let px = [0, 1, 2, 3].map(|r| x4.as_ptr().add(r * k));
    let mut acc = [[_mm256_setzero_ps(); HALF_TILE_COLS]; 4];
    let mut p = 0;
    while p + 8 <= k {
        let wv = pw.map(|q| load8_half::<BF16>(q.add(p)));
        for r in 0..4 {
            let xv = _mm256_loadu_ps(px[r].add(p));
            for c in 0..HALF_TILE_COLS {
                acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        p += 8;
    }
    let mut out = [[0f32; HALF_TILE_COLS]; 4];
    for r in 0..4 {
        for c in 0..HALF_TILE_COLS {
            let mut s = hsum256(acc[r][c]);
            for q in p..k {
                s += *px[r].add(q) * half_bits_to_f32::<BF16>(*pw[c].add(q));
            }
            out[r][c] = s;
        }
    }
    out
}

/// One row of `x` against a half-precision weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_half_avx2<const BF16: bool>(x: &[f32], w: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len().min(w.len());
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut p = 0;
    while p + 16 <= k {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(px.add(p)),
            load8_half::<BF16>(pw.add(p)),
            acc[0],
        );
        acc[1] = _mm256_fmadd_ps(
            _mm256_loadu_ps(px.add(p + 8)),
            load8_half::<BF16>(pw.add(p + 8)),
            acc[1],
        );
        p += 16;
    }
    let mut s = hsum256(_mm256_add_ps(acc[0], acc[1]));
    for q in p..k {
        s += *px.add(q) * half_bits_to_f32::<BF16>(*pw.add(q));
    }
    s
}
