//! A bandwidth cap shared by concurrent transfers: `edgectl push --max-rate` and a node's
//! `[sync] max_rate_mb`. Flaky or metered links are the norm at the edge.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Pacer {
    started: Instant,
    moved: AtomicU64,
    /// Bytes per second; `None` is uncapped.
    rate: Option<u64>,
}

impl Pacer {
    pub fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            started: Instant::now(),
            moved: AtomicU64::new(0),
            rate,
        }
    }

    /// Accounts for `bytes` just moved; returns how long the caller should wait to stay
    /// within the cap (since the pacer started, across every caller).
    pub fn moved(&self, bytes: u64) -> Option<Duration> {
        let rate = self.rate?;
        let total = self.moved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        due.checked_sub(self.started.elapsed())
    }

    /// [`Pacer::moved`], then sleeps on the tokio timer.
    pub async fn moved_async(&self, bytes: u64) {
        if let Some(wait) = self.moved(bytes) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_bytes_over_the_rate() {
        let pacer = Pacer::new(Some(1_000_000));
        assert!(pacer.moved(10).is_none_or(|w| w < Duration::from_millis(1)));
        let wait = pacer.moved(2_000_000).expect("2 MB at 1 MB/s must wait");
        assert!(wait > Duration::from_millis(1500), "{wait:?}");
        assert!(Pacer::new(None).moved(u64::MAX / 2).is_none());
    }
}
