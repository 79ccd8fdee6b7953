//! `rlft rm`, `rlft dpo` and `rlft kto` configuration (configs/rm.toml, configs/dpo.toml,
//! configs/kto.toml; every key documented in docs/config.md). They read preference pairs
//! (KTO also unpaired rows); names follow TRL's `RewardConfig`, `DPOConfig` and `KTOConfig`.

use super::common::{AdapterSection, ModelSection, TrainableKind, TrainingSection};
use crate::data::DataFiles;
use crate::preference::losses::DpoLoss;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceData {
    /// JSONL or parquet of `{"prompt", "chosen", "rejected"}` or `{"chosen", "rejected"}`
    /// rows (text or chat messages), with an optional numeric `margin`; a path, a list or a
    /// glob.
    pub train_file: DataFiles,
    /// Optional pairs in the same shapes; evaluated every `training.eval_steps` and at the end.
    #[serde(deserialize_with = "crate::data::files::empty_as_none")]
    pub eval_file: Option<DataFiles>,
    /// Shuffle the pairs each epoch (seeded by `training.seed`).
    pub shuffle: bool,
}

impl Default for PreferenceData {
    fn default() -> Self {
        Self {
            train_file: DataFiles::default(),
            eval_file: None,
            shuffle: true,
        }
    }
}

impl PreferenceData {
    fn validate(&self) -> Result<()> {
        if self.train_file.is_empty() {
            bail!("data.train_file is required (JSONL or parquet files of preference pairs)");
        }
        Ok(())
    }
}

/// How the reward model's `score` head starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreInit {
    /// N(0, initializer_range²) from the model's config.json (0.02 without it): transformers'
    /// `_init_weights` for a new `score` Linear.
    #[default]
    Normal,
    Zeros,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RmSection {
    /// TRL's `center_rewards_coefficient`: adds c · mean((r_chosen + r_rejected)²) to the
    /// loss, keeping the rewards centred on 0 (Eisenstein et al. 2023). 0: off.
    pub center_rewards_coefficient: f64,
    pub score_init: ScoreInit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmConfig {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: PreferenceData,
    pub training: TrainingSection,
    pub rm: RmSection,
}

impl Default for RmConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            adapter: AdapterSection::default(),
            data: PreferenceData::default(),
            training: TrainingSection {
                output_dir: PathBuf::from("runs/rm"),
                ..TrainingSection::default()
            },
            rm: RmSection::default(),
        }
    }
}

fn validate_model(model: &ModelSection) -> Result<()> {
    if model.path.as_os_str().is_empty() {
        bail!("model.path is required (a Hugging Face model folder)");
    }
    if model.max_seq_len < 2 {
        bail!("model.max_seq_len must be at least 2");
    }
    Ok(())
}

impl RmConfig {
    pub fn validate(&self) -> Result<()> {
        validate_model(&self.model)?;
        self.data.validate()?;
        let c = self.rm.center_rewards_coefficient;
        if !(c >= 0.0 && c.is_finite()) {
            bail!("rm.center_rewards_coefficient must be ≥ 0, got {c}");
        }
        self.adapter.validate()?;
        self.model.validate_quantization(&self.adapter)?;
        self.training.validate()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSection {
    /// β: the strength of the implicit KL leash (TRL's default 0.1).
    pub beta: f64,
    /// sigmoid (DPO) | hinge (SLiC) | ipo.
    pub loss_type: String,
    /// ε of robust / conservative DPO: the chance a label is flipped (sigmoid only).
    pub label_smoothing: f64,
    /// Score every pair under the reference once, before training, instead of at every
    /// step (needed when the base weights themselves are trained).
    pub precompute_ref_log_probs: bool,
    /// An SFT adapter merged into the base first: the reference is then the SFT model.
    #[serde(deserialize_with = "super::empty_as_none")]
    pub sft_adapter: Option<PathBuf>,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: "sigmoid".into(),
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            sft_adapter: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: PreferenceData,
    pub training: TrainingSection,
    pub dpo: DpoSection,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            adapter: AdapterSection::default(),
            data: PreferenceData::default(),
            training: TrainingSection {
                output_dir: PathBuf::from("runs/dpo"),
                ..TrainingSection::default()
            },
            dpo: DpoSection::default(),
        }
    }
}

impl DpoConfig {
    pub fn validate(&self) -> Result<()> {
        validate_model(&self.model)?;
        self.data.validate()?;
        let d = &self.dpo;
        let loss = self.loss()?;
        if !(d.beta > 0.0 && d.beta.is_finite()) {
            bail!("dpo.beta must be positive, got {}", d.beta);
        }
        if !(0.0..0.5).contains(&d.label_smoothing) {
            bail!(
                "dpo.label_smoothing must be in [0, 0.5), got {}",
                d.label_smoothing
            );
        }
        if d.label_smoothing > 0.0 && loss != DpoLoss::Sigmoid {
            bail!(
                "dpo.label_smoothing applies to loss_type = \"sigmoid\" only (got {:?})",
                d.loss_type
            );
        }
        if self.adapter.trainable != TrainableKind::Lora && !d.precompute_ref_log_probs {
            bail!("adapter.trainable = {:?} changes the base weights, so the reference cannot be the base with the adapter off: set dpo.precompute_ref_log_probs = true", self.adapter.trainable);
        }
        self.adapter.validate()?;
        self.model.validate_quantization(&self.adapter)?;
        self.training.validate()
    }

    pub fn loss(&self) -> Result<DpoLoss> {
        DpoLoss::parse(&self.dpo.loss_type).map_err(|e| anyhow::anyhow!("dpo.loss_type: {e}"))
    }
}

/// TRL's `KTOConfig.loss_type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    /// Kahneman–Tversky Optimization (Ethayarajh et al. 2024, eq. 7), with the KL estimate.
    #[default]
    Kto,
    /// APO-zero's unpaired form (D'Oosterlinck et al. 2024): no KL estimate.
    ApoZeroUnpaired,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoSection {
    /// β (TRL's default 0.1).
    pub beta: f64,
    pub loss_type: KtoLoss,
    /// λ_D: the weight of desirable examples' losses.
    pub desirable_weight: f64,
    /// λ_U: the weight of undesirable examples' losses.
    pub undesirable_weight: f64,
    /// An SFT adapter merged into the base first: the reference is then the SFT model.
    #[serde(deserialize_with = "super::empty_as_none")]
    pub sft_adapter: Option<PathBuf>,
}

impl Default for KtoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: KtoLoss::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            sft_adapter: None,
        }
    }
}

/// `rlft kto` (configs/kto.toml): the data section reads unpaired rows
/// (`{"prompt", "completion", "label"}`) or pairs, which are unpaired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoConfig {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: PreferenceData,
    pub training: TrainingSection,
    pub kto: KtoSection,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            adapter: AdapterSection::default(),
            data: PreferenceData::default(),
            training: TrainingSection {
                output_dir: PathBuf::from("runs/kto"),
                ..TrainingSection::default()
            },
            kto: KtoSection::default(),
        }
    }
}

impl KtoConfig {
    pub fn validate(&self) -> Result<()> {
        validate_model(&self.model)?;
        self.data.validate()?;
        let k = &self.kto;
        if !(k.beta > 0.0 && k.beta.is_finite()) {
            bail!("kto.beta must be positive, got {}", k.beta);
        }
        for (name, w) in [
            ("desirable_weight", k.desirable_weight),
            ("undesirable_weight", k.undesirable_weight),
        ] {
            if !(w > 0.0 && w.is_finite()) {
                bail!("kto.{name} must be positive, got {w}");
            }
        }
        if k.loss_type == KtoLoss::Kto && self.training.per_device_train_batch_size < 2 {
            bail!("kto.loss_type = \"kto\" estimates the KL term from each prompt paired with another row's completion in the same micro-batch: training.per_device_train_batch_size must be at least 2 (TRL's requirement too)");
        }
        if self.adapter.trainable != TrainableKind::Lora {
            bail!("adapter.trainable = {:?} changes the base weights, so the reference cannot be the base with the adapter off; rlft kto trains LoRA adapters", self.adapter.trainable);
        }
        self.adapter.validate()?;
        self.model.validate_quantization(&self.adapter)?;
        self.training.validate()
    }
}
