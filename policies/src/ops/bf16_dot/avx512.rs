//! The AVX512-BF16 kernels: the `VDPBF16PS` tile kernel of the packed product, the dot
//! kernel of decoding's few rows, and `VCVTNE2PS2BF16` rounding of activation rows.

use super::{MR, NR};
use std::arch::x86_64::*;

/// The [`super::TileKernel`] for AVX512-BF16.
///
/// # Safety
/// As [`super::TileKernel`]; the CPU must have avx512f, avx512bw and avx512bf16.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    match mr {
        6 => tile_mr::<6>(kc, a, lda, b, c, ldc, nr, accumulate),
        5 => tile_mr::<5>(kc, a, lda, b, c, ldc, nr, accumulate),
        4 => tile_mr::<4>(kc, a, lda, b, c, ldc, nr, accumulate),
        3 => tile_mr::<3>(kc, a, lda, b, c, ldc, nr, accumulate),
        2 => tile_mr::<2>(kc, a, lda, b, c, ldc, nr, accumulate),
        1 => tile_mr::<1>(kc, a, lda, b, c, ldc, nr, accumulate),
        _ => unreachable!("tile rows {mr} > {MR}"),
    }
}

/// The store mask of vector `v` (columns 16v..16v+16) of an `nr`-column tile.
#[inline(always)]
fn mask(nr: usize, v: usize) -> __mmask16 {
    let cols = nr.saturating_sub(16 * v).min(16);
    ((1u32 << cols) - 1) as __mmask16
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_mr<const R: usize>(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    nr: usize,
    accumulate: bool,
) {
    let masks = [mask(nr, 0), mask(nr, 1), mask(nr, 2), mask(nr, 3)];
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, r) in row.iter_mut().enumerate() {
                *r = _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v));
            }
        }
    }
    for p in 0..kc {
        let bp = b.add(p * NR) as *const __m512i;
        let bv: [__m512bh; 4] = [
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(1))),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(2))),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(3))),
        ];
        for (i, row) in acc.iter_mut().enumerate() {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                *a.add(i * lda + p) as i32,
            ));
            for (r, bvv) in row.iter_mut().zip(bv) {
                *r = _mm512_dpbf16_ps(*r, av, bvv);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, r) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), masks[v], *r);
        }
    }
}

/// `VCVTNE2PS2BF16` on 32 values at a time: `o[p] = bf16(x[2p]) | bf16(x[2p+1]) << 16` for
/// the whole 16-pair groups of `x`; returns how many pairs it wrote.
///
/// # Safety
/// The CPU must have avx512f and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn round_row(x: &[f32], o: &mut [u32]) -> usize {
    let groups = (x.len() / 32).min(o.len() / 16);
    for g in 0..groups {
        let lo = _mm512_loadu_ps(x.as_ptr().add(32 * g));
        let hi = _mm512_loadu_ps(x.as_ptr().add(32 * g + 16));
        // The second operand fills the low 16 bf16 values.
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(
            o.as_mut_ptr().add(16 * g) as *mut __m512i,
            std::mem::transmute::<__m512bh, __m512i>(v),
        );
    }
    16 * groups
}

/// The [`super::DotKernel`] for AVX512-BF16: 32 values of each row per instruction, the
/// tail by masked loads (zeros), lanes summed by [`reduce_lanes`] (`emulate::sum_lanes`'s tree).
///
/// # Safety
/// As [`super::DotKernel`]; the CPU must have avx512f, avx512bw and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dots(x: *const u16, w: *const u16, k: usize, mr: usize, nc: usize) -> [[f32; 4]; 4] {
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let load = |r: *const u16, s: usize| -> __m512bh {
        let rem = k - 32 * s;
        let v = if rem >= 32 {
            _mm512_loadu_si512(r.add(32 * s) as *const __m512i)
        } else {
            _mm512_maskz_loadu_epi16(
                ((1u64 << rem) - 1) as __mmask32,
                r.add(32 * s) as *const i16,
            )
        };
        std::mem::transmute::<__m512i, __m512bh>(v)
    };
    // The weight rows whole tiles ahead, into L2, as the f32 row products do: a tile's four
    // short streams escape the hardware prefetcher.
    let ahead = crate::ops::rowdot::prefetch_ahead(4 * k, 2);
    for s in 0..k.div_ceil(32) {
        for j in 0..4 {
            _mm_prefetch::<_MM_HINT_T2>(w.wrapping_add(ahead + j * k + 32 * s) as *const i8);
        }
        let mut wv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); 4];
        for (j, v) in wv.iter_mut().enumerate().take(nc) {
            *v = load(w.add(j * k), s);
        }
        for (i, row) in acc.iter_mut().enumerate().take(mr) {
            let xv = load(x.add(i * k), s);
            for (r, &wvj) in row.iter_mut().zip(&wv).take(nc) {
                *r = _mm512_dpbf16_ps(*r, xv, wvj);
            }
        }
    }
    let mut out = [[0f32; 4]; 4];
    for i in 0..mr {
        for j in 0..nc {
            out[i][j] = reduce_lanes(acc[i][j]);
        }
    }
    out
}

/// `emulate::sum_lanes` in registers, the same tree (so the same bits): lanes l + l+8 (the two
/// 256-bit halves), l + l+4 (the 128-bit halves), l + l+2, then l0 + l1. Stored and summed
/// one lane at a time it was a tenth of a bf16 decoding profile.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn reduce_lanes(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let h8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
    let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    let h1 = _mm_add_ss(h2, _mm_shuffle_ps::<0b01>(h2, h2));
    _mm_cvtss_f32(h1)
}

#[cfg(test)]
mod tests {
    /// The in-register reduction gives `sum_lanes`'s bits, on values whose sums round
    /// differently in other orders (mixed magnitudes and signs).
    #[test]
    fn reduce_lanes_is_sum_lanes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut seed = 7u64;
        for case in 0..2000 {
            let lanes: [f32; 16] = std::array::from_fn(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * 10f32.powi(((seed >> 20) % 9) as i32 - 4)
            });
            // SAFETY: avx512f was detected above; the lanes are 16 floats.
            let got =
                unsafe { super::reduce_lanes(std::arch::x86_64::_mm512_loadu_ps(lanes.as_ptr())) };
            let want = super::super::emulate::sum_lanes(lanes);
            assert_eq!(got.to_bits(), want.to_bits(), "case {case}: {lanes:?}");
        }
    }
}
