//! AVX2 dequantization of packed 4-bit codes: 8 bytes (16 values) per step, the 16-entry
//! code book looked up in registers (two 8-lane permutes and a blend on the index's bit 3),
//! each value `code[q] · absmax` as the scalar loop computes it, bit for bit.

use std::arch::x86_64::*;

/// Whether this CPU runs [`dequantize_pairs`] (detected once, at run time).
pub fn available() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2"))
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
    let low4 = _mm256_set1_epi32(0xF);
    let lookup = |idx: __m256i| {
        let a = _mm256_permutevar8x32_ps(tab0, idx);
        let b = _mm256_permutevar8x32_ps(tab1, idx);
        // Bit 3 of the index to the sign bit: the blend takes the upper table there.
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
    };
    let mut i = 0;
    while i < bytes.len() {
        // The run of bytes in this byte's block.
        let g = first + i;
        let run_end = (i + (32 - g % 32)).min(bytes.len());
        let a = absmax[g / 32];
        let av = _mm256_set1_ps(a);
        while i + 8 <= run_end {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr().add(i) as *const __m128i));
            let hi = lookup(_mm256_srli_epi32(v, 4));
            let lo = lookup(_mm256_and_si256(v, low4));
            let (u0, u1) = (_mm256_unpacklo_ps(hi, lo), _mm256_unpackhi_ps(hi, lo));
            let o = dst.as_mut_ptr().add(2 * i);
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_permute2f128_ps(u0, u1, 0x20), av));
            _mm256_storeu_ps(
                o.add(8),
                _mm256_mul_ps(_mm256_permute2f128_ps(u0, u1, 0x31), av),
            );
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
