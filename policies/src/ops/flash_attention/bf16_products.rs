//! The fused attention's tile products for a bf16 model at the CPU's bf16 rate, as PyTorch's
//! CPU flash attention does them in bf16: operands rounded to bf16 (q, k and v already are),
//! f32 sums, the probabilities P and dS rounded to bf16 for the products that read them. The
//! engine is the one of the model's other bf16 products (`bf16_dot::engine`): AMX's
//! `TDPBF16PS` where the CPU has it, else `VDPBF16PS` tiles (Zen 4) or their emulation.
//!
//! Each call packs its inputs once into the layouts the engine reads (`bf16_packing.rs`). A B operand is panels
//! of 64 columns, one pair of the reduced dimension per panel row (`bf16_dot::pack_t` /
//! `pack_n`), for both engines. An A operand is rows of pairs of the reduced dimension: for
//! AMX tiled (16 rows × 16 pairs per 1 KiB tile), for `VDPBF16PS` row after row.
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

use super::bf16_packing::{row_pair_panels, tiled_columns, tiled_rows, Layout, PackedA};
use super::kernel::Dims;
use super::products::{At, TileProducts};
use crate::ops::bf16_dot::{amx, cpu_has_avx512_bf16, pack_n, pack_t, round_bf16, Engine, MR, NR};
use rayon::prelude::*;

/// Rows (and columns) of a block; tiles' sizes must be multiples of this.
pub(super) const BLOCK: usize = 32;
/// Pairs per AMX tile row (and per group the packing writes at once).
pub(super) const STEP: usize = 16;

/// Whether `engine` can run attention with these shapes: for AMX, AMX and AVX512-BF16 here
/// and granted; a head size of whole blocks, tiles of whole blocks (keys: whole panels).
pub(super) fn usable(engine: Engine, d: usize, tiles: super::Tiles) -> bool {
    let hardware = match engine {
        Engine::Amx => amx::available() && cpu_has_avx512_bf16(),
        Engine::Tiles(_) => true,
    };
    hardware
        && d.is_multiple_of(BLOCK)
        && d <= NR
        && tiles.queries.is_multiple_of(BLOCK)
        && tiles.keys.is_multiple_of(NR)
}

/// `c (m × n, row stride ldc) (+)= A · B` on `engine`: A's rows from `a` (`a_next` the
/// layout's stride), B's panels from `b` (`panel` apart), `kp` steps (a multiple of 16). m
/// and n are multiples of 32: AMX runs 32 × 32 blocks, `VDPBF16PS` 6 × 64 tiles.
///
/// # Safety
/// The engine runs on this CPU; the operands hold what the strides address.
unsafe fn product(
    engine: Engine,
    (a, a_next): (*const u32, usize),
    (b, panel): (*const u32, usize),
    kp: usize,
    (m, n): (usize, usize),
    (c, ldc, accumulate): (*mut f32, usize, bool),
) {
    match engine {
        Engine::Amx => {
            for r0 in (0..m).step_by(BLOCK) {
                for c0 in (0..n).step_by(BLOCK) {
                    let bp = b.add(c0 / NR * panel + c0 % NR);
                    let ap = a.add(r0 / 16 * a_next);
                    amx::tiles_2x2(ap, a_next, bp, kp, c.add(r0 * ldc + c0), ldc, accumulate);
                }
            }
        }
        Engine::Tiles(kernels) => {
            for c0 in (0..n).step_by(NR) {
                let bp = b.add(c0 / NR * panel);
                for r0 in (0..m).step_by(MR) {
                    let (mr, nr) = (MR.min(m - r0), NR.min(n - c0));
                    let (ap, out) = (a.add(r0 * a_next), c.add(r0 * ldc + c0));
                    (kernels.tile)(kp, ap, a_next, bp, out, ldc, mr, nr, accumulate);
                }
            }
        }
    }
}

/// A call's inputs packed for the bf16 engine (the backward's operands only in the backward).
pub(super) struct Bf16Products {
    engine: Engine,
    dims: Dims,
    /// The scale Q's rows were multiplied by when packed: a power of two (1/√d for d = 4ⁿ),
    /// where `bf16(q)·scale` is exact and the scores need no pass of their own; else 1.
    q_scale: f32,
    /// Per (row, head): Q rows, pairs of d.
    q_rows: Vec<PackedA>,
    /// Per (row, key head): K and V packed for `x · Kᵀ` (pairs of d).
    k_t: Vec<Vec<u32>>,
    /// Per (row, key head): V (forward) packed for `P · V` (pairs of keys).
    v_n: Vec<Vec<u32>>,
    /// Backward: per (row, key head) `V` pairs of d and `K` pairs of keys.
    v_t: Vec<Vec<u32>>,
    k_n: Vec<Vec<u32>>,
    /// Backward: per (row, head) dO rows, dOᵀ and Qᵀ.
    o_grad_rows: Vec<PackedA>,
    o_grad_cols: Vec<PackedA>,
    q_cols: Vec<PackedA>,
}

thread_local! {
    /// Per-tile operands (P or dS as A, P and dS as B), reused on each thread.
    static SCRATCH: std::cell::RefCell<[Vec<u32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

impl Bf16Products {
    /// Packs q `[b, h, t, d]`, k and v `[b, kv, s, d]` (values of bf16) and, for the
    /// backward, dO `[b, t, h, d]`.
    pub(super) fn new(
        engine: Engine,
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
        let heads = |f: &(dyn Fn(usize, usize) -> PackedA + Sync)| -> Vec<PackedA> {
            (0..b * h)
                .into_par_iter()
                .map(|x| f(x / h, x % h))
                .collect()
        };
        let layout = Layout::of(engine);
        // Rows of q or dO ([t, d] at `at`, rows `stride` apart) as an A operand, pairs of d.
        let rows_of = |x: &[f32], stride: usize, scale: f32| {
            let mut data = Vec::new();
            let shape = (t.next_multiple_of(BLOCK), kp_d);
            tiled_rows(x, stride, (t, d), shape, (scale, layout), &mut data);
            PackedA {
                data,
                steps: kp_d,
                layout,
            }
        };
        let q_rows = heads(&|bi, hh| rows_of(&q[dims.q_row(bi, hh, 0)..], d, q_scale));
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
            engine,
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
                this.o_grad_rows = heads(&|bi, hh| rows_of(&o[dims.o_row(bi, hh, 0)..], hd, 1.0));
                this.o_grad_cols =
                    heads(&|bi, hh| tiled_columns(&o[dims.o_row(bi, hh, 0)..], hd, (t, d), layout));
                this.q_cols =
                    heads(&|bi, hh| tiled_columns(&q[dims.q_row(bi, hh, 0)..], d, (t, d), layout));
            }
        }
        this
    }

    /// How this engine's A operands lie.
    fn layout(&self) -> Layout {
        Layout::of(self.engine)
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

    /// `out (nq × nk, row stride ls) = rows · keysᵀ` for query-shaped rows packed once per
    /// call (Q or dO, pairs of d) and a key tile of `k_t`-style packing (K or V).
    fn rows_times_keys_t(&self, at: &At, rows: &PackedA, keys: &[u32], out: &mut [f32], ls: usize) {
        let a = rows.at(at.q0, 0);
        let b = self.keys_t(keys, at.k0);
        let (kp, shape) = (self.dims.d / 2, (pad(at.nq), pad(at.nk)));
        // SAFETY: see the impl below.
        unsafe { product(self.engine, a, b, kp, shape, (out.as_mut_ptr(), ls, false)) };
    }

    /// `out (nq × d) += (scale · x) · keys` for a score-shaped tile `x` (P or dS, row
    /// stride ls), packed here, and a key tile of `k_n`-style packing (V or K).
    fn tile_times_keys(
        &self,
        at: &At,
        x: &[f32],
        ls: usize,
        scale: f32,
        keys: &[u32],
        out: &mut [f32],
    ) {
        let kp = pad(at.nk) / 2;
        let b = self.keys_n(keys, at.k0);
        let (d, layout) = (self.dims.d, self.layout());
        SCRATCH.with(|s| {
            let a = &mut s.borrow_mut()[0];
            let shape = ((at.nq, at.nk), (pad(at.nq), kp));
            tiled_rows(x, ls, shape.0, shape.1, (scale, layout), a);
            let a = (a.as_ptr(), layout.stride(kp));
            let out = (out.as_mut_ptr(), d, true);
            // SAFETY: see the impl below.
            unsafe { product(self.engine, a, b, kp, (pad(at.nq), d), out) };
        });
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

// SAFETY (every product below and in the helpers above): `usable` held when these were
// packed (for AMX: granted); each A row and B panel addressed lies inside its packing
// (queries padded to 32, keys to 64, pairs of keys to 16 steps), each output tile inside its
// buffer (tiles of whole blocks).
impl TileProducts<f32> for Bf16Products {
    fn scores(&self, at: &At, scale: f32, sc: &mut [f32], ls: usize) {
        let (rows, keys) = (&self.q_rows[self.head(at)], &self.k_t[self.key_head(at)]);
        self.rows_times_keys_t(at, rows, keys, sc, ls);
        scale_tile(sc, ls, (at.nq, at.nk), scale / self.q_scale);
    }

    fn pv(&self, at: &At, p: &[f32], ls: usize, acc: &mut [f32]) {
        self.tile_times_keys(at, p, ls, 1.0, &self.v_n[self.key_head(at)], acc);
    }

    fn dp(&self, at: &At, dp: &mut [f32], ls: usize) {
        let (rows, keys) = (
            &self.o_grad_rows[self.head(at)],
            &self.v_t[self.key_head(at)],
        );
        self.rows_times_keys_t(at, rows, keys, dp, ls);
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
                let (a, b) = (a.at(0, at.q0 / 2), (buf.as_ptr(), steps * NR));
                let out = (acc.as_mut_ptr(), ls, true);
                unsafe { product(self.engine, a, b, steps, (d, pad(at.nk)), out) };
            }
        });
    }

    fn dq(&self, at: &At, ds: &[f32], ls: usize, scale: f32, dq: &mut [f32]) {
        self.tile_times_keys(at, ds, ls, scale, &self.k_n[self.key_head(at)], dq);
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
