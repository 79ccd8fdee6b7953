//! The reward registry rlft's CLI uses: the built-ins of `rlft-reward` plus `model`, a
//! Hugging Face sequence-classification reward model (it needs `rlft-policies`, so it lives
//! here). A program that adds its own rewards registers them on [`default_registry`]'s
//! result and hands it to [`crate::cli::main_with_registry`] (see examples/custom_reward.rs).

use candle_core::{DType, Tensor};
use rlft_policies::device::{parse_device, parse_dtype};
use rlft_policies::weights::WeightFiles;
use rlft_policies::{BatchInput, ForwardCtx, Pretrained};
use rlft_reward::{Options, Registry, Reward, RewardError, Sample};
use std::path::PathBuf;

pub fn default_registry() -> Registry {
    let mut r = Registry::default();
    r.register("model", |o| Ok(Box::new(RewardModel::new(o)?)));
    r
}

/// `model`: a `…ForSequenceClassification` folder (Llama/Qwen2/Mistral style `score` head,
/// no bias); the score is the head's output at the last non-padding token of
/// prompt + completion, tokenized by the reward model's own tokenizer.
///
/// Options: `path` (required), `label` (output index, default 0), `dtype` ("f32"),
/// `device` ("cpu"), `batch_size` (16).
pub struct RewardModel {
    pre: Pretrained,
    /// `[num_labels, hidden]`.
    score: Tensor,
    label: usize,
    batch_size: usize,
}

fn bad(option: &str, msg: impl std::fmt::Display) -> RewardError {
    RewardError::BadOption {
        name: "model".into(),
        option: option.into(),
        msg: msg.to_string(),
    }
}

impl RewardModel {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["path", "label", "dtype", "device", "batch_size"])?;
        let path = PathBuf::from(o.required_str("path")?);
        let dtype = parse_dtype(&o.str_or("dtype", "f32")?).map_err(|e| bad("dtype", e))?;
        let device = parse_device(&o.str_or("device", "cpu")?).map_err(|e| bad("device", e))?;
        let pre = Pretrained::load(&path, dtype, &device).map_err(|e| bad("path", e))?;
        let w = WeightFiles::open(&path, dtype, &device).map_err(|e| bad("path", e))?;
        let hidden = pre.model.info().hidden_size;
        let name = ["score.weight", "classifier.weight"]
            .into_iter()
            .find(|k| w.contains(k))
            .ok_or_else(|| {
                bad(
                    "path",
                    format!(
                        "{}: no `score.weight`: not a sequence-classification model",
                        path.display()
                    ),
                )
            })?;
        let rows = w.get_any_shape(name).map_err(|e| bad("path", e))?;
        if rows.dims().len() != 2 || rows.dims()[1] != hidden {
            return Err(bad(
                "path",
                format!(
                    "`{name}` has shape {:?}, expected [num_labels, {hidden}]",
                    rows.dims()
                ),
            ));
        }
        let label = o.f64_or("label", 0.0)? as usize;
        if label >= rows.dim(0).map_err(|e| bad("path", e))? {
            return Err(bad(
                "label",
                format!("the model has {} labels", rows.dims()[0]),
            ));
        }
        let batch_size = (o.f64_or("batch_size", 16.0)? as usize).max(1);
        Ok(Self {
            pre,
            score: rows.to_dtype(DType::F32).map_err(|e| bad("path", e))?,
            label,
            batch_size,
        })
    }

    /// Scores of `texts` (each encoded with special tokens).
    pub fn score_texts(&self, texts: &[String]) -> Result<Vec<f64>, RewardError> {
        let fail = |e: &dyn std::fmt::Display| RewardError::failed("model", e);
        let tok = &self.pre.tokenizer;
        let model = self.pre.model.as_ref();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch_size) {
            let rows = chunk
                .iter()
                .map(|t| tok.encode(t, true))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(&e))?;
            let input = BatchInput::left_padded(&rows, tok.pad_or_eos(), &model.info().device)
                .map_err(|e| fail(&e))?;
            let h = model
                .forward_hidden(&input, &ForwardCtx::inference(None), None)
                .map_err(|e| fail(&e))?;
            // Left padding: the last position is each row's last real token.
            let t = input.seq_len();
            let last = h
                .narrow(1, t - 1, 1)
                .and_then(|x| x.squeeze(1))
                .and_then(|x| x.to_dtype(DType::F32))
                .map_err(|e| fail(&e))?;
            let logits = last
                .matmul(&self.score.t().map_err(|e| fail(&e))?)
                .map_err(|e| fail(&e))?;
            let v: Vec<Vec<f32>> = logits.to_vec2().map_err(|e| fail(&e))?;
            out.extend(v.into_iter().map(|r| r[self.label] as f64));
        }
        Ok(out)
    }
}

impl Reward for RewardModel {
    fn name(&self) -> &str {
        "model"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        let texts: Vec<String> = samples
            .iter()
            .map(|s| format!("{}{}", s.prompt, s.completion))
            .collect();
        self.score_texts(&texts)
    }
}
