//! How a micro-batch of rollouts is laid out for a scoring or training pass.
//!
//! - **Rows**: one row per rollout, the prompt left-padded to the step's longest prompt `P`,
//!   the response right-padded to `R` ([`Rollouts::input`]).
//! - **Packed**: one row per distinct prompt of the micro-batch (a GRPO/RLOO group, or the
//!   part of one the micro-batch holds): `[prompt | response₁ | response₂ | …]`, each
//!   response at the positions it has after the prompt and attending the prompt and itself
//!   only ([`BatchInput::packed`]). The prompt is computed once per group instead of once per
//!   completion, and autograd sums the group's gradients into its activations. Every key a
//!   response token attends, and its position, are the rows layout's, so log-probs, values
//!   and adapter gradients equal that layout's to rounding (tests/shared_prompt.rs).
//!
//! Either way [`Layout::states`] gives `[b, R, hidden]`: the state before each response
//! token (the prompt's last for the first), row `k` being `rows[k]`.

use super::rollout::Rollouts;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rlft_policies::{BatchInput, ModelInfo};

pub struct Layout {
    /// The model input.
    pub input: BatchInput,
    /// `[b, R]` u32: the response tokens, right-padded.
    pub targets: Tensor,
    gather: Gather,
    r_len: usize,
}

enum Gather {
    /// The states at positions `P−1 .. P−1+R` of each row.
    Rows { p_len: usize },
    /// `[b·R]` u32: the flat index (packed row × its length + column) of each state.
    Packed { index: Tensor },
}

impl Layout {
    /// The rows layout of `rows`.
    pub fn rows(ro: &Rollouts, rows: &[usize], dev: &Device) -> Result<Self> {
        let input = ro.input(rows, dev)?;
        let targets = input.ids.narrow(1, ro.p_len, ro.r_len)?;
        Ok(Self {
            input,
            targets,
            gather: Gather::Rows { p_len: ro.p_len },
            r_len: ro.r_len,
        })
    }

    /// The packed layout of `rows`, or `None` when no two of them share a prompt (or a prompt
    /// is empty). Rows with the same prompt need not be adjacent.
    pub fn packed(ro: &Rollouts, rows: &[usize], dev: &Device) -> Result<Option<Self>> {
        // Members of each distinct prompt (as indices into `rows`), in order of appearance.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (k, &i) in rows.iter().enumerate() {
            let p = &ro.prompt_ids[i];
            match groups.iter_mut().find(|g| ro.prompt_ids[rows[g[0]]] == *p) {
                Some(g) => g.push(k),
                None => groups.push(vec![k]),
            }
        }
        let empty_prompt = rows.iter().any(|&i| ro.prompt_ids[i].is_empty());
        if groups.len() == rows.len() || empty_prompt {
            return Ok(None);
        }
        let r = ro.r_len;
        let row_len = |g: &Vec<usize>| {
            ro.prompt_ids[rows[g[0]]].len() + g.iter().map(|&k| ro.resp_len(rows[k])).sum::<usize>()
        };
        let width = groups.iter().map(row_len).max().unwrap_or(0);
        let n = groups.len() * width;
        let (mut ids, mut pos, mut seg) = (vec![ro.pad; n], vec![0u32; n], vec![0u32; n]);
        let mut valid = vec![vec![false; width]; groups.len()];
        let mut index = vec![0u32; rows.len() * r];
        let mut targets = vec![ro.pad; rows.len() * r];
        for (gi, g) in groups.iter().enumerate() {
            let base = gi * width;
            let prompt = &ro.prompt_ids[rows[g[0]]];
            let pl = prompt.len();
            for (j, &id) in prompt.iter().enumerate() {
                (ids[base + j], pos[base + j]) = (id, j as u32);
            }
            let mut col = pl;
            for (s, &k) in g.iter().enumerate() {
                let re = &ro.response_ids[rows[k]];
                // Response token t is predicted by the state before it: the prompt's last
                // for t = 0, else response token t − 1. Padding reads the prompt's last.
                index[k * r..(k + 1) * r].fill((base + pl - 1) as u32);
                for (t, &id) in re.iter().enumerate() {
                    let c = base + col + t;
                    (ids[c], pos[c], seg[c]) = (id, (pl + t) as u32, s as u32 + 1);
                    targets[k * r + t] = id;
                    if t + 1 < r {
                        index[k * r + t + 1] = c as u32;
                    }
                }
                col += re.len();
            }
            valid[gi][..col].fill(true);
        }
        let segments = seg.chunks(width).map(<[u32]>::to_vec).collect();
        Ok(Some(Self {
            input: BatchInput::packed(ids, pos, valid, segments, dev)?,
            targets: Tensor::from_vec(targets, (rows.len(), r), dev)?,
            gather: Gather::Packed {
                index: Tensor::from_vec(index, rows.len() * r, dev)?,
            },
            r_len: r,
        }))
    }

    /// The layout a pass over `rows` uses: packed when `share_prompts`, some rows share a
    /// prompt and packing costs less by [`packing_pays`], else rows. The old-policy pass and
    /// the training pass over the same rows choose alike, so the first ratio is exactly 1.
    pub fn choose(
        ro: &Rollouts,
        rows: &[usize],
        info: &ModelInfo,
        share_prompts: bool,
    ) -> Result<Self> {
        if share_prompts {
            if let Some(packed) = Self::packed(ro, rows, &info.device)? {
                let (pb, pt) = (packed.input.batch_size(), packed.input.seq_len());
                let per_row = (rows.len(), ro.p_len + ro.r_len);
                if packing_pays(info.hidden_size, (pb, pt), per_row) {
                    return Ok(packed);
                }
            }
        }
        Self::rows(ro, rows, &info.device)
    }

    /// `[b, R, hidden]`: the state before each response token, from the final hidden states
    /// of [`Layout::input`].
    pub fn states(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.gather {
            Gather::Rows { p_len } => hidden.narrow(1, p_len - 1, self.r_len)?,
            Gather::Packed { index } => {
                let (b, t, h) = hidden.dims3()?;
                let rows = index.dim(0)? / self.r_len;
                hidden
                    .reshape((b * t, h))?
                    .index_select(index, 0)?
                    .reshape((rows, self.r_len, h))?
            }
        })
    }

    pub fn is_packed(&self) -> bool {
        matches!(self.gather, Gather::Packed { .. })
    }
}

/// Whether `packed` (rows × tokens) costs less than `per_row` for a model of width `d`. A
/// token's linear layers cost ~24·d² FLOP (a block's ~12·d² weights, twice), a query-key
/// pair of the dense attention ~4·d (scores and values): cost ∝ 6·d·tokens + pairs. Packing
/// saves the repeated prompts' tokens but lengthens rows, and the attention computes every
/// pair of a row, masked or not, so long responses in large groups stay per row.
pub fn packing_pays(d: usize, packed: (usize, usize), per_row: (usize, usize)) -> bool {
    let cost = |(b, t): (usize, usize)| 6.0 * d as f64 * (b * t) as f64 + (b * t * t) as f64;
    cost(packed) < cost(per_row)
}
