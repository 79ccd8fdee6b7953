//! Products with a frozen bf16 weight at the CPU's bf16 rate: AVX512-BF16's `VDPBF16PS`
//! multiplies 16 pairs of bf16 values and adds each pair's two products into an f32 lane —
//! 64 FLOP per instruction, twice what f32 FMA on the widened weight does. The activations
//! are rounded to bf16 first (round to nearest even), as a bf16 model in PyTorch holds them;
//! every sum is in f32. For `y = x · Wᵀ` (`x` [m, k], `W` [n, k]) and `dx = dy · W`:
//!
//! `y[i, j]  = Σ_p  bf16(x[i, 2p])·W[j, 2p] + bf16(x[i, 2p+1])·W[j, 2p+1]`   (pairs of k)
//! `dx[i, c] = Σ_q  bf16(dy[i, 2q])·W[2q, c] + bf16(dy[i, 2q+1])·W[2q+1, c]` (pairs of n)
//!
//! Many rows (training, scoring, prefill): the weight is packed a block of rows at a time
//! into panels of [`NR`] output columns, each step of a panel one pair of the reduced
//! dimension for all of them (`pack_t` pairs k for `x · Wᵀ`; `pack_n` pairs two weight rows
//! for `dy · W`), and a [`MR`] × [`NR`] tile kernel broadcasts a pair of an activation row
//! against each vector of the panel (24 accumulators). Packing per product instead of once at
//! load keeps no second copy of the weights; at the 1,024 rows of a training step it reads
//! the weight once per ~1,000 multiply-adds of each value. Few rows (decoding): a row-major
//! weight row already holds its pairs of k, so [`rowdot`] dots it with each input row
//! straight from memory, 32 values per instruction.
//!
//! `VDPBF16PS` treats bf16 denormals as zero, flushes denormal results, and adds the odd
//! product of a pair before the even one, each with one rounding (an FMA); [`dot_pair`] and
//! [`round_bf16`] emulate it exactly, and the tests check the kernels against that emulation
//! bit for bit (on any host: the emulated tile kernel runs the same driver).

use rayon::prelude::*;
use std::sync::OnceLock;

/// Activation rows per tile.
pub const MR: usize = 6;
/// Output columns per packed panel: four 16-lane vectors.
pub const NR: usize = 64;
/// Pairs of the reduced dimension per pass over a panel (a 64 KiB piece of it, in L2).
const KC: usize = 256;
/// Activation rows per parallel task.
const MC: usize = 16 * MR;

/// The engine for a bf16 weight's products with many rows, chosen once per process:
/// AMX where the CPU has it and Linux grants it, else the `VDPBF16PS` tiles where the CPU
/// has AVX512-BF16, else None (the weight is widened to f32). `RLFT_BF16_KERNEL` = `amx`,
/// `avx512bf16` or `f32` picks one (an unavailable one falls back to f32).
pub fn engine() -> Option<Engine> {
    if let Some(chosen) = ENGINE_OVERRIDE.get() {
        return chosen;
    }
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    *ENGINE.get_or_init(|| {
        let tiles = || Kernels::hardware().map(Engine::Tiles);
        let amx = || amx::available().then_some(Engine::Amx);
        match std::env::var("RLFT_BF16_KERNEL").as_deref() {
            Ok("f32") => None,
            Ok("avx512bf16") => tiles(),
            Ok("amx") => amx(),
            _ => amx().or_else(tiles),
        }
    })
}

thread_local! {
    /// [`with_engine`]'s choice for products started on this thread.
    static ENGINE_OVERRIDE: std::cell::Cell<Option<Option<Engine>>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` with `engine` as [`engine`]'s answer on this thread (the products `f` starts
/// here): tests compare the engines with each other and with the widened path on one host.
pub fn with_engine<R>(engine: Option<Engine>, f: impl FnOnce() -> R) -> R {
    let before = ENGINE_OVERRIDE.replace(Some(engine));
    let out = f();
    ENGINE_OVERRIDE.set(before);
    out
}

/// The dot kernel for decoding's few rows: `VDPBF16PS` when it is also the engine of the
/// many-row products. Where AMX is the engine (Intel), `VDPBF16PS` issues at half the
/// rate of f32 FMA on 512-bit vectors and decoding keeps the widening kernels, on rows
/// rounded to bf16 like every other product (measured: docs/performance.md).
pub fn decode_dot() -> Option<DotKernel> {
    match engine() {
        Some(Engine::Tiles(k)) => Some(k.dot),
        _ => None,
    }
}

/// What `rlft bench` prints for a bf16 weight's products.
pub fn kernel_name() -> &'static str {
    match engine() {
        Some(Engine::Amx) => {
            "amx-bf16 (TDPBF16PS tiles; decoding: bf16 rows by f32 FMA on the widened weight)"
        }
        Some(Engine::Tiles(_)) => "avx512-bf16 (VDPBF16PS, bf16 activations, f32 sums)",
        None if cpu_has_avx512_bf16() || amx::available() => {
            "f32 FMA on widened bf16 (RLFT_BF16_KERNEL=f32)"
        }
        None => "f32 FMA on widened bf16 (no avx512_bf16 or AMX on this CPU)",
    }
}

/// The CPU runs `VDPBF16PS` (and the AVX-512 loads and masks its kernels use).
pub fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// ---------------------------------------------------------------------------------------
// The instruction, emulated.

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

// ---------------------------------------------------------------------------------------
// Operands.

/// Rows `x` [m, k] (row-major) rounded to bf16 and paired along k: [rows, pairs] pairs
/// (rows ≥ m, pairs ≥ ⌈k/2⌉), the low half the even column, everything past `x` zero.
pub fn round_pairs(
    x: &[f32],
    (m, k): (usize, usize),
    (rows, pairs): (usize, usize),
    parallel: bool,
) -> Vec<u32> {
    assert!(rows >= m && pairs >= k.div_ceil(2) && x.len() >= m * k);
    let mut out = uninit(rows * pairs);
    if pairs == 0 {
        return out;
    }
    let simd = cpu_has_avx512_bf16();
    let row = |(i, o): (usize, &mut [u32])| {
        if i >= m {
            return o.fill(0);
        }
        let (mut xr, mut o) = (&x[i * k..(i + 1) * k], o);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has avx512bf16 (checked above).
            let done = unsafe { avx512::round_row(xr, o) };
            (xr, o) = (&xr[2 * done..], &mut o[done..]);
        }
        let (data, pad) = o.split_at_mut(xr.len().div_ceil(2));
        for (v, pair) in data.iter_mut().zip(xr.chunks(2)) {
            let lo = round_bf16(pair[0]) as u32;
            let hi = pair.get(1).map_or(0, |&h| round_bf16(h) as u32);
            *v = lo | hi << 16;
        }
        pad.fill(0);
    };
    if parallel && m > 1 {
        out.par_chunks_mut(pairs).enumerate().for_each(row);
    } else {
        out.chunks_mut(pairs).enumerate().for_each(row);
    }
    out
}

/// A vector of `len` values the caller writes in full before reading any.
fn uninit<T: Copy>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: T is Copy (no drop), and every caller writes all `len` values before it reads
    // them (round_pairs: every row; the products: every output tile).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// Packs `w` rows [rb, k] (bf16 bits, row-major) for `x · wᵀ` into `out`: panel `P` of
/// output columns `64P..64P+64`, step `p`: `(w[j][2p], w[j][2p+1])` for each column `j`
/// (zeros past the edges). [⌈rb/64⌉, steps, 64] pairs (steps ≥ ⌈k/2⌉); every one is
/// written.
pub fn pack_t(w: &[u16], rb: usize, k: usize, steps: usize, out: &mut [u32], parallel: bool) {
    let kp = steps;
    assert!(steps >= k.div_ceil(2));
    let panels = rb.div_ceil(NR);
    let out = &mut out[..panels * kp * NR];
    let panel = |(pi, o): (usize, &mut [u32])| {
        let cols = NR.min(rb - pi * NR);
        for c in 0..cols {
            let row = &w[(pi * NR + c) * k..(pi * NR + c + 1) * k];
            for (p, pair) in row.chunks(2).enumerate() {
                let hi = pair.get(1).map_or(0, |&h| h as u32);
                o[p * NR + c] = pair[0] as u32 | hi << 16;
            }
        }
        for step in o.chunks_exact_mut(NR).skip(k.div_ceil(2)) {
            step[..cols].fill(0);
        }
        if cols < NR {
            for step in o.chunks_exact_mut(NR) {
                step[cols..].fill(0);
            }
        }
    };
    if kp == 0 {
        return;
    }
    if parallel {
        out.par_chunks_mut(kp * NR).enumerate().for_each(panel);
    } else {
        out.chunks_mut(kp * NR).enumerate().for_each(panel);
    }
}

/// Packs `w` rows [rb, k] for `dy · w` (the reduction runs over w's rows) into `out`: panel
/// `P` of output columns `64P..64P+64` (of k), step `q`: `(w[2q][c], w[2q+1][c])` — two
/// weight rows interleaved. [⌈k/64⌉, steps, 64] pairs (steps ≥ ⌈rb/2⌉); every one is
/// written.
pub fn pack_n(w: &[u16], rb: usize, k: usize, steps: usize, out: &mut [u32], parallel: bool) {
    let qp = steps;
    assert!(steps >= rb.div_ceil(2));
    let panels = k.div_ceil(NR);
    let out = &mut out[..panels * qp * NR];
    let panel = |(pi, o): (usize, &mut [u32])| {
        let (c0, cols) = (pi * NR, NR.min(k - pi * NR));
        for (q, step) in o.chunks_exact_mut(NR).enumerate() {
            if 2 * q >= rb {
                step.fill(0);
                continue;
            }
            let lo = &w[2 * q * k + c0..2 * q * k + c0 + cols];
            let (dst, pad) = step.split_at_mut(cols);
            if 2 * q + 1 < rb {
                let hi = &w[(2 * q + 1) * k + c0..(2 * q + 1) * k + c0 + cols];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = l as u32 | (h as u32) << 16;
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = l as u32;
                }
            }
            pad.fill(0);
        }
    };
    if qp == 0 {
        return;
    }
    if parallel {
        out.par_chunks_mut(qp * NR).enumerate().for_each(panel);
    } else {
        out.chunks_mut(qp * NR).enumerate().for_each(panel);
    }
}

// ---------------------------------------------------------------------------------------
// The packed product.

/// An `mr × nr` tile (mr ≤ [`MR`], nr ≤ [`NR`]) over `kc` pairs: `c[i·ldc + j] (+)=
/// Σ_p a[i·lda + p] ⋅ b[p·NR + j]` (⋅ = [`dot_pair`]), from zero or, with `accumulate`, from
/// what `c` holds.
pub type TileKernel =
    unsafe fn(usize, *const u32, usize, *const u32, *mut f32, usize, usize, usize, bool);

/// The tile kernel this CPU runs: `VDPBF16PS` (None without it).
pub fn tile_kernel() -> Option<TileKernel> {
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx512_bf16() {
        return Some(avx512::tile);
    }
    None
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

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the tasks below write disjoint tiles of the destination.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// `c[i·ldc + j] (+)= Σ_p a[i·lda + p] ⋅ B[p, j]` for i < m, j < ncols: `a` pairs (the first
/// `kp` of each row are used), `b` packed panels of `kp` steps ([`pack_t`], [`pack_n`]).
/// Tasks of [`MC`] rows × one panel; each passes over the panel [`KC`] steps at a time.
///
/// # Safety
/// `c` must be writable for m rows of ncols values at row stride `ldc` (and initialized with
/// `accumulate`); no other thread may touch those values meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_packed(
    (a, lda): (&[u32], usize),
    m: usize,
    kp: usize,
    b: &[u32],
    ncols: usize,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
    parallel: bool,
    tile: TileKernel,
) {
    let panels = ncols.div_ceil(NR);
    assert!(b.len() >= panels * kp * NR);
    assert!(m == 0 || a.len() >= (m - 1) * lda + kp);
    if m == 0 || ncols == 0 {
        return;
    }
    if kp == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), ncols).fill(0.0);
            }
        }
        return;
    }
    let cp = SendPtr(c);
    let row_blocks = m.div_ceil(MC);
    let task = |t: usize| {
        let (rb, pi) = (t / panels, t % panels);
        let (i0, i1) = (rb * MC, ((rb + 1) * MC).min(m));
        let (j0, nr) = (pi * NR, NR.min(ncols - pi * NR));
        let panel = &b[pi * kp * NR..(pi + 1) * kp * NR];
        for p0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - p0);
            for i in (i0..i1).step_by(MR) {
                let mr = MR.min(i1 - i);
                // SAFETY: rows i..i+mr of a hold pairs p0..p0+kc; the panel holds steps
                // p0..p0+kc; the tile of c is this task's alone.
                unsafe {
                    tile(
                        kc,
                        a.as_ptr().add(i * lda + p0),
                        lda,
                        panel.as_ptr().add(p0 * NR),
                        cp.get().add(i * ldc + j0),
                        ldc,
                        mr,
                        nr,
                        accumulate || p0 > 0,
                    )
                }
            }
        }
    };
    let tasks = row_blocks * panels;
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

// ---------------------------------------------------------------------------------------
// Few rows: dot products of row-major rows.

/// Input rows per dot tile and weight rows per dot tile.
const DOT_ROWS: usize = 4;
const DOT_COLS: usize = 4;

/// A kernel dotting `mr` ≤ 4 bf16 rows (row stride `k`) with `nc` ≤ 4 weight rows (row
/// stride `k`), `k` values each: `out[i][j]`.
pub type DotKernel = unsafe fn(*const u16, *const u16, usize, usize, usize) -> [[f32; 4]; 4];

/// The dot kernel this CPU runs: `VDPBF16PS` (None without it).
pub fn dot_kernel() -> Option<DotKernel> {
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx512_bf16() {
        return Some(avx512::dots);
    }
    None
}

/// The 16 lanes of a dot product's accumulator summed in a fixed tree: lanes l and l+8,
/// then l and l+4, l+2, l+1.
fn sum_lanes(mut v: [f32; 16]) -> f32 {
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

/// `out[i·n + j] = Σ bf16(x[i]) · w[j]` for `x` [m, k] f32 and `w` [n, k] bf16 bits, both
/// row-major, by `kernel` (tiles of 4 input × 4 weight rows); `parallel` splits the weight
/// rows across rayon's threads.
pub fn rowdot(
    x: &[f32],
    w: &[u16],
    (m, n, k): (usize, usize, usize),
    parallel: bool,
    kernel: DotKernel,
) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k);
    let xb: Vec<u16> = x[..m * k].iter().map(|&v| round_bf16(v)).collect();
    let mut out = vec![0f32; m * n];
    let dst = SendPtr(out.as_mut_ptr());
    let tile = |t: usize| {
        let j0 = t * DOT_COLS;
        let nc = DOT_COLS.min(n - j0);
        for i0 in (0..m).step_by(DOT_ROWS) {
            let mr = DOT_ROWS.min(m - i0);
            // SAFETY: rows i0..i0+mr of xb and j0..j0+nc of w hold k values each.
            let d = unsafe { kernel(xb.as_ptr().add(i0 * k), w.as_ptr().add(j0 * k), k, mr, nc) };
            for (i, row) in d.iter().enumerate().take(mr) {
                for (j, &v) in row.iter().enumerate().take(nc) {
                    // SAFETY: (i0 + i, j0 + j) is in bounds and written by this tile only.
                    unsafe { *dst.get().add((i0 + i) * n + j0 + j) = v };
                }
            }
        }
    };
    let tiles = n.div_ceil(DOT_COLS);
    if parallel && tiles > 1 {
        (0..tiles).into_par_iter().for_each(tile);
    } else {
        (0..tiles).for_each(tile);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The products.

/// The two kernels a product uses.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub tile: TileKernel,
    pub dot: DotKernel,
}

impl Kernels {
    /// `VDPBF16PS`, when this CPU has it.
    pub fn hardware() -> Option<Self> {
        Some(Self {
            tile: tile_kernel()?,
            dot: dot_kernel()?,
        })
    }

    /// The portable emulation (the tests' reference; any host).
    pub fn emulated() -> Self {
        Self {
            tile: tile_emulated,
            dot: dots_emulated,
        }
    }
}

/// Up to this many input rows take the dot-product path (no packing).
pub const DOT_MAX_ROWS: usize = 16;

/// What computes a packed product: the `VDPBF16PS` tile kernel (or its emulation), or AMX.
#[derive(Clone, Copy)]
pub enum Engine {
    Tiles(Kernels),
    Amx,
}

impl Engine {
    /// Operands are padded to whole tiles: (rows, steps of the reduced dimension).
    fn align(self) -> (usize, usize) {
        match self {
            Engine::Tiles(_) => (1, 1),
            Engine::Amx => (amx::ROWS, amx::STEPS),
        }
    }

    /// # Safety
    /// As [`gemm_packed`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        self,
        a: (&[u32], usize),
        m: usize,
        kp: usize,
        b: &[u32],
        ncols: usize,
        c: (*mut f32, usize),
        accumulate: bool,
        parallel: bool,
    ) {
        match self {
            Engine::Tiles(k) => gemm_packed(a, m, kp, b, ncols, c, accumulate, parallel, k.tile),
            Engine::Amx => amx::gemm(a, m, kp, b, ncols, c, accumulate, parallel),
        }
    }
}

/// The steps of the reduced dimension `len` takes packed for `engine`.
pub fn steps(len: usize, engine: Engine) -> usize {
    len.div_ceil(2).next_multiple_of(engine.align().1)
}

/// `x · wᵀ` for `x` [m, k] f32 and `w` [n, k] bf16 bits (row-major): [m, n] f32. `packed`:
/// all of `w` as [`pack_t`] packs it for `engine` (a cached copy), else at most `block`
/// weight values are packed at a time. Few rows take the dot path of `dot`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t(
    x: &[f32],
    w: &[u16],
    (m, n, k): (usize, usize, usize),
    block: usize,
    parallel: bool,
    engine: Engine,
    dot: DotKernel,
    packed: Option<&[u32]>,
) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k);
    if m <= DOT_MAX_ROWS {
        return rowdot(x, w, (m, n, k), parallel, dot);
    }
    let (ra, sa) = engine.align();
    let kp = k.div_ceil(2).next_multiple_of(sa);
    let xa = round_pairs(x, (m, k), (m.next_multiple_of(ra), kp), parallel);
    // Every output tile is written (accumulate = false).
    let mut dst = uninit(m * n);
    if let Some(packed) = packed {
        assert_eq!(
            packed.len(),
            n.div_ceil(NR) * kp * NR,
            "a packing of another shape"
        );
        // SAFETY: dst holds m rows of n values.
        unsafe {
            engine.gemm(
                (&xa, kp),
                m,
                kp,
                packed,
                n,
                (dst.as_mut_ptr(), n),
                false,
                parallel,
            )
        };
        return dst;
    }
    // Whole panels per block: each block's columns start a panel.
    let nb = (block / k.max(1)).max(NR) / NR * NR;
    let len = nb.min(n).div_ceil(NR) * kp * NR;
    with_scratch(len, |packed| {
        for j0 in (0..n).step_by(nb) {
            let rb = nb.min(n - j0);
            pack_t(&w[j0 * k..(j0 + rb) * k], rb, k, kp, packed, parallel);
            // SAFETY: dst holds m rows of n values; columns j0..j0+rb are in each row.
            unsafe {
                engine.gemm(
                    (&xa, kp),
                    m,
                    kp,
                    packed,
                    rb,
                    (dst.as_mut_ptr().add(j0), n),
                    false,
                    parallel,
                )
            };
        }
    });
    dst
}

/// `dy · w` for `dy` [m, n] f32 and `w` [n, k] bf16 bits (row-major): [m, k] f32 (the input
/// gradient of `x · wᵀ`). `packed`: all of `w` as [`pack_n`] packs it for `engine`, else it
/// is summed over blocks of at most `block` weight values.
#[allow(clippy::too_many_arguments)]
pub fn matmul_n(
    dy: &[f32],
    w: &[u16],
    (m, n, k): (usize, usize, usize),
    block: usize,
    parallel: bool,
    engine: Engine,
    packed: Option<&[u32]>,
) -> Vec<f32> {
    assert!(dy.len() >= m * n && w.len() >= n * k);
    if n == 0 {
        return vec![0f32; m * k];
    }
    // The first block (or the whole packing) writes every output tile (accumulate = false).
    let mut dst = uninit(m * k);
    let (ra, sa) = engine.align();
    let np = n.div_ceil(2).next_multiple_of(sa);
    let dya = round_pairs(dy, (m, n), (m.next_multiple_of(ra), np), parallel);
    if let Some(packed) = packed {
        assert_eq!(
            packed.len(),
            k.div_ceil(NR) * np * NR,
            "a packing of another shape"
        );
        // SAFETY: dst holds m rows of k values.
        unsafe {
            engine.gemm(
                (&dya, np),
                m,
                np,
                packed,
                k,
                (dst.as_mut_ptr(), k),
                false,
                parallel,
            )
        };
        return dst;
    }
    // Each block starts a pair, and a whole number of the engine's steps.
    let unit = 2 * sa;
    let nb = ((block / k.max(1)).max(unit) / unit * unit).min(n.next_multiple_of(unit));
    let len = k.div_ceil(NR) * (nb / 2) * NR;
    with_scratch(len, |packed| {
        for j0 in (0..n).step_by(nb) {
            let rb = nb.min(n - j0);
            let steps = rb.div_ceil(2).next_multiple_of(sa);
            pack_n(&w[j0 * k..(j0 + rb) * k], rb, k, steps, packed, parallel);
            // SAFETY: dst holds m rows of k values; dya's rows hold pairs j0/2..j0/2+steps
            // of np (the padding zero).
            unsafe {
                engine.gemm(
                    (&dya[j0 / 2..], np),
                    m,
                    steps,
                    packed,
                    k,
                    (dst.as_mut_ptr(), k),
                    j0 > 0,
                    parallel,
                )
            };
        }
    });
    dst
}

thread_local! {
    /// The packed block, reused across products on this thread.
    static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on `len` scratch pairs: this thread's buffer, or a fresh one when it is in use.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    SCRATCH.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0; len]),
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{sum_lanes, MR, NR};
    use std::arch::x86_64::*;

    /// The [`super::TileKernel`] for AVX512-BF16.
    ///
    /// # Safety
    /// As [`super::TileKernel`]; the CPU must have avx512f, avx512bw and avx512bf16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
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
        match mr {
            6 => tile_mr::<6>(kc, a, lda, b, c, ldc, nr, accumulate),
            5 => tile_mr::<5>(kc, a, lda, b, c, ldc, nr, accumulate),
            4 => tile_mr::<4>(kc, a, lda, b, c, ldc, nr, accumulate),
            3 => tile_mr::<3>(kc, a, lda, b, c, ldc, nr, accumulate),
            2 => tile_mr::<2>(kc, a, lda, b, c, ldc, nr, accumulate),
            1 => tile_mr::<1>(kc, a, lda, b, c, ldc, nr, accumulate),
            _ => unreachable!("tile rows {mr} > {MR}"),
        }
    }

    /// The store mask of vector `v` (columns 16v..16v+16) of an `nr`-column tile.
    #[inline(always)]
    fn mask(nr: usize, v: usize) -> __mmask16 {
        let cols = nr.saturating_sub(16 * v).min(16);
        ((1u32 << cols) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_mr<const R: usize>(
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        accumulate: bool,
    ) {
        let masks = [mask(nr, 0), mask(nr, 1), mask(nr, 2), mask(nr, 3)];
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, r) in row.iter_mut().enumerate() {
                    *r = _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v));
                }
            }
        }
        for p in 0..kc {
            let bp = b.add(p * NR) as *const __m512i;
            let bv: [__m512bh; 4] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(1))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(2))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(3))),
            ];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *a.add(i * lda + p) as i32,
                ));
                for (r, bvv) in row.iter_mut().zip(bv) {
                    *r = _mm512_dpbf16_ps(*r, av, bvv);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, r) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), masks[v], *r);
            }
        }
    }

    /// `VCVTNE2PS2BF16` on 32 values at a time: `o[p] = bf16(x[2p]) | bf16(x[2p+1]) << 16` for
    /// the whole 16-pair groups of `x`; returns how many pairs it wrote.
    ///
    /// # Safety
    /// The CPU must have avx512f and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn round_row(x: &[f32], o: &mut [u32]) -> usize {
        let groups = (x.len() / 32).min(o.len() / 16);
        for g in 0..groups {
            let lo = _mm512_loadu_ps(x.as_ptr().add(32 * g));
            let hi = _mm512_loadu_ps(x.as_ptr().add(32 * g + 16));
            // The second operand fills the low 16 bf16 values.
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                o.as_mut_ptr().add(16 * g) as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(v),
            );
        }
        16 * groups
    }

    /// The [`super::DotKernel`] for AVX512-BF16: 32 values of each row per instruction, the
    /// tail by masked loads (zeros), lanes summed by [`sum_lanes`].
    ///
    /// # Safety
    /// As [`super::DotKernel`]; the CPU must have avx512f, avx512bw and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn dots(
        x: *const u16,
        w: *const u16,
        k: usize,
        mr: usize,
        nc: usize,
    ) -> [[f32; 4]; 4] {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let load = |r: *const u16, s: usize| -> __m512bh {
            let rem = k - 32 * s;
            let v = if rem >= 32 {
                _mm512_loadu_si512(r.add(32 * s) as *const __m512i)
            } else {
                _mm512_maskz_loadu_epi16(
                    ((1u64 << rem) - 1) as __mmask32,
                    r.add(32 * s) as *const i16,
                )
            };
            std::mem::transmute::<__m512i, __m512bh>(v)
        };
        for s in 0..k.div_ceil(32) {
            let mut wv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); 4];
            for (j, v) in wv.iter_mut().enumerate().take(nc) {
                *v = load(w.add(j * k), s);
            }
            for (i, row) in acc.iter_mut().enumerate().take(mr) {
                let xv = load(x.add(i * k), s);
                for (r, &wvj) in row.iter_mut().zip(&wv).take(nc) {
                    *r = _mm512_dpbf16_ps(*r, xv, wvj);
                }
            }
        }
        let mut out = [[0f32; 4]; 4];
        for i in 0..mr {
            for j in 0..nc {
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc[i][j]);
                out[i][j] = sum_lanes(lanes);
            }
        }
        out
    }
}

pub mod amx;
pub mod cache;

#[cfg(test)]
mod tests;
