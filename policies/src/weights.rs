//! Reading tensors from a Hugging Face folder: `model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`. Every error names the file and the tensor.
//!
//! Tensors are read one at a time with plain file reads, not a memory map: a mapped file's
//! pages count in the process's resident memory as they are touched, so loading an f32
//! checkpoint into bf16 would peak at the file's size plus the model's. Read, a tensor's
//! bytes live only until it is converted.
//!
//! Dtypes: matrices (rank ≥ 2: linear weights, embeddings) are stored in the requested
//! dtype; vectors (norm weights, biases) in the activation dtype, [`activation_dtype`]. On
//! the CPU a bf16/f16 model keeps its matrices in half precision and computes in f32.

use crate::device::activation_dtype;
use crate::error::{read_json, PolicyError, Result};
use crate::linear::LinearWeight;
use crate::quant::QuantConfig;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, Metadata};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Values read and converted at a time when a tensor's stored dtype is not the one it is
/// kept in.
const CONVERT_CHUNK: usize = 1 << 20;

pub struct WeightFiles {
    /// One open file per shard.
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
    /// Shown in "not found" errors.
    describe: PathBuf,
    /// Matrices are stored in this dtype.
    weights: DType,
    /// Vectors, and every activation, are in this one.
    activation: DType,
    device: Device,
    /// How the blocks' linear weights are held ([`WeightFiles::block_linear`]).
    quant: QuantConfig,
}

/// One safetensors file: its parsed header and the open file the tensors are read from.
struct Shard {
    path: PathBuf,
    file: Mutex<File>,
    /// Where the data section starts: 8 + the header's length.
    data_start: u64,
    meta: Metadata,
}

fn open_shard(path: &Path) -> Result<Shard> {
    if !path.is_file() {
        return Err(PolicyError::MissingFile {
            path: path.to_path_buf(),
            what: "safetensors weights".into(),
        });
    }
    let bad = |msg: String| PolicyError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = File::open(path).map_err(|e| PolicyError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| PolicyError::io(path, e))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "{file_len} bytes: too short for a safetensors header"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} does not fit in the file's {file_len} bytes (truncated?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let data_len = meta.data_len() as u64;
    if data_start + data_len != file_len {
        return Err(bad(format!(
            "the header describes {data_len} bytes of tensor data, the file holds {} \
             (truncated or not a safetensors file)",
            file_len - data_start
        )));
    }
    Ok(Shard {
        path: path.to_path_buf(),
        file: Mutex::new(file),
        data_start,
        meta,
    })
}

impl Shard {
    fn names(&self) -> Vec<String> {
        self.meta.tensors().into_keys().collect()
    }

    /// Reads tensor `name` converted to `target(stored dtype, rank)`.
    fn load(
        &self,
        name: &str,
        device: &Device,
        target: impl Fn(DType, usize) -> DType,
    ) -> std::result::Result<Tensor, String> {
        let info = self.meta.info(name).ok_or("not in the header")?;
        let dtype = match info.dtype {
            StDtype::F64 => DType::F64,
            StDtype::F32 => DType::F32,
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            StDtype::I64 => DType::I64,
            StDtype::U32 => DType::U32,
            StDtype::U8 => DType::U8,
            other => return Err(format!("unsupported dtype {other:?}")),
        };
        let (start, end) = info.data_offsets;
        let numel: usize = info.shape.iter().product();
        let target = target(dtype, info.shape.len());
        if end - start != numel * dtype.size_in_bytes() {
            return Err(format!(
                "{} bytes for shape {:?} in {dtype:?}",
                end - start,
                info.shape
            ));
        }
        let converts = device.is_cpu()
            && target != dtype
            && matches!(
                (dtype, target),
                (DType::F32, DType::BF16 | DType::F16) | (DType::BF16 | DType::F16, DType::F32)
            );
        let mut f = self.file.lock().map_err(|_| "file lock poisoned")?;
        f.seek(SeekFrom::Start(self.data_start + start as u64))
            .map_err(|e| format!("reading its bytes: {e}"))?;
        if !converts {
            let mut bytes = vec![0u8; end - start];
            f.read_exact(&mut bytes)
                .map_err(|e| format!("reading its bytes: {e}"))?;
            drop(f);
            let t = Tensor::from_raw_buffer(&bytes, dtype, &info.shape, device)
                .map_err(|e| e.to_string())?;
            return t.to_dtype(target).map_err(|e| e.to_string());
        }
        // Read and converted a chunk at a time: an f32 embedding loaded into bf16 never
        // exists whole in f32 (its raw bytes alone would be twice the bf16 table).
        let size = dtype.size_in_bytes();
        let shape = info.shape.as_slice();
        let f = &mut *f;
        let le16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        let le32 = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        use half::{bf16, f16};
        let t = match (dtype, target) {
            (DType::F32, DType::BF16) => {
                let v = read_converted(f, numel, size, |c| bf16::from_f32(le32(c)))?;
                Tensor::from_vec(v, shape, device)
            }
            (DType::F32, _) => {
                let v = read_converted(f, numel, size, |c| f16::from_f32(le32(c)))?;
                Tensor::from_vec(v, shape, device)
            }
            (DType::BF16, _) => {
                let v = read_converted(f, numel, size, |c| bf16::from_bits(le16(c)).to_f32())?;
                Tensor::from_vec(v, shape, device)
            }
            _ => {
                let v = read_converted(f, numel, size, |c| f16::from_bits(le16(c)).to_f32())?;
                Tensor::from_vec(v, shape, device)
            }
        };
        t.map_err(|e| e.to_string())
    }
}

/// `numel` values of `size` bytes each read from `f`'s position, [`CONVERT_CHUNK`] at a time,
/// each converted by `convert` from its little-endian bytes.
fn read_converted<T>(
    f: &mut File,
    numel: usize,
    size: usize,
    convert: impl Fn(&[u8]) -> T,
) -> std::result::Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(numel);
    let mut chunk = vec![0u8; CONVERT_CHUNK.min(numel) * size];
    while out.len() < numel {
        let len = ((numel - out.len()) * size).min(chunk.len());
        f.read_exact(&mut chunk[..len])
            .map_err(|e| format!("reading its bytes: {e}"))?;
        out.extend(chunk[..len].chunks_exact(size).map(&convert));
    }
    Ok(out)
}

impl WeightFiles {
    /// Opens the weights of `dir`; matrices are converted to `dtype` on `device`, vectors to
    /// its [`activation_dtype`].
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        let describe;
        if single.is_file() {
            let st = open_shard(&single)?;
            for name in st.names() {
                index.insert(name, 0);
            }
            shards.push(st);
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
                shards.push(open_shard(&p)?);
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
            weights: dtype,
            activation: activation_dtype(dtype, device),
            device: device.clone(),
            quant: QuantConfig::default(),
        })
    }

    /// The blocks' linear weights are quantized as `quant` says as they are read.
    pub fn with_quantization(mut self, quant: QuantConfig) -> Self {
        self.quant = quant;
        self
    }

    /// The weight `name` of a block's linear layer, `[out, in]` (`transposed`: stored
    /// `[in, out]`, GPT-2's Conv1D): in the matrices' dtype, or quantized from it (as
    /// bitsandbytes quantizes the weight transformers loaded) when the load is quantized.
    /// One tensor is read, converted and quantized at a time, so a quantized load never holds
    /// the full-precision model. The embedding, norms and output head are read by
    /// [`WeightFiles::get`] and stay in the model's dtype.
    pub fn block_linear(
        &self,
        name: &str,
        shape: [usize; 2],
        transposed: bool,
    ) -> Result<LinearWeight> {
        let w = if transposed {
            self.get(name, &[shape[1], shape[0]])?.t()?.contiguous()?
        } else {
            self.get(name, &shape)?
        };
        Ok(LinearWeight::from_tensor(w, self.quant)?)
    }

    /// The quantization of the blocks' linear weights.
    pub fn quantization(&self) -> QuantConfig {
        self.quant
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The dtype activations (and vectors) are in: what the model computes in.
    pub fn dtype(&self) -> DType {
        self.activation
    }

    /// The dtype matrices are stored in: what was asked for.
    pub fn weight_dtype(&self) -> DType {
        self.weights
    }

    /// The dtype a tensor of `rank` is kept in.
    fn dtype_for(&self, rank: usize) -> DType {
        if rank >= 2 {
            self.weights
        } else {
            self.activation
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads `name`, checks its shape, converts to the dtype of its rank.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_raw(name, |_, rank| self.dtype_for(rank))?;
        if t.dims() != shape {
            return Err(PolicyError::ShapeMismatch {
                path: self.path_of(name),
                key: name.to_string(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Loads `name` whatever its shape, converted to the dtype of its rank.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        self.get_raw(name, |_, rank| self.dtype_for(rank))
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
            Some(&i) => self.shards[i].path.clone(),
            None => self.describe.clone(),
        }
    }

    fn get_raw(&self, name: &str, target: impl Fn(DType, usize) -> DType) -> Result<Tensor> {
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
        let shard = &self.shards[i];
        shard
            .load(name, &self.device, target)
            .map_err(|e| PolicyError::Safetensors {
                path: shard.path.clone(),
                msg: format!("tensor `{name}`: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading a tensor into another float dtype a chunk at a time gives candle's own
    /// conversion of the whole tensor, bit for bit: f32 → bf16 / f16, and bf16 / f16 → f32
    /// (a file written here in half precision), a chunk boundary inside the tensor included.
    #[test]
    fn chunked_conversion_equals_candles_to_dtype() {
        let dev = Device::Cpu;
        let n = CONVERT_CHUNK + 1000;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 10007) as f32 - 5003.0) * 1.37e-3)
            .collect();
        let t = Tensor::from_vec(v, (n / 8, 8), &dev).unwrap();
        let dir = std::env::temp_dir().join(format!("rlft-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // bf16 and f16 widen to f32 exactly and one-to-one (finite values), so the f32 bits
        // tell any two tensors of these dtypes apart bit for bit.
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        for (stored, kept) in [
            (DType::F32, DType::BF16),
            (DType::F32, DType::F16),
            (DType::BF16, DType::F32),
            (DType::F16, DType::F32),
        ] {
            let file = t.to_dtype(stored).unwrap();
            let map = HashMap::from([("w".to_string(), file.clone())]);
            candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
            let w = WeightFiles::open(&dir, kept, &dev).unwrap();
            let got = w.get("w", &[n / 8, 8]).unwrap();
            assert_eq!(got.dtype(), kept);
            assert_eq!(
                bits(&got),
                bits(&file.to_dtype(kept).unwrap()),
                "{stored:?} → {kept:?}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
