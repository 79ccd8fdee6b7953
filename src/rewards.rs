//! The reward registry rlft's CLI uses: the built-ins of `rlft-reward` plus `model`, a
//! Hugging Face sequence-classification reward model (it needs `rlft-policies`, so it lives
//! here). A program that adds its own rewards registers them on [`default_registry`]'s
//! result and hands it to [`crate::cli::main_with_registry`] (see examples/custom_reward.rs).

use candle_core::{DType, Tensor};
use rlft_policies::device::{parse_device, parse_dtype};
use rlft_policies::lora::ADAPTER_CONFIG;
use rlft_policies::weights::WeightFiles;
use rlft_policies::{Adapter, BatchInput, CausalLm, ForwardCtx, Pretrained};
use rlft_reward::{Options, Registry, Reward, RewardError, Sample};
use std::path::PathBuf;

pub fn default_registry() -> Registry {
    let mut r = Registry::default();
    r.register("model", |o| Ok(Box::new(RewardModel::new(o)?)));
    r
}

/// `model`: a reward model — a `…ForSequenceClassification` folder (Llama/Qwen2/Mistral
/// style `score` head, no bias), or a PEFT `SEQ_CLS` adapter with its `score` head (what
/// `rlft rm` writes) on its base model. The score is the head's output at the last token of
/// prompt + completion that is not the pad id ([`last_token_scores`]).
///
/// Options: `path` (required), `base` (the base model folder of an adapter; default: the
/// adapter's `base_model_name_or_path`, from the working directory or else beside the
/// adapter), `input` (`"text"`: prompt + completion text encoded by the reward model's own
/// tokenizer, then its EOS when a stop token ended the completion; `"ids"`: the policy's
/// token ids as generated, the stop token included — for a reward model on the policy's
/// tokenizer),
/// `label` (output index, default 0), `dtype` ("f32"), `device` ("cpu"), `batch_size` (16).
pub struct RewardModel {
    pre: Pretrained,
    /// The adapter of an adapter-form reward model.
    adapter: Option<Adapter>,
    /// `[num_labels, hidden]`, f32.
    score: Tensor,
    /// The id whose tokens the score skips at the end of a row ([`score_pad_id`]).
    pad: u32,
    label: usize,
    batch_size: usize,
    input: Input,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Text,
    Ids,
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
        o.allow_only(&[
            "path",
            "base",
            "input",
            "label",
            "dtype",
            "device",
            "batch_size",
            "quantization",
            "bnb_4bit_use_double_quant",
            "revision",
        ])?;
        // A folder, or a Hub id in the local Hugging Face cache.
        let revision = o.str_or("revision", "main")?;
        let path = rlft_policies::hub::resolve(&PathBuf::from(o.required_str("path")?), &revision)
            .map_err(|e| bad("path", e))?;
        let dtype = parse_dtype(&o.str_or("dtype", "f32")?).map_err(|e| bad("dtype", e))?;
        let device = parse_device(&o.str_or("device", "cpu")?).map_err(|e| bad("device", e))?;
        let quant = crate::config::common::quant_config(
            &o.str_or("quantization", "none")?,
            o.bool_or("bnb_4bit_use_double_quant", false)?,
        )
        .map_err(|e| bad("quantization", e))?;
        let input = match o.str_or("input", "text")?.as_str() {
            "text" => Input::Text,
            "ids" => Input::Ids,
            other => {
                return Err(bad(
                    "input",
                    format!("`{other}`: expected \"text\" or \"ids\""),
                ))
            }
        };
        let (pre, adapter, score) = if path.join(ADAPTER_CONFIG).is_file() {
            let (pre, adapter) = load_adapter_form(o, &path, dtype, quant, &device)?;
            let score = ["score", "classifier"]
                .into_iter()
                .find_map(|h| adapter.head(h))
                .ok_or_else(|| {
                    bad(
                        "path",
                        format!(
                            "{}: a causal-LM adapter, not a reward model (no `score` head in modules_to_save; train one with `rlft rm`)",
                            path.display()
                        ),
                    )
                })?
                .as_tensor()
                .clone();
            (pre, Some(adapter), score)
        } else {
            let pre = Pretrained::load_quantized(&path, dtype, quant, &device)
                .map_err(|e| bad("path", e))?;
            let w = WeightFiles::open(&path, dtype, &device).map_err(|e| bad("path", e))?;
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
            let score = w.get_any_shape(name).map_err(|e| bad("path", e))?;
            (pre, None, score)
        };
        let pad = score_pad_id(&pre);
        let hidden = pre.model.info().hidden_size;
        if score.dims().len() != 2 || score.dims()[1] != hidden {
            return Err(bad(
                "path",
                format!(
                    "the score head has shape {:?}, expected [num_labels, {hidden}]",
                    score.dims()
                ),
            ));
        }
        let label = o.f64_or("label", 0.0)? as usize;
        if label >= score.dims()[0] {
            return Err(bad(
                "label",
                format!("the model has {} labels", score.dims()[0]),
            ));
        }
        let batch_size = (o.f64_or("batch_size", 16.0)? as usize).max(1);
        Ok(Self {
            pre,
            adapter,
            score: score.to_dtype(DType::F32).map_err(|e| bad("path", e))?,
            pad,
            label,
            batch_size,
            input,
        })
    }

    /// Scores of `texts` (each encoded with special tokens).
    pub fn score_texts(&self, texts: &[String]) -> Result<Vec<f64>, RewardError> {
        let rows = texts
            .iter()
            .map(|t| self.pre.tokenizer.encode(t, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RewardError::failed("model", e))?;
        self.score_ids(&rows)
    }

    /// Scores of token sequences.
    pub fn score_ids(&self, rows: &[Vec<u32>]) -> Result<Vec<f64>, RewardError> {
        let fail = |e: &dyn std::fmt::Display| RewardError::failed("model", e);
        let model = self.pre.model.as_ref();
        let vocab = model.info().vocab_size;
        if let Some(id) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(bad(
                "input",
                format!("token id {id} is outside the reward model's vocabulary of {vocab}: with a tokenizer of its own, use input = \"text\""),
            ));
        }
        let ctx = ForwardCtx::inference(self.adapter.as_ref());
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(self.batch_size) {
            let input = BatchInput::left_padded(chunk, self.pad, &model.info().device)
                .map_err(|e| fail(&e))?;
            let scores = last_token_scores(model, &input, &ctx, &self.score, self.pad)
                .map_err(|e| fail(&e))?;
            let v: Vec<Vec<f32>> = scores.to_vec2().map_err(|e| fail(&e))?;
            out.extend(v.into_iter().map(|r| r[self.label] as f64));
        }
        Ok(out)
    }
}

/// The base model named by `base` (or the adapter's `base_model_name_or_path`) and the
/// adapter on it.
fn load_adapter_form(
    o: &Options,
    path: &std::path::Path,
    dtype: DType,
    quant: rlft_policies::quant::QuantConfig,
    device: &candle_core::Device,
) -> Result<(Pretrained, Adapter), RewardError> {
    let base = match o.get("base") {
        Some(_) => PathBuf::from(o.required_str("base")?),
        None => {
            let cfg = Adapter::read_config(path).map_err(|e| bad("path", e))?;
            match cfg.base_model_name_or_path.as_deref() {
                // As given (from the working directory), else beside the adapter.
                Some(b) if !b.is_empty() => {
                    let b = PathBuf::from(b);
                    if b.is_dir() || b.is_absolute() {
                        b
                    } else {
                        path.join(b)
                    }
                }
                _ => {
                    return Err(bad(
                        "base",
                        format!(
                            "{}: an adapter without base_model_name_or_path; set `base` to its base model folder",
                            path.display()
                        ),
                    ))
                }
            }
        }
    };
    let base = rlft_policies::hub::resolve(&base, "main").map_err(|e| bad("base", e))?;
    let pre =
        Pretrained::load_quantized(&base, dtype, quant, device).map_err(|e| bad("base", e))?;
    let adapter = Adapter::load(path, pre.model.as_ref()).map_err(|e| bad("path", e))?;
    Ok((pre, adapter))
}

/// The pad id a score reader skips: `config.json`'s `pad_token_id`, else the tokenizer's pad
/// (or EOS) — what transformers uses, and what `rlft merge` writes into a classifier folder
/// that has none.
pub fn score_pad_id(pre: &Pretrained) -> u32 {
    pre.model
        .info()
        .pad_token_id
        .unwrap_or_else(|| pre.tokenizer.pad_or_eos())
}

/// `[b, num_labels]` f32: `score · h` at each row's last token that is not `pad_id` — the
/// token transformers' `…ForSequenceClassification` reads a sequence's score at. With a
/// pad distinct from EOS that is the last real token (an appended EOS); where pad = EOS, the
/// token before a final EOS. Tracked when `ctx` records gradients and `score` is a variable.
pub fn last_token_scores(
    model: &dyn CausalLm,
    input: &BatchInput,
    ctx: &ForwardCtx,
    score: &Tensor,
    pad_id: u32,
) -> anyhow::Result<Tensor> {
    let h = model.forward_hidden(input, ctx, None)?;
    scores_from_hidden(input, &h, score, pad_id)
}

/// [`last_token_scores`] from the final hidden states `[b, t, hidden]`.
pub fn scores_from_hidden(
    input: &BatchInput,
    h: &Tensor,
    score: &Tensor,
    pad_id: u32,
) -> anyhow::Result<Tensor> {
    let (b, t, hd) = h.dims3()?;
    let ids: Vec<Vec<u32>> = input.ids.to_vec2()?;
    // Rows are left-padded, so a row of padding only reads its last position.
    let rows: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, r)| (i * t + r.iter().rposition(|&x| x != pad_id).unwrap_or(t - 1)) as u32)
        .collect();
    let rows = Tensor::from_vec(rows, b, h.device())?;
    let read = h
        .reshape((b * t, hd))?
        .index_select(&rows, 0)?
        .to_dtype(DType::F32)?;
    Ok(read.matmul(&score.t()?)?)
}

impl Reward for RewardModel {
    fn name(&self) -> &str {
        "model"
    }
    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        match self.input {
            // The text of prompt + completion in the reward model's tokens, and its EOS when
            // a stop token ended the completion (reward models are trained on completions
            // that end so: `rlft rm` and TRL append EOS).
            Input::Text => {
                let tok = &self.pre.tokenizer;
                let mut rows = Vec::with_capacity(samples.len());
                for s in samples {
                    let mut ids = tok
                        .encode(&format!("{}{}", s.prompt, s.completion), true)
                        .map_err(|e| RewardError::failed("model", e))?;
                    if let (true, Some(eos)) = (s.stopped, tok.eos_id) {
                        if ids.last() != Some(&eos) {
                            ids.push(eos);
                        }
                    }
                    rows.push(ids);
                }
                self.score_ids(&rows)
            }
            Input::Ids => {
                let rows: Vec<Vec<u32>> = samples
                    .iter()
                    .map(|s| [s.prompt_ids.as_slice(), &s.completion_ids].concat())
                    .collect();
                self.score_ids(&rows)
            }
        }
    }
}
