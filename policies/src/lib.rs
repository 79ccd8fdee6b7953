//! `rlft-policies`: causal language models from Hugging Face folders, LoRA adapters in
//! PEFT's format, training-ready log-probs and batched KV-cached generation.
//!
//! One loaded model serves every role: the active adapter is passed with each forward
//! pass ([`ForwardCtx`]), so the reference model is the same base tensors with no adapter.

pub mod backward;
pub mod chat_template;
pub mod ctx;
pub mod device;
pub mod error;
pub mod families;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod init;
pub mod kv_cache;
pub mod linear;
pub mod logprobs;
pub mod lora;
pub mod ops;
pub mod params;
pub mod pretrained;
pub mod quant;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use ctx::ForwardCtx;
pub use error::{PolicyError, Result};
pub use families::{BatchInput, CausalLm, ModelInfo};
pub use generate::{generate, generate_unshared, score, Generation, GenerationConfig};
pub use lora::{Adapter, LoraConfig, Targets};
pub use pretrained::Pretrained;
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;

pub use candle_core;
