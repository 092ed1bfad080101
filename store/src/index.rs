//! In-memory view of what is durable: segments, and per queue its undelivered messages,
//! checkpoint and tail. Rebuilt by recovery at open; changed only by the writer, after the
//! fdatasync that made a change durable, so readers never see an unsynced message.
//!
//! Invariants:
//! - a queue's entries are in strictly increasing offset order, all above its checkpoint;
//!   they are kept per segment ("chunks"); a chunk of a segment with a sidecar may be on disk
//!   (a count and its first and last offset), and holds exactly the queue's last `count`
//!   records of that segment: entries only ever leave a chunk at its front;
//! - `checkpoint <= tail` for every queue;
//! - every entry points into a segment present in `segments`, unless that segment was
//!   reclaimed because the entry expired.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::format::Nonce;
use crate::io::{Fs, FsFile};
use crate::sidecar::{self, Record, Row, SidecarError, SidecarRef};
use crate::types::{Generation, Offset, QueueName, UnixMillis};

/// Position of a segment in store order (by generation, then sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SegKey(pub(crate) u32);

/// Where one message entry lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexEntry {
    pub(crate) offset: Offset,
    /// Expiry in ms since the epoch; `u64::MAX` = never.
    pub(crate) expiry: u64,
    pub(crate) pos: u64,
    pub(crate) seg: SegKey,
    pub(crate) len: u32,
}

/// Per segment, per queue: what must be true before the segment may be deleted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueSummary {
    pub(crate) max_offset: Offset,
    /// Latest expiry of this queue's messages in the segment; `u64::MAX` if one never expires.
    pub(crate) max_expiry: u64,
}

#[derive(Debug)]
pub(crate) struct SegmentInfo {
    pub(crate) generation: Generation,
    pub(crate) seq: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn FsFile>,
    /// Bytes the file takes on disk.
    pub(crate) len: u64,
    /// Bytes of it that count (less than `len` only for a tail sealed by a successor while a
    /// fenced owner kept writing).
    pub(crate) valid_len: u64,
    /// Keyed by queue id.
    pub(crate) summary: HashMap<u32, QueueSummary>,
    /// Keys the segment's frames (version 2); `None` for a version 1 segment.
    pub(crate) nonce: Option<Nonce>,
    /// Set once the segment is immutable and its sidecar durable: from then on its queues'
    /// entries may leave memory and be loaded from the sidecar when a read reaches them.
    pub(crate) sidecar: Option<SidecarRef>,
}

/// A queue's remaining messages in one segment.
#[derive(Debug)]
pub(crate) enum Entries {
    /// In memory; never empty (an emptied chunk is dropped).
    Resident(VecDeque<IndexEntry>),
    /// In the segment's sidecar: its last `count` records of this queue, from offset `first` to
    /// `last` (the ones before `first` were delivered or expired and forgotten).
    OnDisk {
        count: u64,
        first: Offset,
        last: Offset,
    },
}

/// One segment's part of a queue: a few words, whatever the number of messages, unless resident.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) seg: SegKey,
    pub(crate) entries: Entries,
}

impl Chunk {
    pub(crate) fn count(&self) -> u64 {
        match &self.entries {
            Entries::Resident(d) => d.len() as u64,
            Entries::OnDisk { count, .. } => *count,
        }
    }

    fn first(&self) -> Offset {
        match &self.entries {
            Entries::Resident(d) => d.front().map_or(Offset::ZERO, |e| e.offset),
            Entries::OnDisk { first, .. } => *first,
        }
    }

    fn last(&self) -> Offset {
        match &self.entries {
            Entries::Resident(d) => d.back().map_or(Offset::ZERO, |e| e.offset),
            Entries::OnDisk { last, .. } => *last,
        }
    }

    /// Entries held in memory.
    fn resident(&self) -> usize {
        match &self.entries {
            Entries::Resident(d) => d.len(),
            Entries::OnDisk { .. } => 0,
        }
    }

    /// Gives the entries back to the sidecar (only for a segment that has one).
    fn evict(&mut self) {
        if let Entries::Resident(d) = &self.entries {
            if let (Some(f), Some(l)) = (d.front(), d.back()) {
                self.entries = Entries::OnDisk {
                    count: d.len() as u64,
                    first: f.offset,
                    last: l.offset,
                };
            }
        }
    }

    /// Loads the entries from the segment's sidecar (or, if that fails, from the segment
    /// itself) if they are not in memory.
    fn make_resident(
        &mut self,
        fs: &dyn Fs,
        segments: &BTreeMap<SegKey, SegmentInfo>,
        queue: u32,
    ) -> Result<&mut VecDeque<IndexEntry>, SidecarError> {
        if let Entries::OnDisk { count, first, .. } = self.entries {
            let loaded = load(fs, segments, self.seg, queue, first, count)?;
            self.entries = Entries::Resident(loaded);
        }
        match &mut self.entries {
            Entries::Resident(d) => Ok(d),
            // Just made resident above.
            Entries::OnDisk { .. } => Err(SidecarError::Invalid {
                path: PathBuf::new(),
                what: "chunk not resident",
            }),
        }
    }
}

/// Queue `queue`'s last `count` entries in segment `key`, from offset `first` on: from the
/// sidecar, or from the segment's own bytes if the sidecar cannot be read.
fn load(
    fs: &dyn Fs,
    segments: &BTreeMap<SegKey, SegmentInfo>,
    key: SegKey,
    queue: u32,
    first: Offset,
    count: u64,
) -> Result<VecDeque<IndexEntry>, SidecarError> {
    let Some(seg) = segments.get(&key) else {
        return Err(SidecarError::Invalid {
            path: PathBuf::new(),
            what: "an indexed segment is gone",
        });
    };
    let pick = |records: &[Record]| -> Option<VecDeque<IndexEntry>> {
        let start = records.partition_point(|r| r.offset < first);
        let out: VecDeque<IndexEntry> = records[start..]
            .iter()
            .map(|r| IndexEntry {
                offset: r.offset,
                expiry: r.expiry,
                pos: r.pos,
                seg: key,
                len: r.len,
            })
            .collect();
        (out.len() as u64 == count).then_some(out)
    };
    if let Some(row) = seg
        .sidecar
        .as_ref()
        .and_then(|s| s.rows.get(&queue).map(|r| (s, r)))
    {
        match sidecar::read_records(fs, &row.0.path, row.1) {
            Ok(records) => match pick(&records) {
                Some(out) => return Ok(out),
                None => {
                    tracing::warn!(file = %row.0.path.display(), "sidecar disagrees with the index; reading the segment")
                }
            },
            Err(e) => tracing::warn!(error = %e, "sidecar unreadable; reading the segment"),
        }
    }
    let invalid = |what| SidecarError::Invalid {
        path: seg.path.clone(),
        what,
    };
    let nonce = seg
        .nonce
        .ok_or_else(|| invalid("version 1 segment without entries"))?;
    let built = sidecar::build_from_file(seg.file.as_ref(), &seg.path, nonce, seg.valid_len)?;
    let records = built
        .queues
        .get(&queue)
        .map(Vec::as_slice)
        .unwrap_or_default();
    pick(records).ok_or_else(|| invalid("segment disagrees with the index"))
}

#[derive(Debug)]
pub(crate) struct QueueIndex {
    pub(crate) name: QueueName,
    /// The undelivered messages, one chunk per segment, in offset order.
    pub(crate) chunks: VecDeque<Chunk>,
    pub(crate) checkpoint: Offset,
    pub(crate) tail: Offset,
    pub(crate) tail_tx: watch::Sender<Offset>,
    /// Expired messages counted since open.
    pub(crate) expired: u64,
    /// Highest offset already counted as expired (each is counted once, however often read).
    pub(crate) expired_seen: Offset,
}

impl QueueIndex {
    fn new(name: QueueName, tail_tx: watch::Sender<Offset>) -> QueueIndex {
        QueueIndex {
            name,
            chunks: VecDeque::new(),
            checkpoint: Offset::ZERO,
            tail: Offset::ZERO,
            tail_tx,
            expired: 0,
            expired_seen: Offset::ZERO,
        }
    }

    /// Messages after the checkpoint not yet known to be expired (exact, wherever they are).
    pub(crate) fn undelivered(&self) -> u64 {
        self.chunks.iter().map(Chunk::count).sum()
    }

    /// Entries held in memory.
    pub(crate) fn resident(&self) -> usize {
        self.chunks.iter().map(Chunk::resident).sum()
    }

    fn count_expired(&mut self, offset: Offset) {
        if offset > self.expired_seen {
            self.expired += 1;
            self.expired_seen = offset;
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) queues: Vec<QueueIndex>,
    pub(crate) by_name: HashMap<QueueName, u32>,
    segments: BTreeMap<SegKey, SegmentInfo>,
    pub(crate) next_seg_key: u32,
    /// Sum of the segments' lengths, readable without the index lock (the quota check on every
    /// append reads it).
    disk_bytes: Arc<AtomicU64>,
}

impl Index {
    /// Binds `id` to `name`. Declaring the same binding again (every segment's preamble does) is a
    /// no-op that keeps the queue's entries.
    pub(crate) fn declare(&mut self, id: u32, name: QueueName) {
        if self.by_name.get(&name) == Some(&id) {
            return;
        }
        let (tail_tx, _) = watch::channel(Offset::ZERO);
        let idx = id as usize;
        while self.queues.len() <= idx {
            // Ids are dense: a gap can only be filled by a later declaration of that id.
            let placeholder = QueueIndex::new(name.clone(), watch::channel(Offset::ZERO).0);
            self.queues.push(placeholder);
        }
        self.queues[idx] = QueueIndex::new(name.clone(), tail_tx);
        self.by_name.insert(name, id);
    }

    pub(crate) fn queue(&self, name: &QueueName) -> Option<&QueueIndex> {
        self.by_name
            .get(name)
            .and_then(|&id| self.queues.get(id as usize))
    }

    pub(crate) fn add_segment(&mut self, info: SegmentInfo) -> SegKey {
        let key = SegKey(self.next_seg_key);
        self.next_seg_key += 1;
        self.disk_bytes.fetch_add(info.len, Ordering::Relaxed);
        self.segments.insert(key, info);
        key
    }

    /// The segments, oldest first.
    pub(crate) fn segments(&self) -> &BTreeMap<SegKey, SegmentInfo> {
        &self.segments
    }

    /// Records how far a segment's data now reaches (after a batch). Preallocated space already
    /// counts on disk, so the file only grows if the data passes it.
    pub(crate) fn set_valid_len(&mut self, key: SegKey, valid: u64) {
        if let Some(seg) = self.segments.get_mut(&key) {
            seg.valid_len = valid;
            if valid > seg.len {
                self.disk_bytes
                    .fetch_add(valid - seg.len, Ordering::Relaxed);
                seg.len = valid;
            }
        }
    }

    /// Records that a segment file was cut to `len` bytes, all of them valid.
    pub(crate) fn set_file_len(&mut self, key: SegKey, len: u64) {
        if let Some(seg) = self.segments.get_mut(&key) {
            self.disk_bytes.fetch_sub(seg.len, Ordering::Relaxed);
            self.disk_bytes.fetch_add(len, Ordering::Relaxed);
            seg.len = len;
            seg.valid_len = len;
        }
    }

    /// A handle on the running total of segment bytes.
    pub(crate) fn disk_bytes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.disk_bytes)
    }

    /// Records a durable message for each of its queues.
    pub(crate) fn add_message(&mut self, queues: &[u32], entry: IndexEntry) {
        if let Some(seg) = self.segments.get_mut(&entry.seg) {
            for &q in queues {
                let s = seg.summary.entry(q).or_default();
                s.max_offset = s.max_offset.max(entry.offset);
                s.max_expiry = s.max_expiry.max(entry.expiry);
            }
        }
        for &q in queues {
            if let Some(queue) = self.queues.get_mut(q as usize) {
                match queue.chunks.back_mut() {
                    Some(Chunk {
                        seg,
                        entries: Entries::Resident(d),
                    }) if *seg == entry.seg => d.push_back(entry),
                    _ => queue.chunks.push_back(Chunk {
                        seg: entry.seg,
                        entries: Entries::Resident(VecDeque::from([entry])),
                    }),
                }
                queue.tail = queue.tail.max(entry.offset);
            }
        }
    }

    /// Records a sealed segment's messages from its sidecar's table (recovery): per queue a
    /// chunk of a few words, whatever its number of messages. The queues must be declared.
    pub(crate) fn add_sealed(&mut self, key: SegKey, rows: &[Row]) {
        if let Some(seg) = self.segments.get_mut(&key) {
            for row in rows {
                seg.summary.insert(
                    row.queue,
                    QueueSummary {
                        max_offset: row.max,
                        max_expiry: row.max_expiry,
                    },
                );
            }
        }
        for row in rows {
            if let Some(queue) = self.queues.get_mut(row.queue as usize) {
                queue.chunks.push_back(Chunk {
                    seg: key,
                    entries: Entries::OnDisk {
                        count: u64::from(row.count),
                        first: row.min,
                        last: row.max,
                    },
                });
                queue.tail = queue.tail.max(row.max);
            }
        }
    }

    /// Records that segment `key` (immutable now) has a durable sidecar, and lets its entries
    /// leave memory, except in a queue's first chunk (the one its reader is on).
    pub(crate) fn attach_sidecar(&mut self, key: SegKey, sidecar: SidecarRef) {
        let Some(seg) = self.segments.get_mut(&key) else {
            return;
        };
        let queues: Vec<u32> = seg.summary.keys().copied().collect();
        seg.sidecar = Some(sidecar);
        for q in queues {
            if let Some(queue) = self.queues.get_mut(q as usize) {
                for chunk in queue.chunks.iter_mut().skip(1) {
                    if chunk.seg == key {
                        chunk.evict();
                    }
                }
            }
        }
    }

    /// Raises a queue's last offset to `last` (recovery: a preamble's tail entry, for messages
    /// whose segment was reclaimed).
    pub(crate) fn raise_tail(&mut self, q: u32, last: Offset) {
        if let Some(queue) = self.queues.get_mut(q as usize) {
            queue.tail = queue.tail.max(last);
        }
    }

    /// Records a durable checkpoint (monotonic) and forgets delivered entries. The queue's last
    /// offset is at least its checkpoint (`checkpoint <= tail`), even when every message up to
    /// it has been reclaimed. A checkpoint that ends inside a chunk on disk loads that chunk
    /// (so the queue's count stays exact); only that load can fail.
    pub(crate) fn set_checkpoint(
        &mut self,
        fs: &dyn Fs,
        q: u32,
        upto: Offset,
    ) -> Result<(), SidecarError> {
        let Some(queue) = self.queues.get_mut(q as usize) else {
            return Ok(());
        };
        if upto > queue.checkpoint {
            queue.checkpoint = upto;
        }
        queue.tail = queue.tail.max(queue.checkpoint);
        let ckpt = queue.checkpoint;
        while let Some(front) = queue.chunks.front_mut() {
            if front.last() <= ckpt {
                queue.chunks.pop_front();
                continue;
            }
            if front.first() <= ckpt {
                let d = front.make_resident(fs, &self.segments, q)?;
                while d.front().is_some_and(|e| e.offset <= ckpt) {
                    d.pop_front();
                }
            }
            break;
        }
        Ok(())
    }

    /// Tells waiting readers about new tails.
    pub(crate) fn publish_tails(&self) {
        for q in &self.queues {
            q.tail_tx.send_if_modified(|t| {
                if *t != q.tail {
                    *t = q.tail;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Segments (other than `active`) whose every message is delivered or expired at `now`.
    pub(crate) fn reclaimable(&self, active: SegKey, now: UnixMillis) -> Vec<SegKey> {
        self.segments
            .iter()
            .filter(|(k, _)| **k != active)
            .filter(|(_, seg)| {
                seg.summary.iter().all(|(q, s)| {
                    let ckpt = self
                        .queues
                        .get(*q as usize)
                        .map_or(Offset::ZERO, |x| x.checkpoint);
                    ckpt >= s.max_offset || now.0 >= s.max_expiry
                })
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// Forgets a deleted segment and every entry that pointed into it (all expired or delivered).
    /// Those not counted as expired yet are counted now; when that needs a chunk on disk that
    /// cannot be read any more, its whole count is taken (logged).
    pub(crate) fn forget_segment(&mut self, fs: &dyn Fs, key: SegKey) -> Option<SegmentInfo> {
        let queues: Vec<u32> = self.segments.get(&key)?.summary.keys().copied().collect();
        for q in queues {
            let Some(queue) = self.queues.get_mut(q as usize) else {
                continue;
            };
            let seen = queue.expired_seen;
            let mut dropped = 0;
            for chunk in queue.chunks.iter_mut().filter(|c| c.seg == key) {
                if chunk.first() > seen {
                    dropped += chunk.count();
                } else if chunk.last() > seen {
                    match chunk.make_resident(fs, &self.segments, q) {
                        Ok(d) => dropped += d.iter().filter(|e| e.offset > seen).count() as u64,
                        Err(e) => {
                            tracing::warn!(error = %e, "counting a reclaimed segment's expired messages");
                            dropped += chunk.count();
                        }
                    }
                }
            }
            queue.chunks.retain(|c| c.seg != key);
            queue.expired += dropped;
        }
        let info = self.segments.remove(&key)?;
        self.disk_bytes.fetch_sub(info.len, Ordering::Relaxed);
        Some(info)
    }

    /// Up to `max` unexpired entries of queue `id` above `after`; expired ones met on the way
    /// are counted once, and those at the front are forgotten. Chunks the read reaches are
    /// loaded from their sidecar; afterwards only the queue's first chunk and the one the read
    /// ended in stay in memory.
    pub(crate) fn pick(
        &mut self,
        fs: &dyn Fs,
        id: u32,
        after: Offset,
        max: usize,
        now: u64,
    ) -> Result<Vec<IndexEntry>, SidecarError> {
        let Some(queue) = self.queues.get_mut(id as usize) else {
            return Ok(Vec::new());
        };
        let segments = &self.segments;
        while let Some(front) = queue.chunks.front_mut() {
            // A chunk on disk whose segment holds nothing of this queue that is still alive, and
            // none of it counted yet: forgotten whole, without loading it.
            if let Entries::OnDisk { count, first, last } = front.entries {
                let all_expired = segments
                    .get(&front.seg)
                    .and_then(|s| s.summary.get(&id))
                    .is_some_and(|s| s.max_expiry <= now);
                if all_expired && first > queue.expired_seen {
                    queue.expired += count;
                    queue.expired_seen = last;
                    queue.chunks.pop_front();
                    continue;
                }
            }
            let d = front.make_resident(fs, segments, id)?;
            let mut popped = Vec::new();
            while let Some(e) = d.front().copied() {
                if e.expiry > now {
                    break;
                }
                popped.push(e.offset);
                d.pop_front();
            }
            let empty = d.is_empty();
            for o in popped {
                queue.count_expired(o);
            }
            if !empty {
                break;
            }
            queue.chunks.pop_front();
        }
        let mut i = queue.chunks.partition_point(|c| c.last() <= after);
        let mut picked = Vec::new();
        let mut expired = Vec::new();
        let mut ended_in = None;
        while i < queue.chunks.len() && picked.len() < max {
            let d = queue.chunks[i].make_resident(fs, segments, id)?;
            ended_in = Some(i);
            let start = d.partition_point(|e| e.offset <= after);
            for e in d.range(start..) {
                if picked.len() >= max {
                    break;
                }
                if e.expiry <= now {
                    expired.push(e.offset);
                } else {
                    picked.push(*e);
                }
            }
            i += 1;
        }
        for o in expired {
            queue.count_expired(o);
        }
        for (j, chunk) in queue.chunks.iter_mut().enumerate().skip(1) {
            if Some(j) != ended_in
                && segments
                    .get(&chunk.seg)
                    .is_some_and(|s| s.sidecar.is_some())
            {
                chunk.evict();
            }
        }
        Ok(picked)
    }

    pub(crate) fn bytes_on_disk(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Index entries held in memory, over all queues (the rest are in sidecars).
    pub(crate) fn resident_entries(&self) -> usize {
        self.queues.iter().map(QueueIndex::resident).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::io::OsFs;

    fn segment(index: &mut Index, dir: &std::path::Path, seq: u64) -> SegKey {
        let path = dir.join(format!("{seq}.seg"));
        let file = OsFs.create_new(&path).unwrap();
        index.add_segment(SegmentInfo {
            generation: Generation(1),
            seq,
            path,
            file,
            len: 0,
            valid_len: 0,
            summary: HashMap::new(),
            nonce: Some(Nonce(seq)),
            sidecar: None,
        })
    }

    /// Sealed segments cost a chunk per queue, not an entry per message: the resident entries
    /// stay at the first chunk's and the active segment's, however many segments are sealed,
    /// and the queue's count stays exact.
    #[test]
    fn sealed_segments_do_not_grow_the_index_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::default();
        index.declare(0, QueueName::new("q").unwrap());
        const PER_SEGMENT: u64 = 500;
        let mut offset = 0;
        let mut resident = Vec::new();
        for seq in 0..40 {
            let key = segment(&mut index, dir.path(), seq);
            for i in 0..PER_SEGMENT {
                offset += 1;
                let entry = IndexEntry {
                    offset: Offset::new(offset),
                    expiry: u64::MAX,
                    pos: 40 + i * 100,
                    seg: key,
                    len: 100,
                };
                index.add_message(&[0], entry);
            }
            // The writer left the previous segment: it gets its sidecar.
            if seq > 0 {
                let sealed = SegKey(key.0 - 1);
                index.attach_sidecar(
                    sealed,
                    SidecarRef {
                        path: dir.path().join(format!("{}.idx", seq - 1)),
                        rows: HashMap::new(),
                    },
                );
            }
            resident.push(index.resident_entries());
            assert_eq!(index.queues[0].undelivered(), offset);
        }
        // The first segment (where the reader is) and the active one.
        assert!(
            resident.iter().all(|&r| r as u64 <= 2 * PER_SEGMENT),
            "{resident:?}"
        );
        assert_eq!(index.queues[0].chunks.len(), 40);
        // A checkpoint past whole sealed chunks drops them without loading anything.
        index
            .set_checkpoint(&OsFs, 0, Offset::new(20 * PER_SEGMENT))
            .unwrap();
        assert_eq!(index.queues[0].undelivered(), offset - 20 * PER_SEGMENT);
        assert_eq!(index.queues[0].chunks.len(), 20);
    }
}
