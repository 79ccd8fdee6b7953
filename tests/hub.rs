//! Hub ids resolved from a Hugging Face cache tree built here as the real cache stores it
//! (`models--org--name/refs/<revision>` → `snapshots/<hash>/`, files linked into `blobs/`):
//! by `--model`, `--revision`, `model.path` and `--adapter`; `$HF_HUB_CACHE` before
//! `$HF_HOME/hub`; a local folder of the same name wins; a miss says what was looked for.
//! A miss is downloaded with `hf-hub` unless `HF_HUB_OFFLINE` is set: from a mock Hub
//! served here (`$HF_ENDPOINT`), which speaks the Hub's protocol (the repo info API, range
//! requests with `etag` and `x-repo-commit`).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MAIN: &str = "1111111111111111111111111111111111111111";
const DEV: &str = "2222222222222222222222222222222222222222";

/// Puts `src`'s files in `repo` as snapshot `hash`: each file a blob, linked from the snapshot.
fn snapshot(repo: &Path, hash: &str, src: &Path) {
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        let blob = format!("{hash}-{name}");
        std::fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snap.join(&name)).unwrap();
    }
}

/// A cache with `acme/tiny` (main: the llama fixture, dev: the qwen2 one) and
/// `acme/tiny-lora` (the llama adapter).
fn cache(root: &Path) -> PathBuf {
    let hub = root.join("hub");
    let repo = hub.join("models--acme--tiny");
    snapshot(&repo, MAIN, &fixture("llama"));
    snapshot(&repo, DEV, &fixture("qwen2"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN).unwrap();
    std::fs::write(repo.join("refs/dev"), format!("{DEV}\n")).unwrap();
    let lora = hub.join("models--acme--tiny-lora");
    snapshot(&lora, MAIN, &fixture("llama-lora"));
    std::fs::create_dir_all(lora.join("refs")).unwrap();
    std::fs::write(lora.join("refs/main"), MAIN).unwrap();
    hub
}

/// Runs rlft offline (`HF_HUB_OFFLINE=1`) unless `env` says otherwise.
fn run(env: &[(&str, &Path)], cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.args(args)
        .env("RUST_LOG", "warn")
        .env("HF_HUB_OFFLINE", "1");
    for k in [
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().unwrap()
}

fn logprobs(env: &[(&str, &Path)], cwd: Option<&Path>, extra: &[&str]) -> String {
    let mut args = vec!["logprobs", "--text", "12+35=47", "--json"];
    args.extend(extra);
    let o = run(env, cwd, &args);
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn hub_ids_resolve_from_the_cache() {
    let tmp = TempDir::new("hub");
    let hub = cache(&tmp.0);
    let by_path = |m: &str, a: Option<&str>| {
        let m = fixture(m);
        let a = a.map(fixture);
        let mut x = vec!["--model", m.to_str().unwrap()];
        if let Some(a) = &a {
            x.extend(["--adapter", a.to_str().unwrap()]);
        }
        logprobs(&[], None, &x)
    };
    let env = [("HF_HUB_CACHE", hub.as_path())];
    let main = logprobs(&env, None, &["--model", "acme/tiny"]);
    assert_eq!(main, by_path("llama", None));
    assert_eq!(
        logprobs(&env, None, &["--model", "acme/tiny", "--revision", "dev"]),
        by_path("qwen2", None)
    );
    assert_eq!(
        logprobs(&env, None, &["--model", "acme/tiny", "--revision", DEV]),
        by_path("qwen2", None)
    );
    assert_eq!(
        logprobs(
            &env,
            None,
            &["--model", "acme/tiny", "--adapter", "acme/tiny-lora"]
        ),
        by_path("llama", Some("llama-lora"))
    );
    // $HF_HOME/hub when $HF_HUB_CACHE is unset.
    let home = tmp.0.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&hub, home.join("hub")).unwrap();
    assert_eq!(
        logprobs(
            &[("HF_HOME", home.as_path())],
            None,
            &["--model", "acme/tiny"]
        ),
        main
    );
    // A local folder of that name wins over the cache.
    let cwd = tmp.0.join("cwd");
    let local = cwd.join("acme/tiny");
    std::fs::create_dir_all(&local).unwrap();
    for e in std::fs::read_dir(fixture("gpt2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), local.join(e.file_name())).unwrap();
    }
    assert_eq!(
        logprobs(
            &[("HF_HOME", home.as_path())],
            Some(&cwd),
            &["--model", "acme/tiny"]
        ),
        by_path("gpt2", None)
    );
    // A miss names the id, the revision and the path looked for.
    let o = run(
        &[("HF_HOME", home.as_path())],
        None,
        &["logprobs", "--model", "acme/none", "--text", "x"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let looked = home.join("hub/models--acme--none/refs/main");
    assert!(
        err.contains("`acme/none`")
            && err.contains(&looked.display().to_string())
            && err.contains("HF_HUB_CACHE")
            && err.contains("HF_HUB_OFFLINE is set, so nothing was downloaded"),
        "{err}"
    );
    let o = run(
        &[("HF_HOME", home.as_path())],
        None,
        &[
            "logprobs",
            "--model",
            "acme/tiny",
            "--revision",
            "v9",
            "--text",
            "x",
        ],
    );
    let err = stderr(&o);
    assert!(
        err.contains("revision `v9`") && err.contains("refs/v9"),
        "{err}"
    );
}

/// A training stage takes the id as `model.path`: the SFT run reads the cached snapshot,
/// writes an adapter whose `base_model_name_or_path` is the id (as PEFT writes it), and the
/// adapter loads back through the id.
#[test]
fn sft_trains_from_a_hub_id() {
    let tmp = TempDir::new("hub-sft");
    let hub = cache(&tmp.0);
    let data = tmp.0.join("train.jsonl");
    std::fs::write(&data, "{\"prompt\": \"1+2=\", \"completion\": \"3\"}\n{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n").unwrap();
    let out = tmp.0.join("out");
    let sets = [
        "model.path=\"acme/tiny\"".to_string(),
        format!("data.train_file={:?}", data.display().to_string()),
        format!("training.output_dir={:?}", out.display().to_string()),
        "training.max_steps=2".into(),
    ];
    let mut args = vec!["sft", "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let env = [("HF_HUB_CACHE", hub.as_path())];
    let o = run(&env, None, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "acme/tiny");
    let adapter = out.join("adapter");
    logprobs(
        &env,
        None,
        &[
            "--model",
            "acme/tiny",
            "--adapter",
            adapter.to_str().unwrap(),
        ],
    );
}

/// A Hub on 127.0.0.1 serving one repository at one commit, recording each request.
struct MockHub {
    url: String,
    server: std::sync::Arc<tiny_http::Server>,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl MockHub {
    /// `broken`: a listed file whose download fails (a 500).
    fn new(
        id: &'static str,
        commit: &'static str,
        files: Vec<(String, Vec<u8>)>,
        broken: Option<&'static str>,
    ) -> Self {
        use sha2::{Digest, Sha256};
        use tiny_http::{Header, Response};
        let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (srv, log) = (server.clone(), requests.clone());
        std::thread::spawn(move || {
            let header = |k: &str, v: &str| Header::from_bytes(k, v).unwrap();
            for req in srv.incoming_requests() {
                let path = req.url().to_string();
                log.lock().unwrap().push(path.clone());
                let info = format!("/api/models/{id}/revision/main");
                let resolve = format!("/{id}/resolve/main/");
                if path == info {
                    // The listing has files rlft must not fetch, as real repositories do.
                    let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
                    names.extend(["pytorch_model.bin".into(), "original/params.json".into()]);
                    let siblings: Vec<_> = names
                        .iter()
                        .map(|n| serde_json::json!({ "rfilename": n }))
                        .collect();
                    let body = serde_json::json!({"sha": commit, "siblings": siblings});
                    let _ = req.respond(Response::from_string(body.to_string()));
                } else if broken.is_some_and(|b| path == format!("{resolve}{b}")) {
                    let _ = req.respond(Response::from_string("boom").with_status_code(500));
                } else if let Some((_, bytes)) = path
                    .strip_prefix(&resolve)
                    .and_then(|name| files.iter().find(|(n, _)| n == name))
                {
                    let range = req
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv("Range"))
                        .map(|h| h.value.to_string())
                        .unwrap_or_default();
                    let start: usize = range
                        .strip_prefix("bytes=")
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let end = if range.ends_with("-0") {
                        1
                    } else {
                        bytes.len()
                    };
                    let etag = format!("\"{:x}\"", Sha256::digest(bytes));
                    let resp = Response::from_data(bytes[start..end].to_vec())
                        .with_status_code(206)
                        .with_header(header("ETag", &etag))
                        .with_header(header("X-Repo-Commit", commit))
                        .with_header(header(
                            "Content-Range",
                            &format!("bytes {start}-{}/{}", end - 1, bytes.len()),
                        ));
                    let _ = req.respond(resp);
                } else {
                    let _ = req.respond(Response::from_string("not found").with_status_code(404));
                }
            }
        });
        MockHub {
            url,
            server,
            requests,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// A model missing from the cache is downloaded into it, laid out as huggingface_hub lays
/// it out, and then read as a cached one: the same log-probs as the folder it came from.
/// `HF_HUB_OFFLINE=1` downloads nothing; an id the Hub does not have is a clear error.
#[test]
fn a_missing_id_is_downloaded_into_the_cache_unless_offline() {
    const COMMIT: &str = "3333333333333333333333333333333333333333";
    let tmp = TempDir::new("hub-download");
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture("llama"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    assert!(files.iter().any(|(n, _)| n == "model.safetensors"));
    let hub = MockHub::new("acme/fresh", COMMIT, files.clone(), None);
    let cache = tmp.0.join("hub");
    let endpoint = PathBuf::from(&hub.url);
    let online = [
        ("HF_HUB_CACHE", cache.as_path()),
        ("HF_ENDPOINT", endpoint.as_path()),
        ("HF_HUB_OFFLINE", Path::new("0")),
    ];
    let offline = [
        ("HF_HUB_CACHE", cache.as_path()),
        ("HF_ENDPOINT", endpoint.as_path()),
    ];
    // Offline: a miss, and not one request.
    let o = run(
        &offline,
        None,
        &["logprobs", "--model", "acme/fresh", "--text", "x"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("HF_HUB_OFFLINE is set"),
        "{}",
        stderr(&o)
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    let by_path = logprobs(&[], None, &["--model", fixture("llama").to_str().unwrap()]);
    assert_eq!(logprobs(&online, None, &["--model", "acme/fresh"]), by_path);
    // The cache now holds what huggingface_hub would have written: the ref, a snapshot of
    // links into blobs named by their etag, only the files rlft reads.
    let repo = cache.join("models--acme--fresh");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let snapshot = repo.join("snapshots").join(COMMIT);
    for (name, bytes) in &files {
        let link = snapshot.join(name);
        assert!(link.is_symlink(), "{name}");
        assert_eq!(&std::fs::read(&link).unwrap(), bytes, "{name}");
    }
    assert!(!snapshot.join("pytorch_model.bin").exists());
    assert!(!snapshot.join("original").exists());
    let fetched: Vec<String> = hub.requests();
    assert!(fetched
        .iter()
        .all(|r| !r.contains("pytorch_model.bin") && !r.contains("original")));
    // Cached now: offline works, and asks the Hub nothing more.
    let before = hub.requests().len();
    assert_eq!(
        logprobs(&offline, None, &["--model", "acme/fresh"]),
        by_path
    );
    assert_eq!(hub.requests().len(), before);
    // An id the Hub does not have: the cache path looked for and the download's failure.
    let o = run(
        &online,
        None,
        &["logprobs", "--model", "acme/absent", "--text", "x"],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("`acme/absent`")
            && err.contains("models--acme--absent/refs/main")
            && err.contains(&format!("downloading it from {} failed", hub.url))
            && err.contains("404"),
        "{err}"
    );

    // A download that fails part-way leaves no ref, so the next run does not take the
    // partial snapshot for a cached model; the error names the file.
    let mut listed = files.clone();
    listed.sort_by_key(|(n, _)| n == "tokenizer.json");
    let flaky = MockHub::new("acme/flaky", COMMIT, listed, Some("tokenizer.json"));
    let flaky_endpoint = PathBuf::from(&flaky.url);
    let o = run(
        &[
            ("HF_HUB_CACHE", cache.as_path()),
            ("HF_ENDPOINT", flaky_endpoint.as_path()),
            ("HF_HUB_OFFLINE", Path::new("0")),
        ],
        None,
        &["logprobs", "--model", "acme/flaky", "--text", "x"],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("tokenizer.json") && err.contains("500"),
        "{err}"
    );
    let flaky_repo = cache.join("models--acme--flaky");
    assert!(flaky_repo
        .join("snapshots")
        .join(COMMIT)
        .join("config.json")
        .exists());
    assert!(!flaky_repo.join("refs/main").exists());
}
