//! RL prompt files (JSONL): the error names the file, the line and the field.

use super::*;

bad_input!(prompt_file_without_prompts, |d| case(
    "prompt file without prompts",
    ppo(
        &out(d),
        &[prompt_file(&write(
            d,
            "p_missing.jsonl",
            b"{\"answer\": \"3\"}\n"
        ))],
    ),
    &["p_missing.jsonl:1", "prompt"],
));

bad_input!(malformed_prompt_line, |d| case(
    "malformed prompt line",
    ppo(
        &out(d),
        &[prompt_file(&write(
            d,
            "p_malformed.jsonl",
            b"{\"prompt\": \"1+2=\"\n"
        ))],
    ),
    &["p_malformed.jsonl:1"],
));

bad_input!(prompt_of_the_wrong_type, |d| case(
    "prompt of the wrong type",
    ppo(
        &out(d),
        &[prompt_file(&write(
            d,
            "p_type.jsonl",
            b"{\"prompt\": 12}\n"
        ))],
    ),
    &["p_type.jsonl:1", "prompt"],
));

bad_input!(fewer_prompts_than_a_step_needs, |d| case(
    "fewer prompts than a step needs",
    ppo(
        &out(d),
        &[prompt_file(&write(
            d,
            "p_few.jsonl",
            b"{\"prompt\": \"1+2=\"}\n{\"prompt\": \"2+2=\"}\n",
        ))],
    ),
    &["p_few.jsonl", "fewer than"],
));

bad_input!(prompt_longer_than_the_positions, |d| case(
    "prompt longer than the positions",
    ppo(
        &out(d),
        &[prompt_file(&write(
            d,
            "p_long.jsonl",
            format!("{}\n", serde_json::json!({"prompt": "1+2= ".repeat(400)})).as_bytes(),
        ))],
    ),
    &["p_long.jsonl"],
));
