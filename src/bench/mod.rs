//! `rlft bench`: the speed workloads measured against the PyTorch/TRL peer
//! (docs/performance.md). W1–W4 run on the "small" Llama built in memory from a seed
//! (hidden 256, 4 layers, 8 heads, 4 KV heads, intermediate 688, vocab 512) with LoRA r=4,
//! α=8 on q_proj, v_proj, in f32. `--shape gpu` runs W1 and W2 on the GPU-sized Llama
//! (hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 32000) instead.
//!
//! `--shape qwen2.5-0.5b` (or a model's `config.json`, or `--model DIR`) runs issue 13's
//! real-size workloads ([`scale`]): W5, an SFT step with LoRA on every linear layer, and
//! W6, KV-cached sampling, in f32 and bf16.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlft_policies::logprobs::token_logprobs;
use rlft_policies::quant::QuantConfig;
use rlft_policies::{
    generate, Adapter, BatchInput, ForwardCtx, GenerationConfig, LoraConfig, Pretrained,
    SamplingParams, Targets,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod rl;
mod scale;
mod shape;

pub use rl::{rl_step, w7};

pub use scale::{w5, w5_lora, w6, CHECKPOINTING_UNAVAILABLE, GRADIENT_CHECKPOINTING};
pub use shape::{model_dir, qwen2_config, Dims, Shape, BUILT_IN};

/// Writes the small Llama (seeded random weights) with the 512-token fixture tokenizer.
pub fn small_model(dir: &Path) -> Result<()> {
    Shape::small().write_model(dir)
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
        ..LoraConfig::default()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident memory of this process (VmHWM), MB.
/// The CPU's vector features that decide which kernels run (gemm's and ours), detected
/// at run time: `avx512bf16` and `amx-bf16` are the bf16 instructions of
/// `rlft_policies::ops::bf16_dot` (docs/performance.md).
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    found.push($f);
                }
            )*};
        }
        probe!("avx2", "fma", "f16c", "avx512f", "avx512bf16");
        if rlft_policies::ops::bf16_dot::amx::cpu_has_amx_bf16() {
            found.push("amx-bf16");
        }
    }
    found
}

/// FLOP per cycle and core of the bf16 instruction the products run on: AMX's
/// `TDPBF16PS` (16 × 16 × 32 multiply-adds in 16 cycles), else 64 (`VDPBF16PS` on 512 bits
/// at one a cycle, the figure of issue 24; the widening path does not reach it).
fn bf16_flop_per_cycle() -> f64 {
    match rlft_policies::ops::bf16_dot::engine() {
        Some(rlft_policies::ops::bf16_dot::Engine::Amx) => 1024.0,
        _ => 64.0,
    }
}

/// The CPU's bf16 peak in TFLOP/s: threads × the clock `/proc/cpuinfo` reports × FLOP per
/// cycle ([`bf16_flop_per_cycle`]). None where the clock is not reported.
pub fn bf16_peak_tflops() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let threads = candle_core::utils::get_num_threads() as f64;
    Some(threads * mhz * 1e6 * bf16_flop_per_cycle() / 1e12)
}

pub fn peak_rss_mb() -> Option<f64> {
    crate::train::memory::proc_kb("/proc/self/status", "VmHWM:").map(|kb| kb as f64 / 1024.0)
}

/// What the machine's other processes took while a workload ran, in cores: all CPUs' busy
/// time (`/proc/stat`) less this process's own, over the wall time. Above ~0.2 on a
/// 2-core machine the figures are contended (the PyTorch twin reports the same key).
pub struct Contention {
    started: Instant,
    busy: Option<f64>,
    own: f64,
}

fn busy_s() -> Option<f64> {
    let line = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = line
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((v.iter().sum::<f64>() - v[3] - v[4]) / tick)
}

fn own_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |x: libc::timeval| x.tv_sec as f64 + x.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

impl Contention {
    pub fn start() -> Contention {
        Contention {
            started: Instant::now(),
            busy: busy_s(),
            own: own_cpu_s(),
        }
    }

    pub fn other_cores(&self) -> Option<f64> {
        let wall = self.started.elapsed().as_secs_f64();
        let other = busy_s()? - self.busy? - (own_cpu_s() - self.own);
        Some((other / wall.max(1e-9)).max(0.0))
    }
}

fn random_ids(rng: &mut ChaCha8Rng, b: usize, t: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|_| (0..t).map(|_| rng.random_range(3..vocab as u32)).collect())
        .collect()
}

/// W1: forward + backward + AdamW of the LoRA model on B × T random tokens.
pub fn w1(
    dir: &Path,
    b: usize,
    t: usize,
    reps: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Value> {
    let pre = Pretrained::load(dir, dtype, dev)?;
    let vocab = pre.model.info().vocab_size;
    let model = pre.model.as_ref();
    let adapter = Adapter::new(model, lora(), 0)?;
    let params = adapter.named_vars();
    let mut opt = crate::train::optimizer::Optimizer::new(
        crate::train::optimizer::OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        params.clone(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows = random_ids(&mut rng, b, t, vocab);
    let input = BatchInput::left_padded(&rows, 0, dev)?;
    let (mut tf, mut tb, mut to) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps + 2 {
        let t0 = Instant::now();
        let lp = token_logprobs(model, &input, &ForwardCtx::train(Some(&adapter), None), 1.0)?;
        let loss = (lp.mean_all()? * -1.0)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        dev.synchronize()?;
        let g: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v)
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().zeros_like().expect("zeros"))
            })
            .collect();
        let t2 = Instant::now();
        opt.apply(&g, 1e-4)?;
        dev.synchronize()?;
        let t3 = Instant::now();
        if i >= 2 {
            tf.push((t1 - t0).as_secs_f64());
            tb.push((t2 - t1).as_secs_f64());
            to.push((t3 - t2).as_secs_f64());
        }
    }
    let total: Vec<f64> = (0..reps).map(|i| tf[i] + tb[i] + to[i]).collect();
    let s = median(total);
    Ok(
        json!({"workload": "W1", "seconds_per_step": s, "tokens_per_s": (b * t) as f64 / s, "samples_per_s": b as f64 / s,
              "phases": {"forward": median(tf), "backward": median(tb), "adamw": median(to)}, "batch": b, "seq": t}),
    )
}

/// W2: sampling with the KV cache, B prompts of 7 tokens, `new` new tokens; the adapter
/// unmerged (as in training) and merged into the base.
pub fn w2(
    dir: &Path,
    b: usize,
    new: usize,
    reps: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Value> {
    let mut pre = Pretrained::load(dir, dtype, dev)?;
    let vocab = pre.model.info().vocab_size;
    let adapter = Adapter::new(pre.model.as_ref(), lora(), 0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let prompts = random_ids(&mut rng, b, 7, vocab);
    let cfg = GenerationConfig {
        max_new_tokens: new,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        },
        seed: 0,
        stop_ids: vec![],
        pad_id: 0,
        use_cache: true,
    };
    let time = |model: &dyn rlft_policies::CausalLm, a: Option<&Adapter>| -> Result<f64> {
        let mut v = Vec::new();
        for i in 0..reps + 1 {
            let t0 = Instant::now();
            let g = generate(model, a, &prompts, &cfg)?;
            let n: usize = g.iter().map(|x| x.completion_ids.len()).sum();
            if i >= 1 {
                v.push(n as f64 / t0.elapsed().as_secs_f64());
            }
        }
        Ok(median(v))
    };
    let unmerged = time(pre.model.as_ref(), Some(&adapter))?;
    adapter.merge_into(pre.model.as_mut())?;
    let merged = time(pre.model.as_ref(), None)?;
    Ok(
        json!({"workload": "W2", "seconds_per_step": (b * new) as f64 / merged, "tokens_per_s": merged, "samples_per_s": b as f64 * merged / (b * new) as f64,
              "tokens_per_s_unmerged": unmerged, "batch": b, "new_tokens": new}),
    )
}

/// What one `rlft bench` process runs.
#[derive(Clone, Debug)]
pub struct Job {
    pub workload: String,
    /// (B, T) for W1 and W5, (B, new tokens) for W2 and W6; the shape's defaults when absent.
    pub size: Option<(usize, usize)>,
    pub shape: Shape,
    /// A model folder to load instead of the shape's random model (`--model DIR`).
    pub model: Option<PathBuf>,
    pub dtype: String,
    pub device: String,
    /// W5 with gradient checkpointing.
    pub checkpointing: bool,
    /// Measured steps (calls for W2/W6); each workload's default when absent.
    pub steps: Option<usize>,
    /// W5 and W6 on a k-bit base: none, int8, nf4 (with double quantization, QLoRA's
    /// recipe) or fp4.
    pub quantization: String,
}

impl Job {
    pub fn new(workload: &str, shape: Shape, dtype: &str, device: &str) -> Job {
        Job {
            workload: workload.into(),
            size: None,
            shape,
            model: None,
            dtype: dtype.into(),
            device: device.into(),
            checkpointing: false,
            steps: None,
            quantization: "none".into(),
        }
    }

    /// This job's `rlft bench` arguments (for a child process).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["bench", "--workload", &self.workload, "--json"]
            .map(String::from)
            .into();
        a.extend([
            "--device".into(),
            self.device.clone(),
            "--dtype".into(),
            self.dtype.clone(),
        ]);
        match &self.model {
            Some(m) => a.extend(["--model".into(), m.display().to_string()]),
            None => a.extend(["--shape".into(), self.shape.name.clone()]),
        }
        if let Some((b, t)) = self.size {
            a.extend([
                "--batch".into(),
                b.to_string(),
                "--len".into(),
                t.to_string(),
            ]);
        }
        if let Some(n) = self.steps {
            a.extend(["--steps".into(), n.to_string()]);
        }
        if self.checkpointing {
            a.push("--gradient-checkpointing".into());
        }
        if self.quantization != "none" {
            a.extend(["--quantization".into(), self.quantization.clone()]);
        }
        a
    }

    /// The base's quantization: 4-bit kinds with double quantization, as QLoRA sets them.
    pub fn quant_config(&self) -> Result<QuantConfig> {
        crate::config::common::quant_config(&self.quantization, self.quantization.ends_with('4'))
            .map_err(|e| anyhow::anyhow!("--quantization: {e}"))
    }
}

/// Shapes past this many parameters get their random model written by a child process,
/// so that writing it does not count in the workload's peak memory.
const WRITE_IN_PROCESS_BELOW: usize = 50_000_000;

/// The folder of `shape`'s random model under `work`, written first if it is not there.
pub fn ensure_model(shape: &Shape, work: &Path) -> Result<PathBuf> {
    let dir = model_dir(work, shape);
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    if shape.param_count() < WRITE_IN_PROCESS_BELOW {
        shape.write_model(&dir)?;
        return Ok(dir);
    }
    let o = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--shape", &shape.name, "--write-model"])
        .arg(&dir)
        .output()
        .context("writing the bench model in a child process")?;
    if !o.status.success() {
        bail!(
            "writing the {} model: {}",
            shape.name,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(dir)
}

/// Runs one workload in this process and adds its peak memory.
pub fn run_one(job: &Job, work: &Path) -> Result<Value> {
    let dev = rlft_policies::device::parse_device(&job.device)?;
    let dtype = rlft_policies::device::parse_dtype(&job.dtype)?;
    let shape = &job.shape;
    let w = job.workload.as_str();
    if ["W3", "W4"].contains(&w) && (shape.name != "small" || dtype != DType::F32) {
        bail!("W3 and W4 run at the small shape in f32 only");
    }
    if !["W1", "W2", "W3", "W4", "W5", "W6", "W7"].contains(&w) {
        bail!("unknown workload `{w}`; expected W1, W2, W3, W4, W5, W6 or W7");
    }
    if w == "W7" && job.model.is_none() {
        bail!("W7 runs on a model folder, Hub id or GGUF: give --model");
    }
    if job.checkpointing && w != "W5" {
        bail!("--gradient-checkpointing applies to W5 only");
    }
    if job.checkpointing && !GRADIENT_CHECKPOINTING {
        bail!(CHECKPOINTING_UNAVAILABLE);
    }
    let quant = job.quant_config()?;
    if !quant.is_none() && !["W5", "W6"].contains(&w) {
        bail!("--quantization applies to W5 and W6");
    }
    let dir = match &job.model {
        Some(m) => m.clone(),
        None => ensure_model(shape, work)?,
    };
    let contention = Contention::start();
    let reps = job.steps.unwrap_or(if job.size.is_some() { 3 } else { 5 });
    // Frozen base: the forward's 2·P·tokens and the backward's input gradients (another
    // 2·P·tokens); attention scores and the LoRA matmuls are left out.
    let flops = |tokens: usize| {
        shape
            .counts()
            .map(|(_, lin)| 4.0 * lin as f64 * tokens as f64)
    };
    let mut v = match w {
        "W1" => {
            let (b, t) = job.size.unwrap_or(shape.w1);
            w1(&dir, b, t, reps, &dev, dtype)?
        }
        "W2" => {
            let (b, n) = job.size.unwrap_or(shape.w2);
            w2(&dir, b, n, reps, &dev, dtype)?
        }
        "W3" => rl_step(&dir, work, false, 5, &job.device)?,
        "W4" => rl_step(&dir, work, true, 8, &job.device)?,
        "W7" => w7(&dir, work, job.steps.unwrap_or(3), &job.device, &job.dtype)?,
        "W5" => {
            let (b, t) = job.size.unwrap_or((4, 256));
            // From 4k tokens a step (minutes) is its own warm-up: its one-time costs are
            // lost in it, and a second step would double a T sweep's time.
            let warmup = if b * t >= 4096 { 0 } else { 1 };
            w5(
                &dir,
                b,
                t,
                warmup,
                job.steps.unwrap_or(3),
                job.checkpointing,
                &dev,
                dtype,
                quant,
            )?
        }
        _ => {
            let (b, n) = job.size.unwrap_or((8, 64));
            w6(&dir, b, n, 1, job.steps.unwrap_or(3), &dev, dtype, quant)?
        }
    };
    // W7's products: generation, the reference pass (2·P each) and the training pass
    // (4·P) per computed position (no separate old-policy pass at one epoch): a group's
    // prompt counts once, as the shared-prompt passes compute it.
    let tokens_per_step = match w {
        "W1" | "W5" => Some(v["batch"].as_u64().unwrap_or(0) * v["seq"].as_u64().unwrap_or(0)),
        "W7" => v["computed_tokens_per_step"]
            .as_f64()
            .map(|t| 2 * t.round() as u64),
        _ => None,
    };
    if let Some(tokens) = tokens_per_step {
        if let Some(f) = flops(tokens as usize) {
            v["flops_per_step"] = json!(f);
            let tflops = f / v["seconds_per_step"].as_f64().unwrap_or(f64::NAN) / 1e12;
            v["tflops"] = json!(tflops);
            if let Some(peak) = bf16_peak_tflops() {
                v["bf16_peak_tflops"] = json!(peak);
                v["share_of_bf16_peak"] = json!(tflops / peak);
            }
        }
    }
    v["bf16_kernel"] = json!(rlft_policies::ops::bf16_dot::kernel_name());
    if let Some((params, _)) = shape.counts() {
        v["params"] = json!(params);
    }
    v["peak_rss_mb"] = json!(peak_rss_mb());
    v["cpu_features"] = json!(cpu_features());
    v["other_procs_cpu_cores"] = json!(contention
        .other_cores()
        .map(|c| (c * 100.0).round() / 100.0));
    v["device"] = json!(job.device);
    v["shape"] = json!(job
        .model
        .as_ref()
        .map_or(shape.name.clone(), |m| m.display().to_string()));
    v["model_type"] = json!(shape.model_type());
    v["dtype"] = json!(job.dtype);
    v["quantization"] = json!(quant.describe());
    v["impl"] = json!("rlft");
    Ok(v)
}

/// Runs each workload in a child process (so peak memory is its own) and collects the lines.
/// A W5 row with checkpointing in a build without it comes back as
/// `{"workload": "W5", "skipped": "…"}`.
pub fn run_all(exe: &Path, work: &Path, jobs: &[Job]) -> Result<Vec<Value>> {
    std::fs::create_dir_all(work)?;
    let mut out = Vec::new();
    for job in jobs {
        let w = &job.workload;
        if job.checkpointing && !GRADIENT_CHECKPOINTING {
            out.push(
                json!({"workload": w, "dtype": job.dtype, "gradient_checkpointing": true,
                            "skipped": CHECKPOINTING_UNAVAILABLE}),
            );
            continue;
        }
        if job.model.is_none() {
            ensure_model(&job.shape, work)?;
        }
        let o = std::process::Command::new(exe)
            .args(job.args())
            .arg("--work")
            .arg(work)
            .output()
            .with_context(|| format!("running workload {w}"))?;
        if !o.status.success() {
            bail!(
                "workload {w} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let line = String::from_utf8_lossy(&o.stdout);
        out.push(serde_json::from_str(
            line.trim().lines().last().unwrap_or("{}"),
        )?);
    }
    Ok(out)
}

pub fn default_work() -> PathBuf {
    std::env::temp_dir().join("rlft-bench")
}
