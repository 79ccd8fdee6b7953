//! An adapter is data: a map from module path to its (A, B) pair. Enabling, disabling,
//! merging and saving are operations on that map; the base weights are never copied.

use super::config::{peft_config_json, read_peft_config, LoraConfig, LoraInit, HEAD_MODULES};
use crate::ctx::ForwardCtx;
use crate::error::{PolicyError, Result};
use crate::families::CausalLm;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// PEFT's prefix for a causal LM: `base_model.model.<module path>.lora_A.weight`.
const PEFT_PREFIX: &str = "base_model.model.";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// One adapted module: `A` [r, in] and `B` [out, r], kept in f32 (PEFT's
/// `autocast_adapter_dtype`), whatever the dtype of the base.
#[derive(Debug)]
pub struct LoraModule {
    pub a: Var,
    pub b: Var,
}

impl LoraModule {
    /// `scale · B A dropout(x)` for `x` [n, in] → [n, out], in f32.
    pub(crate) fn delta(
        &self,
        x: &Tensor,
        scale: f64,
        p: f64,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let (a, b) = (ctx.param(self.a.as_tensor()), ctx.param(self.b.as_tensor()));
        let mut x = x.to_dtype(a.dtype())?;
        if let Some(mask) = ctx.dropout_mask(p, x.elem_count()) {
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
            x = (x * mask)?;
        }
        let xa = crate::ops::gemm::bmm(&x, &a.t()?)?;
        crate::ops::gemm::bmm(&xa, &b.t()?)? * scale
    }
}

#[derive(Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    modules: BTreeMap<String, LoraModule>,
    /// Modules trained in full and saved whole (PEFT's `modules_to_save`): a reward model's
    /// `score` head `[num_labels, hidden]`, f32. With one, the adapter is PEFT's `SEQ_CLS`.
    heads: BTreeMap<String, Var>,
}

/// `dir/adapter_config.json`: the LoRA configuration and the `modules_to_save` names.
fn read_config_file(dir: &Path) -> Result<(LoraConfig, Vec<String>)> {
    if !dir.is_dir() {
        return Err(PolicyError::MissingFolder(dir.to_path_buf()));
    }
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        return Err(PolicyError::MissingFile {
            path: cfg_path,
            what: "PEFT adapter configuration".into(),
        });
    }
    read_peft_config(&cfg_path)
}

/// Adapter weights are f32 (PEFT's `autocast_adapter_dtype`) on an f32/bf16/f16 base, and
/// f64 on an f64 base.
fn adapter_dtype(model: &dyn CausalLm) -> DType {
    crate::ops::compute_dtype(model.info().dtype)
}

fn var_from(t: Tensor, dtype: DType) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
}

impl Adapter {
    /// A fresh adapter on every module of `model` that `config.target_modules` selects:
    /// A drawn as PEFT does (seeded), B = 0.
    pub fn new(model: &dyn CausalLm, mut config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dev = model.info().device.clone();
        let head = model.info().output_head.clone();
        let dtype = adapter_dtype(model);
        let mut modules = BTreeMap::new();
        for lin in model.linears() {
            if !config.target_modules.matches(&lin.path, lin.path == head)? {
                continue;
            }
            config.fan_in_fan_out |= lin.conv1d;
            let (out, inp, r) = (lin.out_features(), lin.in_features(), config.r);
            let a: Vec<f32> = match config.init {
                LoraInit::Default => {
                    let bound = 1.0 / (inp as f64).sqrt();
                    (0..r * inp)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                }
                LoraInit::Gaussian => {
                    let std = 1.0 / r as f64;
                    (0..r * inp)
                        .map(|_| (gaussian(&mut rng) * std) as f32)
                        .collect()
                }
            };
            modules.insert(
                lin.path.clone(),
                LoraModule {
                    a: var_from(Tensor::from_vec(a, (r, inp), &dev)?, dtype)?,
                    b: Var::zeros((out, r), dtype, &dev)?,
                },
            );
        }
        if modules.is_empty() {
            let names: Vec<_> = model
                .linears()
                .iter()
                .map(|l| l.path.clone())
                .take(8)
                .collect();
            return Err(PolicyError::InvalidArgument(format!(
                "target_modules {:?} selects no module of this {} model; its linear modules include {}",
                config.target_modules,
                model.info().model_type,
                names.join(", ")
            )));
        }
        Ok(Self {
            config,
            modules,
            heads: BTreeMap::new(),
        })
    }

    /// Adds (or replaces) a head trained in full, e.g. `score`: a sequence-classification
    /// adapter from then on.
    pub fn set_head(&mut self, name: &str, weight: Var) -> Result<()> {
        if !HEAD_MODULES.contains(&name) {
            return Err(PolicyError::InvalidArgument(format!(
                "head `{name}`: PEFT saves only {} whole for sequence classification",
                HEAD_MODULES.join(", ")
            )));
        }
        self.heads.insert(name.to_string(), weight);
        Ok(())
    }

    /// A head trained in full (`score`), if the adapter has one.
    pub fn head(&self, name: &str) -> Option<&Var> {
        self.heads.get(name)
    }

    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    pub fn module(&self, path: &str) -> Option<&LoraModule> {
        self.modules.get(path)
    }

    pub fn modules(&self) -> impl Iterator<Item = (&String, &LoraModule)> {
        self.modules.iter()
    }

    /// Trainable variables with their PEFT key names, in a stable order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::with_capacity(self.modules.len() * 2);
        for (path, m) in &self.modules {
            out.push((format!("{PEFT_PREFIX}{path}.lora_A.weight"), m.a.clone()));
            out.push((format!("{PEFT_PREFIX}{path}.lora_B.weight"), m.b.clone()));
        }
        for (name, w) in &self.heads {
            out.push((format!("{PEFT_PREFIX}{name}.weight"), w.clone()));
        }
        out
    }

    /// Leaf names of the adapted modules (`q_proj`, …), as PEFT records `target_modules`.
    pub fn target_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .modules
            .keys()
            .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// A PEFT adapter folder's configuration alone (e.g. its `base_model_name_or_path`,
    /// before the base is loaded), checked as [`Self::load`] checks it.
    pub fn read_config(dir: &Path) -> Result<LoraConfig> {
        Ok(read_config_file(dir)?.0)
    }

    /// Reads a PEFT adapter folder and checks it against `model`: every key names a linear
    /// module of the model and every shape fits it.
    pub fn load(dir: &Path, model: &dyn CausalLm) -> Result<Self> {
        let (config, modules_to_save) = read_config_file(dir)?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        if !w_path.is_file() {
            let what = if dir.join("adapter_model.bin").is_file() {
                "adapter weights in safetensors format (only adapter_model.bin found)"
            } else {
                "adapter weights"
            };
            return Err(PolicyError::MissingFile {
                path: w_path,
                what: what.into(),
            });
        }
        let dev = model.info().device.clone();
        let tensors = candle_core::safetensors::load(&w_path, &dev).map_err(|e| {
            PolicyError::Safetensors {
                path: w_path.clone(),
                msg: e.to_string(),
            }
        })?;
        let linears: HashMap<&str, (usize, usize)> = model
            .linears()
            .into_iter()
            .map(|l| (l.path.as_str(), (l.out_features(), l.in_features())))
            .collect();
        let mismatch = |msg: String| PolicyError::AdapterMismatch {
            path: w_path.clone(),
            msg,
        };
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut heads = BTreeMap::new();
        let hidden = model.info().hidden_size;
        // Sorted, so the first error reported is always the same one.
        let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        for (key, t) in tensors {
            let norm = key.replace(".default.weight", ".weight");
            let rest = norm.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
                mismatch(format!("key `{key}` does not start with `{PEFT_PREFIX}`"))
            })?;
            // A head saved whole: `score.weight` (PEFT ≥ 0.14), `score.modules_to_save.weight`
            // (older PEFT names are normalised the same way).
            let head = rest
                .strip_suffix(".weight")
                .map(|h| h.strip_suffix(".modules_to_save").unwrap_or(h))
                .filter(|h| modules_to_save.iter().any(|m| m == h));
            if let Some(h) = head {
                if t.dims().len() != 2 || t.dims()[1] != hidden {
                    // [num_labels, hidden]: the first dimension is the file's to choose.
                    let labels = t.dims().first().copied().unwrap_or(1);
                    return Err(PolicyError::ShapeMismatch {
                        path: w_path.clone(),
                        key: key.clone(),
                        got: t.dims().to_vec(),
                        expected: vec![labels, hidden],
                    });
                }
                heads.insert(h.to_string(), Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                continue;
            }
            let (path, which) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
                (p, 'A')
            } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
                (p, 'B')
            } else {
                return Err(mismatch(format!(
                    "key `{key}` is not a LoRA A/B weight (lora_A.weight / lora_B.weight)"
                )));
            };
            let Some(&(out, inp)) = linears.get(path) else {
                return Err(mismatch(format!(
                    "key `{key}`: this {} model has no linear module `{path}` (an adapter for another architecture?)",
                    model.info().model_type
                )));
            };
            let expected = if which == 'A' {
                vec![config.r, inp]
            } else {
                vec![out, config.r]
            };
            if t.dims() != expected.as_slice() {
                return Err(PolicyError::ShapeMismatch {
                    path: w_path.clone(),
                    key: key.clone(),
                    got: t.dims().to_vec(),
                    expected,
                });
            }
            let e = pairs.entry(path.to_string()).or_default();
            if which == 'A' {
                e.0 = Some(t);
            } else {
                e.1 = Some(t);
            }
        }
        let dtype = adapter_dtype(model);
        let mut modules = BTreeMap::new();
        for (path, (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(mismatch(format!(
                    "module `{path}` has only one of lora_A / lora_B"
                )));
            };
            modules.insert(
                path,
                LoraModule {
                    a: var_from(a, dtype)?,
                    b: var_from(b, dtype)?,
                },
            );
        }
        if modules.is_empty() {
            return Err(mismatch("no LoRA weights in the file".into()));
        }
        if let Some(m) = modules_to_save
            .iter()
            .find(|m| !heads.contains_key(*m) && m.as_str() == "score")
        {
            return Err(mismatch(format!(
                "adapter_config.json lists `{m}` in modules_to_save but the file has no `{PEFT_PREFIX}{m}.weight`"
            )));
        }
        Ok(Self {
            config,
            modules,
            heads,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT does; each file
    /// goes to a temporary name first and is renamed into place.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| PolicyError::io(dir, e))?;
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        let tmp = dir.join(format!(".{ADAPTER_WEIGHTS}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp).map_err(|e| PolicyError::Safetensors {
            path: tmp.clone(),
            msg: e.to_string(),
        })?;
        std::fs::rename(&tmp, &w_path).map_err(|e| PolicyError::io(&w_path, e))?;
        let json = peft_config_json(
            &self.config,
            self.target_names(),
            self.heads.keys().cloned().collect(),
        );
        let text = serde_json::to_string_pretty(&json).expect("JSON value serialises");
        crate::fsutil::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Folds the adapter into `model`'s base weights: `W ← W + scale · B A`.
    pub fn merge_into(&self, model: &mut dyn CausalLm) -> Result<()> {
        let scale = self.scale();
        let mut done = 0;
        for lin in model.linears_mut() {
            if let Some(m) = self.modules.get(&lin.path) {
                lin.merge(m.a.as_tensor(), m.b.as_tensor(), scale)?;
                done += 1;
            }
        }
        if done != self.modules.len() {
            return Err(PolicyError::InvalidArgument(format!(
                "merged {done} of {} adapter modules: the adapter does not fit this model",
                self.modules.len()
            )));
        }
        Ok(())
    }
}

/// A standard normal draw (Box–Muller), so initialisation depends only on our seeded RNG.
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
