//! File writes that never leave a half-written file behind.

use crate::error::{PolicyError, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| PolicyError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| PolicyError::io(&tmp, e))?;
    f.sync_all().map_err(|e| PolicyError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PolicyError::io(path, e))
}
