//! RL on several ranks (docs/distributed.md): each rank generates and scores its share of
//! the step's prompts (whole GRPO/RLOO groups), then every rank gathers the host figures of
//! all rollouts — lengths, old / reference log-probs, values, scores, stop flags — so that
//! shaping (advantages, whitening, group and batch statistics), the KL controller, the loss
//! weights and the metrics are computed on the whole batch, identically everywhere, exactly
//! as one process would on the same rollouts. The token ids stay on their rank: a rank trains
//! only its own rollouts, whose indices in the gathered batch are `local`.

use super::experience::Experience;
use crate::dist;
use anyhow::Result;
use rlft_reward::Scores;

/// Replaces the per-rollout host figures of `x` and `scored` with every rank's, in rank
/// order, and sets `x.local` to this rank's range. With one rank nothing changes.
pub fn gather_experience(x: &mut Experience, scored: &mut Scores) -> Result<()> {
    let world = dist::world();
    if world.size() == 1 {
        return Ok(());
    }
    let n_local = x.lens.len();
    let counts: Vec<usize> = dist::all_gather(&[n_local as f64])?
        .iter()
        .map(|v| v[0] as usize)
        .collect();
    let offset: usize = counts[..world.rank()].iter().sum();
    // Lengths first: they cut the gathered token rows.
    let lens: Vec<usize> = gather_flat(&x.lens.iter().map(|&l| l as f64).collect::<Vec<_>>())?
        .into_iter()
        .map(|l| l as usize)
        .collect();
    x.logp_old = gather_rows(&x.logp_old, &lens)?;
    x.logp_ref = x
        .logp_ref
        .as_ref()
        .map(|r| gather_rows(r, &lens))
        .transpose()?;
    x.values = x
        .values
        .as_ref()
        .map(|v| gather_rows(v, &lens))
        .transpose()?;
    x.prompt_index = gather_flat(&x.prompt_index.iter().map(|&p| p as f64).collect::<Vec<_>>())?
        .into_iter()
        .map(|p| p as usize)
        .collect();
    x.stopped = gather_flat(
        &x.stopped
            .iter()
            .map(|&s| f64::from(u8::from(s)))
            .collect::<Vec<_>>(),
    )?
    .into_iter()
    .map(|s| s > 0.0)
    .collect();
    x.p_len = dist::all_gather(&[x.p_len as f64])?
        .iter()
        .map(|v| v[0] as usize)
        .max()
        .unwrap_or(x.p_len);
    scored.total = gather_flat(&scored.total)?;
    for (_, p) in scored.parts.iter_mut() {
        *p = gather_flat(p)?;
    }
    x.lens = lens;
    x.local = offset..offset + n_local;
    Ok(())
}

/// The update's own log-probs (this rank's rollouts, in order) gathered over ranks.
pub fn gather_logp(rows: Vec<Vec<f64>>, lens: &[usize]) -> Result<Vec<Vec<f64>>> {
    if dist::world().size() == 1 {
        return Ok(rows);
    }
    gather_rows(&rows, lens)
}

/// Every rank's values concatenated in rank order.
fn gather_flat(v: &[f64]) -> Result<Vec<f64>> {
    Ok(dist::all_gather(v)?.concat())
}

/// Every rank's rows (ragged, cut by the gathered `lens`); empty stays empty.
fn gather_rows(rows: &[Vec<f64>], lens: &[usize]) -> Result<Vec<Vec<f64>>> {
    let flat = gather_flat(&rows.concat())?;
    if flat.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &n in lens {
        out.push(flat[at..at + n].to_vec());
        at += n;
    }
    Ok(out)
}
