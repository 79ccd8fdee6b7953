//! Training the demo's byte-level BPE tokenizer (digits always single tokens) and writing
//! the tokenizer files a Hugging Face folder needs.

use anyhow::{anyhow, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

pub const SPECIALS: [&str; 3] = ["<pad>", "<s>", "</s>"];

/// Trains on `texts` and writes tokenizer.json, tokenizer_config.json and
/// special_tokens_map.json into `dir`. Returns the vocabulary size.
pub fn train(texts: &[String], vocab_size: usize, dir: &Path) -> Result<usize> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let bos = tok
        .token_to_id("<s>")
        .ok_or_else(|| anyhow!("no <s> after training"))?;
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow!("{e}"))?
        .special_tokens(vec![("<s>", bos)])
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    tok.with_post_processor(Some(post));
    std::fs::create_dir_all(dir)?;
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("saving tokenizer.json: {e}"))?;
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": null,
        "model_max_length": 128,
        "padding_side": "left",
        "clean_up_tokenization_spaces": false,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}",
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    let map = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"});
    std::fs::write(
        dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&map)?,
    )?;
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
        )?,
    )?;
    Ok(tok.get_vocab_size(true))
}
