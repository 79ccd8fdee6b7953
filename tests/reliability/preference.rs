//! Preference data and the `rm` / `dpo` stages: the error names the file, the line and the
//! field, or the key.

use super::*;

fn dpo(out: &Path, sets: &[String]) -> Vec<String> {
    stage("dpo", out, sets)
}

fn rm(out: &Path, sets: &[String]) -> Vec<String> {
    stage("rm", out, sets)
}

fn stage(name: &str, out: &Path, sets: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [name, "--config", &format!("configs/{name}.toml"), "--quiet"]
        .map(String::from)
        .to_vec();
    a.push(format!("--set=training.output_dir={}", q(out)));
    a.push("--set=training.max_steps=2".into());
    a.extend(sets.iter().map(|s| format!("--set={s}")));
    a
}

bad_input!(pair_without_rejected, |d| {
    case(
    "pair without rejected",
    dpo(
        &out(d),
        &[train_file(&write(
            d,
            "pairs_missing.jsonl",
            b"{\"prompt\": \"1+2=\", \"chosen\": \"3\", \"rejected\": \"4\"}\n{\"prompt\": \"1+3=\", \"chosen\": \"4\"}\n"
        ))],
    ),
    &["pairs_missing.jsonl:2", "rejected", "missing"],
)
});

bad_input!(pair_preferring_nothing, |d| case(
    "pair preferring nothing",
    rm(
        &out(d),
        &[train_file(&write(
            d,
            "pairs_same.jsonl",
            b"{\"prompt\": \"1+2=\", \"chosen\": \"3\", \"rejected\": \"3\"}\n"
        ))],
    ),
    &["pairs_same.jsonl:1", "rejected", "the same as `chosen`"],
));

bad_input!(pair_without_a_shared_prefix, |d| case(
    "implicit prompt without a shared prefix",
    dpo(
        &out(d),
        &[train_file(&write(
            d,
            "pairs_prefix.jsonl",
            b"{\"chosen\": \"abc\", \"rejected\": \"xyz\"}\n"
        ))],
    ),
    &["pairs_prefix.jsonl:1", "chosen", "no implicit prompt"],
));

bad_input!(pair_field_of_the_wrong_type, |d| case(
    "pair field of the wrong type",
    rm(
        &out(d),
        &[train_file(&write(
            d,
            "pairs_type.jsonl",
            b"{\"prompt\": \"1+2=\", \"chosen\": 3, \"rejected\": \"4\"}\n"
        ))],
    ),
    &["pairs_type.jsonl:1", "chosen"],
));

bad_input!(margin_that_is_not_a_number, |d| {
    case(
    "margin that is not a number",
    rm(
        &out(d),
        &[train_file(&write(
            d,
            "pairs_margin.jsonl",
            b"{\"prompt\": \"1+2=\", \"chosen\": \"3\", \"rejected\": \"4\", \"margin\": \"big\"}\n"
        ))],
    ),
    &["pairs_margin.jsonl:1", "margin"],
)
});

bad_input!(empty_preference_file, |d| case(
    "empty preference file",
    dpo(&out(d), &[train_file(&write(d, "pairs_empty.jsonl", b""))]),
    &["pairs_empty.jsonl", "the file is empty"],
));

bad_input!(unknown_dpo_key, |d| case(
    "unknown dpo key",
    dpo(&out(d), &[s("dpo.bta=0.2")]),
    &["bta", "beta"],
));

bad_input!(unknown_dpo_loss_type, |d| case(
    "unknown dpo loss type",
    dpo(&out(d), &[s("dpo.loss_type=\"kto\"")]),
    &["dpo.loss_type", "sigmoid, hinge or ipo"],
));

bad_input!(reward_adapter_without_a_head, |d| case(
    "a causal-LM adapter as a reward model",
    ppo(
        &out(d),
        &[format!(
            "reward=[{{name = \"model\", path = {}, base = {}}}]",
            q(&fixture("llama-lora")),
            q(&fixture("llama"))
        )],
    ),
    &["not a reward model", "score"],
));
