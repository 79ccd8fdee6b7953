//! Learning from preference pairs (issue 14): `rlft rm` trains a reward model ([`rm`]),
//! `rlft dpo` the policy straight from the pairs ([`dpo`]), `rlft kto` from completions
//! judged one by one ([`kto`]). All run on the shared stage
//! loop ([`crate::train::stage`]); this module holds what they share: reading the pairs and
//! averaging per-pair figures over a logging window.

pub mod dpo;
pub mod kto;
pub mod logps;
pub mod losses;
pub mod rm;

use crate::data::preference::{tokenize_all, Pair};
use crate::data::{read_rows, Columns, DataFiles};
use crate::train::memory;
use crate::train::stage::MemoryNeed;
use anyhow::{bail, Result};
use rlft_policies::{CausalLm, Tokenizer};
use std::collections::BTreeMap;

pub use crate::train::stage::RunOptions;

/// Reads and tokenizes a preference file; warns once with the number of truncated pairs and
/// once with the number of skipped rows (each skipped row is also a warning of its own).
pub fn load_pairs(files: &DataFiles, tok: &Tokenizer, max_len: usize) -> Result<Vec<Pair>> {
    let rows = read_rows(files, Columns::Only(crate::data::preference::COLUMNS))?;
    if rows.is_empty() {
        bail!("{files}: no preference pairs (the file is empty)");
    }
    let (pairs, report) = tokenize_all(&rows, tok, max_len)?;
    if report.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} pairs truncated to max_seq_len = {max_len} tokens",
            files,
            report.truncated,
            rows.len()
        );
    }
    if report.skipped > 0 {
        tracing::warn!(
            "{}: {} of {} rows skipped (see the warnings above)",
            files,
            report.skipped,
            rows.len()
        );
    }
    Ok(pairs)
}

/// The memory check of a stage that runs micro-batches of pairs (2 sequences each);
/// `logits`: whether its loss reads the vocabulary (DPO) or only the final hidden states (a
/// reward model).
pub(crate) fn pair_memory_needs(
    model: &dyn CausalLm,
    train: &[Pair],
    t: &crate::config::common::TrainingSection,
    trainable_params: usize,
    logits: bool,
) -> Vec<MemoryNeed> {
    let longest = train
        .iter()
        .map(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(1);
    let pairs = t.per_device_train_batch_size.min(train.len()).max(1);
    let what = format!(
        "a micro-batch of {pairs} pairs ({} × {longest} tokens)",
        2 * pairs
    );
    sequence_memory_needs(
        model,
        (2 * pairs, longest),
        t,
        trainable_params,
        logits,
        what,
    )
}

/// The memory check of a micro-batch of `micro` sequences of up to `longest` tokens.
pub(crate) fn sequence_memory_needs(
    model: &dyn CausalLm,
    (micro, longest): (usize, usize),
    t: &crate::config::common::TrainingSection,
    trainable_params: usize,
    logits: bool,
    what: String,
) -> Vec<MemoryNeed> {
    let ckpt = t.gradient_checkpointing;
    let bytes = |c| {
        if logits {
            memory::training_bytes(model, micro, longest, trainable_params, c)
        } else {
            memory::headless_training_bytes(model, micro, longest, trainable_params, c)
        }
    };
    vec![MemoryNeed {
        bytes: bytes(ckpt),
        with_checkpointing: (!ckpt).then(|| bytes(true)),
        what,
        lower: "training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective batch) or model.max_seq_len".into(),
    }]
}

/// The policy's trainable set (fresh, or from the checkpoint `resume` names) and one seeded
/// order of `n` examples in global batches (per rank × ranks; each rank takes its slice):
/// what DPO and KTO build before their first step.
pub(crate) fn policy_and_order(
    pre: &mut rlft_policies::Pretrained,
    adapter: &crate::config::common::AdapterSection,
    model_path: &std::path::Path,
    t: &crate::config::common::TrainingSection,
    (n, shuffle): (usize, bool),
    resume: Option<&crate::train::stage::Resume>,
) -> Result<(
    crate::train::trainable::Trainable,
    crate::train::order::DataOrder,
)> {
    let mode = adapter.mode(&pre.model.info().model_type.clone(), model_path);
    let trainable = crate::train::trainable::Trainable::build(
        pre.model.as_mut(),
        &mode,
        t.seed,
        resume.map(|r| r.dir.as_path()),
    )?;
    let batch = t.per_device_train_batch_size * crate::dist::world().size();
    let order = crate::train::order::DataOrder::new(n, batch, t.seed, shuffle);
    Ok((trainable, order))
}

/// Per-pair figures summed over a window (a logging interval or an evaluation), reported
/// as means over its pairs; and, over a logging interval, its updates' losses and gradient
/// norms.
#[derive(Debug, Default, Clone)]
pub struct PairStats {
    sums: BTreeMap<&'static str, f64>,
    pub pairs: usize,
    updates: u64,
    loss: f64,
    grad_norm: f64,
}

impl PairStats {
    /// Records one optimizer update's loss and gradient norm.
    pub fn end_update(&mut self, loss: f64, grad_norm: f64) {
        self.updates += 1;
        self.loss += loss;
        self.grad_norm += grad_norm;
    }

    /// Updates recorded (at least 1, to divide by).
    pub fn updates(&self) -> f64 {
        self.updates.max(1) as f64
    }

    /// Mean loss and gradient norm over the recorded updates.
    pub fn update_means(&self) -> (f64, f64) {
        (self.loss / self.updates(), self.grad_norm / self.updates())
    }

    /// Adds `values` under `name` (one per pair, or per whatever `name` counts).
    pub fn add(&mut self, name: &'static str, values: &[f32]) {
        let s = self.sums.entry(name).or_default();
        for &v in values {
            *s += v as f64;
        }
    }

    /// The total of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.sums.get(name).copied().unwrap_or(f64::NAN)
    }

    /// The window's sums and pair count over every rank (a data-parallel run's metrics are
    /// over all of its pairs). A rank that saw no pair has no figures to add; the others
    /// record the same names, as they run the same code.
    pub fn over_ranks(mut self) -> anyhow::Result<Self> {
        let mine: Vec<f64> = std::iter::once(self.pairs as f64)
            .chain(self.sums.values().copied())
            .collect();
        let all = crate::dist::all_gather(&mine)?;
        let mut pairs = 0f64;
        let mut sums = vec![0f64; self.sums.len()];
        for (rank, v) in all.iter().enumerate() {
            if v[0] == 0.0 {
                continue;
            }
            if v.len() != mine.len() {
                anyhow::bail!(
                    "rank {rank} recorded {} figures, this rank {}",
                    v.len() - 1,
                    mine.len() - 1
                );
            }
            pairs += v[0];
            for (s, x) in sums.iter_mut().zip(&v[1..]) {
                *s += x;
            }
        }
        self.pairs = pairs as usize;
        for (slot, s) in self.sums.values_mut().zip(sums) {
            *slot = s;
        }
        Ok(self)
    }

    /// The mean of `name` over the window's pairs (`per` values per pair).
    pub fn mean(&self, name: &str, per: usize) -> f64 {
        self.sum(name) / (self.pairs * per).max(1) as f64
    }
}
