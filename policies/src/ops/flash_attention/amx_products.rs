//! The fused attention's tile products on AMX for a bf16 model, as PyTorch's CPU flash
//! attention does them in bf16: operands rounded to bf16 (q, k and v already are), f32
//! sums, the probabilities P and dS rounded to bf16 for the products that read them.
//!
//! Each call packs its inputs once into the layouts `TDPBF16PS` reads (`bf16_dot::amx`):
//! an A operand is tiled — 16 rows × 16 pairs of the reduced dimension per 1 KiB tile — and a
//! B operand is panels of 64 columns, one pair of the reduced dimension per panel row.
//! Products whose A would be a transpose of a per-tile buffer are turned around instead:
//! `dVᵀ = dOᵀ P` and `dKᵀ = Qᵀ dS`, with dOᵀ and Qᵀ packed once per call and P, dS as B
//! (two consecutive rows interleaved, which vector code does without a transpose); the key
//! tile's accumulators are transposed once at its end.
//!
//! | product | A (packed once per call, or per tile) | B |
//! |---|---|---|
//! | S = Q Kᵀ | Q rows, pairs of d | K, pairs of d (`pack_t`) |
//! | O += P V | P rows, pairs of keys (per tile) | V, pairs of keys (`pack_n`) |
//! | dP = dO Vᵀ | dO rows, pairs of d | V, pairs of d |
//! | dVᵀ += dOᵀ P | dOᵀ, pairs of queries | P, pairs of queries (per tile) |
//! | dKᵀ += Qᵀ dS | Qᵀ, pairs of queries | dS, pairs of queries (per tile) |
//! | dQ += dS K | dS rows, pairs of keys (per tile) | K, pairs of keys |

use super::kernel::Dims;
use super::products::{At, TileProducts};
use crate::ops::bf16_dot::{amx, pack_n, pack_t, round_bf16, NR};
use rayon::prelude::*;

/// Rows (and columns) of a block; tiles' sizes must be multiples of this.
const BLOCK: usize = 32;
/// Pairs per tile row.
const STEP: usize = 16;

/// Whether the AMX products can run attention with these shapes: AMX and AVX512-BF16 here
/// and granted, a head size of whole blocks, tiles of whole blocks (keys: whole panels).
pub(super) fn usable(d: usize, tiles: super::Tiles) -> bool {
    amx::available()
        && crate::ops::bf16_dot::cpu_has_avx512_bf16()
        && d.is_multiple_of(BLOCK)
        && d <= NR
        && tiles.queries.is_multiple_of(BLOCK)
        && tiles.keys.is_multiple_of(NR)
}

/// A tiled A operand of `rows` (a multiple of 32) × `steps` pairs (a multiple of 16):
/// strip r (rows 16r..16r+16) at `16·steps·r`, its tile s at `+256·s`, row i at `+16·i`.
struct Tiled {
    data: Vec<u32>,
    steps: usize,
}

impl Tiled {
    /// The strip of row `r0` (a multiple of 16), from pair `p0` (a multiple of 16).
    fn at(&self, r0: usize, p0: usize) -> *const u32 {
        self.data[16 * self.steps * (r0 / 16) + 16 * p0..].as_ptr()
    }
    fn next_strip(&self) -> usize {
        16 * self.steps
    }
}

/// `x` [n, cols] (row stride `stride`) transposed and paired: A row c (a column of x), pair p
/// = (x[2p, c], x[2p+1, c]); rows padded to 32 and pairs to whole tiles with zeros.
fn tiled_columns(x: &[f32], stride: usize, (n, cols): (usize, usize)) -> Tiled {
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
            data[16 * steps * (c / 16) + 256 * (p / 16) + 16 * (c % 16) + p % 16] = lo | hi << 16;
        }
    }
    Tiled { data, steps }
}

/// `x` rows [rows, cols] (row stride `stride`) as a tiled A: pairs along the row, rows padded
/// to `rows_pad` and pairs to `steps`, zeros past the edges, each value times `scale` first.
fn tiled_rows(
    x: &[f32],
    stride: usize,
    (rows, cols): (usize, usize),
    (rows_pad, steps): (usize, usize),
    scale: f32,
    out: &mut Vec<u32>,
) {
    out.resize(rows_pad * steps, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `usable` checked AVX512-BF16; rows < rows are inside x.
    unsafe {
        simd::tiled_rows(x, stride, (rows, cols), (rows_pad, steps), scale, out)
    }
}

/// `x` rows [n, cols] (row stride `stride`) as B panels: panel P, step q, column c =
/// (x[2q, 64P + c], x[2q+1, 64P + c]), times `scale`; `steps` per panel, zeros past the edges.
fn row_pair_panels(
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
    // SAFETY: as `tiled_rows`.
    unsafe {
        simd::row_pair_panels(x, stride, (n, cols), steps, scale, out)
    }
}

/// `c (m × n, row stride ldc) (+)= A · B` by 32 × 32 blocks: A's strips from `a` (`a_next`
/// apart), B's panels from `b` (`panel` apart), `kp` steps (a multiple of 16). m and n are
/// multiples of 32.
///
/// # Safety
/// AMX is available; the operands hold what the strides address.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (a, a_next): (*const u32, usize),
    (b, panel): (*const u32, usize),
    kp: usize,
    (m, n): (usize, usize),
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
) {
    for r0 in (0..m).step_by(BLOCK) {
        for c0 in (0..n).step_by(BLOCK) {
            let bp = b.add(c0 / NR * panel + c0 % NR);
            let ap = a.add(r0 / 16 * a_next);
            amx::tiles_2x2(ap, a_next, bp, kp, c.add(r0 * ldc + c0), ldc, accumulate);
        }
    }
}

/// A call's inputs packed for AMX (the backward's operands only in the backward).
pub(super) struct AmxProducts {
    dims: Dims,
    /// The scale Q's rows were multiplied by when packed: a power of two (1/√d for d = 4ⁿ),
    /// where `bf16(q)·scale` is exact and the scores need no pass of their own; else 1.
    q_scale: f32,
    /// Per (row, head): Q rows, pairs of d.
    q_rows: Vec<Tiled>,
    /// Per (row, key head): K and V packed for `x · Kᵀ` (pairs of d).
    k_t: Vec<Vec<u32>>,
    /// Per (row, key head): V (forward) packed for `P · V` (pairs of keys).
    v_n: Vec<Vec<u32>>,
    /// Backward: per (row, key head) `V` pairs of d and `K` pairs of keys.
    v_t: Vec<Vec<u32>>,
    k_n: Vec<Vec<u32>>,
    /// Backward: per (row, head) dO rows, dOᵀ and Qᵀ.
    o_grad_rows: Vec<Tiled>,
    o_grad_cols: Vec<Tiled>,
    q_cols: Vec<Tiled>,
}

thread_local! {
    /// Per-tile operands (P or dS as A, P and dS as B), reused on each thread.
    static SCRATCH: std::cell::RefCell<[Vec<u32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

impl AmxProducts {
    /// Packs q `[b, h, t, d]`, k and v `[b, kv, s, d]` (values of bf16) and, for the
    /// backward, dO `[b, t, h, d]`.
    pub(super) fn new(
        dims: Dims,
        (q, k, v): (&[f32], &[f32], &[f32]),
        o_grad: Option<&[f32]>,
        scale: f64,
    ) -> Self {
        let Dims { b, h, kv, t, s, d } = dims;
        let scale = scale as f32;
        let power_of_two = scale > 0.0 && scale.is_normal() && scale.to_bits() & 0x7f_ffff == 0;
        let q_scale = if power_of_two { scale } else { 1.0 };
        let kp_d = d / 2;
        let steps_s = s.div_ceil(2).next_multiple_of(STEP);
        let heads = |f: &(dyn Fn(usize, usize) -> Tiled + Sync)| -> Vec<Tiled> {
            (0..b * h)
                .into_par_iter()
                .map(|x| f(x / h, x % h))
                .collect()
        };
        let q_rows = heads(&|bi, hh| {
            let mut data = Vec::new();
            let at = dims.q_row(bi, hh, 0);
            tiled_rows(
                &q[at..],
                d,
                (t, d),
                (t.next_multiple_of(BLOCK), kp_d),
                q_scale,
                &mut data,
            );
            Tiled { data, steps: kp_d }
        });
        let keys = |x: &[f32], transposed: bool| -> Vec<Vec<u32>> {
            (0..b * kv)
                .into_par_iter()
                .map(|i| {
                    let at = dims.k_row(i / kv, i % kv, 0);
                    let bits: Vec<u16> = x[at..at + s * d].iter().map(|&x| round_bf16(x)).collect();
                    if transposed {
                        let mut out = vec![0u32; s.div_ceil(NR) * kp_d * NR];
                        pack_t(&bits, s, d, kp_d, &mut out, false);
                        out
                    } else {
                        let mut out = vec![0u32; d.div_ceil(NR) * steps_s * NR];
                        pack_n(&bits, s, d, steps_s, &mut out, false);
                        out
                    }
                })
                .collect()
        };
        let mut this = Self {
            dims,
            q_scale,
            q_rows,
            k_t: keys(k, true),
            v_n: Vec::new(),
            v_t: Vec::new(),
            k_n: Vec::new(),
            o_grad_rows: Vec::new(),
            o_grad_cols: Vec::new(),
            q_cols: Vec::new(),
        };
        match o_grad {
            None => this.v_n = keys(v, false),
            Some(o) => {
                this.v_t = keys(v, true);
                this.k_n = keys(k, false);
                let hd = h * d;
                this.o_grad_rows = heads(&|bi, hh| {
                    let mut data = Vec::new();
                    let at = dims.o_row(bi, hh, 0);
                    tiled_rows(
                        &o[at..],
                        hd,
                        (t, d),
                        (t.next_multiple_of(BLOCK), kp_d),
                        1.0,
                        &mut data,
                    );
                    Tiled { data, steps: kp_d }
                });
                this.o_grad_cols =
                    heads(&|bi, hh| tiled_columns(&o[dims.o_row(bi, hh, 0)..], hd, (t, d)));
                this.q_cols =
                    heads(&|bi, hh| tiled_columns(&q[dims.q_row(bi, hh, 0)..], d, (t, d)));
            }
        }
        this
    }

    fn head(&self, at: &At) -> usize {
        at.b * self.dims.h + at.h
    }
    fn key_head(&self, at: &At) -> usize {
        at.b * self.dims.kv + at.g
    }
    /// Panel stride and start of key tile `k0` in a `pack_t` packing (pairs of d).
    fn keys_t(&self, packed: &[u32], k0: usize) -> (*const u32, usize) {
        let panel = self.dims.d / 2 * NR;
        (packed[k0 / NR * panel..].as_ptr(), panel)
    }
    /// Panel stride and start of key tile `k0` in a `pack_n` packing (pairs of keys).
    fn keys_n(&self, packed: &[u32], k0: usize) -> (*const u32, usize) {
        let steps = self.dims.s.div_ceil(2).next_multiple_of(STEP);
        (packed[k0 / 2 * NR..].as_ptr(), steps * NR)
    }
}

fn pad(n: usize) -> usize {
    n.next_multiple_of(BLOCK)
}

/// Multiplies the nq × nk corner of a score buffer by `scale`.
fn scale_tile(sc: &mut [f32], ls: usize, (nq, nk): (usize, usize), scale: f32) {
    if scale != 1.0 {
        for i in 0..nq {
            sc[i * ls..i * ls + nk].iter_mut().for_each(|x| *x *= scale);
        }
    }
}

// SAFETY (every product below): `usable` held when these were packed (AMX granted); each
// A strip and B panel addressed lies inside its packing (queries padded to 32, keys to 64,
// pairs of keys to 16 steps), each output block inside its buffer (tiles of whole blocks).
impl TileProducts<f32> for AmxProducts {
    fn scores(&self, at: &At, scale: f32, sc: &mut [f32], ls: usize) {
        let a = &self.q_rows[self.head(at)];
        let b = self.keys_t(&self.k_t[self.key_head(at)], at.k0);
        let kp = self.dims.d / 2;
        let out = (sc.as_mut_ptr(), ls);
        unsafe {
            product(
                (a.at(at.q0, 0), a.next_strip()),
                b,
                kp,
                (pad(at.nq), pad(at.nk)),
                out,
                false,
            )
        };
        scale_tile(sc, ls, (at.nq, at.nk), scale / self.q_scale);
    }

    fn pv(&self, at: &At, p: &[f32], ls: usize, acc: &mut [f32]) {
        let kp = pad(at.nk) / 2;
        let b = self.keys_n(&self.v_n[self.key_head(at)], at.k0);
        let d = self.dims.d;
        SCRATCH.with(|s| {
            let a = &mut s.borrow_mut()[0];
            tiled_rows(p, ls, (at.nq, at.nk), (pad(at.nq), kp), 1.0, a);
            let out = (acc.as_mut_ptr(), d);
            unsafe { product((a.as_ptr(), 16 * kp), b, kp, (pad(at.nq), d), out, true) };
        });
    }

    fn dp(&self, at: &At, dp: &mut [f32], ls: usize) {
        let a = &self.o_grad_rows[self.head(at)];
        let b = self.keys_t(&self.v_t[self.key_head(at)], at.k0);
        let kp = self.dims.d / 2;
        let out = (dp.as_mut_ptr(), ls);
        unsafe {
            product(
                (a.at(at.q0, 0), a.next_strip()),
                b,
                kp,
                (pad(at.nq), pad(at.nk)),
                out,
                false,
            )
        };
    }

    fn dv_dk(
        &self,
        at: &At,
        p: &[f32],
        ds: &[f32],
        ls: usize,
        scale: f32,
        dv: &mut [f32],
        dk: &mut [f32],
    ) {
        let steps = pad(at.nq) / 2;
        let d = self.dims.d;
        let (o_cols, q_cols) = (
            &self.o_grad_cols[self.head(at)],
            &self.q_cols[self.head(at)],
        );
        SCRATCH.with(|s| {
            let [b0, b1] = &mut *s.borrow_mut();
            for (x, scale, a, acc, buf) in [(p, 1.0, o_cols, dv, b0), (ds, scale, q_cols, dk, b1)] {
                row_pair_panels(x, ls, (at.nq, at.nk), steps, scale, buf);
                let a = (a.at(0, at.q0 / 2), a.next_strip());
                let out = (acc.as_mut_ptr(), ls);
                unsafe {
                    product(
                        a,
                        (buf.as_ptr(), steps * NR),
                        steps,
                        (d, pad(at.nk)),
                        out,
                        true,
                    )
                };
            }
        });
    }

    fn dq(&self, at: &At, ds: &[f32], ls: usize, scale: f32, dq: &mut [f32]) {
        let kp = pad(at.nk) / 2;
        let b = self.keys_n(&self.k_n[self.key_head(at)], at.k0);
        let d = self.dims.d;
        SCRATCH.with(|s| {
            let a = &mut s.borrow_mut()[0];
            tiled_rows(ds, ls, (at.nq, at.nk), (pad(at.nq), kp), scale, a);
            let out = (dq.as_mut_ptr(), d);
            unsafe { product((a.as_ptr(), 16 * kp), b, kp, (pad(at.nq), d), out, true) };
        });
    }

    /// The accumulators hold dKᵀ, dVᵀ: [d, ls].
    fn key_rows(&self, acc: &[f32], nk: usize, ls: usize) -> Vec<f32> {
        let d = self.dims.d;
        let mut rows = vec![0f32; nk * d];
        for (c, col) in acc.chunks(ls).take(d).enumerate() {
            for (j, &x) in col[..nk].iter().enumerate() {
                rows[j * d + c] = x;
            }
        }
        rows
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
        (rows, cols): (usize, usize),
        (rows_pad, steps): (usize, usize),
        scale: f32,
        out: &mut [u32],
    ) {
        let o = out.as_mut_ptr();
        for i in 0..rows_pad {
            let row = x.as_ptr().add(i.min(rows.saturating_sub(1)) * stride);
            for s in 0..steps / 16 {
                let dst = o.add(16 * steps * (i / 16) + 256 * s + 16 * (i % 16)) as *mut __m512i;
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
