//! Logging and metrics through `tracing`.
//!
//! - Human-readable lines go to stderr (level from `RUST_LOG`, default `info`), printed
//!   above the progress bar when one is shown.
//! - Events with target [`METRICS`] are also written, one JSON object a line, to the run's
//!   `metrics.jsonl` while a run has [`open_metrics`]'d it. Field names are the metric
//!   names (`"train/loss"`, `lr`, …); see docs/metrics.md.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Target of metric events.
pub const METRICS: &str = "rlft::metrics";

thread_local! {
    /// Per thread, so concurrent runs (tests) keep their metrics apart; a run emits its
    /// metric events from the thread that opened the file.
    static SINK: std::cell::RefCell<Option<std::io::BufWriter<std::fs::File>>> =
        const { std::cell::RefCell::new(None) };
}
thread_local! {
    /// The run's TensorBoard event file, when `training.report_to` asks for one.
    static TENSORBOARD: std::cell::RefCell<Option<crate::tensorboard::EventWriter>> =
        const { std::cell::RefCell::new(None) };
}
static PROGRESS: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Installs the global subscriber (once; later calls do nothing).
pub fn init() {
    // Rank 0 speaks for a data-parallel run; the others report warnings and errors.
    let default = if crate::dist::is_main() {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Terminal lines show the message only; metric fields go to metrics.jsonl.
    let message_only = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        if field.name() == "message" {
            write!(w, "{value:?}")
        } else {
            Ok(())
        }
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(|| ProgressAwareStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .fmt_fields(message_only)
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(MetricsLayer)
        .try_init();
}

/// Appends metric events to `path` until [`close_metrics`].
pub fn open_metrics(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    SINK.with(|s| *s.borrow_mut() = Some(std::io::BufWriter::new(f)));
    Ok(())
}

/// Also writes every metric event with a `step` to a TensorBoard event file in `dir`, its
/// numeric fields as scalars under their names, until [`close_metrics`].
pub fn open_tensorboard(dir: &Path) -> std::io::Result<()> {
    let w = crate::tensorboard::EventWriter::create(dir)?;
    TENSORBOARD.with(|t| *t.borrow_mut() = Some(w));
    Ok(())
}

/// Records that the run failed (`{"status": "failed", "error": …}`) if a metrics file is
/// open on this thread, then closes it. The dashboard shows the run as failed.
pub fn mark_failed(error: &str) {
    let open = SINK.with(|s| s.borrow().is_some());
    if open {
        tracing::error!(target: METRICS, status = "failed", error, "run failed");
        close_metrics();
    }
}

pub fn close_metrics() {
    SINK.with(|s| {
        if let Some(mut w) = s.borrow_mut().take() {
            let _ = w.flush();
        }
    });
    TENSORBOARD.with(|t| t.borrow_mut().take());
}

/// A progress bar on stderr, hidden when `quiet` or stderr is not a terminal.
pub fn progress(len: u64, label: &str, quiet: bool) -> ProgressBar {
    let pb = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(len)
    };
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    *PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = Some(pb.clone());
    pb
}

pub fn finish_progress() {
    if let Some(pb) = PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        pb.finish_and_clear();
    }
}

struct ProgressAwareStderr;

impl Write for ProgressAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pb = PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match pb {
            Some(pb) if !pb.is_hidden() => pb.suspend(|| std::io::stderr().write(buf)),
            _ => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

struct MetricsLayer;

struct JsonVisitor(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor {
    fn record_f64(&mut self, f: &Field, v: f64) {
        // JSON has no NaN/Inf: they are written as null (and logged as such).
        let j = serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into);
        self.0.insert(f.name().to_string(), j);
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().to_string(), v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().to_string(), v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().to_string(), v.into());
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), v.into());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        if f.name() != "message" {
            self.0.insert(f.name().to_string(), format!("{v:?}").into());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for MetricsLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != METRICS {
            return;
        }
        SINK.with(|s| {
            let mut sink = s.borrow_mut();
            let Some(w) = sink.as_mut() else { return };
            let mut v = JsonVisitor(serde_json::Map::new());
            event.record(&mut v);
            // A line is written whole and flushed, so readers never see half of one.
            let _ =
                writeln!(w, "{}", serde_json::Value::Object(v.0.clone())).and_then(|_| w.flush());
            TENSORBOARD.with(|t| {
                let mut t = t.borrow_mut();
                let (Some(tb), Some(step)) = (t.as_mut(), v.0.get("step").and_then(|s| s.as_i64()))
                else {
                    return;
                };
                // Numbers (booleans as 0/1) under their rlft names; the step is the x axis.
                let scalars: Vec<(String, f32)> = v
                    .0
                    .iter()
                    .filter(|(k, _)| k.as_str() != "step")
                    .filter_map(|(k, x)| match x {
                        serde_json::Value::Number(n) => n.as_f64().map(|f| (k.clone(), f as f32)),
                        serde_json::Value::Bool(b) => Some((k.clone(), *b as u8 as f32)),
                        _ => None,
                    })
                    .collect();
                if let Err(e) = tb.scalars(step, &scalars) {
                    eprintln!("warning: writing {}: {e}", tb.path().display());
                }
            });
        });
    }
}
