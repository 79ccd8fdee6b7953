//! Config sections every training stage shares.

use anyhow::{bail, Result};
use rlft_policies::lora::LoraInit;
use rlft_policies::quant::{QuantConfig, Quantization};
use rlft_policies::{LoraConfig, Targets};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::train::optimizer::OptimizerKind;
use crate::train::schedule::ScheduleKind;
use crate::train::trainable::Mode;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face model folder, or a Hub id (`org/name`) found in the local Hugging Face
    /// cache (`policies::hub`); a folder of that name wins.
    pub path: PathBuf,
    /// The Hub id's revision: a branch or tag (`refs/<revision>` in the cache) or a commit hash.
    pub revision: String,
    /// f32 | bf16 | f16.
    pub dtype: String,
    /// cpu | cuda | cuda:N.
    pub device: String,
    /// Examples are truncated to this many tokens.
    pub max_seq_len: usize,
    /// none | int8 | nf4 | fp4: the frozen base's block linear weights held in 8 or 4 bits
    /// (bitsandbytes' `load_in_8bit` / `load_in_4bit` with `bnb_4bit_quant_type`); the
    /// compute dtype is `dtype`.
    pub quantization: String,
    /// bitsandbytes' `bnb_4bit_use_double_quant`: the 4-bit blocks' absmax in 8 bits too.
    pub bnb_4bit_use_double_quant: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            revision: "main".into(),
            dtype: "f32".into(),
            device: "cpu".into(),
            max_seq_len: 512,
            quantization: "none".into(),
            bnb_4bit_use_double_quant: false,
        }
    }
}

impl ModelSection {
    /// `quantization` and `bnb_4bit_use_double_quant` as a load setting.
    pub fn quant_config(&self) -> Result<QuantConfig> {
        quant_config(&self.quantization, self.bnb_4bit_use_double_quant)
            .map_err(|e| anyhow::anyhow!("model.quantization: {e}"))
    }

    /// A quantized base trains adapters only (QLoRA): its weights have no full-precision
    /// copy to update.
    pub fn validate_quantization(&self, adapter: &AdapterSection) -> Result<()> {
        let q = self.quant_config()?;
        if !q.is_none() && adapter.trainable != TrainableKind::Lora {
            bail!(
                "adapter.trainable = \"{}\" trains the base's own weights, which model.quantization = \"{}\" holds frozen in k bits; QLoRA trains a LoRA adapter (adapter.trainable = \"lora\"), or load the base unquantized (model.quantization = \"none\")",
                adapter.trainable.name(),
                q.kind.name()
            );
        }
        Ok(())
    }
}

/// `"nf4"` (and the double-quantization flag) → the load setting; an unknown name is an
/// error listing the known ones.
pub fn quant_config(name: &str, double_quant: bool) -> Result<QuantConfig, String> {
    let kind = Quantization::parse(name).ok_or_else(|| {
        format!(
            "unknown quantization {name:?}; expected one of {}",
            Quantization::NAMES
        )
    })?;
    if double_quant && !matches!(kind, Quantization::Nf4 | Quantization::Fp4) {
        tracing::warn!(
            "bnb_4bit_use_double_quant applies to nf4 and fp4 only; ignored with quantization = {name:?}"
        );
    }
    Ok(QuantConfig {
        kind,
        double_quant: double_quant && matches!(kind, Quantization::Nf4 | Quantization::Fp4),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainableKind {
    #[default]
    Lora,
    LastNLayers,
    Full,
}

impl TrainableKind {
    pub fn name(self) -> &'static str {
        match self {
            TrainableKind::Lora => "lora",
            TrainableKind::LastNLayers => "last_n_layers",
            TrainableKind::Full => "full",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    #[default]
    Default,
    Gaussian,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSection {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// A list of module names, `"all-linear"`, or a regex over module paths. Unset: PEFT's
    /// per-family default (`q_proj`, `v_proj`; GPT-2: `c_attn`).
    pub target_modules: Option<Targets>,
    /// Only "none" (LoRA layers have no bias).
    pub bias: String,
    pub use_rslora: bool,
    pub init: InitKind,
    /// lora | last_n_layers | full.
    pub trainable: TrainableKind,
    /// Blocks trained when `trainable = "last_n_layers"`.
    pub last_n_layers: usize,
}

impl Default for AdapterSection {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: None,
            bias: "none".into(),
            use_rslora: false,
            init: InitKind::Default,
            trainable: TrainableKind::Lora,
            last_n_layers: 1,
        }
    }
}

impl AdapterSection {
    pub fn validate(&self) -> Result<()> {
        if self.bias != "none" {
            bail!("adapter.bias = {:?}: only \"none\" is supported (PEFT's default; LoRA layers without bias)", self.bias);
        }
        if self.r == 0 {
            bail!("adapter.r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "adapter.lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            );
        }
        if self.lora_alpha <= 0.0 {
            bail!(
                "adapter.lora_alpha must be positive, got {}",
                self.lora_alpha
            );
        }
        if self.trainable == TrainableKind::LastNLayers && self.last_n_layers == 0 {
            bail!("adapter.last_n_layers must be at least 1 with trainable = \"last_n_layers\"");
        }
        Ok(())
    }

    /// What to train on a model of `model_type`.
    pub fn mode(&self, model_type: &str, model_dir: &std::path::Path) -> Mode {
        match self.trainable {
            TrainableKind::Lora => Mode::Lora(LoraConfig {
                r: self.r,
                lora_alpha: self.lora_alpha,
                lora_dropout: self.lora_dropout,
                target_modules: self
                    .target_modules
                    .clone()
                    .unwrap_or_else(|| default_targets(model_type)),
                use_rslora: self.use_rslora,
                init: match self.init {
                    InitKind::Default => LoraInit::Default,
                    InitKind::Gaussian => LoraInit::Gaussian,
                },
                fan_in_fan_out: false,
                base_model_name_or_path: Some(model_dir.display().to_string()),
            }),
            TrainableKind::LastNLayers => Mode::LastNLayers(self.last_n_layers),
            TrainableKind::Full => Mode::Full,
        }
    }
}

/// PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for the supported families.
pub fn default_targets(model_type: &str) -> Targets {
    match model_type {
        "gpt2" => Targets::List(vec!["c_attn".into()]),
        _ => Targets::List(vec!["q_proj".into(), "v_proj".into()]),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    #[default]
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    pub learning_rate: f64,
    /// constant | linear | cosine.
    pub lr_scheduler: ScheduleKind,
    /// Fraction of the total steps spent warming up (ignored when `warmup_steps` > 0).
    pub warmup_ratio: f64,
    pub warmup_steps: u64,
    /// Optimizer updates to run; 0 means `num_train_epochs` decides.
    pub max_steps: u64,
    pub num_train_epochs: f64,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer update.
    pub gradient_accumulation_steps: usize,
    /// Global gradient-norm clipping; 0 disables.
    pub max_grad_norm: f64,
    pub optimizer: OptimizerName,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    pub seed: u64,
    pub logging_steps: u64,
    /// Evaluate every N updates (0: only at the end); needs `data.eval_file`.
    pub eval_steps: u64,
    /// Checkpoint every N updates (0: only at the end).
    pub save_steps: u64,
    /// Keep at most this many checkpoints (unset: all).
    pub save_total_limit: Option<usize>,
    pub output_dir: PathBuf,
    /// Stop after this many consecutive updates skipped for a non-finite loss or gradient.
    pub max_bad_steps: u64,
    /// Per-block activation recompute in every training pass (transformers'
    /// `gradient_checkpointing`): only block inputs are kept through the forward.
    pub gradient_checkpointing: bool,
    /// Where metrics go besides `metrics.jsonl` (TRL's key): `[]`/`["none"]`, or
    /// `["tensorboard"]` (event files under `output_dir/runs/`).
    pub report_to: Vec<String>,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            lr_scheduler: ScheduleKind::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            max_steps: 0,
            num_train_epochs: 3.0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            optimizer: OptimizerName::Adamw,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            seed: 42,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 500,
            save_total_limit: None,
            output_dir: PathBuf::from("runs/sft"),
            max_bad_steps: 5,
            gradient_checkpointing: false,
            report_to: Vec::new(),
        }
    }
}

impl TrainingSection {
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = self
            .report_to
            .iter()
            .find(|r| !matches!(r.as_str(), "tensorboard" | "none"))
        {
            bail!("training.report_to: {r:?} is not supported; supported: \"tensorboard\" (and \"none\"); metrics.jsonl is always written");
        }
        if self.max_bad_steps == 0 {
            bail!("training.max_bad_steps must be at least 1 (the bad steps in a row that stop a run)");
        }
        if self.save_total_limit == Some(0) {
            bail!("training.save_total_limit must be at least 1 (leave it unset to keep every checkpoint)");
        }
        if !(self.learning_rate >= 0.0 && self.learning_rate.is_finite()) {
            bail!(
                "training.learning_rate must be ≥ 0, got {}",
                self.learning_rate
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!(
                "training.warmup_ratio must be in [0, 1], got {}",
                self.warmup_ratio
            );
        }
        if self.max_steps == 0 && !(self.num_train_epochs > 0.0) {
            bail!("training: set max_steps > 0 or num_train_epochs > 0");
        }
        if self.per_device_train_batch_size == 0 {
            bail!("training.per_device_train_batch_size must be at least 1");
        }
        if self.gradient_accumulation_steps == 0 {
            bail!("training.gradient_accumulation_steps must be at least 1");
        }
        if self.max_grad_norm < 0.0 {
            bail!("training.max_grad_norm must be ≥ 0 (0 disables clipping)");
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            bail!("training.adam_beta1 and adam_beta2 must be in [0, 1)");
        }
        if self.adam_epsilon <= 0.0 {
            bail!("training.adam_epsilon must be positive");
        }
        if self.weight_decay < 0.0 {
            bail!("training.weight_decay must be ≥ 0");
        }
        if self.logging_steps == 0 {
            bail!("training.logging_steps must be at least 1");
        }
        if self.output_dir.as_os_str().is_empty() {
            bail!("training.output_dir must be set");
        }
        Ok(())
    }

    pub fn optimizer_kind(&self) -> OptimizerKind {
        match self.optimizer {
            OptimizerName::Adamw => OptimizerKind::AdamW {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            OptimizerName::Sgd => OptimizerKind::Sgd {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
        }
    }

    /// Warmup length for a run of `total` updates.
    pub fn warmup_for(&self, total: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total as f64).ceil() as u64
        }
    }
}
