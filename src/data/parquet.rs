//! Parquet datasets (what the Hub serves and `datasets`' `to_parquet` writes), read with the
//! Apache `parquet` crate's row reader into the same rows a JSONL line gives: a string column
//! is a string, a list a list, a struct an object (a chat message), a number a number.
//!
//! - Only the columns a stage reads are decoded ([`Columns::Only`]); the others are skipped.
//! - A null cell is an absent field: a table has every column in every row, where JSONL rows
//!   leave out what they lack (a `margin` some pairs have). Nulls inside a list or struct are
//!   kept as JSON `null`.
//! - Rows are counted from 0, as `datasets` and pandas index them; errors say `file: row N`.
//! - Dates, times, timestamps and decimals become their text; binary cells must be UTF-8; a
//!   NaN or infinite float is an error (JSONL cannot hold one either).

use super::{Place, Row};
use anyhow::{anyhow, bail, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row as ParquetRow};
use parquet::schema::types::Type;
use serde_json::{Map, Number, Value};
use std::path::Path;
use std::sync::Arc;

/// Which columns of a file a reader needs.
#[derive(Debug, Clone, Copy)]
pub enum Columns<'a> {
    /// Every column (RL prompts: the rewards may read any of them).
    All,
    /// These, where the file has them (a row shape uses some of them).
    Only(&'a [&'a str]),
}

/// Reads every row of the parquet file `path`; at least one is required.
pub fn read_parquet(path: &Path, columns: Columns) -> Result<Vec<Row>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow!("cannot read data file {}: {e}", path.display()))?;
    // The reader trusts the file's metadata in places (`expect`s, unchecked shifts); a
    // damaged file must be an error that names it, not a panic.
    match quiet_catch_unwind(|| decode(file, path, columns)) {
        Ok(rows) => rows,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the reader failed");
            bail!("{}: not a readable parquet file ({why})", path.display())
        }
    }
}

thread_local! {
    static READING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind` that keeps the panic hook quiet for a panic on this thread inside `f` (the
/// error returned says what happened); panics elsewhere print as before.
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !READING.with(|r| r.get()) {
                previous(info)
            }
        }));
    });
    READING.with(|r| r.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    READING.with(|r| r.set(false));
    out
}

fn decode(file: std::fs::File, path: &Path, columns: Columns) -> Result<Vec<Row>> {
    let not_parquet = |e: parquet::errors::ParquetError| {
        anyhow!("{}: not a readable parquet file: {e}", path.display())
    };
    let reader = SerializedFileReader::new(file).map_err(not_parquet)?;
    let schema = reader.metadata().file_metadata().schema();
    let projection = match columns {
        Columns::All => None,
        Columns::Only(names) => {
            let fields: Vec<Arc<Type>> = schema
                .get_fields()
                .iter()
                .filter(|f| names.contains(&f.name()))
                .cloned()
                .collect();
            if fields.is_empty() {
                let have: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
                bail!(
                    "{}: expected a column among {names:?}; the file has {have:?}",
                    path.display()
                );
            }
            Some(
                Type::group_type_builder(schema.name())
                    .with_fields(fields)
                    .build()
                    .map_err(not_parquet)?,
            )
        }
    };
    let mut rows = Vec::new();
    for (index, row) in reader
        .get_row_iter(projection)
        .map_err(not_parquet)?
        .enumerate()
    {
        let row = row.map_err(|e| anyhow!("{}: row {index}: {e}", path.display()))?;
        rows.push(Row {
            file: path.to_path_buf(),
            place: Place::Row(index),
            fields: row_fields(&row, path, index)?,
        });
    }
    if rows.is_empty() {
        bail!("{}: no examples (the file has no rows)", path.display());
    }
    Ok(rows)
}

/// The row's non-null cells as JSON fields.
fn row_fields(row: &ParquetRow, path: &Path, index: usize) -> Result<Map<String, Value>> {
    let mut fields = Map::new();
    for (name, cell) in row.get_column_iter() {
        if matches!(cell, Field::Null) {
            continue;
        }
        let value = json(cell)
            .map_err(|why| anyhow!("{}: row {index}: column `{name}`: {why}", path.display()))?;
        fields.insert(name.clone(), value);
    }
    Ok(fields)
}

/// One cell as the JSON value a JSONL line would hold.
fn json(cell: &Field) -> std::result::Result<Value, String> {
    let float = |x: f64| {
        Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| format!("{x} is not a finite number"))
    };
    Ok(match cell {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float16(x) => float(f64::from(x.to_f32()))?,
        Field::Float(x) => float(f64::from(*x))?,
        Field::Double(x) => float(*x)?,
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(
            std::str::from_utf8(b.data())
                .map_err(|_| "binary data that is not UTF-8 text".to_string())?
                .to_string(),
        ),
        Field::Group(row) => {
            let mut object = Map::new();
            for (name, f) in row.get_column_iter() {
                object.insert(name.clone(), json(f)?);
            }
            Value::Object(object)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut object = Map::new();
            for (k, v) in map.entries() {
                let key = match k {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                object.insert(key, json(v)?);
            }
            Value::Object(object)
        }
        // Dates, times, timestamps and decimals: their text, as parquet prints them.
        other => Value::String(other.to_string()),
    })
}
