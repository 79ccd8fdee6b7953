//! [`super::rowdot`]'s f32 tiles: a tile of input rows × weight rows is a grid of dot
//! products, each with one vector accumulator, so every weight vector is loaded once for the
//! tile's input rows and every input vector once for its weight rows. AVX-512: 4 × 4 tiles of
//! 16-lane vectors (16 accumulators of its 32 registers); AVX2: 3 × 3 tiles of 8-lane vectors
//! (9 accumulators, 3 weight vectors and an input vector of its 16 registers).

use super::{column, prefetch_ahead};
use crate::ops::SendPtr;

/// `out[r·width + c] = Σ_p x[r·k + p] · w[c·k + p]` for r < the kernel's rows, c < width.
type TileFn = unsafe fn(x: &[f32], w: &[f32], k: usize, out: &mut [f32]);

/// A CPU's tile kernels: `full` multiplies `rows` input rows, `one` a single one, both
/// against `width` weight rows; products of `min_rows` to `max_rows` rows take them.
#[derive(Clone, Copy)]
pub(super) struct Tiles {
    pub(super) width: usize,
    pub(super) min_rows: usize,
    pub(super) max_rows: usize,
    rows: usize,
    full: TileFn,
    one: TileFn,
}

/// The tiles this CPU runs: AVX-512F's, else AVX2 + FMA's, else none.
pub(super) fn tiles() -> Option<Tiles> {
    match crate::ops::simd_level() {
        #[cfg(target_arch = "x86_64")]
        crate::ops::SimdLevel::Avx512 => Some(AVX512),
        #[cfg(target_arch = "x86_64")]
        crate::ops::SimdLevel::Avx2 => Some(AVX2),
        _ => None,
    }
}

/// Against gemm (which packs the weight on every call), on Zen 4 with SmolLM2's 576 × 576
/// weights from DRAM, 32 rows took 255 µs against 745, 64 rows 447 against 937, 128 rows the
/// same time; so decoding batches up to 64 rows (GRPO's 32 completions) read each weight once.
#[cfg(target_arch = "x86_64")]
const AVX512: Tiles = Tiles {
    width: 4,
    min_rows: 1,
    max_rows: 64,
    rows: 4,
    full: tile4x4_avx512::<4>,
    one: tile4x4_avx512::<1>,
};

/// AVX2 + FMA's tiles (the tests run them on AVX-512 hosts too). Against gemm on an
/// AVX2-only Zen 3, SmolLM2's weights from DRAM, 32 rows: 576 × 576 324 µs against 563,
/// 1536 × 576 742 against 1,273, 576 × 1536 1,380 against 1,156 and 953 against 1,457 in two
/// runs, 192 × 576 222 against 270; at 48 and 64 rows gemm was ahead on the 1536-wide input.
/// Up to 16 rows the four-row kernels stay: at 8 rows the tiles took 0.82–1.17× their time
/// on those weights, no clear gain.
#[cfg(target_arch = "x86_64")]
pub(super) const AVX2: Tiles = Tiles {
    width: 3,
    min_rows: super::ROWDOT_MAX_ROWS + 1,
    max_rows: 32,
    rows: 3,
    full: tile3x3_avx2::<3>,
    one: tile3x3_avx2::<1>,
};

/// Output columns `j0..j0+width` (fewer at the end) for every row of `x`: full tiles of
/// input rows, then the rows left over one at a time against the same weight rows. Fewer
/// than `width` weight rows at the end go through [`column()`].
pub(super) fn columns(
    t: Tiles,
    x: &[f32],
    w: &[f32],
    j0: usize,
    (m, n, k): (usize, usize, usize),
    dst: SendPtr<f32>,
) {
    if n - j0 < t.width {
        for j in j0..n {
            column(x, &w[j * k..(j + 1) * k], j, (m, n, k), dst);
        }
        return;
    }
    let wt = &w[j0 * k..(j0 + t.width) * k];
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < m {
        let (rows, kernel) = if i + t.rows <= m {
            (t.rows, t.full)
        } else {
            (1, t.one)
        };
        // SAFETY: `tiles` offers only kernels whose CPU features were detected (and the
        // tests call AVX2's only where it is); rows i..i+rows are in x, wt holds `width`
        // weight rows, out holds rows × width ≤ 16 values.
        unsafe { kernel(&x[i * k..(i + rows) * k], wt, k, &mut out) };
        for r in 0..rows {
            for c in 0..t.width {
                // SAFETY: i + r < m and j0 + c < n, so the index is inside the m·n
                // allocation; each (i, j) is written once, by the task owning these columns.
                unsafe {
                    dst.get()
                        .add((i + r) * n + j0 + c)
                        .write(out[r * t.width + c])
                };
            }
        }
        i += rows;
    }
}

/// `R` input rows of `x` (R × k) against four weight rows of `w` (4 × k) with one 16-lane
/// accumulator each (the k tail by masked loads, zeros beyond k). Each sum: lanes
/// accumulated over k in steps of 16, then the lanes added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile4x4_avx512<const R: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const C: usize = 4;
    assert!(x.len() >= R * k && w.len() >= C * k && out.len() >= R * C);
    let pw: [*const f32; C] = std::array::from_fn(|c| w.as_ptr().add(c * k));
    let px: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add(r * k));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut p = 0;
    let ahead = pw.map(|q| q.wrapping_add(prefetch_ahead(C * k, 4)));
    while p + 16 <= k {
        for q in ahead {
            _mm_prefetch::<_MM_HINT_T2>(q.wrapping_add(p) as *const i8);
        }
        let wv = pw.map(|q| _mm512_loadu_ps(q.add(p)));
        for r in 0..R {
            let xv = _mm512_loadu_ps(px[r].add(p));
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        p += 16;
    }
    if p < k {
        let mask: __mmask16 = ((1u32 << (k - p)) - 1) as u16;
        let wv = pw.map(|q| _mm512_maskz_loadu_ps(mask, q.add(p)));
        for r in 0..R {
            let xv = _mm512_maskz_loadu_ps(mask, px[r].add(p));
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r * C + c] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
}

/// As [`tile4x4_avx512`] with three weight rows and 8-lane vectors; the weight rows are
/// prefetched a cache line (16 values) at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile3x3_avx2<const R: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const C: usize = 3;
    assert!(x.len() >= R * k && w.len() >= C * k && out.len() >= R * C);
    let pw: [*const f32; C] = std::array::from_fn(|c| w.as_ptr().add(c * k));
    let px: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add(r * k));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let ahead = pw.map(|q| q.wrapping_add(prefetch_ahead(C * k, 4)));
    // One step of 8 values of k for every accumulator, loading with `$load`.
    macro_rules! step {
        ($p:expr, $load:expr) => {{
            let wv = pw.map(|q| $load(q.add($p)));
            for r in 0..R {
                let xv = $load(px[r].add($p));
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                }
            }
        }};
    }
    let mut p = 0;
    while p + 16 <= k {
        for q in ahead {
            _mm_prefetch::<_MM_HINT_T2>(q.wrapping_add(p) as *const i8);
        }
        step!(p, _mm256_loadu_ps);
        step!(p + 8, _mm256_loadu_ps);
        p += 16;
    }
    if p + 8 <= k {
        step!(p, _mm256_loadu_ps);
        p += 8;
    }
    if p < k {
        // Lanes below k - p on (all bits set), the rest off: maskload reads zeros there.
        const ON_OFF: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        let mask = _mm256_loadu_si256(ON_OFF.as_ptr().add(8 - (k - p)) as *const __m256i);
        step!(p, |q| _mm256_maskload_ps(q, mask));
    }
    for r in 0..R {
        for c in 0..C {
            out[r * C + c] = hsum_avx(acc[r][c]);
        }
    }
}

/// The sum of a vector's eight lanes, by shuffles. Not [`super::hsum256`] (the four-row
/// kernels' stored-lanes tree): summed in that order the tiles round differently, and the
/// two-rank reward-model/DPO parity test in `tests/distributed.rs` moved past its bound
/// (relative 2.5e-4 against 1e-4), so the tiles keep the order they were measured with.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn hsum_avx(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}
