//! Log-probs of chosen tokens (and the entropy) straight from hidden states and a frozen
//! output head, a chunk of rows at a time, so the `[N, V]` logits never exist whole — in
//! the forward or in the backward (the idea of Liger's fused linear cross-entropy and of
//! cut cross-entropy). Per chunk `c` of rows, with `p = softmax(z)`:
//!
//! `z = (h_c Wᵀ + b) / τ`, `lse = logsumexp(z)`, `lp = z[y] − lse`, `H = −Σ p (z − lse)`;
//!
//! backward, given `g = dL/dlp` and `g_H = dL/dH` per row, `z` recomputed from the saved
//! `h_c` and `W`: `dz = (g (onehot(y) − p) − g_H p (z − lse + H)) / τ`, `dh_c = dz W`.
//! `W` and `b` are frozen: they get no gradient. When all rows fit in one chunk, that chunk's
//! logits (≤ [`CHUNK_BYTES`]) are kept for the backward instead of recomputed.
//!
//! When the rows track gradients and the entropy takes none (every loss but an entropy
//! bonus), the backward is done in the forward, as Liger's fused linear cross-entropy does:
//! each row's `dlp/dh = ((onehot(y) − p) / τ) W` is computed while the chunk's logits exist,
//! and the backward only scales it, `dh = g · dlp/dh`. That saves the backward's recompute of
//! the logits, a third of the head's products.
//!
//! CPU only (the row-wise passes read the chunk's logits in place); the products run in the
//! model's dtype by [`super::gemm::matmul`], the rest in f32 (f64 for an f64 model).

use super::bridge::{bridge1, Backward1};
use crate::logprobs::Entropy;
use candle_core::{DType, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// A chunk's logits are at most this many bytes (in f32): 64 MiB.
pub const CHUNK_BYTES: usize = 64 << 20;

/// Rows per chunk for a vocabulary of `vocab`: as many as keep a chunk within
/// [`CHUNK_BYTES`] (110 rows at V = 151,936; 524 at 32,000; 32,768 at 512), at least one.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_BYTES / (4 * vocab.max(1))).max(1)
}

/// The head as the op sees it: `weight` [V, H], `bias` [V], both frozen; `tau` > 0.
#[derive(Clone)]
pub struct FrozenHead {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub tau: f64,
}

/// `hidden` [N, H] (tracked or not), `targets` [N] u32 → `lp` [N] and, when asked, `H` [N],
/// in the compute dtype; gradients reach `hidden` only (and from `H` only for
/// [`Entropy::Loss`]). `chunk_rows` rows per chunk (any ≥ 1; see [`chunk_rows`]).
pub fn head_logprobs(
    hidden: &Tensor,
    targets: &Tensor,
    head: &FrozenHead,
    rows: usize,
    want: Entropy,
) -> Result<(Tensor, Option<Tensor>)> {
    match super::compute_dtype(hidden.dtype()) {
        DType::F64 => run::<f64>(hidden, targets, head, rows, want),
        _ => run::<f32>(hidden, targets, head, rows, want),
    }
}

/// The float types the row-wise passes run in.
trait Real: WithDType + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;

    /// `Σ_k exp(z_k·inv_tau − max)`, each term in `Self`, accumulated in f64.
    fn sum_exp(z: &[Self], inv_tau: Self, max: Self) -> f64 {
        z.iter().map(|&v| (v * inv_tau - max).exp().to_f64()).sum()
    }

    /// One row of the early backward (`g` = 1, no entropy gradient): `d = (onehot(y) − p) / τ`.
    fn dlp_dz(z: &[Self], d: &mut [Self], inv_tau: Self, y: u32, lse: Self) {
        row_backward(
            z,
            d,
            inv_tau,
            y,
            (lse, Self::zero()),
            (Self::one(), Self::zero()),
        );
    }
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }

    /// Vectorised: [`rows_f32`].
    fn sum_exp(z: &[f32], inv_tau: f32, max: f32) -> f64 {
        rows_f32::sum_exp(z, inv_tau, max)
    }

    fn dlp_dz(z: &[f32], d: &mut [f32], inv_tau: f32, y: u32, lse: f32) {
        rows_f32::dlp_dz(z, d, inv_tau, y, lse)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The two passes over every logit of a row that a training step's head runs, for f32,
/// vectorised: `Σ exp(z·τ⁻¹ − max)` (f64 lanes) and the early backward's `dz`. libm's
/// `expf` is a call per logit (two per logit and row: 100 M of them in a W5 step on
/// SmolLM2); this is the attention's vectorised Cephes `expf` (≤ 2 ulp), built for AVX-512
/// and AVX2 and chosen at run time (`ops::simd_level`), the portable build the fallback.
mod rows_f32 {
    use crate::ops::flash_attention::exp_f32 as exp;

    const LANES: usize = 16;

    #[inline(always)]
    fn sum_exp_body(z: &[f32], inv_tau: f32, max: f32) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = z.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                acc[l] += exp(c[l] * inv_tau - max) as f64;
            }
        }
        let mut sum: f64 = acc.iter().sum();
        for &v in rest {
            sum += exp(v * inv_tau - max) as f64;
        }
        sum
    }

    /// `d[k] = −exp(z_k·τ⁻¹ − lse)·τ⁻¹`, then `d[y] = (1 − p_y)·τ⁻¹`: `row_backward`'s
    /// expressions at g = 1.
    #[inline(always)]
    fn dlp_dz_body(z: &[f32], d: &mut [f32], inv_tau: f32, y: u32, lse: f32) {
        for (dk, &v) in d.iter_mut().zip(z) {
            *dk = -exp(v * inv_tau - lse) * inv_tau;
        }
        let y = y as usize;
        d[y] = (-exp(z[y] * inv_tau - lse) + 1.0) * inv_tau;
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_exp_avx512(z: &[f32], inv_tau: f32, max: f32) -> f64 {
        sum_exp_body(z, inv_tau, max)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_exp_avx2(z: &[f32], inv_tau: f32, max: f32) -> f64 {
        sum_exp_body(z, inv_tau, max)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn dlp_dz_avx512(z: &[f32], d: &mut [f32], inv_tau: f32, y: u32, lse: f32) {
        dlp_dz_body(z, d, inv_tau, y, lse)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dlp_dz_avx2(z: &[f32], d: &mut [f32], inv_tau: f32, y: u32, lse: f32) {
        dlp_dz_body(z, d, inv_tau, y, lse)
    }

    pub(super) fn sum_exp(z: &[f32], inv_tau: f32, max: f32) -> f64 {
        match crate::ops::simd_level() {
            // SAFETY: simd_level detected the build's features.
            #[cfg(target_arch = "x86_64")]
            crate::ops::SimdLevel::Avx512 => unsafe { sum_exp_avx512(z, inv_tau, max) },
            #[cfg(target_arch = "x86_64")]
            crate::ops::SimdLevel::Avx2 => unsafe { sum_exp_avx2(z, inv_tau, max) },
            _ => sum_exp_body(z, inv_tau, max),
        }
    }

    pub(super) fn dlp_dz(z: &[f32], d: &mut [f32], inv_tau: f32, y: u32, lse: f32) {
        match crate::ops::simd_level() {
            // SAFETY: as sum_exp.
            #[cfg(target_arch = "x86_64")]
            crate::ops::SimdLevel::Avx512 => unsafe { dlp_dz_avx512(z, d, inv_tau, y, lse) },
            #[cfg(target_arch = "x86_64")]
            crate::ops::SimdLevel::Avx2 => unsafe { dlp_dz_avx2(z, d, inv_tau, y, lse) },
            _ => dlp_dz_body(z, d, inv_tau, y, lse),
        }
    }
}

/// What the backward needs besides `W`: the detached rows, the targets, the per-row `lse`
/// and (for a differentiable entropy) `H`; the logits when there was only one chunk; or,
/// computed in the forward, each row's `dlp/dh` [N, H].
struct Saved<T> {
    h: Tensor,
    dlp_dh: Option<Tensor>,
    kept: Option<Tensor>,
    y: Vec<u32>,
    head: FrozenHead,
    rows: usize,
    lse: Vec<T>,
    ent: Option<Vec<T>>,
}

fn run<T: Real>(
    hidden: &Tensor,
    targets: &Tensor,
    head: &FrozenHead,
    rows: usize,
    want: Entropy,
) -> Result<(Tensor, Option<Tensor>)> {
    let h = hidden.detach().contiguous()?;
    let n = h.dim(0)?;
    let vocab = head.weight.dim(0)?;
    let y: Vec<u32> = targets.flatten_all()?.to_vec1()?;
    if y.len() != n {
        candle_core::bail!("head_logprobs: {} targets for {n} rows", y.len());
    }
    if let Some(&bad) = y.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("head_logprobs: target {bad} outside the vocabulary of {vocab}");
    }
    let with_h = want != Entropy::Skip;
    let inv_tau = T::from_f64(1.0 / head.tau);
    let (mut lse, mut lp) = (vec![T::zero(); n], vec![T::zero(); n]);
    let mut ent = vec![T::zero(); if with_h { n } else { 0 }];
    let mut kept = None;
    // The backward in the forward (see the module): the entropy takes no gradient.
    let early = hidden.track_op() && want != Entropy::Loss;
    let mut dlp_dh = Vec::new();
    for s in (0..n).step_by(rows.max(1)) {
        let m = rows.max(1).min(n - s);
        let z = chunk_logits::<T>(&h, head, s, m)?;
        if m == n && !early {
            kept = Some(z.clone());
        }
        let (zs, zl) = z.storage_and_layout();
        let Storage::Cpu(cpu) = &*zs else {
            candle_core::bail!("head_logprobs: CPU tensors only");
        };
        let zv = &cpu.as_slice::<T>()?[zl.start_offset()..zl.start_offset() + m * vocab];
        let (lse_c, lp_c) = (&mut lse[s..s + m], &mut lp[s..s + m]);
        let ent_c: &mut [T] = if with_h { &mut ent[s..s + m] } else { &mut [] };
        let row =
            |i: usize| row_forward(&zv[i * vocab..(i + 1) * vocab], inv_tau, y[s + i], with_h);
        if with_h {
            (lse_c, lp_c, ent_c)
                .into_par_iter()
                .with_min_len(rows_per_task(vocab))
                .enumerate()
                .for_each(|(i, (l, p, e))| (*l, *p, *e) = row(i));
        } else {
            (lse_c, lp_c)
                .into_par_iter()
                .with_min_len(rows_per_task(vocab))
                .enumerate()
                .for_each(|(i, (l, p))| (*l, *p, _) = row(i));
        }
        if early {
            // dz = (onehot(y) − p) / τ, then dlp/dh = dz W.
            let mut dz: Vec<T> = vec![T::zero(); m * vocab];
            dz.par_chunks_mut(vocab)
                .with_min_len(rows_per_task(vocab))
                .enumerate()
                .for_each(|(i, d)| {
                    let z = &zv[i * vocab..(i + 1) * vocab];
                    T::dlp_dz(z, d, inv_tau, y[s + i], lse[s + i]);
                });
            let dz = Tensor::from_vec(dz, (m, vocab), h.device())?.to_dtype(h.dtype())?;
            dlp_dh.push(super::gemm::matmul(&dz, &head.weight, false)?);
        }
    }
    let dev = h.device().clone();
    let lp_t = Tensor::from_vec(lp, n, &dev)?;
    let ent_t = with_h
        .then(|| Tensor::from_vec(ent.clone(), n, &dev))
        .transpose()?;
    let dlp_dh = match (early, dlp_dh.len()) {
        (false, _) => None,
        (true, 0) => Some(h.zeros_like()?),
        (true, 1) => dlp_dh.pop(),
        (true, _) => Some(Tensor::cat(&dlp_dh, 0)?),
    };
    let saved = Saved {
        h,
        dlp_dh,
        kept,
        y,
        head: head.clone(),
        rows: rows.max(1),
        lse,
        ent: (want == Entropy::Loss).then_some(ent),
    };
    match (want, ent_t) {
        (Entropy::Loss, Some(e)) => {
            // One op with both outputs, so the backward sees both upstream gradients.
            let both = Tensor::stack(&[&lp_t, &e], 1)?;
            let out = bridge1(hidden, both, HeadBwd(saved))?;
            Ok((
                out.narrow(1, 0, 1)?.squeeze(1)?,
                Some(out.narrow(1, 1, 1)?.squeeze(1)?),
            ))
        }
        (_, e) => Ok((bridge1(hidden, lp_t, HeadBwd(saved))?, e)),
    }
}

/// `h[s..s+m] Wᵀ + b` in the model's dtype, then in the compute dtype `T`: [m, V],
/// contiguous (not yet tempered).
fn chunk_logits<T: Real>(h: &Tensor, head: &FrozenHead, s: usize, m: usize) -> Result<Tensor> {
    let mut z = super::gemm::matmul(&h.narrow(0, s, m)?, &head.weight, true)?;
    if let Some(b) = &head.bias {
        z = z.broadcast_add(b)?;
    }
    z.to_dtype(T::DTYPE)?.contiguous()
}

/// One row of untempered logits `z` → (`lse`, `lp`, `H` when `with_h`, else 0) of
/// `softmax(z·inv_tau)`. The two sums over the vocabulary are accumulated in f64: a running
/// f32 total near 1 drops every term below half an ulp (a logit ~17 below the maximum), which
/// on a real model's long-tailed vocabulary biases every log-prob upwards (issue 23). Each
/// term is `exp` in `T` (within 2 ulp for f32: [`rows_f32`]); only the accumulation is
/// widened.
fn row_forward<T: Real>(z: &[T], inv_tau: T, y: u32, with_h: bool) -> (T, T, T) {
    let zmax = z.iter().fold(
        T::from_f64(f64::NEG_INFINITY),
        |a, &v| if v > a { v } else { a },
    );
    let max = zmax * inv_tau;
    let sum = T::sum_exp(z, inv_tau, max);
    let lse64 = sum.ln() + max.to_f64();
    let lse = T::from_f64(lse64);
    let lp = T::from_f64((z[y as usize] * inv_tau).to_f64() - lse64);
    if !with_h {
        return (lse, lp, T::zero());
    }
    // H = −Σ p·l with l = z·τ⁻¹ − lse, p = exp(l).
    let ent: f64 = z
        .iter()
        .map(|&v| {
            let l = v * inv_tau - lse;
            (l.exp() * l).to_f64()
        })
        .sum();
    (lse, lp, T::from_f64(-ent))
}

/// Rows per rayon task: about 64k logits, so small chunks do not pay for many tasks.
fn rows_per_task(vocab: usize) -> usize {
    (65_536 / vocab.max(1)).max(1)
}

struct HeadBwd<T>(Saved<T>);

impl<T: Real> Backward1 for HeadBwd<T> {
    fn name(&self) -> &'static str {
        "head-logprob-bridge"
    }

    /// `grad`: [N] (for `lp`) or [N, 2] (for `lp` and `H`) → `dh` [N, H].
    fn backward(&self, grad: &Tensor) -> Result<Tensor> {
        let sv = &self.0;
        let n = sv.y.len();
        if let Some(d) = &sv.dlp_dh {
            // dh = g · dlp/dh (the entropy takes no gradient on this path).
            let g = grad.to_dtype(d.dtype())?.reshape((n, 1))?;
            return d.broadcast_mul(&g);
        }
        let g: Vec<T> = grad.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1()?;
        let stride = g.len() / n.max(1);
        let vocab = sv.head.weight.dim(0)?;
        let inv_tau = T::from_f64(1.0 / sv.head.tau);
        let mut parts = Vec::new();
        for s in (0..n).step_by(sv.rows) {
            let m = sv.rows.min(n - s);
            let z = match &sv.kept {
                Some(z) => z.clone(),
                None => chunk_logits::<T>(&sv.h, &sv.head, s, m)?,
            };
            let mut dz: Vec<T> = vec![T::zero(); m * vocab];
            {
                let (zs, zl) = z.storage_and_layout();
                let Storage::Cpu(cpu) = &*zs else {
                    candle_core::bail!("head_logprobs: CPU tensors only");
                };
                let zv = &cpu.as_slice::<T>()?[zl.start_offset()..zl.start_offset() + m * vocab];
                dz.par_chunks_mut(vocab)
                    .with_min_len(rows_per_task(vocab))
                    .enumerate()
                    .for_each(|(i, d)| {
                        let r = s + i;
                        let (gh, ent) = match &sv.ent {
                            Some(e) if stride == 2 => (g[2 * r + 1], e[r]),
                            _ => (T::zero(), T::zero()),
                        };
                        row_backward(
                            &zv[i * vocab..(i + 1) * vocab],
                            d,
                            inv_tau,
                            sv.y[r],
                            (sv.lse[r], ent),
                            (g[stride * r], gh),
                        );
                    });
            }
            let dz = Tensor::from_vec(dz, (m, vocab), sv.h.device())?.to_dtype(sv.h.dtype())?;
            parts.push(super::gemm::matmul(&dz, &sv.head.weight, false)?);
        }
        if parts.is_empty() {
            return sv.h.zeros_like();
        }
        Tensor::cat(&parts, 0)
    }
}

/// `d[k] = (g (1[k = y] − p_k) − g_H p_k (l_k + H)) · inv_tau` with `l = z·inv_tau − lse`,
/// `p = exp(l)`; without an entropy gradient, the order of `gather_logprobs`'s backward.
fn row_backward<T: Real>(
    z: &[T],
    d: &mut [T],
    inv_tau: T,
    y: u32,
    (lse, ent): (T, T),
    (g, gh): (T, T),
) {
    let with_h = gh != T::zero();
    for (dk, &v) in d.iter_mut().zip(z) {
        let l = v * inv_tau - lse;
        let p = l.exp();
        let mut x = -(p * g);
        if with_h {
            x -= gh * p * (l + ent);
        }
        *dk = x;
    }
    d[y as usize] += g;
    for dk in d.iter_mut() {
        *dk *= inv_tau;
    }
}
