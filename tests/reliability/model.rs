//! Model folders: missing or damaged files, unsupported architectures, the positions limit
//! and a chat template that raises. The error names the folder and the file.

use super::*;

/// Args for `rlft logprobs` on the llama fixture.
fn logprobs(extra: &[String]) -> Vec<String> {
    let mut a = vec![
        s("logprobs"),
        s("--model"),
        fixture("llama").display().to_string(),
    ];
    a.extend_from_slice(extra);
    a
}

bad_input!(missing_model_folder, |d| case(
    "missing model folder",
    sft(&out(d), &[s("model.path=\"no/such/model\"")]),
    &["no/such/model"],
));

bad_input!(model_without_config_json, |d| case(
    "model without config.json",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_noconfig", |p| {
            std::fs::remove_file(p.join("config.json")).unwrap()
        }))],
    ),
    &["m_noconfig", "config.json"],
));

bad_input!(model_without_tokenizer_json, |d| case(
    "model without tokenizer.json",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_notok", |p| {
            std::fs::remove_file(p.join("tokenizer.json")).unwrap()
        }))],
    ),
    &["m_notok", "tokenizer.json"],
));

bad_input!(model_without_weights, |d| case(
    "model without weights",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_noweights", |p| {
            std::fs::remove_file(p.join("model.safetensors")).unwrap()
        }))],
    ),
    &["m_noweights", "safetensors"],
));

bad_input!(truncated_safetensors, |d| case(
    "truncated safetensors",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_trunc", |p| {
            let w = std::fs::read(p.join("model.safetensors")).unwrap();
            std::fs::write(p.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
        }))],
    ),
    &["m_trunc", "model.safetensors"],
));

bad_input!(malformed_config_json, |d| case(
    "malformed config.json",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_badjson", |p| {
            std::fs::write(p.join("config.json"), "{\"model_type\": ").unwrap()
        }))],
    ),
    &["m_badjson", "config.json"],
));

bad_input!(unsupported_architecture, |d| case(
    "unsupported architecture",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_t5", |p| {
            let c = std::fs::read_to_string(p.join("config.json")).unwrap();
            std::fs::write(p.join("config.json"), c.replace("\"llama\"", "\"t5\"")).unwrap();
        }))],
    ),
    &["`t5`", "llama"],
));

bad_input!(weight_of_the_wrong_shape, |d| case(
    "weight of the wrong shape",
    sft(
        &out(d),
        &[model_path(&broken_model(d, "m_shape", |p| {
            let c = std::fs::read_to_string(p.join("config.json")).unwrap();
            std::fs::write(
                p.join("config.json"),
                c.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
            )
            .unwrap();
        }))],
    ),
    &["mlp", "shape"],
));

bad_input!(sequence_longer_than_the_positions, |_d| case(
    "sequence longer than the positions",
    logprobs(&[s("--text"), "1+2= ".repeat(300)]),
    &["positions", "256"],
));

bad_input!(chat_template_that_fails, |d| {
    case(
    "chat template that fails",
    sft(
        &out(d),
        &[
            model_path(&broken_model(d, "m_template", |p| {
                let path = p.join("tokenizer_config.json");
                let mut c: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                c["chat_template"] = serde_json::json!(
                    "{% for m in messages %}{{ raise_exception('no chat here') }}{% endfor %}"
                );
                std::fs::write(&path, c.to_string()).unwrap();
            })),
            train_file(&write(
                d,
                "chat.jsonl",
                b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
            )),
        ],
    ),
    &["chat.jsonl:1", "no chat here"],
)
});
