//! Fused attention on the CPU (issue 27): FlashAttention-2's recurrence, so no `[t, s]`
//! score matrix is ever built. A task takes a tile of queries, walks the key tiles it can
//! see (causal tiles past its last query are skipped), and keeps per row a running maximum
//! m, a running sum l and an unnormalised output:
//!
//! `S = scale · Q Kᵀ`, `m' = max(m, rowmax S)`, `P = exp(S − m')`,
//! `l' = e^{m − m'} l + rowsum P`, `O' = e^{m − m'} O + P V`; at the end `O / l` and the
//! log-sum-exp `L = m + ln l`, the only thing (O(t)) the backward keeps.
//!
//! The backward recomputes each tile's probabilities from L: `P = exp(S − L)`,
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)` with `D = rowsum(dO ∘ O)`,
//! `dK = scale · dSᵀ Q`, `dQ = scale · dS K` — dK and dV by tasks over key tiles, dQ by
//! tasks over query tiles, so no two tasks write the same rows.
//!
//! The mask is computed from per-token facts ([`AttentionMask`]): causality by index, key
//! validity (padding), the shared-prompt segments of a packed row, and a sliding window
//! by position. Grouped-query heads read their key/value head in place (no copies).
//! Products are gemm's on tiles, in f32 (f64 for f64 inputs).

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Keys from which the CPU uses the fused attention ([`flash_attention()`]); below it the
/// composed ops (one batched product each) are as fast and their results those of every
/// earlier release. `RLFT_FUSED_ATTENTION_MIN_KEYS` overrides it (0: always fused).
pub const FUSED_MIN_KEYS: usize = 1024;

fn fused_min_keys() -> usize {
    std::env::var("RLFT_FUSED_ATTENTION_MIN_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FUSED_MIN_KEYS)
}

/// Whether a pass over `s` keys on `device` uses the fused attention.
pub fn uses_fused_attention(device: &Device, s: usize) -> bool {
    device.is_cpu() && s >= fused_min_keys()
}

/// Nanoseconds spent in the fused kernel (forwards and backwards) by this process.
static KERNEL_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seconds spent in the fused kernel so far (forwards and backwards): `rlft bench` W5
/// reports the attention's share of a step from it.
pub fn kernel_seconds() -> f64 {
    KERNEL_NANOS.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

fn add_kernel_time(since: std::time::Instant) {
    let ns = since.elapsed().as_nanos() as u64;
    KERNEL_NANOS.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
}

/// Query and key tile sizes (rows).
#[derive(Debug, Clone, Copy)]
pub struct Tiles {
    pub queries: usize,
    pub keys: usize,
}

impl Default for Tiles {
    fn default() -> Self {
        Self {
            queries: 64,
            keys: 128,
        }
    }
}

/// Which keys each query sees. Queries are the last `t` of the `s` keys' positions in
/// index terms: query `qi` is key index `offset + qi` (a cache holds `offset` keys).
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    /// Key index of query 0: the length of the cache before this pass.
    pub offset: usize,
    /// `[b · s]`: key j of row b is a real token.
    pub key_valid: Vec<bool>,
    /// Packed rows (no cache): `[b · s]` segment of each token, 0 for the shared prompt; a
    /// query sees segment 0 and its own.
    pub segments: Option<Vec<u32>>,
    /// `[b · s]` positions, for the window of packed rows; `None`: the window is measured
    /// on indices (a row of its own, where the real tokens are contiguous).
    pub positions: Option<Vec<u32>>,
    /// Sliding window w: key j is seen by query i when `pos_i − pos_j < w`.
    pub window: Option<usize>,
}

impl AttentionMask {
    /// Whether query `qi` of row `b` sees key `j`: `j ≤ i` and either `j = i` (a query always
    /// sees itself, so no row is empty) or key j is real, in i's segment or the prompt, and
    /// inside the window.
    #[inline]
    pub fn visible(&self, b: usize, qi: usize, j: usize) -> bool {
        let i = self.offset + qi;
        if j > i {
            return false;
        }
        if j == i {
            return true;
        }
        let row = b * self.keys;
        if !self.key_valid[row + j] {
            return false;
        }
        if let Some(seg) = &self.segments {
            let sj = seg[row + j];
            if sj != 0 && sj != seg[row + i] {
                return false;
            }
        }
        match self.window {
            None => true,
            Some(w) => match &self.positions {
                Some(p) => (p[row + i] as usize) < p[row + j] as usize + w,
                None => i - j < w,
            },
        }
    }

    fn check(&self, b: usize, t: usize, s: usize) -> Result<()> {
        let ok = self.batch == b
            && self.queries == t
            && self.keys == s
            && self.offset + t <= s
            && self.key_valid.len() == b * s
            && self.segments.as_ref().is_none_or(|v| v.len() == b * s)
            && self.positions.as_ref().is_none_or(|v| v.len() == b * s);
        if !ok {
            candle_core::bail!(
                "flash attention: a mask for b={} t={} s={} (offset {}) on inputs b={b} t={t} s={s}",
                self.batch,
                self.queries,
                self.keys,
                self.offset
            );
        }
        Ok(())
    }
}

/// The float types the kernel runs in.
trait Real:
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

/// Shapes of one call: q `[b, h, t, d]`, k and v `[b, kv, s, d]`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    d: usize,
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
fn forward<T: Real>(
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
    let results: Vec<(usize, usize, usize, Vec<T>, Vec<T>)> = jobs
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
                m[i] = m[i] + l[i].ln();
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
fn backward<T: Real>(
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
    let kv_parts: Vec<(usize, usize, usize, Vec<T>, Vec<T>)> = jobs
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

/// The op: q `[b, h, t, d]`, k and v `[b, kv, s, d]` (contiguous, f32 or f64) to
/// `[b, t, h, d]`; the forward's log-sum-exp is kept for the backward.
struct FlashAttention {
    mask: AttentionMask,
    scale: f64,
    tiles: Tiles,
    lse: Mutex<Option<CpuStorage>>,
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("flash attention: non-contiguous input".into()))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

fn dims_of(q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
    let (b, h, t, d) = q.shape().dims4()?;
    let (bk, kv, s, dk) = k.shape().dims4()?;
    if bk != b || dk != d || v.shape() != k.shape() || kv == 0 || h % kv != 0 {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    Ok(Dims { b, h, kv, t, s, d })
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let started = std::time::Instant::now();
        let dims = dims_of(l1, l2, l3)?;
        self.mask.check(dims.b, dims.t, dims.s)?;
        let shape = Shape::from((dims.b, dims.t, dims.h, dims.d));
        let (out, lse) = match s1 {
            CpuStorage::F32(_) => {
                let (o, l) = forward::<f32>(
                    dims,
                    &self.mask,
                    (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?),
                    self.scale,
                    self.tiles,
                );
                (CpuStorage::F32(o), CpuStorage::F32(l))
            }
            CpuStorage::F64(_) => {
                let (o, l) = forward::<f64>(
                    dims,
                    &self.mask,
                    (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?),
                    self.scale,
                    self.tiles,
                );
                (CpuStorage::F64(o), CpuStorage::F64(l))
            }
            _ => candle_core::bail!("flash attention runs in f32 or f64"),
        };
        *self.lse.lock().expect("lse lock") = Some(lse);
        add_kernel_time(started);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let started = std::time::Instant::now();
        let lse = self.lse.lock().expect("lse lock").take();
        let Some(lse) = lse else {
            candle_core::bail!("flash attention: backward without its forward's log-sum-exp");
        };
        let (b, h, t, d) = q.dims4()?;
        let (_, kv, s, _) = k.dims4()?;
        let dims = Dims { b, h, kv, t, s, d };
        let dev = q.device();
        let grad = grad_res.contiguous()?;
        macro_rules! run {
            ($ty:ty, $lse:expr) => {{
                let host = |x: &Tensor| x.flatten_all()?.to_vec1::<$ty>();
                let (dq, dk, dv) = backward::<$ty>(
                    dims,
                    &self.mask,
                    (&host(q)?, &host(k)?, &host(v)?),
                    (&host(res)?, &host(&grad)?, $lse),
                    self.scale,
                    self.tiles,
                );
                (
                    Tensor::from_vec(dq, (b, h, t, d), dev)?,
                    Tensor::from_vec(dk, (b, kv, s, d), dev)?,
                    Tensor::from_vec(dv, (b, kv, s, d), dev)?,
                )
            }};
        }
        let (dq, dk, dv) = match (q.dtype(), &lse) {
            (DType::F32, CpuStorage::F32(l)) => run!(f32, l),
            (DType::F64, CpuStorage::F64(l)) => run!(f64, l),
            _ => candle_core::bail!("flash attention runs in f32 or f64"),
        };
        add_kernel_time(started);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Fused attention: q `[b, h, t, d]`, k and v `[b, kv, s, d]` (h a multiple of kv) on the
/// CPU, with the mask `mask` describes; returns `[b, t, h·d]` in q's dtype (bf16 and f16
/// inputs compute in f32). Differentiable in q, k and v.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    tiles: Tiles,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let prep = |x: &Tensor| x.to_dtype(compute)?.contiguous();
    let op = FlashAttention {
        mask: mask.clone(),
        scale,
        tiles,
        lse: Mutex::new(None),
    };
    let o = prep(q)?.apply_op3(&prep(k)?, &prep(v)?, op)?;
    let (b, t, h, d) = o.dims4()?;
    o.reshape((b, t, h * d))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::attention::attend;
    use crate::families::batch::{attention_bias, packed_attention_bias};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn randn(rng: &mut rand_chacha::ChaCha8Rng, shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    struct Case {
        name: &'static str,
        b: usize,
        h: usize,
        kv: usize,
        t: usize,
        s: usize,
        window: Option<usize>,
        /// Left padding per row (rows of their own).
        pad: Vec<usize>,
        /// Packed rows: segments per token (then positions restart per segment).
        packed: Option<Vec<Vec<u32>>>,
    }

    /// The mask and the composed path's bias for a case.
    fn mask_and_bias(c: &Case) -> (AttentionMask, Tensor) {
        let dev = Device::Cpu;
        let offset = c.s - c.t;
        match &c.packed {
            None => {
                let valid: Vec<Vec<bool>> = c
                    .pad
                    .iter()
                    .map(|&p| (0..c.s).map(|j| j >= p).collect())
                    .collect();
                let bias = attention_bias(&valid, c.t, offset, c.window, &dev).unwrap();
                let mask = AttentionMask {
                    batch: c.b,
                    queries: c.t,
                    keys: c.s,
                    offset,
                    key_valid: valid.concat(),
                    segments: None,
                    positions: None,
                    window: c.window,
                };
                (mask, bias)
            }
            Some(segs) => {
                // [prompt | a | b …]: a continuation's positions follow the prompt's.
                let valid: Vec<Vec<bool>> = c
                    .pad
                    .iter()
                    .map(|&p| (0..c.t).map(|j| j >= p).collect())
                    .collect();
                let positions: Vec<Vec<u32>> = segs
                    .iter()
                    .zip(&c.pad)
                    .map(|(seg, &p)| {
                        let prompt = seg.iter().skip(p).filter(|&&x| x == 0).count() as u32;
                        let mut next = std::collections::HashMap::new();
                        seg.iter()
                            .enumerate()
                            .map(|(j, &sg)| {
                                if j < p {
                                    0
                                } else if sg == 0 {
                                    (j - p) as u32
                                } else {
                                    let n = next.entry(sg).or_insert(prompt);
                                    *n += 1;
                                    *n - 1
                                }
                            })
                            .collect()
                    })
                    .collect();
                let bias = packed_attention_bias(&valid, segs, &positions, c.window, &dev).unwrap();
                let mask = AttentionMask {
                    batch: c.b,
                    queries: c.t,
                    keys: c.s,
                    offset: 0,
                    key_valid: valid.concat(),
                    segments: Some(segs.concat()),
                    positions: Some(positions.concat()),
                    window: c.window,
                };
                (mask, bias)
            }
        }
    }

    fn cases() -> Vec<Case> {
        let seg = |prompt: usize, parts: &[usize], pad: usize| -> Vec<u32> {
            let mut v = vec![0u32; pad + prompt];
            for (k, &n) in parts.iter().enumerate() {
                v.extend(std::iter::repeat_n(k as u32 + 1, n));
            }
            v
        };
        vec![
            Case {
                name: "causal, one head group",
                b: 1,
                h: 2,
                kv: 2,
                t: 37,
                s: 37,
                window: None,
                pad: vec![0],
                packed: None,
            },
            Case {
                name: "left padding, GQA 3",
                b: 2,
                h: 6,
                kv: 2,
                t: 29,
                s: 29,
                window: None,
                pad: vec![0, 7],
                packed: None,
            },
            Case {
                name: "GQA 9 to 1",
                b: 1,
                h: 9,
                kv: 1,
                t: 20,
                s: 20,
                window: None,
                pad: vec![3],
                packed: None,
            },
            Case {
                name: "sliding window 5",
                b: 2,
                h: 4,
                kv: 2,
                t: 41,
                s: 41,
                window: Some(5),
                pad: vec![2, 0],
                packed: None,
            },
            Case {
                name: "a cache: 9 new queries over 30 keys",
                b: 2,
                h: 4,
                kv: 4,
                t: 9,
                s: 30,
                window: None,
                pad: vec![0, 4],
                packed: None,
            },
            Case {
                name: "one decoding query",
                b: 2,
                h: 6,
                kv: 3,
                t: 1,
                s: 23,
                window: Some(7),
                pad: vec![5, 0],
                packed: None,
            },
            Case {
                name: "packed groups with a window",
                b: 2,
                h: 4,
                kv: 2,
                t: 33,
                s: 33,
                window: Some(6),
                pad: vec![0, 3],
                packed: Some(vec![seg(9, &[10, 7, 7], 0), seg(12, &[9, 1, 8], 3)]),
            },
            Case {
                name: "packed groups",
                b: 1,
                h: 3,
                kv: 1,
                t: 30,
                s: 30,
                window: None,
                pad: vec![0],
                packed: Some(vec![seg(5, &[12, 13], 0)]),
            },
        ]
    }

    /// Values and gradients of Σ w ∘ o equal the composed attention's in f64 (≤ 1e-10) with
    /// tiles small enough that every case spans several, with remainders.
    #[test]
    fn values_and_gradients_equal_the_composed_attention() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for c in cases() {
            let d = 8;
            let q = Var::from_tensor(&randn(&mut rng, (c.b, c.h, c.t, d))).unwrap();
            let k = Var::from_tensor(&randn(&mut rng, (c.b, c.kv, c.s, d))).unwrap();
            let v = Var::from_tensor(&randn(&mut rng, (c.b, c.kv, c.s, d))).unwrap();
            let w = randn(&mut rng, (c.b, c.t, c.h, d))
                .reshape((c.b, c.t, c.h * d))
                .unwrap();
            let (mask, bias) = mask_and_bias(&c);
            let scale = 1.0 / (d as f64).sqrt();
            let want = attend(&q, &k, &v, &bias, scale).unwrap();
            let tiles = Tiles {
                queries: 8,
                keys: 16,
            };
            let got = flash_attention(&q, &k, &v, &mask, scale, tiles).unwrap();
            let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-10, "{}: values differ by {diff:e}", c.name);
            let g_want = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g_got = (&got * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                let a = g_got.get(x).unwrap();
                let b = g_want.get(x).unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f64>().unwrap();
                assert!(diff <= 1e-10, "{}: {name} differs by {diff:e}", c.name);
            }
        }
    }

    /// In f32 the default tiles agree with the composed attention within 1e-5 relative.
    #[test]
    fn f32_agrees_within_f32_rounding() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let c = Case {
            name: "f32",
            b: 1,
            h: 6,
            kv: 2,
            t: 200,
            s: 200,
            window: None,
            pad: vec![13],
            packed: None,
        };
        let d = 16;
        let f = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let q = f(randn(&mut rng, (c.b, c.h, c.t, d)));
        let k = f(randn(&mut rng, (c.b, c.kv, c.s, d)));
        let v = f(randn(&mut rng, (c.b, c.kv, c.s, d)));
        let (mask, bias) = mask_and_bias(&c);
        let want = attend(&q, &k, &v, &bias, 0.25).unwrap();
        let got = flash_attention(&q, &k, &v, &mask, 0.25, Tiles::default()).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "f32 values differ by {diff:e}"
        );
        let gw = want.sum_all().unwrap().backward().unwrap();
        let gg = got.sum_all().unwrap().backward().unwrap();
        for x in [&q, &k, &v] {
            let (a, b) = (gg.get(x).unwrap(), gw.get(x).unwrap());
            let m = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-5 * m.max(1.0),
                "f32 gradients differ by {diff:e}"
            );
        }
    }
}
