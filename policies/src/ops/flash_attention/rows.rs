//! The online softmax's row work in f32, vectorised: a row's maximum, and `x ← exp(x − m)`
//! with the row's sum. libm's `expf` is a call per score (a sixth of a 2k-token step went
//! there); this is Cephes' `expf` (range reduction by ln 2 in two parts, a degree-6
//! polynomial, 2ⁿ from the exponent bits; ≤ 2 ulp on [−87, 88]) written so the compiler
//! vectorises it, built for AVX-512 and for AVX2 and chosen at run time, with the portable
//! build (SSE2) as the fallback. Masked scores (−∞) and anything below −87 give exactly 0.

/// `e^x` for one lane (see the module).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer (nearest, ties to even).
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.0;
    let xc = x.clamp(LOW, 88.0);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    // n as an integer, from the bits (a float-to-int cast would not vectorise).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let two_n = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    if x < LOW {
        0.0
    } else {
        y * two_n
    }
}

const LANES: usize = 16;

#[inline(always)]
fn max_body(row: &[f32], init: f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = init;
    for &x in acc.iter().chain(rest) {
        if x > m {
            m = x;
        }
    }
    m
}

#[inline(always)]
fn exp_sum_body(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in chunks.by_ref() {
        for l in 0..LANES {
            let e = exp(c[l] - shift);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    acc.iter().sum::<f32>() + sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512(row: &[f32], init: f32) -> f32 {
    max_body(row, init)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sum_avx512(row: &mut [f32], shift: f32) -> f32 {
    exp_sum_body(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(row: &[f32], init: f32) -> f32 {
    max_body(row, init)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_sum_body(row, shift)
}

fn max_portable(row: &[f32], init: f32) -> f32 {
    max_body(row, init)
}

fn exp_sum_portable(row: &mut [f32], shift: f32) -> f32 {
    exp_sum_body(row, shift)
}

/// The row kernels this CPU runs.
#[derive(Clone, Copy)]
pub struct RowKernels {
    max: unsafe fn(&[f32], f32) -> f32,
    exp_sum: unsafe fn(&mut [f32], f32) -> f32,
}

impl RowKernels {
    /// The widest build this CPU runs, chosen once.
    pub fn detect() -> Self {
        match crate::ops::simd_level() {
            #[cfg(target_arch = "x86_64")]
            crate::ops::SimdLevel::Avx512 => Self {
                max: max_avx512,
                exp_sum: exp_sum_avx512,
            },
            #[cfg(target_arch = "x86_64")]
            crate::ops::SimdLevel::Avx2 => Self {
                max: max_avx2,
                exp_sum: exp_sum_avx2,
            },
            _ => Self::portable(),
        }
    }

    pub fn portable() -> Self {
        Self {
            max: max_portable,
            exp_sum: exp_sum_portable,
        }
    }

    /// `max(init, max row)`.
    #[inline]
    pub fn max(&self, row: &[f32], init: f32) -> f32 {
        // SAFETY: `detect` picked a build whose features this CPU has.
        unsafe { (self.max)(row, init) }
    }

    /// `x ← exp(x − shift)` for each x of `row` (−∞ → 0); returns the new row's sum.
    #[inline]
    pub fn exp_sum(&self, row: &mut [f32], shift: f32) -> f32 {
        // SAFETY: as `max`.
        unsafe { (self.exp_sum)(row, shift) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every build agrees with f64's exp within 2 ulp-sized relative error (1.5e-7) over the
    /// range the softmax sees, gives 0 for −∞ and below −87, and sums what it wrote.
    #[test]
    fn exp_matches_f64_and_the_builds_agree() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -100.0 + i as f32 * 5e-4)
            .chain([f32::NEG_INFINITY, -0.0, 1e-30, -1e-30])
            .collect();
        let mut builds = vec![("portable", RowKernels::portable())];
        builds.push(("detected", RowKernels::detect()));
        for (name, k) in builds {
            let mut row = xs.clone();
            let sum = k.exp_sum(&mut row, 0.0);
            let mut want_sum = 0f64;
            for (&x, &e) in xs.iter().zip(&row) {
                if x < -87.0 {
                    assert_eq!(e, 0.0, "{name}: exp({x}) = {e}");
                    continue;
                }
                let want = (x as f64).exp();
                want_sum += want;
                let rel = ((e as f64 - want) / want).abs();
                assert!(
                    rel <= 1.5e-7,
                    "{name}: exp({x}) = {e}, want {want} ({rel:e})"
                );
            }
            assert!(
                ((sum as f64 - want_sum) / want_sum).abs() < 1e-5,
                "{name}: sum"
            );
            let want_max = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(k.max(&xs, f32::NEG_INFINITY), want_max, "{name}: max");
            assert_eq!(k.max(&xs[..17], 5.0), 5.0, "{name}: max keeps init");
        }
    }
}
