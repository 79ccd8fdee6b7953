//! What a run trains: a LoRA adapter, or base weights (`full`, `last_n_layers`), and how
//! those are saved into checkpoints and outputs and restored on resume.

use super::checkpoint::save_tensors;
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use rlft_policies::params::{last_n_layers, make_trainable, save_pretrained};
use rlft_policies::{Adapter, CausalLm, LoraConfig};
use std::collections::HashMap;
use std::path::Path;

pub const WEIGHTS_FILE: &str = "trainable.safetensors";

/// Which parameters receive gradients.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Lora(LoraConfig),
    LastNLayers(usize),
    Full,
}

pub enum Trainable {
    Lora(Adapter),
    Params(Vec<(String, Var)>),
}

impl Trainable {
    /// Sets up what `mode` trains on `model`; with `resume`, restores its values from a
    /// checkpoint folder.
    pub fn build(
        model: &mut dyn CausalLm,
        mode: &Mode,
        seed: u64,
        resume: Option<&Path>,
    ) -> Result<Self> {
        Self::build_filtered(model, mode, seed, resume, &|_| true)
    }

    /// As [`Self::build`], without the output head (`lm_head`, when untied) among the base
    /// weights trained: for a model whose loss never reads the vocabulary (a reward model's
    /// score head reads the final hidden states).
    pub fn build_without_head(
        model: &mut dyn CausalLm,
        mode: &Mode,
        seed: u64,
        resume: Option<&Path>,
    ) -> Result<Self> {
        let head = format!("{}.weight", model.info().output_head);
        Self::build_filtered(model, mode, seed, resume, &|name| name != head)
    }

    fn build_filtered(
        model: &mut dyn CausalLm,
        mode: &Mode,
        seed: u64,
        resume: Option<&Path>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        Ok(match mode {
            Mode::Lora(cfg) => Trainable::Lora(match resume {
                Some(dir) => Adapter::load(dir, model)
                    .with_context(|| format!("restoring the adapter from {}", dir.display()))?,
                None => Adapter::new(model, cfg.clone(), seed)?,
            }),
            Mode::LastNLayers(_) | Mode::Full => {
                let vars = match mode {
                    Mode::LastNLayers(n) => {
                        let select = last_n_layers(model.info().num_layers, *n);
                        make_trainable(model, &|name| select(name) && keep(name))?
                    }
                    _ => make_trainable(model, keep)?,
                };
                if let Some(dir) = resume {
                    let p = dir.join(WEIGHTS_FILE);
                    let saved = candle_core::safetensors::load(&p, &model.info().device)
                        .with_context(|| format!("reading {}", p.display()))?;
                    for (name, v) in &vars {
                        let t = saved
                            .get(name)
                            .with_context(|| format!("{}: no tensor `{name}`", p.display()))?;
                        v.set(t)?;
                    }
                }
                Trainable::Params(vars)
            }
        })
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Trainable::Lora(a) => Some(a),
            Trainable::Params(_) => None,
        }
    }

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        match self {
            Trainable::Lora(a) => a.named_vars(),
            Trainable::Params(v) => v.clone(),
        }
    }

    /// Writes the trainable values into a checkpoint folder.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        match self {
            Trainable::Lora(a) => Ok(a.save(dir)?),
            Trainable::Params(vars) => {
                let t: HashMap<String, Tensor> = vars
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                    .collect();
                save_tensors(&t, &dir.join(WEIGHTS_FILE))
            }
        }
    }

    /// The run's result: `output_dir/adapter/` (PEFT) or `output_dir/model/` (a full
    /// Hugging Face folder). Returns the folder written.
    pub fn save_final(
        &self,
        model: &mut dyn CausalLm,
        model_dir: &Path,
        output_dir: &Path,
    ) -> Result<std::path::PathBuf> {
        match self {
            Trainable::Lora(a) => {
                let dir = output_dir.join("adapter");
                a.save(&dir)?;
                Ok(dir)
            }
            Trainable::Params(_) => {
                let dir = output_dir.join("model");
                save_pretrained(model, model_dir, &dir)?;
                Ok(dir)
            }
        }
    }
}
