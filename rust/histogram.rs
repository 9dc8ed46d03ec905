//! A latency histogram that many threads feed without a lock: counts per bucket of fixed
//! bounds and a sum, read as a snapshot. The gRPC methods and storage commits use it, and
//! `/metrics` exports it as a Prometheus histogram (cumulative there, per bucket here).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds in seconds: 100 µs (a unary call on loopback) to 2.5 s (a commit
/// on a struggling disk); one more bucket holds everything beyond.
pub const LATENCY_BOUNDS_S: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BOUNDS_S.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS_S.iter().position(|b| s <= *b).unwrap_or(LATENCY_BOUNDS_S.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// (count per bucket, the last beyond every bound; sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        (self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(), self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}
