//! N ranks as threads of one process: the [`Collective`] the data-parallel tests run on
//! without MPI. Each operation is a round: every rank deposits its buffer, the last to
//! arrive combines them in rank order (so results do not depend on arrival), every rank
//! takes the result, and the last to take it opens the next round.

use super::Collective;
use anyhow::{bail, Result};
use std::sync::{Arc, Condvar, Mutex};

pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
    size: usize,
}

struct Shared {
    round: Mutex<Round>,
    changed: Condvar,
}

#[derive(Default)]
struct Round {
    parts: Vec<Option<Vec<f64>>>,
    result: Option<Vec<f64>>,
    taken: usize,
    aborted: bool,
}

impl ThreadGroup {
    /// The `size` ranks of a new group, rank `i` at index `i`.
    pub fn new(size: usize) -> Vec<Arc<ThreadGroup>> {
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                parts: vec![None; size],
                ..Round::default()
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| {
                Arc::new(ThreadGroup {
                    shared: shared.clone(),
                    rank,
                    size,
                })
            })
            .collect()
    }

    /// One round: deposits `mine`, and when every rank has, `combine` makes the result.
    fn round(&self, mine: Vec<f64>, combine: impl Fn(&[Vec<f64>]) -> Vec<f64>) -> Result<Vec<f64>> {
        let s = &self.shared;
        let mut r = s.round.lock().unwrap_or_else(|e| e.into_inner());
        // Wait for the previous round to be taken by every rank.
        while (r.result.is_some() || r.parts[self.rank].is_some()) && !r.aborted {
            r = s.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        if r.aborted {
            bail!("another rank failed");
        }
        r.parts[self.rank] = Some(mine);
        if r.parts.iter().all(Option::is_some) {
            let parts: Vec<Vec<f64>> = r
                .parts
                .iter_mut()
                .map(|p| p.take().unwrap_or_default())
                .collect();
            // Keep every slot marked until the round is taken.
            for p in r.parts.iter_mut() {
                *p = Some(Vec::new());
            }
            r.result = Some(combine(&parts));
            s.changed.notify_all();
        }
        while r.result.is_none() && !r.aborted {
            r = s.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        if r.aborted {
            bail!("another rank failed");
        }
        let out = r.result.clone().unwrap_or_default();
        r.taken += 1;
        if r.taken == self.size {
            r.taken = 0;
            r.result = None;
            for p in r.parts.iter_mut() {
                *p = None;
            }
            s.changed.notify_all();
        }
        Ok(out)
    }
}

fn sum_in_rank_order(parts: &[Vec<f64>]) -> Vec<f64> {
    let mut out = parts[0].clone();
    for p in &parts[1..] {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
    out
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        let sums = self.round(buf.iter().map(|&x| x as f64).collect(), sum_in_rank_order)?;
        for (b, s) in buf.iter_mut().zip(sums) {
            *b = s as f32;
        }
        Ok(())
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        let sums = self.round(buf.to_vec(), sum_in_rank_order)?;
        buf.copy_from_slice(&sums);
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        let v = self.round(buf.to_vec(), |parts| parts[root].clone())?;
        buf.copy_from_slice(&v);
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} threads", self.size)
    }
    /// Wakes every waiting rank with an error; the caller returns its own.
    fn abort(&self, _code: i32) {
        let mut r = self.shared.round.lock().unwrap_or_else(|e| e.into_inner());
        r.aborted = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sum_and_broadcast_round_after_round() {
        let group = ThreadGroup::new(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..50 {
                        let mut v = [g.rank() as f64 + round as f64, 1.0];
                        g.all_reduce_f64(&mut v).unwrap();
                        out.push(v);
                        let mut b = [g.rank() as f64 * 10.0];
                        g.broadcast_f64(&mut b, 2).unwrap();
                        assert_eq!(b[0], 20.0);
                    }
                    out
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            for (round, v) in out.iter().enumerate() {
                assert_eq!(v, &[3.0 + 3.0 * round as f64, 3.0]);
            }
        }
    }

    #[test]
    fn an_abort_releases_the_waiting_ranks() {
        let group = ThreadGroup::new(2);
        let g1 = group[1].clone();
        let waiter = std::thread::spawn(move || g1.all_reduce_f64(&mut [1.0]));
        std::thread::sleep(std::time::Duration::from_millis(20));
        group[0].abort(1);
        let err = waiter.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("another rank failed"), "{err}");
    }
}
