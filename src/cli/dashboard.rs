//! `rlft dashboard`: watch and compare runs in the browser.

use crate::dashboard::Dashboard;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folders holding runs (any folder with a metrics.jsonl, up to 3 levels down).
    #[arg(default_value = "runs")]
    pub runs: Vec<PathBuf>,
    #[arg(long, default_value_t = 6006)]
    pub port: u16,
    /// Address to bind; anything but loopback exposes your runs to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
}

pub fn run(args: Args) -> Result<()> {
    let loopback = args.host == "127.0.0.1" || args.host == "localhost" || args.host == "::1";
    if !loopback {
        tracing::warn!(
            "binding {}: anyone who can reach this address can read these runs",
            args.host
        );
    }
    for r in &args.runs {
        if !r.is_dir() {
            anyhow::bail!("{} is not a folder", r.display());
        }
    }
    let d = Dashboard::start(args.runs.clone(), &args.host, args.port)?;
    println!(
        "rlft dashboard: http://{}:{}/ (Ctrl-C to stop)",
        if loopback { "127.0.0.1" } else { &args.host },
        d.port
    );
    d.wait();
    Ok(())
}
