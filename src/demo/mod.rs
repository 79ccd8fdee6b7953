//! The built-in demo: a tiny Llama of our own (configs/demo/model/, built by
//! `rlft demo build-base`), taught a two-number addition task by `rlft sft`, then improved by
//! `rlft ppo` against the `exact_match` reward; then the human-feedback half on preference
//! pairs made from the task: `rlft rm` learns a reward model from them, `rlft ppo` runs
//! against that reward model alone, and `rlft dpo` and `rlft kto` learn from the pairs
//! directly (KTO from each completion judged alone). Held-out
//! accuracy is measured at each stage. docs/demo.md walks through it.

pub mod task;
pub mod tokenizer;

use crate::config::{
    self, preference::DpoConfig, preference::KtoConfig, preference::RmConfig, rl::RlConfig,
    sft::SftConfig,
};
use crate::rl::rollout::{response_logprobs, Rollouts};
use crate::rl::trainer::{build_rewards, evaluate, RunOptions as RlOptions};
use anyhow::{Context, Result};
use rlft_policies::{generate, Adapter, ForwardCtx, GenerationConfig, Pretrained, SamplingParams};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone)]
pub struct DemoOptions {
    /// Configs and the committed base model (configs/demo).
    pub configs: PathBuf,
    /// Run folder (runs/demo).
    pub out: PathBuf,
    /// A shortened run (seconds): few steps, a sample of the held-out set.
    pub quick: bool,
    pub quiet: bool,
    /// The base's dtype in every stage (`model.dtype`; f32 by default).
    pub dtype: String,
    /// The base's quantization in every stage (`model.quantization`; 4 bits with double
    /// quantization, QLoRA's recipe): the stages, their reward model and the evaluation all
    /// run on the quantized base.
    pub quantization: String,
}

impl DemoOptions {
    pub fn new(configs: PathBuf, out: PathBuf, quick: bool, quiet: bool) -> Self {
        Self {
            configs,
            out,
            quick,
            quiet,
            dtype: "f32".into(),
            quantization: "none".into(),
        }
    }

    /// The `model.*` settings every stage gets.
    fn model_sets(&self) -> Vec<String> {
        vec![
            format!("model.dtype={:?}", self.dtype),
            format!("model.quantization={:?}", self.quantization),
            format!("model.bnb_4bit_use_double_quant={}", self.double_quant()),
        ]
    }

    fn double_quant(&self) -> bool {
        matches!(self.quantization.as_str(), "nf4" | "fp4")
    }

    fn quant(&self) -> Result<rlft_policies::quant::QuantConfig> {
        crate::config::common::quant_config(&self.quantization, self.double_quant())
            .map_err(|e| anyhow::anyhow!("--quantization: {e}"))
    }

    /// The base model as the stages load it.
    fn load(&self, dir: &Path) -> Result<Pretrained> {
        let dtype = rlft_policies::device::parse_dtype(&self.dtype)?;
        Ok(Pretrained::load_quantized(
            dir,
            dtype,
            self.quant()?,
            &rlft_policies::candle_core::Device::Cpu,
        )?)
    }
}

/// What the demo measured (also written to `summary.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub base_accuracy: f64,
    pub sft_accuracy: f64,
    pub ppo_accuracy: f64,
    pub ppo_kl: f64,
    /// Pairwise accuracy of the learned reward model on held-out pairs.
    pub rm_accuracy: f64,
    /// PPO with the learned reward model as its only reward.
    pub ppo_rm_accuracy: f64,
    pub ppo_rm_kl: f64,
    pub dpo_accuracy: f64,
    pub dpo_kl: f64,
    /// KTO on the same pairs, unpaired (chosen desirable, rejected not).
    pub kto_accuracy: f64,
    pub kto_kl: f64,
    pub eval_problems: usize,
    pub eval_pairs: usize,
    pub seconds: serde_json::Map<String, serde_json::Value>,
}

fn path_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Exact-match accuracy of greedy answers on the held-out problems.
fn accuracy(pre: &Pretrained, adapter: Option<&Adapter>, cfg: &RlConfig) -> Result<f64> {
    let prompts = crate::data::prompts::load_prompts(
        cfg.data.eval_file.as_ref().expect("eval file set"),
        &pre.tokenizer,
        64,
    )?;
    let rewards = build_rewards(cfg, &crate::rewards::default_registry())?;
    evaluate(
        pre.model.as_ref(),
        adapter,
        &pre.tokenizer,
        &prompts,
        &rewards,
        cfg,
    )
}

/// Mean over held-out prompts of Σ_t (logp − logp_ref) on responses sampled from the policy:
/// a Monte-Carlo estimate of the sequence KL to the reference, in nats.
fn sequence_kl(pre: &Pretrained, policy: &Adapter, cfg: &RlConfig) -> Result<f64> {
    let tok = &pre.tokenizer;
    let model = pre.model.as_ref();
    let prompts = crate::data::prompts::load_prompts(
        cfg.data.eval_file.as_ref().expect("eval file set"),
        tok,
        64,
    )?;
    let rows: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let mut stop_ids = tok.stop_ids.clone();
    stop_ids.extend(&cfg.generation.stop_token_ids);
    let gen = GenerationConfig {
        max_new_tokens: cfg.generation.max_new_tokens,
        sampling: SamplingParams {
            temperature: cfg.generation.temperature,
            top_k: None,
            top_p: None,
        },
        seed: 1234,
        stop_ids,
        pad_id: tok.pad_or_eos(),
        use_cache: true,
    };
    let temperature = cfg.generation.temperature;
    let gens = generate(model, Some(policy), &rows, &gen)?;
    let ro = Rollouts::new((0..rows.len()).collect(), gens, tok.pad_or_eos());
    let all: Vec<usize> = (0..ro.len()).collect();
    let lp = response_logprobs(
        model,
        &ForwardCtx::inference(Some(policy)),
        &ro,
        &all,
        64,
        temperature,
    )?;
    let lr = response_logprobs(
        model,
        &ForwardCtx::inference(None),
        &ro,
        &all,
        64,
        temperature,
    )?;
    // Per-token differences are taken in f32, as before, then summed in f64.
    let total: f64 = lp
        .iter()
        .zip(&lr)
        .flat_map(|(p, r)| p.iter().zip(r).map(|(&a, &b)| (a as f32 - b as f32) as f64))
        .sum();
    Ok(total / ro.len().max(1) as f64)
}

/// SFT, then PPO from the SFT adapter, with held-out accuracy before, between and after.
pub fn run(opts: &DemoOptions) -> Result<Summary> {
    crate::telemetry::init();
    let base_dir = opts.configs.join("model");
    let data = opts.out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let mut eval_rows = task::eval_set();
    if opts.quick {
        eval_rows.truncate(40);
    }
    let (sft_n, rl_n) = if opts.quick { (64, 64) } else { (384, 4000) };
    task::write_jsonl(&data.join("sft.jsonl"), &task::demonstrations(sft_n, 11))?;
    task::write_jsonl(&data.join("prompts.jsonl"), &task::rl_prompts(rl_n, 12))?;
    task::write_jsonl(&data.join("eval.jsonl"), &eval_rows)?;
    let mut eval_pairs = task::eval_preference_pairs();
    if opts.quick {
        eval_pairs.truncate(40);
    }
    let pref_n = if opts.quick { 64 } else { PREFERENCE_PAIRS };
    task::write_jsonl(
        &data.join("pairs.jsonl"),
        &task::preference_pairs(pref_n, 13),
    )?;
    task::write_jsonl(&data.join("pairs_eval.jsonl"), &eval_pairs)?;
    let mut seconds = serde_json::Map::new();
    let model_sets = opts.model_sets();

    // Stage 1: SFT.
    let mut sft_sets = vec![
        format!("model.path={}", path_str(&base_dir)),
        format!("data.train_file={}", path_str(&data.join("sft.jsonl"))),
        format!("training.output_dir={}", path_str(&opts.out.join("sft"))),
    ];
    sft_sets.extend(model_sets.iter().cloned());
    if opts.quick {
        sft_sets.push("training.max_steps=3".into());
    }
    let sft_cfg: SftConfig = config::load(Some(&opts.configs.join("sft.toml")), &sft_sets)?;
    let t0 = Instant::now();
    let sft = crate::sft::run(
        &sft_cfg,
        &crate::sft::RunOptions {
            resume: None,
            quiet: opts.quiet,
        },
    )?;
    seconds.insert("sft".into(), json!(t0.elapsed().as_secs_f64()));

    // Stage 2: PPO, the SFT adapter merged into the reference.
    let mut ppo_sets = vec![
        format!("model.path={}", path_str(&base_dir)),
        format!("rl.sft_adapter={}", path_str(&sft.output)),
        format!("data.prompt_file={}", path_str(&data.join("prompts.jsonl"))),
        format!("data.eval_file={}", path_str(&data.join("eval.jsonl"))),
        format!("training.output_dir={}", path_str(&opts.out.join("ppo"))),
    ];
    ppo_sets.extend(model_sets.iter().cloned());
    if opts.quick {
        ppo_sets.push("training.max_steps=2".into());
    }
    let ppo_cfg: RlConfig = config::load(Some(&opts.configs.join("ppo.toml")), &ppo_sets)?;
    // Held-out accuracy of the base and of the SFT adapter (greedy, exact match).
    let t0 = Instant::now();
    let base = opts.load(&base_dir)?;
    let base_accuracy = accuracy(&base, None, &ppo_cfg)?;
    let sft_adapter = Adapter::load(&sft.output, base.model.as_ref())?;
    let sft_accuracy = accuracy(&base, Some(&sft_adapter), &ppo_cfg)?;
    let mut eval_secs = t0.elapsed().as_secs_f64();
    let rl_opts = RlOptions {
        resume: None,
        quiet: opts.quiet,
        separate_old_pass: false,
    };
    let run_ppo = |cfg: &RlConfig| {
        crate::rl::trainer::run(cfg, &crate::rewards::default_registry(), &rl_opts)
    };
    let t0 = Instant::now();
    let ppo = run_ppo(&ppo_cfg)?;
    seconds.insert("ppo".into(), json!(t0.elapsed().as_secs_f64()));
    let t0 = Instant::now();
    // The SFT model as the PPO stages' reference: the adapter merged into the full-precision
    // base, then quantized when the base is (`stage::load_base`).
    let full_precision = DemoOptions {
        quantization: "none".into(),
        ..opts.clone()
    };
    let mut merged = full_precision.load(&base_dir)?;
    let sft_on_merged = Adapter::load(&sft.output, merged.model.as_ref())?;
    sft_on_merged.merge_into(merged.model.as_mut())?;
    rlft_policies::families::quantize_blocks(merged.model.as_mut(), opts.quant()?)?;
    // A policy adapter on the SFT model: held-out exact match (the task's own reward, not a
    // learned one) and KL to the SFT model.
    let judge = |adapter: &Path| -> Result<(f64, f64)> {
        let policy = Adapter::load(adapter, merged.model.as_ref())?;
        Ok((
            accuracy(&merged, Some(&policy), &ppo_cfg)?,
            sequence_kl(&merged, &policy, &ppo_cfg)?,
        ))
    };
    let (ppo_accuracy, ppo_kl) = judge(&ppo.output)?;
    eval_secs += t0.elapsed().as_secs_f64();

    // Stage 3: a reward model from the preference pairs, on the base model.
    let mut rm_sets = vec![
        format!("model.path={}", path_str(&base_dir)),
        format!("data.train_file={}", path_str(&data.join("pairs.jsonl"))),
        format!(
            "data.eval_file={}",
            path_str(&data.join("pairs_eval.jsonl"))
        ),
        format!("training.output_dir={}", path_str(&opts.out.join("rm"))),
    ];
    rm_sets.extend(model_sets.iter().cloned());
    if opts.quick {
        rm_sets.push("training.max_steps=2".into());
    }
    let rm_cfg: RmConfig = config::load(Some(&opts.configs.join("rm.toml")), &rm_sets)?;
    let stage_opts = crate::preference::RunOptions {
        resume: None,
        quiet: opts.quiet,
    };
    let t0 = Instant::now();
    let rm = crate::preference::rm::run(&rm_cfg, &stage_opts)?;
    seconds.insert("rm".into(), json!(t0.elapsed().as_secs_f64()));
    let rm_accuracy = rm
        .eval_accuracy
        .context("the reward-model run reported no eval accuracy")?;

    // Stage 4: PPO from the SFT adapter, the learned reward model its only reward.
    let mut ppo_rm_sets = ppo_sets.clone();
    ppo_rm_sets.retain(|s| !s.starts_with("training.output_dir"));
    ppo_rm_sets.push(format!(
        "training.output_dir={}",
        path_str(&opts.out.join("ppo-rm"))
    ));
    let mut ppo_rm_cfg: RlConfig =
        config::load(Some(&opts.configs.join("ppo_rm.toml")), &ppo_rm_sets)?;
    for r in ppo_rm_cfg.reward.iter_mut().filter(|r| r.name == "model") {
        r.options
            .insert("path".into(), json!(rm.output.display().to_string()));
        r.options
            .insert("base".into(), json!(base_dir.display().to_string()));
        r.options.insert("dtype".into(), json!(opts.dtype));
        r.options
            .insert("quantization".into(), json!(opts.quantization));
        r.options.insert(
            "bnb_4bit_use_double_quant".into(),
            json!(opts.double_quant()),
        );
    }
    let t0 = Instant::now();
    let ppo_rm = run_ppo(&ppo_rm_cfg)?;
    seconds.insert("ppo_rm".into(), json!(t0.elapsed().as_secs_f64()));

    // Stage 5: DPO from the SFT adapter on the same pairs.
    let mut dpo_sets = vec![
        format!("model.path={}", path_str(&base_dir)),
        format!("dpo.sft_adapter={}", path_str(&sft.output)),
        format!("data.train_file={}", path_str(&data.join("pairs.jsonl"))),
        format!("training.output_dir={}", path_str(&opts.out.join("dpo"))),
    ];
    dpo_sets.extend(model_sets.iter().cloned());
    if opts.quick {
        dpo_sets.push("training.max_steps=2".into());
    }
    let dpo_cfg: DpoConfig = config::load(Some(&opts.configs.join("dpo.toml")), &dpo_sets)?;
    let t0 = Instant::now();
    let dpo = crate::preference::dpo::run(&dpo_cfg, &stage_opts)?;
    seconds.insert("dpo".into(), json!(t0.elapsed().as_secs_f64()));

    // Stage 6: KTO from the SFT adapter on the same pairs, unpaired.
    let mut kto_sets = vec![
        format!("model.path={}", path_str(&base_dir)),
        format!("kto.sft_adapter={}", path_str(&sft.output)),
        format!("data.train_file={}", path_str(&data.join("pairs.jsonl"))),
        format!("training.output_dir={}", path_str(&opts.out.join("kto"))),
    ];
    kto_sets.extend(model_sets.iter().cloned());
    if opts.quick {
        kto_sets.push("training.max_steps=2".into());
    }
    let kto_cfg: KtoConfig = config::load(Some(&opts.configs.join("kto.toml")), &kto_sets)?;
    let t0 = Instant::now();
    let kto = crate::preference::kto::run(&kto_cfg, &stage_opts)?;
    seconds.insert("kto".into(), json!(t0.elapsed().as_secs_f64()));

    let t0 = Instant::now();
    let (ppo_rm_accuracy, ppo_rm_kl) = judge(&ppo_rm.output)?;
    let (dpo_accuracy, dpo_kl) = judge(&dpo.output)?;
    let (kto_accuracy, kto_kl) = judge(&kto.output)?;
    eval_secs += t0.elapsed().as_secs_f64();
    seconds.insert("eval".into(), json!(eval_secs));
    let summary = Summary {
        base_accuracy,
        sft_accuracy,
        ppo_accuracy,
        ppo_kl,
        rm_accuracy,
        ppo_rm_accuracy,
        ppo_rm_kl,
        dpo_accuracy,
        dpo_kl,
        kto_accuracy,
        kto_kl,
        eval_problems: eval_rows.len(),
        eval_pairs: eval_pairs.len(),
        seconds,
    };
    let text = serde_json::to_string_pretty(&summary)?;
    rlft_policies::fsutil::write_atomic(&opts.out.join("summary.json"), text.as_bytes())?;
    Ok(summary)
}

/// Preference pairs the reward model and DPO learn from.
pub const PREFERENCE_PAIRS: usize = 2000;

/// Builds the base model from scratch: corpus, tokenizer, random initialisation from
/// `configs/demo/model.json`, full-parameter pretraining with `configs/demo/pretrain.toml`.
/// Writes the Hugging Face folder to `out`.
pub fn build_base(configs: &Path, work: &Path, out: &Path, quiet: bool) -> Result<()> {
    crate::telemetry::init();
    std::fs::create_dir_all(work)?;
    let pre_cfg: SftConfig = config::load(Some(&configs.join("pretrain.toml")), &[])?;
    let corpus = task::corpus(DEMO_CORPUS_LINES, 8, 0.5, 7);
    let corpus_path = work.join("corpus.jsonl");
    task::write_jsonl(&corpus_path, &corpus)?;
    let init_dir = work.join("init");
    let texts: Vec<String> = corpus
        .iter()
        .map(|r| r["text"].as_str().unwrap_or_default().to_string())
        .collect();
    let vocab = tokenizer::train(&texts, 320, &init_dir)?;
    let model_json = configs.join("model.json");
    let mut model_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&model_json)
            .with_context(|| format!("reading {}", model_json.display()))?,
    )?;
    model_cfg["vocab_size"] = json!(vocab);
    rlft_policies::init::write_random_llama(
        &model_cfg,
        &model_json,
        pre_cfg.training.seed,
        &init_dir,
    )?;
    let sets = vec![
        format!("model.path={}", path_str(&init_dir)),
        format!("data.train_file={}", path_str(&corpus_path)),
        format!("training.output_dir={}", path_str(&work.join("pretrain"))),
    ];
    let cfg: SftConfig = config::load(Some(&configs.join("pretrain.toml")), &sets)?;
    let res = crate::sft::run(
        &cfg,
        &crate::sft::RunOptions {
            resume: None,
            quiet,
        },
    )?;
    std::fs::create_dir_all(out)?;
    for e in std::fs::read_dir(&res.output)? {
        let e = e?;
        std::fs::copy(e.path(), out.join(e.file_name()))?;
    }
    tracing::info!("base model written to {}", out.display());
    Ok(())
}

/// Lines of 8 equations in the pretraining corpus.
pub const DEMO_CORPUS_LINES: usize = 20000;
