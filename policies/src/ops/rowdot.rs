//! `x · Wᵀ` for a few rows (decoding: one row per sequence) as dot products of contiguous
//! rows. gemm packs its right operand into panels on every call, and for `Wᵀ` (a row-major
//! weight read by columns) that packing is a scalar strided copy of the whole weight: half
//! of a decoding profile. With few rows (`f32_max_rows`) each weight row is read once,
//! straight from memory, against every input row: f32 weights here (AVX-512 4 × 4 and AVX2
//! 3 × 3 tiles in [`tiles`], four-row kernels, a portable loop), half-precision and coded
//! weights in [`half`].

mod half;
mod tiles;

pub use half::{rowdot_half, rowdot_widened};

use crate::ops::SendPtr;
use rayon::prelude::*;

/// Up to this many rows take the dot-product path (the half-precision and k-bit kernels;
/// f32: [`f32_max_rows`]).
pub const ROWDOT_MAX_ROWS: usize = 16;

/// The most rows [`rowdot`] takes for an f32 weight on this CPU: its tiles' bound
/// ([`tiles`]), else [`ROWDOT_MAX_ROWS`].
pub fn f32_max_rows() -> usize {
    tiles::tiles().map_or(ROWDOT_MAX_ROWS, |t| t.max_rows.max(ROWDOT_MAX_ROWS))
}

/// `out[i·n + j] = Σ_p x[i·k + p] · w[j·k + p]` for `x` [m, k], `w` [n, k], both row-major.
/// `parallel`: split the output columns across rayon's threads.
pub fn rowdot(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, parallel: bool) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let dst = SendPtr(out.as_mut_ptr());
    if let Some(t) = tiles::tiles().filter(|t| m >= t.min_rows) {
        for_each_index(n.div_ceil(t.width), parallel, |c| {
            tiles::columns(t, x, w, c * t.width, (m, n, k), dst)
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

/// How far ahead the tiles prefetch weight rows (into L2), in bytes: a
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
        let mut s = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
        for q in p..k {
            s += *px[r].add(q) * *pw.add(q);
        }
        out[r] = s;
    }
    out
}

/// The sum of eight lanes, pairwise: the last step of the four-row AVX2 kernels here and
/// in [`half`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v);
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
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
    let mut s = hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
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
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (8, 33, 40),
            (16, 70, 257),
            (7, 10, 23),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            // Every product of x with w's rows, against the f64 sums.
            let check = |out: &[f32], what: &str| {
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                            .sum();
                        assert!(
                            (out[i * n + j] as f64 - want).abs() < 1e-5,
                            "{what} {m}x{n}x{k} [{i},{j}]"
                        );
                    }
                }
            };
            for parallel in [false, true] {
                check(&rowdot(&x, &w, m, n, k, parallel), "rowdot");
            }
            // AVX2's tiles on their own at every row count (rowdot takes them from 17 rows,
            // and not where the CPU has AVX-512).
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                let t = tiles::AVX2;
                let mut out = vec![f32::NAN; m * n];
                let dst = SendPtr(out.as_mut_ptr());
                for c in 0..n.div_ceil(t.width) {
                    tiles::columns(t, &x, &w, c * t.width, (m, n, k), dst);
                }
                check(&out, "AVX2 tiles");
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
