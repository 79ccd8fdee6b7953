//! `rlft ppo` / `rlft grpo` configuration (configs/ppo.toml, configs/grpo.toml; every key in
//! docs/config.md).

use super::common::{AdapterSection, ModelSection, TrainableKind, TrainingSection};
use crate::data::DataFiles;
use crate::rl::advantages::ScaleRewards;
use crate::rl::kl::KlEstimator;
use crate::rl::losses::{ImportanceSamplingLevel, LossAggregation, LossType, PolicyObjective};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    Ppo,
    Grpo,
    Rloo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Critic {
    /// The value head reads the policy's hidden state (same adapter).
    #[default]
    Shared,
    /// The value head reads a second adapter on the same base weights.
    Separate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptData {
    /// JSONL or parquet: `{"prompt": "…"}` or `{"messages": […]}` rows; other fields
    /// (columns) go to the rewards. A path, a list or a glob.
    pub prompt_file: DataFiles,
    /// Optional held-out prompts for evaluation (same shape).
    #[serde(deserialize_with = "crate::data::files::empty_as_none")]
    pub eval_file: Option<DataFiles>,
    pub shuffle: bool,
}

impl Default for PromptData {
    fn default() -> Self {
        Self {
            prompt_file: DataFiles::default(),
            eval_file: None,
            shuffle: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSection {
    pub max_new_tokens: usize,
    /// Sampling temperature; log-probs are computed from logits / temperature (1 when 0).
    pub temperature: f64,
    /// 0: off.
    pub top_k: usize,
    pub top_p: f64,
    /// Extra ids that end a response besides the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop_token_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlSection {
    pub algorithm: Algorithm,
    /// An SFT adapter merged into the base first: the reference is then the SFT model.
    #[serde(deserialize_with = "super::empty_as_none")]
    pub sft_adapter: Option<PathBuf>,
    pub critic: Critic,
    /// Rollouts per step (prompts × num_generations).
    pub batch_size: usize,
    /// Completions per prompt (GRPO/RLOO groups; 1 is usual for PPO).
    pub num_generations: usize,
    pub num_ppo_epochs: usize,
    pub num_mini_batches: usize,
    /// β.
    pub kl_coef: f64,
    /// KL in the reward (PPO, RLOO). GRPO's KL loss always uses k3.
    pub kl_estimator: KlEstimator,
    /// Adapt β toward `kl_target` (Ziegler et al.).
    pub adaptive_kl: bool,
    pub kl_target: f64,
    pub kl_horizon: f64,
    /// Subtracted from the score of responses that hit max_new_tokens without a stop token.
    pub missing_eos_penalty: Option<f64>,
    /// Clip the score to ±reward_clip.
    pub reward_clip: Option<f64>,
    pub whiten_rewards: bool,
    pub whiten_advantages: bool,
    pub gamma: f64,
    pub lam: f64,
    /// ε (ε_low when cliprange_high is set).
    pub cliprange: f64,
    /// ε_high (DAPO's clip-higher); unset: = cliprange.
    pub cliprange_high: Option<f64>,
    /// Dual clip c for negative advantages (veRL); unset: off.
    pub clip_ratio_c: Option<f64>,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub entropy_coef: f64,
    /// TRL's `loss_type`: grpo | dr_grpo | bnpo | dapo | cispo | sapo (unset: dapo, or what
    /// the older `loss_aggregation` names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_type: Option<LossType>,
    /// The older name of the aggregation of grpo (`seq_mean_token_mean`), dr_grpo
    /// (`seq_mean_token_sum_norm`) and dapo (`token_mean`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_aggregation: Option<LossAggregation>,
    /// `token` | `sequence` (GSPO: one length-normalised ratio per sequence).
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// SAPO's temperatures for tokens with positive and non-positive advantages.
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// Responses that hit max_new_tokens without a stop token get no loss (DAPO).
    pub mask_truncated_completions: bool,
    /// Drop groups whose scores are all equal before the update (DAPO); no refill.
    pub dynamic_sampling: bool,
    pub scale_rewards: ScaleRewards,
    /// Stop the epoch loop early when the mean approx KL of an epoch exceeds this.
    pub target_kl: Option<f64>,
    /// Write sample rollouts to rollouts.jsonl every N steps (0: never).
    pub log_rollouts_every: u64,
    /// How many rollouts each such write holds.
    pub rollouts_per_log: usize,
    /// LoRA dropout off during RL (as TRL's `disable_dropout`), so ratios start at exactly 1;
    /// `false` applies `adapter.lora_dropout` in the training passes (masks seeded and
    /// checkpointed as in SFT).
    pub disable_dropout: bool,
    /// Compute each group's prompt once in the old-policy and training passes (a packed row
    /// per group) where that costs less; off with dropout. The results equal the per-row
    /// passes' to rounding.
    pub share_prompts: bool,
    /// Hash the base weights before and after the run and log whether they are bitwise
    /// unchanged (`check/base_weights_unchanged`); costs one read of the weights.
    pub verify_base_weights: bool,
}

impl Default for RlSection {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Ppo,
            sft_adapter: None,
            critic: Critic::Shared,
            batch_size: 16,
            num_generations: 1,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: false,
            kl_target: 6.0,
            kl_horizon: 10000.0,
            missing_eos_penalty: None,
            reward_clip: None,
            whiten_rewards: false,
            whiten_advantages: true,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_high: None,
            clip_ratio_c: None,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            entropy_coef: 0.0,
            loss_type: None,
            loss_aggregation: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            mask_truncated_completions: false,
            dynamic_sampling: false,
            scale_rewards: ScaleRewards::Group,
            target_kl: None,
            log_rollouts_every: 1,
            rollouts_per_log: 8,
            disable_dropout: true,
            share_prompts: true,
            verify_base_weights: false,
        }
    }
}

impl RlSection {
    /// `loss_type`, else the loss type the older `loss_aggregation` names, else dapo; both
    /// set and disagreeing is an error.
    pub fn loss_type(&self) -> Result<LossType> {
        match (self.loss_type, self.loss_aggregation) {
            (Some(t), Some(a)) if t.aggregation() != a => bail!(
                "rl.loss_aggregation = {} disagrees with rl.loss_type = {} (which aggregates as {}); loss_aggregation is the older name of the aggregation: set only rl.loss_type ({})",
                toml_name(&a),
                toml_name(&t),
                toml_name(&t.aggregation()),
                LossType::NAMES
            ),
            (Some(t), _) => Ok(t),
            (None, Some(a)) => Ok(LossType::of_aggregation(a)),
            (None, None) => Ok(LossType::default()),
        }
    }

    /// The policy objective these settings describe.
    pub fn objective(&self) -> Result<PolicyObjective> {
        Ok(PolicyObjective {
            loss_type: self.loss_type()?,
            level: self.importance_sampling_level,
            eps_low: self.cliprange,
            eps_high: self.cliprange_high.unwrap_or(self.cliprange),
            dual_clip: self.clip_ratio_c,
            sapo_temperature_pos: self.sapo_temperature_pos,
            sapo_temperature_neg: self.sapo_temperature_neg,
        })
    }
}

/// How a config enum value is written in TOML, e.g. `"seq_mean_token_mean"`.
fn toml_name<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// One `[[reward]]` table: `name`, `weight`, and the reward's own options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardSpec {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: PromptData,
    pub generation: GenerationSection,
    pub rl: RlSection,
    pub training: TrainingSection,
    pub reward: Vec<RewardSpec>,
}

impl Default for RlConfig {
    fn default() -> Self {
        let training = TrainingSection {
            learning_rate: 1e-4,
            lr_scheduler: crate::train::schedule::ScheduleKind::Constant,
            num_train_epochs: 1.0,
            per_device_train_batch_size: 8,
            logging_steps: 1,
            save_steps: 50,
            output_dir: PathBuf::from("runs/ppo"),
            ..TrainingSection::default()
        };
        Self {
            model: ModelSection::default(),
            adapter: AdapterSection {
                lora_dropout: 0.0,
                ..AdapterSection::default()
            },
            data: PromptData::default(),
            generation: GenerationSection::default(),
            rl: RlSection::default(),
            training,
            reward: Vec::new(),
        }
    }
}

impl RlConfig {
    pub fn validate(&self) -> Result<()> {
        if self.model.path.as_os_str().is_empty() {
            bail!("model.path is required (a Hugging Face model folder)");
        }
        if self.data.prompt_file.is_empty() {
            bail!("data.prompt_file is required (JSONL or parquet files of prompts)");
        }
        if self.reward.is_empty() {
            bail!("no [[reward]]: add at least one, e.g.\n[[reward]]\nname = \"numeric_match\"\nfield = \"answer\"");
        }
        self.adapter.validate()?;
        self.model.validate_quantization(&self.adapter)?;
        self.training.validate()?;
        if self.adapter.trainable != TrainableKind::Lora {
            bail!("adapter.trainable must be \"lora\" for RL: the reference shares the frozen base weights");
        }
        if self.training.gradient_accumulation_steps != 1 {
            bail!("training.gradient_accumulation_steps is for SFT; in RL a mini-batch is split into micro-batches of per_device_train_batch_size (set rl.num_mini_batches)");
        }
        let r = &self.rl;
        let g = &self.generation;
        if g.max_new_tokens == 0 {
            bail!("generation.max_new_tokens must be at least 1");
        }
        if !(g.temperature >= 0.0) {
            bail!("generation.temperature must be ≥ 0, got {}", g.temperature);
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            bail!("generation.top_p must be in (0, 1], got {}", g.top_p);
        }
        if r.batch_size == 0
            || r.num_generations == 0
            || r.num_ppo_epochs == 0
            || r.num_mini_batches == 0
        {
            bail!("rl.batch_size, num_generations, num_ppo_epochs and num_mini_batches must be at least 1");
        }
        if r.batch_size % r.num_generations != 0 {
            bail!(
                "rl.batch_size {} is not divisible by rl.num_generations {}",
                r.batch_size,
                r.num_generations
            );
        }
        if r.batch_size % r.num_mini_batches != 0 {
            bail!(
                "rl.batch_size {} is not divisible by rl.num_mini_batches {}",
                r.batch_size,
                r.num_mini_batches
            );
        }
        let mini = r.batch_size / r.num_mini_batches;
        if mini % self.training.per_device_train_batch_size != 0 {
            bail!(
                "the mini-batch of {mini} rollouts (rl.batch_size / rl.num_mini_batches) is not divisible by training.per_device_train_batch_size {}",
                self.training.per_device_train_batch_size
            );
        }
        if matches!(r.algorithm, Algorithm::Grpo | Algorithm::Rloo) && r.num_generations < 2 {
            bail!("rl.num_generations must be at least 2 for {:?} (advantages compare completions of one prompt)", r.algorithm);
        }
        if r.kl_coef < 0.0 {
            bail!("rl.kl_coef must be ≥ 0, got {}", r.kl_coef);
        }
        if !(r.cliprange > 0.0) || r.cliprange_high.is_some_and(|e| !(e > 0.0)) {
            bail!("rl.cliprange and cliprange_high must be positive");
        }
        r.loss_type()?;
        if r.loss_type()? == LossType::Cispo && r.cliprange_high.is_none() {
            bail!("rl.loss_type = \"cispo\" caps the ratio at rl.cliprange_high (TRL's epsilon_high, ε_max; ScaleRL uses 5.0): set it");
        }
        let sequence = r.importance_sampling_level == ImportanceSamplingLevel::Sequence;
        if sequence && r.loss_type()?.aggregation() != LossAggregation::SeqMeanTokenMean {
            // As TRL warns: GSPO's objective is per sequence.
            tracing::warn!(
                "rl.importance_sampling_level = \"sequence\" with rl.loss_type = {}: each sequence's ratio term is weighted by its length (the loss sums tokens); GSPO's paper setup is loss_type = \"grpo\"",
                toml_name(&r.loss_type()?)
            );
        }
        if !(r.sapo_temperature_pos > 0.0 && r.sapo_temperature_neg > 0.0) {
            bail!("rl.sapo_temperature_pos and rl.sapo_temperature_neg must be positive");
        }
        if r.dynamic_sampling && r.num_generations < 2 {
            bail!("rl.dynamic_sampling drops groups whose scores are all equal: it needs rl.num_generations ≥ 2");
        }
        if r.clip_ratio_c.is_some_and(|c| c <= 1.0) {
            bail!("rl.clip_ratio_c must be greater than 1");
        }
        if !(0.0..=1.0).contains(&r.gamma) || !(0.0..=1.0).contains(&r.lam) {
            bail!("rl.gamma and rl.lam must be in [0, 1]");
        }
        if r.adaptive_kl && !(r.kl_target > 0.0 && r.kl_horizon > 0.0) {
            bail!("rl.kl_target and rl.kl_horizon must be positive with adaptive_kl");
        }
        Ok(())
    }

    /// Prompts per step.
    pub fn prompts_per_step(&self) -> usize {
        self.rl.batch_size / self.rl.num_generations
    }
}
