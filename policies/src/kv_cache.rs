//! Per-layer key/value caches, preallocated to the longest sequence a generation can reach,
//! plus which cached positions are real tokens (left padding is not).

use candle_core::{Result, Tensor};

pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    /// `[batch][cached position]`: false for left padding.
    valid: Vec<Vec<bool>>,
    max_len: usize,
}

impl KvCache {
    /// A cache for `num_layers` layers holding up to `max_len` positions.
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, max_len))
                .collect(),
            valid: Vec::new(),
            max_len,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Validity of every key: the cached ones followed by `new`.
    pub(crate) fn push_valid(&mut self, new: &[Vec<bool>]) -> &[Vec<bool>] {
        if self.valid.is_empty() {
            self.valid = vec![Vec::new(); new.len()];
        }
        for (row, add) in self.valid.iter_mut().zip(new) {
            row.extend_from_slice(add);
        }
        &self.valid
    }

    /// A cache of `rows.len()` rows, row `i` a copy of this cache's row `rows[i]` (`idx`: the
    /// same indices as a u32 tensor on the cache's device), with room for as many positions.
    pub fn select_rows(&self, rows: &[u32], idx: &Tensor) -> Result<Self> {
        let mut out = Self::new(self.layers.len(), self.max_len);
        for (layer, into) in self.layers.iter().zip(out.layers.iter_mut()) {
            if let (Some(k), Some(v)) = (layer.k()?, layer.v()?) {
                into.append(
                    &k.contiguous()?.index_select(idx, 0)?,
                    &v.contiguous()?.index_select(idx, 0)?,
                )?;
            }
        }
        out.valid = rows
            .iter()
            .map(|&r| self.valid[r as usize].clone())
            .collect();
        Ok(out)
    }

    /// Appends this step's keys and values `[b, kv_heads, t, d]` to layer `i`; returns all
    /// cached keys and values.
    pub(crate) fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.layers[i].append(&k.contiguous()?, &v.contiguous()?)
    }
}
