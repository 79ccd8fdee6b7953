//! Configuration (files and `--set`): the error names the key, what was expected, and
//! "did you mean" for a misspelling.

use super::*;

bad_input!(unknown_key, |d| case(
    "unknown key",
    sft(&out(d), &[s("training.lerning_rate=1e-3")]),
    &["lerning_rate", "did you mean `learning_rate`"],
));

bad_input!(unknown_key_in_a_file, |d| case(
    "unknown key in a file",
    vec![
        s("sft"),
        s("--config"),
        write(
            d,
            "unknown.toml",
            b"[adapter]\nr = 4\ntarget_modulez = [\"q_proj\"]\n",
        )
        .display()
        .to_string(),
    ],
    &["unknown.toml", "did you mean `target_modules`"],
));

bad_input!(unknown_section, |d| case(
    "unknown section",
    sft(&out(d), &[s("trainer.seed=1")]),
    &["trainer", "expected one of"],
));

bad_input!(toml_syntax_error, |d| case(
    "TOML syntax error",
    vec![
        s("sft"),
        s("--config"),
        write(d, "syntax.toml", b"[training]\nlearning_rate = = 2\n")
            .display()
            .to_string(),
    ],
    &["syntax.toml", "line 2"],
));

bad_input!(missing_config_file, |_d| case(
    "missing config file",
    vec![s("sft"), s("--config"), s("configs/nope.toml")],
    &["configs/nope.toml"],
));

bad_input!(malformed_set, |d| case(
    "malformed --set",
    sft(&out(d), &[s("training")]),
    &["--set `training`", "section.key=value"],
));

bad_input!(wrong_value_type, |d| case(
    "wrong value type",
    sft(&out(d), &[s("training.learning_rate=\"fast\"")]),
    &["--set training.learning_rate", "expected f64"],
));

bad_input!(negative_learning_rate, |d| case(
    "negative learning rate",
    sft(&out(d), &[s("training.learning_rate=-1e-3")]),
    &["learning_rate must be ≥ 0"],
));

bad_input!(lora_rank_zero, |d| case(
    "LoRA rank zero",
    sft(&out(d), &[s("adapter.r=0")]),
    &["adapter.r must be at least 1"],
));

bad_input!(dropout_out_of_range, |d| case(
    "dropout out of range",
    sft(&out(d), &[s("adapter.lora_dropout=1.5")]),
    &["adapter.lora_dropout", "[0, 1)"],
));

bad_input!(zero_batch, |d| case(
    "zero batch",
    sft(&out(d), &[s("training.per_device_train_batch_size=0")]),
    &["per_device_train_batch_size must be at least 1"],
));

bad_input!(unknown_optimizer, |d| case(
    "unknown optimizer",
    sft(&out(d), &[s("training.optimizer=\"adamx\"")]),
    &["training.optimizer", "adamw"],
));

bad_input!(bad_target_regex, |d| case(
    "bad target regex",
    sft(&out(d), &[s("adapter.target_modules=\"q_proj(\"")]),
    &["target_modules", "q_proj("],
));

bad_input!(unknown_dtype, |d| case(
    "unknown dtype",
    sft(&out(d), &[s("model.dtype=\"f8\"")]),
    &["dtype `f8`", "bf16"],
));

bad_input!(unknown_device, |d| case(
    "unknown device",
    sft(&out(d), &[s("model.device=\"tpu\"")]),
    &["device `tpu`", "cuda"],
));

bad_input!(top_p_above_1, |d| case(
    "top_p above 1",
    ppo(&out(d), &[s("generation.top_p=1.5")]),
    &["generation.top_p", "(0, 1]"],
));

bad_input!(negative_temperature, |d| case(
    "negative temperature",
    ppo(&out(d), &[s("generation.temperature=-1")]),
    &["generation.temperature must be ≥ 0"],
));

bad_input!(batch_not_divisible_by_mini_batches, |d| case(
    "batch not divisible by mini-batches",
    ppo(&out(d), &[s("rl.num_mini_batches=3")]),
    &["rl.batch_size 8", "num_mini_batches 3"],
));

bad_input!(grpo_with_one_generation, |d| case(
    "GRPO with one generation",
    ppo(
        &out(d),
        &[s("rl.algorithm=\"grpo\""), s("rl.num_generations=1")],
    ),
    &["rl.num_generations must be at least 2"],
));

bad_input!(unknown_kl_estimator, |d| case(
    "unknown KL estimator",
    ppo(&out(d), &[s("rl.kl_estimator=\"k9\"")]),
    &["rl.kl_estimator", "`k3`"],
));

bad_input!(zero_max_bad_steps, |d| case(
    "max_bad_steps of 0",
    sft(&out(d), &[s("training.max_bad_steps=0")]),
    &["training.max_bad_steps must be at least 1"],
));

bad_input!(zero_save_total_limit, |d| case(
    "save_total_limit of 0",
    sft(&out(d), &[s("training.save_total_limit=0")]),
    &["training.save_total_limit must be at least 1"],
));

bad_input!(rl_eval_steps_moved_to_training, |d| case(
    "rl.eval_steps (one eval_steps: training.eval_steps)",
    ppo(&out(d), &[s("rl.eval_steps=5")]),
    &[
        "unknown field `eval_steps`",
        "it is now `training.eval_steps`"
    ],
));
