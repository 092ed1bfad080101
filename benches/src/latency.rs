//! Latency recording with hdrhistogram.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Records latencies in nanoseconds, from 1 ns to 10 minutes, with 3
/// significant digits. One per thread; merge them with [`Self::merge`].
#[derive(Debug, Clone)]
pub struct LatencyRecorder {
    hist: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    /// An empty recorder.
    #[allow(clippy::expect_used)] // constant bounds, valid by construction
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, 600_000_000_000, 3)
            .expect("1 ns..600 s at 3 significant figures are valid histogram bounds");
        LatencyRecorder { hist }
    }

    /// Records one latency; values out of range are clamped.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
    }

    /// Adds every value recorded by `other`.
    pub fn merge(&mut self, other: &LatencyRecorder) {
        // Both share bounds, so `add` cannot fail; ignore rather than panic.
        let _ = self.hist.add(&other.hist);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The underlying histogram.
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.hist
    }

    /// Percentiles and extremes, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1_000.0;
        let h = &self.hist;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean_us: h.mean() / 1_000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// A latency distribution summarised in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_microseconds() {
        let mut a = LatencyRecorder::new();
        let mut b = LatencyRecorder::new();
        for i in 1..=50u64 {
            a.record(Duration::from_micros(i * 10));
            b.record(Duration::from_micros(500 + i * 10));
        }
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(LatencyRecorder::new().summary(), LatencySummary::default());
    }
}
