//! What the blocks of one forward pass share: its attention — the composed ops' biases (full
//! and per sliding window), or for long sequences on the CPU the fused kernel's per-token
//! mask — and the rotary tables at the batch's positions. [`CausalLm::embed`] builds it
//! once; every block reads it.
//!
//! [`CausalLm::embed`]: super::CausalLm::embed

use super::attention::attend;
use super::batch::{attention_bias, packed_attention_bias, BatchInput};
use super::ModelInfo;
use crate::error::{PolicyError, Result};
use crate::kv_cache::KvCache;
use crate::ops::flash_attention::{
    flash_attention, uses_fused_attention, AttentionMask, Operands, Tiles,
};
use candle_core::Tensor;

pub struct PassCtx {
    attention: Plan,
    /// Rotary `(cos, sin)` at the batch's positions (rotary families only).
    pub rope: Option<(Tensor, Tensor)>,
}

/// How the pass's attention runs.
enum Plan {
    /// The composed ops with additive biases `[b, 1, t, s]` (0 where a query may attend a
    /// key, −∞ elsewhere): the full one and one per distinct sliding window.
    Composed {
        bias: Tensor,
        window_biases: Vec<(usize, Tensor)>,
    },
    /// The fused kernel ([`flash_attention`]) with the mask described per token: no
    /// `[t, s]` tensor is built (long sequences on the CPU); its operands rounded to bf16
    /// for a bf16 model.
    Fused(AttentionMask, Operands),
}

impl PassCtx {
    /// Checks `input`'s positions against the model (and what `cache` already holds), records
    /// the new keys' validity in `cache`, and prepares the attention over all keys for the
    /// full attention and every window in `windows` (`None`: full attention).
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
        let s = keys.first().map_or(0, Vec::len);
        if uses_fused_attention(dev, t, s) {
            return Ok(Self::fused(
                info,
                AttentionMask {
                    batch: keys.len(),
                    queries: t,
                    keys: s,
                    offset,
                    key_valid: keys.concat(),
                    segments: None,
                    positions: None,
                    window: None,
                },
            ));
        }
        Self::with_biases(windows, |w| attention_bias(&keys, t, offset, w, dev))
    }

    /// [`PassCtx::new`] for a packed batch: the masks of [`packed_attention_bias`].
    fn packed(
        info: &ModelInfo,
        input: &BatchInput,
        segments: &[Vec<u32>],
        windows: impl IntoIterator<Item = Option<usize>>,
    ) -> Result<Self> {
        let positions: Vec<Vec<u32>> = input.positions.to_vec2()?;
        let dev = &info.device;
        let (b, t) = (input.batch_size(), input.seq_len());
        if uses_fused_attention(dev, t, t) {
            return Ok(Self::fused(
                info,
                AttentionMask {
                    batch: b,
                    queries: t,
                    keys: t,
                    offset: 0,
                    key_valid: input.valid.concat(),
                    segments: Some(segments.concat()),
                    positions: Some(positions.concat()),
                    window: None,
                },
            ));
        }
        Self::with_biases(windows, |w| {
            packed_attention_bias(&input.valid, segments, &positions, w, dev)
        })
    }

    fn fused(info: &ModelInfo, mask: AttentionMask) -> Self {
        let operands = if info.weight_dtype == candle_core::DType::BF16 {
            Operands::Bf16
        } else {
            Operands::AsGiven
        };
        Self {
            attention: Plan::Fused(mask, operands),
            rope: None,
        }
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
            attention: Plan::Composed {
                bias: bias(None)?,
                window_biases,
            },
            rope: None,
        })
    }

    /// Whether this pass runs the fused attention.
    pub fn is_fused(&self) -> bool {
        matches!(self.attention, Plan::Fused(..))
    }

    /// Attention of `q` `[b, h, t, d]` over `k`, `v` `[b, kv, s, d]` for a layer with sliding
    /// window `window` (`None`: full attention); `[b, t, h·d]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
        scale: f64,
    ) -> Result<Tensor> {
        match &self.attention {
            Plan::Composed {
                bias,
                window_biases,
            } => {
                let bias = match window {
                    None => bias,
                    Some(w) => window_biases
                        .iter()
                        .find(|(ww, _)| *ww == w)
                        .map(|(_, b)| b)
                        .ok_or_else(|| {
                            PolicyError::InvalidArgument(format!(
                                "no attention bias for a window of {w} in this pass"
                            ))
                        })?,
                };
                Ok(attend(q, k, v, bias, scale)?)
            }
            Plan::Fused(mask, operands) => {
                let mask = AttentionMask {
                    window,
                    ..mask.clone()
                };
                Ok(flash_attention(
                    q,
                    k,
                    v,
                    &mask,
                    scale,
                    Tiles::default(),
                    *operands,
                )?)
            }
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
