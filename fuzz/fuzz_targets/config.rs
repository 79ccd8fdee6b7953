//! Any text as an `rlft sft` or `rlft ppo` TOML config (and as a `--set` override): parsed,
//! overlaid on the defaults and validated. Either a config or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rlft::config::{from_text, rl::RlConfig, sft::SftConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = from_text::<SftConfig>(text, "fuzz.toml", &[], &[]) {
        let _ = c.validate();
    }
    if let Ok(c) = from_text::<RlConfig>(text, "fuzz.toml", &["rl.algorithm=\"grpo\""], &[]) {
        let _ = c.validate();
    }
    // The same text as one --set override.
    let _ = from_text::<SftConfig>("", "fuzz.toml", &[], &[text.to_string()]);
});
