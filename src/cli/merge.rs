//! `rlft merge`: fold an adapter into the base weights and write a Hugging Face folder, or
//! (`--out FILE.gguf`) a GGUF file for llama.cpp and Ollama.

use super::common::ModelArgs;
use anyhow::{bail, Context, Result};
use rlft_policies::gguf::export::{export, GgufType};
use rlft_policies::params::{save_pretrained, save_pretrained_classifier};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder (model.safetensors, config and tokenizer files), or a file ending in
    /// `.gguf`: llama.cpp's format, as its convert_hf_to_gguf.py writes it.
    #[arg(long)]
    pub out: PathBuf,
    /// The type of a GGUF export's weight matrices: f32, f16, bf16, q8_0, q4_k_m (vectors
    /// stay f32).
    #[arg(long, default_value = "f16")]
    pub gguf_type: String,
}

pub fn run(args: Args) -> Result<()> {
    if !args.model.quant_config()?.is_none() {
        bail!(
            "rlft merge writes full-precision weights: it merges into the base as stored (drop --quantization {}); an adapter trained on a quantized base merges into it unchanged, as QLoRA's do",
            args.model.quantization
        );
    }
    let gguf = rlft_policies::gguf::is_gguf(&args.out);
    let gguf_type = GgufType::parse(&args.gguf_type).with_context(|| {
        format!(
            "--gguf-type {}: unknown; choose one of {}",
            args.gguf_type,
            GgufType::NAMES
        )
    })?;
    let (mut pre, adapter) = args.model.load()?;
    let adapter = adapter.context("rlft merge needs --adapter")?;
    adapter.merge_into(pre.model.as_mut())?;
    let pad = crate::rewards::score_pad_id(&pre);
    // The folder the base was read from (a Hub id's cached snapshot) gives the config and
    // tokenizer files.
    let base_dir = pre.dir.clone();
    // A reward-model adapter (`rlft rm`: SEQ_CLS with a `score` head) merges into a
    // `…ForSequenceClassification` folder; a causal-LM adapter into a causal LM.
    if gguf && adapter.head("score").is_some() {
        bail!("{}: a reward-model adapter merges into a sequence classifier, which GGUF does not hold; write a folder instead", args.out.display());
    }
    // A GGUF is written from the merged folder, made beside it and removed after.
    let folder = if gguf {
        args.out.with_extension("gguf.merged")
    } else {
        args.out.clone()
    };
    match adapter.head("score") {
        Some(score) => save_pretrained_classifier(
            pre.model.as_mut(),
            score.as_tensor(),
            pad,
            &base_dir,
            &folder,
        ),
        None => save_pretrained(pre.model.as_mut(), &base_dir, &folder),
    }
    .with_context(|| format!("writing {}", folder.display()))?;
    if gguf {
        let exported = export(&folder, &args.out, gguf_type);
        let _ = std::fs::remove_dir_all(&folder);
        exported.with_context(|| format!("writing {}", args.out.display()))?;
    }
    let adapter_dir = args.model.adapter.clone().unwrap_or_default();
    if let Some(q) = trained_quantization(&adapter_dir) {
        println!(
            "{} was trained on a {q} base (its run's config.json); it is merged into the full-precision base, as QLoRA adapters are: the merged weights differ from what training saw by the base's quantization error",
            adapter_dir.display()
        );
    }
    println!(
        "merged {} into the full-precision ({}) base {} → {}",
        adapter_dir.display(),
        args.model.dtype,
        args.model.model.display(),
        args.out.display()
    );
    Ok(())
}

/// `model.quantization` of the rlft run that saved the adapter `dir` (`dir/../config.json`),
/// when it was not `none`.
fn trained_quantization(dir: &std::path::Path) -> Option<String> {
    let run = dir.parent()?.join("config.json");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(run).ok()?).ok()?;
    let q = cfg.get("model")?.get("quantization")?.as_str()?;
    (q != "none").then(|| q.to_string())
}
