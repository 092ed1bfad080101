//! In-memory view of what is durable: segments, and per queue its undelivered messages,
//! checkpoint and tail. Rebuilt by recovery at open; changed only by the writer, after the
//! fdatasync that made a change durable, so readers never see an unsynced message.
//!
//! Invariants:
//! - a queue's entries are in strictly increasing offset order, all above its checkpoint;
//! - `checkpoint <= tail` for every queue;
//! - every entry points into a segment present in `segments`, unless that segment was
//!   reclaimed because the entry expired.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::io::FsFile;
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
}

#[derive(Debug)]
pub(crate) struct QueueIndex {
    pub(crate) name: QueueName,
    pub(crate) entries: VecDeque<IndexEntry>,
    pub(crate) checkpoint: Offset,
    pub(crate) tail: Offset,
    pub(crate) tail_tx: watch::Sender<Offset>,
    /// Expired messages counted since open.
    pub(crate) expired: u64,
    /// Highest offset already counted as expired (each is counted once, however often read).
    pub(crate) expired_seen: Offset,
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
            let placeholder = QueueIndex {
                name: name.clone(),
                entries: VecDeque::new(),
                checkpoint: Offset::ZERO,
                tail: Offset::ZERO,
                tail_tx: watch::channel(Offset::ZERO).0,
                expired: 0,
                expired_seen: Offset::ZERO,
            };
            self.queues.push(placeholder);
        }
        self.queues[idx] = QueueIndex {
            name: name.clone(),
            entries: VecDeque::new(),
            checkpoint: Offset::ZERO,
            tail: Offset::ZERO,
            tail_tx,
            expired: 0,
            expired_seen: Offset::ZERO,
        };
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
                queue.entries.push_back(entry);
                queue.tail = queue.tail.max(entry.offset);
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
    /// it has been reclaimed.
    pub(crate) fn set_checkpoint(&mut self, q: u32, upto: Offset) {
        if let Some(queue) = self.queues.get_mut(q as usize) {
            if upto > queue.checkpoint {
                queue.checkpoint = upto;
            }
            queue.tail = queue.tail.max(queue.checkpoint);
            while queue
                .entries
                .front()
                .is_some_and(|e| e.offset <= queue.checkpoint)
            {
                queue.entries.pop_front();
            }
        }
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
    pub(crate) fn forget_segment(&mut self, key: SegKey) -> Option<SegmentInfo> {
        let info = self.segments.remove(&key)?;
        self.disk_bytes.fetch_sub(info.len, Ordering::Relaxed);
        for q in info.summary.keys() {
            if let Some(queue) = self.queues.get_mut(*q as usize) {
                let seen = queue.expired_seen;
                let mut dropped = 0;
                queue.entries.retain(|e| {
                    let doomed = e.seg == key;
                    if doomed && e.offset > seen {
                        dropped += 1;
                    }
                    !doomed
                });
                queue.expired += dropped;
            }
        }
        Some(info)
    }

    /// Up to `max` unexpired entries of queue `id` above `after`; expired ones met on the way
    /// are counted once, and those at the front are forgotten.
    pub(crate) fn pick(&mut self, id: u32, after: Offset, max: usize, now: u64) -> Vec<IndexEntry> {
        let Some(queue) = self.queues.get_mut(id as usize) else {
            return Vec::new();
        };
        let count = |queue: &mut QueueIndex, e: &IndexEntry| {
            if e.offset > queue.expired_seen {
                queue.expired += 1;
                queue.expired_seen = e.offset;
            }
        };
        while let Some(front) = queue.entries.front().copied() {
            if front.expiry > now {
                break;
            }
            count(queue, &front);
            queue.entries.pop_front();
        }
        let start = queue.entries.partition_point(|e| e.offset <= after);
        let mut picked = Vec::new();
        let mut expired = Vec::new();
        for e in queue.entries.range(start..) {
            if picked.len() >= max {
                break;
            }
            if e.expiry <= now {
                expired.push(*e);
            } else {
                picked.push(*e);
            }
        }
        for e in &expired {
            count(queue, e);
        }
        picked
    }

    pub(crate) fn bytes_on_disk(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }
}
