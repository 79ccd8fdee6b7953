//! The bench models' shapes: the built-in ones (`small`, `gpu`, `qwen2.5-0.5b`) or any
//! `config.json` of a family rlft loads, and the seeded random model written for a shape.
//!
//! A shape *is* its `config.json`: the built-ins are written out as one, a `--shape PATH`
//! reads one, and the parameter and FLOP counts are read from it, so every architecture is
//! measured the same way.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOKENIZER_JSON: &str = include_str!("../../tests/fixtures/_tokenizer/tokenizer.json");
const TOKENIZER_CONFIG: &str =
    include_str!("../../tests/fixtures/_tokenizer/tokenizer_config.json");

/// The built-in shape names, as `--shape` accepts them.
pub const BUILT_IN: &[&str] = &["small", "gpu", "qwen2.5-0.5b"];

/// The model families whose random weights the bench can write (the Llama weight layout).
const RANDOM_FAMILIES: &[&str] = &["llama", "mistral", "qwen2"];

/// A bench model: its `config.json` and the workloads' default sizes at that size.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// A built-in name, or the `config.json` path it was read from.
    pub name: String,
    /// The model's `config.json`.
    pub config: Value,
    /// Default (B, T) of W1 and (B, new tokens) of W2 at this shape.
    pub w1: (usize, usize),
    pub w2: (usize, usize),
}

/// The sizes of a rotary decoder (Llama layout), read from a `config.json`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub tied: bool,
    /// Biases on q, k, v (Qwen2; Llama's `attention_bias`), on o (Llama's
    /// `attention_bias`) and on gate, up, down (Llama's `mlp_bias`).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
}

fn llama_config(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "hidden_act": "silu", "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    })
}

/// Qwen2.5-0.5B's `config.json` with its exact sizes (the numbers of
/// `../shared/peer/scale/make_model.py`, i.e. transformers' `Qwen2Config` with these keys;
/// token ids are the fixture tokenizer's). `initializer_range` 0.02 as transformers uses to
/// initialise it: logits stay finite through 24 layers.
pub fn qwen2_config(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28,
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": true
    })
}

impl Shape {
    /// The "small" Llama: hidden 256, 4 layers, 8 heads, 4 KV heads, intermediate 688, vocab 512.
    pub fn small() -> Shape {
        Shape {
            name: "small".into(),
            config: llama_config(256, 4, 8, 4, 688, 512),
            w1: (8, 64),
            w2: (8, 64),
        }
    }

    /// The GPU-sized Llama of issue 7 (KV heads = heads / 2, as in the small one).
    pub fn gpu() -> Shape {
        Shape {
            name: "gpu".into(),
            config: llama_config(1024, 8, 16, 8, 2816, 32000),
            w1: (8, 256),
            w2: (64, 128),
        }
    }

    /// Qwen2.5-0.5B's exact shape (494 M parameters; issue 13's W5 and W6).
    pub fn qwen2_5_0_5b() -> Shape {
        Shape {
            name: "qwen2.5-0.5b".into(),
            config: qwen2_config(896, 24, 14, 2, 4864, 151_936),
            w1: (4, 256),
            w2: (8, 64),
        }
    }

    /// A built-in name, or a path to a `config.json` (of a family in [`RANDOM_FAMILIES`]).
    pub fn parse(s: &str) -> Result<Shape> {
        match s {
            "small" => Ok(Shape::small()),
            "gpu" => Ok(Shape::gpu()),
            "qwen2.5-0.5b" => Ok(Shape::qwen2_5_0_5b()),
            _ if s.ends_with(".json") || Path::new(s).is_file() => Shape::from_config(Path::new(s)),
            _ => bail!(
                "unknown shape `{s}`; expected {} or a path to a model's config.json",
                BUILT_IN.join(", ")
            ),
        }
    }

    /// The shape of the model whose `config.json` is at `path`.
    pub fn from_config(path: &Path) -> Result<Shape> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the shape's config {}", path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let shape = Shape {
            name: path.display().to_string(),
            config,
            w1: (4, 256),
            w2: (8, 64),
        };
        shape.dims()?;
        Ok(shape)
    }

    /// The shape of a model folder's `config.json`, for any family rlft loads (its
    /// counts are known for the Llama-layout ones only: [`Shape::counts`]).
    pub fn of_model_dir(dir: &Path) -> Result<Shape> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the model's config {}", path.display()))?;
        Ok(Shape {
            name: dir.display().to_string(),
            config: serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?,
            w1: (4, 256),
            w2: (8, 64),
        })
    }

    /// (all parameters, linear-layer parameters) when the family's layout is known.
    pub fn counts(&self) -> Option<(usize, usize)> {
        self.dims()
            .ok()
            .map(|_| (self.param_count(), self.linear_params()))
    }

    pub fn model_type(&self) -> &str {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("?")
    }

    /// The sizes in the config (errors name the missing key and the families accepted).
    pub fn dims(&self) -> Result<Dims> {
        let c = &self.config;
        let mt = self.model_type();
        if !RANDOM_FAMILIES.contains(&mt) {
            bail!(
                "{}: model_type `{mt}`; the bench counts and writes {} (Llama-layout) models",
                self.name,
                RANDOM_FAMILIES.join(", ")
            );
        }
        let get = |k: &str| -> Result<usize> {
            c.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("{}: `{k}` missing or not an integer", self.name))
        };
        let flag = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
        let (hidden, heads) = (get("hidden_size")?, get("num_attention_heads")?);
        if heads == 0 {
            bail!("{}: num_attention_heads is 0", self.name);
        }
        let llama = mt == "llama";
        Ok(Dims {
            vocab: get("vocab_size")?,
            hidden,
            layers: get("num_hidden_layers")?,
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim: get("head_dim").unwrap_or(hidden / heads),
            intermediate: get("intermediate_size")?,
            tied: flag("tie_word_embeddings"),
            qkv_bias: mt == "qwen2" || llama && flag("attention_bias"),
            o_bias: llama && flag("attention_bias"),
            mlp_bias: llama && flag("mlp_bias"),
        })
    }

    /// Parameters of every linear layer's weight incl. the output head (tied or not: it is
    /// a product either way), not the embedding lookup.
    pub fn linear_params(&self) -> usize {
        let d = self.dims().expect("checked when the shape was made");
        let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let attn = 2 * d.hidden * q + 2 * d.hidden * kv;
        let mlp = 3 * d.hidden * d.intermediate;
        d.layers * (attn + mlp) + d.hidden * d.vocab
    }

    /// Every distinct parameter: embedding, blocks (weights, biases, norms), final norm and
    /// an untied head (Qwen2.5-0.5B: 494,032,768).
    pub fn param_count(&self) -> usize {
        let d = self.dims().expect("checked when the shape was made");
        let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let mut block = 2 * d.hidden * q + 2 * d.hidden * kv + 3 * d.hidden * d.intermediate;
        block += 2 * d.hidden; // the two norms
        if d.qkv_bias {
            block += q + 2 * kv;
        }
        if d.o_bias {
            block += d.hidden;
        }
        if d.mlp_bias {
            block += 2 * d.intermediate + d.hidden;
        }
        let head = if d.tied { 0 } else { d.vocab * d.hidden };
        d.vocab * d.hidden + d.layers * block + d.hidden + head
    }

    /// The scratch folder's name for this shape's random model (a hash of the config, so a
    /// changed config never reuses an old folder).
    pub fn folder_name(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.config.to_string().hash(&mut h);
        let base: String = if BUILT_IN.contains(&self.name.as_str()) {
            self.name.clone()
        } else {
            "config".into()
        };
        format!("{}-{base}-{:08x}", self.model_type(), h.finish() as u32)
    }

    /// The random weights of this shape, as transformers names and lays them out:
    /// N(0, initializer_range) linears and embedding, unit norms, zero biases.
    pub fn random_weights(&self, seed: u64) -> Result<HashMap<String, Tensor>> {
        let d = self.dims()?;
        // The Llama initialiser writes the shared layout; the biases are added here.
        let mut cfg = self.config.clone();
        cfg["model_type"] = json!("llama");
        let mut t = rlft_policies::init::random_llama(&cfg, Path::new(&self.name), seed)?;
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu);
        let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        for i in 0..d.layers {
            let p = format!("model.layers.{i}");
            if d.qkv_bias {
                t.insert(format!("{p}.self_attn.q_proj.bias"), zeros(q)?);
                t.insert(format!("{p}.self_attn.k_proj.bias"), zeros(kv)?);
                t.insert(format!("{p}.self_attn.v_proj.bias"), zeros(kv)?);
            }
            if d.o_bias {
                t.insert(format!("{p}.self_attn.o_proj.bias"), zeros(d.hidden)?);
            }
            if d.mlp_bias {
                t.insert(format!("{p}.mlp.gate_proj.bias"), zeros(d.intermediate)?);
                t.insert(format!("{p}.mlp.up_proj.bias"), zeros(d.intermediate)?);
                t.insert(format!("{p}.mlp.down_proj.bias"), zeros(d.hidden)?);
            }
        }
        Ok(t)
    }

    /// Writes `dir/config.json`, a seeded random `model.safetensors` (f32) and the fixture
    /// tokenizer (the workloads feed token ids directly, so the tokenizer's smaller
    /// vocabulary does not matter). transformers loads the folder as it is.
    pub fn write_model(&self, dir: &Path) -> Result<()> {
        let tensors = self.random_weights(0)?;
        std::fs::create_dir_all(dir)?;
        let p = dir.join("model.safetensors");
        let tmp = dir.join("model.safetensors.partial");
        candle_core::safetensors::save(&tensors, &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(tensors);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config)?,
        )?;
        std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON)?;
        std::fs::write(dir.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }
}

/// The folder holding this shape's random model under `work` (not written here).
pub fn model_dir(work: &Path, shape: &Shape) -> PathBuf {
    work.join(shape.folder_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_names_parse() {
        for n in BUILT_IN {
            assert_eq!(Shape::parse(n).unwrap().name, *n);
        }
        let q = Shape::parse("qwen2.5-0.5b").unwrap();
        assert_eq!(q.model_type(), "qwen2");
        let d = q.dims().unwrap();
        assert_eq!(
            (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim),
            (896, 24, 14, 2, 64)
        );
        assert_eq!((d.intermediate, d.vocab), (4864, 151_936));
        assert!(d.tied && d.qkv_bias && !d.o_bias && !d.mlp_bias);
        assert_eq!(q.config["rope_parameters"]["rope_theta"], 1e6);
    }

    #[test]
    fn a_bad_shape_names_what_is_accepted() {
        let e = Shape::parse("huge").unwrap_err().to_string();
        assert!(e.contains("unknown shape `huge`"), "{e}");
        for n in BUILT_IN {
            assert!(e.contains(n), "{e}");
        }
        assert!(e.contains("config.json"), "{e}");
        let e = Shape::parse("/nonexistent/config.json").unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent/config.json"),
            "{e:#}"
        );
    }

    #[test]
    fn a_config_path_is_a_shape() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2/config.json");
        let s = Shape::parse(p.to_str().unwrap()).unwrap();
        let d = s.dims().unwrap();
        assert_eq!((d.hidden, d.layers, d.heads, d.kv_heads), (64, 2, 4, 2));
        assert!(d.tied && d.qkv_bias);
        // An architecture the bench cannot write is refused with the ones it can.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2/config.json");
        let e = Shape::parse(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("`gpt2`") && e.contains("llama, mistral, qwen2"),
            "{e}"
        );
    }

    /// Qwen2.5-0.5B by hand: embedding 151,936 × 896; per layer q, o 896 × 896, k, v 896 ×
    /// 128 (2 KV heads of 64), their biases 896 + 2 · 128, gate, up, down 896 × 4864, two
    /// norms of 896; 24 layers, the final norm; the head is tied.
    #[test]
    fn qwen_counts_match_a_hand_count() {
        let q = Shape::qwen2_5_0_5b();
        let layer = 2 * 896 * 896 + 2 * 896 * 128 + (896 + 2 * 128) + 3 * 896 * 4864 + 2 * 896;
        let total = 151_936 * 896 + 24 * layer + 896;
        assert_eq!(q.param_count(), total);
        assert_eq!(total, 494_032_768);
        let linear = 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) + 896 * 151_936;
        assert_eq!(q.linear_params(), linear);
    }

    fn scaled_down_qwen() -> Shape {
        Shape {
            name: "qwen-test".into(),
            config: qwen2_config(64, 3, 4, 2, 96, 600),
            w1: (2, 8),
            w2: (2, 4),
        }
    }

    /// The count from the config equals the built model's tensors, for the Qwen2 layout
    /// (scaled down), the small Llama, and Llama with every bias and an explicit head_dim.
    #[test]
    fn param_count_equals_the_built_tensors() {
        let mut llama = Shape::small();
        llama.config["attention_bias"] = json!(true);
        llama.config["mlp_bias"] = json!(true);
        llama.config["head_dim"] = json!(16);
        llama.config["tie_word_embeddings"] = json!(true);
        for s in [scaled_down_qwen(), Shape::small(), llama] {
            let t = s.random_weights(0).unwrap();
            let n: usize = t.values().map(|x| x.elem_count()).sum();
            assert_eq!(n, s.param_count(), "{}", s.name);
        }
    }

    /// The written folder loads as the family it names and gives finite logits.
    #[test]
    fn the_written_qwen2_loads_and_runs() {
        let dir = std::env::temp_dir().join(format!("rlft-bench-shape-{}", std::process::id()));
        let s = scaled_down_qwen();
        s.write_model(&dir).unwrap();
        let pre = rlft_policies::Pretrained::load(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(pre.model.info().model_type, "qwen2");
        let input =
            rlft_policies::BatchInput::left_padded(&[vec![3, 5, 7, 599]], 0, &Device::Cpu).unwrap();
        let logits = pre
            .model
            .forward(&input, &rlft_policies::ForwardCtx::inference(None))
            .unwrap();
        assert_eq!(logits.dims(), &[1, 4, 600]);
        let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
