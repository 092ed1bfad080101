//! State the hub keeps beside its store (the MQTT sessions today), written so that a hub whose
//! data directory a newer hub has claimed can never change what the live hub sees.
//!
//! The store fences an older owner through its own writes, but a file next to it is another
//! matter: two hubs on one volume (a double start, a frozen hub thawed after its replacement
//! opened) would both write it, and the older one, not knowing yet that it is fenced, could
//! acknowledge a change the live hub read before it was made, or overwrite what the live hub
//! wrote. So each owner writes only its own copy, named after the store's generation (the number
//! every open of the store takes, one more than any before it):
//!
//! - **Open** reads the copy of the newest generation older than its own (the legacy unnumbered
//!   name counts as generation 0), writes it as its own copy, then removes the older copies.
//! - **Write** replaces its own copy atomically and durably ([`crate::fsutil::write_atomically`]),
//!   *then* asks the store whether a newer owner has claimed the directory. Only if not may the
//!   caller acknowledge the change: the newer owner opens its store before it reads these files,
//!   so it either claimed after the write was durable (and reads it) or before the check (which
//!   then says fenced).
//!
//! A fenced owner's later writes land in its own old-numbered copy, which no newer owner reads and
//! the next open removes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Who owns the data directory: the store's open, seen from the files beside it.
pub trait Ownership: Send + Sync {
    /// The store's generation: unique to this open, larger than any earlier open's.
    fn generation(&self) -> u64;
    /// Whether no newer owner has claimed the directory, checked now (reads the disk).
    fn still_owner(&self) -> bool;
}

impl Ownership for store::Store {
    fn generation(&self) -> u64 {
        store::Store::generation(self)
    }

    fn still_owner(&self) -> bool {
        !self.check_fence()
    }
}

/// Reading or writing an owned file failed.
#[derive(Debug, thiserror::Error)]
pub enum OwnedFileError {
    /// The filesystem refused an operation.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A newer hub has claimed the data directory: what this one wrote is not the live state
    /// and must not be acknowledged.
    #[error("a newer hub has claimed the data directory (this hub is fenced); {path} is not the live copy")]
    Fenced {
        /// The copy this hub wrote.
        path: PathBuf,
    },
}

/// One owner's copy of a state file: `{dir}/{stem}.{generation}.json`.
pub struct OwnedFile {
    dir: PathBuf,
    stem: String,
    path: PathBuf,
    owner: Arc<dyn Ownership>,
}

impl std::fmt::Debug for OwnedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// File mode of the copies: the owner reads and writes them.
const MODE: u32 = 0o600;

impl OwnedFile {
    /// Opens this owner's copy of `{stem}` in `dir`: returns the content of the newest older
    /// owner's copy (None if there is none), already written as this owner's own copy, with the
    /// older copies removed.
    pub fn open(
        dir: &Path,
        stem: &str,
        owner: Arc<dyn Ownership>,
    ) -> Result<(OwnedFile, Option<Vec<u8>>), OwnedFileError> {
        let generation = owner.generation();
        let file = OwnedFile {
            dir: dir.to_owned(),
            stem: stem.to_owned(),
            path: dir.join(format!("{stem}.{generation}.json")),
            owner,
        };
        let copies = file.older_copies(generation)?;
        let newest = copies.iter().max_by_key(|(g, _)| *g);
        let content = match newest {
            Some((_, path)) => Some(std::fs::read(path).map_err(io("read", path))?),
            None => None,
        };
        if let Some(bytes) = &content {
            // Our own copy first: if we crash between these steps, the next owner still finds
            // the newest content (ours, or the older copy not yet removed).
            crate::fsutil::write_atomically(&file.path, bytes, MODE)
                .map_err(io("write", &file.path))?;
            for (_, path) in &copies {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove", path)(e)),
                }
            }
        }
        Ok((file, content))
    }

    /// The path of this owner's copy.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces this owner's copy with `bytes`, durably, and then checks that this hub still
    /// owns the directory. `Ok` means the change may be acknowledged; [`OwnedFileError::Fenced`]
    /// means it must not be (a newer hub serves, and never reads this copy).
    pub fn write(&self, bytes: &[u8]) -> Result<(), OwnedFileError> {
        crate::fsutil::write_atomically(&self.path, bytes, MODE)
            .map_err(io("write", &self.path))?;
        self.check_owner()
    }

    /// Whether this hub still owns the directory, as [`OwnedFile::write`] checks it after a
    /// write: for a change acknowledged without a write (it was already made).
    pub fn check_owner(&self) -> Result<(), OwnedFileError> {
        if self.owner.still_owner() {
            Ok(())
        } else {
            Err(OwnedFileError::Fenced {
                path: self.path.clone(),
            })
        }
    }

    /// Every copy of an older owner in the directory: `{stem}.json` (generation 0, written
    /// before copies were numbered) and `{stem}.{g}.json` with `g` below `generation`.
    fn older_copies(&self, generation: u64) -> Result<Vec<(u64, PathBuf)>, OwnedFileError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        let mut copies = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("list", &self.dir))?;
            let name = entry.file_name();
            let Some(g) = name.to_str().and_then(|n| copy_generation(&self.stem, n)) else {
                continue;
            };
            if g < generation {
                copies.push((g, entry.path()));
            }
        }
        Ok(copies)
    }
}

/// The generation a file name of `stem`'s copies stands for: `{stem}.json` is 0,
/// `{stem}.{g}.json` is `g`; anything else (temporary files included) is not a copy.
fn copy_generation(stem: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(stem)?.strip_prefix('.')?;
    let middle = rest.strip_suffix("json")?;
    if middle.is_empty() {
        return Some(0);
    }
    let digits = middle.strip_suffix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OwnedFileError {
    let path = path.to_owned();
    move |source| OwnedFileError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An owner whose fence the test moves.
    struct Owner {
        generation: u64,
        current: AtomicBool,
    }

    impl Ownership for Owner {
        fn generation(&self) -> u64 {
            self.generation
        }
        fn still_owner(&self) -> bool {
            self.current.load(Ordering::SeqCst)
        }
    }

    fn owner(generation: u64) -> Arc<Owner> {
        Arc::new(Owner {
            generation,
            current: AtomicBool::new(true),
        })
    }

    #[test]
    fn copy_names_are_told_from_everything_else() {
        assert_eq!(copy_generation("s", "s.json"), Some(0));
        assert_eq!(copy_generation("s", "s.17.json"), Some(17));
        assert_eq!(copy_generation("s", "s.17.json.tmp.5.0"), None);
        assert_eq!(copy_generation("s", "s..json"), None);
        assert_eq!(copy_generation("s", "s.x.json"), None);
        assert_eq!(copy_generation("s", "sessions.json"), None);
        assert_eq!(copy_generation("s", "t.1.json"), None);
    }

    #[test]
    fn a_new_owner_takes_the_newest_older_copy_and_removes_the_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.json"), b"legacy").unwrap();
        std::fs::write(dir.path().join("s.3.json"), b"three").unwrap();
        std::fs::write(dir.path().join("s.9.json"), b"nine").unwrap();
        // A copy of a newer generation is not ours to read (its owner fences us).
        std::fs::write(dir.path().join("s.12.json"), b"twelve").unwrap();
        let (file, content) = OwnedFile::open(dir.path(), "s", owner(10)).unwrap();
        assert_eq!(content.as_deref(), Some(&b"nine"[..]));
        assert_eq!(std::fs::read(file.path()).unwrap(), b"nine");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["s.10.json", "s.12.json"]);
    }

    #[test]
    fn the_first_owner_finds_nothing_and_writes_nothing_until_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (file, content) = OwnedFile::open(dir.path(), "s", owner(1)).unwrap();
        assert_eq!(content, None);
        assert!(!file.path().exists());
        file.write(b"x").unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), b"x");
    }

    #[test]
    fn a_fenced_owners_write_is_refused_and_never_reaches_the_newer_owner() {
        let dir = tempfile::tempdir().unwrap();
        let old = owner(1);
        let (old_file, _) = OwnedFile::open(dir.path(), "s", old.clone()).unwrap();
        old_file.write(b"before").unwrap();
        // The newer owner opens (after its store claimed the directory, so the old one is
        // fenced, without knowing yet).
        old.current.store(false, Ordering::SeqCst);
        let (new_file, content) = OwnedFile::open(dir.path(), "s", owner(2)).unwrap();
        assert_eq!(content.as_deref(), Some(&b"before"[..]));
        let err = old_file.write(b"after").unwrap_err();
        assert!(matches!(err, OwnedFileError::Fenced { .. }), "{err}");
        assert!(err.to_string().contains("fenced"), "{err}");
        assert!(old_file.check_owner().is_err());
        new_file.write(b"live").unwrap();
        // The old owner's late copy is neither read by the live owner nor by the next one.
        assert_eq!(std::fs::read(new_file.path()).unwrap(), b"live");
        let (_, next) = OwnedFile::open(dir.path(), "s", owner(3)).unwrap();
        assert_eq!(next.as_deref(), Some(&b"live"[..]));
    }
}
