//! The order examples (or prompts) are visited in: epoch after epoch, each a seeded
//! permutation, addressed by a position in the stream so a resumed run continues exactly.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub struct DataOrder {
    n: usize,
    batch: usize,
    seed: u64,
    shuffle: bool,
    /// Skip an epoch's last, smaller batch (RL steps need full batches).
    drop_last: bool,
    cached: Option<(u64, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(n: usize, batch: usize, seed: u64, shuffle: bool) -> Self {
        Self {
            n,
            batch,
            seed,
            shuffle,
            drop_last: false,
            cached: None,
        }
    }

    /// Every batch full-sized; the remainder of each epoch is skipped.
    pub fn drop_last(mut self) -> Self {
        self.drop_last = true;
        self
    }

    /// Batches per epoch (the last may be smaller).
    pub fn per_epoch(&self) -> u64 {
        if self.drop_last {
            (self.n / self.batch).max(1) as u64
        } else {
            self.n.div_ceil(self.batch) as u64
        }
    }

    /// The `accum` micro-batches of one optimizer step, from `position` on; advances it.
    pub fn step_batches(&mut self, position: &mut u64, accum: u64) -> Vec<Vec<usize>> {
        let batches = (0..accum).map(|k| self.batch(*position + k)).collect();
        *position += accum;
        batches
    }

    /// Indices of batch number `position` of the stream.
    pub fn batch(&mut self, position: u64) -> Vec<usize> {
        let epoch = position / self.per_epoch();
        let k = (position % self.per_epoch()) as usize;
        if self.cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            if self.shuffle {
                let mix = self.seed ^ 0x5eed_0000_0000 ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix));
            }
            self.cached = Some((epoch, perm));
        }
        let perm = &self.cached.as_ref().expect("set above").1;
        perm[k * self.batch..((k + 1) * self.batch).min(self.n)].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_visits_every_index_once() {
        let mut o = DataOrder::new(10, 4, 1, true);
        for epoch in 0..3u64 {
            let mut seen: Vec<usize> = (0..3).flat_map(|k| o.batch(epoch * 3 + k)).collect();
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(o.batch(0), o.batch(3), "epochs are reshuffled");
        let mut again = DataOrder::new(10, 4, 1, true);
        assert_eq!(
            again.batch(4),
            o.batch(4),
            "a position names the same batch"
        );
    }
}
