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
