//! Batches too large for memory (`RLFT_MEMORY_LIMIT_MB`): stopped before the first step, the
//! error names the settings to lower.

use super::*;

bad_input!(batch_too_large_for_memory, |d| Case {
    name: "batch too large for memory",
    args: sft(&out(d), &[]),
    env: vec![("RLFT_MEMORY_LIMIT_MB", s("1"))],
    want: vec![
        s("per_device_train_batch_size"),
        s("max_seq_len"),
        s("available"),
    ],
});

bad_input!(rollouts_too_large_for_memory, |d| Case {
    name: "rollouts too large for memory",
    args: ppo(
        &out(d),
        &[
            s("rl.batch_size=32"),
            s("rl.num_mini_batches=4"),
            s("generation.max_new_tokens=200"),
            s("model.max_seq_len=256"),
        ],
    ),
    env: vec![("RLFT_MEMORY_LIMIT_MB", s("1"))],
    want: vec![s("rl.batch_size"), s("max_new_tokens")],
});
