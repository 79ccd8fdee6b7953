//! Process settings applied at start-up, before any other thread exists.
//!
//! **Allocator.** glibc's allocator settings for tensor work. By default glibc serves every block over
//! 128 KiB–32 MiB (its adaptive threshold) with a fresh `mmap` and returns freed memory to
//! the kernel as soon as the heap top is 128 KiB free, so a training step that allocates
//! and frees the same activation buffers each op page-faults them in anew every time: a
//! `perf` profile of W1 showed a quarter of the time in the kernel's page-fault and unmap
//! paths. Keeping blocks up to 32 MiB on the heap and trimming only past 1 GiB of free top
//! took W1 from 0.145 to 0.086 s per step with the same peak memory (docs/performance.md).

/// Applies both settings; call once at start-up, before other threads exist.
pub fn tune() {
    tune_allocator();
    tune_threads();
}

/// **Threads.** candle 0.11 runs element-wise ops on its own pool whose workers spin at a
/// barrier between ops, beside gemm's rayon threads: on a machine with few cores the
/// spinning workers take the cores gemm needs (a `perf` profile of W1 had 35% of its
/// samples in the workers' loop). With at most 4 cores rlft gives that pool one thread
/// (`CANDLE_NUM_THREADS=1`) unless the user set it; the matrix products keep every core
/// (see `rlft_policies::ops::gemm`). Measured on 2 cores: never slower, W1 at the GPU shape
/// 0.575 → 0.486 s/step (docs/performance.md).
///
/// candle also asks for its matmul thread count on every product, and without
/// `RAYON_NUM_THREADS` that means parsing `/proc/cpuinfo` each time (7% of a decoding
/// profile, in the kernel's `show_cpuinfo`); so the count candle would find is computed
/// once here and pinned in `RAYON_NUM_THREADS`.
fn tune_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Ranks of a data-parallel run on one machine share its cores.
        let n = rlft_policies::candle_core::utils::get_num_threads() / crate::dist::local_size();
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores <= 4 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other
    // thread exists. A refused value leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
