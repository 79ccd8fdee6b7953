//! Arguments and loading shared by the commands that run a model.

use crate::config::common::quant_config;
use anyhow::{Context, Result};
use rlft_policies::device::{parse_device, parse_dtype};
use rlft_policies::quant::QuantConfig;
use rlft_policies::{Adapter, Pretrained};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, model.safetensors, tokenizer.json, …), or a
    /// Hub id (`org/name`) in the local Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// The Hub id's revision (branch, tag or commit hash).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors), or a Hub
    /// id in the cache.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// none, int8, nf4 or fp4: the base's block linear weights held in 8 or 4 bits
    /// (as `model.quantization`), computing in `--dtype`.
    #[arg(long, default_value = "none")]
    pub quantization: String,
    /// With nf4/fp4: the blocks' absmax in 8 bits too (`bnb_4bit_use_double_quant`).
    #[arg(long)]
    pub bnb_4bit_use_double_quant: bool,
}

impl ModelArgs {
    /// `--quantization` and `--bnb-4bit-use-double-quant` as a load setting.
    pub fn quant_config(&self) -> Result<QuantConfig> {
        quant_config(&self.quantization, self.bnb_4bit_use_double_quant)
            .map_err(|e| anyhow::anyhow!("--quantization: {e}"))
    }

    pub fn load(&self) -> Result<(Pretrained, Option<Adapter>)> {
        let dtype = parse_dtype(&self.dtype)?;
        let device = parse_device(&self.device)?;
        let quant = self.quant_config()?;
        let dir = rlft_policies::hub::resolve(&self.model, &self.revision)
            .with_context(|| format!("--model {}", self.model.display()))?;
        let pre = Pretrained::load_quantized(&dir, dtype, quant, &device)
            .with_context(|| format!("loading model {}", self.model.display()))?;
        let adapter = match &self.adapter {
            Some(a) => {
                let dir = rlft_policies::hub::resolve(a, "main")
                    .with_context(|| format!("--adapter {}", a.display()))?;
                Some(
                    Adapter::load(&dir, pre.model.as_ref())
                        .with_context(|| format!("loading adapter {}", a.display()))?,
                )
            }
            None => None,
        };
        Ok((pre, adapter))
    }
}

/// The arguments every training stage takes.
#[derive(clap::Args, Debug)]
pub struct StageArgs {
    /// TOML configuration (configs/*.toml; every key in docs/config.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a key: `--set training.learning_rate=1e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from the newest checkpoint in output_dir, or from the given one.
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}
