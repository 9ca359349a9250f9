//! Latency samples and their summary.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Percentiles of one phase, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub phase: String,
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

pub fn summarize(phase: &str, samples: &[Duration]) -> Summary {
    assert!(!samples.is_empty(), "phase {phase} has no samples");
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    // Nearest-rank percentile: the smallest sample with at least p% of samples at or below it.
    let rank = |p: f64| us[((p / 100.0 * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
    Summary {
        phase: phase.to_string(),
        samples: us.len(),
        p50_us: rank(50.0),
        p99_us: rank(99.0),
        max_us: *us.last().expect("non-empty"),
        mean_us: us.iter().sum::<f64>() / us.len() as f64,
    }
}

/// Times `iterations` runs of `f` (after `warmup` untimed ones).
pub async fn time_async<F, Fut>(warmup: usize, iterations: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..warmup {
        f().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    samples
}

pub fn format_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.1} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = summarize("x", &samples);
        assert_eq!(s.p50_us, 50.0);
        assert_eq!(s.p99_us, 99.0);
        assert_eq!(s.max_us, 100.0);
        let one = summarize("y", &[Duration::from_micros(7)]);
        assert_eq!((one.p50_us, one.p99_us), (7.0, 7.0));
    }
}
