//! Stage configurations: TOML files read into serde structs with `deny_unknown_fields`,
//! defaults in one place (each struct's `Default`), and `--set section.key=value` overrides.
//! An unknown key is an error naming it and the closest known key.

pub mod common;
pub mod preference;
pub mod rl;
pub mod sft;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Reads `path` (if given), applies `overrides` (`section.key=value`, the value parsed as
/// TOML, else taken as a string) and deserialises into `T`.
pub fn load<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<T> {
    load_with_defaults(path, &[], overrides)
}

/// As [`load`], with `defaults` (`section.key=value`) applied first where the file does not
/// set the key (e.g. `rlft grpo` defaults `rl.algorithm` to "grpo").
///
/// Keys the file leaves out take the stage's own defaults (`T::default()`), section by
/// section: the file is laid over the serialised defaults before deserialising.
pub fn load_with_defaults<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    defaults: &[&str],
    overrides: &[String],
) -> Result<T> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            from_text(&text, &p.display().to_string(), defaults, overrides)
        }
        None => from_text("", "built-in defaults", defaults, overrides),
    }
}

/// As [`load_with_defaults`], from the TOML `text` of the file named `source`.
pub fn from_text<T: DeserializeOwned + Serialize + Default>(
    text: &str,
    source: &str,
    defaults: &[&str],
    overrides: &[String],
) -> Result<T> {
    let mut doc: toml::Table =
        toml::from_str(text).map_err(|e| anyhow!("{source}: {}", e.to_string().trim_end()))?;
    for d in defaults {
        let key = d.split('=').next().unwrap_or_default();
        if !has_key(&doc, key) {
            apply_override(&mut doc, d)?;
        }
    }
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    let mut base = toml::Table::try_from(T::default()).context("serialising the defaults")?;
    overlay(&mut base, doc);
    T::deserialize(toml::Value::Table(base)).map_err(|e| {
        let msg = explain(&e.to_string());
        // Name the --set that carried the bad value rather than the file, when one did.
        let key = msg
            .split("in `")
            .nth(1)
            .and_then(|r| r.split('`').next())
            .unwrap_or_default();
        let from_set = !key.is_empty()
            && overrides
                .iter()
                .any(|o| o.split('=').next().map(str::trim) == Some(key));
        if from_set {
            anyhow!("--set {key}: {msg}")
        } else {
            anyhow!("{source}: {msg}")
        }
    })
}

/// An optional path where `""` means unset, so `--set data.eval_file=""` turns off a file
/// the config names.
pub fn empty_as_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<std::path::PathBuf>, D::Error> {
    let v: Option<std::path::PathBuf> = serde::Deserialize::deserialize(d)?;
    Ok(v.filter(|p| !p.as_os_str().is_empty()))
}

/// `a.b.c=value` → sets `doc[a][b][c]`.
fn apply_override(doc: &mut toml::Table, o: &str) -> Result<()> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| anyhow!("--set `{o}`: expected section.key=value"))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set `{o}`: empty key segment");
    }
    let value = parse_value(raw.trim());
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set `{o}`: `{p}` is not a section"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Lays `top` over `base`: tables merge key by key, anything else replaces.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn has_key(doc: &toml::Table, dotted: &str) -> bool {
    let mut table = doc;
    let parts: Vec<&str> = dotted.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        match table.get(*p).and_then(|v| v.as_table()) {
            Some(t) => table = t,
            None => return false,
        }
    }
    table.contains_key(parts[parts.len() - 1])
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a TOML assignment; bare words become strings.
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Keys that moved: (old `section.key`, new `section.key`).
const MOVED: &[(&str, &str)] = &[("rl.eval_steps", "training.eval_steps")];

/// Adds "did you mean `x`?" to serde's "unknown field `y`, expected one of …" errors, and
/// the new name of a key that moved.
fn explain(msg: &str) -> String {
    let msg = msg.trim_end().to_string();
    let Some(rest) = msg.split("unknown field `").nth(1) else {
        return msg;
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return msg;
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    if let Some((_, now)) = MOVED.iter().find(|(old, _)| {
        old.rsplit('.').next() == Some(unknown)
            && msg.contains(&format!("in `{}`", old.split('.').next().unwrap_or("")))
    }) {
        return format!("{msg}; it is now `{now}`");
    }
    match closest(unknown, &candidates) {
        Some(best) => format!("{msg}; did you mean `{best}`?"),
        None => msg,
    }
}

/// The candidate nearest to `word` by edit distance, when it is near enough to be a typo.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .min()
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 2).max(2))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("lerning_rate", &["learning_rate", "seed"]),
            Some("learning_rate")
        );
        assert_eq!(closest("zzz", &["learning_rate", "seed"]), None);
        let e = explain("unknown field `lerning_rate`, expected one of `learning_rate`, `seed`");
        assert!(e.ends_with("did you mean `learning_rate`?"), "{e}");
    }

    #[test]
    fn override_values_are_typed() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "training.learning_rate=1e-3").unwrap();
        apply_override(&mut t, "adapter.target_modules=[\"q_proj\"]").unwrap();
        apply_override(&mut t, "adapter.target_modules2=all-linear").unwrap();
        assert_eq!(t["training"]["learning_rate"].as_float(), Some(1e-3));
        assert!(t["adapter"]["target_modules"].is_array());
        assert_eq!(t["adapter"]["target_modules2"].as_str(), Some("all-linear"));
        assert!(apply_override(&mut t, "novalue").is_err());
    }
}
