//! Giving freed heap back to the system. glibc keeps memory a burst of allocations freed (a
//! Cranelift compile of an interpreter guest: a few hundred MiB) in its arenas, so without this
//! a node that compiled once would sit at that peak for good; `malloc_trim(0)` returns every
//! arena's free pages. Called after each batch of deployment loads (which may compile) and every
//! [`EVERY`] (what a busy hour of requests and transfers freed).

use std::time::Duration;

/// How often freed heap is given back regardless of compiles.
pub const EVERY: Duration = Duration::from_secs(60);

/// Returns free heap pages to the system; blocks for as long as the arenas take to walk (a few
/// ms after a large compile), so async callers run it on a blocking thread.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) has no preconditions; it only releases memory malloc owns and no
    // live allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs forever, giving freed heap back every [`EVERY`]; spawn it.
pub async fn give_back_periodically() {
    let mut interval = tokio::time::interval(EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let _ = tokio::task::spawn_blocking(give_back).await;
    }
}
