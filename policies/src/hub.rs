//! Hugging Face Hub ids (`org/name`) resolved as transformers resolves them offline: a local
//! folder of that name wins; otherwise the cache — `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub` — holds `models--org--name/refs/<revision>` (a commit hash) and
//! `snapshots/<hash>/`, whose files are links into `blobs/`. A revision that is itself a
//! 40-hex commit hash names its snapshot directly.
//!
//! On a miss, unless `HF_HUB_OFFLINE` is set, the `hf-hub` crate downloads the revision's
//! weights, configs and tokenizer files into that same cache (from `$HF_ENDPOINT`, default
//! huggingface.co, with `$HF_TOKEN` or the cache's `token` file), and the snapshot is then
//! read as above. A cached revision is used as it is: rlft does not ask the Hub whether
//! `main` has moved on (pass a commit hash, or delete the ref, to change it).

use crate::error::{PolicyError, Result};
use std::path::{Path, PathBuf};

/// The cache folder this process would read.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// Whether `spec` reads as a Hub id: `org/name`, each part letters, digits, `-`, `_`, `.`
/// (not starting with `.`), and not an existing path.
pub fn is_hub_id(spec: &Path) -> bool {
    let Some(s) = spec.to_str() else { return false };
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The folder `spec` names: a `.gguf` file's converted folder ([`crate::gguf`]); itself when it exists (or is not a Hub id), else the cached
/// snapshot of the Hub id at `revision` ("main" by default), or an error saying what was
/// looked for and where.
pub fn resolve(spec: &Path, revision: &str) -> Result<PathBuf> {
    if crate::gguf::is_gguf(spec) && !spec.is_dir() {
        return crate::gguf::hf_folder(spec);
    }
    if spec.exists() || !is_hub_id(spec) {
        return Ok(spec.to_path_buf());
    }
    let id = spec.to_str().expect("a Hub id is UTF-8");
    let revision = if revision.is_empty() {
        "main"
    } else {
        revision
    };
    let miss = |looked: String, download: String| PolicyError::NotInHubCache {
        id: id.to_string(),
        revision: revision.to_string(),
        looked,
        download,
    };
    let Some(cache) = cache_dir() else {
        return Err(miss(
            "no cache folder ($HF_HUB_CACHE, $HF_HOME and $HOME unset)".into(),
            "nothing was downloaded".into(),
        ));
    };
    let looked = match cached(&cache, id, revision) {
        Ok(snapshot) => return Ok(snapshot),
        Err(looked) => looked,
    };
    if offline() {
        return Err(miss(
            looked,
            "HF_HUB_OFFLINE is set, so nothing was downloaded".into(),
        ));
    }
    // hf-hub writes the ref after each file; a download that fails part-way must not leave a
    // ref to a partial snapshot that the next run would take for a cached one.
    let reference = repo_dir(&cache, id).join("refs").join(revision);
    let had_ref = reference.exists();
    if let Err(why) = download(&cache, id, revision) {
        if !had_ref {
            let _ = std::fs::remove_file(&reference);
        }
        return Err(miss(
            looked,
            format!("downloading it from {} failed: {why}", endpoint()),
        ));
    }
    cached(&cache, id, revision).map_err(|looked| {
        miss(
            looked,
            "the download finished but left no snapshot there".into(),
        )
    })
}

/// The cache's folder of model `id`: `models--org--name`.
fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// The snapshot of `id` at `revision` in `cache`, or the path looked for.
fn cached(cache: &Path, id: &str, revision: &str) -> std::result::Result<PathBuf, String> {
    let repo = repo_dir(cache, id);
    let is_hash = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_hash {
        revision.to_string()
    } else {
        let refs = repo.join("refs").join(revision);
        match std::fs::read_to_string(&refs) {
            Ok(s) => s.trim().to_string(),
            Err(_) => return Err(refs.display().to_string()),
        }
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(snapshot.display().to_string());
    }
    Ok(snapshot)
}

/// `HF_HUB_OFFLINE` as huggingface_hub reads it: `1`, `ON`, `YES` or `TRUE`.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// Whether a file of a Hub repository is one rlft reads: the top-level configs, tokenizer
/// files, chat templates and safetensors weights (not `.bin`/`.pth` copies, not subfolders
/// such as Llama's `original/`).
pub fn wanted(file: &str) -> bool {
    !file.contains('/')
        && [".json", ".safetensors", ".txt", ".jinja"]
            .iter()
            .any(|ext| file.ends_with(ext))
}

/// Downloads the files of `id` at `revision` that rlft reads into `cache`, as
/// `huggingface_hub` lays them out (blobs, a snapshot of links, the ref).
fn download(cache: &Path, id: &str, revision: &str) -> std::result::Result<(), String> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let mut builder = ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_endpoint(endpoint())
        .with_progress(true);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = repo.info().map_err(|e| e.to_string())?;
    let all: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let files: Vec<&str> = all.iter().copied().filter(|f| wanted(f)).collect();
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(format!(
            "the repository has no .safetensors weights (its files: {all:?}); rlft reads safetensors"
        ));
    }
    for file in files {
        tracing::info!("downloading {id}/{file} ({revision})");
        repo.download(file).map_err(|e| format!("{file}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_reads_as_a_hub_id() {
        for id in ["Qwen/Qwen2.5-0.5B", "org/name_1.v2", "a/b"] {
            assert!(is_hub_id(Path::new(id)), "{id}");
        }
        for not in [
            "gpt2",
            "./org/name",
            "/abs/path",
            "a/b/c",
            "org/",
            "../x",
            "org/.hidden",
            "o rg/x",
        ] {
            assert!(!is_hub_id(Path::new(not)), "{not}");
        }
    }

    #[test]
    fn which_hub_files_are_downloaded() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "merges.txt",
            "chat_template.jinja",
            "adapter_model.safetensors",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "original/consolidated.00.pth",
            "onnx/model.onnx",
            "README.md",
            ".gitattributes",
            "original/params.json",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
