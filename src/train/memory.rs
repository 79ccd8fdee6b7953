//! A rough estimate of the memory a training or generation batch needs, checked against
//! what the machine has before the first step, so an oversized `per_device_train_batch_size`
//! or `max_seq_len` fails at once with a message naming what to lower instead of being
//! killed by the OOM killer hours in. CPU only (on CUDA the allocator reports its own
//! out-of-memory error, naming the allocation).

use anyhow::{bail, Result};
use rlft_policies::candle_core::{DType, Device};
use rlft_policies::ops::flash_attention::uses_fused_attention;
use rlft_policies::ops::head_logprob::chunk_rows;
use rlft_policies::CausalLm;

/// Overrides the detected available memory (MiB): for a machine shared with other jobs.
pub const LIMIT_ENV: &str = "RLFT_MEMORY_LIMIT_MB";

/// Bytes of activations a forward + backward pass keeps for `batch` rows of `seq` tokens,
/// all f32, counted per token and layer as the ops leave them in the graph. On the CPU with
/// f32 activations (f32 or bf16 weights), where the LoRA layer (`ops::lora_linear`), SwiGLU
/// (`ops::swiglu`), the rotated heads (`ops::rope::split_heads`) and the attention
/// (`ops::flash_attention`, every pass of two tokens or more) are each one op keeping only
/// what its backward reads:
///
/// - five hidden-size vectors (the block's input, both norm outputs, the attention output,
///   the residual sum between the two halves), the attention's queries, keys and values (the
///   q, k, v widths), one log-sum-exp per head (heads ≈ hidden / 64), and three of the MLP's
///   width (gate and up outputs, their product); in the linears' terms: their outputs once,
///   plus three hidden-size vectors and one MLP width. The linears' other outputs (o, down,
///   and q, k, v before rotation) are read once and freed.
///
/// Elsewhere (CUDA, f64), where those ops are composed of candle's:
///
/// - every linear layer's output four times (base product, `xa Bᵀ`, its scaled copy, the
///   sum);
/// - six hidden-size vectors (two norm outputs, two residual sums, the rotated queries, the
///   attention output), two of the MLP's width (its activation and product), and three
///   attention rows per head (`seq` entries each: scores, masked scores, probabilities);
///
/// times 3/2 for what comes on top while the backward runs (gradients in flight, candle's
/// temporaries, freed memory the allocator keeps): measured on W5, where the kept
/// activations alone fell 32% short of the peak in f32 and in bf16. With `checkpointing`
/// the layers keep only their input (one hidden-size vector each), the last layer keeps its
/// set through the head (`policies::backward`), and one other layer's set is alive at a
/// time, twice (the recompute and its gradients). Then the final
/// norm's output and the logits, their softmax and gradient over the vocabulary (one chunk
/// of rows where the head is chunked: a frozen head on the CPU, `ops::head_logprob`), and
/// the trainable values, gradients and AdamW's two moments. Weights: [`weight_bytes`].
/// Calibrated on W5 (docs/performance.md: within 25% of the measured peak).
pub fn training_bytes(
    model: &dyn CausalLm,
    batch: usize,
    seq: usize,
    trainable: usize,
    checkpointing: bool,
) -> u64 {
    pass_bytes(model, batch, seq, trainable, checkpointing, true)
}

/// [`training_bytes`] of a pass that stops at the final hidden states (a reward model's
/// score head reads them; no vocabulary logits are made).
pub fn headless_training_bytes(
    model: &dyn CausalLm,
    batch: usize,
    seq: usize,
    trainable: usize,
    checkpointing: bool,
) -> u64 {
    pass_bytes(model, batch, seq, trainable, checkpointing, false)
}

fn pass_bytes(
    model: &dyn CausalLm,
    batch: usize,
    seq: usize,
    trainable: usize,
    checkpointing: bool,
    logits: bool,
) -> u64 {
    let info = model.info();
    let blocks: Vec<_> = model
        .linears()
        .into_iter()
        .filter(|l| l.path != info.output_head)
        .collect();
    let layers = info.num_layers.max(1);
    let h = info.hidden_size;
    let fused = info.device.is_cpu() && info.dtype == DType::F32;
    let outputs = blocks.iter().map(|l| l.out_features()).sum::<usize>() / layers;
    let width = blocks.iter().map(|l| l.out_features()).max().unwrap_or(h);
    let heads = (h / 64).max(1);
    let per_layer = if fused && uses_fused_attention(&info.device, seq, seq) {
        outputs + 3 * h + width + heads
    } else {
        outputs * 4 + 6 * h + 2 * width + 3 * heads * seq
    };
    let kept = if checkpointing {
        layers * h + 3 * per_layer
    } else {
        layers * per_layer * 3 / 2
    };
    let tokens = batch * seq;
    let chunked = info.device.is_cpu() && matches!(info.dtype, DType::F32 | DType::F64);
    let logit_rows = if !logits {
        0
    } else if chunked {
        tokens.min(chunk_rows(info.vocab_size))
    } else {
        tokens
    };
    let floats = tokens * (kept + h) + 3 * logit_rows * info.vocab_size;
    (4 * (floats + 4 * trainable)) as u64 + packed_weight_bytes(model, 2)
}

/// Bytes of the packed copies of bf16 weights that the CPU's bf16 products keep
/// (`ops::bf16_dot::cache`): each transformer weight packed for `x · Wᵀ` and, where
/// gradients flow back through it (`packings` = 2), for `dy · W` — as many bytes as the bf16
/// weight each — up to the cache's budget (`RLFT_PACK_CACHE_MB`). None without a bf16
/// engine (the weights are widened per product instead).
fn packed_weight_bytes(model: &dyn CausalLm, packings: usize) -> u64 {
    let info = model.info();
    if !info.device.is_cpu() || rlft_policies::ops::bf16_dot::engine().is_none() {
        return 0;
    }
    let bf16: usize = model
        .linears()
        .iter()
        .filter(|l| l.path != info.output_head)
        .filter_map(|l| l.weight.dense())
        .filter(|w| w.dtype() == DType::BF16)
        .map(|w| 2 * w.elem_count())
        .sum();
    (packings * bf16).min(rlft_policies::ops::bf16_dot::cache::budget()) as u64
}

/// Bytes of the model's weights as loaded: every linear layer (a tied head shares the
/// embedding's storage and is counted once, as the head) and the input embeddings when
/// untied, in their dtypes; norms are negligible. Plus, for half-precision matrices on the
/// CPU, each thread's widening buffer (`ops::half_weight::BLOCK_ELEMS` f32 values).
pub fn weight_bytes(model: &dyn CausalLm) -> u64 {
    let info = model.info();
    let bytes = |t: &rlft_policies::candle_core::Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let linears: usize = model
        .linears()
        .iter()
        .map(|l| l.weight.bytes() + l.bias.as_ref().map_or(0, bytes))
        .sum();
    let quantized = model.linears().iter().any(|l| l.weight.is_quantized());
    let embed = if info.tie_word_embeddings {
        0
    } else {
        info.vocab_size * info.hidden_size * info.weight_dtype.size_in_bytes()
    };
    let widened = quantized || matches!(info.weight_dtype, DType::BF16 | DType::F16);
    let scratch = if info.device.is_cpu() && widened {
        4 * rlft_policies::ops::half_weight::BLOCK_ELEMS
            * rlft_policies::candle_core::utils::get_num_threads()
    } else {
        0
    };
    (linears + embed + scratch) as u64
}

/// Bytes of the KV cache and last-step logits when generating `batch` rows of `seq` tokens.
pub fn generation_bytes(model: &dyn CausalLm, batch: usize, seq: usize) -> u64 {
    let info = model.info();
    let kv: usize = model
        .linears()
        .iter()
        .filter(|l| l.path.ends_with("k_proj") || l.path.ends_with("v_proj"))
        .map(|l| l.out_features())
        .sum();
    // GPT-2's fused c_attn holds q, k and v: two thirds of its output are cached.
    let kv = if kv > 0 {
        kv
    } else {
        info.num_layers * 2 * info.hidden_size
    };
    (4 * batch * (seq * kv + 2 * info.vocab_size)) as u64 + packed_weight_bytes(model, 1)
}

/// Memory this process may still use: `RLFT_MEMORY_LIMIT_MB`, else the smaller of the
/// kernel's `MemAvailable` and the cgroup's remaining allowance.
pub fn available_bytes() -> Option<u64> {
    if let Ok(v) = std::env::var(LIMIT_ENV) {
        return v.trim().parse::<u64>().ok().map(|mb| mb << 20);
    }
    let mut avail = proc_kb("/proc/meminfo", "MemAvailable:")? * 1024;
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    if let (Some(max), Some(cur)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        avail = avail.min(max.saturating_sub(cur));
    }
    Some(avail)
}

/// The value of a `Key:   N kB` line of a /proc file.
pub fn proc_kb(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Fails when `need` bytes exceed what is available; `what` describes the batch and
/// `lower` names the settings that shrink it.
/// `with_checkpointing`: the need with `training.gradient_checkpointing` on, when it is off;
/// the refusal suggests it when that would fit.
pub fn check(
    device: &Device,
    need: u64,
    with_checkpointing: Option<u64>,
    what: &str,
    lower: &str,
) -> Result<()> {
    if !matches!(device, Device::Cpu) {
        return Ok(());
    }
    match available_bytes() {
        Some(avail) => check_against(avail, need, with_checkpointing, what, lower),
        None => Ok(()),
    }
}

/// [`check`] against `avail` bytes.
fn check_against(
    avail: u64,
    need: u64,
    with_checkpointing: Option<u64>,
    what: &str,
    lower: &str,
) -> Result<()> {
    if need > avail {
        let ckpt = match with_checkpointing {
            Some(c) if c <= avail => format!(
                ", or set training.gradient_checkpointing = true (about {} then)",
                gib(c)
            ),
            _ => String::new(),
        };
        bail!(
            "{what} needs about {} of memory but only {} is available; lower {lower}{ckpt}",
            gib(need),
            gib(avail)
        );
    }
    if need > avail / 10 * 8 {
        tracing::warn!(
            "{what} needs about {} of the {} available; lower {lower} if the run is killed",
            gib(need),
            gib(avail)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Box<dyn CausalLm> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        rlft_policies::Pretrained::load(&dir, DType::F32, &Device::Cpu)
            .unwrap()
            .model
    }

    #[test]
    fn the_refusal_suggests_checkpointing_when_it_would_fit() {
        let mib = 1 << 20;
        let e = check_against(100 * mib, 150 * mib, Some(80 * mib), "a batch", "the batch")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lower the batch, or set training.gradient_checkpointing = true"),
            "{e}"
        );
        let e = check_against(
            100 * mib,
            150 * mib,
            Some(120 * mib),
            "a batch",
            "the batch",
        )
        .unwrap_err()
        .to_string();
        assert!(
            !e.contains("gradient_checkpointing"),
            "it would not fit: {e}"
        );
        assert!(check_against(100 * mib, 50 * mib, None, "a batch", "the batch").is_ok());
    }

    #[test]
    fn proc_values_are_read() {
        let total = proc_kb("/proc/meminfo", "MemTotal:").unwrap();
        let avail = proc_kb("/proc/meminfo", "MemAvailable:").unwrap();
        assert!(total > 0 && avail <= total);
        assert!(proc_kb("/proc/meminfo", "NoSuchKey:").is_none());
    }

    /// Hand count for the fixture Llama (hidden 64, 2 layers, intermediate 128, 4 heads of
    /// 16, 2 KV heads, vocab 512 — see its config.json).
    #[test]
    fn estimates_follow_the_formula() {
        let m = tiny();
        // Per layer, the CPU's fused ops in f32 (LoRA layer, SwiGLU, split heads, attention):
        // the outputs of q 64, k 32, v 32, o 64, gate 128, up 128, down 64 once, plus 3 × 64
        // hidden-size vectors and one MLP width of 128 (what the ops keep: 5 × 64, q, k, v
        // and 3 × 128), and one log-sum-exp for 64/64 = 1 head.
        let (b, t) = (4, 10);
        let layer = 512 + 3 * 64 + 128 + 1;
        // 2 layers' worth × 3/2, the final norm's 64, 3 × 512 logits.
        let per_token = 2 * layer * 3 / 2 + 64;
        assert_eq!(
            training_bytes(m.as_ref(), b, t, 100, false),
            (4 * (b * t * per_token + 3 * b * t * 512 + 400)) as u64
        );
        // Checkpointed: each layer keeps its 64-wide input; the last layer's set through the
        // head, and one other layer's set, twice.
        let per_token = 2 * 64 + 3 * layer + 64;
        assert_eq!(
            training_bytes(m.as_ref(), b, t, 100, true),
            (4 * (b * t * per_token + 3 * b * t * 512 + 400)) as u64
        );
        // Weights: the linears (lm_head untied: 512 × 64) and the embedding table, f32.
        let lin = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64) + 512 * 64;
        let embed = if m.info().tie_word_embeddings {
            0
        } else {
            512 * 64
        };
        assert_eq!(weight_bytes(m.as_ref()), (4 * (lin + embed)) as u64);
        // KV: 2 layers × (32 + 32) per token.
        assert_eq!(
            generation_bytes(m.as_ref(), b, t),
            (4 * b * (t * 128 + 1024)) as u64
        );
        // At a real vocabulary the logits are one chunk of rows, not every token's.
        let rows = chunk_rows(151_936);
        assert!(rows * 151_936 * 4 <= 64 << 20 && rows >= 64);
        // Grows linearly in the batch.
        assert_eq!(
            training_bytes(m.as_ref(), 2 * b, t, 0, false),
            2 * training_bytes(m.as_ref(), b, t, 0, false)
        );
    }
}
