//! The fused attention's tile loops: the forward with its online softmax, the backward
//! from the saved log-sum-exp (see the module above for the recurrences).

use super::{AttentionMask, Tiles};
use rayon::prelude::*;

/// The float types the kernel runs in.
pub(super) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn of(x: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn of(x: f64) -> Self {
        x
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// `dst (m × n, rows dst_rs apart) = [dst +] alpha · a · b` on one thread; `a` and `b` as
/// (pointer, column stride, row stride).
///
/// # Safety
/// Every element the strides address must be readable (a, b) or writable (dst).
#[allow(clippy::too_many_arguments)]
unsafe fn tile_gemm<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    (a, a_cs, a_rs): (*const T, isize, isize),
    (b, b_cs, b_rs): (*const T, isize, isize),
    alpha: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j) = T::ZERO;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        if accumulate { T::ONE } else { T::ZERO },
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A task's (row, head, first index, two results): the forward's output rows and
/// log-sum-exps, or a key tile's dK and dV.
type TilePair<T> = (usize, usize, usize, Vec<T>, Vec<T>);

/// Shapes of one call: q `[b, h, t, d]`, k and v `[b, kv, s, d]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) kv: usize,
    pub(super) t: usize,
    pub(super) s: usize,
    pub(super) d: usize,
}

impl Dims {
    fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.h + h) * self.t + i) * self.d
    }
    fn k_row(&self, b: usize, g: usize, j: usize) -> usize {
        ((b * self.kv + g) * self.s + j) * self.d
    }
    /// The output is `[b, t, h, d]`.
    fn o_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.t + i) * self.h + h) * self.d
    }
    fn lse(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.h + h) * self.t + i
    }
}

/// The scores of query tile `[q0, q0 + nq)` of head `hh` against key tile `[k0, k0 + nk)`,
/// scaled and masked (−∞), into `sc` (nq × nk).
#[allow(clippy::too_many_arguments)]
fn tile_scores<T: Real>(
    dims: &Dims,
    mask: &AttentionMask,
    (q, k): (&[T], &[T]),
    (bi, hh, g): (usize, usize, usize),
    (q0, nq): (usize, usize),
    (k0, nk): (usize, usize),
    scale: T,
    sc: &mut [T],
) {
    let d = dims.d;
    // SAFETY: q rows q0..q0+nq of (bi, hh) and k rows k0..k0+nk of (bi, g) are in bounds
    // (row-major, d apart); sc holds nq·nk.
    unsafe {
        tile_gemm(
            sc.as_mut_ptr(),
            nk,
            false,
            (nq, nk, d),
            (q.as_ptr().add(dims.q_row(bi, hh, q0)), 1, d as isize),
            (k.as_ptr().add(dims.k_row(bi, g, k0)), d as isize, 1),
            scale,
        );
    }
    for i in 0..nq {
        for j in 0..nk {
            if !mask.visible(bi, q0 + i, k0 + j) {
                sc[i * nk + j] = T::NEG_INF;
            }
        }
    }
}

/// The last key index query tile `[q0, q0 + nq)` may see, plus one.
fn key_end(mask: &AttentionMask, q0: usize, nq: usize) -> usize {
    (mask.offset + q0 + nq).min(mask.keys)
}

/// Forward: the output `[b, t, h, d]` and the log-sum-exp `[b, h, t]`.
pub(super) fn forward<T: Real>(
    dims: Dims,
    mask: &AttentionMask,
    (q, k, v): (&[T], &[T], &[T]),
    scale: f64,
    tiles: Tiles,
) -> (Vec<T>, Vec<T>) {
    let Dims { b, h, kv, t, d, .. } = dims;
    let rep = h / kv;
    let scale = T::of(scale);
    let q_tiles = t.div_ceil(tiles.queries);
    let mut out = vec![T::ZERO; b * t * h * d];
    let mut lse = vec![T::ZERO; b * h * t];
    let jobs: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).flat_map(move |hh| (0..q_tiles).map(move |qt| (bi, hh, qt))))
        .collect();
    let results: Vec<TilePair<T>> = jobs
        .par_iter()
        .map(|&(bi, hh, qt)| {
            let g = hh / rep;
            let q0 = qt * tiles.queries;
            let nq = tiles.queries.min(t - q0);
            let mut m = vec![T::NEG_INF; nq];
            let mut l = vec![T::ZERO; nq];
            let mut acc = vec![T::ZERO; nq * d];
            let mut sc = vec![T::ZERO; nq * tiles.keys];
            let end = key_end(mask, q0, nq);
            let mut k0 = 0;
            while k0 < end {
                let nk = tiles.keys.min(end - k0);
                tile_scores(
                    &dims,
                    mask,
                    (q, k),
                    (bi, hh, g),
                    (q0, nq),
                    (k0, nk),
                    scale,
                    &mut sc,
                );
                for i in 0..nq {
                    let row = &mut sc[i * nk..(i + 1) * nk];
                    let mut mx = m[i];
                    for &x in row.iter() {
                        if x > mx {
                            mx = x;
                        }
                    }
                    if mx == T::NEG_INF {
                        // Nothing visible yet in this row (its own key comes later).
                        row.iter_mut().for_each(|x| *x = T::ZERO);
                        continue;
                    }
                    let alpha = (m[i] - mx).exp();
                    let mut sum = T::ZERO;
                    for x in row.iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                    l[i] = l[i] * alpha + sum;
                    acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= alpha);
                    m[i] = mx;
                }
                // acc += P · V_tile
                // SAFETY: sc holds nq·nk, v rows k0..k0+nk of (bi, g), acc nq·d.
                unsafe {
                    tile_gemm(
                        acc.as_mut_ptr(),
                        d,
                        true,
                        (nq, d, nk),
                        (sc.as_ptr(), 1, nk as isize),
                        (v.as_ptr().add(dims.k_row(bi, g, k0)), 1, d as isize),
                        T::ONE,
                    );
                }
                k0 += nk;
            }
            for i in 0..nq {
                let inv = T::ONE / l[i];
                acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= inv);
                m[i] += l[i].ln();
            }
            (bi, hh, q0, acc, m)
        })
        .collect();
    for (bi, hh, q0, acc, m) in results {
        for (i, (row, lse_i)) in acc.chunks(d).zip(m).enumerate() {
            let o = dims.o_row(bi, hh, q0 + i);
            out[o..o + d].copy_from_slice(row);
            lse[dims.lse(bi, hh, q0 + i)] = lse_i;
        }
    }
    (out, lse)
}

/// One tile's `P = exp(S − L)` and `dS = P ∘ (dP − D)` with `dP = dO Vᵀ`: returns (P, dS),
/// each nq × nk. `o_grad` is dO laid out `[b, t, h, d]`.
#[allow(clippy::too_many_arguments)]
fn tile_probs_and_grads<T: Real>(
    dims: &Dims,
    mask: &AttentionMask,
    (q, k, v, o_grad): (&[T], &[T], &[T], &[T]),
    (lse, delta): (&[T], &[T]),
    (bi, hh, g): (usize, usize, usize),
    (q0, nq): (usize, usize),
    (k0, nk): (usize, usize),
    scale: T,
    (p, ds): (&mut [T], &mut [T]),
) {
    let d = dims.d;
    tile_scores(
        dims,
        mask,
        (q, k),
        (bi, hh, g),
        (q0, nq),
        (k0, nk),
        scale,
        p,
    );
    for i in 0..nq {
        let li = lse[dims.lse(bi, hh, q0 + i)];
        for x in p[i * nk..(i + 1) * nk].iter_mut() {
            *x = if *x == T::NEG_INF {
                T::ZERO
            } else {
                (*x - li).exp()
            };
        }
    }
    // dP = dO · V_tileᵀ; dO rows are h·d apart in [b, t, h, d].
    // SAFETY: dO rows q0..q0+nq of (bi, ·, hh), v rows k0..k0+nk of (bi, g); ds nq·nk.
    unsafe {
        tile_gemm(
            ds.as_mut_ptr(),
            nk,
            false,
            (nq, nk, d),
            (
                o_grad.as_ptr().add(dims.o_row(bi, hh, q0)),
                1,
                (dims.h * d) as isize,
            ),
            (v.as_ptr().add(dims.k_row(bi, g, k0)), d as isize, 1),
            T::ONE,
        );
    }
    for i in 0..nq {
        let di = delta[dims.lse(bi, hh, q0 + i)];
        for j in 0..nk {
            let idx = i * nk + j;
            ds[idx] = p[idx] * (ds[idx] - di);
        }
    }
}

/// Backward: (dq `[b, h, t, d]`, dk and dv `[b, kv, s, d]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Real>(
    dims: Dims,
    mask: &AttentionMask,
    (q, k, v): (&[T], &[T], &[T]),
    (out, o_grad, lse): (&[T], &[T], &[T]),
    scale: f64,
    tiles: Tiles,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { b, h, kv, t, s, d } = dims;
    let rep = h / kv;
    let scale_t = T::of(scale);
    // D = rowsum(dO ∘ O) per (b, h, i).
    let mut delta = vec![T::ZERO; b * h * t];
    for bi in 0..b {
        for hh in 0..h {
            for i in 0..t {
                let o = dims.o_row(bi, hh, i);
                let mut acc = T::ZERO;
                for c in 0..d {
                    acc += out[o + c] * o_grad[o + c];
                }
                delta[dims.lse(bi, hh, i)] = acc;
            }
        }
    }
    let tq = tiles.queries;
    let q_tiles = t.div_ceil(tq);
    // 1. dK and dV: a task per (row, key head, key tile), over every query tile that can
    //    see it and every query head of the group.
    let k_tiles = s.div_ceil(tiles.keys);
    let jobs: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..kv).flat_map(move |g| (0..k_tiles).map(move |kt| (bi, g, kt))))
        .collect();
    let kv_parts: Vec<TilePair<T>> = jobs
        .par_iter()
        .map(|&(bi, g, kt)| {
            let k0 = kt * tiles.keys;
            let nk = tiles.keys.min(s - k0);
            let mut dk = vec![T::ZERO; nk * d];
            let mut dv = vec![T::ZERO; nk * d];
            let mut p = vec![T::ZERO; tq * nk];
            let mut ds = vec![T::ZERO; tq * nk];
            // Query qi sees key j only if j ≤ offset + qi.
            let first_q = k0.saturating_sub(mask.offset) / tq;
            for hh in g * rep..(g + 1) * rep {
                for qt in first_q..q_tiles {
                    let q0 = qt * tq;
                    let nq = tq.min(t - q0);
                    tile_probs_and_grads(
                        &dims,
                        mask,
                        (q, k, v, o_grad),
                        (lse, &delta),
                        (bi, hh, g),
                        (q0, nq),
                        (k0, nk),
                        scale_t,
                        (&mut p[..nq * nk], &mut ds[..nq * nk]),
                    );
                    // SAFETY: p, ds nq·nk; dO and q rows q0..q0+nq; dk, dv nk·d.
                    unsafe {
                        // dV += Pᵀ dO
                        tile_gemm(
                            dv.as_mut_ptr(),
                            d,
                            true,
                            (nk, d, nq),
                            (p.as_ptr(), nk as isize, 1),
                            (
                                o_grad.as_ptr().add(dims.o_row(bi, hh, q0)),
                                1,
                                (h * d) as isize,
                            ),
                            T::ONE,
                        );
                        // dK += scale · dSᵀ Q
                        tile_gemm(
                            dk.as_mut_ptr(),
                            d,
                            true,
                            (nk, d, nq),
                            (ds.as_ptr(), nk as isize, 1),
                            (q.as_ptr().add(dims.q_row(bi, hh, q0)), 1, d as isize),
                            scale_t,
                        );
                    }
                }
            }
            (bi, g, k0, dk, dv)
        })
        .collect();
    let mut dk = vec![T::ZERO; b * kv * s * d];
    let mut dv = vec![T::ZERO; b * kv * s * d];
    for (bi, g, k0, pk, pv) in kv_parts {
        let at = dims.k_row(bi, g, k0);
        dk[at..at + pk.len()].copy_from_slice(&pk);
        dv[at..at + pv.len()].copy_from_slice(&pv);
    }
    // 2. dQ: a task per (row, head, query tile), over the key tiles it sees.
    let jobs: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).flat_map(move |hh| (0..q_tiles).map(move |qt| (bi, hh, qt))))
        .collect();
    let q_parts: Vec<(usize, usize, usize, Vec<T>)> = jobs
        .par_iter()
        .map(|&(bi, hh, qt)| {
            let g = hh / rep;
            let q0 = qt * tq;
            let nq = tq.min(t - q0);
            let mut dq = vec![T::ZERO; nq * d];
            let mut p = vec![T::ZERO; nq * tiles.keys];
            let mut ds = vec![T::ZERO; nq * tiles.keys];
            let end = key_end(mask, q0, nq);
            let mut k0 = 0;
            while k0 < end {
                let nk = tiles.keys.min(end - k0);
                tile_probs_and_grads(
                    &dims,
                    mask,
                    (q, k, v, o_grad),
                    (lse, &delta),
                    (bi, hh, g),
                    (q0, nq),
                    (k0, nk),
                    scale_t,
                    (&mut p[..nq * nk], &mut ds[..nq * nk]),
                );
                // dQ += scale · dS K_tile
                // SAFETY: ds nq·nk, k rows k0..k0+nk of (bi, g), dq nq·d.
                unsafe {
                    tile_gemm(
                        dq.as_mut_ptr(),
                        d,
                        true,
                        (nq, d, nk),
                        (ds.as_ptr(), 1, nk as isize),
                        (k.as_ptr().add(dims.k_row(bi, g, k0)), 1, d as isize),
                        scale_t,
                    );
                }
                k0 += nk;
            }
            (bi, hh, q0, dq)
        })
        .collect();
    let mut dq = vec![T::ZERO; b * h * t * d];
    for (bi, hh, q0, part) in q_parts {
        let at = dims.q_row(bi, hh, q0);
        dq[at..at + part.len()].copy_from_slice(&part);
    }
    (dq, dk, dv)
}
