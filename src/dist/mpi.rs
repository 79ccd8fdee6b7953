//! The [`Collective`] on MPI (rsmpi): the ranks of `MPI_COMM_WORLD` as `mpirun` or `srun`
//! started them. MPI is initialised once at start-up ([`super::init`]) with
//! `MPI_THREAD_FUNNELED`: only the main thread calls MPI (rayon's workers never do).

use super::Collective;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use std::sync::Mutex;

pub struct MpiWorld {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    library: String,
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED and every call is made from the main
// thread (the training loop); the communicator handle is a plain MPI_Comm value.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// The universe, finalised by [`finalize`] (dropping it calls `MPI_Finalize`).
static UNIVERSE: Mutex<Option<UniverseCell>> = Mutex::new(None);

struct UniverseCell(#[allow(dead_code)] Universe);
// SAFETY: only moved into the static at start-up and dropped at exit, on the main thread.
unsafe impl Send for UniverseCell {}

impl MpiWorld {
    pub fn init() -> Result<Self> {
        let Some((universe, _threading)) = mpi::initialize_with_threading(Threading::Funneled)
        else {
            bail!("MPI was already initialised");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let library = mpi::environment::library_version().unwrap_or_else(|_| "MPI".into());
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(UniverseCell(universe));
        Ok(Self {
            world,
            rank,
            size,
            library: library.lines().next().unwrap_or("MPI").trim().to_string(),
        })
    }
}

/// `MPI_Finalize`, once, at exit.
pub fn finalize() {
    drop(UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take());
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    /// A CUDA tensor with NCCL on the device (`--features nccl`).
    #[cfg(feature = "nccl")]
    fn all_reduce_tensor(&self, t: &candle_core::Tensor) -> Result<Option<candle_core::Tensor>> {
        if !t.device().is_cuda() {
            return Ok(None);
        }
        super::nccl::all_reduce_device(self, t).map(Some)
    }
    fn describe(&self) -> String {
        let nccl = if cfg!(feature = "nccl") {
            ", NCCL on GPUs"
        } else {
            ""
        };
        format!("MPI, {} ranks ({}){nccl}", self.size, self.library)
    }
    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
}
