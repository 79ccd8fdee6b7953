//! Reading tensors from a Hugging Face folder: `model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`. Every error names the file and the tensor.

use crate::error::{read_json, PolicyError, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub struct WeightFiles {
    /// One open file per shard.
    shards: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
    /// Shown in "not found" errors.
    describe: PathBuf,
    dtype: DType,
    device: Device,
}

fn open_shard(path: &Path) -> Result<MmapedSafetensors> {
    if !path.is_file() {
        return Err(PolicyError::MissingFile {
            path: path.to_path_buf(),
            what: "safetensors weights".into(),
        });
    }
    // SAFETY: the file is mapped read-only; rlft never writes to a model folder it reads.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| PolicyError::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

impl WeightFiles {
    /// Opens the weights of `dir`; tensors are converted to `dtype` on `device`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        let describe;
        if single.is_file() {
            let st = open_shard(&single)?;
            for (name, _) in st.tensors() {
                index.insert(name, 0);
            }
            shards.push((single.clone(), st));
            describe = single;
        } else if index_path.is_file() {
            let json: serde_json::Value = read_json(&index_path)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    PolicyError::config(&index_path, "weight_map", "missing or not an object")
                })?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let mut file_idx = HashMap::new();
            for f in files {
                file_idx.insert(f.to_string(), shards.len());
                let p = dir.join(f);
                shards.push((p.clone(), open_shard(&p)?));
            }
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    PolicyError::config(&index_path, &format!("weight_map.{name}"), "not a string")
                })?;
                index.insert(name.clone(), file_idx[f]);
            }
            describe = index_path;
        } else if dir.join("pytorch_model.bin").is_file() {
            return Err(PolicyError::MissingFile {
                path: single,
                what: "weights in safetensors format (only pytorch_model.bin found; \
                       convert it with `model.save_pretrained(dir, safe_serialization=True)`)"
                    .into(),
            });
        } else {
            return Err(PolicyError::MissingFile {
                path: single,
                what: "model weights (model.safetensors or model.safetensors.index.json)".into(),
            });
        }
        Ok(Self {
            shards,
            index,
            describe,
            dtype,
            device: device.clone(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads `name`, checks its shape, converts to the model dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_raw(name)?;
        if t.dims() != shape {
            return Err(PolicyError::ShapeMismatch {
                path: self.path_of(name),
                key: name.to_string(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Loads `name` whatever its shape, converted to the model dtype.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        Ok(self.get_raw(name)?.to_dtype(self.dtype)?)
    }

    /// The first of `names` present (for checkpoints that differ by a prefix).
    pub fn get_any(&self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        match names.iter().find(|n| self.contains(n)) {
            Some(n) => self.get(n, shape),
            None => Err(PolicyError::MissingTensor {
                path: self.describe.clone(),
                key: names[0].clone(),
                hint: String::new(),
            }),
        }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(&i) => self.shards[i].0.clone(),
            None => self.describe.clone(),
        }
    }

    fn get_raw(&self, name: &str) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            let hint = match self
                .index
                .keys()
                .find(|k| k.ends_with(name) || name.ends_with(*k))
            {
                Some(k) => format!(" (found `{k}`)"),
                None => String::new(),
            };
            return Err(PolicyError::MissingTensor {
                path: self.describe.clone(),
                key: name.to_string(),
                hint,
            });
        };
        let (path, st) = &self.shards[i];
        st.load(name, &self.device)
            .map_err(|e| PolicyError::Safetensors {
                path: path.clone(),
                msg: format!("tensor `{name}`: {e}"),
            })
    }
}
