//! `rlft dashboard`: a small local web server that lists runs, plots their metrics and shows
//! their rollouts, live. It only reads the run folders it was given, binds loopback unless
//! told otherwise, and never touches the training process. The JSON API is documented in
//! docs/dashboard.md.

pub mod runs;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

const INDEX: &str = include_str!("assets/index.html");
const APP: &str = include_str!("assets/app.js");
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("assets/uPlot.LICENSE");

pub struct Dashboard {
    server: Arc<tiny_http::Server>,
    pub port: u16,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Dashboard {
    /// Binds `host:port` (port 0: any free one) and serves `roots` from a few worker threads.
    pub fn start(roots: Vec<PathBuf>, host: &str, port: u16) -> Result<Self> {
        let server = tiny_http::Server::http((host, port))
            .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .context("not an IP listener")?;
        let server = Arc::new(server);
        let roots = Arc::new(roots);
        let workers = (0..4)
            .map(|_| {
                let (s, r) = (server.clone(), roots.clone());
                std::thread::spawn(move || {
                    for req in s.incoming_requests() {
                        let resp = handle(&r, req.url());
                        let _ = req.respond(resp);
                    }
                })
            })
            .collect();
        Ok(Self {
            server,
            port,
            workers,
        })
    }

    /// Serves until the process ends.
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }

    pub fn stop(&self) {
        self.server.unblock();
        for _ in 0..4 {
            self.server.unblock();
        }
    }
}

type Resp = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn respond(code: u16, content_type: &str, body: Vec<u8>) -> Resp {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
        .expect("valid header");
    let nocache = tiny_http::Header::from_bytes(&b"Cache-Control"[..], &b"no-store"[..])
        .expect("valid header");
    tiny_http::Response::from_data(body)
        .with_status_code(code)
        .with_header(header)
        .with_header(nocache)
}

fn json_resp(code: u16, v: &Value) -> Resp {
    respond(code, "application/json", v.to_string().into_bytes())
}

fn error(code: u16, msg: &str) -> Resp {
    json_resp(code, &json!({ "error": msg }))
}

/// Splits `/path?a=1&b=2` into the path and decoded query pairs.
fn parse(url: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let pairs = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (percent_decode(path), pairs)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, c) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(roots: &[PathBuf], url: &str) -> Resp {
    let (path, query) = parse(url);
    let q = |k: &str| query.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    match path.as_str() {
        "/" | "/index.html" => respond(200, "text/html; charset=utf-8", INDEX.as_bytes().to_vec()),
        "/assets/app.js" => respond(
            200,
            "text/javascript; charset=utf-8",
            APP.as_bytes().to_vec(),
        ),
        "/assets/uPlot.iife.min.js" => respond(
            200,
            "text/javascript; charset=utf-8",
            UPLOT_JS.as_bytes().to_vec(),
        ),
        "/assets/uPlot.min.css" => respond(
            200,
            "text/css; charset=utf-8",
            UPLOT_CSS.as_bytes().to_vec(),
        ),
        "/assets/uPlot.LICENSE" => respond(
            200,
            "text/plain; charset=utf-8",
            UPLOT_LICENSE.as_bytes().to_vec(),
        ),
        "/api/runs" => {
            let list: Vec<Value> = runs::discover(roots)
                .iter()
                .map(|r| {
                    let (status, last_step) = runs::status(r);
                    let config = runs::config(r);
                    json!({
                        "name": r.name,
                        "kind": runs::kind(&config),
                        "status": status,
                        "last_step": last_step,
                        "has_rollouts": r.dir.join("rollouts.jsonl").is_file(),
                        "config": config,
                    })
                })
                .collect();
            json_resp(200, &json!({ "runs": list }))
        }
        "/api/metrics" | "/api/rollouts" => {
            let Some(name) = q("run") else {
                return error(400, "missing ?run=NAME");
            };
            if name.contains("..") || name.starts_with('/') || name.contains('\\') {
                return error(403, "refused: run names are the ones /api/runs lists");
            }
            let Some(run) = runs::discover(roots).into_iter().find(|r| r.name == name) else {
                return error(404, "no such run");
            };
            let offset = q("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
            let file = if path == "/api/metrics" {
                "metrics.jsonl"
            } else {
                "rollouts.jsonl"
            };
            let (rows, next) = runs::read_lines(&run.dir.join(file), offset);
            json_resp(
                200,
                &json!({ "run": run.name, "rows": rows, "offset": next }),
            )
        }
        p if p.contains("..") => error(403, "refused: path traversal"),
        _ => error(404, "not found"),
    }
}
