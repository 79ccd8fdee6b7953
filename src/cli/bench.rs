//! `rlft bench`: speed workloads W1–W4 (docs/performance.md).

use crate::bench::{default_work, run_all, run_one, Job, Shape};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object per workload on its own line.
    #[arg(long)]
    pub json: bool,
    /// Also show how W1 and W2 grow with T (64…1024) and B (1…64).
    #[arg(long)]
    pub sweep: bool,
    /// Run only this workload, in this process (W1, W2, W3, W4).
    #[arg(long)]
    pub workload: Option<String>,
    /// With --workload W1/W2: batch and length (T for W1, new tokens for W2).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub len: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model shape: small (hidden 256, 4 layers; all workloads) or gpu (hidden 1024,
    /// 8 layers, vocab 32000; W1 at B=8 T=256 and W2 at B=64 × 128 new tokens).
    #[arg(long, default_value = "small")]
    pub shape: String,
    /// Weight dtype: f32, bf16 or f16 (W1 and W2; LoRA weights stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
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

pub fn run(args: Args) -> Result<()> {
    let work = args.work.clone().unwrap_or_else(default_work);
    let shape = Shape::parse(&args.shape)?;
    rlft_policies::device::parse_dtype(&args.dtype)?;
    let job = |w: &str, size: Option<(usize, usize)>| Job {
        workload: w.into(),
        size,
        shape,
        dtype: args.dtype.clone(),
        device: args.device.clone(),
    };
    if let Some(w) = &args.workload {
        let v = run_one(&job(w, args.batch.zip(args.len)), &work)?;
        println!("{v}");
        return Ok(());
    }
    let small_f32 = shape == crate::bench::SMALL && args.dtype == "f32";
    let workloads: &[&str] = if small_f32 {
        &["W1", "W2", "W3", "W4"]
    } else {
        &["W1", "W2"]
    };
    let mut list: Vec<Job> = workloads.iter().map(|w| job(w, None)).collect();
    if args.sweep {
        for t in [64, 128, 256, 512, 1024] {
            list.push(job("W1", Some((8, t))));
        }
        for b in [1, 8, 32, 64] {
            list.push(job("W1", Some((b, 64))));
            list.push(job("W2", Some((b, 64))));
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
        "{:<5} {:>6} {:>6} {:>12} {:>12} {:>12} {:>10}  phases (s)",
        "load", "B", "T", "s/step", "tokens/s", "samples/s", "peak MB"
    );
    for r in rows {
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
        println!(
            "{:<5} {:>6} {:>6} {:>12} {:>12} {:>12} {:>10}  {phases}{extra}",
            r["workload"].as_str().unwrap_or("?"),
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
