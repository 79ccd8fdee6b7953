//! Checkpoints `output_dir/checkpoint-N/`: trainable weights, optimizer moments,
//! `trainer_state.json` (step, data position, RNG position, …) and, written last,
//! `manifest.json` (every other file, with its size and SHA-256). A checkpoint is written in
//! a hidden temporary folder and renamed into place, so a kill never leaves a partial one:
//! a folder named `checkpoint-N` is always complete. A file damaged afterwards (a disk
//! error, a truncating copy) is caught by [`verify`] against the manifest; `--resume`
//! ([`resolve`]) then skips that checkpoint for the newest one that verifies.

use super::optimizer::Optimizer;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Key added to `trainer_state.json` by the rlft versions that write a manifest, so that a
/// checkpoint whose manifest was lost is told apart from one written before manifests.
const STATE_MANIFEST_KEY: &str = "manifest";

/// `manifest.json`: every file of the checkpoint folder but itself, subfolders included.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format of this file (1).
    pub version: u32,
    /// Sorted by path.
    pub files: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    /// Relative to the checkpoint folder, `/`-separated (e.g. `critic/adapter_model.safetensors`).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub global_step: u64,
    /// Micro-batches consumed from the (epoch-shuffled) data stream.
    pub data_position: u64,
    /// Word position of the dropout generator (decimal string: it is a u128).
    pub dropout_rng_word_pos: String,
    /// The run's configuration, to refuse resuming with a different one.
    pub config: serde_json::Value,
    /// Optimizer updates applied (differs from `global_step` when a step makes several, as
    /// RL steps do); AdamW's bias correction needs it. Absent: `global_step`.
    #[serde(default)]
    pub optimizer_step: Option<u64>,
    /// Stage-specific state (e.g. PPO's adaptive β).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// Ranks of a data-parallel run (absent: 1); a resume must have as many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

/// Saves tensors with `candle`'s safetensors writer, via a temporary file.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, path)
        .with_context(|| format!("writing {}", path.display()))
}

fn fsync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// fsyncs every file under `dir`, subfolders (`critic/`) included, then the folders.
fn sync_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_files(&p)?;
        } else if p.is_file() {
            std::fs::File::open(&p)?.sync_all()?;
        }
    }
    fsync_dir(dir);
    Ok(())
}

/// The files under `dir` (recursively) as (`/`-separated relative path, path), sorted; the
/// top-level manifest and its temporary file excluded.
fn files_under(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{prefix}{name}");
            let p = e.path();
            if p.is_dir() {
                walk(&p, &format!("{rel}/"), out)?;
            } else if p.is_file() {
                out.push((rel, p));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.retain(|(rel, _)| rel != MANIFEST_FILE && rel != MANIFEST_TMP);
    out.sort();
    Ok(out)
}

const MANIFEST_TMP: &str = ".manifest.json.tmp";

/// Size and SHA-256 (lowercase hex) of the file at `p`.
pub fn sha256_file(p: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((n, hex))
}

/// Writes `dir/manifest.json` over the files now in `dir` (which must be written and
/// fsynced), via a temporary file, fsynced, renamed into place, the folder fsynced.
fn write_manifest(dir: &Path) -> Result<()> {
    let files = files_under(dir)?
        .into_iter()
        .map(|(path, p)| {
            let (bytes, sha256) = sha256_file(&p)?;
            Ok(ManifestEntry {
                path,
                bytes,
                sha256,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string_pretty(&Manifest { version: 1, files })?;
    let tmp = dir.join(MANIFEST_TMP);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(json.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    let dst = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))?;
    fsync_dir(dir);
    Ok(())
}

/// How a checkpoint folder passed [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Every file the manifest lists is there with its size and SHA-256.
    Manifest,
    /// No manifest, and `trainer_state.json` does not say one was written: a checkpoint
    /// from an rlft before manifests, which cannot be checked.
    NoManifest,
}

/// Checks the checkpoint folder `dir` against its manifest. The error is the reason, naming
/// the file: missing, a size that differs, a SHA-256 that differs, or a manifest missing
/// or unreadable. Files not in the manifest are not looked at.
pub fn verify(dir: &Path) -> Result<Verified> {
    let mp = dir.join(MANIFEST_FILE);
    let text = match std::fs::read(&mp) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let sp = dir.join(STATE_FILE);
            let state = std::fs::read(&sp).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!("{STATE_FILE} is missing"),
                _ => anyhow::anyhow!("{STATE_FILE} is unreadable ({e})"),
            })?;
            let state: serde_json::Value = serde_json::from_slice(&state)
                .map_err(|e| anyhow::anyhow!("{STATE_FILE} is unreadable ({e})"))?;
            if state.get(STATE_MANIFEST_KEY).is_some() {
                bail!("{MANIFEST_FILE} is missing (this checkpoint was written with one)");
            }
            return Ok(Verified::NoManifest);
        }
        Err(e) => bail!("{MANIFEST_FILE} is unreadable ({e})"),
    };
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{MANIFEST_FILE} is unreadable ({e})"))?;
    for f in &m.files {
        let rel = Path::new(&f.path);
        if f.path.is_empty()
            || !rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            bail!(
                "{MANIFEST_FILE} is unreadable (it lists the path {:?})",
                f.path
            );
        }
        let p = dir.join(rel);
        let len = match std::fs::metadata(&p) {
            Ok(md) if md.is_file() => md.len(),
            Ok(_) => bail!("{} is not a file", f.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{} is missing (the manifest lists it)", f.path)
            }
            Err(e) => bail!("{} is unreadable ({e})", f.path),
        };
        if len != f.bytes {
            bail!("{} is {len} bytes, the manifest says {}", f.path, f.bytes);
        }
        let (_, sha) =
            sha256_file(&p).map_err(|e| anyhow::anyhow!("{} is unreadable ({e:#})", f.path))?;
        if sha != f.sha256 {
            bail!(
                "{}: SHA-256 mismatch (the file changed after the checkpoint was written)",
                f.path
            );
        }
    }
    Ok(Verified::Manifest)
}

pub struct Checkpointer {
    pub output_dir: PathBuf,
    pub save_total_limit: Option<usize>,
}

impl Checkpointer {
    /// Writes checkpoint `step`: `payload` writes the trainable weights into the folder.
    pub fn save(
        &self,
        step: u64,
        payload: &dyn Fn(&Path) -> Result<()>,
        optimizer: &Optimizer,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let final_dir = self.output_dir.join(format!("checkpoint-{step}"));
        let tmp = self.output_dir.join(format!(".checkpoint-{step}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let write = || -> Result<()> {
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            payload(&tmp)?;
            pause_for_tests();
            save_tensors(&optimizer.state_tensors(), &tmp.join(OPTIMIZER_FILE))?;
            let mut json = serde_json::to_value(state)?;
            if let Some(o) = json.as_object_mut() {
                o.insert(STATE_MANIFEST_KEY.into(), MANIFEST_FILE.into());
            }
            std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&json)?)
                .with_context(|| format!("writing {}", tmp.join(STATE_FILE).display()))?;
            sync_files(&tmp)?;
            // Last, over the files as they are on disk.
            write_manifest(&tmp)
        };
        if let Err(e) = write() {
            // Leave nothing half-written behind; the completed checkpoints stay as they are.
            let _ = std::fs::remove_dir_all(&tmp);
            let full = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    io.raw_os_error() == Some(libc::ENOSPC)
                        || io.raw_os_error() == Some(libc::EDQUOT)
                })
            }) || format!("{e:#}").contains("No space left");
            let newest = list(&self.output_dir).into_iter().max();
            let kept = match newest {
                Some((_, p)) => format!("the newest complete checkpoint is {}", p.display()),
                None => "no complete checkpoint exists yet".into(),
            };
            return Err(e.context(format!(
                "checkpoint-{step} could not be written{}; its partial files were removed and {kept}",
                if full { " (the disk is full: free space, then rerun with --resume)" } else { "" }
            )));
        }
        if final_dir.exists() {
            // Same step written again (a resumed run): swap the old one out first.
            let old = self.output_dir.join(format!(".checkpoint-{step}.old"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&final_dir, &old)?;
            std::fs::rename(&tmp, &final_dir)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &final_dir)
                .with_context(|| format!("renaming into {}", final_dir.display()))?;
        }
        fsync_dir(&self.output_dir);
        self.rotate(step)?;
        Ok(final_dir)
    }

    /// Keeps only the newest `save_total_limit` checkpoints, and always `just_written` (a
    /// run resumed past a damaged newer checkpoint writes older steps than that one, which
    /// it rewrites when it gets there).
    fn rotate(&self, just_written: u64) -> Result<()> {
        let Some(limit) = self.save_total_limit else {
            return Ok(());
        };
        let mut all = list(&self.output_dir);
        if all.len() > limit.max(1) {
            all.sort();
            let old = all.len() - limit.max(1);
            for (step, p) in all[..old].iter().filter(|(s, _)| *s != just_written) {
                // Renamed out of the checkpoint-N namespace first (atomic), so a kill during
                // the removal never leaves a partial folder under a checkpoint name.
                let old = self.output_dir.join(format!(".checkpoint-{step}.old"));
                let _ = std::fs::remove_dir_all(&old);
                std::fs::rename(p, &old)?;
                std::fs::remove_dir_all(&old)?;
            }
        }
        Ok(())
    }
}

/// `RLFT_CHECKPOINT_PAUSE_MS`: sleep this long inside every checkpoint write, after the
/// weights and before the optimizer state — only so tests can kill a run mid-write.
fn pause_for_tests() {
    if let Some(ms) = std::env::var("RLFT_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The `checkpoint-N` folders under `dir` as (step, path), whatever they hold.
fn numbered(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().to_string_lossy().into_owned();
        let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
        e.path().is_dir().then(|| (step, e.path()))
    })
    .collect()
}

/// Complete checkpoints under `dir` as (step, path): the `checkpoint-N` folders with a
/// `trainer_state.json` (not verified against their manifests: see [`verify`]).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    numbered(dir)
        .into_iter()
        .filter(|(_, p)| p.join(STATE_FILE).is_file())
        .collect()
}

fn warn_unverified(p: &Path) {
    tracing::warn!(
        "{}: no {MANIFEST_FILE} (written by an rlft before checkpoint manifests), so its files could not be verified; resuming from it as is",
        p.display()
    );
}

/// `--resume` → a checkpoint folder. "latest": the newest `checkpoint-N` under `output_dir`
/// that [`verify`]s, each newer one skipped with a warning that says why; an error listing
/// them all when none does. A path: that checkpoint, an error naming the damaged file if it
/// does not verify. A checkpoint without a manifest (an older rlft) is taken as before,
/// with a warning that it could not be verified.
pub fn resolve(resume: &str, output_dir: &Path) -> Result<PathBuf> {
    if resume == "latest" {
        let mut all = numbered(output_dir);
        if all.is_empty() {
            bail!(
                "--resume: no checkpoint-N folder in {}",
                output_dir.display()
            );
        }
        all.sort_by(|a, b| b.cmp(a));
        let mut skipped = Vec::new();
        for (_, p) in &all {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            match verify(p) {
                Ok(v) => {
                    if v == Verified::NoManifest {
                        warn_unverified(p);
                    }
                    tracing::info!("resuming from {}", p.display());
                    return Ok(p.clone());
                }
                Err(e) => {
                    tracing::warn!("--resume: skipping {name}: {e:#}");
                    skipped.push(format!("{name}: {e:#}"));
                }
            }
        }
        bail!(
            "--resume: no checkpoint in {} verifies against its manifest ({}); rerun without --resume to start from step 0",
            output_dir.display(),
            skipped.join("; ")
        );
    }
    let p = PathBuf::from(resume);
    if !p.join(STATE_FILE).is_file() && !p.join(MANIFEST_FILE).is_file() {
        bail!(
            "--resume {}: not a checkpoint folder (no {STATE_FILE})",
            p.display()
        );
    }
    match verify(&p) {
        Ok(Verified::Manifest) => {}
        Ok(Verified::NoManifest) => warn_unverified(&p),
        Err(e) => bail!(
            "--resume {}: the checkpoint is damaged: {e:#}; resume from an earlier checkpoint, or pass --resume without a path to take the newest one that verifies",
            p.display()
        ),
    }
    Ok(p)
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid trainer state", p.display()))
}

pub fn read_optimizer(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let p = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&p, device).with_context(|| format!("reading {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optimizer::OptimizerKind;
    use candle_core::Var;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("rlft-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn save(out: &Path, step: u64, limit: Option<usize>) -> PathBuf {
        let v = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let opt = Optimizer::new(
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            vec![("w".into(), v)],
        );
        let state = TrainerState {
            global_step: step,
            data_position: 2 * step,
            dropout_rng_word_pos: "0".into(),
            config: serde_json::json!({}),
            optimizer_step: Some(step),
            extra: serde_json::Value::Null,
            world_size: None,
        };
        let ck = Checkpointer {
            output_dir: out.to_path_buf(),
            save_total_limit: limit,
        };
        let payload = |dir: &Path| -> Result<()> {
            std::fs::write(dir.join("weights.bin"), vec![7u8; 3000 + step as usize])?;
            std::fs::create_dir_all(dir.join("critic/deeper"))?;
            std::fs::write(dir.join("critic/head.bin"), b"critic")?;
            std::fs::write(dir.join("critic/deeper/empty"), b"")?;
            Ok(())
        };
        ck.save(step, &payload, &opt, &state).unwrap()
    }

    #[test]
    fn the_manifest_lists_every_file_and_catches_damage() {
        let out = tmp("manifest");
        let dir = save(&out, 3, None);
        let m: Manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap())
                .unwrap();
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "critic/deeper/empty",
                "critic/head.bin",
                OPTIMIZER_FILE,
                STATE_FILE,
                "weights.bin"
            ]
        );
        let e = &m.files[1];
        assert_eq!(e.bytes, 6);
        // SHA-256("critic"), from `printf critic | sha256sum`.
        assert_eq!(
            e.sha256,
            "db113508c7cb409c8ea42675eaebcb927da21e928d2aad2bb81f05d6d9b64d40"
        );
        assert_eq!(verify(&dir).unwrap(), Verified::Manifest);
        assert!(!dir.join(MANIFEST_TMP).exists());

        // Damage: a size, then the bytes (same size), then a missing file, then the manifest.
        let w = dir.join("weights.bin");
        std::fs::write(&w, vec![7u8; 10]).unwrap();
        let err = format!("{:#}", verify(&dir).unwrap_err());
        assert_eq!(err, "weights.bin is 10 bytes, the manifest says 3003");
        std::fs::write(&w, vec![8u8; 3003]).unwrap();
        let err = format!("{:#}", verify(&dir).unwrap_err());
        assert!(err.starts_with("weights.bin: SHA-256 mismatch"), "{err}");
        std::fs::remove_file(&w).unwrap();
        let err = format!("{:#}", verify(&dir).unwrap_err());
        assert!(err.starts_with("weights.bin is missing"), "{err}");
        std::fs::write(dir.join(MANIFEST_FILE), b"{\"version\": 1, \"fi").unwrap();
        let err = format!("{:#}", verify(&dir).unwrap_err());
        assert!(err.starts_with("manifest.json is unreadable"), "{err}");
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        let err = format!("{:#}", verify(&dir).unwrap_err());
        assert!(err.starts_with("manifest.json is missing"), "{err}");

        // A checkpoint from before manifests: accepted, unverified.
        let mut state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
        state.as_object_mut().unwrap().remove(STATE_MANIFEST_KEY);
        std::fs::write(dir.join(STATE_FILE), state.to_string()).unwrap();
        assert_eq!(verify(&dir).unwrap(), Verified::NoManifest);
        assert_eq!(read_state(&dir).unwrap().global_step, 3);
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn latest_skips_damaged_checkpoints_and_a_path_is_refused() {
        let out = tmp("latest");
        for step in [2, 4, 6] {
            save(&out, step, None);
        }
        assert_eq!(resolve("latest", &out).unwrap(), out.join("checkpoint-6"));
        std::fs::write(out.join("checkpoint-6/critic/head.bin"), b"x").unwrap();
        std::fs::write(out.join("checkpoint-4/optimizer.safetensors"), b"").unwrap();
        assert_eq!(resolve("latest", &out).unwrap(), out.join("checkpoint-2"));
        let p = out.join("checkpoint-6");
        let err = format!("{:#}", resolve(&p.display().to_string(), &out).unwrap_err());
        assert!(
            err.contains("checkpoint-6") && err.contains("critic/head.bin is 1 bytes"),
            "{err}"
        );
        std::fs::remove_file(out.join("checkpoint-2/weights.bin")).unwrap();
        let err = format!("{:#}", resolve("latest", &out).unwrap_err());
        for want in [
            "checkpoint-6: critic/head.bin is 1 bytes",
            "checkpoint-4: optimizer.safetensors is 0 bytes",
            "checkpoint-2: weights.bin is missing",
        ] {
            assert!(err.contains(want), "{err}");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn rotation_keeps_the_checkpoint_just_written() {
        let out = tmp("rotate");
        save(&out, 8, Some(1));
        // A resumed run writing step 4 beside a newer (damaged) checkpoint-8 keeps both.
        save(&out, 4, Some(1));
        let mut steps: Vec<u64> = list(&out).into_iter().map(|(s, _)| s).collect();
        steps.sort();
        assert_eq!(steps, [4, 8]);
        save(&out, 8, Some(1));
        let steps: Vec<u64> = list(&out).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [8]);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
