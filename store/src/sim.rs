//! A simulated filesystem for crash and fault tests (feature `test-util`).
//!
//! It keeps, per file, the live content and the content as of the last `sync_data`, plus the
//! writes made since; per directory, the live entries and the entries as of the last `sync_dir`.
//! [`SimFs::crash_image`] returns what a power cut would leave: synced data always, and (chosen by
//! a seed) any subset of the unsynced writes, some of them torn, and any subset of unsynced
//! creations and removals. A countdown makes the Nth mutating operation fail and every later one
//! too (the machine is off), or fail just once (an I/O error the store must survive by poisoning),
//! and a space limit makes writes fail with ENOSPC.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::io::{Fs, FsFile};

/// What happens when the operation countdown reaches zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// That operation and every later mutating one fail with EIO: the power is cut.
    PowerCut,
    /// Only that operation fails with EIO; later ones succeed.
    FailOnce,
    /// That operation panics in the thread that calls it (a bug in the store, simulated); later
    /// ones succeed.
    Panic,
}

#[derive(Debug, Clone, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order: (position, bytes) or a length change.
    unsynced: Vec<Pending>,
}

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    /// Live directory entries: path → inode.
    live: BTreeMap<PathBuf, usize>,
    /// Directory entries as of the last `sync_dir` of their directory.
    durable: BTreeMap<PathBuf, usize>,
    dirs: Vec<PathBuf>,
    /// Mutating operations left before the fault; `None` = no fault planned.
    countdown: Option<u64>,
    mode: Option<FaultMode>,
    powered_off: bool,
    /// ENOSPC once the sum of live file lengths would exceed this.
    space_limit: Option<u64>,
    ops: u64,
    /// While set, every `sync_data` waits (see [`SimFs::hold_syncs`]).
    hold_syncs: bool,
    /// `sync_data` calls waiting now.
    held_syncs: usize,
}

/// Simulated filesystem; cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
    /// Wakes held syncs and those waiting for one to be held.
    gate: Arc<Condvar>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated I/O error during {what}"))
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl SimFs {
    /// An empty filesystem with no faults planned.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a bug in this file; recover the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans a fault at the `n`th mutating operation from now (1 = the next one).
    pub fn fault_after(&self, n: u64, mode: FaultMode) {
        let mut s = self.lock();
        s.countdown = Some(n);
        s.mode = Some(mode);
    }

    /// Writes fail with ENOSPC once the live files would hold more than `bytes` in total.
    pub fn set_space_limit(&self, bytes: Option<u64>) {
        self.lock().space_limit = bytes;
    }

    /// From now on every `sync_data` waits, before doing anything, until
    /// [`SimFs::release_syncs`]: a stalled disk, so that tests can let requests pile up behind a
    /// group commit.
    pub fn hold_syncs(&self) {
        self.lock().hold_syncs = true;
    }

    /// Blocks until at least one `sync_data` is waiting behind [`SimFs::hold_syncs`].
    pub fn wait_for_held_sync(&self) {
        let mut s = self.lock();
        while s.held_syncs == 0 {
            s = self.gate.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets every held `sync_data` (and every later one) go on.
    pub fn release_syncs(&self) {
        self.lock().hold_syncs = false;
        self.gate.notify_all();
    }

    /// Number of mutating operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// True once a [`FaultMode::PowerCut`] has fired.
    pub fn powered_off(&self) -> bool {
        self.lock().powered_off
    }

    /// Total live bytes in all files.
    pub fn live_bytes(&self) -> u64 {
        let s = self.lock();
        s.live
            .values()
            .map(|&i| s.inodes[i].live.len() as u64)
            .sum()
    }

    /// What a power cut now would leave behind, as a new filesystem with no faults planned.
    /// `seed` chooses which unsynced writes, creations and removals reach the media.
    pub fn crash_image(&self, seed: u64) -> SimFs {
        let s = self.lock();
        let mut rng = SplitMix(seed);
        let mut out = State {
            dirs: s.dirs.clone(),
            ..State::default()
        };
        // Entries: every durable one; an unsynced creation survives or not; an unsynced removal
        // may be undone.
        let mut entries: BTreeMap<PathBuf, usize> = s.durable.clone();
        for (path, &ino) in &s.live {
            if !entries.contains_key(path) && rng.chance(2) {
                entries.insert(path.clone(), ino);
            }
        }
        let removed: Vec<PathBuf> = s
            .durable
            .keys()
            .filter(|p| !s.live.contains_key(*p))
            .cloned()
            .collect();
        for path in removed {
            if rng.chance(2) {
                entries.remove(&path);
            }
        }
        for (path, ino) in entries {
            let inode = &s.inodes[ino];
            let mut data = inode.durable.clone();
            for op in &inode.unsynced {
                match op {
                    Pending::Write(pos, bytes) => {
                        if !rng.chance(2) {
                            continue;
                        }
                        // Keep a prefix (a torn write) or all of it, sometimes with garbage.
                        let keep = if rng.chance(3) {
                            rng.below(bytes.len() as u64 + 1) as usize
                        } else {
                            bytes.len()
                        };
                        let mut chunk = bytes[..keep].to_vec();
                        if rng.chance(8) && !chunk.is_empty() {
                            let i = rng.below(chunk.len() as u64) as usize;
                            chunk[i] ^= 0x5a;
                        }
                        write_into(&mut data, *pos, &chunk);
                    }
                    Pending::SetLen(len) => {
                        if rng.chance(2) {
                            data.resize(*len as usize, 0);
                        }
                    }
                }
            }
            out.inodes.push(Inode {
                live: data.clone(),
                durable: data,
                unsynced: Vec::new(),
            });
            let ino = out.inodes.len() - 1;
            out.live.insert(path.clone(), ino);
            out.durable.insert(path, ino);
        }
        SimFs {
            state: Arc::new(Mutex::new(out)),
            gate: Arc::default(),
        }
    }

    /// Reads a whole file (tests inspect and corrupt images with this).
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.lock();
        let ino = *s.live.get(path).ok_or_else(|| not_found(path))?;
        Ok(s.inodes[ino].live.clone())
    }

    /// Replaces a whole file's content durably (tests corrupt images with this).
    pub fn write_file(&self, path: &Path, data: &[u8]) {
        let mut s = self.lock();
        let ino = match s.live.get(path) {
            Some(&i) => i,
            None => {
                s.inodes.push(Inode::default());
                let i = s.inodes.len() - 1;
                s.live.insert(path.to_owned(), i);
                s.durable.insert(path.to_owned(), i);
                i
            }
        };
        let inode = &mut s.inodes[ino];
        inode.live = data.to_vec();
        inode.durable = data.to_vec();
        inode.unsynced.clear();
    }

    /// Names of live files under `dir`.
    pub fn files(&self, dir: &Path) -> Vec<String> {
        self.list(dir).unwrap_or_default()
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
}

fn write_into(data: &mut Vec<u8>, pos: u64, bytes: &[u8]) {
    let pos = pos as usize;
    if data.len() < pos + bytes.len() {
        data.resize(pos + bytes.len(), 0);
    }
    data[pos..pos + bytes.len()].copy_from_slice(bytes);
}

/// Counts one mutating operation and applies the planned fault, if due.
fn tick(s: &mut State, what: &str) -> io::Result<()> {
    if s.powered_off {
        return Err(eio(what));
    }
    s.ops += 1;
    if let Some(n) = s.countdown {
        if n <= 1 {
            s.countdown = None;
            match s.mode {
                Some(FaultMode::PowerCut) => s.powered_off = true,
                Some(FaultMode::Panic) => panic!("simulated bug: panic during {what}"),
                Some(FaultMode::FailOnce) | None => {}
            }
            return Err(eio(what));
        }
        s.countdown = Some(n - 1);
    }
    Ok(())
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    ino: usize,
}

impl FsFile for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let s = self.fs.lock();
        let data = &s.inodes[self.ino].live;
        let pos = pos as usize;
        if pos >= data.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - pos);
        buf[..n].copy_from_slice(&data[pos..pos + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut s = self.fs.lock();
        let before = s.inodes[self.ino].live.len() as u64;
        let grow = (pos + buf.len() as u64).saturating_sub(before);
        if let Some(limit) = s.space_limit {
            let used: u64 = s
                .live
                .values()
                .map(|&i| s.inodes[i].live.len() as u64)
                .sum();
            if grow > 0 && used + grow > limit {
                // A real filesystem may write a prefix before running out: do so.
                let room = limit.saturating_sub(used) as usize;
                let fit = (before.saturating_sub(pos) as usize + room).min(buf.len());
                let inode = &mut s.inodes[self.ino];
                write_into(&mut inode.live, pos, &buf[..fit]);
                inode
                    .unsynced
                    .push(Pending::Write(pos, buf[..fit].to_vec()));
                return Err(enospc());
            }
        }
        if let Err(e) = tick(&mut s, "write") {
            // A failed write may still leave a torn prefix behind in the live file.
            let half = buf.len() / 2;
            let powered_off = s.powered_off;
            let inode = &mut s.inodes[self.ino];
            if !powered_off {
                write_into(&mut inode.live, pos, &buf[..half]);
                inode
                    .unsynced
                    .push(Pending::Write(pos, buf[..half].to_vec()));
            }
            return Err(e);
        }
        let inode = &mut s.inodes[self.ino];
        write_into(&mut inode.live, pos, buf);
        inode.unsynced.push(Pending::Write(pos, buf.to_vec()));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.fs.lock();
        if s.hold_syncs {
            s.held_syncs += 1;
            self.fs.gate.notify_all();
            while s.hold_syncs {
                s = self.fs.gate.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.held_syncs -= 1;
        }
        tick(&mut s, "fdatasync")?;
        let inode = &mut s.inodes[self.ino];
        inode.durable = inode.live.clone();
        inode.unsynced.clear();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.fs.lock();
        tick(&mut s, "truncate")?;
        let inode = &mut s.inodes[self.ino];
        inode.live.resize(len as usize, 0);
        inode.unsynced.push(Pending::SetLen(len));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.fs.lock();
        Ok(s.inodes[self.ino].live.len() as u64)
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if !s.dirs.iter().any(|d| d == dir) {
            s.dirs.push(dir.to_owned());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.lock();
        if !s.dirs.iter().any(|d| d == dir) {
            return Err(not_found(dir));
        }
        Ok(s.live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut s = self.lock();
        tick(&mut s, "create")?;
        if s.live.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        s.inodes.push(Inode::default());
        let ino = s.inodes.len() - 1;
        s.live.insert(path.to_owned(), ino);
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let s = self.lock();
        let ino = *s.live.get(path).ok_or_else(|| not_found(path))?;
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        tick(&mut s, "unlink")?;
        s.live
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        tick(&mut s, "rename")?;
        if s.live.contains_key(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        let ino = s.live.remove(from).ok_or_else(|| not_found(from))?;
        s.live.insert(to.to_owned(), ino);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        tick(&mut s, "directory fsync")?;
        let live: Vec<(PathBuf, usize)> = s
            .live
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        s.durable.retain(|p, _| p.parent() != Some(dir));
        s.durable.extend(live);
        Ok(())
    }
}

/// Small deterministic generator so crash images are reproducible from a seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}
