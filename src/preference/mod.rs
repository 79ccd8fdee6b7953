//! Learning from preference pairs (issue 14): `rlft rm` trains a reward model ([`rm`]),
//! `rlft dpo` the policy straight from the pairs ([`dpo`]). Both run on the shared stage
//! loop ([`crate::train::stage`]); this module holds what they share: reading the pairs and
//! averaging per-pair figures over a logging window.

pub mod dpo;
pub mod logps;
pub mod losses;
pub mod rm;

use crate::data::preference::{tokenize_all, Pair};
use crate::data::read_jsonl;
use anyhow::{bail, Result};
use rlft_policies::{CausalLm, Tokenizer};
use std::collections::BTreeMap;
use std::path::Path;

/// Options of a `rlft rm` / `rlft dpo` run besides its configuration.
pub struct RunOptions {
    /// "latest" or a checkpoint folder.
    pub resume: Option<String>,
    pub quiet: bool,
}

/// `model.max_seq_len`, capped at the model's positions (with a warning).
pub fn max_len(configured: usize, model: &dyn CausalLm) -> usize {
    let positions = model.info().max_positions;
    if configured > positions {
        tracing::warn!(
            "model.max_seq_len {configured} exceeds the model's {positions} positions; using {positions}"
        );
    }
    configured.min(positions)
}

/// Reads and tokenizes a preference file; warns once with the number of truncated pairs.
pub fn load_pairs(path: &Path, tok: &Tokenizer, max_len: usize) -> Result<Vec<Pair>> {
    let rows = read_jsonl(path)?;
    if rows.is_empty() {
        bail!(
            "{}: no preference pairs (the file is empty)",
            path.display()
        );
    }
    let (pairs, report) = tokenize_all(&rows, tok, max_len)?;
    if report.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} pairs truncated to max_seq_len = {max_len} tokens",
            path.display(),
            report.truncated,
            rows.len()
        );
    }
    if report.skipped > 0 {
        tracing::warn!(
            "{}: {} of {} rows skipped (see the warnings above)",
            path.display(),
            report.skipped,
            rows.len()
        );
    }
    Ok(pairs)
}

/// Per-pair figures summed over a window (a logging interval or an evaluation), reported
/// as means, plus minima and maxima where asked.
#[derive(Debug, Default, Clone)]
pub struct PairStats {
    sums: BTreeMap<&'static str, f64>,
    mins: BTreeMap<&'static str, f64>,
    maxs: BTreeMap<&'static str, f64>,
    pub pairs: usize,
}

impl PairStats {
    /// Adds one value per pair under `name`.
    pub fn add(&mut self, name: &'static str, values: &[f32]) {
        let s = self.sums.entry(name).or_default();
        for &v in values {
            *s += v as f64;
        }
    }

    /// Tracks the extremes of `values` under `name`.
    pub fn extremes(&mut self, name: &'static str, values: &[f32]) {
        for &v in values {
            let v = v as f64;
            let lo = self.mins.entry(name).or_insert(f64::INFINITY);
            *lo = lo.min(v);
            let hi = self.maxs.entry(name).or_insert(f64::NEG_INFINITY);
            *hi = hi.max(v);
        }
    }

    /// The mean of `name` over the window's pairs (`per` values per pair).
    pub fn mean(&self, name: &str, per: usize) -> f64 {
        self.sums.get(name).copied().unwrap_or(f64::NAN) / (self.pairs * per).max(1) as f64
    }

    pub fn min(&self, name: &str) -> f64 {
        self.mins.get(name).copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self, name: &str) -> f64 {
        self.maxs.get(name).copied().unwrap_or(f64::NAN)
    }
}
