//! Sidecar index files: for a segment that no writer will change again, where each queue's
//! messages are in it, so that neither open nor memory grows with the backlog (DESIGN.md
//! "Sidecar index files").
//!
//! A sidecar is derived data: a pure function of its segment's valid bytes (see `Builder`). It is
//! trusted only if its header names the segment's generation, sequence, nonce and valid length
//! and its checksums hold; otherwise it is ignored, the segment is scanned as before, and the
//! sidecar written again. Nothing acknowledged ever depends on one.
//!
//! ```text
//! 0    8   magic "EHSIDX01"
//! 8    4   version (1)
//! 12   8   generation            ┐ of the segment it describes
//! 20   8   seq                   │
//! 28   8   nonce                 │
//! 36   8   valid length          ┘
//! 44   8   first offset of the segment's first batch (0: no batch)
//! 52   8   end offset: the writer's next offset after the segment's last batch
//! 60   4   queue count Q
//! 64   4   control length C
//! 68   4   CRC32C of bytes 0..68, the table and the control section
//! 72   Q×40 table, by queue id: queue u32 | count u32 | min offset u64 | max offset u64
//!              | max expiry u64 | CRC of the queue's records u32 | reserved u32
//! …    C   control: the segment's declare, checkpoint (highest per queue), tail (highest per
//!          queue) and seal entries, encoded as in a batch payload
//! …    28 × count per queue, in table order: offset u64 | pos u64 | len u32 | expiry u64
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::format::{
    decode_batch, decode_entry, encode_checkpoint, encode_declare, encode_seal, encode_tail,
    BatchHeader, Entry, FormatError, Nonce, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::io::{read_exact_at, Fs, FsFile};
use crate::types::{Generation, Offset};

pub(crate) const SIDECAR_MAGIC: [u8; 8] = *b"EHSIDX01";
pub(crate) const SIDECAR_VERSION: u32 = 1;
pub(crate) const HEAD_LEN: usize = 72;
pub(crate) const ROW_LEN: usize = 40;
pub(crate) const RECORD_LEN: usize = 28;

/// File name of the sidecar of segment `seq` of `gen`.
pub(crate) fn sidecar_name(gen: Generation, seq: u64) -> String {
    format!("{:016x}-{:016x}.idx", gen.0, seq)
}

/// The segment a sidecar name belongs to.
pub(crate) fn parse_sidecar_name(name: &str) -> Option<(Generation, u64)> {
    let stem = name.strip_suffix(".idx")?;
    let (g, s) = stem.split_once('-')?;
    if g.len() != 16 || s.len() != 16 {
        return None;
    }
    let gen = Generation(u64::from_str_radix(g, 16).ok()?);
    let seq = u64::from_str_radix(s, 16).ok()?;
    (sidecar_name(gen, seq) == name).then_some((gen, seq))
}

/// One message of one queue in a segment: where its entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) offset: Offset,
    pub(crate) pos: u64,
    pub(crate) len: u32,
    /// ms since the epoch; `u64::MAX` = never.
    pub(crate) expiry: u64,
}

/// One queue's row in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) queue: u32,
    pub(crate) count: u32,
    pub(crate) min: Offset,
    pub(crate) max: Offset,
    pub(crate) max_expiry: u64,
    pub(crate) crc: u32,
    /// Byte position of the queue's first record in the file (not stored: follows from the
    /// table order).
    pub(crate) at: u64,
}

/// Which segment a sidecar describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) generation: Generation,
    pub(crate) seq: u64,
    pub(crate) nonce: Nonce,
    pub(crate) valid_len: u64,
}

/// Everything a sidecar says except the records: what recovery reads at open.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) id: Identity,
    pub(crate) first_offset: Option<Offset>,
    pub(crate) end_offset: Offset,
    pub(crate) rows: Vec<Row>,
    /// Encoded control entries (see the module docs).
    pub(crate) control: Vec<u8>,
}

/// A segment's content, as a sidecar holds it.
#[derive(Debug, Default)]
pub(crate) struct Built {
    pub(crate) first_offset: Option<Offset>,
    pub(crate) end_offset: Offset,
    pub(crate) control: Vec<u8>,
    pub(crate) queues: BTreeMap<u32, Vec<Record>>,
}

/// Collects a segment's content batch by batch.
#[derive(Default)]
pub(crate) struct Builder {
    built: Built,
    declares: Vec<(u32, String)>,
    checkpoints: BTreeMap<u32, Offset>,
    tails: BTreeMap<u32, Offset>,
    seals: Vec<(Generation, u64, u64)>,
}

impl Builder {
    /// One batch whose payload starts at byte `base` of the segment.
    pub(crate) fn batch(
        &mut self,
        first: Offset,
        base: u64,
        payload: &[u8],
    ) -> Result<(), FormatError> {
        let built = &mut self.built;
        built.first_offset.get_or_insert(first);
        built.end_offset = built.end_offset.max(first);
        let mut at = 0usize;
        while at < payload.len() {
            let (entry, used) = decode_entry(&payload[at..])?;
            match entry {
                Entry::Message {
                    offset,
                    expiry,
                    queues,
                    ..
                } => {
                    let len = u32::try_from(used).map_err(|_| FormatError::Invalid {
                        what: "entry too long",
                    })?;
                    let record = Record {
                        offset,
                        pos: base + at as u64,
                        len,
                        expiry: expiry.map_or(u64::MAX, |e| e.0),
                    };
                    for q in queues {
                        built.queues.entry(q).or_default().push(record);
                    }
                    built.end_offset = built.end_offset.max(offset.next());
                }
                Entry::Declare { queue, name } => {
                    if !self.declares.iter().any(|(q, n)| *q == queue && n == name) {
                        self.declares.push((queue, name.to_owned()));
                    }
                }
                Entry::Checkpoint { queue, upto } => {
                    let c = self.checkpoints.entry(queue).or_default();
                    *c = (*c).max(upto);
                }
                Entry::Tail { queue, last } => {
                    let t = self.tails.entry(queue).or_default();
                    *t = (*t).max(last);
                }
                Entry::Seal {
                    generation,
                    seq,
                    len,
                } => self.seals.push((generation, seq, len)),
            }
            at += used;
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Built {
        let control = &mut self.built.control;
        for (q, name) in &self.declares {
            encode_declare(control, *q, name);
        }
        for (q, upto) in self.checkpoints {
            encode_checkpoint(control, q, upto);
        }
        for (q, last) in self.tails {
            encode_tail(control, q, last);
        }
        for (g, s, l) in self.seals {
            encode_seal(control, g, s, l);
        }
        self.built
    }
}

/// Decodes a segment's batches from `start` (just after its header) to the end of `bytes` (its
/// valid bytes) and collects what a sidecar holds. Any damage is an error: a sidecar is only
/// ever built from a segment that decodes whole. (The store builds sidecars while it reads a
/// segment, or with [`build_from_file`]; this is the same over bytes in memory, for tests.)
#[cfg(test)]
pub(crate) fn build(nonce: Nonce, bytes: &[u8], start: usize) -> Result<Built, FormatError> {
    let mut builder = Builder::default();
    let mut pos = start;
    while pos < bytes.len() {
        let (header, payload) = decode_batch(Some(nonce), &bytes[pos..])?;
        builder.batch(
            header.first_offset,
            (pos + BATCH_HEADER_LEN) as u64,
            payload,
        )?;
        pos += BATCH_HEADER_LEN + payload.len();
    }
    Ok(builder.finish())
}

/// A segment's content as a sidecar holds it, read from its file's first `valid_len` bytes one
/// frame at a time, so that indexing a segment costs memory for one batch, not the whole file.
pub(crate) fn build_from_file(
    file: &dyn FsFile,
    path: &Path,
    nonce: Nonce,
    valid_len: u64,
) -> Result<Built, SidecarError> {
    let bad = |_| invalid(path, "segment does not decode");
    let mut builder = Builder::default();
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut frame = Vec::new();
    while pos < valid_len {
        let mut head = [0u8; BATCH_HEADER_LEN];
        read_exact_at(file, &mut head, pos).map_err(io_err("read", path))?;
        let header = BatchHeader::decode(Some(nonce), &head).map_err(bad)?;
        let end = pos + BATCH_HEADER_LEN as u64 + u64::from(header.payload_len);
        if end > valid_len {
            return Err(invalid(path, "batch passes the segment's valid length"));
        }
        frame.resize(BATCH_HEADER_LEN + header.payload_len as usize, 0);
        read_exact_at(file, &mut frame, pos).map_err(io_err("read", path))?;
        let (header, payload) = decode_batch(Some(nonce), &frame).map_err(bad)?;
        builder
            .batch(header.first_offset, pos + BATCH_HEADER_LEN as u64, payload)
            .map_err(bad)?;
        pos = end;
    }
    Ok(builder.finish())
}

fn put_record(out: &mut Vec<u8>, r: &Record) {
    out.extend_from_slice(&r.offset.get().to_le_bytes());
    out.extend_from_slice(&r.pos.to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
    out.extend_from_slice(&r.expiry.to_le_bytes());
}

/// A sealed segment's sidecar, as the index keeps it: where each queue's records are.
#[derive(Debug)]
pub(crate) struct SidecarRef {
    pub(crate) path: PathBuf,
    /// Keyed by queue id.
    pub(crate) rows: HashMap<u32, Row>,
}

/// Writes and syncs the sidecar of a segment no writer will change again, built from its valid
/// bytes (a [`Builder`] fed while a scan reads it, or [`build_from_file`]).
pub(crate) fn make(
    fs: &dyn Fs,
    dir: &Path,
    id: Identity,
    built: &Built,
) -> Result<SidecarRef, SidecarError> {
    let path = dir.join(sidecar_name(id.generation, id.seq));
    let (encoded, rows) = encode(id, built).map_err(|_| invalid(&path, "too large"))?;
    write(fs, &path, &encoded)?;
    Ok(SidecarRef {
        path,
        rows: rows.into_iter().map(|r| (r.queue, r)).collect(),
    })
}

/// The sidecar file's bytes, and its table.
pub(crate) fn encode(id: Identity, built: &Built) -> Result<(Vec<u8>, Vec<Row>), FormatError> {
    let too_many = FormatError::Invalid {
        what: "sidecar too large",
    };
    let q = u32::try_from(built.queues.len()).map_err(|_| too_many.clone())?;
    let c = u32::try_from(built.control.len()).map_err(|_| too_many.clone())?;
    let records: usize = built.queues.values().map(Vec::len).sum();
    let mut out = Vec::with_capacity(
        HEAD_LEN + ROW_LEN * built.queues.len() + built.control.len() + RECORD_LEN * records,
    );
    out.extend_from_slice(&SIDECAR_MAGIC);
    out.extend_from_slice(&SIDECAR_VERSION.to_le_bytes());
    out.extend_from_slice(&id.generation.0.to_le_bytes());
    out.extend_from_slice(&id.seq.to_le_bytes());
    out.extend_from_slice(&id.nonce.0.to_le_bytes());
    out.extend_from_slice(&id.valid_len.to_le_bytes());
    out.extend_from_slice(&built.first_offset.map_or(0, Offset::get).to_le_bytes());
    out.extend_from_slice(&built.end_offset.get().to_le_bytes());
    out.extend_from_slice(&q.to_le_bytes());
    out.extend_from_slice(&c.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // CRC, below
    let mut slices = Vec::with_capacity(RECORD_LEN * records);
    let mut rows = Vec::with_capacity(built.queues.len());
    let data_at = (HEAD_LEN + ROW_LEN * built.queues.len() + built.control.len()) as u64;
    for (queue, recs) in &built.queues {
        let start = slices.len();
        for r in recs {
            put_record(&mut slices, r);
        }
        let count = u32::try_from(recs.len()).map_err(|_| too_many.clone())?;
        out.extend_from_slice(&queue.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        let min = recs.first().map_or(0, |r| r.offset.get());
        let max = recs.last().map_or(0, |r| r.offset.get());
        let max_expiry = recs.iter().map(|r| r.expiry).max().unwrap_or(0);
        out.extend_from_slice(&min.to_le_bytes());
        out.extend_from_slice(&max.to_le_bytes());
        out.extend_from_slice(&max_expiry.to_le_bytes());
        let crc = crc32c::crc32c(&slices[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        rows.push(Row {
            queue: *queue,
            count,
            min: Offset::new(min),
            max: Offset::new(max),
            max_expiry,
            crc,
            at: data_at + start as u64,
        });
    }
    out.extend_from_slice(&built.control);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..68]), &out[HEAD_LEN..]);
    out[68..72].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&slices);
    Ok((out, rows))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Why a sidecar is not used (it is then ignored and the segment scanned).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SidecarError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: &'static str },
}

fn invalid(path: &Path, what: &'static str) -> SidecarError {
    SidecarError::Invalid {
        path: path.to_owned(),
        what,
    }
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SidecarError + 'a {
    move |source| SidecarError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Reads and checks a sidecar's head (everything but the records), and that the file holds
/// exactly the records its table announces.
pub(crate) fn read_head(file: &dyn FsFile, path: &Path) -> Result<Head, SidecarError> {
    let file_len = file.len().map_err(io_err("stat", path))?;
    let mut head = [0u8; HEAD_LEN];
    if file_len < HEAD_LEN as u64 {
        return Err(invalid(path, "shorter than its header"));
    }
    read_exact_at(file, &mut head, 0).map_err(io_err("read", path))?;
    if head[0..8] != SIDECAR_MAGIC || u32_at(&head, 8) != SIDECAR_VERSION {
        return Err(invalid(path, "not a sidecar of this version"));
    }
    let q = u32_at(&head, 60) as u64;
    let c = u32_at(&head, 64) as u64;
    let rest_len = q * ROW_LEN as u64 + c;
    if HEAD_LEN as u64 + rest_len > file_len {
        return Err(invalid(path, "table passes the end of the file"));
    }
    let mut rest = vec![0u8; rest_len as usize];
    read_exact_at(file, &mut rest, HEAD_LEN as u64).map_err(io_err("read", path))?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[0..68]), &rest);
    if crc != u32_at(&head, 68) {
        return Err(invalid(path, "header checksum"));
    }
    let mut at = HEAD_LEN as u64 + rest_len;
    let mut rows = Vec::with_capacity(q as usize);
    for i in 0..q as usize {
        let r = &rest[i * ROW_LEN..(i + 1) * ROW_LEN];
        let row = Row {
            queue: u32_at(r, 0),
            count: u32_at(r, 4),
            min: Offset::new(u64_at(r, 8)),
            max: Offset::new(u64_at(r, 16)),
            max_expiry: u64_at(r, 24),
            crc: u32_at(r, 32),
            at,
        };
        if row.count == 0 || row.min > row.max {
            return Err(invalid(path, "table row"));
        }
        at += u64::from(row.count) * RECORD_LEN as u64;
        rows.push(row);
    }
    if at != file_len {
        return Err(invalid(path, "length does not match its table"));
    }
    let first = u64_at(&head, 44);
    Ok(Head {
        id: Identity {
            generation: Generation(u64_at(&head, 12)),
            seq: u64_at(&head, 20),
            nonce: Nonce(u64_at(&head, 28)),
            valid_len: u64_at(&head, 36),
        },
        first_offset: (first != 0).then_some(Offset::new(first)),
        end_offset: Offset::new(u64_at(&head, 52)),
        rows,
        control: rest[q as usize * ROW_LEN..].to_vec(),
    })
}

/// Reads one queue's records (checked against the row's CRC and bounds).
pub(crate) fn read_records(
    fs: &dyn Fs,
    path: &Path,
    row: &Row,
) -> Result<Vec<Record>, SidecarError> {
    let file = fs.open(path).map_err(io_err("open", path))?;
    let mut bytes = vec![0u8; row.count as usize * RECORD_LEN];
    read_exact_at(file.as_ref(), &mut bytes, row.at).map_err(io_err("read", path))?;
    if crc32c::crc32c(&bytes) != row.crc {
        return Err(invalid(path, "records checksum"));
    }
    let mut out = Vec::with_capacity(row.count as usize);
    let mut prev = Offset::ZERO;
    for r in bytes.chunks_exact(RECORD_LEN) {
        let rec = Record {
            offset: Offset::new(u64_at(r, 0)),
            pos: u64_at(r, 8),
            len: u32_at(r, 16),
            expiry: u64_at(r, 20),
        };
        if rec.offset <= prev {
            return Err(invalid(path, "records out of order"));
        }
        prev = rec.offset;
        out.push(rec);
    }
    if out.first().map(|r| r.offset) != Some(row.min)
        || out.last().map(|r| r.offset) != Some(row.max)
    {
        return Err(invalid(path, "records do not match their row"));
    }
    Ok(out)
}

/// Writes the sidecar of a segment: replaces any file of that name, writes, fdatasyncs. The
/// directory is not fsynced: a sidecar whose name is lost in a crash is simply missing, and the
/// segment is scanned and the sidecar written again at the next open.
pub(crate) fn write(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> Result<(), SidecarError> {
    match fs.remove(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", path)(e)),
    }
    let file = fs.create_new(path).map_err(io_err("create", path))?;
    let written = file
        .write_all_at(bytes, 0)
        .and_then(|()| file.sync_data())
        .map_err(io_err("write", path));
    if written.is_err() {
        // Best effort: a half-written sidecar fails its checks and is ignored anyway.
        let _ = fs.remove(path);
    }
    written
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::format::{encode_message, BatchHeader, SegmentHeader};
    use crate::io::OsFs;

    fn segment(nonce: Nonce) -> Vec<u8> {
        let mut seg = vec![0u8; 40];
        let mut payload = Vec::new();
        encode_declare(&mut payload, 0, "a");
        encode_declare(&mut payload, 1, "b");
        encode_checkpoint(&mut payload, 0, Offset::new(3));
        encode_tail(&mut payload, 1, Offset::new(4));
        encode_seal(&mut payload, Generation(1), 0, 4096);
        for i in 5..9u64 {
            let qs: &[u32] = if i % 2 == 0 { &[0, 1] } else { &[1] };
            encode_message(&mut payload, Offset::new(i), None, qs, b"body");
        }
        let mut frame = vec![0u8; BATCH_HEADER_LEN];
        BatchHeader::for_payload(Offset::new(5), Some(nonce), &payload)
            .encode_into(Some(nonce), &mut frame);
        seg.extend_from_slice(&frame);
        seg.extend_from_slice(&payload);
        seg
    }

    #[test]
    fn names_round_trip_and_reject_lookalikes() {
        let name = sidecar_name(Generation(2), 9);
        assert_eq!(parse_sidecar_name(&name), Some((Generation(2), 9)));
        assert_eq!(parse_sidecar_name("2-9.idx"), None);
        assert_eq!(
            parse_sidecar_name("0000000000000002-0000000000000009.seg"),
            None
        );
    }

    #[test]
    fn a_sidecar_round_trips_and_detects_any_flipped_byte() {
        let nonce = Nonce(77);
        let seg = segment(nonce);
        let _ = SegmentHeader::new(Generation(1), 1);
        let built = build(nonce, &seg, 40).unwrap();
        assert_eq!(built.first_offset, Some(Offset::new(5)));
        assert_eq!(built.end_offset, Offset::new(9));
        assert_eq!(built.queues[&0].len(), 2);
        assert_eq!(built.queues[&1].len(), 4);
        let id = Identity {
            generation: Generation(1),
            seq: 1,
            nonce,
            valid_len: seg.len() as u64,
        };
        let (bytes, rows) = encode(id, &built).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(sidecar_name(Generation(1), 1));
        write(&OsFs, &path, &bytes).unwrap();
        let file = OsFs.open(&path).unwrap();
        let head = read_head(file.as_ref(), &path).unwrap();
        assert_eq!(head.id, id);
        assert_eq!(head.control, built.control);
        assert_eq!(head.rows, rows);
        for row in &head.rows {
            let recs = read_records(&OsFs, &path, row).unwrap();
            assert_eq!(&recs, &built.queues[&row.queue]);
        }
        // Every byte is covered by a check: the head's CRC, a row's CRC, or the length.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            write(&OsFs, &path, &bad).unwrap();
            let file = OsFs.open(&path).unwrap();
            let ok = read_head(file.as_ref(), &path).and_then(|h| {
                h.rows
                    .iter()
                    .map(|r| read_records(&OsFs, &path, r))
                    .collect::<Result<Vec<_>, _>>()
            });
            assert!(ok.is_err(), "flipping byte {i} went unnoticed");
        }
        // A shorter file is refused too.
        write(&OsFs, &path, &bytes[..bytes.len() - 1]).unwrap();
        let file = OsFs.open(&path).unwrap();
        assert!(read_head(file.as_ref(), &path).is_err());
    }
}
