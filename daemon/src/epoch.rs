//! The engine's epoch: the ticker that advances it (enforcing guest deadlines and making busy
//! guests yield) and [`EpochClock`], the same count as a number the node can read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The engine's epoch as a number the node can read (wasmtime does not expose its own): the
/// epoch ticker advances both together.
#[derive(Clone, Default)]
pub struct EpochClock(Arc<AtomicU64>);

impl EpochClock {
    /// Called by the ticker right after each `Engine::increment_epoch`.
    pub fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Advances the engine's epoch from a dedicated OS thread. A tokio task could be starved by
/// the very guest whose deadline it is supposed to enforce.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    /// Ticks `engine` every `tick`, and `clock` with it.
    pub fn start(engine: wasmtime::Engine, tick: Duration, clock: EpochClock) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                    clock.tick();
                }
            })
            .expect("spawning the epoch ticker thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
