//! Datasets: JSONL files read line by line and parquet files read row by row, into the
//! same rows, with errors naming the file, the line (or row) and the field (or column).

pub mod files;
pub mod parquet;
pub mod preference;
pub mod prompts;
pub mod sft;
pub mod unpaired;

pub use self::files::DataFiles;
pub use self::parquet::Columns;

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// One example, a JSON object, and where it came from.
#[derive(Debug, Clone)]
pub struct Row {
    pub file: PathBuf,
    pub place: Place,
    pub fields: Map<String, Value>,
}

/// Where in its file a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A JSONL line, counted from 1 as editors do.
    Line(usize),
    /// A parquet row, counted from 0 as `datasets` and pandas index them.
    Row(usize),
}

/// `file:line` or `file: row N`, the prefix of every error about a row.
pub struct At<'a>(&'a Row);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.place {
            Place::Line(n) => write!(f, "{}:{n}", self.0.file.display()),
            Place::Row(n) => write!(f, "{}: row {n}", self.0.file.display()),
        }
    }
}

impl Row {
    /// Where this row is, for messages: `file:line` or `file: row N`.
    pub fn at(&self) -> At<'_> {
        At(self)
    }

    /// An error about `field` of this row (a "column" of a parquet row).
    pub fn error(&self, field: &str, msg: impl fmt::Display) -> anyhow::Error {
        let word = match self.place {
            Place::Line(_) => "field",
            Place::Row(_) => "column",
        };
        anyhow!("{}: {word} `{field}`: {msg}", self.at())
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

/// Reads the rows of every file `files` names, in order: `.parquet` files with
/// [`parquet::read_parquet`] (decoding only `columns`), any other as JSONL.
pub fn read_rows(files: &DataFiles, columns: Columns) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for path in files.resolve()? {
        let is_parquet = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
        if is_parquet {
            rows.extend(parquet::read_parquet(&path, columns)?);
        } else {
            rows.extend(read_jsonl(&path)?);
        }
    }
    Ok(rows)
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
            place: Place::Line(line),
            fields,
        });
    }
    if rows.is_empty() {
        bail!("{}: no examples (the file is empty)", path.display());
    }
    Ok(rows)
}
