//! Errors of the policies crate. Every variant that comes from user input names the file
//! and, where there is one, the key or field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("model folder {0} does not exist or is not a folder")]
    MissingFolder(PathBuf),

    #[error("`{id}` (revision `{revision}`) is not a local folder and not in the Hugging Face cache: looked for {looked} (the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); {download}. Download it where there is network access (`huggingface-cli download {id}`) into this cache, or pass a folder")]
    NotInHubCache {
        id: String,
        revision: String,
        looked: String,
        /// What became of the download: not tried (offline), or why it failed.
        download: String,
    },

    #[error("{path} is missing: {what}")]
    MissingFile { path: PathBuf, what: String },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: key `{key}`: {msg}")]
    BadConfig {
        path: PathBuf,
        key: String,
        msg: String,
    },

    #[error("{path}: unsupported model_type `{model_type}`; supported: {supported}")]
    UnsupportedModel {
        path: PathBuf,
        model_type: String,
        supported: String,
    },

    #[error("{path}: tensor `{key}` not found{hint}")]
    MissingTensor {
        path: PathBuf,
        key: String,
        hint: String,
    },

    #[error("{path}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("{path}: cannot read safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: GGUF: {msg}")]
    Gguf { path: PathBuf, msg: String },

    #[error("{path}: adapter does not fit this model: {msg}")]
    AdapterMismatch { path: PathBuf, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PolicyError>;

impl PolicyError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PolicyError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, key: &str, msg: impl Into<String>) -> Self {
        PolicyError::BadConfig {
            path: path.into(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }
}

/// Reads a JSON file into `T`, with errors naming the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| PolicyError::Json {
        path: path.to_path_buf(),
        source,
    })
}
