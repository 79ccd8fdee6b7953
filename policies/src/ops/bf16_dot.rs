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
    let mut dst: Vec<f32> = uninit(m * n);
    let out = dst.as_mut_ptr();
    // Output columns j0..j0+cols from their packed weight rows.
    let columns = |panels: &[u32], j0: usize, cols: usize| {
        // SAFETY: dst holds m rows of n values; columns j0..j0+cols are in each row.
        unsafe {
            engine.gemm(
                (&xa, kp),
                m,
                kp,
                panels,
                cols,
                (out.add(j0), n),
                false,
                parallel,
            )
        }
    };
    match packed {
        Some(all) => {
            assert_eq!(
                all.len(),
                n.div_ceil(NR) * kp * NR,
                "a packing of another shape"
            );
            columns(all, 0, n);
        }
        None => {
            // Whole panels per block: each block's columns start a panel.
            let nb = (block / k.max(1)).max(NR) / NR * NR;
            let len = nb.min(n).div_ceil(NR) * kp * NR;
            with_scratch(len, |panels| {
                for j0 in (0..n).step_by(nb) {
                    let rb = nb.min(n - j0);
                    pack_t(&w[j0 * k..(j0 + rb) * k], rb, k, kp, panels, parallel);
                    columns(panels, j0, rb);
                }
            });
        }
    }
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
    let mut dst: Vec<f32> = uninit(m * k);
    let out = dst.as_mut_ptr();
    let (ra, sa) = engine.align();
    let np = n.div_ceil(2).next_multiple_of(sa);
    let dya = round_pairs(dy, (m, n), (m.next_multiple_of(ra), np), parallel);
    // dst (+)= dy[:, j0..j0+2·steps] · (the packed weight rows j0..).
    let rows = |panels: &[u32], j0: usize, steps: usize| {
        // SAFETY: dst holds m rows of k values; dya's rows hold pairs j0/2..j0/2+steps of
        // np (the padding zero).
        unsafe {
            engine.gemm(
                (&dya[j0 / 2..], np),
                m,
                steps,
                panels,
                k,
                (out, k),
                j0 > 0,
                parallel,
            )
        }
    };
    match packed {
        Some(all) => {
            assert_eq!(
                all.len(),
                k.div_ceil(NR) * np * NR,
                "a packing of another shape"
            );
            rows(all, 0, np);
        }
        None => {
            // Each block starts a pair, and a whole number of the engine's steps.
            let unit = 2 * sa;
            let nb = ((block / k.max(1)).max(unit) / unit * unit).min(n.next_multiple_of(unit));
            let len = k.div_ceil(NR) * (nb / 2) * NR;
            with_scratch(len, |panels| {
                for j0 in (0..n).step_by(nb) {
                    let rb = nb.min(n - j0);
                    let steps = rb.div_ceil(2).next_multiple_of(sa);
                    pack_n(&w[j0 * k..(j0 + rb) * k], rb, k, steps, panels, parallel);
                    rows(panels, j0, steps);
                }
            });
        }
    }
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

pub mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod cache;
mod emulate;
mod operands;
pub mod weight;

use crate::ops::SendPtr;
pub use emulate::{dot_pair, dots_emulated, round_bf16, tile_emulated};
use operands::uninit;
pub use operands::{pack_n, pack_t, round_pairs};

#[cfg(test)]
mod tests;
