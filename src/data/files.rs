//! Which files a dataset key names: one path, a list of paths, or glob patterns
//! (`data/train-*.parquet`), read in the order given, a pattern's matches in name order (as
//! `datasets.load_dataset("parquet", data_files=…)` takes them).

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};

/// `data.train_file = "a.jsonl"`, `= ["a.parquet", "b.parquet"]` or `= "shards/*.parquet"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataFiles(Vec<PathBuf>);

impl DataFiles {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self(paths)
    }

    /// Nothing named (the default of a required key).
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|p| p.as_os_str().is_empty())
    }

    /// The paths and patterns as given.
    pub fn entries(&self) -> &[PathBuf] {
        &self.0
    }

    /// The files to read, in order: each entry that names an existing path as it is, each
    /// other entry with `*`, `?` or `[` expanded (its matches sorted by name). A pattern that
    /// matches nothing is an error naming it; a plain path that does not exist is left for
    /// the reader to report.
    pub fn resolve(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in &self.0 {
            let text = entry.to_string_lossy();
            if entry.exists() || !text.contains(['*', '?', '[']) {
                out.push(entry.clone());
                continue;
            }
            let paths =
                glob::glob(&text).map_err(|e| anyhow!("data file pattern `{text}`: {e}"))?;
            let mut matched = Vec::new();
            for p in paths {
                let p = p.map_err(|e| anyhow!("data file pattern `{text}`: {e}"))?;
                if p.is_file() {
                    matched.push(p);
                }
            }
            if matched.is_empty() {
                bail!("data file pattern `{text}` matches no file");
            }
            matched.sort();
            out.extend(matched);
        }
        if out.is_empty() {
            bail!("no data file named");
        }
        Ok(out)
    }
}

impl From<PathBuf> for DataFiles {
    fn from(p: PathBuf) -> Self {
        Self(vec![p])
    }
}

impl From<&Path> for DataFiles {
    fn from(p: &Path) -> Self {
        Self(vec![p.to_path_buf()])
    }
}

impl fmt::Display for DataFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", p.display())?;
        }
        Ok(())
    }
}

/// One entry is written as a string, so configs and checkpoints read as before.
impl Serialize for DataFiles {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [] => PathBuf::new().serialize(s),
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DataFiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a file path or a list of file paths")]
        enum OneOrMany {
            One(PathBuf),
            Many(Vec<PathBuf>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(p) => Self(vec![p]),
            OneOrMany::Many(v) => Self(v),
        })
    }
}

/// An optional `DataFiles` where `""` (or `[]`) means unset, so `--set data.eval_file=""`
/// turns off a file the config names.
pub fn empty_as_none<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<DataFiles>, D::Error> {
    let v: Option<DataFiles> = Deserialize::deserialize(d)?;
    Ok(v.filter(|f| !f.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize, PartialEq, Debug)]
    struct Doc {
        f: DataFiles,
    }

    #[test]
    fn one_path_or_a_list_round_trips_through_toml() {
        let one: Doc = toml::from_str(r#"f = "a.jsonl""#).unwrap();
        assert_eq!(one.f.entries(), [PathBuf::from("a.jsonl")]);
        assert_eq!(toml::to_string(&one).unwrap().trim(), r#"f = "a.jsonl""#);
        let many: Doc = toml::from_str(r#"f = ["a.parquet", "b.parquet"]"#).unwrap();
        assert_eq!(many.f.to_string(), "a.parquet, b.parquet");
        let back: Doc = toml::from_str(&toml::to_string(&many).unwrap()).unwrap();
        assert_eq!(back, many);
        let err = toml::from_str::<Doc>("f = 3").unwrap_err().to_string();
        assert!(err.contains("a file path or a list of file paths"), "{err}");
    }

    #[test]
    fn patterns_expand_in_name_order_and_a_miss_is_named() {
        let dir = std::env::temp_dir().join(format!("rlft-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["train-00001.parquet", "train-00000.parquet", "eval.parquet"] {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        let pat = DataFiles::new(vec![
            dir.join("eval.parquet"),
            dir.join("train-*.parquet"),
            dir.join("missing.jsonl"),
        ]);
        let got = pat.resolve().unwrap();
        assert_eq!(
            got,
            [
                dir.join("eval.parquet"),
                dir.join("train-00000.parquet"),
                dir.join("train-00001.parquet"),
                dir.join("missing.jsonl"),
            ]
        );
        let miss = DataFiles::from(dir.join("test-*.parquet"));
        let err = miss.resolve().unwrap_err().to_string();
        assert!(
            err.contains("test-*.parquet") && err.contains("matches no file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
