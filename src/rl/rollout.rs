//! Rollouts and the forward passes over them.
//!
//! Every rollout of a step is laid out the same way: the prompt left-padded to the step's
//! longest prompt `P`, then the response right-padded to the longest response `R`. All
//! scoring passes (old log-probs, values, reference, training) use this layout and
//! micro-batches of one size, so a row's numbers do not depend on which rows share its
//! micro-batch: the first update's ratio is exactly 1.

use super::layout::Layout;
use super::value_head::ValueHead;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rlft_policies::generate::prompt_groups;
use rlft_policies::logprobs::{score_hidden, Entropy};
use rlft_policies::{BatchInput, CausalLm, ForwardCtx, Generation};

pub struct Rollouts {
    /// Index of each rollout's prompt in the prompt set.
    pub prompt_index: Vec<usize>,
    pub prompt_ids: Vec<Vec<u32>>,
    /// Generated ids, with the stop token when one ended the response.
    pub response_ids: Vec<Vec<u32>>,
    pub stopped: Vec<bool>,
    pub p_len: usize,
    pub r_len: usize,
    pub(crate) pad: u32,
}

impl Rollouts {
    pub fn new(prompt_index: Vec<usize>, gens: Vec<Generation>, pad: u32) -> Self {
        let p_len = gens.iter().map(|g| g.prompt_ids.len()).max().unwrap_or(0);
        let r_len = gens
            .iter()
            .map(|g| g.completion_ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut prompt_ids, mut response_ids, mut stopped) = (Vec::new(), Vec::new(), Vec::new());
        for g in gens {
            prompt_ids.push(g.prompt_ids);
            response_ids.push(g.completion_ids);
            stopped.push(g.stopped);
        }
        Self {
            prompt_index,
            prompt_ids,
            response_ids,
            stopped,
            p_len,
            r_len,
            pad,
        }
    }

    pub fn len(&self) -> usize {
        self.response_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.response_ids.is_empty()
    }

    /// Response tokens of rollout `i` (≥ 1).
    pub fn resp_len(&self, i: usize) -> usize {
        self.response_ids[i].len()
    }

    /// The response lengths of `rows`.
    pub fn resp_lens(&self, rows: &[usize]) -> Vec<usize> {
        rows.iter().map(|&i| self.resp_len(i)).collect()
    }

    /// `[rows, P + R]` input in the step's common layout.
    pub fn input(&self, rows: &[usize], dev: &Device) -> Result<BatchInput> {
        let (p, r) = (self.p_len, self.r_len);
        let mut ids = Vec::with_capacity(rows.len());
        let mut valid = Vec::with_capacity(rows.len());
        for &i in rows {
            let (pr, re) = (&self.prompt_ids[i], &self.response_ids[i]);
            let mut row = vec![self.pad; p - pr.len()];
            row.extend(pr);
            row.extend(re);
            row.resize(p + r, self.pad);
            let mut v = vec![false; p - pr.len()];
            v.resize(p + re.len(), true);
            v.resize(p + r, false);
            ids.push(row);
            valid.push(v);
        }
        Ok(BatchInput::with_mask(&ids, valid, dev)?)
    }

    /// `[rows, R]` f32: 1 on response tokens.
    pub fn mask(&self, rows: &[usize], dev: &Device) -> Result<Tensor> {
        let r = self.r_len;
        let mut m = vec![0f32; rows.len() * r];
        for (k, &i) in rows.iter().enumerate() {
            m[k * r..k * r + self.resp_len(i)].fill(1.0);
        }
        Ok(Tensor::from_vec(m, (rows.len(), r), dev)?)
    }
}

/// What one pass over a micro-batch gives at the response positions, each `[b, R]` f32.
pub struct Scored {
    pub logp: Tensor,
    pub values: Option<Tensor>,
    pub entropy: Option<Tensor>,
}

/// Log-probs of the response tokens under `ctx` (tempered by `temperature`), and, with a
/// value head, the values read from the same hidden states (`critic = "shared"`).
pub fn score(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    layout: &Layout,
    temperature: f64,
    head: Option<&ValueHead>,
    want_entropy: Entropy,
) -> Result<Scored> {
    let hidden = model.forward_hidden(&layout.input, ctx, None)?;
    score_hidden_states(model, ctx, &hidden, layout, temperature, head, want_entropy)
}

/// [`score`] from the final hidden states of `layout.input` (a caller that runs the forward
/// itself, e.g. with activation checkpointing).
pub fn score_hidden_states(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    hidden: &Tensor,
    layout: &Layout,
    temperature: f64,
    head: Option<&ValueHead>,
    want_entropy: Entropy,
) -> Result<Scored> {
    let h = layout.states(hidden)?;
    let s = score_hidden(model, &h, &layout.targets, ctx, temperature, want_entropy)?;
    let values = match head {
        Some(h_) => Some(h_.forward(&h, ctx.grad)?),
        None => None,
    };
    Ok(Scored {
        logp: s.logp,
        values,
        entropy: s.entropy,
    })
}

/// Values from a separate critic adapter: the same layout, the critic's hidden states.
pub fn critic_values(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    layout: &Layout,
    head: &ValueHead,
) -> Result<Tensor> {
    let hidden = model.forward_hidden(&layout.input, ctx, None)?;
    head.forward(&layout.states(&hidden)?, ctx.grad)
}

/// [`response_logprobs`] without gradients, each group's prompt computed once: rows of a chunk
/// that repeat a prompt consecutively (GRPO's and RLOO's groups) run it once, with a KV
/// cache; each row then runs its response on its group's keys and values (copied per row,
/// `KvCache::select_rows`), and the state at the prompt's last position — the group's —
/// predicts its first response token. Every key a response token attends, and every product
/// of a row, is the per-row computation's, so the log-probs equal [`response_logprobs`]' (to
/// f32 rounding, tests/rl.rs). A chunk without repeated prompts takes the per-row path.
pub fn response_logprobs_shared(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    ro: &Rollouts,
    rows: &[usize],
    chunk: usize,
    temperature: f64,
) -> Result<Vec<Vec<f64>>> {
    let dev = model.info().device.clone();
    let (p, r) = (ro.p_len, ro.r_len);
    let mut out = Vec::with_capacity(rows.len());
    for c in rows.chunks(chunk.max(1)) {
        // Each row's group: runs of rows with the same prompt.
        let prompts: Vec<&Vec<u32>> = c.iter().map(|&i| &ro.prompt_ids[i]).collect();
        let groups = prompt_groups(&prompts).filter(|_| !ctx.grad);
        let Some((row_group, firsts)) = groups else {
            out.extend(response_logprobs(model, ctx, ro, c, c.len(), temperature)?);
            continue;
        };
        let firsts: Vec<usize> = firsts.iter().map(|&f| c[f]).collect();
        // 1. The groups' prompts, left-padded to P, into a cache.
        let (mut ids, mut valid) = (Vec::new(), Vec::new());
        for &f in &firsts {
            let pr = &ro.prompt_ids[f];
            ids.push([vec![ro.pad; p - pr.len()], pr.clone()].concat());
            valid.push((0..p).map(|j| j >= p - pr.len()).collect::<Vec<bool>>());
        }
        let prompts = BatchInput::with_mask(&ids, valid, &dev)?;
        let mut cache = model.new_cache(p + r);
        let hidden_p = model.forward_hidden(&prompts, ctx, Some(&mut cache))?;
        // 2. Every row's response on its group's keys and values.
        let idx = Tensor::new(row_group.as_slice(), &dev)?;
        let mut rows_cache = cache.select_rows(&row_group, &idx)?;
        let (mut r_ids, mut r_pos, mut r_valid) = (Vec::new(), Vec::new(), Vec::new());
        for &i in c {
            let (pl, re) = (ro.prompt_ids[i].len(), &ro.response_ids[i]);
            for t in 0..r {
                r_ids.push(re.get(t).copied().unwrap_or(ro.pad));
                r_pos.push(if t < re.len() { (pl + t) as u32 } else { 0 });
            }
            r_valid.push((0..r).map(|t| t < re.len()).collect::<Vec<bool>>());
        }
        let responses = BatchInput::from_parts(r_ids, r_pos, r_valid, &dev)?;
        let hidden_r = model.forward_hidden(&responses, ctx, Some(&mut rows_cache))?;
        // 3. The state before response token t: the prompt's last for t = 0, else response t−1.
        let last = hidden_p
            .narrow(1, p - 1, 1)?
            .contiguous()?
            .index_select(&idx, 0)?;
        let h = if r > 1 {
            Tensor::cat(&[&last, &hidden_r.narrow(1, 0, r - 1)?], 1)?
        } else {
            last
        };
        let lp = score_hidden(model, &h, &responses.ids, ctx, temperature, Entropy::Skip)?.logp;
        out.extend(to_rows(&lp, &ro.resp_lens(c))?);
    }
    Ok(out)
}

/// Log-probs of every response token of `rows` under `ctx`, scored in chunks of `chunk`
/// rollouts; one row per rollout, as long as its response.
pub fn response_logprobs(
    model: &dyn CausalLm,
    ctx: &ForwardCtx,
    ro: &Rollouts,
    rows: &[usize],
    chunk: usize,
    temperature: f64,
) -> Result<Vec<Vec<f64>>> {
    let dev = model.info().device.clone();
    let mut out = Vec::with_capacity(rows.len());
    for c in rows.chunks(chunk.max(1)) {
        let layout = Layout::rows(ro, c, &dev)?;
        let s = score(model, ctx, &layout, temperature, None, Entropy::Skip)?;
        out.extend(to_rows(&s.logp, &ro.resp_lens(c))?);
    }
    Ok(out)
}

/// `[b, R]` (any float dtype) → one row per rollout, cut to its response length.
pub fn to_rows(t: &Tensor, lens: &[usize]) -> Result<Vec<Vec<f64>>> {
    let v: Vec<Vec<f64>> = t.to_dtype(DType::F64)?.to_vec2()?;
    Ok(v.into_iter()
        .zip(lens)
        .map(|(r, &n)| r[..n].to_vec())
        .collect())
}
