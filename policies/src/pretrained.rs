//! A Hugging Face model folder loaded whole: model, tokenizer and stop ids.

use crate::error::{PolicyError, Result};
use crate::families::{load_model_quantized, CausalLm};
use crate::quant::QuantConfig;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

pub struct Pretrained {
    pub dir: PathBuf,
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
}

impl Pretrained {
    /// Loads `dir`, checking first that the files a causal LM needs are there.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, QuantConfig::default(), device)
    }

    /// [`Pretrained::load`] with the blocks' linear weights quantized (`model.quantization`).
    pub fn load_quantized(
        dir: &Path,
        dtype: DType,
        quant: QuantConfig,
        device: &Device,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(PolicyError::MissingFolder(dir.to_path_buf()));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(PolicyError::MissingFile {
                path: config,
                what: "the model configuration".into(),
            });
        }
        let tokenizer = Tokenizer::load(dir)?;
        let model = load_model_quantized(dir, dtype, quant, device)?;
        let vocab = model.info().vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(PolicyError::Tokenizer {
                path: dir.join("tokenizer.json"),
                msg: format!(
                    "{} tokens, more than the model's vocab_size {vocab}",
                    tokenizer.vocab_size()
                ),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
        })
    }
}
