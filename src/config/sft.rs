//! `rlft sft` configuration (configs/sft.toml; every key documented in docs/config.md).

use super::common::{AdapterSection, ModelSection, TrainingSection};
use crate::data::DataFiles;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// JSONL or parquet: `{"prompt","completion"}`, `{"messages"}` or `{"text"}` rows; a
    /// path, a list or a glob.
    pub train_file: DataFiles,
    /// Optional examples in the same shapes; evaluated every `training.eval_steps`.
    #[serde(deserialize_with = "crate::data::files::empty_as_none")]
    pub eval_file: Option<DataFiles>,
    /// Loss on completion / assistant tokens only (prompt masked).
    pub completion_only_loss: bool,
    /// Shuffle the examples each epoch (seeded by `training.seed`).
    pub shuffle: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train_file: DataFiles::default(),
            eval_file: None,
            completion_only_loss: true,
            shuffle: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: DataSection,
    pub training: TrainingSection,
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        if self.model.path.as_os_str().is_empty() {
            bail!("model.path is required (a Hugging Face model folder)");
        }
        if self.data.train_file.is_empty() {
            bail!("data.train_file is required (JSONL or parquet files)");
        }
        if self.model.max_seq_len < 2 {
            bail!("model.max_seq_len must be at least 2");
        }
        self.adapter.validate()?;
        self.model.validate_quantization(&self.adapter)?;
        self.training.validate()
    }
}
