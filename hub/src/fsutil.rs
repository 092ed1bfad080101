//! File utilities the hub's modules share (identities, the data directory's record, the
//! hub's certificates). Depends on no other module of the hub.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a temporary file of [`write_atomically`] adds to the name of the file it replaces,
/// before the writer's pid and a counter: `{path}.tmp.{pid}.{n}`.
pub const TMP_INFIX: &str = ".tmp.";

/// Numbers this process's temporary files, so two writes never share one.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically and durably: writes `{path}.tmp.{pid}.{n}` (a name no
/// other writer, in this process or another, uses) with `mode`, fdatasyncs it, renames it over
/// `path`, then fsyncs the directory. A writer that dies before the rename leaves its
/// temporary file; [`remove_stale_temps`] removes those.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(
        "{TMP_INFIX}{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_data()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&dir)?.sync_all()
}

/// Removes from `dir` the temporary files [`write_atomically`] left when its writer died
/// (`*.tmp.{pid}.{n}` whose process no longer runs); files of running writers stay. Returns
/// how many it removed. Call it only while holding the data directory's initialization lock
/// (`crate::initlock`): a pid is reused eventually, and only under the lock no hub of this
/// data directory is starting to write. Where process liveness cannot be told (not Linux),
/// nothing is removed.
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer) else {
            continue;
        };
        if process_runs(pid) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The writer's pid if `name` is a temporary file of [`write_atomically`].
fn temp_writer(name: &str) -> Option<u32> {
    let (_, tail) = name.rsplit_once(TMP_INFIX)?;
    let (pid, n) = tail.split_once('.')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether process `pid` runs (on Linux, by /proc; elsewhere assumed to).
fn process_runs(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised_with_their_writer() {
        assert_eq!(temp_writer("identities.json.tmp.123.7"), Some(123));
        assert_eq!(temp_writer("identities.json.tmp"), None);
        assert_eq!(temp_writer("identities.json"), None);
        assert_eq!(temp_writer("a.tmp.x.1"), None);
    }

    #[test]
    fn two_writes_use_distinct_temporary_files_and_leave_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.json");
        write_atomically(&path, b"one", 0o600).expect("write");
        write_atomically(&path, b"two", 0o600).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_temporary_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A pid above the kernel's maximum (4194304) never runs.
        let dead = dir.path().join("identities.json.tmp.4999999.0");
        let live = dir
            .path()
            .join(format!("hub.json.tmp.{}.0", std::process::id()));
        let other = dir.path().join("identities.json");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").expect("write");
        }
        assert_eq!(remove_stale_temps(dir.path()).expect("clean"), 1);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }
}
