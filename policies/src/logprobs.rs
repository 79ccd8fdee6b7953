//! Per-token log-probabilities: the one path every caller takes (SFT loss, RL scoring,
//! reference and training passes, `generate::score`, the demo):
//!
//! hidden → head → logits / τ → log-softmax → gather the target's entry.
//!
//! It is differentiable to the adapter (and to any trainable base weight) when the context
//! records gradients.
//!
//! When the head is a frozen base weight on the CPU in f32 (or f64) — no LoRA module on it,
//! not trained — the steps after `hidden` run a chunk of rows at a time
//! ([`crate::ops::head_logprob`]: the backward recomputes each chunk's logits, or keeps the
//! one chunk's when all rows fit in one), so the `[b·n, V]` logits never exist whole beyond
//! a chunk's 64 MiB (a bf16/f16 head on the CPU too: f32 hidden states, `ops::half_weight`).
//! Otherwise (an adapter on the head, a trainable head, CUDA) the
//! whole logits are computed as before. [`set_head_chunks`] overrides the choice per thread.

use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::families::{BatchInput, CausalLm};
use crate::linear::Linear;
use crate::ops::head_logprob::{chunk_rows, head_logprobs, FrozenHead};
use crate::ops::{entropy, gather_logprobs};
use candle_core::{DType, Tensor};
use std::cell::Cell;

/// How [`score_hidden`] goes through a frozen head (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadChunks {
    /// Chunks of [`chunk_rows`]`(V)` rows (logits ≤ 64 MiB a chunk) where the head allows.
    Auto,
    /// Chunks of this many rows where the head allows (tests: a size that divides nothing).
    Rows(usize),
    /// Always the whole logits (the reference the chunked path is tested against).
    Off,
}

thread_local! {
    static HEAD_CHUNKS: Cell<HeadChunks> = const { Cell::new(HeadChunks::Auto) };
}

/// Sets how [`score_hidden`] computes the head on this thread; returns the previous setting.
pub fn set_head_chunks(c: HeadChunks) -> HeadChunks {
    HEAD_CHUNKS.with(|h| h.replace(c))
}

/// The head when the chunked path applies to it: a frozen weight (and bias) without a LoRA
/// module, on the CPU, in f32 or f64 like `hidden`.
fn frozen_head<'m>(
    model: &'m dyn CausalLm,
    hidden: &Tensor,
    ctx: &ForwardCtx,
) -> Option<&'m Linear> {
    let head = model.output_head()?;
    let trained = |t: &Tensor| ctx.grad && t.is_variable();
    let adapted = ctx.adapter.is_some_and(|a| a.module(&head.path).is_some());
    let w = head.weight.dense()?;
    let supported = hidden.device().is_cpu()
        && matches!(hidden.dtype(), DType::F32 | DType::F64)
        && (w.dtype() == hidden.dtype()
            || hidden.dtype() == DType::F32 && matches!(w.dtype(), DType::BF16 | DType::F16));
    let ok = supported && !adapted && !trained(w) && !head.bias.as_ref().is_some_and(trained);
    ok.then_some(head)
}

/// The temperature log-probs are computed at: sampling at `temperature` draws from
/// softmax(logits / τ); greedy decoding (τ = 0) is scored at τ = 1.
pub fn scoring_temperature(temperature: f64) -> f64 {
    if temperature > 0.0 {
        temperature
    } else {
        1.0
    }
}

/// What one pass through the head gives per target, each `[b, n]` f32.
pub struct TokenScores {
    /// `log softmax(logits / τ)[target]`.
    pub logp: Tensor,
    /// `H = −Σ p log p` of the tempered distribution, when asked for.
    pub entropy: Option<Tensor>,
}

/// Whether [`score_hidden`] also returns the entropy, and whether it carries gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entropy {
    Skip,
    /// Detached: a metric, no backward edge.
    Metric,
    /// Differentiable: an entropy bonus in the loss.
    Loss,
}

/// Scores `targets` (`[b, n]` u32) from `hidden` (`[b, n, H]`, the states that predict
/// them): the head, the temperature, log-softmax and gather.
pub fn score_hidden(
    model: &dyn CausalLm,
    hidden: &Tensor,
    targets: &Tensor,
    ctx: &ForwardCtx,
    temperature: f64,
    want_entropy: Entropy,
) -> Result<TokenScores> {
    let (b, n, hsz) = hidden.dims3()?;
    let tau = scoring_temperature(temperature);
    let chunks = HEAD_CHUNKS.with(Cell::get);
    if let (Some(head), false) = (frozen_head(model, hidden, ctx), chunks == HeadChunks::Off) {
        let rows = match chunks {
            HeadChunks::Rows(r) => r.max(1),
            _ => chunk_rows(head.out_features()),
        };
        let head = FrozenHead {
            weight: head.dense_weight()?.detach(),
            bias: head.bias.as_ref().map(Tensor::detach),
            tau,
        };
        let flat = hidden.reshape((b * n, hsz))?;
        let (lp, ent) = head_logprobs(&flat, &targets.flatten_all()?, &head, rows, want_entropy)?;
        return Ok(TokenScores {
            logp: lp.reshape((b, n))?,
            entropy: ent.map(|e| e.reshape((b, n))).transpose()?,
        });
    }
    let mut logits = model.logits(hidden, ctx)?;
    if tau != 1.0 {
        logits = (logits / tau)?;
    }
    let v = logits.dim(2)?;
    let flat = logits.reshape((b * n, v))?;
    let logp = gather_logprobs(&flat, &targets.flatten_all()?)?.reshape((b, n))?;
    let entropy = match want_entropy {
        Entropy::Skip => None,
        Entropy::Metric => Some(entropy(&flat.detach())?.reshape((b, n))?),
        Entropy::Loss => Some(entropy(&flat)?.reshape((b, n))?),
    };
    Ok(TokenScores { logp, entropy })
}

/// `[b, t−1]` f32: `lp[i, j] = log softmax(logits[i, j] / τ)[ids[i, j+1]]`.
/// Entries whose target is left padding are meaningless; callers mask them.
pub fn token_logprobs(
    model: &dyn CausalLm,
    input: &BatchInput,
    ctx: &ForwardCtx,
    temperature: f64,
) -> Result<Tensor> {
    let (b, t) = (input.batch_size(), input.seq_len());
    if t < 2 {
        return Ok(Tensor::zeros(
            (b, 0),
            crate::ops::compute_dtype(model.info().dtype),
            &model.info().device,
        )?);
    }
    let hidden = model.forward_hidden(input, ctx, None)?;
    next_token_logprobs(model, input, &hidden, ctx, temperature)
}

/// [`token_logprobs`] from the final hidden states `[b, t, H]` of `input` (a caller that runs
/// the forward itself, e.g. with activation checkpointing, `crate::backward`).
pub fn next_token_logprobs(
    model: &dyn CausalLm,
    input: &BatchInput,
    hidden: &Tensor,
    ctx: &ForwardCtx,
    temperature: f64,
) -> Result<Tensor> {
    let t = input.seq_len();
    let hidden = hidden.narrow(1, 0, t - 1)?;
    let targets = input.ids.narrow(1, 1, t - 1)?;
    Ok(score_hidden(model, &hidden, &targets, ctx, temperature, Entropy::Skip)?.logp)
}

#[cfg(test)]
mod tests;
