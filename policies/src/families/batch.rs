//! Model input for a (left-padded) batch: token ids, positions, which tokens are real, and
//! the additive attention bias built from them.

use crate::error::{PolicyError, Result};
use candle_core::{Device, Tensor};

pub struct BatchInput {
    /// `[b, t]` u32.
    pub ids: Tensor,
    /// `[b, t]` u32: position of each token counted over real tokens only.
    pub positions: Tensor,
    /// `[b][t]`: false for padding.
    pub valid: Vec<Vec<bool>>,
    /// Largest position in the batch (checked against the model's limit).
    pub max_position: usize,
    /// `[b][t]` for a packed batch, where a row holds a shared prefix and several
    /// continuations of it ([`BatchInput::packed`]): 0 for the prefix, k ≥ 1 for the k-th
    /// continuation. `None`: one sequence per row.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl BatchInput {
    /// Left-pads `rows` to the longest with `pad_id`; positions are
    /// `cumsum(mask) − 1` (padding gets 0), as transformers derives them from the mask.
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        if rows.is_empty() || rows.iter().any(Vec::is_empty) {
            return Err(PolicyError::InvalidArgument(
                "a batch needs at least one sequence and no empty sequence".into(),
            ));
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut pos = Vec::with_capacity(rows.len() * t);
        let mut valid = Vec::with_capacity(rows.len());
        for r in rows {
            let pad = t - r.len();
            ids.extend(std::iter::repeat_n(pad_id, pad).chain(r.iter().copied()));
            pos.extend(std::iter::repeat_n(0u32, pad).chain(0..r.len() as u32));
            valid.push((0..t).map(|j| j >= pad).collect());
        }
        Self::from_parts(ids, pos, valid, device)
    }

    /// Rows of equal length with an explicit validity mask (e.g. a left-padded prompt
    /// followed by a right-padded response); positions count valid tokens only.
    pub fn with_mask(rows: &[Vec<u32>], valid: Vec<Vec<bool>>, device: &Device) -> Result<Self> {
        let t = rows.first().map_or(0, Vec::len);
        if rows.is_empty()
            || t == 0
            || rows.iter().any(|r| r.len() != t)
            || valid.len() != rows.len()
        {
            return Err(PolicyError::InvalidArgument(
                "with_mask needs non-empty rows of equal length and one mask row each".into(),
            ));
        }
        let mut pos = Vec::with_capacity(rows.len() * t);
        for v in &valid {
            let mut n = 0u32;
            for &k in v {
                // A real token's position counts the real tokens before it; padding gets 0
                // (it is never attended to).
                pos.push(if k { n } else { 0 });
                n += u32::from(k);
            }
        }
        let ids = rows.iter().flatten().copied().collect();
        Self::from_parts(ids, pos, valid, device)
    }

    /// One or more new tokens per sequence at the given positions (cached decoding).
    pub fn from_parts(
        ids: Vec<u32>,
        positions: Vec<u32>,
        valid: Vec<Vec<bool>>,
        device: &Device,
    ) -> Result<Self> {
        let b = valid.len();
        let t = ids.len() / b.max(1);
        let max_position = positions.iter().copied().max().unwrap_or(0) as usize;
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(positions, (b, t), device)?,
            valid,
            max_position,
            segments: None,
        })
    }

    /// A packed batch: [`BatchInput::from_parts`] with each token's segment (0: the row's
    /// shared prefix, k ≥ 1: its k-th continuation). A token attends the prefix and its own
    /// continuation only ([`packed_attention_bias`]), so each continuation computes what it
    /// would after the prefix in a row of its own, the prefix once for all of them.
    pub fn packed(
        ids: Vec<u32>,
        positions: Vec<u32>,
        valid: Vec<Vec<bool>>,
        segments: Vec<Vec<u32>>,
        device: &Device,
    ) -> Result<Self> {
        let t = valid.first().map_or(0, Vec::len);
        if segments.len() != valid.len() || segments.iter().any(|s| s.len() != t) {
            return Err(PolicyError::InvalidArgument(
                "a packed batch needs one segment per token".into(),
            ));
        }
        let mut input = Self::from_parts(ids, positions, valid, device)?;
        input.segments = Some(segments);
        Ok(input)
    }

    pub fn batch_size(&self) -> usize {
        self.valid.len()
    }

    pub fn seq_len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }
}

/// Additive attention bias `[b, 1, t, s]` (0 or −∞) for `t` new queries at absolute
/// offsets `offset..offset+t` over `s` keys whose validity is `keys[b][..s]`.
///
/// Key j is visible to query i when j ≤ i (causal), key j is a real token, and, with a
/// sliding window w, i − j < w. A query always sees itself, so no row is empty (padding
/// queries attend to themselves; their outputs are never used).
pub fn attention_bias(
    keys: &[Vec<bool>],
    t: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = keys.len();
    let s = keys.first().map_or(0, Vec::len);
    let mut bias = vec![f32::NEG_INFINITY; b * t * s];
    for (bi, row) in keys.iter().enumerate() {
        for qi in 0..t {
            let i = offset + qi;
            let base = (bi * t + qi) * s;
            for j in 0..=i.min(s.saturating_sub(1)) {
                let in_window = window.is_none_or(|w| i - j < w);
                if (row[j] && in_window) || j == i {
                    bias[base + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, s), device)?)
}

/// [`attention_bias`] for a packed batch without a cache, `[b, 1, t, t]`: key j is visible
/// to query i when j ≤ i, key j is a real token, j is in the shared prefix (segment 0) or in
/// i's own segment, and, with a sliding window w, `pos_i − pos_j < w`. In a row of its own
/// the real tokens are contiguous, so that position distance is the index distance
/// [`attention_bias`] measures: each continuation sees exactly the keys it would there. A
/// query always sees itself.
pub fn packed_attention_bias(
    valid: &[Vec<bool>],
    segments: &[Vec<u32>],
    positions: &[Vec<u32>],
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = valid.len();
    let t = valid.first().map_or(0, Vec::len);
    let mut bias = vec![f32::NEG_INFINITY; b * t * t];
    for bi in 0..b {
        let (ok, seg, pos) = (&valid[bi], &segments[bi], &positions[bi]);
        for i in 0..t {
            let base = (bi * t + i) * t;
            for j in 0..=i {
                let same = seg[j] == 0 || seg[j] == seg[i];
                let in_window = window.is_none_or(|w| (pos[i] as usize) < pos[j] as usize + w);
                if (ok[j] && same && in_window) || j == i {
                    bias[base + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_positions_and_mask() {
        let dev = Device::Cpu;
        let m = BatchInput::with_mask(
            &[vec![0, 5, 6, 0]],
            vec![vec![false, true, true, false]],
            &dev,
        )
        .unwrap();
        assert_eq!(
            m.positions.to_vec2::<u32>().unwrap(),
            vec![vec![0, 0, 1, 0]]
        );
        let b = BatchInput::left_padded(&[vec![5, 6, 7], vec![9]], 0, &dev).unwrap();
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![0, 0, 9]]
        );
        assert_eq!(
            b.positions.to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 2], vec![0, 0, 0]]
        );
        let bias = attention_bias(&b.valid, 3, 0, None, &dev).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ninf = f32::NEG_INFINITY;
        // Row 0: plain causal.
        assert_eq!(&v[0..9], &[0.0, ninf, ninf, 0.0, 0.0, ninf, 0.0, 0.0, 0.0]);
        // Row 1: the real token (key 2) sees only itself; padding queries see themselves.
        assert_eq!(
            &v[9..18],
            &[0.0, ninf, ninf, ninf, 0.0, ninf, ninf, ninf, 0.0]
        );
    }

    /// A packed row `[p0 p1 | a0 a1 | b0]` (prefix, continuations a and b) sees what the rows
    /// `[p0 p1 a0 a1]` and `[p0 p1 b0]` see, with and without a window of 2.
    #[test]
    fn packed_rows_attend_their_prefix_and_themselves() {
        let dev = Device::Cpu;
        let valid = vec![vec![true; 5]];
        let seg = vec![vec![0, 0, 1, 1, 2]];
        let pos = vec![vec![0, 1, 2, 3, 2]];
        let ninf = f32::NEG_INFINITY;
        let got = |w| {
            packed_attention_bias(&valid, &seg, &pos, w, &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let z = 0.0;
        #[rustfmt::skip]
        let full = [
            z, ninf, ninf, ninf, ninf,
            z, z, ninf, ninf, ninf,
            z, z, z, ninf, ninf,
            z, z, z, z, ninf,
            z, z, ninf, ninf, z,
        ];
        assert_eq!(got(None), full);
        #[rustfmt::skip]
        let window = [
            z, ninf, ninf, ninf, ninf,
            z, z, ninf, ninf, ninf,
            ninf, z, z, ninf, ninf,
            ninf, ninf, z, z, ninf,
            ninf, z, ninf, ninf, z,
        ];
        assert_eq!(got(Some(2)), window);
        let err = BatchInput::packed(
            vec![1; 5],
            vec![0; 5],
            valid.clone(),
            vec![vec![0; 4]],
            &dev,
        );
        assert!(err.is_err());
    }

    #[test]
    fn sliding_window_hides_old_keys() {
        let dev = Device::Cpu;
        let keys = vec![vec![true; 4]];
        let bias = attention_bias(&keys, 1, 3, Some(2), &dev).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], f32::NEG_INFINITY);
        assert_eq!(v[1], f32::NEG_INFINITY);
        assert_eq!(&v[2..4], &[0.0, 0.0]);
    }
}
