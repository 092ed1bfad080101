//! The raw append + `fdatasync` probe: how many durable appends per second
//! the disk under a directory gives one writer that syncs every write.
//!
//! This is the denominator of every durability figure: a log that syncs each
//! message cannot beat it, and group commit is worth the ratio above it.

use crate::latency::{LatencyRecorder, LatencySummary};
use crate::load::per_second;
use crate::BenchResult;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// The block size the reference figures use (4 KiB).
pub const DEFAULT_BLOCK: usize = 4096;

/// The outcome of [`append_fdatasync`].
#[derive(Debug, Clone, Serialize)]
pub struct RawFsync {
    /// When in the run this sample was taken (e.g. "start", "end").
    pub label: String,
    /// Bytes appended before each `fdatasync`.
    pub block_bytes: usize,
    /// Appends made durable inside the measured window.
    pub ops: u64,
    /// Length of the window in seconds.
    pub secs: f64,
    /// `ops / secs`.
    pub rate_per_s: f64,
    /// Latency of one write + `fdatasync`.
    pub latency: LatencySummary,
}

/// Appends `block` bytes to a fresh file in `dir` and `fdatasync`s it, in a
/// loop, for `warmup` (not counted) and then `measure`. The file is removed
/// afterwards.
pub fn append_fdatasync(
    dir: &Path,
    label: &str,
    block: usize,
    warmup: Duration,
    measure: Duration,
) -> BenchResult<RawFsync> {
    let mut file = tempfile::Builder::new()
        .prefix("raw-fdatasync-")
        .suffix(".dat")
        .tempfile_in(dir)
        .map_err(|e| {
            format!(
                "creating the fdatasync probe file in {}: {e}",
                dir.display()
            )
        })?;
    // Make the (empty) file's directory entry durable first so the first
    // measured syncs do not also pay for it.
    file.as_file().sync_all()?;
    let buf: Vec<u8> = (0..block).map(|i| (i % 251) as u8).collect();
    let mut rec = LatencyRecorder::new();

    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        file.write_all(&buf)?;
        file.as_file().sync_data()?;
    }
    let opened = Instant::now();
    let until = opened + measure;
    let mut ops = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= until {
            break;
        }
        file.write_all(&buf)?;
        file.as_file().sync_data()?;
        rec.record(t0.elapsed());
        ops += 1;
    }
    let elapsed = opened.elapsed();
    Ok(RawFsync {
        label: label.to_string(),
        block_bytes: block,
        ops,
        secs: elapsed.as_secs_f64(),
        rate_per_s: per_second(ops, elapsed),
        latency: rec.summary(),
    })
}

/// Takes one raw sample for a bench report ([`append_fdatasync`] of [`DEFAULT_BLOCK`]s for
/// `length`, after at most 0.5 s of the bench's `warmup`) and logs it to stderr.
pub fn sample(
    dir: &Path,
    label: &str,
    warmup: Duration,
    length: Duration,
) -> BenchResult<RawFsync> {
    let warmup = warmup.min(Duration::from_millis(500));
    let r = append_fdatasync(dir, label, DEFAULT_BLOCK, warmup, length)?;
    eprintln!(
        "  raw 4 KiB append+fdatasync ({label}): {}  p50 {}  p99 {}",
        crate::report::rate(r.rate_per_s),
        crate::report::micros(r.latency.p50_us),
        crate::report::micros(r.latency.p99_us)
    );
    Ok(r)
}

/// The raw samples of a bench run: one before the first group of points and one after each
/// group, so that each group is compared with the mean of the two samples around it (the disk
/// drifts during a run). A sample that fails leaves its slot empty and adds to the run's errors.
#[derive(Debug)]
pub struct RawSamples<'a> {
    dir: &'a Path,
    warmup: Duration,
    length: Duration,
    enabled: bool,
    sync_first: bool,
    slots: Vec<Option<RawFsync>>,
}

impl<'a> RawSamples<'a> {
    /// Samples in `dir` (see [`sample`]); none at all unless `enabled` (`--only` without `raw`).
    pub fn new(dir: &'a Path, warmup: Duration, length: Duration, enabled: bool) -> Self {
        RawSamples {
            dir,
            warmup,
            length,
            enabled,
            sync_first: false,
            slots: Vec::new(),
        }
    }

    /// Runs `sync` before each sample, so that the writeback of the points before it has ended
    /// when the disk is timed.
    pub fn sync_first(self) -> Self {
        RawSamples {
            sync_first: true,
            ..self
        }
    }

    /// Takes the next sample.
    pub fn take(&mut self, label: &str, errors: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        if self.sync_first {
            let _ = std::process::Command::new("sync").status();
        }
        let r = sample(self.dir, label, self.warmup, self.length);
        if let Err(e) = &r {
            errors.push(format!("raw fdatasync probe ({label}): {e}"));
        }
        self.slots.push(r.ok());
    }

    /// Takes the sample that closes a group of points and returns the group's reference rate:
    /// the mean of this sample and the one before it.
    pub fn after_group(&mut self, label: &str, errors: &mut Vec<String>) -> Option<f64> {
        self.take(label, errors);
        let last_two = self.slots.iter().rev().take(2).flatten();
        crate::report::mean(&last_two.map(|r| r.rate_per_s).collect::<Vec<_>>())
    }

    /// The samples taken.
    pub fn into_vec(self) -> Vec<RawFsync> {
        self.slots.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_counts_syncs() {
        let dir = tempfile::tempdir();
        assert!(dir.is_ok());
        if let Ok(dir) = dir {
            let r = append_fdatasync(
                dir.path(),
                "test",
                512,
                Duration::ZERO,
                Duration::from_millis(50),
            );
            let r = r.map_err(|e| e.to_string());
            assert!(
                matches!(&r, Ok(r) if r.ops > 0 && r.latency.count == r.ops),
                "{r:?}"
            );
        }
    }
}
