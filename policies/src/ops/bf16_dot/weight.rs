//! A bf16 weight tensor's products through the bf16 kernels, for [`crate::ops::half_weight`]:
//! the engine's packed product for many rows (the packing cached, [`super::cache`]), the
//! dot kernel or the widening kernels on bf16-rounded rows for decoding's few. Each returns
//! None when the weight is not bf16 or the CPU has no bf16 instructions (widen instead).

use super::cache::{get_or_pack, Packing};
use crate::ops::gemm::parallelism;
use crate::ops::half_weight::HalfRows;
use crate::ops::rowdot::rowdot_half;
use candle_core::Tensor;

/// Whether a product of `m` rows with a weight [n, k] is split across rayon's threads.
fn parallel(m: usize, n: usize, k: usize) -> bool {
    !matches!(parallelism(m, n, k), gemm::Parallelism::None)
}

/// `x · wᵀ` for `x` [m, k] and the bf16 weight `w` [n, k] whose values are `rows`.
pub fn matmul_t(
    x: &[f32],
    m: usize,
    w: &Tensor,
    rows: HalfRows<'_>,
    (n, k): (usize, usize),
    block: usize,
) -> Option<Vec<f32>> {
    let (HalfRows::Bf16(_), Some(engine)) = (rows, super::engine()) else {
        return None;
    };
    let (bits, par) = (rows.bits(), parallel(m, n, k));
    if m <= super::DOT_MAX_ROWS {
        return Some(match super::decode_dot() {
            Some(dot) => super::rowdot(x, bits, (m, n, k), par, dot),
            // The widening kernels on the rows rounded to bf16: the bf16 engine's products
            // (bf16 rows, f32 sums), whatever the number of rows.
            None => {
                let xr: Vec<f32> = x[..m * k]
                    .iter()
                    .map(|&v| f32::from_bits((super::round_bf16(v) as u32) << 16))
                    .collect();
                rowdot_half(&xr, rows, m, n, k, par)
            }
        });
    }
    let steps = super::steps(k, engine);
    let len = n.div_ceil(super::NR) * steps * super::NR;
    let packed = get_or_pack(w, bits, Packing::T, steps, len, |out| {
        super::pack_t(bits, n, k, steps, out, par)
    });
    let dot = super::Kernels::emulated().dot; // unused: m > DOT_MAX_ROWS
    Some(super::matmul_t(
        x,
        bits,
        (m, n, k),
        block,
        par,
        engine,
        dot,
        packed.as_deref().map(|v| &v[..]),
    ))
}

/// `dy · w` for `dy` [m, n] and the bf16 weight `w` [n, k] whose values are `rows` (any
/// number of rows: decoding never takes a gradient).
pub fn matmul_n(
    dy: &[f32],
    m: usize,
    w: &Tensor,
    rows: HalfRows<'_>,
    (n, k): (usize, usize),
    block: usize,
) -> Option<Vec<f32>> {
    let (HalfRows::Bf16(_), Some(engine)) = (rows, super::engine()) else {
        return None;
    };
    let (bits, par) = (rows.bits(), parallel(m, k, n));
    let steps = super::steps(n, engine);
    let len = k.div_ceil(super::NR) * steps * super::NR;
    let packed = get_or_pack(w, bits, Packing::N, steps, len, |out| {
        super::pack_n(bits, n, k, steps, out, par)
    });
    Some(super::matmul_n(
        dy,
        bits,
        (m, n, k),
        block,
        par,
        engine,
        packed.as_deref().map(|v| &v[..]),
    ))
}
