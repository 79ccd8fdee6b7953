//! `x · Wᵀ` for a few rows (decoding: one row per sequence) as dot products of contiguous
//! rows. gemm packs its right operand into panels on every call, and for `Wᵀ` (a row-major
//! weight read by columns) that packing is a scalar strided copy of the whole weight: half
//! of a decoding profile. With few rows (`f32_max_rows`) each weight row is read once,
//! straight from memory, against every input row: f32 weights here (AVX-512 4 × 4 tiles,
//! AVX2 four-row kernels, a portable loop), half-precision and coded weights in [`half`].

mod half;

pub use half::{rowdot_half, rowdot_widened};

use crate::ops::SendPtr;
use rayon::prelude::*;

/// Up to this many rows take the dot-product path (the half-precision and k-bit kernels;
/// f32: [`f32_max_rows`]).
pub const ROWDOT_MAX_ROWS: usize = 16;

/// Up to this many rows an f32 product takes [`rowdot`] with AVX-512's 4 × 4 tiles: against
/// gemm (which packs the weight on every call), on Zen 4 with SmolLM2's 576 × 576 weights
/// from DRAM, 32 rows took 255 µs against 745, 64 rows 447 against 937, 128 rows the same
/// time; so decoding batches up to 64 rows (GRPO's 32 completions) read each weight once.
const TILE_MAX_ROWS: usize = 64;

/// The most rows [`rowdot`] takes for an f32 weight on this CPU.
pub fn f32_max_rows() -> usize {
    if has_tiles() {
        TILE_MAX_ROWS
    } else {
        ROWDOT_MAX_ROWS
    }
}

/// Whether this CPU runs [`tile4x4_avx512`] (AVX-512F).
fn has_tiles() -> bool {
    crate::ops::simd_level() == crate::ops::SimdLevel::Avx512
}

/// `out[i·n + j] = Σ_p x[i·k + p] · w[j·k + p]` for `x` [m, k], `w` [n, k], both row-major.
/// `parallel`: split the output columns across rayon's threads.
pub fn rowdot(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, parallel: bool) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let dst = SendPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if has_tiles() {
        // Tiles of TILE weight rows: each input vector loaded once for all of them.
        for_each_index(n.div_ceil(TILE), parallel, |t| {
            tile_columns(x, w, t * TILE, (m, n, k), dst)
        });
        // SAFETY: every one of the m·n elements was written above (each task its columns).
        unsafe { out.set_len(m * n) };
        return out;
    }
    for_each_index(n, parallel, |j| {
        column(x, &w[j * k..(j + 1) * k], j, (m, n, k), dst)
    });
    // SAFETY: every one of the m·n elements was written above.
    unsafe { out.set_len(m * n) };
    out
}

/// `f(0..count)`, split across rayon's threads when `parallel`.
fn for_each_index(count: usize, parallel: bool, f: impl Fn(usize) + Send + Sync) {
    if parallel {
        (0..count).into_par_iter().for_each(f);
    } else {
        (0..count).for_each(f);
    }
}

/// Output column `j` for every row of `x`: one pass over weight row `wj` (k values).
fn column(x: &[f32], wj: &[f32], j: usize, (m, n, k): (usize, usize, usize), dst: SendPtr<f32>) {
    let put = |i: usize, v: f32| {
        // SAFETY: i < m and j < n, so i·n + j is inside the m·n allocation; each (i, j)
        // is written exactly once, by the one task that owns column j.
        unsafe { dst.get().add(i * n + j).write(v) }
    };
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let kernel = dot4_kernel();
        while let Some(f) = kernel.filter(|_| i + 4 <= m) {
            // SAFETY: the kernel's CPU features were detected; rows i..i+4 are in x.
            let d = unsafe { f(&x[i * k..(i + 4) * k], wj, k) };
            for (r, v) in d.into_iter().enumerate() {
                put(i + r, v);
            }
            i += 4;
        }
    }
    for r in i..m {
        put(r, dot(&x[r * k..(r + 1) * k], wj));
    }
}

/// Weight rows per tile of [`tile4x4_avx512`].
const TILE: usize = 4;

/// How far ahead [`tile4x4_avx512`] prefetches weight rows (into L2), in bytes: a
/// tile's four interleaved 1-4 KB streams are too short for the hardware prefetcher, and
/// without it the kernel read DRAM-resident weights at 6.5 GB/s against 16 GB/s with it
/// (Zen 4, k = 256).
const PREFETCH_BYTES: usize = 32 << 10;

/// How many elements ahead a kernel walking tiles of `tile` elements of `elem_bytes` each
/// prefetches: [`PREFETCH_BYTES`] rounded up to whole tiles, so each tile's rows are
/// fetched once, by the tile that many before it.
pub(crate) fn prefetch_ahead(tile: usize, elem_bytes: usize) -> usize {
    (PREFETCH_BYTES / elem_bytes).div_ceil(tile.max(1)) * tile
}

/// Output columns `j0..j0+TILE` (fewer at the end) for every row of `x`: 4 × 4 tiles of
/// (input rows × weight rows), then the rows left over one at a time against the same tile.
/// A weight row of fewer than TILE at the end goes through [`column`].
#[cfg(target_arch = "x86_64")]
fn tile_columns(
    x: &[f32],
    w: &[f32],
    j0: usize,
    (m, n, k): (usize, usize, usize),
    dst: SendPtr<f32>,
) {
    if n - j0 < TILE {
        for j in j0..n {
            column(x, &w[j * k..(j + 1) * k], j, (m, n, k), dst);
        }
        return;
    }
    let wt = &w[j0 * k..(j0 + TILE) * k];
    // SAFETY (the writes): i < m, j0 + c < n; each (i, j) is written once, by this task.
    let put = |i: usize, c: usize, v: f32| unsafe { dst.get().add(i * n + j0 + c).write(v) };
    let mut i = 0;
    while i + 4 <= m {
        // SAFETY: AVX-512F was detected (rowdot); rows i..i+4 are in x, wt holds TILE rows.
        let d = unsafe { tile4x4_avx512::<4>(&x[i * k..(i + 4) * k], wt, k) };
        for (r, vals) in d.into_iter().enumerate() {
            for (c, v) in vals.into_iter().enumerate() {
                put(i + r, c, v);
            }
        }
        i += 4;
    }
    while i < m {
        // SAFETY: as above, one input row.
        let d = unsafe { tile4x4_avx512::<1>(&x[i * k..(i + 1) * k], wt, k) };
        for (c, v) in d[0].into_iter().enumerate() {
            put(i, c, v);
        }
        i += 1;
    }
}

/// `R` input rows of `x` (R × k) against four weight rows of `w` (4 × k): R × 4 dot products
/// with one 16-lane accumulator each, every weight vector loaded once for the R rows and
/// every input vector once for the four weight rows (the k tail by masked loads, zeros
/// beyond k). Each sum: lanes accumulated over k in steps of 16, then the lanes added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile4x4_avx512<const R: usize>(x: &[f32], w: &[f32], k: usize) -> [[f32; TILE]; R] {
    use std::arch::x86_64::*;
    assert!(x.len() >= R * k && w.len() >= TILE * k);
    let pw: [*const f32; TILE] = std::array::from_fn(|c| w.as_ptr().add(c * k));
    let px: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add(r * k));
    let mut acc = [[_mm512_setzero_ps(); TILE]; R];
    let mut p = 0;
    let ahead = pw.map(|q| q.wrapping_add(prefetch_ahead(TILE * k, 4)));
    while p + 16 <= k {
        for q in ahead {
            _mm_prefetch::<_MM_HINT_T2>(q.wrapping_add(p) as *const i8);
        }
        let wv = [0, 1, 2, 3].map(|c| _mm512_loadu_ps(pw[c].add(p)));
        for r in 0..R {
            let xv = _mm512_loadu_ps(px[r].add(p));
            for c in 0..TILE {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        p += 16;
    }
    if p < k {
        let mask: __mmask16 = ((1u32 << (k - p)) - 1) as u16;
        let wv = [0, 1, 2, 3].map(|c| _mm512_maskz_loadu_ps(mask, pw[c].add(p)));
        for r in 0..R {
            let xv = _mm512_maskz_loadu_ps(mask, px[r].add(p));
            for c in 0..TILE {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    let mut out = [[0f32; TILE]; R];
    for r in 0..R {
        for c in 0..TILE {
            out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
    out
}

type Dot4 = unsafe fn(&[f32], &[f32], usize) -> [f32; 4];

/// The widest four-row kernel this CPU runs: AVX-512, else AVX2+FMA, else none.
#[cfg(target_arch = "x86_64")]
fn dot4_kernel() -> Option<Dot4> {
    if std::arch::is_x86_feature_detected!("avx512f") {
        Some(dot4_avx512)
    } else if has_avx2_fma() {
        Some(dot4_avx2)
    } else {
        None
    }
}

/// As [`dot4_avx2`] with 16-lane registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(x4: &[f32], w: &[f32], k: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    assert!(x4.len() >= 4 * k && w.len() >= k);
    let pw = w.as_ptr();
    let px = [0, 1, 2, 3].map(|r| x4.as_ptr().add(r * k));
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let mut p = 0;
    while p + 32 <= k {
        let (w0, w1) = (_mm512_loadu_ps(pw.add(p)), _mm512_loadu_ps(pw.add(p + 16)));
        for r in 0..4 {
            acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(px[r].add(p)), w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(px[r].add(p + 16)), w1, acc[r][1]);
        }
        p += 32;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        for q in p..k {
            s += *px[r].add(q) * *pw.add(q);
        }
        out[r] = s;
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Dot products of four consecutive rows of `x4` (4 × k) with `w` (k): two accumulators per
/// row, so eight FMA chains are in flight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(x4: &[f32], w: &[f32], k: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    assert!(x4.len() >= 4 * k && w.len() >= k);
    let pw = w.as_ptr();
    let px = [0, 1, 2, 3].map(|r| x4.as_ptr().add(r * k));
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut p = 0;
    while p + 16 <= k {
        let (w0, w1) = (_mm256_loadu_ps(pw.add(p)), _mm256_loadu_ps(pw.add(p + 8)));
        for r in 0..4 {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(px[r].add(p)), w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(px[r].add(p + 8)), w1, acc[r][1]);
        }
        p += 16;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let v = _mm256_add_ps(acc[r][0], acc[r][1]);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        let mut s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for q in p..k {
            s += *px[r].add(q) * *pw.add(q);
        }
        out[r] = s;
    }
    out
}

/// Four independent partial sums so the compiler can keep several multiply-adds in flight.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            s[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (l, acc_l) in acc.iter_mut().enumerate() {
            let o = i + 8 * l;
            *acc_l = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(o)),
                _mm256_loadu_ps(pb.add(o)),
                *acc_l,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
    let mut s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::half::HALF_BLOCK_ROWS;
    use super::*;

    /// Against an f64 reference, for lengths around the vector widths and both paths.
    #[test]
    fn rowdot_matches_an_f64_reference() {
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (8, 33, 40), (16, 70, 257)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            for parallel in [false, true] {
                let out = rowdot(&x, &w, m, n, k, parallel);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                            .sum();
                        assert!(
                            (out[i * n + j] as f64 - want).abs() < 1e-5,
                            "{m}x{n}x{k} [{i},{j}]"
                        );
                    }
                }
            }
            // Each kernel on its own, whichever the CPU picked above.
            #[cfg(target_arch = "x86_64")]
            if m >= 4 {
                let want: Vec<f64> = (0..4)
                    .map(|r| (0..k).map(|p| x[r * k + p] as f64 * w[p] as f64).sum())
                    .collect();
                let mut kernels: Vec<Dot4> = Vec::new();
                if has_avx2_fma() {
                    kernels.push(dot4_avx2);
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    kernels.push(dot4_avx512);
                }
                for f in kernels {
                    // SAFETY: only kernels whose features were detected are called.
                    let got = unsafe { f(&x[..4 * k], &w[..k], k) };
                    for r in 0..4 {
                        assert!((got[r] as f64 - want[r]).abs() < 1e-5);
                    }
                }
            }
            // The half-precision paths (fused kernels where the CPU has them, and the
            // portable widening one) against the same reference on the rounded weights.
            for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
                let wt = candle_core::Tensor::from_slice(&w, (n, k), &candle_core::Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let wr: Vec<f32> = wt
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let (s, _) = wt.storage_and_layout();
                let rows = match &*s {
                    candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                        super::super::half_weight::HalfRows::Bf16(v)
                    }
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => {
                        super::super::half_weight::HalfRows::F16(v)
                    }
                    _ => unreachable!(),
                };
                for parallel in [false, true] {
                    for out in [
                        rowdot_half(&x, rows, m, n, k, parallel),
                        rowdot_widened(&x, &rows, HALF_BLOCK_ROWS, (m, n, k), parallel),
                    ] {
                        for i in 0..m {
                            for j in 0..n {
                                let want: f64 = (0..k)
                                    .map(|p| x[i * k + p] as f64 * wr[j * k + p] as f64)
                                    .sum();
                                assert!(
                                    (out[i * n + j] as f64 - want).abs() < 1e-5,
                                    "{dtype:?} {m}x{n}x{k} [{i},{j}]"
                                );
                            }
                        }
                    }
                }
            }
            // The portable fallback agrees too.
            let want: f64 = (0..k).map(|p| x[p] as f64 * w[p] as f64).sum();
            assert!((dot_portable(&x[..k], &w[..k]) as f64 - want).abs() < 1e-5);
        }
    }
}
