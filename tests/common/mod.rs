//! Helpers shared by the integration tests: fixture paths, the reference outputs that
//! transformers + PEFT computed, and running the `rlft` binary.
#![allow(dead_code)]

pub mod rl_run;

use rlft::policies::candle_core::{DType, Device, Tensor};
use rlft::policies::{Adapter, LoraConfig, Pretrained, Targets};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const FAMILIES: [&str; 3] = ["llama", "qwen2", "gpt2"];

/// Writes `contents` to `path` through a file of this thread's own, renamed into place: the
/// ranks of a threaded multi-rank test build their inputs at once, and none may read another's
/// half-written file.
#[allow(dead_code)]
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) {
    let tmp = path.with_extension(format!("{:?}.tmp", std::thread::current().id()));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn reference(model: &str) -> Value {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn load(model: &str, dtype: DType) -> Pretrained {
    Pretrained::load(&fixture(model), dtype, &Device::Cpu).unwrap()
}

pub fn load_adapter(model: &str, pre: &Pretrained) -> Adapter {
    Adapter::load(&fixture(&format!("{model}-lora")), pre.model.as_ref()).unwrap()
}

pub fn rlft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlft"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run rlft")
}

/// `rlft ARGS` with GGUF conversions cached in `cache` (inside a test's temp folder, so they
/// go with it) instead of `~/.cache/rlft/gguf`.
pub fn rlft_cached(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlft"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RLFT_GGUF_CACHE", cache)
        .output()
        .expect("run rlft")
}

/// `rlft logprobs --json` of `texts` on `model` (a folder or a GGUF; conversions cached in
/// `cache`, else the user's cache): one `{"input_ids", "logprobs"}` object per text.
pub fn logprobs_json(cache: Option<&Path>, model: &Path, texts: &[&str]) -> Vec<Value> {
    let mut args = vec!["logprobs", "--model", model.to_str().unwrap(), "--json"];
    for t in texts {
        args.extend(["--text", t]);
    }
    let o = match cache {
        Some(c) => rlft_cached(c, &args),
        None => rlft(&args),
    };
    assert!(o.status.success(), "{}: {}", model.display(), stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), texts.len());
    lines
}

/// `rlft merge` of `adapter` into `model`, written to `out` (a folder, or a GGUF of
/// `gguf_type`); the run must succeed.
pub fn merge(cache: &Path, model: &Path, adapter: &Path, out: &Path, gguf_type: &str) {
    let o = rlft_cached(
        cache,
        &[
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--gguf-type",
            gguf_type,
        ],
    );
    assert!(
        o.status.success(),
        "merge into {}: {}",
        out.display(),
        stderr(&o)
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A fresh temporary folder under the target dir (removed when dropped).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let p = base.join(format!(
            "{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the files of `src` into `dst` (created).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// The steps of the `checkpoint-N` folders in `out`, ascending, asserting each is complete.
pub fn complete_checkpoints(out: &Path) -> Vec<u64> {
    let mut steps = Vec::new();
    for e in std::fs::read_dir(out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("checkpoint-") {
            for f in [
                "trainer_state.json",
                "optimizer.safetensors",
                "adapter_model.safetensors",
                "adapter_config.json",
            ] {
                assert!(out.join(&name).join(f).is_file(), "{name} lacks {f}");
            }
            steps.push(n.parse().unwrap());
        }
    }
    steps.sort();
    steps
}

/// The lines of `dir/out/metrics.jsonl`.
pub fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A fresh all-linear adapter whose B is filled with seeded values, so that the gradient of
/// A is non-zero too (with PEFT's B = 0 it would vanish).
pub fn adapter_with_nonzero_b(pre: &Pretrained, dropout: f64) -> Adapter {
    let cfg = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: dropout,
        target_modules: Targets::all_linear(),
        ..LoraConfig::default()
    };
    let adapter = Adapter::new(pre.model.as_ref(), cfg, 7).unwrap();
    for (i, (_, m)) in adapter.modules().enumerate() {
        let dims = m.b.as_tensor().dims().to_vec();
        let n: usize = dims.iter().product();
        let vals: Vec<f64> = (0..n)
            .map(|j| (((i * 31 + j * 17) % 13) as f64 - 6.0) * 0.03)
            .collect();
        let t = Tensor::from_vec(vals, dims, &pre.model.info().device)
            .unwrap()
            .to_dtype(m.b.as_tensor().dtype())
            .unwrap();
        m.b.set(&t).unwrap();
    }
    adapter
}

/// The tensors of a safetensors file as f64, sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<f64>)> {
    let t = rlft::policies::candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut v: Vec<_> = t
        .into_iter()
        .map(|(k, x)| {
            let x = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            (k, x.to_vec1().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Each tensor of `b` within `rel` of `a`'s in norm: ‖a − b‖₂ ≤ rel · ‖a‖₂.
/// The largest ‖a − b‖ / ‖a‖ over the tensors of two adapters.
#[allow(dead_code)]
pub fn max_relative_diff(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
            let err = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum::<f64>();
            err.sqrt() / norm.max(f64::MIN_POSITIVE)
        })
        .fold(0.0, f64::max)
}

pub fn assert_tensors_close(
    a: &[(String, Vec<f64>)],
    b: &[(String, Vec<f64>)],
    rel: f64,
    what: &str,
) {
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let err = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f64>()
            .sqrt();
        assert!(
            err <= rel * norm,
            "{what} {name}: ‖Δ‖ {err:e}, ‖a‖ {norm:e}"
        );
    }
}

/// The values of `key` in `dir/out/metrics.jsonl`, in order.
pub fn metric(dir: &Path, key: &str) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|r| r[key].as_f64())
        .collect()
}

/// `key`'s series in two runs: as many values, each within `rel` of the first run's
/// (relative to at least `floor`).
pub fn assert_series_close(a: &Path, b: &Path, key: &str, rel: f64, floor: f64, what: &str) {
    let (x, y) = (metric(a, key), metric(b, key));
    assert!(
        !x.is_empty() && x.len() == y.len(),
        "{what} {key}: {x:?} vs {y:?}"
    );
    for (p, q) in x.iter().zip(&y) {
        assert!(
            (p - q).abs() <= rel * p.abs().max(floor),
            "{what} {key}: {x:?} vs {y:?}"
        );
    }
}
