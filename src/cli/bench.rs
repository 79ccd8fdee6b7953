//! `rlft bench`: speed workloads W1–W4 (docs/performance.md).

use crate::bench::{default_work, run_all, run_one};
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
    if let Some(w) = &args.workload {
        let sweep = args.batch.zip(args.len);
        let v = run_one(w, &work, sweep, &args.device)?;
        println!("{v}");
        return Ok(());
    }
    let mut list: Vec<(String, Option<(usize, usize)>)> = ["W1", "W2", "W3", "W4"]
        .iter()
        .map(|w| (w.to_string(), None))
        .collect();
    if args.sweep {
        for t in [64, 128, 256, 512, 1024] {
            list.push(("W1".into(), Some((8, t))));
        }
        for b in [1, 8, 32, 64] {
            list.push(("W1".into(), Some((b, 64))));
            list.push(("W2".into(), Some((b, 64))));
        }
    }
    let rows = run_all(&std::env::current_exe()?, &work, &list, &args.device)?;
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
