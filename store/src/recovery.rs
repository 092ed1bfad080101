//! Startup recovery: rebuilds the index from the segment files (DESIGN.md "Recovery").
//!
//! Contract — what recovery may change on disk, and nothing else:
//! - cut the torn tail of the newest segment of the last generation that started (bytes after
//!   the last batch whose checksums hold, when no valid batch follows them);
//! - delete a segment of that generation whose header never reached the disk and that holds no
//!   valid batch (a crash while creating it);
//! - delete a segment that an older owner created after a newer one had sealed its history
//!   (a fenced "zombie" write, never acknowledged).
//!
//! Everything else that does not decode is an [`OpenError::Corrupt`] naming the file and byte:
//! recovery never guesses past damage that could hide acknowledged messages, and never panics on
//! any file content.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{open_io, OpenError};
use crate::fence::{History, EPOCHS_FILE};
use crate::format::{
    decode_batch, decode_entry, BatchHeader, Entry, EpochRecord, Nonce, SegmentHeader, SegmentTail,
    BATCH_HEADER_LEN, SEGMENT_HEADER_LEN, SEGMENT_HEADER_LEN_V1,
};
use crate::index::{Index, IndexEntry, SegKey, SegmentInfo};
use crate::io::{read_all_into, read_exact_at, Fs, FsFile};
use crate::prealloc::is_prepared_name;
use crate::sidecar::{
    self, parse_sidecar_name, sidecar_name, Builder, Built, Identity, SidecarError, SidecarRef,
};
use crate::types::{Generation, Offset, QueueName};

/// What recovery found and did; logged at open and available from [`crate::Store::recovery`].
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: usize,
    /// Of those, segments known from their sidecar index file (not scanned).
    pub from_sidecar: usize,
    /// Sidecars written: for scanned segments that no writer will change again.
    pub sidecars_written: usize,
    /// Sidecars found but not used (damaged, stale, or for another segment); the segment was
    /// scanned instead.
    pub sidecars_rejected: usize,
    /// Undelivered messages indexed, summed over queues.
    pub undelivered: u64,
    /// Queues known.
    pub queues: usize,
    /// A torn tail that was cut: file and the byte it was cut at, and how many bytes went.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    /// Files deleted: crashed creations and fenced writes of an older owner.
    pub removed: Vec<PathBuf>,
    /// Files in the directory that are not the store's; left alone.
    pub foreign: Vec<String>,
    /// Wall time recovery took.
    pub elapsed: Duration,
}

pub(crate) struct Recovered {
    pub(crate) index: Index,
    pub(crate) next_offset: Offset,
    pub(crate) next_queue_id: u32,
    pub(crate) newest: Option<SegmentTail>,
    pub(crate) report: RecoveryReport,
}

/// Name of the file that holds space back for checkpoints on a full disk.
pub(crate) const RESERVE_FILE: &str = "RESERVE";

/// File name of segment `seq` of generation `gen`.
pub(crate) fn segment_name(gen: Generation, seq: u64) -> String {
    format!("{:016x}-{:016x}.seg", gen.0, seq)
}

fn parse_segment_name(name: &str) -> Option<(Generation, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (g, s) = stem.split_once('-')?;
    if g.len() != 16 || s.len() != 16 {
        return None;
    }
    let gen = u64::from_str_radix(g, 16).ok()?;
    let seq = u64::from_str_radix(s, 16).ok()?;
    (segment_name(Generation(gen), seq) == name).then_some((Generation(gen), seq))
}

/// The highest generation that named a segment file in `dir` (so a lost `EPOCHS` cannot make an
/// opener reuse a generation).
pub(crate) fn newest_segment_generation(fs: &dyn Fs, dir: &Path) -> Result<Generation, OpenError> {
    Ok(fs
        .list(dir)
        .map_err(open_io("list", dir))?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .map(|(g, _)| g)
        .max()
        .unwrap_or_default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Written in full before a later segment of the same writer existed: must decode to the end.
    Complete,
    /// The newest segment a successor saw: counts up to exactly this length.
    Sealed(u64),
    /// The newest segment of the last writer: may end in a torn batch.
    Tail,
    /// Created by an older owner after a successor sealed the history: never acknowledged.
    Phantom,
}

fn mode_of(history: &History, gen: Generation, seq: u64, last_of_newest_gen: bool) -> Mode {
    match history.successor_start(gen) {
        Some((_, None)) => Mode::Phantom,
        Some((_, Some(t))) => match (gen, seq).cmp(&(t.generation, t.seq)) {
            std::cmp::Ordering::Greater => Mode::Phantom,
            std::cmp::Ordering::Equal => Mode::Sealed(t.len),
            std::cmp::Ordering::Less => Mode::Complete,
        },
        None if last_of_newest_gen => Mode::Tail,
        None => Mode::Complete,
    }
}

struct Scan<'a> {
    fs: &'a dyn Fs,
    /// Lengths later preambles recorded for older segments: (generation, seq) → valid length.
    seals: HashMap<(Generation, u64), u64>,
    index: Index,
    next_offset: Offset,
    next_queue_id: u32,
    report: RecoveryReport,
    /// One buffer every batch frame is read into in turn: a scan holds one frame in memory,
    /// not a whole segment.
    buf: Vec<u8>,
    /// Segments that have a sidecar file (trusted only after its checks).
    sidecars: HashSet<(Generation, u64)>,
    dir: PathBuf,
}

fn corrupt(file: &Path, offset: u64, reason: impl Into<String>) -> OpenError {
    OpenError::Corrupt {
        file: file.to_owned(),
        offset,
        reason: reason.into(),
    }
}

/// Reads every segment in order and rebuilds the index. `history` must already contain this
/// opener's `Claim`, so no older writer can acknowledge anything while this runs.
pub(crate) fn recover(fs: &dyn Fs, dir: &Path, history: &History) -> Result<Recovered, OpenError> {
    let started = Instant::now();
    let mut scan = Scan {
        fs,
        seals: HashMap::new(),
        index: Index::default(),
        next_offset: Offset::new(1),
        next_queue_id: 0,
        report: RecoveryReport::default(),
        buf: Vec::new(),
        sidecars: HashSet::new(),
        dir: dir.to_owned(),
    };
    let listed = list_segments(fs, dir, &mut scan.report)?;
    scan.sidecars = listed.sidecars.clone();
    let (kept, removed_segments) = scan.segments(dir, history, &listed.segments)?;
    scan.check_seals(&kept)?;
    remove_orphan_sidecars(fs, dir, &listed.sidecars, &kept);
    if listed.removed_any || removed_segments {
        fs.sync_dir(dir).map_err(open_io("fsync directory", dir))?;
    }
    let newest = kept.last().map(|k| SegmentTail {
        generation: k.generation,
        seq: k.seq,
        len: k.valid_len,
    });
    Ok(scan.finish(history, newest, started))
}

/// Deletes sidecars whose segment is gone (deleted by retention or recovery just before a
/// crash). Derived data: a failure is only logged, and the next open tries again.
fn remove_orphan_sidecars(
    fs: &dyn Fs,
    dir: &Path,
    sidecars: &HashSet<(Generation, u64)>,
    kept: &[Kept],
) {
    let kept: HashSet<(Generation, u64)> = kept.iter().map(|k| (k.generation, k.seq)).collect();
    for &(g, s) in sidecars.difference(&kept) {
        let path = dir.join(sidecar_name(g, s));
        if let Err(e) = fs.remove(&path) {
            tracing::warn!(file = %path.display(), error = %e, "could not delete a sidecar without its segment");
        }
    }
}

/// The store's segment files in a directory, sorted by (generation, seq).
struct Listed {
    segments: Vec<(Generation, u64)>,
    /// Sidecar index files, by their segment.
    sidecars: HashSet<(Generation, u64)>,
    /// Whether an earlier owner's prepared segment was deleted (the directory needs an fsync).
    removed_any: bool,
}

/// Lists the directory: the segment files, with earlier owners' prepared segments deleted and
/// foreign files reported (and left alone).
fn list_segments(
    fs: &dyn Fs,
    dir: &Path,
    report: &mut RecoveryReport,
) -> Result<Listed, OpenError> {
    let mut segments = Vec::new();
    let mut sidecars = HashSet::new();
    let mut removed_any = false;
    for name in fs.list(dir).map_err(open_io("list", dir))? {
        if let Some(seg) = parse_sidecar_name(&name) {
            sidecars.insert(seg);
            continue;
        }
        if name == EPOCHS_FILE || name == RESERVE_FILE {
            continue;
        }
        if is_prepared_name(&name) {
            // An earlier owner's prepared segment: zeros, never data. Its owner is fenced by our
            // `Claim`, so nothing will take it any more.
            let path = dir.join(&name);
            match fs.remove(&path) {
                Ok(()) => removed_any = true,
                // Its owner, still running, took or removed it a moment ago.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(open_io("remove", &path)(e)),
            }
            continue;
        }
        match parse_segment_name(&name) {
            Some((g, s)) => segments.push((g, s)),
            None => {
                tracing::warn!(file = %name, dir = %dir.display(), "ignoring a file that is not the store's");
                report.foreign.push(name);
            }
        }
    }
    segments.sort();
    Ok(Listed {
        segments,
        sidecars,
        removed_any,
    })
}

/// A segment being read: its file and length, its key in the index, and the nonce that keys
/// its frame checksums.
#[derive(Clone, Copy)]
struct Opened<'a> {
    path: &'a Path,
    file: &'a dyn FsFile,
    key: SegKey,
    nonce: Option<Nonce>,
    len: u64,
}

/// Reads `n` bytes at `pos` of a segment into `buf` (replacing what it held).
fn read_into(
    file: &dyn FsFile,
    path: &Path,
    pos: u64,
    n: usize,
    buf: &mut Vec<u8>,
) -> Result<(), OpenError> {
    buf.clear();
    buf.resize(n, 0);
    read_exact_at(file, buf, pos).map_err(open_io("read", path))
}

/// Whether every byte of the file from `pos` to `len` is zero, read 1 MiB at a time.
fn zeros_from(file: &dyn FsFile, path: &Path, pos: u64, len: u64) -> Result<bool, OpenError> {
    let mut chunk = Vec::new();
    let mut at = pos;
    while at < len {
        let n = usize::try_from((len - at).min(1 << 20)).unwrap_or(1 << 20);
        read_into(file, path, at, n, &mut chunk)?;
        if chunk.iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// A segment recovery kept, with its valid length.
struct Kept {
    path: PathBuf,
    generation: Generation,
    seq: u64,
    valid_len: u64,
}

impl Scan<'_> {
    /// Reads the listed segments in order: deletes those a fenced older owner wrote and crashed
    /// creations, indexes the rest. Returns the kept segments, in order, and whether any file
    /// was deleted.
    fn segments(
        &mut self,
        dir: &Path,
        history: &History,
        segments: &[(Generation, u64)],
    ) -> Result<(Vec<Kept>, bool), OpenError> {
        let newest_gen = segments.last().map(|(g, _)| *g);
        let mut removed_any = false;
        let mut kept = Vec::new();
        for (i, &(gen, seq)) in segments.iter().enumerate() {
            let last_of_gen = segments.get(i + 1).is_none_or(|(g, _)| *g != gen);
            let mode = mode_of(history, gen, seq, last_of_gen && Some(gen) == newest_gen);
            let path = dir.join(segment_name(gen, seq));
            if mode == Mode::Phantom {
                tracing::warn!(file = %path.display(), "deleting a segment written by a fenced older owner");
                self.fs.remove(&path).map_err(open_io("remove", &path))?;
                self.report.removed.push(path);
                removed_any = true;
                continue;
            }
            let trusted = match mode {
                Mode::Complete | Mode::Sealed(_) if self.sidecars.contains(&(gen, seq)) => {
                    self.index_from_sidecar(&path, gen, seq, mode)?
                }
                _ => None,
            };
            if let Some(valid_len) = trusted {
                kept.push(Kept {
                    path,
                    generation: gen,
                    seq,
                    valid_len,
                });
                continue;
            }
            match self.segment(&path, gen, seq, mode)? {
                Some(valid_len) => kept.push(Kept {
                    path,
                    generation: gen,
                    seq,
                    valid_len,
                }),
                None => removed_any = true,
            }
        }
        Ok((kept, removed_any))
    }

    /// Indexes a complete or sealed segment from its sidecar instead of scanning it, if the
    /// sidecar is for exactly this segment (generation, seq, nonce, valid length) and its
    /// checksums hold; `None` (nothing changed) otherwise, and the segment is scanned.
    fn index_from_sidecar(
        &mut self,
        path: &Path,
        gen: Generation,
        seq: u64,
        mode: Mode,
    ) -> Result<Option<u64>, OpenError> {
        let sc_path = self.dir.join(sidecar_name(gen, seq));
        let (file, file_len, head) = match self.check_sidecar(path, &sc_path, gen, seq, mode) {
            Ok(checked) => checked,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a sidecar; scanning its segment");
                self.report.sidecars_rejected += 1;
                return Ok(None);
            }
        };
        let mut control = Vec::new();
        let mut at = 0;
        while at < head.control.len() {
            match decode_entry(&head.control[at..]) {
                Ok((entry, used)) if !matches!(entry, Entry::Message { .. }) => {
                    control.push(entry);
                    at += used;
                }
                _ => {
                    tracing::warn!(file = %sc_path.display(), "ignoring a sidecar whose control entries do not decode");
                    self.report.sidecars_rejected += 1;
                    return Ok(None);
                }
            }
        }
        let valid_len = head.id.valid_len;
        let key = self.index.add_segment(SegmentInfo {
            generation: gen,
            seq,
            path: path.to_owned(),
            file,
            len: file_len,
            valid_len,
            summary: Default::default(),
            nonce: Some(head.id.nonce),
            sidecar: Some(SidecarRef {
                path: sc_path,
                rows: head.rows.iter().map(|r| (r.queue, *r)).collect(),
            }),
        });
        // The order a scan would have: declarations, then messages, then the rest (a
        // checkpoint in a segment never passes that segment's later messages of its queue).
        let (declares, rest): (Vec<_>, Vec<_>) = control
            .into_iter()
            .partition(|e| matches!(e, Entry::Declare { .. }));
        for entry in declares {
            self.control(path, 0, entry)?;
        }
        if head.rows.iter().any(|r| !self.known(r.queue)) {
            return Err(corrupt(path, 0, "message names an undeclared queue"));
        }
        self.index.add_sealed(key, &head.rows);
        for entry in rest {
            self.control(path, 0, entry)?;
        }
        self.next_offset = self.next_offset.max(head.end_offset);
        self.report.segments += 1;
        self.report.from_sidecar += 1;
        Ok(Some(valid_len))
    }

    /// The segment's file and length and its sidecar's head, if the sidecar may be trusted.
    fn check_sidecar(
        &self,
        path: &Path,
        sc_path: &Path,
        gen: Generation,
        seq: u64,
        mode: Mode,
    ) -> Result<(Arc<dyn FsFile>, u64, sidecar::Head), SidecarError> {
        let invalid = |what| SidecarError::Invalid {
            path: sc_path.to_owned(),
            what,
        };
        let io = |op, p: &Path| {
            let p = p.to_owned();
            move |source| SidecarError::Io {
                op,
                path: p,
                source,
            }
        };
        let file = self.fs.open(path).map_err(io("open", path))?;
        let file_len = file.len().map_err(io("stat", path))?;
        let mut raw = [0u8; SEGMENT_HEADER_LEN];
        read_exact_at(file.as_ref(), &mut raw, 0).map_err(io("read", path))?;
        let header = SegmentHeader::decode(&raw).map_err(|_| invalid("segment header"))?;
        let nonce = header.nonce.ok_or_else(|| invalid("version 1 segment"))?;
        if header.generation != gen || header.seq != seq {
            return Err(invalid("segment header names another segment"));
        }
        let valid_len = match mode {
            Mode::Sealed(len) if len <= file_len => len,
            Mode::Complete => file_len,
            _ => return Err(invalid("segment shorter than sealed")),
        };
        let sc = self.fs.open(sc_path).map_err(io("open", sc_path))?;
        let head = sidecar::read_head(sc.as_ref(), sc_path)?;
        let expected = Identity {
            generation: gen,
            seq,
            nonce,
            valid_len,
        };
        if head.id != expected {
            return Err(invalid("for another segment, nonce or length"));
        }
        let first = head
            .first_offset
            .into_iter()
            .chain(head.rows.iter().map(|r| r.min))
            .min();
        if first.is_some_and(|f| f < self.next_offset) {
            return Err(invalid("offsets go backwards"));
        }
        Ok((file, file_len, head))
    }

    /// Writes the sidecar of a segment just scanned that no writer will change again, so the
    /// next open need not scan it, and lets its entries leave memory. Derived data: a failure
    /// is logged and the segment is scanned again next time.
    fn write_sidecar(
        &mut self,
        key: SegKey,
        gen: Generation,
        seq: u64,
        nonce: Nonce,
        built: Built,
        valid_len: u64,
    ) {
        let id = Identity {
            generation: gen,
            seq,
            nonce,
            valid_len,
        };
        match sidecar::make(self.fs, &self.dir, id, &built) {
            Ok(sc) => {
                self.index.attach_sidecar(key, sc);
                self.report.sidecars_written += 1;
            }
            Err(e) => tracing::warn!(error = %e, "could not write a sidecar"),
        }
    }

    /// A segment cut short at a batch boundary decodes cleanly: only its seal tells.
    fn check_seals(&self, kept: &[Kept]) -> Result<(), OpenError> {
        for k in kept {
            if let Some(&sealed) = self.seals.get(&(k.generation, k.seq)) {
                if sealed != k.valid_len {
                    let valid_len = k.valid_len;
                    return Err(corrupt(
                        &k.path,
                        valid_len.min(sealed),
                        format!(
                            "segment holds {valid_len} valid bytes, but was sealed at {sealed}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What recovery hands the store once every segment is read.
    fn finish(
        mut self,
        history: &History,
        newest: Option<SegmentTail>,
        started: Instant,
    ) -> Recovered {
        // Offsets are never reused, even if every segment holding the newest ones was reclaimed.
        for r in &history.records {
            if let EpochRecord::Start { start, .. } = r {
                self.next_offset = self.next_offset.max(*start);
            }
        }
        for q in &mut self.index.queues {
            q.tail = q.tail.max(q.checkpoint);
        }
        self.index.publish_tails();
        self.report.undelivered = self.index.queues.iter().map(|q| q.undelivered()).sum();
        self.report.queues = self.index.by_name.len();
        self.report.elapsed = started.elapsed();
        Recovered {
            index: self.index,
            next_offset: self.next_offset,
            next_queue_id: self.next_queue_id,
            newest,
            report: self.report,
        }
    }

    /// Reads one segment; returns its valid length, or `None` if it was a crashed creation and
    /// was deleted (or it was deleted under us).
    fn segment(
        &mut self,
        path: &Path,
        gen: Generation,
        seq: u64,
        mode: Mode,
    ) -> Result<Option<u64>, OpenError> {
        let mut bytes = std::mem::take(&mut self.buf);
        let read = self.read_segment(path, gen, seq, mode, &mut bytes);
        self.buf = bytes;
        read
    }

    /// [`Scan::segment`] with the buffer to read frames into.
    fn read_segment(
        &mut self,
        path: &Path,
        gen: Generation,
        seq: u64,
        mode: Mode,
        buf: &mut Vec<u8>,
    ) -> Result<Option<u64>, OpenError> {
        let Some(file) = self.open_segment(path, mode)? else {
            return Ok(None);
        };
        let len = file.len().map_err(open_io("stat", path))?;
        self.report.segments += 1;
        let head = usize::try_from(len.min(64)).unwrap_or(64);
        read_into(file.as_ref(), path, 0, head, buf)?;
        let found = self.segment_header(path, gen, seq, mode, file.as_ref(), buf, len)?;
        let Some(header) = found else {
            return Ok(None);
        };
        let limit = match mode {
            Mode::Sealed(sealed) if sealed > len => {
                return Err(corrupt(
                    path,
                    len,
                    format!(
                        "file ends before byte {sealed}, which a later owner recorded as valid"
                    ),
                ))
            }
            Mode::Sealed(sealed) => sealed,
            _ => len,
        };
        let key = self.index.add_segment(SegmentInfo {
            generation: gen,
            seq,
            path: path.to_owned(),
            file: Arc::clone(&file),
            len,
            valid_len: limit,
            summary: Default::default(),
            nonce: header.nonce,
            sidecar: None,
        });
        let segment = Opened {
            path,
            file: file.as_ref(),
            key,
            nonce: header.nonce,
            len,
        };
        // A segment no writer will change again gets its sidecar, built during the scan.
        let mut builder = match (mode, header.nonce) {
            (Mode::Complete | Mode::Sealed(_), Some(_)) => Some(Builder::default()),
            _ => None,
        };
        let valid = self.batches(
            &segment,
            header.len() as u64,
            limit,
            mode,
            buf,
            &mut builder,
        )?;
        if let (Some(builder), Some(nonce)) = (builder, header.nonce) {
            self.write_sidecar(key, gen, seq, nonce, builder.finish(), valid);
        }
        Ok(Some(valid))
    }

    /// Opens a listed segment; `None` if it was deleted in between (only a complete segment may
    /// be: see below).
    fn open_segment(&self, path: &Path, mode: Mode) -> Result<Option<Arc<dyn FsFile>>, OpenError> {
        let file = match self.fs.open(path) {
            Ok(file) => file,
            // Listed a moment ago, gone now: an older owner's retention deleted it after checking
            // its fence, just before our `Claim` (it deletes only segments whose every message is
            // delivered or expired, per checkpoints that are durable and that we read too).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && mode == Mode::Complete => {
                tracing::warn!(file = %path.display(), "a segment was deleted while the store opened");
                return Ok(None);
            }
            Err(e) => return Err(open_io("open", path)(e)),
        };
        Ok(Some(file))
    }

    /// The segment's header, checked against its name; `None` if the segment is a crashed
    /// creation, which is deleted.
    #[allow(clippy::too_many_arguments)]
    fn segment_header(
        &mut self,
        path: &Path,
        gen: Generation,
        seq: u64,
        mode: Mode,
        file: &dyn FsFile,
        head: &[u8],
        len: u64,
    ) -> Result<Option<SegmentHeader>, OpenError> {
        match SegmentHeader::decode(head) {
            Ok(h) if h.generation == gen && h.seq == seq => Ok(Some(h)),
            Ok(_) => Err(corrupt(path, 0, "segment header names another segment")),
            Err(e) => {
                // The header is synced before any batch is written, so a crash while creating the
                // file leaves at most a torn header, then nothing or preallocated zeros; anything
                // else (a batch of the old format, any other byte) is damage.
                if mode == Mode::Tail && zeros_from(file, path, SEGMENT_HEADER_LEN as u64, len)? {
                    tracing::warn!(file = %path.display(), "deleting a segment whose creation was cut short");
                    self.fs.remove(path).map_err(open_io("remove", path))?;
                    self.report.removed.push(path.to_owned());
                    return Ok(None);
                }
                Err(corrupt(path, 0, e.to_string()))
            }
        }
    }

    /// Indexes the batches of `segment` from byte `pos` up to `limit`; in the tail segment, cuts
    /// preallocated zeros and a torn last batch. Returns the segment's valid length.
    fn batches(
        &mut self,
        segment: &Opened<'_>,
        mut pos: u64,
        limit: u64,
        mode: Mode,
        buf: &mut Vec<u8>,
        builder: &mut Option<Builder>,
    ) -> Result<u64, OpenError> {
        let Opened {
            path,
            file,
            key,
            nonce,
            len,
        } = *segment;
        while pos < limit {
            // The frame at `pos`, cut at `limit` as a slice of the whole file would be: what
            // `decode_batch` sees is the same, only one frame is in memory.
            let avail = usize::try_from(limit - pos).unwrap_or(usize::MAX);
            let head = avail.min(BATCH_HEADER_LEN);
            read_into(file, path, pos, head, buf)?;
            if let Ok(h) = BatchHeader::decode(nonce, buf) {
                let whole = avail.min(BATCH_HEADER_LEN + h.payload_len as usize);
                if whole > head {
                    read_into(file, path, pos, whole, buf)?;
                }
            }
            match decode_batch(nonce, buf) {
                Ok((header, payload)) => {
                    if header.first_offset < self.next_offset {
                        return Err(corrupt(path, pos, "batch offsets go backwards"));
                    }
                    self.next_offset = header.first_offset;
                    self.apply(path, key, pos, header.first_offset, payload)?;
                    let base = pos + BATCH_HEADER_LEN as u64;
                    if let Some(b) = builder {
                        if b.batch(header.first_offset, base, payload).is_err() {
                            *builder = None;
                        }
                    }
                    pos = base + payload.len() as u64;
                }
                Err(_) if mode == Mode::Tail && zeros_from(file, path, pos, len)? => {
                    // Preallocated space the writer never reached: not data, not torn.
                    file.set_len(pos).map_err(open_io("truncate", path))?;
                    file.sync_data().map_err(open_io("fdatasync", path))?;
                    self.index.set_file_len(key, pos);
                    break;
                }
                Err(e) if mode == Mode::Tail => {
                    // Rare (a torn last batch, or damage): look at the rest of the file whole.
                    let e = e.to_string();
                    let mut rest = Vec::new();
                    read_all_into(file, &mut rest).map_err(open_io("read", path))?;
                    let from = usize::try_from(pos + 1).unwrap_or(usize::MAX);
                    if let Some(at) = self.find_valid_batch(nonce, &rest, from) {
                        return Err(corrupt(
                            path,
                            pos,
                            format!("{e}, yet a valid batch follows at byte {at}"),
                        ));
                    }
                    self.cut_tail(path, file, key, pos, len)?;
                    break;
                }
                Err(e) => return Err(corrupt(path, pos, e.to_string())),
            }
        }
        Ok(pos)
    }

    fn cut_tail(
        &mut self,
        path: &Path,
        file: &dyn FsFile,
        key: SegKey,
        at: u64,
        len: u64,
    ) -> Result<(), OpenError> {
        tracing::warn!(file = %path.display(), at, cut = len - at, "cutting a torn tail that was never acknowledged");
        file.set_len(at).map_err(open_io("truncate", path))?;
        file.sync_data().map_err(open_io("fdatasync", path))?;
        self.index.set_file_len(key, at);
        self.report.torn_tail = Some((path.to_owned(), at, len - at));
        Ok(())
    }

    /// A position at or after `from` where a whole batch with valid checksums (keyed by the
    /// segment's nonce) and a plausible offset starts: the evidence that separates damage from a
    /// torn tail. In a version 2 segment no message body can imitate such a batch, as bodies
    /// cannot know the nonce; in a version 1 segment one could (DESIGN.md "Known limits").
    fn find_valid_batch(&self, nonce: Option<Nonce>, bytes: &[u8], from: usize) -> Option<usize> {
        let start = from.max(SEGMENT_HEADER_LEN_V1.min(from.max(1)));
        (start..bytes.len().saturating_sub(BATCH_HEADER_LEN - 1)).find(|&p| {
            matches!(decode_batch(nonce, &bytes[p..]), Ok((h, _)) if h.first_offset >= self.next_offset)
        })
    }

    fn apply(
        &mut self,
        path: &Path,
        seg: SegKey,
        batch_pos: u64,
        first: Offset,
        payload: &[u8],
    ) -> Result<(), OpenError> {
        let mut at = 0usize;
        let mut expected = first;
        let base = batch_pos + BATCH_HEADER_LEN as u64;
        while at < payload.len() {
            let here = base + at as u64;
            let (entry, used) =
                decode_entry(&payload[at..]).map_err(|e| corrupt(path, here, e.to_string()))?;
            match entry {
                Entry::Message {
                    offset,
                    expiry,
                    queues,
                    ..
                } => {
                    if offset != expected {
                        return Err(corrupt(path, here, "message offset out of sequence"));
                    }
                    if queues.is_empty() || queues.iter().any(|q| !self.known(*q)) {
                        return Err(corrupt(path, here, "message names an undeclared queue"));
                    }
                    let entry = IndexEntry {
                        offset,
                        expiry: expiry.map_or(u64::MAX, |e| e.0),
                        pos: here,
                        seg,
                        len: u32::try_from(used)
                            .map_err(|_| corrupt(path, here, "entry too long"))?,
                    };
                    self.index.add_message(&queues, entry);
                    expected = offset.next();
                    self.next_offset = expected;
                }
                other => self.control(path, here, other)?,
            }
            at += used;
        }
        Ok(())
    }

    /// Applies a declaration, checkpoint, tail or seal found at byte `here` of `path`.
    fn control(&mut self, path: &Path, here: u64, entry: Entry<'_>) -> Result<(), OpenError> {
        match entry {
            Entry::Message { .. } => return Err(corrupt(path, here, "unexpected message entry")),
            Entry::Declare { queue, name } => {
                let name = QueueName::new(name).map_err(|e| corrupt(path, here, e.to_string()))?;
                match self.index.by_name.get(&name) {
                    Some(&id) if id != queue => {
                        return Err(corrupt(path, here, "queue declared twice with two ids"))
                    }
                    _ => {}
                }
                if self.known(queue) && self.index.queues[queue as usize].name != name {
                    return Err(corrupt(path, here, "queue id declared with two names"));
                }
                self.index.declare(queue, name);
                self.next_queue_id = self.next_queue_id.max(queue.saturating_add(1));
            }
            Entry::Checkpoint { queue, upto } => {
                if !self.known(queue) {
                    return Err(corrupt(path, here, "checkpoint of an undeclared queue"));
                }
                self.index
                    .set_checkpoint(self.fs, queue, upto)
                    .map_err(|e| corrupt(path, here, e.to_string()))?;
            }
            Entry::Tail { queue, last } => {
                if !self.known(queue) {
                    return Err(corrupt(path, here, "tail of an undeclared queue"));
                }
                self.index.raise_tail(queue, last);
            }
            Entry::Seal {
                generation,
                seq,
                len,
            } => {
                self.seals.insert((generation, seq), len);
            }
        }
        Ok(())
    }

    fn known(&self, queue: u32) -> bool {
        self.index
            .queues
            .get(queue as usize)
            .is_some_and(|q| self.index.by_name.get(&q.name) == Some(&queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_reject_lookalikes() {
        let name = segment_name(Generation(3), 17);
        assert_eq!(parse_segment_name(&name), Some((Generation(3), 17)));
        assert_eq!(
            parse_segment_name("0000000000000003-0000000000000011.seg.tmp"),
            None
        );
        assert_eq!(parse_segment_name("3-17.seg"), None);
        assert_eq!(
            parse_segment_name("000000000000000G-0000000000000011.seg"),
            None
        );
    }
}
