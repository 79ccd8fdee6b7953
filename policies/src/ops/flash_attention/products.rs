//! The tile products the fused attention's loops ask for, behind one trait so the loops are
//! written once: gemm's f32/f64 kernels on the inputs as they lie ([`GemmProducts`]), or
//! the bf16 engine (AMX or `VDPBF16PS`) on operands packed once per call (`bf16_products.rs`).

use super::kernel::{Dims, Real};

/// Where a tile lies: row `b`, query head `h` (of key head `g`), queries `[q0, q0 + nq)`,
/// keys `[k0, k0 + nk)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct At {
    pub b: usize,
    pub h: usize,
    pub g: usize,
    pub q0: usize,
    pub nq: usize,
    pub k0: usize,
    pub nk: usize,
}

/// The five products of FlashAttention-2 on one tile. Score-shaped buffers (`sc`, `p`, `ds`)
/// are nq rows of row stride `ls`; query-shaped ones (`acc`, `dq`) nq rows of d. The key
/// tile's dK and dV accumulators are `ls · d` values in the implementation's own layout,
/// turned into rows by [`TileProducts::key_rows`].
pub(super) trait TileProducts<T: Real>: Sync {
    /// `sc[i, j] = scale · q_i · k_j`.
    fn scores(&self, at: &At, scale: T, sc: &mut [T], ls: usize);
    /// `acc[i] += Σ_j p[i, j] v_j`.
    fn pv(&self, at: &At, p: &[T], ls: usize, acc: &mut [T]);
    /// `dp[i, j] = dO_i · v_j`.
    fn dp(&self, at: &At, dp: &mut [T], ls: usize);
    /// `dV += Pᵀ dO` and `dK += scale · dSᵀ Q` into a key tile's accumulators.
    #[allow(clippy::too_many_arguments)]
    fn dv_dk(&self, at: &At, p: &[T], ds: &[T], ls: usize, scale: T, dv: &mut [T], dk: &mut [T]);
    /// `dq[i] += scale · Σ_j ds[i, j] k_j`.
    fn dq(&self, at: &At, ds: &[T], ls: usize, scale: T, dq: &mut [T]);
    /// A key tile's accumulator as its `nk` rows of d.
    fn key_rows(&self, acc: &[T], nk: usize, ls: usize) -> Vec<T>;
}

/// `dst (m × n, rows dst_rs apart) = [dst +] alpha · a · b` on one thread; `a` and `b` as
/// (pointer, column stride, row stride).
///
/// # Safety
/// Every element the strides address must be readable (a, b) or writable (dst).
#[allow(clippy::too_many_arguments)]
unsafe fn tile_gemm<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    (a, a_cs, a_rs): (*const T, isize, isize),
    (b, b_cs, b_rs): (*const T, isize, isize),
    alpha: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j) = T::ZERO;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        if accumulate { T::ONE } else { T::ZERO },
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// gemm's kernels on q `[b, h, t, d]`, k and v `[b, kv, s, d]` and dO `[b, t, h, d]` as they
/// lie (no copies); the key accumulators are rows `[nk, d]`.
pub(super) struct GemmProducts<'a, T> {
    pub dims: Dims,
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    /// Empty in the forward.
    pub o_grad: &'a [T],
}

impl<T: Real> GemmProducts<'_, T> {
    fn q_tile(&self, at: &At) -> (*const T, isize, isize) {
        let at_q = self.dims.q_row(at.b, at.h, at.q0);
        (self.q[at_q..].as_ptr(), 1, self.dims.d as isize)
    }
    /// Key or value rows of the tile, transposed (columns are keys) or not.
    fn key_tile(&self, x: &[T], at: &At, transposed: bool) -> (*const T, isize, isize) {
        let p = x[self.dims.k_row(at.b, at.g, at.k0)..].as_ptr();
        let d = self.dims.d as isize;
        if transposed {
            (p, d, 1)
        } else {
            (p, 1, d)
        }
    }
    fn o_grad_tile(&self, at: &At) -> (*const T, isize, isize) {
        let at_o = self.dims.o_row(at.b, at.h, at.q0);
        let rs = (self.dims.h * self.dims.d) as isize;
        (self.o_grad[at_o..].as_ptr(), 1, rs)
    }
}

// SAFETY (every product below): the tiles addressed lie inside q, k, v and dO (rows q0..q0+nq
// of head h, k0..k0+nk of key head g); the destinations hold what the strides address.
impl<T: Real> TileProducts<T> for GemmProducts<'_, T> {
    fn scores(&self, at: &At, scale: T, sc: &mut [T], ls: usize) {
        let (q, k) = (self.q_tile(at), self.key_tile(self.k, at, true));
        let d = self.dims.d;
        unsafe { tile_gemm(sc.as_mut_ptr(), ls, false, (at.nq, at.nk, d), q, k, scale) }
    }

    fn pv(&self, at: &At, p: &[T], ls: usize, acc: &mut [T]) {
        let (d, v) = (self.dims.d, self.key_tile(self.v, at, false));
        let p = (p.as_ptr(), 1, ls as isize);
        unsafe { tile_gemm(acc.as_mut_ptr(), d, true, (at.nq, d, at.nk), p, v, T::ONE) }
    }

    fn dp(&self, at: &At, dp: &mut [T], ls: usize) {
        let (o, v) = (self.o_grad_tile(at), self.key_tile(self.v, at, true));
        let d = self.dims.d;
        unsafe { tile_gemm(dp.as_mut_ptr(), ls, false, (at.nq, at.nk, d), o, v, T::ONE) }
    }

    fn dv_dk(&self, at: &At, p: &[T], ds: &[T], ls: usize, scale: T, dv: &mut [T], dk: &mut [T]) {
        let d = self.dims.d;
        let (pt, dst) = ((p.as_ptr(), ls as isize, 1), (ds.as_ptr(), ls as isize, 1));
        let shape = (at.nk, d, at.nq);
        unsafe {
            tile_gemm(
                dv.as_mut_ptr(),
                d,
                true,
                shape,
                pt,
                self.o_grad_tile(at),
                T::ONE,
            );
            tile_gemm(dk.as_mut_ptr(), d, true, shape, dst, self.q_tile(at), scale);
        }
    }

    fn dq(&self, at: &At, ds: &[T], ls: usize, scale: T, dq: &mut [T]) {
        let (d, k) = (self.dims.d, self.key_tile(self.k, at, false));
        let ds = (ds.as_ptr(), 1, ls as isize);
        unsafe { tile_gemm(dq.as_mut_ptr(), d, true, (at.nq, d, at.nk), ds, k, scale) }
    }

    fn key_rows(&self, acc: &[T], nk: usize, _ls: usize) -> Vec<T> {
        acc[..nk * self.dims.d].to_vec()
    }
}
