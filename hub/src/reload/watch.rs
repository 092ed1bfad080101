//! Directory watches (inotify on Linux, through the `notify` crate) that turn changes into
//! reload requests.
//!
//! A directory is watched, not a file: Kubernetes updates a mounted ConfigMap or Secret by
//! writing a new timestamped directory and renaming a `..data` symlink over the old one, so the
//! file's own inode never changes and a watch on it would see nothing. Every entry change in
//! the directory (create, write, rename, delete, attributes) is reported; reading a file is not
//! (the hub's own reads must not trigger reloads). The caller debounces and re-reads by path.

use std::path::Path;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Watches `dir` (not recursively) and sends `trigger` on `tx` for every change in it. The
/// watch lasts as long as the returned watcher. Requests are dropped while `tx` is full (one
/// already waiting covers them).
pub fn watch_dir<T: Copy + Send + 'static>(
    dir: &Path,
    trigger: T,
    tx: mpsc::Sender<T>,
) -> notify::Result<RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if is_change(&event.kind) => {
                let _ = tx.try_send(trigger);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "directory watch error; reloading to be safe");
                let _ = tx.try_send(trigger);
            }
        })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Whether an event may have changed what a file in the directory holds.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_not_changes_but_writes_and_renames_are() {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
    }
}
