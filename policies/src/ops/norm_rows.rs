//! The CPU row kernels of RMSNorm and LayerNorm, with every sum over a row's features
//! accumulated in f64.
//!
//! Real models carry outlier channels (SmolLM2-135M's residual stream reaches ~25,000 in one
//! channel): beside that channel's square a running f32 total drops the small channels'
//! squares entirely (issue 23). candle-nn's CPU kernels sum serially in f32, and its
//! LayerNorm takes the variance as `E[x²] − E[x]²`, which cancels catastrophically when the
//! mean is large. Here the statistics are exact to an ulp of f32 whatever the channels hold;
//! the per-element arithmetic stays in f32, in transformers' order:
//!
//! - RMSNorm (`LlamaRMSNorm`): `r = 1/sqrt(mean(x²) + eps)`, `h = x·r` (f32), rounded to the
//!   model's dtype, then `y = w·h` rounded again;
//! - LayerNorm (`nn.LayerNorm`, two passes): `μ = mean(x)`, `σ² = mean((x − μ)²)`,
//!   `y = (x − μ)·r·w` with `r = 1/sqrt(σ² + eps)`, rounded once (the bias is added by the
//!   caller, as a differentiable op).

use candle_core::WithDType;
use rayon::prelude::*;

/// Rows per rayon task: about 32k elements, so short inputs are not split into many tasks.
fn rows_per_task(n: usize) -> usize {
    (32_768 / n.max(1)).max(1)
}

/// `y` [rows·n] from `x` [rows·n], one row `(x_row, y_row)` at a time, in parallel.
fn map_rows<T: WithDType>(x: &[T], n: usize, row: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(rows_per_task(n))
        .for_each(|(yr, xr)| row(xr, yr));
    y
}

/// `1 / sqrt(Σx² / n + eps)` of one row, the sum in f64, rounded to f32 once.
fn inv_rms<T: WithDType>(x: &[T], eps: f64) -> f32 {
    let ss: f64 = x
        .iter()
        .map(|&v| {
            let v = v.to_f64();
            v * v
        })
        .sum();
    (1.0 / (ss / x.len() as f64 + eps).sqrt()) as f32
}

/// `x` [rows·n], `w` [n] → `y` [rows·n]: `y = w · round(x · r)`.
pub fn rms_norm_forward<T: WithDType>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    map_rows(x, w.len(), |xr, yr| {
        let r = inv_rms(xr, eps);
        for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
            let h = T::from_f64((v.to_f64() as f32 * r) as f64);
            *o = T::from_f64((wi.to_f64() as f32 * h.to_f64() as f32) as f64);
        }
    })
}

/// RMSNorm's backward for f32 rows: with `r = 1/sqrt(mean(x²)+eps)`, `x̂ = x·r`, `gw = g·w`,
/// `dx = r·(gw − x̂·mean(gw·x̂))`, and (when `want_dw`) `dw = Σ_rows g·x̂`; both sums in f64.
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f64,
    want_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let n = w.len();
    // Each row's scale, once for dx and dw.
    let rs: Vec<f32> = x
        .par_chunks(n)
        .with_min_len(rows_per_task(n))
        .map(|xr| inv_rms(xr, eps))
        .collect();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(g.par_chunks(n)))
        .zip(rs.par_iter())
        .with_min_len(rows_per_task(n))
        .for_each(|((d, (xr, gr)), &r)| {
            let proj: f64 = (0..n)
                .map(|i| (gr[i] * w[i]) as f64 * (xr[i] * r) as f64)
                .sum::<f64>()
                / n as f64;
            let proj = proj as f32;
            for i in 0..n {
                d[i] = r * (gr[i] * w[i] - xr[i] * r * proj);
            }
        });
    let dw = want_dw.then(|| {
        let mut acc = vec![0f64; n];
        for ((xr, gr), &r) in x.chunks_exact(n).zip(g.chunks_exact(n)).zip(&rs) {
            for i in 0..n {
                acc[i] += (gr[i] * (xr[i] * r)) as f64;
            }
        }
        acc.into_iter().map(|v| v as f32).collect()
    });
    (dx, dw)
}

/// `x` [rows·n], `w` [n] → `y`: `(x − μ)·r·w`, the mean and the variance each a pass in f64.
pub fn layer_norm_forward<T: WithDType>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    map_rows(x, n, |xr, yr| {
        let mean = xr.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
        let var = xr
            .iter()
            .map(|v| {
                let c = v.to_f64() - mean;
                c * c
            })
            .sum::<f64>()
            / n as f64;
        let (mean, r) = (mean as f32, (1.0 / (var + eps).sqrt()) as f32);
        for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
            let c = v.to_f64() as f32 - mean;
            *o = T::from_f64((c * r * wi.to_f64() as f32) as f64);
        }
    })
}
