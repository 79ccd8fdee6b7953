//! The tokenizer of a Hugging Face folder: `tokenizer.json`, the special tokens and chat
//! template of `tokenizer_config.json`, and the stop ids of `generation_config.json`.

use crate::chat_template::ChatTemplate;
use crate::error::{read_json, PolicyError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Ids that end generation: `generation_config.eos_token_id` (one or several), else the
    /// tokenizer's EOS.
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<ChatTemplate>,
}

/// A special token in `tokenizer_config.json` is a string or `{"content": …}`.
fn special(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(PolicyError::MissingFile {
                path,
                what: "the tokenizer (tokenizer.json, the fast-tokenizer format)".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| PolicyError::Tokenizer {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            Value::Null
        };
        let (bos_token, eos_token) = (special(&cfg, "bos_token"), special(&cfg, "eos_token"));
        let (pad_token, unk_token) = (special(&cfg, "pad_token"), special(&cfg, "unk_token"));
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let (bos_id, eos_id, pad_id) = (id(&bos_token), id(&eos_token), id(&pad_token));
        let chat_template = ChatTemplate::from_config(&cfg, &cfg_path, dir)?;
        let gen_path = dir.join("generation_config.json");
        let mut stop_ids = if gen_path.is_file() {
            let g: Value = read_json(&gen_path)?;
            ids_of(g.get("eos_token_id"))
        } else {
            Vec::new()
        };
        if stop_ids.is_empty() {
            stop_ids.extend(eos_id);
        }
        Ok(Self {
            inner,
            path,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            bos_id,
            eos_id,
            pad_id,
            stop_ids,
            chat_template,
        })
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor adds BOS etc.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encoding(text, add_special_tokens)?.get_ids().to_vec())
    }

    fn encoding(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, add_special_tokens)
            .map_err(|e| PolicyError::Tokenizer {
                path: self.path.clone(),
                msg: format!("encoding failed: {e}"),
            })
    }

    /// Token ids of `text` and each token's byte span in `text` (special tokens added by
    /// the post-processor get an empty span at 0).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.encoding(text, add_special_tokens)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| PolicyError::Tokenizer {
                path: self.path.clone(),
                msg: format!("decoding failed: {e}"),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Padding id for batches: `pad_token`, else EOS (transformers' usual fallback), else 0.
    pub fn pad_or_eos(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_ref().ok_or_else(|| {
            PolicyError::ChatTemplate(format!(
                "{} has no chat_template; use prompt/completion data or add one",
                self.path.with_file_name("tokenizer_config.json").display()
            ))
        })?;
        tpl.render(messages, add_generation_prompt, self)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
