//! llama.cpp's GGUF files as models (issue 23). A `.gguf` given wherever a model folder is
//! asked for is turned, once, into the Hugging Face folder transformers' own GGUF loader
//! builds from it — `config.json` and `generation_config.json` from the file's hyper-parameters,
//! `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens) from its
//! tokenizer metadata, `model.safetensors` with llama.cpp's tensor names mapped back, its q/k
//! row permutation undone and quantized blocks dequantized to f32 — and that folder is then
//! loaded like any other (into `model.dtype`, or requantized for `model.quantization`).
//!
//! The folder lives in a cache, `$RLFT_GGUF_CACHE` (default `~/.cache/rlft/gguf`), named after
//! the file and keyed by its canonical path, size and modification time, so a second run starts
//! at once and an edited file is converted anew (the older conversion is removed). It is written under a temporary name and
//! renamed when complete: a killed conversion never leaves a folder that looks finished.
//!
//! The other way, [`export`] writes a model folder as GGUF (`rlft merge --out FILE.gguf`).
//!
//! Supported: the `llama` (Llama, Mistral, SmolLM) and `qwen2` architectures; every tensor type
//! candle dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q6_K); byte-level BPE
//! (`tokenizer.ggml.model = "gpt2"`) and SentencePiece (`"llama"`) vocabularies.

mod config;
pub mod export;
mod tensors;
mod tokenizer;

use crate::error::{PolicyError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::{Path, PathBuf};

/// The architectures (`general.architecture`) read.
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Where converted folders are kept: `$RLFT_GGUF_CACHE`, else `$XDG_CACHE_HOME/rlft/gguf`,
/// else `~/.cache/rlft/gguf`, else the temp folder's `rlft-gguf`.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("RLFT_GGUF_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("rlft/gguf")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/rlft/gguf")))
        .unwrap_or_else(|| std::env::temp_dir().join("rlft-gguf"))
}

pub(crate) fn err(path: &Path, msg: impl Into<String>) -> PolicyError {
    PolicyError::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io(path: &Path, source: std::io::Error) -> PolicyError {
    PolicyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// FNV-1a: a cache key stable across builds (std's hasher is not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The Hugging Face folder of the GGUF `file`, converted now if the cache lacks it.
pub fn hf_folder(file: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(file).map_err(|e| io(file, e))?;
    if !meta.is_file() {
        return Err(err(file, "not a file"));
    }
    let canon = file.canonicalize().map_err(|e| io(file, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = fnv1a(format!("{}\0{}\0{mtime}\0{FORMAT}", canon.display(), meta.len()).as_bytes());
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .replace(
            |c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "_",
        );
    let root = cache_root();
    let dir = root.join(format!("{stem}-{key:016x}"));
    if dir.join(DONE).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = root.join(format!(".{stem}-{key:016x}.tmp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    tracing::info!("converting {} into {}", file.display(), dir.display());
    let written = convert(file, &tmp).and_then(|()| {
        std::fs::write(tmp.join(DONE), canon.display().to_string()).map_err(|e| io(&tmp, e))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process finished the same conversion first.
        if !dir.join(DONE).is_file() {
            return Err(io(&dir, e));
        }
    }
    prune(&root, &canon, &dir);
    Ok(dir)
}

/// Removes the cache's older conversions of the same source file (an edited or replaced file,
/// or an older converter), so the cache holds one folder per GGUF.
fn prune(root: &Path, source: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let source = source.display().to_string();
    for e in entries.flatten() {
        let p = e.path();
        let temp = e.file_name().to_string_lossy().starts_with('.');
        if p != keep && !temp && std::fs::read_to_string(p.join(DONE)).is_ok_and(|s| s == source) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// Bumped when the converted folder's contents change, so older conversions are redone.
const FORMAT: u32 = 1;

/// The marker a complete conversion leaves (holding the source file's path).
const DONE: &str = ".rlft-gguf-source";

/// Reads `file`'s header: metadata and tensor directory (no tensor data).
pub fn read_header(file: &Path) -> Result<Content> {
    let mut f = std::fs::File::open(file).map_err(|e| io(file, e))?;
    Content::read(&mut f).map_err(|e| err(file, format!("not a readable GGUF file: {e}")))
}

/// Writes the Hugging Face folder of `file` into `out`.
pub fn convert(file: &Path, out: &Path) -> Result<()> {
    let content = read_header(file)?;
    let meta = Meta {
        file,
        map: &content.metadata,
    };
    let arch = meta.str("general.architecture")?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(err(
            file,
            format!(
                "unsupported architecture `{arch}` (general.architecture); supported: {}",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    let config = config::hf_config(&meta, arch, &content)?;
    let tok = tokenizer::hf_tokenizer(&meta, &config)?;
    let write_json = |name: &str, v: &serde_json::Value| {
        let p = out.join(name);
        let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
        std::fs::write(&p, text).map_err(|e| io(&p, e))
    };
    write_json("config.json", &config.json)?;
    write_json("generation_config.json", &config.generation)?;
    write_json("tokenizer.json", &tok.tokenizer)?;
    write_json("tokenizer_config.json", &tok.config)?;
    tensors::write_safetensors(file, &content, &config, &out.join("model.safetensors"))
}

/// Typed access to a file's metadata, errors naming the file and key.
pub(crate) struct Meta<'a> {
    pub file: &'a Path,
    pub map: &'a std::collections::HashMap<String, Value>,
}

impl Meta<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn bad(&self, key: &str, what: &str) -> PolicyError {
        err(self.file, format!("metadata `{key}`: {what}"))
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.bad(key, "not a string")),
            None => Err(self.bad(key, "missing")),
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                    .or_else(|_| v.to_i64().map(|x| x.max(0) as u64))
                    .map_err(|_| self.bad(key, "not an integer"))
            })
            .transpose()
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.bad(key, "missing"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map_err(|_| self.bad(key, "not a number"))
            })
            .transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.to_bool().map_err(|_| self.bad(key, "not a boolean")))
            .transpose()
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let Some(v) = self.get(key) else {
            return Err(self.bad(key, "missing"));
        };
        let arr = v.to_vec().map_err(|_| self.bad(key, "not an array"))?;
        arr.iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.bad(key, "holds a non-string")),
            })
            .collect()
    }

    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v.to_vec().map_err(|_| self.bad(key, "not an array"))?;
        arr.iter()
            .map(|x| {
                x.to_i32()
                    .map(i64::from)
                    .or_else(|_| x.to_u32().map(i64::from))
                    .or_else(|_| x.to_i64())
                    .map_err(|_| self.bad(key, "holds a non-integer"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn opt_floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v.to_vec().map_err(|_| self.bad(key, "not an array"))?;
        arr.iter()
            .map(|x| x.to_f32().map_err(|_| self.bad(key, "holds a non-float")))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests;
