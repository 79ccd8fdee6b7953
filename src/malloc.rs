//! glibc's allocator settings for tensor work. By default glibc serves every block over
//! 128 KiB–32 MiB (its adaptive threshold) with a fresh `mmap` and returns freed memory to
//! the kernel as soon as the heap top is 128 KiB free, so a training step that allocates
//! and frees the same activation buffers each op page-faults them in anew every time: a
//! `perf` profile of W1 showed a quarter of the time in the kernel's page-fault and unmap
//! paths. Keeping blocks up to 32 MiB on the heap and trimming only past 1 GiB of free top
//! took W1 from 0.145 to 0.086 s per step with the same peak memory (docs/performance.md).

/// Applies the settings; call once at start-up, before other threads allocate.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other
    // thread exists. A refused value leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
