//! A small tmpfs a test mounts (tests run as root), so that ENOSPC comes from the kernel.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on `path` (created if missing), unmounted when dropped (also on panic).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or `None` with a message when
    /// this machine does not allow it.
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert!(
                why.contains("permission denied")
                    || why.contains("not permitted")
                    || why.contains("superuser")
                    || why.contains("only root"),
                "mount tmpfs failed for another reason than permissions: {why}"
            );
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here ({}); ENOSPC untested",
                why.trim()
            );
            return None;
        }
        Some(Tmpfs {
            path: path.to_owned(),
        })
    }

    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .expect("run mount -o remount");
        assert!(
            out.status.success(),
            "remount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
