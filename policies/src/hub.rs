//! Hugging Face Hub ids (`org/name`) resolved as transformers resolves them offline: a local
//! folder of that name wins; otherwise the cache — `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub` — holds `models--org--name/refs/<revision>` (a commit hash) and
//! `snapshots/<hash>/`, whose files are links into `blobs/`. A revision that is itself a
//! 40-hex commit hash names its snapshot directly.

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

/// The folder `spec` names: itself when it exists (or is not a Hub id), else the cached
/// snapshot of the Hub id at `revision` ("main" by default), or an error saying what was
/// looked for and where.
pub fn resolve(spec: &Path, revision: &str) -> Result<PathBuf> {
    if spec.exists() || !is_hub_id(spec) {
        return Ok(spec.to_path_buf());
    }
    let id = spec.to_str().expect("a Hub id is UTF-8");
    let revision = if revision.is_empty() {
        "main"
    } else {
        revision
    };
    let miss = |looked: String| PolicyError::NotInHubCache {
        id: id.to_string(),
        revision: revision.to_string(),
        looked,
    };
    let Some(cache) = cache_dir() else {
        return Err(miss(
            "no cache folder ($HF_HUB_CACHE, $HF_HOME and $HOME unset)".into(),
        ));
    };
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let is_hash = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_hash {
        revision.to_string()
    } else {
        let refs = repo.join("refs").join(revision);
        match std::fs::read_to_string(&refs) {
            Ok(s) => s.trim().to_string(),
            Err(_) => return Err(miss(refs.display().to_string())),
        }
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(miss(snapshot.display().to_string()));
    }
    Ok(snapshot)
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
}
