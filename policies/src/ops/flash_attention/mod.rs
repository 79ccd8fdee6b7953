//! Fused attention on the CPU (issue 27): FlashAttention-2's recurrence, so no `[t, s]`
//! score matrix is ever built. A task takes a tile of queries, walks the key tiles it can
//! see (causal tiles past its last query are skipped), and keeps per row a running maximum
//! m, a running sum l and an unnormalised output:
//!
//! `S = scale · Q Kᵀ`, `m' = max(m, rowmax S)`, `P = exp(S − m')`,
//! `l' = e^{m − m'} l + rowsum P`, `O' = e^{m − m'} O + P V`; at the end `O / l` and the
//! log-sum-exp `L = m + ln l`, the only thing (O(t)) the backward keeps.
//!
//! The backward recomputes each tile's probabilities from L: `P = exp(S − L)`,
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)` with `D = rowsum(dO ∘ O)`,
//! `dK = scale · dSᵀ Q`, `dQ = scale · dS K` — in one pass: tasks over key tiles write
//! their dK and dV rows alone and add dQ into their worker's copy (tasks dealt to workers
//! in turn, the copies summed in order: the same bits whatever the scheduling).
//!
//! The mask is computed from per-token facts ([`AttentionMask`]): causality by index, key
//! validity (padding), the shared-prompt segments of a packed row, and a sliding window
//! by position. Grouped-query heads read their key/value head in place (no copies).
//! Products are gemm's on tiles, in f32 (f64 for f64 inputs), or for a bf16 model the bf16
//! engine's on operands packed once per call (`bf16_products.rs`).

mod bf16_packing;
mod bf16_products;
mod kernel;
mod products;
mod rows;

/// `e^x` in f32, vectorisable (Cephes' `expf`): the softmax's and SwiGLU's.
pub(crate) use rows::exp as exp_f32;

use crate::ops::bf16_dot::Engine;
use bf16_products::Bf16Products;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use kernel::{backward, forward, Dims};
use products::GemmProducts;
use std::sync::Mutex;

/// Keys from which a decoding step's single query row uses the fused attention on the CPU;
/// below it the composed ops (one batched product each, in the model's dtype) are as fast
/// for one row. `RLFT_FUSED_ATTENTION_MIN_KEYS` overrides the whole rule (every pass with at
/// least that many keys fused; 0: always).
pub const FUSED_MIN_KEYS: usize = 1024;

/// Query rows from which a pass (training, scoring, a prefill) runs the fused attention at any
/// length, whatever the dtype. For a bf16 model its tile products run on the bf16 engine
/// (`VDPBF16PS`, AMX) with P rounded to bf16, as PyTorch's bf16 attention does; f32 and f64
/// run gemm's tiles. The composed ops keep `[t, s]` scores, probabilities and their gradients
/// for the backward and are a dozen graph nodes per layer: on SmolLM2-135M (Zen 4, W5 bf16,
/// B = 4) the fused path was faster from 32 tokens on and, at 256, cut the step's peak from
/// 4.8 to 2.9 GB; on the small f32 Llama of W1 (B = 8, T = 64) it cut the step by ~15%.
pub const FUSED_MIN_QUERIES: usize = 2;

fn fused_min_keys() -> Option<usize> {
    std::env::var("RLFT_FUSED_ATTENTION_MIN_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Whether a pass of `queries` rows over `keys` keys on `device` uses the fused attention.
pub fn uses_fused_attention(device: &Device, queries: usize, keys: usize) -> bool {
    if !device.is_cpu() {
        return false;
    }
    if let Some(min) = fused_min_keys() {
        return keys >= min;
    }
    keys >= FUSED_MIN_KEYS || queries >= FUSED_MIN_QUERIES
}

/// Nanoseconds spent in the fused kernel (forwards and backwards) by this process.
static KERNEL_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seconds spent in the fused kernel so far (forwards and backwards): `rlft bench` W5
/// reports the attention's share of a step from it.
pub fn kernel_seconds() -> f64 {
    KERNEL_NANOS.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

fn add_kernel_time(since: std::time::Instant) {
    let ns = since.elapsed().as_nanos() as u64;
    KERNEL_NANOS.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
}

/// Query and key tile sizes (rows).
#[derive(Debug, Clone, Copy)]
pub struct Tiles {
    pub queries: usize,
    pub keys: usize,
}

impl Default for Tiles {
    fn default() -> Self {
        Self {
            queries: 64,
            keys: 128,
        }
    }
}

/// Which keys each query sees. Queries are the last `t` of the `s` keys' positions in
/// index terms: query `qi` is key index `offset + qi` (a cache holds `offset` keys).
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    /// Key index of query 0: the length of the cache before this pass.
    pub offset: usize,
    /// `[b · s]`: key j of row b is a real token.
    pub key_valid: Vec<bool>,
    /// Packed rows (no cache): `[b · s]` segment of each token, 0 for the shared prompt; a
    /// query sees segment 0 and its own.
    pub segments: Option<Vec<u32>>,
    /// `[b · s]` positions, for the window of packed rows; `None`: the window is measured
    /// on indices (a row of its own, where the real tokens are contiguous).
    pub positions: Option<Vec<u32>>,
    /// Sliding window w: key j is seen by query i when `pos_i − pos_j < w`.
    pub window: Option<usize>,
}

impl AttentionMask {
    /// Whether query `qi` of row `b` sees key `j`: `j ≤ i` and either `j = i` (a query always
    /// sees itself, so no row is empty) or key j is real, in i's segment or the prompt, and
    /// inside the window.
    #[inline]
    pub fn visible(&self, b: usize, qi: usize, j: usize) -> bool {
        let i = self.offset + qi;
        if j > i {
            return false;
        }
        if j == i {
            return true;
        }
        let row = b * self.keys;
        if !self.key_valid[row + j] {
            return false;
        }
        if let Some(seg) = &self.segments {
            let sj = seg[row + j];
            if sj != 0 && sj != seg[row + i] {
                return false;
            }
        }
        match self.window {
            None => true,
            Some(w) => match &self.positions {
                Some(p) => (p[row + i] as usize) < p[row + j] as usize + w,
                None => i - j < w,
            },
        }
    }

    /// Per row, a prefix count of the keys some query might not see for other reasons than
    /// causality and the window (padding, or a segment other than the prompt's):
    /// `[b · (s + 1)]`, for [`Self::tile_open`].
    pub(crate) fn closed_prefix(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.batch * (self.keys + 1));
        for b in 0..self.batch {
            let row = b * self.keys;
            let mut n = 0u32;
            out.push(0);
            for j in 0..self.keys {
                let in_prompt = self.segments.as_ref().is_none_or(|s| s[row + j] == 0);
                n += u32::from(!(self.key_valid[row + j] && in_prompt));
                out.push(n);
            }
        }
        out
    }

    /// Whether every query of `[q0, q0 + nq)` sees every key of `[k0, k0 + nk)` in row `b`
    /// (then the tile needs no per-token mask): the keys precede the first query, are real
    /// and in the prompt, and (with a window on indices) lie inside the last query's window.
    /// `closed` is [`Self::closed_prefix`].
    pub(crate) fn tile_open(
        &self,
        closed: &[u32],
        b: usize,
        (q0, nq): (usize, usize),
        (k0, nk): (usize, usize),
    ) -> bool {
        let first = self.offset + q0;
        if nq == 0 || nk == 0 || k0 + nk > first + 1 {
            return false;
        }
        let at = b * (self.keys + 1);
        if closed[at + k0 + nk] != closed[at + k0] {
            return false;
        }
        match self.window {
            None => true,
            Some(w) => self.positions.is_none() && first + nq - 1 - k0 < w,
        }
    }

    fn check(&self, b: usize, t: usize, s: usize) -> Result<()> {
        let ok = self.batch == b
            && self.queries == t
            && self.keys == s
            && self.offset + t <= s
            && self.key_valid.len() == b * s
            && self.segments.as_ref().is_none_or(|v| v.len() == b * s)
            && self.positions.as_ref().is_none_or(|v| v.len() == b * s);
        if !ok {
            candle_core::bail!(
                "flash attention: a mask for b={} t={} s={} (offset {}) on inputs b={b} t={t} s={s}",
                self.batch,
                self.queries,
                self.keys,
                self.offset
            );
        }
        Ok(())
    }
}

/// The op: q `[b, h, t, d]`, k and v `[b, kv, s, d]` (contiguous, f32 or f64) to
/// `[b, t, h, d]`; the forward's log-sum-exp is kept for the backward.
struct FlashAttention {
    mask: AttentionMask,
    scale: f64,
    tiles: Tiles,
    /// The inputs are bf16 values and the products run on this bf16 engine (f32 sums).
    engine: Option<Engine>,
    lse: Mutex<Option<CpuStorage>>,
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    crate::ops::contiguous_values(s, l, "flash attention")
}

fn dims_of(q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
    let (b, h, t, d) = q.shape().dims4()?;
    let (bk, kv, s, dk) = k.shape().dims4()?;
    if bk != b || dk != d || v.shape() != k.shape() || kv == 0 || h % kv != 0 {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    Ok(Dims { b, h, kv, t, s, d })
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let started = std::time::Instant::now();
        let dims = dims_of(l1, l2, l3)?;
        self.mask.check(dims.b, dims.t, dims.s)?;
        // [b, t, h·d]: the layout the output projection reads, so no reshape joins the graph.
        let shape = Shape::from((dims.b, dims.t, dims.h * dims.d));
        let (out, lse) = match s1 {
            CpuStorage::F32(_) => {
                let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                let (o, l) = if let Some(engine) = self.engine {
                    let products = Bf16Products::new(engine, dims, (q, k, v), None, self.scale);
                    forward(dims, &self.mask, &products, self.scale, self.tiles)
                } else {
                    let products = GemmProducts {
                        dims,
                        q,
                        k,
                        v,
                        o_grad: &[],
                    };
                    forward(dims, &self.mask, &products, self.scale, self.tiles)
                };
                (CpuStorage::F32(o), CpuStorage::F32(l))
            }
            CpuStorage::F64(_) => {
                let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                let products = GemmProducts {
                    dims,
                    q,
                    k,
                    v,
                    o_grad: &[],
                };
                let (o, l) = forward::<f64>(dims, &self.mask, &products, self.scale, self.tiles);
                (CpuStorage::F64(o), CpuStorage::F64(l))
            }
            _ => candle_core::bail!("flash attention runs in f32 or f64"),
        };
        *self.lse.lock().expect("lse lock") = Some(lse);
        add_kernel_time(started);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let started = std::time::Instant::now();
        let lse = self.lse.lock().expect("lse lock").take();
        let Some(lse) = lse else {
            candle_core::bail!("flash attention: backward without its forward's log-sum-exp");
        };
        let (b, h, t, d) = q.dims4()?;
        let (_, kv, s, _) = k.dims4()?;
        let dims = Dims { b, h, kv, t, s, d };
        let dev = q.device();
        let grad = grad_res.contiguous()?;
        let host32 = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let host64 = |x: &Tensor| x.flatten_all()?.to_vec1::<f64>();
        type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);
        fn tensors<T: candle_core::WithDType>(
            (dq, dk, dv): Grads<T>,
            dims: Dims,
            dev: &Device,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let Dims { b, h, kv, t, s, d } = dims;
            Ok((
                Tensor::from_vec(dq, (b, h, t, d), dev)?,
                Tensor::from_vec(dk, (b, kv, s, d), dev)?,
                Tensor::from_vec(dv, (b, kv, s, d), dev)?,
            ))
        }
        let (dq, dk, dv) = match (q.dtype(), &lse) {
            (DType::F32, CpuStorage::F32(lse)) => {
                let (q, k, v) = (&host32(q)?, &host32(k)?, &host32(v)?);
                let (o, o_grad) = (&host32(res)?, &host32(&grad)?);
                let facts = (&o[..], &o_grad[..], &lse[..]);
                let grads = if let Some(engine) = self.engine {
                    let o_grad = Some(&o_grad[..]);
                    let products = Bf16Products::new(engine, dims, (q, k, v), o_grad, self.scale);
                    backward(dims, &self.mask, &products, facts, self.scale, self.tiles)
                } else {
                    let products = GemmProducts {
                        dims,
                        q,
                        k,
                        v,
                        o_grad,
                    };
                    backward(dims, &self.mask, &products, facts, self.scale, self.tiles)
                };
                tensors(grads, dims, dev)?
            }
            (DType::F64, CpuStorage::F64(lse)) => {
                let (q, k, v) = (&host64(q)?, &host64(k)?, &host64(v)?);
                let (o, o_grad) = (&host64(res)?, &host64(&grad)?);
                let facts = (&o[..], &o_grad[..], &lse[..]);
                let products = GemmProducts {
                    dims,
                    q,
                    k,
                    v,
                    o_grad,
                };
                tensors(
                    backward(dims, &self.mask, &products, facts, self.scale, self.tiles),
                    dims,
                    dev,
                )?
            }
            _ => candle_core::bail!("flash attention runs in f32 or f64"),
        };
        add_kernel_time(started);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// What the tile products read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operands {
    /// The inputs' own values, in f32 (f64 for f64 inputs).
    AsGiven,
    /// Rounded to bf16, as a bf16 model's other products read their activations: on the
    /// engine of those products (`bf16_dot::engine`: AMX's `TDPBF16PS`, or `VDPBF16PS`;
    /// f32 sums; P and dS rounded too) where this CPU has one, else as given.
    Bf16,
}

/// Fused attention: q `[b, h, t, d]`, k and v `[b, kv, s, d]` (h a multiple of kv) on the
/// CPU, with the mask `mask` describes; returns `[b, t, h·d]` in q's dtype (bf16 and f16
/// inputs compute in f32; bf16 inputs read as [`Operands::Bf16`]). Differentiable in q, k
/// and v.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    tiles: Tiles,
    operands: Operands,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let prep = |x: &Tensor| x.to_dtype(compute)?.contiguous();
    let bf16 = (dtype == DType::BF16 || operands == Operands::Bf16) && dtype != DType::F64;
    let d = q.dim(3)?;
    let engine = crate::ops::bf16_dot::engine()
        .filter(|&engine| bf16 && bf16_products::usable(engine, d, tiles));
    let op = FlashAttention {
        mask: mask.clone(),
        scale,
        tiles,
        engine,
        lse: Mutex::new(None),
    };
    prep(q)?
        .apply_op3(&prep(k)?, &prep(v)?, op)?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests;
