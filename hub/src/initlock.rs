//! The data directory's initialization lock (`<data>/init.lock`).
//!
//! Two hubs started at once on one empty data directory would both create the record
//! (`hub.json`), the module keys (`identities.json`), the CA and server certificate (`tls/`) and
//! the store's first claim; each would keep what it made in memory, and one would serve keys
//! other than those left on disk. So every command that reads and may write those (`run`,
//! `connection-string`, `ca-path`) first takes an exclusive `flock` on `init.lock`, and `run`
//! holds it until its store is open (claimed at its epoch). Then it releases it: a later hub
//! initializes from what is on disk and takes the store over (newest opener wins, by epoch),
//! and a hub that is frozen after initializing never blocks that takeover.
//!
//! The lock is advisory and per node: `flock` on a network filesystem (NFS, SMB / Azure Files)
//! may not exclude a hub on another node. There the store's epoch still fences the store, and a
//! ReadWriteOncePod volume keeps a second pod off the volume.
//!
//! The kernel releases the lock when the holder exits, however it exits: a crashed hub leaves
//! no stale lock. The file itself stays (it is empty).

use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fsutil;
use crate::tls::TLS_DIR;

/// The lock file's name in the data directory.
pub const INIT_LOCK_FILE: &str = "init.lock";
/// How long a hub waits for another to finish initializing, unless told otherwise.
pub const DEFAULT_INIT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Exit status of a command that gave up waiting for the lock.
pub const EXIT_INIT_LOCK_TIMEOUT: u8 = 5;
/// How often a waiting hub tries the lock again.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum InitLockError {
    /// The data directory or the lock file cannot be created or opened.
    #[error("cannot open the initialization lock {}", path.display())]
    Open {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Locking failed (not because another holds it).
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process held the lock for the whole wait.
    #[error(
        "another hub has been initializing {} for {}s (it holds {}); gave up (exit status \
         {EXIT_INIT_LOCK_TIMEOUT}); is a hub stuck starting on this data directory?",
        dir.display(), waited.as_secs(), path.display()
    )]
    Timeout {
        /// The data directory.
        dir: PathBuf,
        /// The lock file.
        path: PathBuf,
        /// How long this process waited.
        waited: Duration,
    },
}

impl InitLockError {
    /// The process exit status this error documents, if it has its own
    /// ([`EXIT_INIT_LOCK_TIMEOUT`]).
    pub fn exit_code(&self) -> Option<u8> {
        match self {
            InitLockError::Timeout { .. } => Some(EXIT_INIT_LOCK_TIMEOUT),
            _ => None,
        }
    }
}

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct InitLock {
    file: File,
    path: PathBuf,
}

impl InitLock {
    /// Takes the lock of `data_dir` (creating the directory and the lock file if needed),
    /// waiting at most `timeout` for another holder; logs once if it has to wait. Once held,
    /// removes the temporary files that dead writers left in the directory and in `tls/`.
    pub fn acquire(data_dir: &Path, timeout: Duration) -> Result<InitLock, InitLockError> {
        let path = data_dir.join(INIT_LOCK_FILE);
        let open = |source| InitLockError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(open)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open)?;
        let start = Instant::now();
        let mut logged = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(source)) => {
                    return Err(InitLockError::Lock { path, source });
                }
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(InitLockError::Timeout {
                    dir: data_dir.to_owned(),
                    path,
                    waited,
                });
            }
            if !logged {
                logged = true;
                // Warn: `connection-string` and `ca-path` log only warnings by default, and a
                // command that waits silently looks hung.
                tracing::warn!(
                    dir = %data_dir.display(),
                    "waiting for another hub to finish initializing {}",
                    data_dir.display()
                );
            }
            std::thread::sleep(RETRY_EVERY.min(timeout - waited));
        }
        if logged {
            tracing::info!(
                dir = %data_dir.display(),
                waited_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                "took the initialization lock"
            );
        }
        for dir in [data_dir.to_path_buf(), data_dir.join(TLS_DIR)] {
            match fsutil::remove_stale_temps(&dir) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    dir = %dir.display(),
                    removed = n,
                    "removed temporary files that dead writers left"
                ),
                Err(e) => tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot remove temporary files that dead writers left"
                ),
            }
        }
        Ok(InitLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InitLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first says when.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_makes_another_wait_and_give_up_with_a_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = InitLock::acquire(dir.path(), Duration::ZERO).expect("first");
        let err = InitLock::acquire(dir.path(), Duration::ZERO).expect_err("held");
        assert_eq!(err.exit_code(), Some(EXIT_INIT_LOCK_TIMEOUT));
        drop(held);
        InitLock::acquire(dir.path(), Duration::ZERO).expect("released on drop");
    }
}
