//! The packed product on Intel's AMX (Sapphire Rapids and later): `TDPBF16PS` multiplies a
//! 16 × 32 bf16 tile by a 32 × 16 one into a 16 × 16 f32 tile, 16,384 FLOP an instruction.
//! Its operands are the layouts [`super::round_pairs`] and [`super::pack_t`]/[`super::pack_n`]
//! make: a tile of A is 16 rows × 16 pairs of an activation row, a tile of B 16 steps × 16
//! columns of a packed panel (row stride one panel step, [`NR`] pairs). Each task computes a
//! 32 × 32 block of the output with four accumulator tiles (2 × 2), loading two tiles of A
//! and two of B per 16 steps.
//!
//! The order in which AMX sums the 32 products of a step is not published (it is neither
//! `VDPBF16PS`'s nor one rounding), so the tests hold AMX to the f32 error bound of an f64
//! reference, not to bits. Linux hands the tile registers to a process that asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without that, or without the
//! CPU flags, [`available`] is false and nothing here runs.

use super::{SendPtr, NR};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Output rows per task (two tiles); activation rows are padded to a multiple of this.
pub const ROWS: usize = 32;
/// Steps (pairs of the reduced dimension) per tile; the reduced dimension is padded to a
/// multiple of this.
pub const STEPS: usize = 16;
/// Output columns per task (two tiles).
const COLS: usize = 32;
/// Row blocks per task: the task's two B tiles per step serve this many row blocks.
const ROW_BLOCKS: usize = 4;

/// The CPU has AMX-BF16 and Linux let this process use the tile registers.
pub fn available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            cpu_has_amx_bf16() && request_tile_data()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24), with the OS saving the tile
/// state (XCR0 bits 17 and 18, read by `is_x86_feature_detected!("xsave")`'s xgetbv).
#[cfg(target_arch = "x86_64")]
pub fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let leaf7 = __cpuid_count(7, 0);
    leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_has_amx_bf16() -> bool {
    false
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the syscall reads two integers and changes only this process's permission to
    // use the AMX state; rcx and r11 are clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `c[i·ldc + j] (+)= Σ_p A[i, p] ⋅ B[p, j]` for i < m, j < ncols, as
/// [`super::gemm_packed`], on AMX. `a` has [`ROWS`]-padded rows (zeros past m) of `lda`
/// pairs; `kp` is a multiple of [`STEPS`]; `b` holds ⌈ncols/64⌉ panels of `kp` steps.
///
/// # Safety
/// [`available`] must be true; `c` as in [`super::gemm_packed`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    (a, lda): (&[u32], usize),
    m: usize,
    kp: usize,
    b: &[u32],
    ncols: usize,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
    parallel: bool,
) {
    assert!(available(), "AMX products on a CPU or OS without AMX");
    assert!(kp.is_multiple_of(STEPS) && lda >= kp);
    let row_blocks = m.div_ceil(ROWS);
    let col_blocks = ncols.div_ceil(COLS);
    assert!(b.len() >= ncols.div_ceil(NR) * kp * NR);
    assert!(m == 0 || a.len() >= (row_blocks * ROWS - 1) * lda + kp);
    if m == 0 || ncols == 0 {
        return;
    }
    // A as 16 × 16-pair tiles, each 1 KiB contiguous: a tile load reads consecutive lines
    // (16 rows at the activation's row stride defeat the prefetchers).
    let at = tiled(a, lda, row_blocks * ROWS, kp, parallel);
    let a = &at[..];
    let cp = SendPtr(c);
    let groups = row_blocks.div_ceil(ROW_BLOCKS);
    let task = |t: usize| {
        let (cb, g) = (t / groups, t % groups);
        let j0 = cb * COLS;
        // Panel of column j0, and the column's offset in it.
        let (panel, off) = (j0 / NR, j0 % NR);
        let bp = &b[panel * kp * NR + off..];
        for rb in g * ROW_BLOCKS..((g + 1) * ROW_BLOCKS).min(row_blocks) {
            let i0 = rb * ROWS;
            // SAFETY: rows i0..i0+32 of a are in its padding; the panel holds kp steps of
            // columns off..off+32; the output block is this task's alone.
            unsafe {
                block(
                    &a[i0 * kp..],
                    kp,
                    bp,
                    (cp.get(), ldc),
                    (i0, j0),
                    (m, ncols),
                    accumulate,
                )
            };
        }
    };
    let tasks = col_blocks * groups;
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// `a` (rows × kp pairs at row stride `lda`) as tiles: tile (r, s) — rows 16r..16r+16, steps
/// 16s..16s+16 — at `(r·kp/16 + s)·256`, row-major within.
fn tiled(a: &[u32], lda: usize, rows: usize, kp: usize, parallel: bool) -> Vec<u32> {
    let mut out = vec![0u32; rows * kp];
    let strip = |(r, o): (usize, &mut [u32])| {
        for (s, tile) in o.chunks_exact_mut(256).enumerate() {
            for (i, row) in tile.chunks_exact_mut(16).enumerate() {
                let src = (16 * r + i) * lda + 16 * s;
                row.copy_from_slice(&a[src..src + 16]);
            }
        }
    };
    if parallel {
        out.par_chunks_mut(16 * kp).enumerate().for_each(strip);
    } else {
        out.chunks_mut(16 * kp).enumerate().for_each(strip);
    }
    out
}

/// One 32 × 32 output block at (i0, j0): straight into `c` when it lies inside (m, ncols),
/// else through a zero-padded copy.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: &[u32],
    kp: usize,
    b: &[u32],
    (c, ldc): (*mut f32, usize),
    (i0, j0): (usize, usize),
    (m, ncols): (usize, usize),
    accumulate: bool,
) {
    let (rows, cols) = (ROWS.min(m - i0), COLS.min(ncols - j0));
    let corner = c.add(i0 * ldc + j0);
    if rows == ROWS && cols == COLS {
        return tiles_2x2(a.as_ptr(), 16 * kp, b.as_ptr(), kp, corner, ldc, accumulate);
    }
    let mut tmp = [0f32; ROWS * COLS];
    if accumulate {
        for i in 0..rows {
            for j in 0..cols {
                tmp[i * COLS + j] = *corner.add(i * ldc + j);
            }
        }
    }
    tiles_2x2(
        a.as_ptr(),
        16 * kp,
        b.as_ptr(),
        kp,
        tmp.as_mut_ptr(),
        COLS,
        accumulate,
    );
    for i in 0..rows {
        for j in 0..cols {
            *corner.add(i * ldc + j) = tmp[i * COLS + j];
        }
    }
}

thread_local! {
    /// Whether this thread has loaded [`CONFIG`] (the OS keeps it across context switches).
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Loads [`CONFIG`] on this thread's first product: `LDTILECFG` costs hundreds of cycles
/// (it also zeroes every tile), a fifth of a 32 × 32 block at k = 576 when loaded per block.
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles() {
    if !CONFIGURED.get() {
        std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
        CONFIGURED.set(true);
    }
}

/// A 32 × 32 block `c (+)= A · B` over `kp` steps (a multiple of [`STEPS`]). A is tiled:
/// the tile of rows 0..16 and steps 16s..16s+16 is 256 pairs (16 rows of 16) at `a + 256·s`,
/// rows 16..32's tiles are `a_next` pairs further; B is panel rows of [`NR`] pairs (step p
/// of the block's 32 columns at `b + p·NR`). c has row stride `ldc`.
///
/// tmm0..3: the 2 × 2 accumulator tiles; tmm4, tmm5: A's rows 0..16 and 16..32; tmm6, tmm7:
/// B's columns 0..16 and 16..32. Per 16 steps: two A loads, two B loads, four `TDPBF16PS`.
///
/// # Safety
/// [`available`] must be true; the operands must hold what the strides address.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn tiles_2x2(
    a: *const u32,
    a_next: usize,
    b: *const u32,
    kp: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::asm;
    let (sa, sb, sc) = (16usize * 4, NR * 4, ldc * 4);
    let c10 = c.add(16 * ldc);
    configure_tiles();
    if accumulate {
        asm!(
            "tileloadd tmm0, [{c00} + {sc}]",
            "tileloadd tmm1, [{c01} + {sc}]",
            "tileloadd tmm2, [{c10} + {sc}]",
            "tileloadd tmm3, [{c11} + {sc}]",
            c00 = in(reg) c, c01 = in(reg) c.add(16), c10 = in(reg) c10, c11 = in(reg) c10.add(16),
            sc = in(reg) sc, options(nostack, readonly),
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    for p in (0..kp).step_by(STEPS) {
        // A's tile of rows 0..16 and steps p..p+16; rows 16..32 are a_next pairs further.
        let (a0, b0) = (a.add(16 * p), b.add(p * NR));
        asm!(
            "tileloadd tmm4, [{a0} + {sa}]",
            "tileloadd tmm5, [{a1} + {sa}]",
            "tileloadd tmm6, [{b0} + {sb}]",
            "tileloadd tmm7, [{b1} + {sb}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0, a1 = in(reg) a0.add(a_next), b0 = in(reg) b0, b1 = in(reg) b0.add(16),
            sa = in(reg) sa, sb = in(reg) sb, options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c00} + {sc}], tmm0",
        "tilestored [{c01} + {sc}], tmm1",
        "tilestored [{c10} + {sc}], tmm2",
        "tilestored [{c11} + {sc}], tmm3",
        c00 = in(reg) c, c01 = in(reg) c.add(16), c10 = in(reg) c10, c11 = in(reg) c10.add(16),
        sc = in(reg) sc, options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tiles_2x2(
    _: *const u32,
    _: usize,
    _: *const u32,
    _: usize,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("AMX is x86_64 only")
}
