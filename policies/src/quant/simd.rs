//! AVX2 kernels for packed 4-bit codes: the 16-entry code book is looked up in registers (two
//! 8-lane permutes and a blend on the index's bit 3), each value `code[q] · absmax` as the
//! scalar loop computes it, bit for bit.

use std::arch::x86_64::*;

/// Whether this CPU runs [`dequantize_pairs`] (detected once, at run time).
pub fn available() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2"))
}

/// Whether this CPU runs [`dot_rows`].
pub fn dot_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The code book values of 8 indices (each lane 0..16).
#[inline(always)]
unsafe fn lookup(tab0: __m256, tab1: __m256, idx: __m256i) -> __m256 {
    let a = _mm256_permutevar8x32_ps(tab0, idx);
    let b = _mm256_permutevar8x32_ps(tab1, idx);
    // Bit 3 of the index to the sign bit: the blend takes the upper table there.
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
}

/// 8 packed bytes (16 codes) → the values of the high nibbles (even positions) and of the
/// low nibbles (odd positions), times `av`.
#[inline(always)]
unsafe fn dequantize16(tab0: __m256, tab1: __m256, av: __m256, p: *const u8) -> (__m256, __m256) {
    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
    let hi = lookup(tab0, tab1, _mm256_srli_epi32(v, 4));
    let lo = lookup(tab0, tab1, _mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    (_mm256_mul_ps(hi, av), _mm256_mul_ps(lo, av))
}

/// `dst[2i] = code[bytes[i] >> 4] · a`, `dst[2i + 1] = code[bytes[i] & 15] · a`, with `a`
/// the absmax of the block of byte `first + i` (`absmax[(first + i) / 32]`: 64 values, 32
/// bytes a block). `dst.len() == 2 · bytes.len()`.
///
/// # Safety
/// The CPU has AVX2; `absmax` covers every block the bytes fall in.
#[target_feature(enable = "avx2")]
pub unsafe fn dequantize_pairs(
    code: &[f32; 16],
    bytes: &[u8],
    first: usize,
    absmax: &[f32],
    dst: &mut [f32],
) {
    assert_eq!(dst.len(), 2 * bytes.len());
    let tab0 = _mm256_loadu_ps(code.as_ptr());
    let tab1 = _mm256_loadu_ps(code.as_ptr().add(8));
    let mut i = 0;
    while i < bytes.len() {
        // The run of bytes in this byte's block.
        let g = first + i;
        let run_end = (i + (32 - g % 32)).min(bytes.len());
        let a = absmax[g / 32];
        let av = _mm256_set1_ps(a);
        while i + 8 <= run_end {
            let (hi, lo) = dequantize16(tab0, tab1, av, bytes.as_ptr().add(i));
            // Interleave back to value order: h0 l0 h1 l1 … h7 l7.
            let (u0, u1) = (_mm256_unpacklo_ps(hi, lo), _mm256_unpackhi_ps(hi, lo));
            let o = dst.as_mut_ptr().add(2 * i);
            _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));
            _mm256_storeu_ps(o.add(8), _mm256_permute2f128_ps(u0, u1, 0x31));
            i += 8;
        }
        while i < run_end {
            let b = bytes[i];
            dst[2 * i] = code[(b >> 4) as usize] * a;
            dst[2 * i + 1] = code[(b & 0xF) as usize] * a;
            i += 1;
        }
    }
}

/// The input rows for [`dot_rows`]: each 16 values reordered as the kernel's two dequantized
/// vectors hold them (the even positions, then the odd: byte `l` of a 16-value step packs
/// values `2l` and `2l + 1`). `k` is a multiple of 16.
pub fn interleave_for_dot(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * k];
    for (o, r) in out.chunks_exact_mut(16).zip(x[..m * k].chunks_exact(16)) {
        for l in 0..8 {
            o[l] = r[2 * l];
            o[8 + l] = r[2 * l + 1];
        }
    }
    out
}

/// `R` dot products of the reordered input rows `xp` (R × k, [`interleave_for_dot`]) with one
/// 4-bit weight row: `bytes` its k / 2 packed codes, `absmax` its k / 64 block scales (the row
/// starts at a block boundary). Each weight value is dequantized once, in registers, as
/// `code[q] · absmax` (the dequantized weight's own values), for all R rows.
///
/// # Safety
/// The CPU has AVX2 and FMA; `k % 64 == 0`, `xp.len() ≥ R · k`, `bytes.len() ≥ k / 2`,
/// `absmax.len() ≥ k / 64`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows<const R: usize>(
    xp: &[f32],
    k: usize,
    code: &[f32; 16],
    bytes: &[u8],
    absmax: &[f32],
) -> [f32; R] {
    debug_assert!(k % 64 == 0 && xp.len() >= R * k && bytes.len() >= k / 2);
    let tab0 = _mm256_loadu_ps(code.as_ptr());
    let tab1 = _mm256_loadu_ps(code.as_ptr().add(8));
    let mut acc = [_mm256_setzero_ps(); R];
    let px = xp.as_ptr();
    let mut p = 0;
    for (b, &a) in absmax[..k / 64].iter().enumerate() {
        let av = _mm256_set1_ps(a);
        for c in 0..4 {
            let (hi, lo) = dequantize16(tab0, tab1, av, bytes.as_ptr().add(b * 32 + c * 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xr = px.add(r * k + p);
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr), hi, *acc);
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), lo, *acc);
            }
            p += 16;
        }
    }
    let mut out = [0f32; R];
    for (o, a) in out.iter_mut().zip(acc) {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), a);
        *o = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
    out
}
