//! Reliability, run against the real binary (issue 8): a table of bad inputs, each of which
//! must exit non-zero with a message naming the file/key/line and never panic; a disk that
//! fills mid-run; NaN rewards and an overflowing learning rate; a memory check that names
//! what to lower. Kills and interrupts are in tests/interrupt.rs.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlft"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .env_remove("RLFT_MEMORY_LIMIT_MB")
        .stdin(Stdio::null());
    c
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// One bad input: the command line (after `rlft`), extra environment, and the pieces the
/// error must contain.
struct Case {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    want: Vec<String>,
}

fn case(name: &'static str, args: Vec<String>, want: &[&str]) -> Case {
    Case {
        name,
        args,
        env: vec![],
        want: want.iter().map(|s| s.to_string()).collect(),
    }
}

fn sft(out: &Path, sets: &[String]) -> Vec<String> {
    let mut a: Vec<String> = ["sft", "--config", "configs/sft.toml", "--quiet"]
        .map(String::from)
        .to_vec();
    a.push(format!("--set=training.output_dir={}", q(out)));
    a.push("--set=training.max_steps=2".into());
    a.extend(sets.iter().map(|s| format!("--set={s}")));
    a
}

fn ppo(out: &Path, sets: &[String]) -> Vec<String> {
    let mut a: Vec<String> = ["ppo", "--config", "configs/ppo.toml", "--quiet"]
        .map(String::from)
        .to_vec();
    a.push(format!("--set=training.output_dir={}", q(out)));
    a.extend(
        [
            "training.max_steps=1",
            "rl.batch_size=8",
            "rl.num_mini_batches=1",
            "training.per_device_train_batch_size=8",
        ]
        .map(|s| format!("--set={s}")),
    );
    a.extend(sets.iter().map(|s| format!("--set={s}")));
    a
}

fn s(x: &str) -> String {
    x.to_string()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A copy of the llama fixture with `edit` applied.
fn broken_model(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let p = dir.join(name);
    copy_dir(&fixture("llama"), &p);
    edit(&p);
    p
}

/// A Python reward over the `command` protocol with `body` computing `scores` from `n`.
fn py_reward(dir: &Path, name: &str, body: &str) -> String {
    let p = write(
        dir,
        name,
        format!(
            "import sys, json, time\nfor line in sys.stdin:\n    n = len(json.loads(line)['samples'])\n{body}\n    print(json.dumps({{'scores': scores}}), flush=True)\n"
        )
        .as_bytes(),
    );
    format!(
        "reward=[{{name = \"command\", cmd = [\"python3\", {}], timeout_s = 2}}]",
        q(&p)
    )
}

fn cases(d: &Path) -> Vec<Case> {
    let o = d.join("out");
    let data = |name: &str, bytes: &[u8]| write(d, name, bytes);
    let train = |p: &Path| format!("data.train_file={}", q(p));
    let prompts = |p: &Path| format!("data.prompt_file={}", q(p));
    let model = |p: &Path| format!("model.path={}", q(p));
    let cfg = |name: &str, text: &str| write(d, name, text.as_bytes());

    // Data files.
    let malformed = data(
        "malformed.jsonl",
        b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \n",
    );
    let empty = data("empty.jsonl", b"");
    let blank = data("blank.jsonl", b"\n \n\n");
    let no_completion = data("nocomp.jsonl", b"{\"prompt\": \"a\"}\n");
    let no_prompt = data("noprompt.jsonl", b"{\"completion\": \"a\"}\n");
    let wrong_type = data(
        "wrongtype.jsonl",
        b"{\"prompt\": \"a\", \"completion\": 5}\n",
    );
    let not_utf8 = data(
        "latin1.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n",
    );
    let not_object = data("array.jsonl", b"[1, 2, 3]\n");
    let unknown_shape = data("shape.jsonl", b"{\"question\": \"a\"}\n");
    let msg_type = data(
        "msgtype.jsonl",
        b"{\"messages\": [{\"role\": \"user\", \"content\": 3}]}\n",
    );
    let msg_not_list = data("msglist.jsonl", b"{\"messages\": \"hi\"}\n");
    let msg_no_role = data(
        "msgrole.jsonl",
        b"{\"messages\": [{\"content\": \"hi\"}]}\n",
    );
    let eval_bad = data(
        "evalbad.jsonl",
        b"{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n",
    );
    let p_missing = data("p_missing.jsonl", b"{\"answer\": \"3\"}\n");
    let p_malformed = data("p_malformed.jsonl", b"{\"prompt\": \"1+2=\"\n");
    let p_type = data("p_type.jsonl", b"{\"prompt\": 12}\n");
    let p_few = data(
        "p_few.jsonl",
        b"{\"prompt\": \"1+2=\"}\n{\"prompt\": \"2+2=\"}\n",
    );
    let long_prompt = data(
        "p_long.jsonl",
        format!("{}\n", serde_json::json!({"prompt": "1+2= ".repeat(400)})).as_bytes(),
    );

    // Config files.
    let toml_syntax = cfg("syntax.toml", "[training]\nlearning_rate = = 2\n");
    let toml_unknown = cfg(
        "unknown.toml",
        "[adapter]\nr = 4\ntarget_modulez = [\"q_proj\"]\n",
    );

    // Models.
    let no_config = broken_model(d, "m_noconfig", |p| {
        std::fs::remove_file(p.join("config.json")).unwrap()
    });
    let no_tokenizer = broken_model(d, "m_notok", |p| {
        std::fs::remove_file(p.join("tokenizer.json")).unwrap()
    });
    let no_weights = broken_model(d, "m_noweights", |p| {
        std::fs::remove_file(p.join("model.safetensors")).unwrap()
    });
    let truncated = broken_model(d, "m_trunc", |p| {
        let w = std::fs::read(p.join("model.safetensors")).unwrap();
        std::fs::write(p.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    });
    let bad_json = broken_model(d, "m_badjson", |p| {
        std::fs::write(p.join("config.json"), "{\"model_type\": ").unwrap()
    });
    let unsupported = broken_model(d, "m_t5", |p| {
        let c = std::fs::read_to_string(p.join("config.json")).unwrap();
        std::fs::write(p.join("config.json"), c.replace("\"llama\"", "\"t5\"")).unwrap();
    });
    let wrong_shape = broken_model(d, "m_shape", |p| {
        let c = std::fs::read_to_string(p.join("config.json")).unwrap();
        std::fs::write(
            p.join("config.json"),
            c.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
        )
        .unwrap();
    });
    let bad_template = broken_model(d, "m_template", |p| {
        let path = p.join("tokenizer_config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        c["chat_template"] = serde_json::json!(
            "{% for m in messages %}{{ raise_exception('no chat here') }}{% endfor %}"
        );
        std::fs::write(&path, c.to_string()).unwrap();
    });
    let chat_rows = data("chat.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n");

    // Reward plugins.
    let crash = py_reward(
        d,
        "crash.py",
        "    sys.stderr.write('reward exploded\\n'); sys.exit(3)\n    scores = []",
    );
    let hang = py_reward(d, "hang.py", "    time.sleep(30)\n    scores = [0.0] * n");
    let short = py_reward(d, "short.py", "    scores = [1.0] * (n - 1)");
    let garbage = py_reward(
        d,
        "garbage.py",
        "    print('hello there', flush=True)\n    scores = [0.0] * n",
    );
    let strings = py_reward(d, "strings.py", "    scores = ['high'] * n");

    let file_not_dir = write(d, "a_file", b"x");
    vec![
        // JSONL data: the file, the line and the field.
        case(
            "malformed JSONL line",
            sft(&o, &[train(&malformed)]),
            &["malformed.jsonl:2", "invalid JSON"],
        ),
        case(
            "empty JSONL file",
            sft(&o, &[train(&empty)]),
            &["empty.jsonl", "no examples"],
        ),
        case(
            "only blank lines",
            sft(&o, &[train(&blank)]),
            &["blank.jsonl", "no examples"],
        ),
        case(
            "missing completion",
            sft(&o, &[train(&no_completion)]),
            &["nocomp.jsonl:1", "completion"],
        ),
        case(
            "missing prompt",
            sft(&o, &[train(&no_prompt)]),
            &["noprompt.jsonl:1", "prompt"],
        ),
        case(
            "completion of the wrong type",
            sft(&o, &[train(&wrong_type)]),
            &["wrongtype.jsonl:1", "strings"],
        ),
        case(
            "non-UTF-8 bytes",
            sft(&o, &[train(&not_utf8)]),
            &["latin1.jsonl:2", "UTF-8"],
        ),
        case(
            "a line that is not an object",
            sft(&o, &[train(&not_object)]),
            &["array.jsonl:1"],
        ),
        case(
            "no known row shape",
            sft(&o, &[train(&unknown_shape)]),
            &["shape.jsonl:1", "`messages`"],
        ),
        case(
            "message content of the wrong type",
            sft(&o, &[train(&msg_type)]),
            &["msgtype.jsonl:1", "messages[0].content"],
        ),
        case(
            "messages not a list",
            sft(&o, &[train(&msg_not_list)]),
            &["msglist.jsonl:1", "messages"],
        ),
        case(
            "a message without a role",
            sft(&o, &[train(&msg_no_role)]),
            &["msgrole.jsonl:1", "role"],
        ),
        case(
            "bad line in the eval file",
            sft(&o, &[format!("data.eval_file={}", q(&eval_bad))]),
            &["evalbad.jsonl:2"],
        ),
        case(
            "missing train file",
            sft(&o, &[s("data.train_file=\"nowhere/train.jsonl\"")]),
            &["nowhere/train.jsonl"],
        ),
        case(
            "prompt file without prompts",
            ppo(&o, &[prompts(&p_missing)]),
            &["p_missing.jsonl:1", "prompt"],
        ),
        case(
            "malformed prompt line",
            ppo(&o, &[prompts(&p_malformed)]),
            &["p_malformed.jsonl:1"],
        ),
        case(
            "prompt of the wrong type",
            ppo(&o, &[prompts(&p_type)]),
            &["p_type.jsonl:1", "prompt"],
        ),
        case(
            "fewer prompts than a step needs",
            ppo(&o, &[prompts(&p_few)]),
            &["p_few.jsonl", "fewer than"],
        ),
        case(
            "prompt longer than the positions",
            ppo(&o, &[prompts(&long_prompt)]),
            &["p_long.jsonl"],
        ),
        // Configuration: the key, what was expected, "did you mean".
        case(
            "unknown key",
            sft(&o, &[s("training.lerning_rate=1e-3")]),
            &["lerning_rate", "did you mean `learning_rate`"],
        ),
        case(
            "unknown key in a file",
            vec![s("sft"), s("--config"), toml_unknown.display().to_string()],
            &["unknown.toml", "did you mean `target_modules`"],
        ),
        case(
            "unknown section",
            sft(&o, &[s("trainer.seed=1")]),
            &["trainer", "expected one of"],
        ),
        case(
            "TOML syntax error",
            vec![s("sft"), s("--config"), toml_syntax.display().to_string()],
            &["syntax.toml", "line 2"],
        ),
        case(
            "missing config file",
            vec![s("sft"), s("--config"), s("configs/nope.toml")],
            &["configs/nope.toml"],
        ),
        case(
            "malformed --set",
            sft(&o, &[s("training")]),
            &["--set `training`", "section.key=value"],
        ),
        case(
            "wrong value type",
            sft(&o, &[s("training.learning_rate=\"fast\"")]),
            &["--set training.learning_rate", "expected f64"],
        ),
        case(
            "negative learning rate",
            sft(&o, &[s("training.learning_rate=-1e-3")]),
            &["learning_rate must be ≥ 0"],
        ),
        case(
            "LoRA rank zero",
            sft(&o, &[s("adapter.r=0")]),
            &["adapter.r must be at least 1"],
        ),
        case(
            "dropout out of range",
            sft(&o, &[s("adapter.lora_dropout=1.5")]),
            &["adapter.lora_dropout", "[0, 1)"],
        ),
        case(
            "zero batch",
            sft(&o, &[s("training.per_device_train_batch_size=0")]),
            &["per_device_train_batch_size must be at least 1"],
        ),
        case(
            "unknown optimizer",
            sft(&o, &[s("training.optimizer=\"adamx\"")]),
            &["training.optimizer", "adamw"],
        ),
        case(
            "bad target regex",
            sft(&o, &[s("adapter.target_modules=\"q_proj(\"")]),
            &["target_modules", "q_proj("],
        ),
        case(
            "unknown dtype",
            sft(&o, &[s("model.dtype=\"f8\"")]),
            &["dtype `f8`", "bf16"],
        ),
        case(
            "unknown device",
            sft(&o, &[s("model.device=\"tpu\"")]),
            &["device `tpu`", "cuda"],
        ),
        case(
            "top_p above 1",
            ppo(&o, &[s("generation.top_p=1.5")]),
            &["generation.top_p", "(0, 1]"],
        ),
        case(
            "negative temperature",
            ppo(&o, &[s("generation.temperature=-1")]),
            &["generation.temperature must be ≥ 0"],
        ),
        case(
            "batch not divisible by mini-batches",
            ppo(&o, &[s("rl.num_mini_batches=3")]),
            &["rl.batch_size 8", "num_mini_batches 3"],
        ),
        case(
            "GRPO with one generation",
            ppo(&o, &[s("rl.algorithm=\"grpo\""), s("rl.num_generations=1")]),
            &["rl.num_generations must be at least 2"],
        ),
        case(
            "unknown KL estimator",
            ppo(&o, &[s("rl.kl_estimator=\"k9\"")]),
            &["rl.kl_estimator", "`k3`"],
        ),
        case(
            "unknown reward",
            ppo(&o, &[s("reward=[{name = \"nope\"}]")]),
            &["unknown reward `nope`", "numeric_match"],
        ),
        case(
            "unknown reward option",
            ppo(&o, &[s("reward=[{name = \"regex\", patern = \"x\"}]")]),
            &["option `patern`", "did you mean `pattern`"],
        ),
        // Models and adapters.
        case(
            "missing model folder",
            sft(&o, &[s("model.path=\"no/such/model\"")]),
            &["no/such/model"],
        ),
        case(
            "model without config.json",
            sft(&o, &[model(&no_config)]),
            &["m_noconfig", "config.json"],
        ),
        case(
            "model without tokenizer.json",
            sft(&o, &[model(&no_tokenizer)]),
            &["m_notok", "tokenizer.json"],
        ),
        case(
            "model without weights",
            sft(&o, &[model(&no_weights)]),
            &["m_noweights", "safetensors"],
        ),
        case(
            "truncated safetensors",
            sft(&o, &[model(&truncated)]),
            &["m_trunc", "model.safetensors"],
        ),
        case(
            "malformed config.json",
            sft(&o, &[model(&bad_json)]),
            &["m_badjson", "config.json"],
        ),
        case(
            "unsupported architecture",
            sft(&o, &[model(&unsupported)]),
            &["`t5`", "llama"],
        ),
        case(
            "weight of the wrong shape",
            sft(&o, &[model(&wrong_shape)]),
            &["mlp", "shape"],
        ),
        case(
            "adapter for another architecture",
            vec![
                s("logprobs"),
                s("--model"),
                fixture("llama").display().to_string(),
                s("--adapter"),
                fixture("gpt2-lora").display().to_string(),
                s("--text"),
                s("hello"),
            ],
            &["gpt2-lora", "c_attn"],
        ),
        case(
            "missing adapter folder",
            vec![
                s("logprobs"),
                s("--model"),
                fixture("llama").display().to_string(),
                s("--adapter"),
                s("no/adapter"),
                s("--text"),
                s("hello"),
            ],
            &["no/adapter"],
        ),
        case(
            "sequence longer than the positions",
            vec![
                s("logprobs"),
                s("--model"),
                fixture("llama").display().to_string(),
                s("--text"),
                "1+2= ".repeat(300),
            ],
            &["positions", "256"],
        ),
        case(
            "chat template that fails",
            sft(&o, &[model(&bad_template), train(&chat_rows)]),
            &["chat.jsonl:1", "no chat here"],
        ),
        case(
            "SFT adapter that does not fit",
            ppo(
                &o,
                &[format!("rl.sft_adapter={}", q(&fixture("gpt2-lora")))],
            ),
            &["gpt2-lora"],
        ),
        // Reward plugins.
        case(
            "reward plugin crashes",
            ppo(&o, &[crash]),
            &["crash.py", "reward exploded"],
        ),
        case(
            "reward plugin hangs past its timeout",
            ppo(&o, &[hang]),
            &["hang.py", "did not answer within"],
        ),
        case(
            "reward plugin returns the wrong count",
            ppo(&o, &[short]),
            &["reward `command`", "scores for"],
        ),
        case(
            "reward plugin answers garbage",
            ppo(&o, &[garbage]),
            &["garbage.py", "invalid JSON"],
        ),
        case(
            "reward plugin returns strings",
            ppo(&o, &[strings]),
            &["strings.py", "not a number"],
        ),
        // Resources and outputs.
        case(
            "output_dir under a file",
            sft(&file_not_dir.join("run"), &[]),
            &["a_file/run"],
        ),
        case(
            "resume without a checkpoint",
            {
                let mut a = sft(&d.join("fresh"), &[]);
                a.push(s("--resume"));
                a
            },
            &["--resume", "no checkpoint-N folder"],
        ),
        case(
            "resume from a folder that is not a checkpoint",
            {
                let mut a = sft(&o, &[]);
                a.push(s("--resume=configs"));
                a
            },
            &["--resume configs", "trainer_state.json"],
        ),
        Case {
            name: "batch too large for memory",
            args: sft(&o, &[]),
            env: vec![("RLFT_MEMORY_LIMIT_MB", s("1"))],
            want: vec![
                s("per_device_train_batch_size"),
                s("max_seq_len"),
                s("available"),
            ],
        },
        Case {
            name: "rollouts too large for memory",
            args: ppo(
                &o,
                &[
                    s("rl.batch_size=32"),
                    s("rl.num_mini_batches=4"),
                    s("generation.max_new_tokens=200"),
                    s("model.max_seq_len=256"),
                ],
            ),
            env: vec![("RLFT_MEMORY_LIMIT_MB", s("1"))],
            want: vec![s("rl.batch_size"), s("max_new_tokens")],
        },
        case(
            "generate: top_p out of range",
            vec![
                s("generate"),
                s("--model"),
                fixture("llama").display().to_string(),
                s("--prompt"),
                s("hi"),
                s("--top-p"),
                s("2"),
            ],
            &["top_p", "(0, 1]"],
        ),
        case("unknown subcommand", vec![s("trian")], &["trian"]),
    ]
}

fn run(c: &Case) -> Output {
    let mut cmd = bin();
    cmd.args(&c.args);
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn every_bad_input_is_explained_without_a_panic() {
    let tmp = TempDir::new("bad-inputs");
    let all = cases(&tmp.0);
    assert!(all.len() >= 40, "{} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        let o = run(c);
        let err = stderr(&o);
        let problems: Vec<String> = [
            (o.status.success()).then(|| "exited 0".to_string()),
            (o.status.code().is_none()).then(|| "killed by a signal".to_string()),
            (err.contains("panicked") || err.contains("RUST_BACKTRACE"))
                .then(|| "panicked".to_string()),
        ]
        .into_iter()
        .flatten()
        .chain(
            c.want
                .iter()
                .filter(|w| !err.contains(w.as_str()))
                .map(|w| format!("stderr lacks `{w}`")),
        )
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n--- stderr:\n{err}",
                c.name,
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

fn hidden_leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".checkpoint-"))
        .collect()
}

/// A tmpfs of `size`, unmounted when dropped. None where mounting is not allowed (not root,
/// or a container without CAP_SYS_ADMIN): the disk-full tests then say so and return.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (needs root); the disk-full test did not run"
            );
        }
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 16 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn sft_long(out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["sft", "--config", "configs/sft.toml", "--quiet"])
        .arg(format!("--set=training.output_dir={}", q(out)))
        .args([
            "--set=training.max_steps=300",
            "--set=training.save_steps=5",
            "--set=training.save_total_limit=2",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_full_disk_is_caught_before_training_and_mid_run_loses_nothing() {
    let tmp = TempDir::new("disk-full");
    // Before training: a disk too small for two checkpoints of a fully trained model.
    if let Some(tiny) = SmallDisk::mount(&tmp.0.join("tiny"), "256k") {
        let o = bin()
            .args(sft(&tiny.0.join("run"), &[s("adapter.trainable=\"full\"")]))
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(
            err.contains("tiny/run") && err.contains("MiB free") && err.contains("output_dir"),
            "{err}"
        );
        assert!(
            !tiny.0.join("run").join("metrics.jsonl").exists(),
            "failed before training started"
        );
    } else {
        return;
    }
    let reference = tmp.0.join("reference");
    let o = sft_long(&reference, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // Mid-run: the disk fills after the first checkpoint.
    let disk = SmallDisk::mount(&tmp.0.join("disk"), "8m").unwrap();
    let out = disk.0.join("run");
    let mut child = sft_long(&out, &[]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("checkpoint-5").is_dir() {
        assert!(t0.elapsed().as_secs() < 60, "no first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let filler = disk.fill();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the run cannot finish on a full disk");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("the disk is full")
            && err.contains("--resume")
            && err.contains("newest complete checkpoint"),
        "{err}"
    );
    let kept = complete_checkpoints(&out);
    assert!(!kept.is_empty(), "the completed checkpoints survive");
    assert!(
        hidden_leftovers(&out).is_empty(),
        "partial checkpoint left: {:?}",
        hidden_leftovers(&out)
    );

    // Space freed: resuming reaches the adapter of the run that was never interrupted.
    std::fs::remove_file(filler).unwrap();
    let o = sft_long(&out, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let a = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a(&out) == a(&reference),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn nan_rewards_skip_the_update_and_repeated_ones_stop_the_run_with_a_checkpoint() {
    let tmp = TempDir::new("nan-reward");
    let d = &tmp.0;
    // NaN on the first training batch only (8 rollouts; the eval set has 16 prompts).
    let once = py_reward(
        d,
        "nan_once.py",
        "    global calls\n    calls = globals().get('calls', 0) + (n == 8)\n    scores = [float('nan')] * n if (n == 8 and calls == 1) else [0.5] * n",
    );
    let o = bin()
        .args(ppo(&d.join("once"), &[once, s("training.max_steps=3")]))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("step 1: reward `command` returned a non-finite score (NaN)")
            && err.contains("update skipped"),
        "{err}"
    );
    assert!(d.join("once/adapter/adapter_model.safetensors").is_file());

    // NaN every time: after max_bad_steps the run stops, keeping a complete checkpoint.
    let always = py_reward(
        d,
        "nan_always.py",
        "    scores = [float('nan') if n == 8 else 0.5] * n",
    );
    let out = d.join("always");
    let o = bin()
        .args(ppo(
            &out,
            &[
                always,
                s("training.max_steps=10"),
                s("training.max_bad_steps=3"),
            ],
        ))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("3 consecutive bad steps")
            && err.contains("NaN")
            && err.contains("last good state"),
        "{err}"
    );
    assert_eq!(err.matches("update skipped").count(), 3, "{err}");
    assert!(!complete_checkpoints(&out).is_empty());
}

#[test]
fn an_overflowing_learning_rate_is_caught_and_stops_with_a_checkpoint() {
    let tmp = TempDir::new("overflow");
    let out = tmp.0.join("run");
    let o = bin()
        .args(sft(
            &out,
            &[
                s("training.learning_rate=1e30"),
                s("training.warmup_ratio=0.0"),
                s("training.max_steps=50"),
                s("training.max_bad_steps=3"),
            ],
        ))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    // Each bad update is logged with its step and cause, then the run stops.
    assert!(
        err.contains("non-finite loss") && err.contains("update skipped"),
        "{err}"
    );
    assert!(
        err.contains("3 consecutive bad steps")
            && err.contains("a non-finite loss or gradient norm"),
        "{err}"
    );
    let kept = complete_checkpoints(&out);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        err.contains(&format!("checkpoint-{}", kept[0])),
        "the message names the checkpoint: {err}"
    );

    // The same in RL (GRPO): skipped updates, then a stop with a checkpoint.
    let out = tmp.0.join("grpo");
    let mut args: Vec<String> = ["grpo", "--config", "configs/grpo.toml", "--quiet"]
        .map(String::from)
        .to_vec();
    args.extend(
        [
            format!("training.output_dir={}", q(&out)),
            s("training.learning_rate=1e30"),
            s("training.max_bad_steps=2"),
            s("data.eval_file=\"\""),
        ]
        .map(|x| format!("--set={x}")),
    );
    let o = bin().args(&args).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("non-finite policy loss") && err.contains("update skipped"),
        "{err}"
    );
    assert!(err.contains("2 consecutive bad steps"), "{err}");
    let kept = complete_checkpoints(&out);
    let last = format!("checkpoint-{}", kept.last().unwrap());
    assert!(err.contains(&last), "{err}");
}
