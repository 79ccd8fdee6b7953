//! Issue 13's real-size workloads, on any shape (by default Qwen2.5-0.5B's):
//!
//! - **W5**, one SFT step: forward + backward of the token-mean NLL over B × T tokens (the
//!   SFT loss, [`crate::sft::nll_sum`]) and AdamW on the LoRA parameters (r=16, α=32, every
//!   linear layer but the head), as `rlft sft` takes it; B=4, T=256 by default.
//! - **W6**, generation: B=8 prompts of 16 random tokens, 64 new tokens each, sampling at
//!   temperature 1 with the KV cache, the base model (no adapter, as transformers'
//!   `generate` on the plain model); new tokens per second.
//!
//! `scripts/scale_bench.py` is the PyTorch twin (transformers + PEFT) and
//! `scripts/side_by_side_scale.sh` runs both on the same model folder.

use crate::train::grads::GradAccumulator;
use crate::train::optimizer::{Optimizer, OptimizerKind};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlft_policies::backward::backward_from_hidden;
use rlft_policies::ops::flash_attention;
use rlft_policies::quant::QuantConfig;
use rlft_policies::{
    generate, Adapter, BatchInput, CausalLm, ForwardCtx, GenerationConfig, LoraConfig, Pretrained,
    SamplingParams, Targets,
};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

use super::{median, random_ids};

/// W6's prompt length.
pub const W6_PROMPT_LEN: usize = 16;

/// W5's adapter: r=16, α=32 on every linear layer but the head (PEFT's "all-linear").
pub fn w5_lora() -> LoraConfig {
    LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        target_modules: Targets::all_linear(),
        ..LoraConfig::default()
    }
}

/// Whether this build can run W5 with gradient checkpointing.
pub const GRADIENT_CHECKPOINTING: bool = true;

pub const CHECKPOINTING_UNAVAILABLE: &str = "gradient checkpointing is not available in this build";

/// The token-mean SFT loss and its gradients, as `rlft sft` computes them
/// ([`backward_from_hidden`], whole or with per-block recompute); the forward's seconds
/// when it is a phase of its own (not with checkpointing, where the backward recomputes it).
fn loss_and_grads(
    model: &dyn CausalLm,
    input: &BatchInput,
    w: &Tensor,
    n: usize,
    ctx: &ForwardCtx,
    checkpointing: bool,
    params: &[(String, Var)],
) -> Result<(f64, Vec<Tensor>, Option<f64>)> {
    let dev = &model.info().device;
    let mut acc = GradAccumulator::new(params.len());
    let mut loss = f64::NAN;
    let t0 = Instant::now();
    let mut fwd = None;
    backward_from_hidden::<anyhow::Error>(
        model,
        input,
        ctx,
        checkpointing,
        &mut |hidden| {
            let l = (crate::sft::nll_from_hidden(model, input, hidden, w, ctx)? / n.max(1) as f64)?;
            loss = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            dev.synchronize()?;
            if !checkpointing {
                fwd = Some(t0.elapsed().as_secs_f64());
            }
            Ok(l)
        },
        &mut |grads| acc.add(params, grads),
    )?;
    Ok((loss, acc.finish(params)?, fwd))
}

/// W5: `warmup` + `steps` SFT steps of B × T random tokens; the median of the measured ones.
#[allow(clippy::too_many_arguments)]
pub fn w5(
    dir: &Path,
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    checkpointing: bool,
    dev: &Device,
    dtype: DType,
    quant: QuantConfig,
) -> Result<Value> {
    if checkpointing && !GRADIENT_CHECKPOINTING {
        bail!(CHECKPOINTING_UNAVAILABLE);
    }
    if t < 2 {
        bail!("W5 needs sequences of at least 2 tokens");
    }
    let rss_before =
        crate::train::memory::proc_kb("/proc/self/status", "VmRSS:").unwrap_or(0) << 10;
    let t_load = Instant::now();
    let pre = Pretrained::load_quantized(dir, dtype, quant, dev)?;
    let model = pre.model.as_ref();
    let vocab = model.info().vocab_size;
    let adapter = Adapter::new(model, w5_lora(), 0)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let params = adapter.named_vars();
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    // What the memory check would predict for this step: the process before loading, the
    // weights, and `training_bytes` (activations, logits, trainable state).
    let estimate = rss_before
        + crate::train::memory::weight_bytes(model)
        + crate::train::memory::training_bytes(model, b, t, trainable, checkpointing);
    // torch.optim.AdamW's defaults (the twin's optimizer), lr 1e-4.
    let mut opt = Optimizer::new(
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        params.clone(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows = random_ids(&mut rng, b, t, vocab);
    let input = BatchInput::left_padded(&rows, 0, dev)?;
    let n = b * (t - 1);
    let w = Tensor::ones((b, t - 1), DType::F32, dev)?;
    let ctx = ForwardCtx::train(Some(&adapter), None);
    let (mut total, mut tf, mut tb, mut to) = (vec![], vec![], vec![], vec![]);
    let mut attention = vec![];
    let mut last_loss = f64::NAN;
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let kernel0 = flash_attention::kernel_seconds();
        let (loss, g, fwd) = loss_and_grads(model, &input, &w, n, &ctx, checkpointing, &params)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        opt.apply(&g, 1e-4)?;
        dev.synchronize()?;
        let t2 = Instant::now();
        last_loss = loss;
        if i >= warmup {
            total.push((t2 - t0).as_secs_f64());
            attention.push(flash_attention::kernel_seconds() - kernel0);
            if let Some(f) = fwd {
                tf.push(f);
                tb.push((t1 - t0).as_secs_f64() - f);
            }
            to.push((t2 - t1).as_secs_f64());
        }
    }
    if total.is_empty() {
        bail!("W5 needs at least one measured step");
    }
    let s = median(total.clone());
    let mut phases = json!({"adamw": median(to)});
    // The fused attention's time (forwards, recomputes, backwards) where it runs.
    let fused = flash_attention::uses_fused_attention(dev, t, t);
    if fused {
        phases["attention"] = json!(median(attention));
    }
    if !tf.is_empty() {
        phases["forward"] = json!(median(tf));
        phases["backward"] = json!(median(tb));
    }
    Ok(json!({
        "workload": "W5", "seconds_per_step": s, "tokens_per_s": (b * t) as f64 / s,
        "samples_per_s": b as f64 / s, "steps_s": total, "phases": phases, "batch": b, "seq": t,
        "attention": if fused { "fused" } else { "composed" },
        "attention_share": if fused { json!(phases["attention"].as_f64().unwrap_or(0.0) / s) } else { Value::Null },
        "gradient_checkpointing": checkpointing, "trainable_params": trainable,
        "loss": last_loss, "load_s": load_s,
        "memory_estimate_mb": estimate as f64 / (1u64 << 20) as f64,
    }))
}

/// W6: B prompts of 16 random tokens, `new` sampled tokens each with the KV cache, the base
/// model; `warmup` calls, then the median of `reps`.
#[allow(clippy::too_many_arguments)]
pub fn w6(
    dir: &Path,
    b: usize,
    new: usize,
    warmup: usize,
    reps: usize,
    dev: &Device,
    dtype: DType,
    quant: QuantConfig,
) -> Result<Value> {
    let t_load = Instant::now();
    let pre = Pretrained::load_quantized(dir, dtype, quant, dev)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let model = pre.model.as_ref();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let prompts = random_ids(&mut rng, b, W6_PROMPT_LEN, model.info().vocab_size);
    let mut times = Vec::new();
    for i in 0..warmup + reps {
        let cfg = GenerationConfig {
            max_new_tokens: new,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: None,
                top_p: None,
            },
            seed: i as u64,
            stop_ids: vec![],
            pad_id: 0,
            use_cache: true,
        };
        let t0 = Instant::now();
        let g = generate(model, None, &prompts, &cfg)?;
        let secs = t0.elapsed().as_secs_f64();
        let made: usize = g.iter().map(|x| x.completion_ids.len()).sum();
        if made != b * new {
            bail!("W6 made {made} tokens, expected {}", b * new);
        }
        if i >= warmup {
            times.push(secs);
        }
    }
    if times.is_empty() {
        bail!("W6 needs at least one measured call");
    }
    let s = median(times.clone());
    Ok(json!({
        "workload": "W6", "seconds_per_step": s, "tokens_per_s": (b * new) as f64 / s,
        "samples_per_s": b as f64 / s, "ms_per_decode_step": 1000.0 * s / new as f64,
        "steps_s": times, "batch": b, "prompt_len": W6_PROMPT_LEN, "new_tokens": new, "load_s": load_s,
    }))
}
