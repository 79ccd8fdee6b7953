//! A randomly initialised model from a `config.json` (Llama family), as transformers'
//! `_init_weights` does it: linear and embedding weights ~ N(0, initializer_range), biases
//! 0, norm weights 1. Used to train a model from scratch (`rlft init`).

use crate::error::{PolicyError, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// `n` draws of N(0, std²) (Box–Muller) from a seeded generator.
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// Tensors (names and shapes as transformers writes them) for a `llama` config.
pub fn random_llama(cfg: &Value, cfg_path: &Path, seed: u64) -> Result<HashMap<String, Tensor>> {
    let get = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| PolicyError::config(cfg_path, k, "missing or not an integer"))
    };
    if cfg.get("model_type").and_then(Value::as_str) != Some("llama") {
        return Err(PolicyError::config(
            cfg_path,
            "model_type",
            "random initialisation supports \"llama\"",
        ));
    }
    let (v, h, inter, layers, heads) = (
        get("vocab_size")?,
        get("hidden_size")?,
        get("intermediate_size")?,
        get("num_hidden_layers")?,
        get("num_attention_heads")?,
    );
    let kv = get("num_key_value_heads").unwrap_or(heads);
    let hd = cfg
        .get("head_dim")
        .and_then(Value::as_u64)
        .map_or(h / heads, |x| x as usize);
    let std = cfg
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02);
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    let mut mat = |name: String, rows: usize, cols: usize, rng: &mut ChaCha8Rng| -> Result<()> {
        out.insert(
            name,
            Tensor::from_vec(normal(rng, rows * cols, std), (rows, cols), &dev)?,
        );
        Ok(())
    };
    mat("model.embed_tokens.weight".into(), v, h, &mut rng)?;
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        mat(
            format!("{p}.self_attn.q_proj.weight"),
            heads * hd,
            h,
            &mut rng,
        )?;
        mat(format!("{p}.self_attn.k_proj.weight"), kv * hd, h, &mut rng)?;
        mat(format!("{p}.self_attn.v_proj.weight"), kv * hd, h, &mut rng)?;
        mat(
            format!("{p}.self_attn.o_proj.weight"),
            h,
            heads * hd,
            &mut rng,
        )?;
        mat(format!("{p}.mlp.gate_proj.weight"), inter, h, &mut rng)?;
        mat(format!("{p}.mlp.up_proj.weight"), inter, h, &mut rng)?;
        mat(format!("{p}.mlp.down_proj.weight"), h, inter, &mut rng)?;
    }
    if !tied {
        mat("lm_head.weight".into(), v, h, &mut rng)?;
    }
    let ones = Tensor::ones(h, candle_core::DType::F32, &dev)?;
    for i in 0..layers {
        out.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            ones.clone(),
        );
        out.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            ones.clone(),
        );
    }
    out.insert("model.norm.weight".into(), ones);
    Ok(out)
}

/// Writes `dir/config.json` (from `cfg`) and a random `model.safetensors`.
pub fn write_random_llama(cfg: &Value, cfg_path: &Path, seed: u64, dir: &Path) -> Result<()> {
    let tensors = random_llama(cfg, cfg_path, seed)?;
    std::fs::create_dir_all(dir).map_err(|e| PolicyError::io(dir, e))?;
    let text = serde_json::to_string_pretty(cfg).expect("JSON value serialises");
    crate::fsutil::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &p).map_err(|e| PolicyError::Safetensors {
        path: p.clone(),
        msg: e.to_string(),
    })
}
