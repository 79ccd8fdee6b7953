//! A reward of your own, in Rust: implement `Reward`, register it under a name, and hand over
//! to rlft's command line. Then use it from any RL config:
//!
//! ```toml
//! [[reward]]
//! name = "digit_share"
//! ignore_spaces = true
//! ```
//!
//! Run: `cargo run --release --example custom_reward -- grpo --config configs/grpo.toml \
//!       --set 'reward=[{name = "digit_share"}]'`

use rlft::rewards::default_registry;
use rlft_reward::{Options, Reward, RewardError, Sample};

/// The share of the completion's characters that are ASCII digits.
struct DigitShare {
    ignore_spaces: bool,
}

impl Reward for DigitShare {
    fn name(&self) -> &str {
        "digit_share"
    }

    fn score(&self, samples: &[Sample]) -> Result<Vec<f64>, RewardError> {
        Ok(samples
            .iter()
            .map(|s| {
                let chars: Vec<char> = s
                    .completion
                    .chars()
                    .filter(|c| !(self.ignore_spaces && c.is_whitespace()))
                    .collect();
                let digits = chars.iter().filter(|c| c.is_ascii_digit()).count();
                digits as f64 / chars.len().max(1) as f64
            })
            .collect())
    }
}

fn main() -> std::process::ExitCode {
    let mut registry = default_registry();
    registry.register("digit_share", |o: &Options| {
        o.allow_only(&["ignore_spaces"])?;
        Ok(Box::new(DigitShare {
            ignore_spaces: o.bool_or("ignore_spaces", true)?,
        }))
    });
    rlft::cli::main_with_registry(std::env::args_os(), registry)
}
