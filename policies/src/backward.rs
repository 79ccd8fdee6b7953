//! The training backward pass, whole or with per-block activation checkpointing
//! (Chen et al. 2016, "Training deep nets with sublinear memory cost"; transformers'
//! `gradient_checkpointing_enable()`).
//!
//! Whole: one forward that keeps every activation, then `loss.backward()`.
//!
//! Checkpointed: a forward without a graph keeps only each block's input `x_i`. The last
//! block runs with gradients from its input (its graph is kept, not recomputed), then the
//! loss, giving its parameters' gradients and `g_{L−1} = ∂loss/∂x_{L−1}`. Then, for
//! `i = L−2 … 0`, block `i` is recomputed from `x_i` with gradients and backpropagated on its
//! own with the surrogate `Σ y_i ⊙ g_{i+1}` (whose gradient with respect to `y_i` is exactly
//! `g_{i+1}`), yielding its parameters' gradients and `g_i = ∂loss/∂x_i`; the surrogate
//! skips the block's last product, whose output no gradient reads
//! ([`CausalLm::block_vjp`]). LoRA dropout draws the same masks in the recompute: the
//! generator is set back to where it stood when the block first ran, and left where a whole
//! pass would leave it.

use crate::ctx::ForwardCtx;
use crate::error::PolicyError;
use crate::families::{BatchInput, CausalLm};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Computes `loss(final hidden)` and its gradients. `loss` gets the final hidden states
/// (after the last norm, `[b, t, hidden]`) and returns a scalar; `on_grads` receives each
/// gradient store in turn (one; or, when `checkpointing`, one for the last block and the
/// head, then one per other block): the sum over the stores is the gradient of the loss.
pub fn backward_from_hidden<E: From<PolicyError> + From<candle_core::Error>>(
    model: &dyn CausalLm,
    input: &BatchInput,
    ctx: &ForwardCtx,
    checkpointing: bool,
    loss: &mut dyn FnMut(&Tensor) -> Result<Tensor, E>,
    on_grads: &mut dyn FnMut(&GradStore) -> Result<(), E>,
) -> Result<(), E> {
    let grad_ctx = ForwardCtx {
        adapter: ctx.adapter,
        grad: true,
        dropout_rng: ctx.dropout_rng,
    };
    if !checkpointing {
        let hidden = model.forward_hidden(input, &grad_ctx, None)?;
        return on_grads(&loss(&hidden)?.backward()?);
    }
    // 1. Forward without a graph: keep each block's input and the dropout generator's
    //    position before it.
    let plain = ForwardCtx {
        grad: false,
        ..grad_ctx
    };
    let rng_pos = || {
        ctx.dropout_rng
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).get_word_pos())
    };
    let (x0, pass) = model.embed(input, &plain, None)?;
    let n = model.num_blocks();
    let (mut inputs, mut positions) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut x = x0;
    for i in 0..n.saturating_sub(1) {
        positions.push(rng_pos());
        let y = model.block_forward(i, &x, &pass, &plain, None)?;
        inputs.push(x);
        x = y;
    }
    // 2. The last block, final norm and loss with gradients, from the last block's input:
    //    that block's graph is kept rather than recomputed.
    let last = Var::from_tensor(&x)?;
    drop(x);
    let hidden = match n {
        0 => last.as_tensor().clone(),
        _ => model.block_forward(n - 1, last.as_tensor(), &pass, &grad_ctx, None)?,
    };
    let store = loss(&model.final_norm(&hidden, &grad_ctx)?)?.backward()?;
    drop(hidden);
    let after_head = rng_pos();
    on_grads(&store)?;
    let mut g = upstream(&store, &last)?;
    drop(store);
    // 3. The other blocks in reverse, each recomputed with gradients from its saved input
    //    and differentiated through Σ y_i ⊙ g_{i+1} (CausalLm::block_vjp).
    for i in (0..n.saturating_sub(1)).rev() {
        let x_i = Var::from_tensor(&inputs[i])?;
        if let (Some(rng), Some(pos)) = (ctx.dropout_rng, positions[i]) {
            rng.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_word_pos(pos);
        }
        let surrogate = model.block_vjp(i, x_i.as_tensor(), &g, &pass, &grad_ctx)?;
        let store = surrogate.backward()?;
        on_grads(&store)?;
        g = upstream(&store, &x_i)?;
        inputs.truncate(i);
    }
    // 4. The embedding, for a trainable one (full training); LoRA leaves it frozen.
    let (x0, _) = model.embed(input, &grad_ctx, None)?;
    if x0.track_op() {
        on_grads(&(x0 * &g)?.sum_all()?.backward()?)?;
    }
    if let (Some(rng), Some(pos)) = (ctx.dropout_rng, after_head) {
        rng.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_word_pos(pos);
    }
    Ok(())
}

/// `∂loss/∂x` from a store, zeros where the loss does not depend on `x`.
fn upstream(store: &GradStore, x: &Var) -> candle_core::Result<Tensor> {
    match store.get(x.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => x.as_tensor().zeros_like(),
    }
}
