//! `VDPBF16PS` and `VCVTNE2PS2BF16` in portable code, lane for lane the instructions'
//! arithmetic (found against the instruction on an Intel core: the odd product of a pair
//! first, one rounding each, denormals flushed), and the tile and dot kernels built on them:
//! the tests' reference for the hardware kernels, on any host.

use super::NR;

/// `VCVTNEPS2BF16`: f32 → bf16 bits, round to nearest even; denormals become signed zero,
/// a NaN stays a (quiet) NaN.
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    if x.is_subnormal() {
        return ((b >> 16) as u16) & 0x8000;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A bf16 as `VDPBF16PS` reads it: denormals as zero.
fn widen_daz(b: u16) -> f32 {
    if (b >> 7) & 0xff == 0 {
        f32::from_bits(((b & 0x8000) as u32) << 16)
    } else {
        f32::from_bits((b as u32) << 16)
    }
}

fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// One lane of `VDPBF16PS`: `acc + a₁b₁ + a₀b₀` for the pairs `a = (a₀, a₁)`, `b` (low half
/// first), the odd product added first, each addition one rounding, denormals flushed.
pub fn dot_pair(acc: f32, a: u32, b: u32) -> f32 {
    let (a0, a1) = (widen_daz(a as u16), widen_daz((a >> 16) as u16));
    let (b0, b1) = (widen_daz(b as u16), widen_daz((b >> 16) as u16));
    let t = flush(a1.mul_add(b1, flush(acc)));
    flush(a0.mul_add(b0, t))
}

/// [`TileKernel`] in portable code, lane for lane the instruction's arithmetic.
///
/// # Safety
/// As [`TileKernel`]: `a` readable for `mr` rows of `kc` pairs (row stride `lda`), `b` for
/// `kc` steps of [`NR`] pairs, `c` for `mr` rows of `nr` values (row stride `ldc`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_emulated(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    for i in 0..mr {
        for j in 0..nr {
            let cij = c.add(i * ldc + j);
            let mut acc = if accumulate { *cij } else { 0.0 };
            for p in 0..kc {
                acc = dot_pair(acc, *a.add(i * lda + p), *b.add(p * NR + j));
            }
            *cij = acc;
        }
    }
}

/// The 16 lanes of a dot product's accumulator summed in a fixed tree: lanes l and l+8,
/// then l and l+4, l+2, l+1.
pub(super) fn sum_lanes(mut v: [f32; 16]) -> f32 {
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            v[l] += v[l + half];
        }
    }
    v[0]
}

/// [`DotKernel`] in portable code: lane `l` of chunk `s` takes the pair at values
/// `32s + 2l, 32s + 2l + 1` of both rows (zeros past `k`), as the masked loads give them.
///
/// # Safety
/// `x` readable for `mr` rows of `k` values, `w` for `nc` rows, both at row stride `k`.
pub unsafe fn dots_emulated(
    x: *const u16,
    w: *const u16,
    k: usize,
    mr: usize,
    nc: usize,
) -> [[f32; 4]; 4] {
    let pair = |r: *const u16, s: usize, l: usize| -> u32 {
        let at = |v: usize| if v < k { *r.add(v) as u32 } else { 0 };
        at(32 * s + 2 * l) | at(32 * s + 2 * l + 1) << 16
    };
    let mut out = [[0f32; 4]; 4];
    for (i, row) in out.iter_mut().enumerate().take(mr) {
        for (j, o) in row.iter_mut().enumerate().take(nc) {
            let mut lanes = [0f32; 16];
            for s in 0..k.div_ceil(32) {
                for (l, acc) in lanes.iter_mut().enumerate() {
                    *acc = dot_pair(*acc, pair(x.add(i * k), s, l), pair(w.add(j * k), s, l));
                }
            }
            *o = sum_lanes(lanes);
        }
    }
    out
}
