//! The operands of the packed product: activation rows rounded to bf16 in pairs along the
//! reduced dimension, and weights packed into panels of [`NR`] columns (pairs of k for
//! `x · Wᵀ`, two weight rows interleaved for `dy · W`).

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::{cpu_has_avx512_bf16, round_bf16, NR};
use rayon::prelude::*;

/// Rows `x` [m, k] (row-major) rounded to bf16 and paired along k: [rows, pairs] pairs
/// (rows ≥ m, pairs ≥ ⌈k/2⌉), the low half the even column, everything past `x` zero.
pub fn round_pairs(
    x: &[f32],
    (m, k): (usize, usize),
    (rows, pairs): (usize, usize),
    parallel: bool,
) -> Vec<u32> {
    assert!(rows >= m && pairs >= k.div_ceil(2) && x.len() >= m * k);
    let mut out = uninit(rows * pairs);
    if pairs == 0 {
        return out;
    }
    let simd = cpu_has_avx512_bf16();
    let row = |(i, o): (usize, &mut [u32])| {
        if i >= m {
            return o.fill(0);
        }
        let (mut xr, mut o) = (&x[i * k..(i + 1) * k], o);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has avx512bf16 (checked above).
            let done = unsafe { avx512::round_row(xr, o) };
            (xr, o) = (&xr[2 * done..], &mut o[done..]);
        }
        let (data, pad) = o.split_at_mut(xr.len().div_ceil(2));
        for (v, pair) in data.iter_mut().zip(xr.chunks(2)) {
            let lo = round_bf16(pair[0]) as u32;
            let hi = pair.get(1).map_or(0, |&h| round_bf16(h) as u32);
            *v = lo | hi << 16;
        }
        pad.fill(0);
    };
    if parallel && m > 1 {
        out.par_chunks_mut(pairs).enumerate().for_each(row);
    } else {
        out.chunks_mut(pairs).enumerate().for_each(row);
    }
    out
}

/// A vector of `len` values the caller writes in full before reading any.
pub(super) fn uninit<T: Copy>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: T is Copy (no drop), and every caller writes all `len` values before it reads
    // them (round_pairs: every row; the products: every output tile).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// Packs `w` rows [rb, k] (bf16 bits, row-major) for `x · wᵀ` into `out`: panel `P` of
/// output columns `64P..64P+64`, step `p`: `(w[j][2p], w[j][2p+1])` for each column `j`
/// (zeros past the edges). [⌈rb/64⌉, steps, 64] pairs (steps ≥ ⌈k/2⌉); every one is
/// written.
pub fn pack_t(w: &[u16], rb: usize, k: usize, steps: usize, out: &mut [u32], parallel: bool) {
    let kp = steps;
    assert!(steps >= k.div_ceil(2));
    let panels = rb.div_ceil(NR);
    let out = &mut out[..panels * kp * NR];
    let panel = |(pi, o): (usize, &mut [u32])| {
        let cols = NR.min(rb - pi * NR);
        for c in 0..cols {
            let row = &w[(pi * NR + c) * k..(pi * NR + c + 1) * k];
            for (p, pair) in row.chunks(2).enumerate() {
                let hi = pair.get(1).map_or(0, |&h| h as u32);
                o[p * NR + c] = pair[0] as u32 | hi << 16;
            }
        }
        for step in o.chunks_exact_mut(NR).skip(k.div_ceil(2)) {
            step[..cols].fill(0);
        }
        if cols < NR {
            for step in o.chunks_exact_mut(NR) {
                step[cols..].fill(0);
            }
        }
    };
    if kp == 0 {
        return;
    }
    if parallel {
        out.par_chunks_mut(kp * NR).enumerate().for_each(panel);
    } else {
        out.chunks_mut(kp * NR).enumerate().for_each(panel);
    }
}

/// Packs `w` rows [rb, k] for `dy · w` (the reduction runs over w's rows) into `out`: panel
/// `P` of output columns `64P..64P+64` (of k), step `q`: `(w[2q][c], w[2q+1][c])` — two
/// weight rows interleaved. [⌈k/64⌉, steps, 64] pairs (steps ≥ ⌈rb/2⌉); every one is
/// written.
pub fn pack_n(w: &[u16], rb: usize, k: usize, steps: usize, out: &mut [u32], parallel: bool) {
    let qp = steps;
    assert!(steps >= rb.div_ceil(2));
    let panels = k.div_ceil(NR);
    let out = &mut out[..panels * qp * NR];
    let panel = |(pi, o): (usize, &mut [u32])| {
        let (c0, cols) = (pi * NR, NR.min(k - pi * NR));
        for (q, step) in o.chunks_exact_mut(NR).enumerate() {
            if 2 * q >= rb {
                step.fill(0);
                continue;
            }
            let lo = &w[2 * q * k + c0..2 * q * k + c0 + cols];
            let (dst, pad) = step.split_at_mut(cols);
            if 2 * q + 1 < rb {
                let hi = &w[(2 * q + 1) * k + c0..(2 * q + 1) * k + c0 + cols];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = l as u32 | (h as u32) << 16;
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = l as u32;
                }
            }
            pad.fill(0);
        }
    };
    if qp == 0 {
        return;
    }
    if parallel {
        out.par_chunks_mut(qp * NR).enumerate().for_each(panel);
    } else {
        out.chunks_mut(qp * NR).enumerate().for_each(panel);
    }
}
