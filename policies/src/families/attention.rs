//! Scaled dot-product attention with grouped-query heads, softmax in f32.

use crate::ops::gemm::bmm;
use crate::ops::{compute_dtype, softmax_last_dim};
use candle_core::{Result, Tensor};

/// `q`: [b, h, t, d]; `k`, `v`: [b, kv, s, d] with h a multiple of kv; `bias`: [b, 1, t, s].
/// Returns [b, t, h·d].
///
/// Query heads that share a key/value head are folded into the row dimension
/// ([b, kv, rep·t, d]) so the keys are never copied per head.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let s = k.dim(2)?;
    let rep = h / kv;
    let q = q.contiguous()?.reshape((b, kv, rep * t, d))?;
    let scores = (bmm(&q, &k.t()?)? * scale)?;
    let scores = scores
        .to_dtype(compute_dtype(v.dtype()))?
        .reshape((b, h, t, s))?;
    let scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?;
    let p = softmax_last_dim(&scores)?
        .to_dtype(v.dtype())?
        .reshape((b, kv, rep * t, s))?;
    // Strided keys and values (a cache's narrow, a transposed projection) go in as they are.
    let o = bmm(&p, v)?;
    o.reshape((b, h, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, h * d))
}
