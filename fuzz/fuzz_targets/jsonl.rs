//! Any bytes as a JSONL data file: parsed into rows, each row tokenized as an SFT example
//! (prompt/completion, messages through the chat template, text) and read as an RL prompt.
//! Either a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rlft::policies::Tokenizer;
use std::path::Path;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama"))
            .expect("fixture tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(rows) = rlft::data::parse_jsonl(data, Path::new("fuzz.jsonl")) else {
        return;
    };
    for row in &rows {
        for completion_only in [true, false] {
            let _ = rlft::data::sft::tokenize(row, tokenizer(), completion_only, 64);
        }
        let _ = rlft::data::prompts::prompt_from_row(row, tokenizer(), 64);
    }
});
