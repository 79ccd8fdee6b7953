//! Adapters: a missing folder, or one that does not fit the model. The error names the
//! adapter.

use super::*;

bad_input!(adapter_for_another_architecture, |_d| case(
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
));

bad_input!(missing_adapter_folder, |_d| case(
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
));

bad_input!(sft_adapter_that_does_not_fit, |d| case(
    "SFT adapter that does not fit",
    ppo(
        &out(d),
        &[format!("rl.sft_adapter={}", q(&fixture("gpt2-lora")))],
    ),
    &["gpt2-lora"],
));
