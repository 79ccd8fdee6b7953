//! Data parallelism: N processes (ranks) train one model, each on its share of every batch,
//! and sum their gradients once per optimizer step (docs/distributed.md).
//!
//! Every rank holds the frozen base and the same adapter; the only traffic is the
//! [`Collective`]'s all-reduce of the flattened trainable gradients (and a few scalars: loss
//! sums, token counts, the stop flag). The training code asks [`world`] for the collective:
//! - [`SingleProcess`]: one rank, every operation the identity (the default, and every test
//!   that does not ask for more);
//! - `mpi::MpiWorld` (`--features mpi`): the ranks `mpirun` / `srun` started;
//! - [`threads::ThreadGroup`]: N ranks as threads of one process, for tests
//!   ([`with_world`] sets a thread's rank).

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod threads;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

/// The operations data parallelism needs. Sums are element-wise over ranks; every rank gets
/// the same result. Every rank must make the same calls in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank `root`'s `buf` into every rank's.
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()>;
    /// `t` (contiguous) summed over ranks where it lies, when this collective can do that on
    /// its device (NCCL on a GPU); `None`: the caller sums through the host.
    fn all_reduce_tensor(&self, _t: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// "single process", "MPI (Open MPI …)", …
    fn describe(&self) -> String;
    /// Stops every rank (after a rank's error, so the others do not wait for it forever).
    fn abort(&self, code: i32);
}

/// One process: rank 0 of 1.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&self, _: &mut [f64], _: usize) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
    fn abort(&self, code: i32) {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Arc<dyn Collective>> = OnceLock::new();

thread_local! {
    static OVERRIDE: RefCell<Option<Arc<dyn Collective>>> = const { RefCell::new(None) };
}

/// The environment variables an MPI launcher sets: Open MPI's `mpirun`, PMI (MPICH's hydra,
/// Slurm's `--mpi=pmi2`) and PMIx (Slurm's `--mpi=pmix`, Open MPI 5).
const LAUNCHER_SIZE: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// How many ranks the launcher says there are (1 when not launched by one).
pub fn launched_size() -> usize {
    LAUNCHER_SIZE
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(1)
}

/// Ranks on this machine, as the launcher says (1 when not launched by one).
pub fn local_size() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PMIX_LOCAL_SIZE",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
    .unwrap_or(1)
}

/// Starts the process's collective, once, at start-up: MPI when the build has it and a
/// launcher started this process, else one rank. A launch of several ranks by a build
/// without MPI is an error (the ranks would train N separate models into one folder).
pub fn init() -> Result<()> {
    #[cfg(feature = "mpi")]
    if launched_size() > 1 || std::env::var_os("PMIX_RANK").is_some() {
        let w = mpi::MpiWorld::init()?;
        let _ = WORLD.set(Arc::new(w));
        return Ok(());
    }
    if launched_size() > 1 {
        bail!(
            "launched as one of {} ranks, but this rlft was built without MPI: rebuild it with `cargo build --release --features mpi` (docs/distributed.md)",
            launched_size()
        );
    }
    let _ = WORLD.set(Arc::new(SingleProcess));
    Ok(())
}

/// Ends MPI (if it was started) before the process exits.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    mpi::finalize();
}

/// The collective of this thread: [`with_world`]'s, else the process's (one rank when
/// [`init`] has not run).
pub fn world() -> Arc<dyn Collective> {
    if let Some(w) = OVERRIDE.with(|o| o.borrow().clone()) {
        return w;
    }
    WORLD.get_or_init(|| Arc::new(SingleProcess)).clone()
}

/// Runs `f` with `w` as this thread's collective (in-process ranks: [`threads`]).
pub fn with_world<R>(w: Arc<dyn Collective>, f: impl FnOnce() -> R) -> R {
    let prev = OVERRIDE.with(|o| o.replace(Some(w)));
    let out = f();
    OVERRIDE.with(|o| *o.borrow_mut() = prev);
    out
}

/// Rank 0 writes checkpoints, metrics, logs and outputs.
pub fn is_main() -> bool {
    world().rank() == 0
}

/// Sums `grads` (same shapes on every rank) over ranks as one flat buffer — one all-reduce
/// of the gradients per optimizer step — and then the few `scalars` beside them. f64
/// tensors (f64 test models) reduce in f64, the rest in f32.
pub fn all_reduce_grads(grads: &mut [Tensor], scalars: &mut [f64]) -> Result<()> {
    let w = world();
    if w.size() == 1 {
        return Ok(());
    }
    // One flat buffer: f64 for f64 models, else f32.
    let dtype = if grads.iter().any(|g| g.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let parts: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_dtype(dtype)?.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let flat = Tensor::cat(&parts, 0)?;
    // On its device when the collective can (NCCL on a GPU), else through the host.
    let sum = match w.all_reduce_tensor(&flat)? {
        Some(sum) => sum,
        None if dtype == DType::F64 => {
            let mut v = flat.to_vec1::<f64>()?;
            w.all_reduce_f64(&mut v)?;
            Tensor::from_slice(&v, v.len(), flat.device())?
        }
        None => {
            let mut v = flat.to_vec1::<f32>()?;
            w.all_reduce_f32(&mut v)?;
            Tensor::from_slice(&v, v.len(), flat.device())?
        }
    };
    let mut at = 0;
    for g in grads.iter_mut() {
        let n = g.elem_count();
        *g = sum
            .narrow(0, at, n)?
            .reshape(g.dims())?
            .to_dtype(g.dtype())?;
        at += n;
    }
    // Scalars (loss sums, counts) in f64.
    w.all_reduce_f64(scalars)
}

/// Sums `v` over ranks.
pub fn sum(v: &mut [f64]) -> Result<()> {
    world().all_reduce_f64(v)
}

/// Every rank's `v` (any lengths), in rank order, on every rank: an all-gather made of two
/// sums (the lengths, then each rank's values at its offset in a zero buffer). For the few
/// numbers metrics need (a step's extremes, a window's sums).
pub fn all_gather(v: &[f64]) -> Result<Vec<Vec<f64>>> {
    let w = world();
    if w.size() == 1 {
        return Ok(vec![v.to_vec()]);
    }
    let mut lens = vec![0f64; w.size()];
    lens[w.rank()] = v.len() as f64;
    w.all_reduce_f64(&mut lens)?;
    let lens: Vec<usize> = lens.iter().map(|&n| n as usize).collect();
    let offset: usize = lens[..w.rank()].iter().sum();
    let mut all = vec![0f64; lens.iter().sum()];
    all[offset..offset + v.len()].copy_from_slice(v);
    w.all_reduce_f64(&mut all)?;
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for n in lens {
        out.push(all[at..at + n].to_vec());
        at += n;
    }
    Ok(out)
}

/// Whether any rank says `flag` (e.g. a stop requested by a signal one rank received).
pub fn any(flag: bool) -> Result<bool> {
    let mut v = [f64::from(u8::from(flag))];
    sum(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Rank 0's values of `vars` into every rank's (the adapter at step 0, so every rank starts
/// from the same weights whatever its seed or CPU).
pub fn broadcast_vars(vars: &[(String, Var)]) -> Result<()> {
    let w = world();
    if w.size() == 1 {
        return Ok(());
    }
    for (_, v) in vars {
        let t = v.as_tensor();
        let mut flat = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        w.broadcast_f64(&mut flat, 0)?;
        let back = Tensor::from_vec(flat, t.dims(), t.device())?.to_dtype(t.dtype())?;
        v.set(&back)?;
    }
    Ok(())
}

/// This rank's share of `items`: the `rank`-th of `size` contiguous slices (the first ones
/// one longer when they do not divide evenly), so the concatenation over ranks is `items`.
pub fn shard<T: Clone>(items: &[T], rank: usize, size: usize) -> Vec<T> {
    let (n, size) = (items.len(), size.max(1));
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    items[start.min(n)..(start + len).min(n)].to_vec()
}

/// This rank's non-empty slices of a step's global batches ([`shard`] of each).
pub fn my_slices(batches: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let w = world();
    batches
        .iter()
        .map(|b| shard(b, w.rank(), w.size()))
        .filter(|b| !b.is_empty())
        .collect()
}

/// The dropout generator's seed for `rank` at `step` when there are several ranks: its own
/// stream per (seed, rank, step), so no rank's position needs checkpointing.
pub fn rank_seed(seed: u64, rank: usize, step: u64) -> u64 {
    seed ^ (rank as u64 + 1).wrapping_mul(0xd6e8_feb8_6659_fd93)
        ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Refuses a resume written by another number of ranks (the data and dropout streams
/// would not continue).
pub fn check_resume_size(saved: Option<usize>, dir: &std::path::Path) -> Result<()> {
    let (saved, now) = (saved.unwrap_or(1), world().size());
    if saved != now {
        bail!(
            "{} was written by a run on {saved} rank(s); resume it on {saved} (this run has {now}): the data order and the dropout streams are split by rank",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_ragged_values_in_rank_order() {
        let group = threads::ThreadGroup::new(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let r = g.rank();
                    with_world(g, || all_gather(&vec![r as f64; r]).unwrap())
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![vec![], vec![1.0], vec![2.0, 2.0]]);
        }
    }

    #[test]
    fn shards_cover_the_items_once() {
        let items: Vec<usize> = (0..7).collect();
        let parts: Vec<Vec<usize>> = (0..3).map(|r| shard(&items, r, 3)).collect();
        assert_eq!(parts, vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
        assert_eq!(shard(&items[..1], 1, 2), Vec::<usize>::new());
        assert_eq!(shard(&items, 0, 1), items);
    }
}
