//! `rlft bench`: speed workloads W1–W4 on small models, W5–W6 at real size, W7 (a GRPO
//! step) on a model given with `--model`
//! (docs/performance.md).

use crate::bench::{default_work, run_all, run_one, Job, Shape};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object per workload on its own line.
    #[arg(long)]
    pub json: bool,
    /// Also show how W1 and W2 grow with T (64…1024) and B (1…64).
    #[arg(long)]
    pub sweep: bool,
    /// Run only this workload, in this process (W1, W2, W3, W4, W5, W6, W7).
    #[arg(long)]
    pub workload: Option<String>,
    /// With --workload: batch and length (T for W1 and W5, new tokens for W2 and W6).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub len: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model shape: small (hidden 256, 4 layers; W1–W4, the default), gpu (hidden 1024,
    /// 8 layers, vocab 32000; W1 at B=8 T=256 and W2 at B=64 × 128 new tokens),
    /// qwen2.5-0.5b (Qwen2.5-0.5B's exact shape, 494 M parameters; W5 and W6), or a path to
    /// a model's config.json (a random model of that config; W5 and W6).
    #[arg(long)]
    pub shape: Option<String>,
    /// Load this model (a folder, a Hub id or a .gguf file) instead of a random one (W5 and
    /// W6 by default).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Weight dtype: f32, bf16 or f16 (LoRA weights stay f32). Default f32; at real size
    /// the suite runs f32 and bf16 unless this is given.
    #[arg(long)]
    pub dtype: Option<String>,
    /// W5 with gradient checkpointing (per-block recompute).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// W5 and W6 on a k-bit base (int8, nf4 or fp4; 4 bits with double quantization, as
    /// QLoRA sets it). At real size the suite then runs each row on the unquantized and on
    /// the quantized base, side by side.
    #[arg(long)]
    pub quantization: Option<String>,
    /// Measured steps (W1, W5) or generate calls (W2, W6), after the warm-up.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Write the shape's random model (config.json, model.safetensors, tokenizer) to this
    /// folder and exit: the folder the PyTorch twin and `--model` load.
    #[arg(long)]
    pub write_model: Option<PathBuf>,
    /// Scratch folder (the small model, RL runs).
    #[arg(long)]
    pub work: Option<PathBuf>,
}

fn fmt(v: &serde_json::Value) -> String {
    v.as_f64().map_or("–".into(), |x| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.4}")
        }
    })
}

pub fn run(mut args: Args) -> Result<()> {
    let work = args.work.clone().unwrap_or_else(default_work);
    // A Hub id or a GGUF file becomes the folder it resolves to.
    if let Some(m) = &args.model {
        let dir = rlft_policies::hub::resolve(m, "main")
            .with_context(|| format!("--model {}", m.display()))?;
        args.model = Some(dir);
    }
    let shape = match &args.model {
        Some(dir) => Shape::of_model_dir(dir)?,
        None => Shape::parse(args.shape.as_deref().unwrap_or("small"))?,
    };
    if let Some(dir) = &args.write_model {
        if args.model.is_some() {
            bail!(
                "--write-model writes a random model of --shape; --model names one already written"
            );
        }
        shape.write_model(dir)?;
        println!("{}", dir.display());
        return Ok(());
    }
    if let Some(d) = &args.dtype {
        rlft_policies::device::parse_dtype(d)?;
    }
    let quantization = args.quantization.clone().unwrap_or_else(|| "none".into());
    let job = |w: &str, dtype: &str| Job {
        size: args.batch.zip(args.len),
        model: args.model.clone(),
        checkpointing: args.gradient_checkpointing,
        steps: args.steps,
        quantization: quantization.clone(),
        ..Job::new(w, shape.clone(), dtype, &args.device)
    };
    job("W5", "f32").quant_config()?;
    if let Some(w) = &args.workload {
        let v = run_one(&job(w, args.dtype.as_deref().unwrap_or("f32")), &work)?;
        println!("{v}");
        return Ok(());
    }
    // Each real-size row on the unquantized base, and on the quantized one when asked.
    let quantizations: Vec<String> = match &args.quantization {
        Some(q) if q != "none" => vec!["none".into(), q.clone()],
        _ => vec!["none".into()],
    };
    let real_size = args.model.is_some() || !["small", "gpu"].contains(&shape.name.as_str());
    let mut list: Vec<Job> = Vec::new();
    if real_size {
        if args.sweep {
            bail!("--sweep is for the small and gpu shapes");
        }
        let dtypes: Vec<&str> = match &args.dtype {
            Some(d) => vec![d.as_str()],
            None => vec!["f32", "bf16"],
        };
        let ckpt: &[bool] = if args.gradient_checkpointing {
            &[true]
        } else {
            &[false, true]
        };
        for d in &dtypes {
            for &c in ckpt {
                for q in &quantizations {
                    list.push(Job {
                        checkpointing: c,
                        quantization: q.clone(),
                        ..job("W5", d)
                    });
                }
            }
        }
        for d in &dtypes {
            for q in &quantizations {
                list.push(Job {
                    checkpointing: false,
                    quantization: q.clone(),
                    ..job("W6", d)
                });
            }
        }
        // W7, a GRPO step, on a real model only (its prompts are chat questions).
        if args.model.is_some() && args.quantization.is_none() {
            for d in &dtypes {
                list.push(Job {
                    checkpointing: false,
                    ..job("W7", d)
                });
            }
        }
    } else {
        if quantizations.len() > 1 {
            bail!("--quantization applies to W5 and W6 (at real size)");
        }
        let dtype = args.dtype.as_deref().unwrap_or("f32");
        let workloads: &[&str] = if shape.name == "small" && dtype == "f32" {
            &["W1", "W2", "W3", "W4"]
        } else {
            &["W1", "W2"]
        };
        let plain = |w: &str, size: Option<(usize, usize)>| Job {
            size,
            checkpointing: false,
            ..job(w, dtype)
        };
        list.extend(workloads.iter().map(|w| plain(w, None)));
        if args.sweep {
            for t in [64, 128, 256, 512, 1024] {
                list.push(plain("W1", Some((8, t))));
            }
            for b in [1, 8, 32, 64] {
                list.push(plain("W1", Some((b, 64))));
                list.push(plain("W2", Some((b, 64))));
            }
        }
    }
    let rows = run_all(&std::env::current_exe()?, &work, &list)?;
    if args.json {
        for r in rows {
            println!("{r}");
        }
        return Ok(());
    }
    println!(
        "bf16 products: {}",
        rlft_policies::ops::bf16_dot::kernel_name()
    );
    println!(
        "{:<5} {:<9} {:>6} {:>6} {:>12} {:>12} {:>12} {:>10} {:>16}  phases (s)",
        "load", "dtype", "B", "T", "s/step", "tokens/s", "samples/s", "peak MB", "TFLOP/s (peak)"
    );
    for r in rows {
        let name = r["workload"].as_str().unwrap_or("?");
        let dtype = match r["quantization"].as_str() {
            Some(q) if q != "none" => format!(
                "{}+{}",
                r["dtype"].as_str().unwrap_or("?"),
                q.split(' ').next().unwrap_or(q)
            ),
            _ => r["dtype"].as_str().unwrap_or("?").to_string(),
        };
        let ckpt = if r["gradient_checkpointing"] == true {
            "checkpointing; "
        } else {
            ""
        };
        if let Some(why) = r.get("skipped").and_then(|v| v.as_str()) {
            println!("{name:<5} {dtype:<9} {ckpt}skipped: {why}");
            continue;
        }
        let phases = r
            .get("phases")
            .and_then(|p| p.as_object())
            .map(|p| {
                p.iter()
                    .map(|(k, v)| format!("{k} {}", fmt(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let extra = r
            .get("tokens_per_s_unmerged")
            .map(|v| format!("unmerged {} tok/s", fmt(v)))
            .unwrap_or_default();
        // Achieved TFLOP/s and its share of the CPU's bf16 peak (cores × GHz × FLOP/cycle).
        let tflops = match (r["tflops"].as_f64(), r["share_of_bf16_peak"].as_f64()) {
            (Some(t), Some(s)) => format!("{t:.3} ({:.1}%)", 100.0 * s),
            (Some(t), None) => format!("{t:.3}"),
            _ => "-".into(),
        };
        println!(
            "{name:<5} {dtype:<9} {:>6} {:>6} {:>12} {:>12} {:>12} {:>10} {tflops:>16}  {ckpt}{phases}{extra}",
            r.get("batch").map(|v| v.to_string()).unwrap_or("8".into()),
            r.get("seq")
                .or(r.get("new_tokens"))
                .map(|v| v.to_string())
                .unwrap_or("16".into()),
            fmt(&r["seconds_per_step"]),
            fmt(&r["tokens_per_s"]),
            fmt(&r["samples_per_s"]),
            fmt(&r["peak_rss_mb"]),
        );
    }
    Ok(())
}
