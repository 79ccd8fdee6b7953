//! Unpaired preference rows for KTO, in TRL's shapes (`KTOTrainer`):
//!
//! - `{"prompt", "completion", "label"}`: one completion judged desirable (`label: true`) or
//!   not; prompt and completion both strings, or both lists of chat messages;
//! - `{"prompt"?, "chosen", "rejected"}`: a preference pair, unpaired as TRL's
//!   `unpair_preference_dataset` does into (prompt, chosen, true) and (prompt, rejected,
//!   false), tokenized as DPO's pairs are ([`super::preference`]).
//!
//! Text: the prompt is tokenized with the tokenizer's special tokens, the completion on its
//! own and ended by EOS. Conversations: the prompt is rendered with the chat template and its
//! generation prompt, the completion is what the template adds after it. A completion longer
//! than the room `max_len` leaves after the prompt is cut; a row whose prompt fills
//! `max_len` is skipped with a warning naming its line.

use super::preference::{self, text_completion, ChatPrompt, Tokenized};
use super::{kind, Row};
use anyhow::{anyhow, Result};
use rlft_policies::Tokenizer;
use serde_json::Value;

/// The columns a KTO row may use; a parquet file's others are not read.
pub const COLUMNS: &[&str] = &["prompt", "completion", "label", "chosen", "rejected"];

/// One tokenized example: `prompt ++ completion` is its sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// TRL's `label`: true for a desirable completion.
    pub desirable: bool,
}

/// Counts of a whole file's examples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub truncated: usize,
    pub skipped: usize,
}

/// Tokenizes every row (see the module docs): the examples, and what was cut or left out
/// (each skipped row is also a warning naming its line). An error names file, line, field.
pub fn tokenize_all(
    rows: &[Row],
    tok: &Tokenizer,
    max_len: usize,
) -> Result<(Vec<Example>, Report)> {
    let mut out = Vec::new();
    let mut report = Report::default();
    for row in rows {
        match tokenize(row, tok, max_len)? {
            Ok((examples, cut)) => {
                report.truncated += cut as usize;
                out.extend(examples);
            }
            Err(why) => {
                tracing::warn!("{}: row skipped: {why}", row.at());
                report.skipped += 1;
            }
        }
    }
    if out.is_empty() {
        if let Some(r) = rows.first() {
            anyhow::bail!(
                "{}: no example fits (all {} rows skipped)",
                r.file.display(),
                rows.len()
            );
        }
    }
    Ok((out, report))
}

/// One row's examples and whether one was cut, or why it was skipped.
pub fn tokenize(
    row: &Row,
    tok: &Tokenizer,
    max_len: usize,
) -> Result<std::result::Result<(Vec<Example>, bool), String>> {
    let f = &row.fields;
    if f.contains_key("chosen") || f.contains_key("rejected") {
        return Ok(match preference::tokenize(row, tok, max_len)? {
            Tokenized::Pair(p, cut) => {
                let example = |completion, desirable| Example {
                    prompt: p.prompt.clone(),
                    completion,
                    desirable,
                };
                let both = vec![example(p.chosen.clone(), true), example(p.rejected, false)];
                Ok((both, cut))
            }
            Tokenized::Skipped(why) => Err(why),
        });
    }
    for field in ["prompt", "completion", "label"] {
        if !f.contains_key(field) {
            return Err(row.error(
                field,
                "missing (a KTO row is {\"prompt\", \"completion\", \"label\"} or a {\"chosen\", \"rejected\"} pair)",
            ));
        }
    }
    let desirable = match &f["label"] {
        Value::Bool(b) => *b,
        v => return Err(row.error("label", format!("expected true or false, got {}", kind(v)))),
    };
    let (prompt, completion) = match (&f["prompt"], &f["completion"]) {
        (Value::String(p), Value::String(c)) => {
            let p = tok
                .encode(p, true)
                .map_err(|e| anyhow!("{}: {e}", row.at()))?;
            (p, text_completion(row, tok, c)?)
        }
        (Value::Array(_), Value::Array(_)) => {
            let chat = ChatPrompt::new(row, tok, super::sft::messages(row, "prompt")?)?;
            let completion =
                chat.completion("completion", &super::sft::messages(row, "completion")?)?;
            (chat.ids()?, completion)
        }
        (p, c) => {
            return Err(row.error(
                "completion",
                format!(
                    "expected two strings or two lists of messages, got {} and {}",
                    kind(p),
                    kind(c)
                ),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(row.error(
            "prompt",
            "tokenizes to no tokens (and the tokenizer adds no BOS): the first completion token needs a context",
        ));
    }
    if prompt.len() >= max_len {
        return Ok(Err(format!(
            "its prompt has {} tokens, leaving no room for a completion within max_seq_len {max_len}",
            prompt.len()
        )));
    }
    let mut completion = completion;
    let cut = completion.len() > max_len - prompt.len();
    completion.truncate(max_len - prompt.len());
    Ok(Ok((
        vec![Example {
            prompt,
            completion,
            desirable,
        }],
        cut,
    )))
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
            file: PathBuf::from("kto.jsonl"),
            place: crate::data::Place::Line(3),
            fields: v.as_object().unwrap().clone(),
        }
    }

    fn examples(v: Value, max_len: usize) -> Vec<Example> {
        tokenize(&row(v), &tok(), max_len).unwrap().unwrap().0
    }

    #[test]
    fn text_rows_pairs_and_bad_labels() {
        let t = tok();
        let e = examples(
            json!({"prompt": "1+2=", "completion": "3", "label": false}),
            64,
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].prompt, t.encode("1+2=", true).unwrap());
        let mut want = t.encode("3", false).unwrap();
        want.push(t.eos_id.unwrap());
        assert_eq!((e[0].completion.clone(), e[0].desirable), (want, false));
        // A pair is two examples, chosen desirable, sharing the prompt.
        let e = examples(
            json!({"prompt": "1+2=", "chosen": "3", "rejected": "4"}),
            64,
        );
        assert_eq!(e.len(), 2);
        assert!(e[0].desirable && !e[1].desirable && e[0].prompt == e[1].prompt);
        // Cut to fit.
        let e = examples(
            json!({"prompt": "1+2=", "completion": "3 4 5 6 7 8 9", "label": true}),
            8,
        );
        assert_eq!(e[0].prompt.len() + e[0].completion.len(), 8);
        // Errors name the line and field.
        let err = tokenize(
            &row(json!({"prompt": "a", "completion": "b", "label": 1})),
            &t,
            64,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kto.jsonl:3") && err.contains("`label`") && err.contains("true or false"),
            "{err}"
        );
        let err = tokenize(&row(json!({"prompt": "a", "label": true})), &t, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`completion`: missing"), "{err}");
        let err = tokenize(
            &row(json!({"prompt": "a", "completion": [], "label": true})),
            &t,
            64,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("two strings or two lists"), "{err}");
        // A prompt that fills max_len is skipped.
        assert!(tokenize(
            &row(json!({"prompt": "1+2=", "completion": "3", "label": true})),
            &t,
            2
        )
        .unwrap()
        .is_err());
    }
}
