//! The dashboard's HTTP API: run list, metrics and rollouts read incrementally, a half-written
//! line left for later, traversal refused, malformed requests and concurrent readers survived;
//! and, where Chromium is installed (CI installs it), the page itself in a headless browser.

mod common;
use common::*;
use rlft::dashboard::Dashboard;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn get_json(port: u16, path: &str) -> Value {
    let (code, body) = get(port, path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn write_run(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"rl": {"algorithm": "grpo"}, "data": {}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("metrics.jsonl"),
        "{\"step\":1,\"objective/scores\":0.1}\n{\"step\":2,\"objective/scores\":0.3}\n{\"step\":3,\"objective/sc",
    )
    .unwrap();
    std::fs::write(dir.join("rollouts.jsonl"), "{\"step\":1,\"prompt\":\"1+1=\",\"completion\":\"2\",\"score\":1,\"kl\":0,\"advantage\":0.5}\n").unwrap();
}

#[test]
fn the_api_lists_runs_and_serves_logs_incrementally() {
    let tmp = TempDir::new("dash-api");
    let runs = tmp.0.join("runs");
    write_run(&runs.join("exp/grpo-a"));
    std::fs::create_dir_all(runs.join("exp/grpo-a/checkpoint-2")).unwrap();
    let d = Dashboard::start(vec![runs.clone()], "127.0.0.1", 0).unwrap();
    let list = get_json(d.port, "/api/runs");
    let r = &list["runs"][0];
    assert_eq!(list["runs"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(r["name"], "runs/exp/grpo-a");
    assert_eq!(r["kind"], "grpo");
    assert_eq!(r["status"], "running", "written just now");
    assert_eq!(r["last_step"], 2);
    assert_eq!(r["has_rollouts"], true);
    // The half-written third line is not served …
    let m = get_json(d.port, "/api/metrics?run=runs%2Fexp%2Fgrpo-a&offset=0");
    assert_eq!(m["rows"].as_array().unwrap().len(), 2);
    let off = m["offset"].as_u64().unwrap();
    // … until it is complete; the client asks from its offset and gets only what is new.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(runs.join("exp/grpo-a/metrics.jsonl"))
        .unwrap();
    f.write_all(b"ores\":0.5}\n{\"step\":3,\"status\":\"finished\"}\n")
        .unwrap();
    let m2 = get_json(
        d.port,
        &format!("/api/metrics?run=runs/exp/grpo-a&offset={off}"),
    );
    assert_eq!(m2["rows"].as_array().unwrap().len(), 2, "{m2}");
    assert_eq!(m2["rows"][0]["objective/scores"], 0.5);
    assert_eq!(
        get_json(d.port, "/api/runs")["runs"][0]["status"],
        "finished"
    );
    let ro = get_json(d.port, "/api/rollouts?run=runs/exp/grpo-a");
    assert_eq!(ro["rows"][0]["completion"], "2");
    // The page and its vendored chart library are served from the binary.
    let (code, html) = get(d.port, "/");
    assert!(code == 200 && html.contains("rlft dashboard"));
    let (code, js) = get(d.port, "/assets/uPlot.iife.min.js");
    assert!(code == 200 && js.contains("uPlot"));
    d.stop();
}

#[test]
fn traversal_is_refused_and_bad_requests_are_survived() {
    let tmp = TempDir::new("dash-safe");
    let runs = tmp.0.join("runs");
    write_run(&runs.join("a"));
    std::fs::write(tmp.0.join("secret.jsonl"), "{\"secret\":1}\n").unwrap();
    let d = Dashboard::start(vec![runs.clone()], "127.0.0.1", 0).unwrap();
    for path in [
        "/api/metrics?run=../secret",
        "/api/metrics?run=%2e%2e%2fsecret",
        "/api/metrics?run=/etc/passwd",
        "/../secret.jsonl",
        "/assets/../../secret.jsonl",
    ] {
        let (code, body) = get(d.port, path);
        assert!(code == 403 || code == 404, "{path}: {code}");
        assert!(
            !body.contains("secret\":1") && !body.contains("root:"),
            "{path}: {body}"
        );
    }
    assert_eq!(get(d.port, "/api/metrics?run=runs/nope").0, 404);
    assert_eq!(get(d.port, "/api/metrics").0, 400);
    // Garbage on the socket, a half request, then normal service.
    for junk in [
        &b"\x00\xff\xfe garbage\r\n\r\n"[..],
        b"GET",
        b"POST /api/runs HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        let _ = s.write_all(junk);
    }
    // Concurrent readers.
    let port = d.port;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..15).all(|_| get(port, "/api/metrics?run=runs/a").0 == 200)
            })
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
    assert_eq!(get(d.port, "/api/runs").0, 200);
    d.stop();
}

/// Numeric points the page should plot: every numeric metric value but step/epoch/elapsed
/// and the time/* breakdown (docs/dashboard.md).
fn expected_points(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, x)| {
                    x.is_number()
                        && !["step", "epoch", "elapsed"].contains(&k.as_str())
                        && !k.starts_with("time/")
                })
                .filter(|_| v.get("step").is_some_and(|s| s.is_number()))
                .count()
        })
        .sum()
}

#[test]
fn the_page_in_a_headless_browser_plots_every_point_and_lists_rollouts() {
    if std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED: chromium is not installed (.ci/run installs it); the browser test needs it"
        );
        return;
    }
    // A short real training run.
    let runs = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("runs/ci-dashboard");
    let _ = std::fs::remove_dir_all(&runs);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlft"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "grpo",
            "--config",
            "configs/grpo.toml",
            "--quiet",
            "--set",
            "training.max_steps=6",
        ])
        .arg(format!(
            "--set=training.output_dir={:?}",
            runs.join("grpo").display().to_string()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let d = Dashboard::start(vec![runs.clone()], "127.0.0.1", 0).unwrap();
    let url = format!("http://127.0.0.1:{}/", d.port);
    let profile = TempDir::new("chromium-profile");
    let chromium = |extra: &[String]| {
        let mut c = std::process::Command::new("chromium");
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1100",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(extra)
        .arg(&url);
        c.output().unwrap()
    };
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom".into()]).stdout).into_owned();
    let summary = dom
        .split("id=\"summary\"")
        .nth(1)
        .and_then(|s| s.split('>').next())
        .unwrap_or_else(|| panic!("no #summary in the DOM:\n{dom:.2000}"));
    let attr = |name: &str| -> usize {
        summary
            .split(&format!("data-{name}=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("data-{name} in {summary}"))
    };
    let metrics = runs.join("grpo/metrics.jsonl");
    assert_eq!(
        attr("points"),
        expected_points(&metrics),
        "every metric value is plotted"
    );
    assert!(attr("charts") >= 10, "charts: {}", attr("charts"));
    let rollouts = std::fs::read_to_string(runs.join("grpo/rollouts.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        attr("rollout-rows"),
        rollouts.min(300),
        "the rollout table shows the rows"
    );
    assert!(dom.contains("class=\"chart\""), "chart elements rendered");
    // Series of fewer than 5 points get markers (one point draws no line); longer ones not.
    let marked = |metric: &str| -> &str {
        let el = dom
            .split(&format!("data-metric=\"{metric}\""))
            .nth(1)
            .and_then(|s| s.split('>').next())
            .unwrap_or_else(|| panic!("no chart for {metric}"));
        el.split("data-markers=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("data-markers on {metric}: {el}"))
    };
    let count = |key: &str| {
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .filter(|l| l.contains(&format!("\"{key}\":")))
            .count()
    };
    assert!(count("eval/score") < 5 && count("objective/scores") >= 5);
    assert_eq!(marked("eval/score"), "1", "a few points: markers");
    assert_eq!(marked("objective/scores"), "0", "a line: no markers");
    // A screenshot for people (a CI artifact in the run folder).
    let shot = runs.join("dashboard.png");
    chromium(&[format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot written"
    );
    d.stop();
}
