//! `model_type: "mistral"`: the Llama block with an optional sliding attention window.

use super::llama::base_spec;
use super::rotary::RotaryDecoder;
use super::ConfigReader;
use crate::error::Result;
use crate::weights::WeightFiles;

pub(super) fn load(r: &ConfigReader, w: &WeightFiles) -> Result<RotaryDecoder> {
    let mut spec = base_spec(r, "mistral", 10000.0)?;
    let window = r.opt_usize("sliding_window")?;
    spec.layer_windows = vec![window; spec.num_layers];
    RotaryDecoder::load(spec, w)
}
