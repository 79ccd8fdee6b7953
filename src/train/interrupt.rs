//! SIGINT / SIGTERM: the training loops finish the current step, write a checkpoint and
//! return, and the command exits 0 saying how to resume. A second signal exits at once.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU8 = AtomicU8::new(0);

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if COUNT.fetch_add(1, Ordering::SeqCst) >= 1 {
                eprintln!("second interrupt: exiting now (the last complete checkpoint stays valid)");
                std::process::exit(130);
            }
            eprintln!("interrupt: finishing this step and writing a checkpoint (interrupt again to exit now)");
            REQUESTED.store(true, Ordering::SeqCst);
        });
    });
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
