//! Sequence log-probs of completions: `log π(completion | prompt)`, summed over the
//! completion's tokens (or their mean, for IPO), for every sequence of a batch in one
//! forward pass — a preference pair's chosen and rejected sequences, KTO's examples and
//! their mismatched KL pairs — under the policy (adapter on) or the reference (adapter off,
//! the same base weights).

use crate::data::preference::Pair;
use candle_core::{DType, Result, Tensor};
use rlft_policies::logprobs::next_token_logprobs;
use rlft_policies::{BatchInput, CausalLm, ForwardCtx};

/// Sequences `prompt ++ completion` as one left-padded batch, and the weights that pick out
/// each sequence's completion tokens.
pub struct CompletionBatch {
    pub input: BatchInput,
    /// `[m, t − 1]`: 1 (or 1 / completion length, to average) on the targets that are
    /// completion tokens, 0 elsewhere.
    weights: Tensor,
    /// Real tokens in the batch.
    pub tokens: usize,
}

impl CompletionBatch {
    pub fn new(
        seqs: &[(&[u32], &[u32])],
        pad_id: u32,
        average: bool,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let rows: Vec<Vec<u32>> = seqs.iter().map(|(p, c)| [*p, *c].concat()).collect();
        let input = BatchInput::left_padded(&rows, pad_id, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t = input.seq_len();
        // Column j predicts token j + 1; row i's completion starts at t − len_i + prompt_i.
        let mut w = vec![0f32; seqs.len() * (t - 1)];
        for (i, ((p, c), row)) in seqs.iter().zip(&rows).enumerate() {
            let start = t - row.len() + p.len();
            for j in start.saturating_sub(1)..t - 1 {
                w[i * (t - 1) + j] = if average {
                    1.0 / c.len().max(1) as f32
                } else {
                    1.0
                };
            }
        }
        let tokens = rows.iter().map(Vec::len).sum();
        Ok(Self {
            input,
            weights: Tensor::from_vec(w, (seqs.len(), t - 1), dev)?,
            tokens,
        })
    }

    /// Each sequence's completion log-prob `[m]` f32 from the final hidden states of
    /// [`Self::input`] (tracked when `ctx` records gradients).
    pub fn logps(&self, model: &dyn CausalLm, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let lp = next_token_logprobs(model, &self.input, hidden, ctx, 1.0)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        (lp * self.weights.to_dtype(DType::F32)?)?
            .sum(1)?
            .to_dtype(DType::F32)
    }
}

/// The 2n sequences of n pairs as one [`CompletionBatch`], chosen first.
pub struct PairBatch {
    pub batch: CompletionBatch,
    pub pairs: usize,
    /// Real tokens in the batch (both sequences of every pair).
    pub tokens: usize,
}

impl PairBatch {
    pub fn new(
        pairs: &[&Pair],
        pad_id: u32,
        average: bool,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let seqs: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (&p.prompt[..], &p.chosen[..]))
            .chain(pairs.iter().map(|p| (&p.prompt[..], &p.rejected[..])))
            .collect();
        let batch = CompletionBatch::new(&seqs, pad_id, average, dev)?;
        Ok(Self {
            tokens: batch.tokens,
            pairs: pairs.len(),
            batch,
        })
    }

    pub fn input(&self) -> &BatchInput {
        &self.batch.input
    }

    /// `(chosen, rejected)` sequence log-probs `[n]` f32 from the final hidden states of
    /// [`Self::input`] (tracked when `ctx` records gradients).
    pub fn logps(
        &self,
        model: &dyn CausalLm,
        hidden: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Tensor)> {
        let per_seq = self.batch.logps(model, hidden, ctx)?;
        let n = self.pairs;
        Ok((per_seq.narrow(0, 0, n)?, per_seq.narrow(0, n, n)?))
    }
}

/// `(chosen, rejected)`, each `[n]` f32 (tracked when `ctx` records gradients): the
/// completion log-probs of `pairs`, summed, or averaged per token with `average`. The 2n
/// sequences run as one left-padded batch, chosen first.
pub fn pair_logps(
    model: &dyn CausalLm,
    pairs: &[&Pair],
    ctx: &ForwardCtx,
    pad_id: u32,
    average: bool,
) -> Result<(Tensor, Tensor)> {
    let batch = PairBatch::new(pairs, pad_id, average, &model.info().device)?;
    let hidden = model
        .forward_hidden(batch.input(), ctx, None)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    batch.logps(model, &hidden, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rlft_policies::{generate, Adapter, Pretrained};
    use std::path::PathBuf;

    /// Against each sequence scored alone (no padding, `generate::score`), the completion's
    /// tokens summed by hand: sums and per-token means, adapter on and off.
    #[test]
    fn batched_pair_logps_equal_each_sequence_scored_alone() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let pre = Pretrained::load(&root.join("llama"), DType::F32, &Device::Cpu).unwrap();
        let adapter = Adapter::load(&root.join("llama-lora"), pre.model.as_ref()).unwrap();
        let pairs = [
            Pair {
                prompt: vec![1, 5, 9, 13],
                chosen: vec![20, 2],
                rejected: vec![21, 22, 23, 2],
                margin: 0.0,
            },
            Pair {
                prompt: vec![1, 7],
                chosen: vec![30, 31, 32, 33, 2],
                rejected: vec![40, 2],
                margin: 0.0,
            },
        ];
        let refs: Vec<&Pair> = pairs.iter().collect();
        for ad in [None, Some(&adapter)] {
            let ctx = ForwardCtx::inference(ad);
            for average in [false, true] {
                let (c, r) = pair_logps(pre.model.as_ref(), &refs, &ctx, 0, average).unwrap();
                let (c, r): (Vec<f32>, Vec<f32>) = (c.to_vec1().unwrap(), r.to_vec1().unwrap());
                for (i, p) in pairs.iter().enumerate() {
                    for (got, ids, len) in [
                        (c[i], p.chosen_ids(), p.chosen.len()),
                        (r[i], p.rejected_ids(), p.rejected.len()),
                    ] {
                        let lp = generate::score(
                            pre.model.as_ref(),
                            ad,
                            std::slice::from_ref(&ids),
                            0,
                            1.0,
                        )
                        .unwrap();
                        let tail: f32 = lp[0][lp[0].len() - len..].iter().sum();
                        let want = if average { tail / len as f32 } else { tail };
                        assert!(
                            (got - want).abs() < 1e-4,
                            "pair {i} average={average}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
