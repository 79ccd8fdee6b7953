//! The fused attention's tile loops: the forward with its online softmax, the backward
//! from the saved log-sum-exp (see the module above for the recurrences).

use super::products::{At, TileProducts};
use super::rows::RowKernels;
use super::{AttentionMask, Tiles};
use rayon::prelude::*;

/// The float types the kernel runs in.
pub(crate) trait Real:
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
    /// `max(init, max row)`.
    fn row_max(row: &[Self], init: Self) -> Self;
    /// `x ← exp(x − shift)` over `row` (−∞ → 0); returns the row's new sum.
    fn exp_sum(row: &mut [Self], shift: Self) -> Self;
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
    fn row_max(row: &[Self], init: Self) -> Self {
        RowKernels::detect().max(row, init)
    }
    fn exp_sum(row: &mut [Self], shift: Self) -> Self {
        RowKernels::detect().exp_sum(row, shift)
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
    fn row_max(row: &[Self], init: Self) -> Self {
        row.iter().fold(init, |m, &x| if x > m { x } else { m })
    }
    fn exp_sum(row: &mut [Self], shift: Self) -> Self {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = if *x == f64::NEG_INFINITY {
                0.0
            } else {
                (*x - shift).exp()
            };
            sum += *x;
        }
        sum
    }
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
    pub(super) fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.h + h) * self.t + i) * self.d
    }
    pub(super) fn k_row(&self, b: usize, g: usize, j: usize) -> usize {
        ((b * self.kv + g) * self.s + j) * self.d
    }
    /// The output is `[b, t, h, d]`.
    pub(super) fn o_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.t + i) * self.h + h) * self.d
    }
    pub(super) fn lse(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.h + h) * self.t + i
    }
}

/// Masks tile `at`'s scores (`sc`, row stride `ls`) with −∞ where a query may not see a
/// key; an open tile (every query sees every key) is left as it is.
fn mask_tile<T: Real>((mask, closed): (&AttentionMask, &[u32]), at: &At, sc: &mut [T], ls: usize) {
    if mask.tile_open(closed, at.b, (at.q0, at.nq), (at.k0, at.nk)) {
        return;
    }
    let row = at.b * (mask.keys + 1);
    if mask.window.is_none() && closed[row + at.k0 + at.nk] == closed[row + at.k0] {
        // Every key of the tile is real and in the prompt: only causality closes one, and
        // query i sees the keys up to offset + q0 + i.
        for i in 0..at.nq {
            let hidden = (mask.offset + at.q0 + i + 1)
                .saturating_sub(at.k0)
                .min(at.nk);
            sc[i * ls + hidden..i * ls + at.nk].fill(T::NEG_INF);
        }
        return;
    }
    for i in 0..at.nq {
        for j in 0..at.nk {
            if !mask.visible(at.b, at.q0 + i, at.k0 + j) {
                sc[i * ls + j] = T::NEG_INF;
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
    products: &impl TileProducts<T>,
    scale: f64,
    tiles: Tiles,
) -> (Vec<T>, Vec<T>) {
    let Dims { b, h, kv, t, d, .. } = dims;
    let rep = h / kv;
    let scale = T::of(scale);
    let (tq, ls) = (tiles.queries, tiles.keys);
    let q_tiles = t.div_ceil(tq);
    let closed = mask.closed_prefix();
    let mut out = vec![T::ZERO; b * t * h * d];
    let mut lse = vec![T::ZERO; b * h * t];
    let jobs: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).flat_map(move |hh| (0..q_tiles).map(move |qt| (bi, hh, qt))))
        .collect();
    let results: Vec<TilePair<T>> = jobs
        .par_iter()
        .map(|&(bi, hh, qt)| {
            let q0 = qt * tq;
            let nq = tq.min(t - q0);
            let mut m = vec![T::NEG_INF; nq];
            let mut l = vec![T::ZERO; nq];
            let mut acc = vec![T::ZERO; tq * d];
            let mut sc = vec![T::ZERO; tq * ls];
            let end = key_end(mask, q0, nq);
            let mut k0 = 0;
            while k0 < end {
                let nk = ls.min(end - k0);
                let at = At {
                    b: bi,
                    h: hh,
                    g: hh / rep,
                    q0,
                    nq,
                    k0,
                    nk,
                };
                products.scores(&at, scale, &mut sc, ls);
                mask_tile((mask, &closed), &at, &mut sc, ls);
                for i in 0..nq {
                    let row = &mut sc[i * ls..i * ls + nk];
                    let mx = T::row_max(row, m[i]);
                    if mx == T::NEG_INF {
                        // Nothing visible yet in this row (its own key comes later).
                        row.iter_mut().for_each(|x| *x = T::ZERO);
                        continue;
                    }
                    let alpha = (m[i] - mx).exp();
                    let sum = T::exp_sum(row, mx);
                    l[i] = l[i] * alpha + sum;
                    acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= alpha);
                    m[i] = mx;
                }
                products.pv(&at, &sc, ls, &mut acc);
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

/// One tile's `P = exp(S − L)` into `p` and `dS = P ∘ (dP − D)` (with `dP = dO Vᵀ`) into
/// `ds`, both nq rows of stride `ls`.
#[allow(clippy::too_many_arguments)]
fn tile_probs_and_grads<T: Real>(
    dims: &Dims,
    mask: (&AttentionMask, &[u32]),
    products: &impl TileProducts<T>,
    (lse, delta): (&[T], &[T]),
    at: &At,
    scale: T,
    (p, ds): (&mut [T], &mut [T]),
    ls: usize,
) {
    products.scores(at, scale, p, ls);
    mask_tile(mask, at, p, ls);
    for i in 0..at.nq {
        let li = lse[dims.lse(at.b, at.h, at.q0 + i)];
        T::exp_sum(&mut p[i * ls..i * ls + at.nk], li);
    }
    products.dp(at, ds, ls);
    for i in 0..at.nq {
        let di = delta[dims.lse(at.b, at.h, at.q0 + i)];
        let (pr, dr) = (&p[i * ls..i * ls + at.nk], &mut ds[i * ls..i * ls + at.nk]);
        for (x, &pv) in dr.iter_mut().zip(pr) {
            *x = pv * (*x - di);
        }
    }
}

/// Backward: (dq `[b, h, t, d]`, dk and dv `[b, kv, s, d]`).
pub(super) fn backward<T: Real>(
    dims: Dims,
    mask: &AttentionMask,
    products: &impl TileProducts<T>,
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
    let (tq, ls) = (tiles.queries, tiles.keys);
    let q_tiles = t.div_ceil(tq);
    let closed = mask.closed_prefix();
    let facts = (lse, &delta[..]);
    // One pass (FlashAttention-2's backward): a task per (row, key head, key tile) walks
    // every query tile that can see it and every query head of the group, writing its dK
    // and dV rows alone and adding each tile's dQ into its worker's own copy of dQ. The
    // tasks are dealt to the workers in turn (a fixed split: the sums, and so the bits, do
    // not depend on scheduling), and the copies are summed in worker order at the end.
    let k_tiles = s.div_ceil(ls);
    let jobs: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..kv).flat_map(move |g| (0..k_tiles).map(move |kt| (bi, g, kt))))
        .collect();
    let workers = rayon::current_num_threads().clamp(1, jobs.len().max(1));
    let parts: Vec<(Vec<T>, Vec<TilePair<T>>)> = (0..workers)
        .into_par_iter()
        .map(|w| {
            let mut dq = vec![T::ZERO; b * h * t * d];
            let mut dq_tile = vec![T::ZERO; tq * d];
            let mut p = vec![T::ZERO; tq * ls];
            let mut ds = vec![T::ZERO; tq * ls];
            let mut kv_parts = Vec::new();
            for &(bi, g, kt) in jobs.iter().skip(w).step_by(workers) {
                let k0 = kt * ls;
                let nk = ls.min(s - k0);
                let mut dk = vec![T::ZERO; ls * d];
                let mut dv = vec![T::ZERO; ls * d];
                // Query qi sees key j only if j ≤ offset + qi.
                let first_q = k0.saturating_sub(mask.offset) / tq;
                for hh in g * rep..(g + 1) * rep {
                    for qt in first_q..q_tiles {
                        let q0 = qt * tq;
                        let nq = tq.min(t - q0);
                        let at = At {
                            b: bi,
                            h: hh,
                            g,
                            q0,
                            nq,
                            k0,
                            nk,
                        };
                        let bufs = (&mut p[..], &mut ds[..]);
                        tile_probs_and_grads(
                            &dims,
                            (mask, &closed),
                            products,
                            facts,
                            &at,
                            scale_t,
                            bufs,
                            ls,
                        );
                        products.dv_dk(&at, &p, &ds, ls, scale_t, &mut dv, &mut dk);
                        dq_tile.iter_mut().for_each(|x| *x = T::ZERO);
                        products.dq(&at, &ds, ls, scale_t, &mut dq_tile);
                        let row = dims.q_row(bi, hh, q0);
                        for (x, &y) in dq[row..row + nq * d].iter_mut().zip(&dq_tile) {
                            *x += y;
                        }
                    }
                }
                let rows = |acc: &[T]| products.key_rows(acc, nk, ls);
                kv_parts.push((bi, g, k0, rows(&dk), rows(&dv)));
            }
            (dq, kv_parts)
        })
        .collect();
    let mut dq = vec![T::ZERO; b * h * t * d];
    let mut dk = vec![T::ZERO; b * kv * s * d];
    let mut dv = vec![T::ZERO; b * kv * s * d];
    for (part_dq, kv_parts) in parts {
        for (x, y) in dq.iter_mut().zip(part_dq) {
            *x += y;
        }
        for (bi, g, k0, pk, pv) in kv_parts {
            let at = dims.k_row(bi, g, k0);
            dk[at..at + pk.len()].copy_from_slice(&pk);
            dv[at..at + pv.len()].copy_from_slice(&pv);
        }
    }
    (dq, dk, dv)
}
