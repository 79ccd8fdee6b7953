//! Per-token log-probabilities on the training path (differentiable to the adapter).

use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::families::{BatchInput, CausalLm};
use crate::ops::gather_logprobs;
use candle_core::Tensor;

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
    let hidden = hidden.narrow(1, 0, t - 1)?;
    let mut logits = model.logits(&hidden, ctx)?;
    if temperature > 0.0 && temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let v = logits.dim(2)?;
    let targets = input.ids.narrow(1, 1, t - 1)?.flatten_all()?;
    let lp = gather_logprobs(&logits.reshape((b * (t - 1), v))?, &targets)?;
    Ok(lp.reshape((b, t - 1))?)
}
