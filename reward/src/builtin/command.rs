//! `command`: a long-running external process scores samples over JSON lines, so reward code
//! in Python (or anything else) plugs in.
//!
//! Protocol, one line each way per batch:
//! - rlft → process (stdin): `{"samples": [{"prompt", "completion", "prompt_ids",
//!   "completion_ids", "stopped", <the row's other fields>…}, …]}`
//! - process → rlft (stdout): `{"scores": [s0, s1, …]}` (one finite number per sample).
//!
//! The process is started when the reward is built and lives for the run. A missing answer
//! within `timeout_s`, an exit, or a malformed answer is an error naming the command, with
//! the last lines the process wrote to stderr.

use crate::{Options, Reward, RewardError, Sample};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Proc {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
}

/// Options: `cmd` (a list: program and arguments; required), `timeout_s` (default 60).
pub struct Command {
    argv: Vec<String>,
    timeout: Duration,
    proc: Mutex<Proc>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Command {
    pub fn new(o: &Options) -> Result<Self, RewardError> {
        o.allow_only(&["cmd", "timeout_s"])?;
        let argv = o.str_list("cmd")?;
        if argv.is_empty() {
            return Err(RewardError::BadOption {
                name: "command".into(),
                option: "cmd".into(),
                msg: "empty command".into(),
            });
        }
        let timeout = Duration::from_secs_f64(o.f64_or("timeout_s", 60.0)?.max(0.001));
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RewardError::failed("command", format!("cannot start {argv:?}: {e}")))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(Self {
            argv,
            timeout,
            proc: Mutex::new(Proc {
                child,
                stdin,
                lines,
            }),
            stderr_tail,
        })
    }

    fn fail(&self, msg: impl std::fmt::Display) -> RewardError {
        // Give the stderr reader a moment to collect what a dying process printed.
        std::thread::sleep(Duration::from_millis(50));
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        let tail = if tail.is_empty() {
            String::new()
        } else {
            format!(
                "; its stderr ends with:\n{}",
                tail.iter().cloned().collect::<Vec<_>>().join("\n")
            )
        };
        RewardError::failed("command", format!("{:?} {msg}{tail}", self.argv))
    }
}

fn sample_json(s: &Sample) -> Value {
    let mut m: serde_json::Map<String, Value> = s
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    m.insert("prompt".into(), json!(s.prompt));
    m.insert("completion".into(), json!(s.completion));
    m.insert("prompt_ids".into(), json!(s.prompt_ids));
    m.insert("completion_ids".into(), json!(s.completion_ids));
    m.insert("stopped".into(), json!(s.stopped));
    Value::Object(m)
}

impl Reward for Command {
    fn name(&self) -> &str {
        "command"
    }

    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        let mut p = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        let request = json!({ "samples": samples.iter().map(sample_json).collect::<Vec<_>>() });
        let line = format!("{request}\n");
        if let Err(e) = p
            .stdin
            .write_all(line.as_bytes())
            .and_then(|_| p.stdin.flush())
        {
            let status = p.child.try_wait().ok().flatten();
            return Err(self.fail(format!(
                "cannot be written to ({e}); exit status {status:?}"
            )));
        }
        let answer = match p.lines.recv_timeout(self.timeout) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(self.fail(format!("stdout unreadable: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                let _ = p.child.kill();
                return Err(self.fail(format!(
                    "did not answer within {:?}; it was stopped",
                    self.timeout
                )));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = p.child.wait().ok();
                return Err(self.fail(format!("exited ({status:?}) without answering")));
            }
        };
        let v: Value = serde_json::from_str(&answer)
            .or_else(|e| serde_json::from_str(&quote_python_floats(&answer)).map_err(|_| e))
            .map_err(|e| self.fail(format!("answered with invalid JSON ({e}): {answer:.200}")))?;
        let scores = v.get("scores").unwrap_or(&v);
        let scores = scores.as_array().ok_or_else(|| {
            self.fail(format!(
                "answered {answer:.200}; expected {{\"scores\": [numbers]}}"
            ))
        })?;
        scores
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .or_else(|| match x.as_str() {
                        Some("NaN") => Some(f64::NAN),
                        Some("Infinity") => Some(f64::INFINITY),
                        Some("-Infinity") => Some(f64::NEG_INFINITY),
                        _ => None,
                    })
                    .ok_or_else(|| self.fail(format!("score {i} is not a number: {x}")))
            })
            .collect()
    }
}

/// Python's `json.dumps` writes NaN and ±Infinity as bare words, which JSON does not allow;
/// quote them so they parse and then fail the finiteness check like any other bad score.
fn quote_python_floats(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len() + 8);
    let mut rest = answer;
    while let Some(i) = rest.find(['N', 'I', '-']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let word = ["NaN", "Infinity", "-Infinity"]
            .into_iter()
            .find(|w| rest.starts_with(w));
        match word {
            Some(w) => {
                out.push('"');
                out.push_str(w);
                out.push('"');
                rest = &rest[w.len()..];
            }
            None => {
                out.push_str(&rest[..1]);
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl Drop for Command {
    fn drop(&mut self) {
        let p = self.proc.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::quote_python_floats;

    #[test]
    fn python_non_finite_words_are_quoted_and_numbers_left_alone() {
        let q = quote_python_floats(r#"{"scores": [NaN, -1.5, Infinity, -Infinity, 1e-3]}"#);
        assert_eq!(
            q,
            r#"{"scores": ["NaN", -1.5, "Infinity", "-Infinity", 1e-3]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&q).unwrap();
        assert_eq!(v["scores"][1].as_f64(), Some(-1.5));
    }
}
