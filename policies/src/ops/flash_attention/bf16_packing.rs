//! The bf16 attention products' operands: rows of f32 values rounded to bf16 and paired
//! along the reduced dimension, as an A operand in the engine's layout (AMX tiles, or row
//! after row for `VDPBF16PS`) or as B panels of 64 columns; vector code where the CPU has
//! AVX512-BF16 (`VCVTNE2PS2BF16`), else portable code that writes the same bits.

use super::bf16_products::{BLOCK, STEP};
use crate::ops::bf16_dot::{cpu_has_avx512_bf16, round_bf16, Engine, NR};

/// How an A operand's rows of pairs lie.
#[derive(Clone, Copy)]
pub(super) enum Layout {
    /// AMX tiles: strip r (rows 16r..16r+16) at `16·steps·r`, its tile s at `+256·s`, row i
    /// at `+16·i`.
    Tiled,
    /// Row after row: row r at `steps·r`.
    Rows,
}

impl Layout {
    pub(super) fn of(engine: Engine) -> Self {
        match engine {
            Engine::Amx => Layout::Tiled,
            Engine::Tiles(_) => Layout::Rows,
        }
    }
    /// Where pair `p` of row `r` lies in an operand of `steps` pairs per row.
    pub(super) fn at(self, steps: usize, r: usize, p: usize) -> usize {
        match self {
            Layout::Tiled => 16 * steps * (r / 16) + 256 * (p / 16) + 16 * (r % 16) + p % 16,
            Layout::Rows => steps * r + p,
        }
    }
    /// What the engine's kernel takes as the distance to the next rows: the next strip of
    /// 16 rows (AMX) or the next row.
    pub(super) fn stride(self, steps: usize) -> usize {
        match self {
            Layout::Tiled => 16 * steps,
            Layout::Rows => steps,
        }
    }
}

/// An A operand of `rows` (a multiple of 32) × `steps` pairs (a multiple of 16).
pub(super) struct PackedA {
    pub(super) data: Vec<u32>,
    pub(super) steps: usize,
    pub(super) layout: Layout,
}

impl PackedA {
    /// Row `r0` (a multiple of 16) from pair `p0` (a multiple of 16), and the stride.
    pub(super) fn at(&self, r0: usize, p0: usize) -> (*const u32, usize) {
        let at = self.layout.at(self.steps, r0, p0);
        (self.data[at..].as_ptr(), self.layout.stride(self.steps))
    }
}

/// `x` [n, cols] (row stride `stride`) transposed and paired: A row c (a column of x), pair p
/// = (x[2p, c], x[2p+1, c]); rows padded to 32 and pairs to whole tiles with zeros.
pub(super) fn tiled_columns(
    x: &[f32],
    stride: usize,
    (n, cols): (usize, usize),
    layout: Layout,
) -> PackedA {
    let rows = cols.next_multiple_of(BLOCK);
    let steps = n.div_ceil(2).next_multiple_of(BLOCK / 2).max(STEP);
    let mut data = vec![0u32; rows * steps];
    for c in 0..cols {
        for p in 0..n.div_ceil(2) {
            let lo = round_bf16(x[2 * p * stride + c]) as u32;
            let hi = if 2 * p + 1 < n {
                round_bf16(x[(2 * p + 1) * stride + c]) as u32
            } else {
                0
            };
            data[layout.at(steps, c, p)] = lo | hi << 16;
        }
    }
    PackedA {
        data,
        steps,
        layout,
    }
}

/// `x` rows [rows, cols] (row stride `stride`) as an A operand: pairs along the row, rows
/// padded to `rows_pad` and pairs to `steps` (a multiple of 16), zeros past the edges, each
/// value times `scale` first.
pub(super) fn tiled_rows(
    x: &[f32],
    stride: usize,
    (rows, cols): (usize, usize),
    (rows_pad, steps): (usize, usize),
    (scale, layout): (f32, Layout),
    out: &mut Vec<u32>,
) {
    out.resize(rows_pad * steps, 0);
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx512_bf16() {
        // SAFETY: the CPU has AVX512-BF16; rows < rows are inside x.
        let shape = ((rows, cols), (rows_pad, steps));
        unsafe { simd::tiled_rows(x, stride, shape, scale, layout, out) };
        return;
    }
    let shape = ((rows, cols), (rows_pad, steps));
    portable_tiled_rows((x, stride), shape, (scale, layout), out);
}

/// [`tiled_rows`] in portable code.
fn portable_tiled_rows(
    (x, stride): (&[f32], usize),
    ((rows, cols), (rows_pad, steps)): ((usize, usize), (usize, usize)),
    (scale, layout): (f32, Layout),
    out: &mut [u32],
) {
    let value = |i: usize, c: usize| -> u32 {
        if c < cols {
            round_bf16(x[i * stride + c] * scale) as u32
        } else {
            0
        }
    };
    for i in 0..rows_pad {
        for p in 0..steps {
            out[layout.at(steps, i, p)] = if i < rows {
                value(i, 2 * p) | value(i, 2 * p + 1) << 16
            } else {
                0
            };
        }
    }
}

/// `x` rows [n, cols] (row stride `stride`) as B panels: panel P, step q, column c =
/// (x[2q, 64P + c], x[2q+1, 64P + c]), times `scale`; `steps` per panel, zeros past the edges.
pub(super) fn row_pair_panels(
    x: &[f32],
    stride: usize,
    (n, cols): (usize, usize),
    steps: usize,
    scale: f32,
    out: &mut Vec<u32>,
) {
    let panels = cols.div_ceil(NR);
    out.resize(panels * steps * NR, 0);
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx512_bf16() {
        // SAFETY: as `tiled_rows`.
        unsafe { simd::row_pair_panels(x, stride, (n, cols), steps, scale, out) };
        return;
    }
    portable_row_pair_panels((x, stride), (n, cols, steps), scale, out);
}

/// [`row_pair_panels`] in portable code.
fn portable_row_pair_panels(
    (x, stride): (&[f32], usize),
    (n, cols, steps): (usize, usize, usize),
    scale: f32,
    out: &mut [u32],
) {
    let panels = cols.div_ceil(NR);
    let value = |r: usize, c: usize| -> u32 {
        if r < n && c < cols {
            round_bf16(x[r * stride + c] * scale) as u32
        } else {
            0
        }
    };
    for panel in 0..panels {
        for q in 0..steps {
            for j in 0..NR {
                let c = NR * panel + j;
                out[(panel * steps + q) * NR + j] = value(2 * q, c) | value(2 * q + 1, c) << 16;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// 16 values of a row from column c0, zeros past `cols`, times `scale`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(row: *const f32, c0: usize, cols: usize, scale: f32) -> __m512 {
        let v = if c0 + 16 <= cols {
            _mm512_loadu_ps(row.add(c0))
        } else if c0 >= cols {
            return _mm512_setzero_ps();
        } else {
            _mm512_maskz_loadu_ps(((1u32 << (cols - c0)) - 1) as __mmask16, row.add(c0))
        };
        if scale == 1.0 {
            v
        } else {
            _mm512_mul_ps(v, _mm512_set1_ps(scale))
        }
    }

    /// See `super::tiled_rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tiled_rows(
        x: &[f32],
        stride: usize,
        ((rows, cols), (rows_pad, steps)): ((usize, usize), (usize, usize)),
        scale: f32,
        layout: super::Layout,
        out: &mut [u32],
    ) {
        let o = out.as_mut_ptr();
        for i in 0..rows_pad {
            let row = x.as_ptr().add(i.min(rows.saturating_sub(1)) * stride);
            for s in 0..steps / 16 {
                let dst = o.add(layout.at(steps, i, 16 * s)) as *mut __m512i;
                if i >= rows {
                    _mm512_storeu_si512(dst, _mm512_setzero_si512());
                    continue;
                }
                let lo = load16(row, 32 * s, cols, scale);
                let hi = load16(row, 32 * s + 16, cols, scale);
                // The second operand fills the low 16 bf16 values.
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(dst, std::mem::transmute::<__m512bh, __m512i>(v));
            }
        }
    }

    /// See `super::row_pair_panels`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn row_pair_panels(
        x: &[f32],
        stride: usize,
        (n, cols): (usize, usize),
        steps: usize,
        scale: f32,
        out: &mut [u32],
    ) {
        let o = out.as_mut_ptr();
        let half = |r: usize, c0: usize| -> __m512i {
            if r >= n {
                return _mm512_setzero_si512();
            }
            let v = load16(x.as_ptr().add(r * stride), c0, cols, scale);
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm512_cvtepu16_epi32(b)
        };
        for panel in 0..cols.div_ceil(super::NR) {
            for q in 0..steps {
                for g in 0..4 {
                    let c0 = super::NR * panel + 16 * g;
                    let v = _mm512_or_si512(
                        half(2 * q, c0),
                        _mm512_slli_epi32(half(2 * q + 1, c0), 16),
                    );
                    let dst = o.add((panel * steps + q) * super::NR + 16 * g) as *mut __m512i;
                    _mm512_storeu_si512(dst, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector packings (where this CPU has AVX512-BF16) write the bits of the portable
    /// ones, for both layouts, ragged shapes, a scale and values that round both ways.
    #[test]
    fn vector_packings_equal_the_portable_ones() {
        if !cpu_has_avx512_bf16() {
            eprintln!("no AVX512-BF16 here: nothing to compare");
            return;
        }
        let x: Vec<f32> = (0..70 * 77)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.5) * 1.37e-3)
            .collect();
        for layout in [Layout::Tiled, Layout::Rows] {
            for (rows, cols, scale) in [(70usize, 77usize, 1.0), (33, 64, 0.125), (5, 3, 0.3)] {
                let shape = (
                    rows.next_multiple_of(BLOCK),
                    cols.div_ceil(2).next_multiple_of(STEP),
                );
                let mut fast = Vec::new();
                tiled_rows(&x, 77, (rows, cols), shape, (scale, layout), &mut fast);
                let mut slow = vec![7u32; fast.len()];
                portable_tiled_rows((&x, 77), ((rows, cols), shape), (scale, layout), &mut slow);
                assert_eq!(fast, slow, "rows {rows} × {cols}, scale {scale}");
            }
        }
        for (n, cols, steps, scale) in [(64, 128, 32, 1.0), (37, 70, 20, 0.3)] {
            let mut fast = Vec::new();
            row_pair_panels(&x, 77, (n, cols), steps, scale, &mut fast);
            let mut slow = vec![7u32; fast.len()];
            portable_row_pair_panels((&x, 77), (n, cols, steps), scale, &mut slow);
            assert_eq!(fast, slow, "panels of {n} × {cols}, scale {scale}");
        }
    }
}
