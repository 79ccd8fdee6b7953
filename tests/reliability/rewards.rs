//! Rewards: unknown names and options in the config, and `command` plugins that crash, hang,
//! or answer the wrong thing (the error names the plugin's script).

use super::*;

bad_input!(unknown_reward, |d| case(
    "unknown reward",
    ppo(&out(d), &[s("reward=[{name = \"nope\"}]")]),
    &["unknown reward `nope`", "numeric_match"],
));

bad_input!(unknown_reward_option, |d| case(
    "unknown reward option",
    ppo(&out(d), &[s("reward=[{name = \"regex\", patern = \"x\"}]")]),
    &["option `patern`", "did you mean `pattern`"],
));

bad_input!(reward_plugin_crashes, |d| case(
    "reward plugin crashes",
    ppo(
        &out(d),
        &[py_reward(
            d,
            "crash.py",
            "    sys.stderr.write('reward exploded\\n'); sys.exit(3)\n    scores = []",
        )],
    ),
    &["crash.py", "reward exploded"],
));

bad_input!(reward_plugin_hangs_past_its_timeout, |d| case(
    "reward plugin hangs past its timeout",
    ppo(
        &out(d),
        &[py_reward(
            d,
            "hang.py",
            "    time.sleep(30)\n    scores = [0.0] * n"
        )],
    ),
    &["hang.py", "did not answer within"],
));

bad_input!(reward_plugin_returns_the_wrong_count, |d| case(
    "reward plugin returns the wrong count",
    ppo(
        &out(d),
        &[py_reward(d, "short.py", "    scores = [1.0] * (n - 1)")],
    ),
    &["reward `command`", "scores for"],
));

bad_input!(reward_plugin_answers_garbage, |d| case(
    "reward plugin answers garbage",
    ppo(
        &out(d),
        &[py_reward(
            d,
            "garbage.py",
            "    print('hello there', flush=True)\n    scores = [0.0] * n",
        )],
    ),
    &["garbage.py", "invalid JSON"],
));

bad_input!(reward_plugin_returns_strings, |d| case(
    "reward plugin returns strings",
    ppo(
        &out(d),
        &[py_reward(d, "strings.py", "    scores = ['high'] * n")],
    ),
    &["strings.py", "not a number"],
));
