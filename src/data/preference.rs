//! Preference pairs in TRL's shapes, tokenized for reward-model training and DPO.
//!
//! - `{"prompt", "chosen", "rejected"}`: an explicit prompt;
//! - `{"chosen", "rejected"}`: an implicit prompt, the longest shared prefix — of the token
//!   ids for text, of the messages for conversations.
//!
//! Each field is a string or a list of chat messages (all of a row's fields the same kind).
//! Text: the prompt is tokenized with the tokenizer's special tokens, each completion on its
//! own and followed by EOS, and the ids concatenated (TRL's DPO tokenization: both sequences
//! share the prompt's ids exactly). Conversations: the prompt is rendered with the chat
//! template and its generation prompt; a completion is what rendering the whole
//! conversation adds after it (the template writes its own end-of-turn tokens). An optional
//! numeric `margin` goes with the pair (0 without it).
//!
//! A pair longer than `max_len` keeps its prompt and loses the ends of its completions; a
//! pair whose prompt leaves no room for a completion token, or whose truncated completions
//! are the same, is skipped and counted, with a warning naming the file and line.

use super::{kind, Row};
use anyhow::{anyhow, Result};
use rlft_policies::Tokenizer;
use serde_json::Value;

/// The columns a pair uses; a parquet file's others are not read.
pub const COLUMNS: &[&str] = &["prompt", "chosen", "rejected", "margin"];

/// One tokenized pair: `prompt ++ chosen` and `prompt ++ rejected` are the two sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub margin: f32,
}

impl Pair {
    /// The chosen sequence, prompt included.
    pub fn chosen_ids(&self) -> Vec<u32> {
        [&self.prompt[..], &self.chosen[..]].concat()
    }

    /// The rejected sequence, prompt included.
    pub fn rejected_ids(&self) -> Vec<u32> {
        [&self.prompt[..], &self.rejected[..]].concat()
    }
}

/// What tokenizing one row gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Tokenized {
    /// The pair, and whether a completion was cut to fit.
    Pair(Pair, bool),
    /// Left out, and why (the caller counts and warns).
    Skipped(String),
}

/// Counts of a whole file's pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub pairs: usize,
    pub truncated: usize,
    pub skipped: usize,
}

/// Tokenizes every row of a preference file: the pairs, and what was cut or left out (each
/// skipped row is also a warning naming its line). An error names the file, line and field.
pub fn tokenize_all(rows: &[Row], tok: &Tokenizer, max_len: usize) -> Result<(Vec<Pair>, Report)> {
    let mut pairs = Vec::new();
    let mut report = Report::default();
    for row in rows {
        match tokenize(row, tok, max_len)? {
            Tokenized::Pair(p, cut) => {
                report.truncated += cut as usize;
                pairs.push(p);
            }
            Tokenized::Skipped(why) => {
                tracing::warn!("{}: pair skipped: {why}", row.at());
                report.skipped += 1;
            }
        }
    }
    report.pairs = pairs.len();
    if pairs.is_empty() {
        if let Some(r) = rows.first() {
            anyhow::bail!(
                "{}: no preference pair fits (all {} rows skipped)",
                r.file.display(),
                rows.len()
            );
        }
    }
    Ok((pairs, report))
}

/// Tokenizes one preference row (see the module docs).
pub fn tokenize(row: &Row, tok: &Tokenizer, max_len: usize) -> Result<Tokenized> {
    let f = &row.fields;
    for field in ["chosen", "rejected"] {
        if !f.contains_key(field) {
            return Err(row.error(field, "missing"));
        }
    }
    let margin = match f.get("margin") {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => {
            n.as_f64()
                .filter(|m| m.is_finite())
                .ok_or_else(|| row.error("margin", "not a finite number"))? as f32
        }
        Some(v) => return Err(row.error("margin", format!("expected a number, got {}", kind(v)))),
    };
    let chat = matches!(f.get("chosen"), Some(Value::Array(_)));
    for field in ["prompt", "chosen", "rejected"] {
        match (f.get(field), chat) {
            (None, _) | (Some(Value::String(_)), false) | (Some(Value::Array(_)), true) => {}
            (Some(v), _) => {
                return Err(row.error(
                    field,
                    format!(
                        "expected {} like `chosen`, got {}",
                        if chat {
                            "a list of messages"
                        } else {
                            "a string"
                        },
                        kind(v)
                    ),
                ))
            }
        }
    }
    if f["chosen"] == f["rejected"] {
        return Err(row.error("rejected", "the same as `chosen`: the pair prefers nothing"));
    }
    let (prompt, chosen, rejected) = if chat {
        chat_pair(row, tok)?
    } else {
        text_pair(row, tok)?
    };
    // The first completion token is scored given the prompt: it needs one.
    if prompt.is_empty() {
        return Err(row.error(
            "prompt",
            "tokenizes to no tokens (and the tokenizer adds no BOS): the first completion token needs a context",
        ));
    }
    Ok(fit(prompt, chosen, rejected, margin, max_len))
}

/// Text fields: explicit prompt tokenized apart, or the shared token prefix.
fn text_pair(row: &Row, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let enc = |s: &str, special: bool| {
        tok.encode(s, special)
            .map_err(|e| anyhow!("{}: {e}", row.at()))
    };
    let (c, r) = (row.str_field("chosen")?, row.str_field("rejected")?);
    if row.fields.contains_key("prompt") {
        let p = enc(row.str_field("prompt")?, true)?;
        return Ok((
            p,
            text_completion(row, tok, c)?,
            text_completion(row, tok, r)?,
        ));
    }
    // Implicit prompt: the longest shared prefix of the two tokenizations.
    let (c, r) = (enc(c, true)?, enc(r, true)?);
    let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
    // The prompt leaves each side at least one token of its own.
    let n = n.min(c.len().min(r.len()).saturating_sub(1));
    let special = tok.encode("", true).map(|v| v.len()).unwrap_or(0);
    if n <= special {
        return Err(row.error(
            "chosen",
            "`chosen` and `rejected` share no prefix, so there is no implicit prompt; give a `prompt` field",
        ));
    }
    Ok((
        c[..n].to_vec(),
        with_eos(tok, c[n..].to_vec()),
        with_eos(tok, r[n..].to_vec()),
    ))
}

/// `ids` ended by the tokenizer's EOS (added unless already there).
fn with_eos(tok: &Tokenizer, mut ids: Vec<u32>) -> Vec<u32> {
    if let Some(e) = tok.eos_id {
        if ids.last() != Some(&e) {
            ids.push(e);
        }
    }
    ids
}

/// A text completion's ids: tokenized on its own, without special tokens, ended by EOS.
pub(crate) fn text_completion(row: &Row, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let ids = tok
        .encode(text, false)
        .map_err(|e| anyhow!("{}: {e}", row.at()))?;
    Ok(with_eos(tok, ids))
}

/// Conversations: the prompt messages (given, or the shared leading messages) rendered with
/// the generation prompt; each completion the text its messages add after them.
fn chat_pair(row: &Row, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let msgs = |field: &str| super::sft::messages(row, field);
    let (prompt, chosen, rejected) = if row.fields.contains_key("prompt") {
        (msgs("prompt")?, msgs("chosen")?, msgs("rejected")?)
    } else {
        let (c, r) = (msgs("chosen")?, msgs("rejected")?);
        let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
        if n == 0 {
            return Err(row.error(
                "chosen",
                "`chosen` and `rejected` share no leading message, so there is no implicit prompt; give a `prompt` field",
            ));
        }
        if n == c.len() || n == r.len() {
            return Err(row.error(
                "rejected",
                "one side is a prefix of the other: it has no completion of its own",
            ));
        }
        (c[..n].to_vec(), c[n..].to_vec(), r[n..].to_vec())
    };
    let chat = ChatPrompt::new(row, tok, prompt)?;
    Ok((
        chat.ids()?,
        chat.completion("chosen", &chosen)?,
        chat.completion("rejected", &rejected)?,
    ))
}

/// A conversation's prompt messages rendered with the chat template and its generation
/// prompt; a completion is the text rendering the messages after them adds.
pub(crate) struct ChatPrompt<'a> {
    row: &'a Row,
    tok: &'a Tokenizer,
    messages: Vec<Value>,
    head: String,
}

impl<'a> ChatPrompt<'a> {
    pub fn new(row: &'a Row, tok: &'a Tokenizer, messages: Vec<Value>) -> Result<Self> {
        let head = tok
            .apply_chat_template(&Value::Array(messages.clone()), true)
            .map_err(|e| anyhow!("{}: {e}", row.at()))?;
        Ok(Self {
            row,
            tok,
            messages,
            head,
        })
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tok
            .encode(text, false)
            .map_err(|e| anyhow!("{}: {e}", self.row.at()))
    }

    /// The prompt's ids (the template writes its own special tokens).
    pub fn ids(&self) -> Result<Vec<u32>> {
        self.encode(&self.head)
    }

    /// The ids the completion `messages` (from `field`) add after the prompt.
    pub fn completion(&self, field: &str, messages: &[Value]) -> Result<Vec<u32>> {
        let all = Value::Array([&self.messages[..], messages].concat());
        let full = self
            .tok
            .apply_chat_template(&all, false)
            .map_err(|e| anyhow!("{}: {e}", self.row.at()))?;
        match full.strip_prefix(&self.head) {
            Some(tail) if !tail.is_empty() => self.encode(tail),
            _ => Err(self.row.error(
                field,
                "the chat template does not render it after the prompt's generation prompt",
            )),
        }
    }
}

/// Cuts the completions to fit `max_len` with the whole prompt.
fn fit(
    prompt: Vec<u32>,
    mut chosen: Vec<u32>,
    mut rejected: Vec<u32>,
    margin: f32,
    max_len: usize,
) -> Tokenized {
    if prompt.len() >= max_len {
        return Tokenized::Skipped(format!(
            "its prompt has {} tokens, leaving no room for a completion within max_seq_len {max_len}",
            prompt.len()
        ));
    }
    let room = max_len - prompt.len();
    let cut = chosen.len() > room || rejected.len() > room;
    chosen.truncate(room);
    rejected.truncate(room);
    if chosen == rejected {
        return Tokenized::Skipped(format!(
            "cut to max_seq_len {max_len}, its two completions are the same"
        ));
    }
    Tokenized::Pair(
        Pair {
            prompt,
            chosen,
            rejected,
            margin,
        },
        cut,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn tok() -> Tokenizer {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        Tokenizer::load(&dir).unwrap()
    }

    fn row(v: Value) -> Row {
        Row {
            file: PathBuf::from("prefs.jsonl"),
            place: crate::data::Place::Line(7),
            fields: v.as_object().unwrap().clone(),
        }
    }

    fn pair(t: Tokenized) -> Pair {
        match t {
            Tokenized::Pair(p, _) => p,
            Tokenized::Skipped(why) => panic!("skipped: {why}"),
        }
    }

    fn err(v: Value) -> String {
        tokenize(&row(v), &tok(), 64).unwrap_err().to_string()
    }

    /// An explicit text prompt: the prompt's ids (with BOS) shared exactly, each completion
    /// tokenized on its own and ended by EOS, the margin carried.
    #[test]
    fn explicit_text_prompt() {
        let t = tok();
        let p = pair(
            tokenize(
                &row(json!({"prompt": "12+35=", "chosen": "47", "rejected": "37", "margin": 1.5})),
                &t,
                64,
            )
            .unwrap(),
        );
        let eos = t.eos_id.unwrap();
        assert_eq!(p.prompt, t.encode("12+35=", true).unwrap());
        assert_eq!(
            p.chosen,
            [t.encode("47", false).unwrap(), vec![eos]].concat()
        );
        assert_eq!(
            p.rejected,
            [t.encode("37", false).unwrap(), vec![eos]].concat()
        );
        assert_eq!(p.margin, 1.5);
        assert_eq!(
            p.chosen_ids(),
            [p.prompt.clone(), p.chosen.clone()].concat()
        );
    }

    /// An implicit text prompt is the longest shared token prefix; each side keeps at least
    /// one token of its own, even when one text is a prefix of the other.
    #[test]
    fn implicit_text_prompt_is_the_shared_token_prefix() {
        let t = tok();
        let (c, r) = ("12+35=47", "12+35=37");
        let p = pair(tokenize(&row(json!({"chosen": c, "rejected": r})), &t, 64).unwrap());
        let (ci, ri) = (t.encode(c, true).unwrap(), t.encode(r, true).unwrap());
        let shared = ci.iter().zip(&ri).take_while(|(a, b)| a == b).count();
        assert_eq!(p.prompt, ci[..shared].to_vec());
        assert_eq!(p.chosen[..p.chosen.len() - 1], ci[shared..]);
        assert_eq!(p.rejected[..p.rejected.len() - 1], ri[shared..]);
        assert_eq!(p.margin, 0.0);
        let q = pair(
            tokenize(
                &row(json!({"chosen": "12+35=4", "rejected": "12+35=47"})),
                &t,
                64,
            )
            .unwrap(),
        );
        assert!(!q.chosen.is_empty() && q.chosen != q.rejected);
    }

    /// Conversations: the prompt rendered with the generation prompt; a completion is what
    /// the whole conversation adds after it. Implicit: the shared leading messages.
    #[test]
    fn chat_pairs_explicit_and_implicit() {
        let t = tok();
        let user = json!([{"role": "user", "content": "12+35="}]);
        let good = json!([{"role": "assistant", "content": "47"}]);
        let bad = json!([{"role": "assistant", "content": "37"}]);
        let p = pair(
            tokenize(
                &row(json!({"prompt": user, "chosen": good, "rejected": bad})),
                &t,
                64,
            )
            .unwrap(),
        );
        let head = t.apply_chat_template(&user, true).unwrap();
        assert_eq!(p.prompt, t.encode(&head, false).unwrap());
        let full = t
            .apply_chat_template(&json!([user[0].clone(), good[0].clone()]), false)
            .unwrap();
        assert_eq!(p.chosen, t.encode(&full[head.len()..], false).unwrap());
        let c = json!([user[0].clone(), good[0].clone()]);
        let r = json!([user[0].clone(), bad[0].clone()]);
        let q = pair(tokenize(&row(json!({"chosen": c, "rejected": r})), &t, 64).unwrap());
        assert_eq!(q, p);
    }

    /// Too long: the completions lose their ends; no room for a completion, or the same
    /// completions once cut, and the pair is skipped (counted by `tokenize_all`).
    #[test]
    fn long_pairs_are_cut_or_skipped_and_counted() {
        let t = tok();
        let r =
            row(json!({"prompt": "12+35=", "chosen": "47 is the sum", "rejected": "47 is wrong"}));
        let n_prompt = t.encode("12+35=", true).unwrap().len();
        match tokenize(&r, &t, n_prompt + 2).unwrap() {
            Tokenized::Skipped(why) => assert!(why.contains("the same"), "{why}"),
            other => panic!("{other:?}"),
        }
        match tokenize(&r, &t, n_prompt).unwrap() {
            Tokenized::Skipped(why) => assert!(why.contains("no room"), "{why}"),
            other => panic!("{other:?}"),
        }
        let (pairs, report) = tokenize_all(
            &[
                r.clone(),
                row(json!({"prompt": "1+1=", "chosen": "2", "rejected": "3"})),
            ],
            &t,
            n_prompt + 2,
        )
        .unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(
            report,
            Report {
                pairs: 1,
                truncated: 0,
                skipped: 1
            }
        );
        let (_, report) = tokenize_all(&[r], &t, 64).unwrap();
        assert_eq!(report.truncated, 0);
        assert!(tokenize_all(
            &[row(
                json!({"prompt": "12+35=", "chosen": "4", "rejected": "5"})
            )],
            &t,
            1
        )
        .is_err());
    }

    /// Bad rows: each error names the file, the line and the field.
    #[test]
    fn bad_rows_name_file_line_and_field() {
        let cases = [
            (json!({"prompt": "a", "chosen": "b"}), "`rejected`: missing"),
            (
                json!({"prompt": "a", "chosen": "b", "rejected": "b"}),
                "`rejected`: the same as `chosen`",
            ),
            (
                json!({"chosen": "xyz", "rejected": "abc"}),
                "no implicit prompt",
            ),
            (
                json!({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "1"}),
                "`margin`: expected a number",
            ),
            (
                json!({"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "c"}]}),
                "`rejected`: expected a string",
            ),
            (
                json!({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "a"}]}),
                "share no leading message",
            ),
            (
                json!({"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}),
                "`chosen[0].content`: missing",
            ),
        ];
        for (v, want) in cases {
            let e = err(v.clone());
            assert!(e.starts_with("prefs.jsonl:7: "), "{v}: {e}");
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
