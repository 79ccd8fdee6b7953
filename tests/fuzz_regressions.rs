//! The fuzz targets' bodies on stable, over their seeds and inputs that once were, or are
//! likely to be, trouble (scripts/fuzz.sh runs the real fuzzing; a crash it finds goes in
//! `TRICKY_*` here before it is fixed). Each input must give a value or an error that names
//! the file — never a panic.

mod common;
use common::*;
use rlft::config::{from_text, rl::RlConfig, sft::SftConfig};
use rlft::policies::Tokenizer;
use std::path::Path;

const TRICKY_JSONL: &[&[u8]] = &[
    b"",
    b"\n\n\n",
    b"\xff\xfe\x00",
    b"{\"prompt\": \"\", \"completion\": \"\"}",
    b"{\"text\": \"\"}",
    b"{\"messages\": []}",
    b"{\"messages\": [{}]}",
    b"{\"messages\": [{\"role\": \"user\"}]}",
    b"{\"messages\": [{\"role\": 1, \"content\": \"x\"}]}",
    b"{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"\"}]}",
    b"{\"prompt\": [], \"completion\": []}",
    b"{\"prompt\": [{\"role\": \"user\", \"content\": \"a\"}], \"completion\": \"b\"}",
    b"{\"prompt\": \"a\", \"completion\": \"b\", \"messages\": \"c\"}",
    b"{\"prompt\": \"\\u0000\\ud800\", \"completion\": \"x\"}",
    b"{\"prompt\": 1e999, \"completion\": \"x\"}",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]",
    b"{\"text\": \"{{ raise_exception('x') }}{% for %}\"}",
];

const TRICKY_TOML: &[&str] = &[
    "",
    "[training]\nlearning_rate = nan\n",
    "[training]\nlearning_rate = inf\nmax_steps = -1\n",
    "[training]\nper_device_train_batch_size = 18446744073709551615\n",
    "[adapter]\nr = 0\ntarget_modules = \"(\"\n",
    "[[reward]]\n[[reward]]\nname = 1\n",
    "[rl]\nnum_generations = 0\nbatch_size = 0\nnum_mini_batches = 0\n",
    "[generation]\ntop_p = -0.0\ntop_k = -1\ntemperature = nan\n",
    "model = 3\n",
    "[model.path]\nx = 1\n",
    "training.seed=1",
    "a.b.c.d.e=1",
    "=",
];

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&fixture("llama")).unwrap()
}

fn jsonl(tok: &Tokenizer, bytes: &[u8]) {
    let path = Path::new("fuzz.jsonl");
    match rlft::data::parse_jsonl(bytes, path) {
        Err(e) => assert!(e.to_string().contains("fuzz.jsonl"), "{e}"),
        Ok(rows) => {
            for row in &rows {
                for completion_only in [true, false] {
                    if let Err(e) = rlft::data::sft::tokenize(row, tok, completion_only, 64) {
                        assert!(format!("{e:#}").contains("fuzz.jsonl:"), "{e:#}");
                    }
                }
                if let Err(e) = rlft::data::prompts::prompt_from_row(row, tok, 64) {
                    assert!(format!("{e:#}").contains("fuzz.jsonl:"), "{e:#}");
                }
            }
        }
    }
}

fn config(text: &str) {
    match from_text::<SftConfig>(text, "fuzz.toml", &[], &[]) {
        Ok(c) => {
            let _ = c.validate();
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml"), "{e}"),
    }
    if let Ok(c) = from_text::<RlConfig>(text, "fuzz.toml", &["rl.algorithm=\"grpo\""], &[]) {
        let _ = c.validate();
    }
    let _ = from_text::<SftConfig>("", "fuzz.toml", &[], &[text.to_string()]);
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect()
}

#[test]
fn jsonl_seeds_and_tricky_inputs_give_values_or_named_errors() {
    let tok = tokenizer();
    let seeds = seeds("jsonl");
    assert!(seeds.len() >= 3);
    for s in &seeds {
        // The seeds are valid data: they parse.
        assert!(rlft::data::parse_jsonl(s, Path::new("seed.jsonl")).is_ok());
        jsonl(&tok, s);
    }
    for t in TRICKY_JSONL {
        jsonl(&tok, t);
    }
}

#[test]
fn config_seeds_and_tricky_inputs_give_values_or_named_errors() {
    for s in seeds("config") {
        let text = String::from_utf8(s).unwrap();
        config(&text);
    }
    for t in TRICKY_TOML {
        config(t);
    }
    // Non-finite numbers are refused by validation, not accepted silently.
    let c: SftConfig =
        from_text("[training]\nlearning_rate = nan\n", "fuzz.toml", &[], &[]).unwrap();
    assert!(c.validate().is_err());
}
