//! SFT examples in the three shapes TRL users have, tokenized with a per-token loss mask.
//!
//! - `{"prompt", "completion"}` (strings, or lists of chat messages): loss on the completion
//!   (and the EOS appended to it) when `completion_only_loss`;
//! - `{"messages": [{"role", "content"}, …]}`: rendered with the model's chat template; loss
//!   on the assistant turns when `completion_only_loss`;
//! - `{"text"}`: plain causal LM, loss on every token; EOS appended.

use super::{kind, Row};
use anyhow::{anyhow, bail, Result};
use rlft_policies::Tokenizer;
use serde_json::Value;

/// The columns the three shapes use; a parquet file's others are not read.
pub const COLUMNS: &[&str] = &["prompt", "completion", "messages", "text"];

/// A tokenized example: `trained[t]` says whether `ids[t]` is a loss target.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Tokenized {
    pub fn n_trained(&self) -> usize {
        // Position 0 is never predicted.
        self.trained.iter().skip(1).filter(|&&b| b).count()
    }
}

/// Tokenizes one row; returns the example and whether it was truncated to `max_len`.
pub fn tokenize(
    row: &Row,
    tok: &Tokenizer,
    completion_only: bool,
    max_len: usize,
) -> Result<(Tokenized, bool)> {
    let f = &row.fields;
    let (text, spans, add_special) = if f.contains_key("messages") {
        let msgs = messages(row, "messages")?;
        chat_spans(row, tok, &msgs, 0)?
    } else if f.contains_key("prompt") || f.contains_key("completion") {
        match (f.get("prompt"), f.get("completion")) {
            (Some(Value::String(p)), Some(Value::String(c))) => {
                // Prompt + completion tokenized together, as TRL does; EOS appended below.
                (format!("{p}{c}"), vec![(p.len(), p.len() + c.len())], true)
            }
            (Some(Value::Array(_)), Some(Value::Array(_))) => {
                let mut all = messages(row, "prompt")?;
                let n_prompt = all.len();
                all.extend(messages(row, "completion")?);
                chat_spans(row, tok, &all, n_prompt)?
            }
            (None, _) => return Err(row.error("prompt", "missing (the row has `completion`)")),
            (_, None) => return Err(row.error("completion", "missing (the row has `prompt`)")),
            (Some(p), Some(c)) => {
                return Err(row.error(
                    "prompt",
                    format!(
                        "prompt and completion must both be strings or both lists of messages, got {} and {}",
                        kind(p),
                        kind(c)
                    ),
                ))
            }
        }
    } else if f.contains_key("text") {
        let t = row.str_field("text")?;
        // Plain causal LM: every token is a target, whatever completion_only_loss says.
        return finish(row, tok, t, None, true, max_len);
    } else {
        let keys: Vec<&str> = f.keys().map(String::as_str).collect();
        bail!(
            "{}: expected `prompt`+`completion`, `messages` or `text`; the row has {:?}",
            row.at(),
            keys
        );
    };
    finish(
        row,
        tok,
        &text,
        Some(&spans).filter(|_| completion_only),
        add_special,
        max_len,
    )
}

/// Tokenizes `text`; a token trains when `spans` is `None` or its start lies in a span.
fn finish(
    row: &Row,
    tok: &Tokenizer,
    text: &str,
    spans: Option<&Vec<(usize, usize)>>,
    add_special: bool,
    max_len: usize,
) -> Result<(Tokenized, bool)> {
    let (mut ids, offsets) = tok
        .encode_with_offsets(text, add_special)
        .map_err(|e| anyhow!("{}: {e}", row.at()))?;
    let mut trained: Vec<bool> = offsets
        .iter()
        .map(|&(s, e)| match spans {
            None => true,
            Some(spans) => e > s && spans.iter().any(|&(a, b)| s >= a && s < b),
        })
        .collect();
    // Chat templates write their own end-of-turn tokens; the other shapes get EOS.
    let is_chat = !add_special;
    if !is_chat {
        if let Some(eos) = tok.eos_id {
            if ids.last() != Some(&eos) {
                ids.push(eos);
                trained.push(true);
            }
        }
    }
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    trained.truncate(max_len);
    if ids.is_empty() {
        bail!("{}: the example tokenizes to nothing", row.at(),);
    }
    Ok((Tokenized { ids, trained }, truncated))
}

/// Validates `field` as a list of `{role, content}` messages.
pub(crate) fn messages(row: &Row, field: &str) -> Result<Vec<Value>> {
    let Some(Value::Array(list)) = row.fields.get(field) else {
        return Err(row.error(field, "expected a list of {role, content} messages"));
    };
    if list.is_empty() {
        return Err(row.error(field, "empty list of messages"));
    }
    for (i, m) in list.iter().enumerate() {
        for key in ["role", "content"] {
            match m.get(key) {
                Some(Value::String(_)) => {}
                Some(v) => {
                    return Err(row.error(
                        &format!("{field}[{i}].{key}"),
                        format!("expected a string, got {}", kind(v)),
                    ))
                }
                None => return Err(row.error(&format!("{field}[{i}].{key}"), "missing")),
            }
        }
    }
    Ok(list.clone())
}

/// Renders a conversation and finds the byte span of each assistant turn from message
/// `train_from` on: the text that rendering turn i adds after the prompt for it
/// (`add_generation_prompt`).
fn chat_spans(
    row: &Row,
    tok: &Tokenizer,
    msgs: &[Value],
    train_from: usize,
) -> Result<(String, Vec<(usize, usize)>, bool)> {
    let render = |m: &[Value], gen: bool| -> Result<String> {
        tok.apply_chat_template(&Value::Array(m.to_vec()), gen)
            .map_err(|e| anyhow!("{}: {e}", row.at()))
    };
    let full = render(msgs, false)?;
    let mut spans = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if i < train_from || m["role"] != "assistant" {
            continue;
        }
        let before = render(&msgs[..i], true)?;
        let upto = render(&msgs[..=i], false)?;
        if !upto.starts_with(&before) || !full.starts_with(&upto) {
            bail!(
                "{}: the chat template renders message {i} in a way that changes earlier text; cannot find the assistant turn to train on",
                row.at(),
            );
        }
        spans.push((before.len(), upto.len()));
    }
    if spans.is_empty() {
        return Err(row.error("messages", "no assistant message to train on"));
    }
    Ok((full, spans, false))
}
