//! Hub ids resolved from a Hugging Face cache tree built here as the real cache stores it
//! (`models--org--name/refs/<revision>` → `snapshots/<hash>/`, files linked into `blobs/`):
//! by `--model`, `--revision`, `model.path` and `--adapter`; `$HF_HUB_CACHE` before
//! `$HF_HOME/hub`; a local folder of the same name wins; a miss says what was looked for.

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

fn run(env: &[(&str, &Path)], cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME");
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
            && err.contains("HF_HUB_CACHE"),
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
