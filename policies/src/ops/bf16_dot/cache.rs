//! Packed copies of frozen bf16 weights, kept across products so that a weight is packed
//! once, not at every product: a training step multiplies each weight three times (forward,
//! input gradient, the recomputed forward of checkpointing) and every step again. Each
//! entry holds a clone of its weight tensor, so the storage it was packed from stays alive
//! and its address cannot be reused by another weight while the entry exists. The entries
//! share a budget (`RLFT_PACK_CACHE_MB`, default 1,024; 0 turns the cache off), the least
//! recently used going first; a weight larger than the budget is packed per product.

use candle_core::Tensor;
use std::sync::{Arc, Mutex};

/// Which packing: for `x · wᵀ` ([`super::pack_t`]) or for `dy · w` ([`super::pack_n`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Packing {
    T,
    N,
}

struct Entry {
    /// Keeps the packed storage alive (see the module's note).
    _weight: Tensor,
    /// The first bf16 value's address and the value count: the identity of the weight.
    at: (usize, usize),
    packing: Packing,
    steps: usize,
    packed: Arc<Vec<u32>>,
    last_used: u64,
}

struct Cache {
    entries: Vec<Entry>,
    clock: u64,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    entries: Vec::new(),
    clock: 0,
});

/// The budget in bytes (what the cache may hold at most).
pub fn budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var("RLFT_PACK_CACHE_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1024)
            << 20
    })
}

/// The packing of `bits` (the values of `weight`, [n, k]) with `steps` steps, from the cache
/// or made by `pack` and kept; None when it does not fit the budget, or when `weight` is not
/// contiguous (its values were copied for this product: nothing to key them by).
pub fn get_or_pack(
    weight: &Tensor,
    bits: &[u16],
    packing: Packing,
    steps: usize,
    len: usize,
    pack: impl FnOnce(&mut [u32]),
) -> Option<Arc<Vec<u32>>> {
    let bytes = 4 * len;
    if bytes > budget() || !weight.is_contiguous() {
        return None;
    }
    let at = (bits.as_ptr() as usize, bits.len());
    let find = |c: &mut Cache| {
        c.clock += 1;
        let now = c.clock;
        c.entries
            .iter_mut()
            .find(|e| e.at == at && e.packing == packing && e.steps == steps)
            .map(|e| {
                e.last_used = now;
                e.packed.clone()
            })
    };
    if let Some(p) = find(&mut CACHE.lock().unwrap_or_else(|e| e.into_inner())) {
        return Some(p);
    }
    // Packed outside the lock: other threads' products go on meanwhile.
    let mut packed = vec![0u32; len];
    pack(&mut packed);
    let packed = Arc::new(packed);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find(&mut c) {
        return Some(p); // another thread packed it first
    }
    let mut held: usize = c.entries.iter().map(|e| 4 * e.packed.len()).sum();
    while held + bytes > budget() {
        let Some(oldest) = (0..c.entries.len()).min_by_key(|&i| c.entries[i].last_used) else {
            break;
        };
        held -= 4 * c.entries.swap_remove(oldest).packed.len();
    }
    let now = c.clock;
    c.entries.push(Entry {
        _weight: weight.clone(),
        at,
        packing,
        steps,
        packed: packed.clone(),
        last_used: now,
    });
    Some(packed)
}

/// Drops every entry (and the weights they keep alive).
pub fn clear() {
    CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entries
        .clear();
}
