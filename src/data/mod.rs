//! Datasets: JSONL files read line by line, with errors naming the file, the line and the
//! field.

pub mod preference;
pub mod prompts;
pub mod sft;

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One JSON object of a JSONL file and where it came from.
#[derive(Debug, Clone)]
pub struct Row {
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    pub fields: Map<String, Value>,
}

impl Row {
    /// An error about `field` of this row.
    pub fn error(&self, field: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}:{}: field `{field}`: {msg}",
            self.file.display(),
            self.line
        )
    }

    pub fn str_field(&self, field: &str) -> Result<&str> {
        match self.fields.get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => {
                Err(self.error(field, format!("expected a string, got {}", kind(other))))
            }
            None => Err(self.error(field, "missing")),
        }
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Reads every non-blank line of `path` as a JSON object.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow!("cannot read data file {}: {e}", path.display()))?;
    parse_jsonl(&bytes, path)
}

/// Parses JSONL `bytes` (read from `path`, which errors name): every non-blank line must be
/// a UTF-8 JSON object; at least one is required.
pub fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw).map_err(|e| {
            anyhow!(
                "{}:{line}: not valid UTF-8 (byte {})",
                path.display(),
                e.valid_up_to() + 1
            )
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("{}:{line}: invalid JSON: {e}", path.display()))?;
        let Value::Object(fields) = value else {
            bail!(
                "{}:{line}: expected a JSON object, got {}",
                path.display(),
                kind(&value)
            );
        };
        rows.push(Row {
            file: path.to_path_buf(),
            line,
            fields,
        });
    }
    if rows.is_empty() {
        bail!("{}: no examples (the file is empty)", path.display());
    }
    Ok(rows)
}
