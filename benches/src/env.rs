//! Where bench data lives and what it lives on.

use crate::args::Mode;
use crate::BenchResult;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Environment variable naming the directory to hold bench data.
pub const BENCH_DIR_ENV: &str = "EDGEHUB_BENCH_DIR";

/// Environment variable giving the seconds per measured point, over the mode's default.
pub const SECS_ENV: &str = "EDGEHUB_BENCH_SECS";

/// The cargo target directory of the running binary.
///
/// `CARGO_TARGET_DIR` if set, else derived from the executable's path
/// (`<target>/<profile>/deps/<bench>` or `<target>/<profile>/<bin>`), else
/// `./target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent();
        if dir.and_then(Path::file_name).is_some_and(|n| n == "deps") {
            dir = dir.and_then(Path::parent);
        }
        if let Some(target) = dir.and_then(Path::parent) {
            return target.to_path_buf();
        }
    }
    PathBuf::from("target")
}

/// A fresh temporary directory for bench data, removed when dropped.
///
/// It is created inside `$EDGEHUB_BENCH_DIR` if that is set, else inside
/// `<target>/bench-tmp`, so that it sits on the repository's filesystem and
/// not on `/tmp`, which may be tmpfs (where `fdatasync` costs nothing).
pub fn bench_tempdir(prefix: &str) -> BenchResult<tempfile::TempDir> {
    let parent = match std::env::var_os(BENCH_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("bench-tmp"),
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| format!("creating bench dir {}: {e}", parent.display()))?;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .map_err(|e| format!("creating a temp dir in {}: {e}", parent.display()))?;
    Ok(dir)
}

/// The filesystem a path lives on, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, Serialize)]
pub struct FsInfo {
    /// The mount point holding the path.
    pub mount_point: String,
    /// Filesystem type, e.g. `ext4`, `xfs`, `overlay`, `tmpfs`.
    pub fstype: String,
    /// The mounted device or source.
    pub source: String,
}

impl FsInfo {
    /// Whether `fdatasync` on this filesystem never reaches a disk.
    pub fn is_memory_backed(&self) -> bool {
        matches!(self.fstype.as_str(), "tmpfs" | "ramfs")
    }
}

/// Looks up the filesystem holding `path` (Linux only; `None` elsewhere or
/// when `/proc` is not readable).
pub fn filesystem_of(path: &Path) -> Option<FsInfo> {
    let path = path.canonicalize().ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<FsInfo> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        let mount = unescape_mountinfo(mount);
        if !path.starts_with(&mount) {
            continue;
        }
        // Later lines shadow earlier ones mounted on the same point.
        if best
            .as_ref()
            .is_none_or(|b| mount.len() >= b.mount_point.len())
        {
            best = Some(FsInfo {
                mount_point: mount,
                fstype: (*fstype).to_string(),
                source: (*source).to_string(),
            });
        }
    }
    best
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            let digits = std::str::from_utf8(oct).ok();
            if let Some(Ok(v)) = digits.map(|d| u8::from_str_radix(d, 8)) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Total size in bytes of the regular files under `dir`, recursively.
pub fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Facts about the machine, recorded next to the figures.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cpus: usize,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
    /// Seconds since the Unix epoch when the run started.
    pub unix_time: u64,
    /// 1-minute load average when read (lags: it still counts a run that
    /// just ended).
    pub loadavg_1m: Option<f64>,
    /// Fraction of all CPUs busy over 250 ms when read (0..1): other work
    /// competing with the bench right now.
    pub cpu_busy: Option<f64>,
}

impl Machine {
    /// Reads the machine facts now.
    pub fn read() -> Self {
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            loadavg_1m: loadavg(),
            cpu_busy: cpu_busy(std::time::Duration::from_millis(250)),
        }
    }
}

/// Fraction of all CPUs not idle over `window`, from `/proc/stat` (Linux
/// only). The calling thread sleeps through the window.
pub fn cpu_busy(window: std::time::Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest is in user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((total, idle))
    }
    let (t0, i0) = sample()?;
    std::thread::sleep(window);
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0)?;
    (total > 0).then(|| 1.0 - i1.saturating_sub(i0) as f64 / total as f64)
}

/// The 1-minute load average from `/proc/loadavg` (Linux only).
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Makes a bench's data directory (see [`bench_tempdir`]), learns its filesystem, and prints the
/// opening line every bench report starts with, warning when fdatasync figures would mean
/// nothing (a memory-backed directory).
pub fn open_bench_dir(
    bench: &str,
    mode: Mode,
    point: std::time::Duration,
    warmup: std::time::Duration,
) -> BenchResult<(tempfile::TempDir, Option<FsInfo>)> {
    let root = bench_tempdir(&format!("edgehub-bench-{bench}-"))?;
    let fs = filesystem_of(root.path());
    eprintln!(
        "{bench} bench ({mode:?}): {} s per point after {} s warm-up, data in {} ({})",
        point.as_secs_f64(),
        warmup.as_secs_f64(),
        root.path().display(),
        fs.as_ref().map_or("filesystem unknown".into(), |f| format!(
            "{} on {}",
            f.fstype, f.source
        )),
    );
    if fs.as_ref().is_some_and(FsInfo::is_memory_backed) {
        eprintln!(
            "WARNING: the bench dir is memory-backed; fdatasync figures mean nothing. Set {BENCH_DIR_ENV}."
        );
    }
    Ok((root, fs))
}

/// The value of environment variable `name`, parsed; `None` when unset or empty.
pub fn parsed<T>(name: &str) -> BenchResult<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Some(v.parse().map_err(|e| format!("{name}={v}: {e}"))?)),
        _ => Ok(None),
    }
}

/// The length of a measured point from `$EDGEHUB_BENCH_SECS` (fractions allowed), if set.
pub fn point_from_env() -> BenchResult<Option<std::time::Duration>> {
    let Some(secs) = parsed::<f64>(SECS_ENV)? else {
        return Ok(None);
    };
    let point =
        std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("{SECS_ENV}: {e}"))?;
    Ok(Some(point))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/x\"), r"/x\");
    }
}
