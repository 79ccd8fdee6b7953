//! RL prompts: `{"prompt": "…"}` (or a list of messages) or `{"messages": […]}`, rendered
//! with the chat template and its generation prompt; every other field goes to the rewards.

use super::{kind, read_rows, Columns, DataFiles, Row};
use anyhow::{anyhow, Result};
use rlft_policies::Tokenizer;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Prompt {
    /// The text the model sees (the rendered template for chat prompts).
    pub text: String,
    pub ids: Vec<u32>,
    /// The row's other fields (e.g. `answer`).
    pub fields: BTreeMap<String, Value>,
}

/// Reads the prompts of every file `files` names; every column is read, since the rewards may
/// use any of them.
pub fn load_prompts(files: &DataFiles, tok: &Tokenizer, max_len: usize) -> Result<Vec<Prompt>> {
    read_rows(files, Columns::All)?
        .iter()
        .map(|row| prompt_from_row(row, tok, max_len))
        .collect()
}

/// One prompt row: `prompt` (a string or messages) or `messages`, at most `max_len` tokens.
pub fn prompt_from_row(row: &Row, tok: &Tokenizer, max_len: usize) -> Result<Prompt> {
    let at = |e: rlft_policies::PolicyError| anyhow!("{}: {e}", row.at());
    let (key, chat) = match (row.fields.get("prompt"), row.fields.get("messages")) {
        (Some(Value::String(_)), _) => ("prompt", false),
        (Some(Value::Array(_)), _) => ("prompt", true),
        (None, Some(Value::Array(_))) => ("messages", true),
        (Some(v), _) => {
            return Err(row.error(
                "prompt",
                format!("expected a string or a list of messages, got {}", kind(v)),
            ))
        }
        (None, Some(v)) => {
            return Err(row.error(
                "messages",
                format!("expected a list of messages, got {}", kind(v)),
            ))
        }
        (None, None) => {
            let keys: Vec<&String> = row.fields.keys().collect();
            return Err(anyhow!(
                "{}: expected a `prompt` or `messages` field; the row has {keys:?}",
                row.at(),
            ));
        }
    };
    let (text, ids) = if chat {
        let text = tok
            .apply_chat_template(&row.fields[key], true)
            .map_err(at)?;
        let ids = tok.encode(&text, false).map_err(at)?;
        (text, ids)
    } else {
        let text = row.str_field(key)?.to_string();
        let ids = tok.encode(&text, true).map_err(at)?;
        (text, ids)
    };
    if ids.is_empty() {
        return Err(row.error(key, "encodes to no tokens"));
    }
    if ids.len() > max_len {
        return Err(row.error(
            key,
            format!(
                "{} tokens, longer than model.max_seq_len − generation.max_new_tokens = {max_len}",
                ids.len()
            ),
        ));
    }
    let fields = row
        .fields
        .iter()
        .filter(|(k, _)| k.as_str() != key)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Prompt { text, ids, fields })
}
