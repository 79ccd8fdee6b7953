//! Per-token log-probabilities: the one path every caller takes (SFT loss, RL scoring,
//! reference and training passes, `generate::score`, the demo):
//!
//! hidden → head → logits / τ → log-softmax → gather the target's entry.
//!
//! It is differentiable to the adapter (and to any trainable base weight) when the context
//! records gradients.

use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::families::{BatchInput, CausalLm};
use crate::ops::{entropy, gather_logprobs};
use candle_core::Tensor;

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
    let (b, n, _) = hidden.dims3()?;
    let mut logits = model.logits(hidden, ctx)?;
    let tau = scoring_temperature(temperature);
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
