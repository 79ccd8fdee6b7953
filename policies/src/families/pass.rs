//! What the blocks of one forward pass share: the attention biases (full and per sliding
//! window) and the rotary tables at the batch's positions. [`CausalLm::embed`] builds it
//! once; every block reads it.
//!
//! [`CausalLm::embed`]: super::CausalLm::embed

use super::batch::{attention_bias, packed_attention_bias, BatchInput};
use super::ModelInfo;
use crate::error::{PolicyError, Result};
use crate::kv_cache::KvCache;
use candle_core::Tensor;

pub struct PassCtx {
    /// `[b, 1, t, s]`: 0 where a query may attend a key (causal, not padding), −∞ elsewhere.
    pub bias: Tensor,
    /// The same with a sliding window, one per distinct window size the layers use.
    pub window_biases: Vec<(usize, Tensor)>,
    /// Rotary `(cos, sin)` at the batch's positions (rotary families only).
    pub rope: Option<(Tensor, Tensor)>,
}

impl PassCtx {
    /// Checks `input`'s positions against the model (and what `cache` already holds), records
    /// the new keys' validity in `cache`, and builds the biases over all keys for the full
    /// attention and every window in `windows` (`None`: full attention).
    pub(crate) fn new(
        info: &ModelInfo,
        input: &BatchInput,
        cache: Option<&mut KvCache>,
        windows: impl IntoIterator<Item = Option<usize>>,
    ) -> Result<Self> {
        let t = input.seq_len();
        let offset = cache.as_ref().map_or(0, |c| c.len());
        check_positions(info, input, offset + t)?;
        if let Some(segments) = &input.segments {
            if cache.is_some() {
                return Err(PolicyError::InvalidArgument(
                    "a packed batch (shared prefixes) runs without a KV cache".into(),
                ));
            }
            return Self::packed(info, input, segments, windows);
        }
        let keys: Vec<Vec<bool>> = match cache {
            Some(c) => c.push_valid(&input.valid).to_vec(),
            None => input.valid.clone(),
        };
        let dev = &info.device;
        Self::with_biases(windows, |w| attention_bias(&keys, t, offset, w, dev))
    }

    /// [`PassCtx::new`] for a packed batch: the biases of [`packed_attention_bias`].
    fn packed(
        info: &ModelInfo,
        input: &BatchInput,
        segments: &[Vec<u32>],
        windows: impl IntoIterator<Item = Option<usize>>,
    ) -> Result<Self> {
        let positions: Vec<Vec<u32>> = input.positions.to_vec2()?;
        let dev = &info.device;
        Self::with_biases(windows, |w| {
            packed_attention_bias(&input.valid, segments, &positions, w, dev)
        })
    }

    /// The full bias and one per distinct window in `windows`, each made by `bias`.
    fn with_biases(
        windows: impl IntoIterator<Item = Option<usize>>,
        bias: impl Fn(Option<usize>) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut window_biases: Vec<(usize, Tensor)> = Vec::new();
        for w in windows.into_iter().flatten() {
            if !window_biases.iter().any(|(ww, _)| *ww == w) {
                window_biases.push((w, bias(Some(w))?));
            }
        }
        Ok(Self {
            bias: bias(None)?,
            window_biases,
            rope: None,
        })
    }

    /// The bias for a layer with sliding window `window` (`None`: full attention).
    pub fn bias(&self, window: Option<usize>) -> Result<&Tensor> {
        match window {
            None => Ok(&self.bias),
            Some(w) => self
                .window_biases
                .iter()
                .find(|(ww, _)| *ww == w)
                .map(|(_, b)| b)
                .ok_or_else(|| {
                    PolicyError::InvalidArgument(format!(
                        "no attention bias for a window of {w} in this pass"
                    ))
                }),
        }
    }

    /// The rotary `(cos, sin)` tables.
    pub fn rope(&self) -> Result<(&Tensor, &Tensor)> {
        self.rope
            .as_ref()
            .map(|(c, s)| (c, s))
            .ok_or_else(|| PolicyError::InvalidArgument("this pass has no rotary tables".into()))
    }
}

/// Errors when a batch reaches past the model's position table.
pub(crate) fn check_positions(
    info: &ModelInfo,
    input: &BatchInput,
    offset_len: usize,
) -> Result<()> {
    let longest = input.max_position + 1;
    if longest > info.max_positions || offset_len > info.max_positions {
        return Err(PolicyError::InvalidArgument(format!(
            "sequence of {} tokens is longer than the model's {} positions (max_position_embeddings); shorten it or lower max_seq_len",
            longest.max(offset_len),
            info.max_positions
        )));
    }
    Ok(())
}
