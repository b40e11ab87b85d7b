//! The `fastkv` binary: parses the command line and reports errors with context.
fn main() {
    return_freed_memory_promptly();
    if let Err(e) = fastkv::cli::main() {
        // A closed pipe (`fastkv run ... | head`) is the reader's choice, not an error.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Fix glibc's thresholds at their defaults (blocks of 128 KiB or more come from
/// `mmap`; heap tops over 128 KiB are given back). Left alone, glibc raises its mmap
/// threshold to the size of each large block freed (up to 32 MiB), after which a
/// prefill chunk's buffers come from the heap and stay in the process after it is
/// freed: with gated eviction on an 8k-token SmolLM2 document, peak RSS 210 MiB
/// against 205 MiB with fixed thresholds (docs/performance.md, long contexts).
fn return_freed_memory_promptly() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocator parameters; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}
