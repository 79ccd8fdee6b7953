//! LoRA adapters in PEFT's format (see docs/ALGORITHMS.md §1).

mod adapter;
mod config;

pub use adapter::{Adapter, LoraModule, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
pub use config::{LoraConfig, LoraInit, Targets};
