//! The on-disk format, byte by byte (see DESIGN.md): segment headers, batch frames, entries, and
//! the records of the `EPOCHS` file. Pure encode/decode; no I/O.
//!
//! Invariants: every decoder takes arbitrary bytes and returns a value or a [`FormatError`],
//! never panics; every multi-byte integer is little-endian; every batch payload and every
//! `EPOCHS` record is covered by a CRC32C that is checked before anything in it is believed.

use crate::types::{Generation, Offset, UnixMillis};

/// Format version written in every new segment header. Version 1 segments (no nonce) are still
/// read.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// The first format version, without a segment nonce.
pub(crate) const FORMAT_VERSION_1: u32 = 1;
/// First bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"EHSEGMNT";
/// Length of a segment header written now (version 2).
pub(crate) const SEGMENT_HEADER_LEN: usize = 40;
/// Length of a version 1 segment header.
pub(crate) const SEGMENT_HEADER_LEN_V1: usize = 32;
/// First four bytes of every batch frame.
pub(crate) const BATCH_MAGIC: u32 = 0xEB47_C0DE;
/// Length of a batch frame header.
pub(crate) const BATCH_HEADER_LEN: usize = 24;
/// Largest payload a batch may carry (bounds what recovery will allocate for one frame).
pub(crate) const MAX_BATCH_PAYLOAD: u32 = 1 << 30;
/// Length of one `EPOCHS` record.
pub(crate) const EPOCH_RECORD_LEN: usize = 56;

const TAG_MESSAGE: u8 = 1;
const TAG_DECLARE: u8 = 2;
const TAG_CHECKPOINT: u8 = 3;
const TAG_SEAL: u8 = 4;
const TAG_TAIL: u8 = 5;

/// Fixed part of a message entry before the queue ids: tag, body crc, offset, expiry, queue count.
pub(crate) const MESSAGE_FIXED_LEN: usize = 1 + 4 + 8 + 8 + 2;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("truncated {what}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
    },
    /// Magic number or version does not match.
    #[error("bad magic or version in {what}")]
    BadMagic {
        /// What was being decoded.
        what: &'static str,
    },
    /// A checksum does not match the bytes it covers.
    #[error("checksum mismatch in {what}")]
    Checksum {
        /// What was being decoded.
        what: &'static str,
    },
    /// Structurally invalid content.
    #[error("invalid {what}")]
    Invalid {
        /// What was wrong.
        what: &'static str,
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// A segment's random number, kept in its header and mixed into both checksums of every batch
/// frame in it. Nothing outside the store sees it, so bytes a module chose (a message body) can
/// never pass for a frame of that segment, however they imitate the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nonce(pub(crate) u64);

impl Nonce {
    /// A fresh nonce. Hashing with a new `RandomState` uses keys the standard library draws from
    /// the operating system's random source: unpredictable from outside the process, and no I/O.
    pub(crate) fn fresh(generation: Generation, seq: u64) -> Nonce {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(generation.0);
        h.write_u64(seq);
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        Nonce(h.finish())
    }
}

/// CRC32C of `bytes` seeded with the segment's nonce (version 2), or plain (version 1).
fn keyed_crc(nonce: Option<Nonce>, bytes: &[u8]) -> u32 {
    match nonce {
        Some(n) => crc32c::crc32c_append(crc32c::crc32c(&n.0.to_le_bytes()), bytes),
        None => crc32c::crc32c(bytes),
    }
}

/// Header at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) generation: Generation,
    pub(crate) seq: u64,
    /// `None` for a version 1 segment (frames with plain checksums).
    pub(crate) nonce: Option<Nonce>,
}

impl SegmentHeader {
    /// A new (version 2) header with a fresh nonce.
    pub(crate) fn new(generation: Generation, seq: u64) -> SegmentHeader {
        SegmentHeader {
            generation,
            seq,
            nonce: Some(Nonce::fresh(generation, seq)),
        }
    }

    /// Length of this header in the file (where the first frame starts).
    pub(crate) fn len(&self) -> usize {
        match self.nonce {
            Some(_) => SEGMENT_HEADER_LEN,
            None => SEGMENT_HEADER_LEN_V1,
        }
    }

    /// Encodes a version 2 header (a header without a nonce is never written any more).
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.generation.0.to_le_bytes());
        b[20..28].copy_from_slice(&self.seq.to_le_bytes());
        b[28..36].copy_from_slice(&self.nonce.map_or(0, |n| n.0).to_le_bytes());
        let crc = crc32c::crc32c(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "segment header";
        const TRUNC: FormatError = FormatError::Truncated { what: WHAT };
        if b.len() < SEGMENT_HEADER_LEN_V1 {
            return Err(TRUNC);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        let (crc_at, nonce) = match u32_at(b, 8) {
            Some(FORMAT_VERSION_1) => (28, None),
            Some(FORMAT_VERSION) => (36, Some(Nonce(u64_at(b, 28).ok_or(TRUNC)?))),
            _ => return Err(FormatError::BadMagic { what: WHAT }),
        };
        let covered = b.get(0..crc_at).ok_or(TRUNC)?;
        if u32_at(b, crc_at).ok_or(TRUNC)? != crc32c::crc32c(covered) {
            return Err(FormatError::Checksum { what: WHAT });
        }
        Ok(SegmentHeader {
            generation: Generation(u64_at(b, 12).ok_or(TRUNC)?),
            seq: u64_at(b, 20).ok_or(TRUNC)?,
            nonce,
        })
    }
}

/// Header of one group commit's frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    pub(crate) payload_len: u32,
    /// The writer's next offset when the batch was built: its messages carry
    /// `first_offset, first_offset + 1, …`.
    pub(crate) first_offset: Offset,
    pub(crate) payload_crc: u32,
}

impl BatchHeader {
    /// A header for `payload`, with its checksum keyed by the segment's nonce.
    pub(crate) fn for_payload(first_offset: Offset, nonce: Option<Nonce>, payload: &[u8]) -> Self {
        BatchHeader {
            payload_len: payload.len() as u32,
            first_offset,
            payload_crc: keyed_crc(nonce, payload),
        }
    }

    /// Writes the header into `b[..BATCH_HEADER_LEN]`, its own checksum keyed by `nonce`.
    pub(crate) fn encode_into(&self, nonce: Option<Nonce>, b: &mut [u8]) {
        b[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_offset.get().to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = keyed_crc(nonce, &b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks the header's own checksum (not the payload's), keyed by `nonce`.
    pub(crate) fn decode(nonce: Option<Nonce>, b: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "batch header";
        if b.len() < BATCH_HEADER_LEN {
            return Err(FormatError::Truncated { what: WHAT });
        }
        if u32_at(b, 0) != Some(BATCH_MAGIC) {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        if u32_at(b, 20) != Some(keyed_crc(nonce, &b[0..20])) {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let payload_len = u32_at(b, 4).ok_or(FormatError::Truncated { what: WHAT })?;
        if payload_len > MAX_BATCH_PAYLOAD {
            return Err(FormatError::Invalid {
                what: "batch payload length",
            });
        }
        Ok(BatchHeader {
            payload_len,
            first_offset: Offset::new(u64_at(b, 8).ok_or(FormatError::Truncated { what: WHAT })?),
            payload_crc: u32_at(b, 16).ok_or(FormatError::Truncated { what: WHAT })?,
        })
    }
}

/// Decodes a whole frame at the start of `b`: header, then payload with its checksum verified,
/// both checksums keyed by the segment's nonce. Returns the header and the payload slice.
pub(crate) fn decode_batch(
    nonce: Option<Nonce>,
    b: &[u8],
) -> Result<(BatchHeader, &[u8]), FormatError> {
    let header = BatchHeader::decode(nonce, b)?;
    let end = BATCH_HEADER_LEN + header.payload_len as usize;
    let payload = b.get(BATCH_HEADER_LEN..end).ok_or(FormatError::Truncated {
        what: "batch payload",
    })?;
    if keyed_crc(nonce, payload) != header.payload_crc {
        return Err(FormatError::Checksum {
            what: "batch payload",
        });
    }
    Ok((header, payload))
}

/// One entry of a batch payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    /// A stored message and the queues that reference it.
    Message {
        offset: Offset,
        expiry: Option<UnixMillis>,
        queues: Vec<u32>,
        body: &'a [u8],
        body_crc: u32,
    },
    /// Binds a queue id (used in this store's entries) to the caller's queue name.
    Declare { queue: u32, name: &'a str },
    /// Everything in the queue up to and including `upto` is delivered.
    Checkpoint { queue: u32, upto: Offset },
    /// The queue's newest message has offset `last`, whether or not a segment still holds it
    /// (written in preambles, so a queue's last offset survives the reclaim of its newest
    /// messages once they expire).
    Tail { queue: u32, last: Offset },
    /// An older segment is complete and counts exactly `len` bytes.
    Seal {
        generation: Generation,
        seq: u64,
        len: u64,
    },
}

/// Appends a message entry to `out`.
pub(crate) fn encode_message(
    out: &mut Vec<u8>,
    offset: Offset,
    expiry: Option<UnixMillis>,
    queues: &[u32],
    body: &[u8],
) {
    out.push(TAG_MESSAGE);
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(&offset.get().to_le_bytes());
    out.extend_from_slice(&expiry.map_or(0, |e| e.0).to_le_bytes());
    // Callers bound the queue count (see `MAX_QUEUES_PER_MESSAGE`), so this cannot truncate.
    out.extend_from_slice(&(queues.len() as u16).to_le_bytes());
    for q in queues {
        out.extend_from_slice(&q.to_le_bytes());
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// Encoded length of a message entry.
pub(crate) fn message_len(queue_count: usize, body_len: usize) -> usize {
    MESSAGE_FIXED_LEN + 4 * queue_count + 4 + body_len
}

/// Appends a declaration entry to `out`. `name` is at most 255 bytes (checked by `QueueName`).
pub(crate) fn encode_declare(out: &mut Vec<u8>, queue: u32, name: &str) {
    out.push(TAG_DECLARE);
    out.extend_from_slice(&queue.to_le_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// Encoded length of a declaration entry.
pub(crate) fn declare_len(name: &str) -> usize {
    6 + name.len()
}

/// Encoded length of a checkpoint entry.
pub(crate) const CHECKPOINT_LEN: usize = 13;

/// Appends a checkpoint entry to `out`.
pub(crate) fn encode_checkpoint(out: &mut Vec<u8>, queue: u32, upto: Offset) {
    out.push(TAG_CHECKPOINT);
    out.extend_from_slice(&queue.to_le_bytes());
    out.extend_from_slice(&upto.get().to_le_bytes());
}

/// Appends a tail entry to `out` (as long as a checkpoint entry: [`CHECKPOINT_LEN`]).
pub(crate) fn encode_tail(out: &mut Vec<u8>, queue: u32, last: Offset) {
    out.push(TAG_TAIL);
    out.extend_from_slice(&queue.to_le_bytes());
    out.extend_from_slice(&last.get().to_le_bytes());
}

/// Appends a seal entry to `out`.
pub(crate) fn encode_seal(out: &mut Vec<u8>, generation: Generation, seq: u64, len: u64) {
    out.push(TAG_SEAL);
    out.extend_from_slice(&generation.0.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Decodes one entry at the start of `b`; returns it and its encoded length.
pub(crate) fn decode_entry(b: &[u8]) -> Result<(Entry<'_>, usize), FormatError> {
    const TRUNC: FormatError = FormatError::Truncated { what: "entry" };
    match b.first() {
        Some(&TAG_MESSAGE) => {
            let body_crc = u32_at(b, 1).ok_or(TRUNC)?;
            let offset = Offset::new(u64_at(b, 5).ok_or(TRUNC)?);
            let expiry = match u64_at(b, 13).ok_or(TRUNC)? {
                0 => None,
                ms => Some(UnixMillis(ms)),
            };
            let count = usize::from(u16_at(b, 21).ok_or(TRUNC)?);
            let mut at = MESSAGE_FIXED_LEN;
            let mut queues = Vec::with_capacity(count);
            for _ in 0..count {
                queues.push(u32_at(b, at).ok_or(TRUNC)?);
                at += 4;
            }
            let body_len = u32_at(b, at).ok_or(TRUNC)? as usize;
            at += 4;
            let body = b.get(at..at + body_len).ok_or(TRUNC)?;
            let entry = Entry::Message {
                offset,
                expiry,
                queues,
                body,
                body_crc,
            };
            Ok((entry, at + body_len))
        }
        Some(&TAG_DECLARE) => {
            let queue = u32_at(b, 1).ok_or(TRUNC)?;
            let len = usize::from(*b.get(5).ok_or(TRUNC)?);
            let raw = b.get(6..6 + len).ok_or(TRUNC)?;
            let name = std::str::from_utf8(raw).map_err(|_| FormatError::Invalid {
                what: "queue name (not UTF-8)",
            })?;
            if name.is_empty() {
                return Err(FormatError::Invalid {
                    what: "queue name (empty)",
                });
            }
            Ok((Entry::Declare { queue, name }, 6 + len))
        }
        Some(&TAG_CHECKPOINT) => {
            let queue = u32_at(b, 1).ok_or(TRUNC)?;
            let upto = Offset::new(u64_at(b, 5).ok_or(TRUNC)?);
            Ok((Entry::Checkpoint { queue, upto }, CHECKPOINT_LEN))
        }
        Some(&TAG_TAIL) => {
            let queue = u32_at(b, 1).ok_or(TRUNC)?;
            let last = Offset::new(u64_at(b, 5).ok_or(TRUNC)?);
            Ok((Entry::Tail { queue, last }, CHECKPOINT_LEN))
        }
        Some(&TAG_SEAL) => {
            let entry = Entry::Seal {
                generation: Generation(u64_at(b, 1).ok_or(TRUNC)?),
                seq: u64_at(b, 9).ok_or(TRUNC)?,
                len: u64_at(b, 17).ok_or(TRUNC)?,
            };
            Ok((entry, 25))
        }
        Some(_) => Err(FormatError::Invalid { what: "entry tag" }),
        None => Err(TRUNC),
    }
}

/// Decodes a message entry read back for delivery and verifies its body checksum.
pub(crate) fn decode_message_checked(
    b: &[u8],
) -> Result<(Offset, Option<UnixMillis>, &[u8]), FormatError> {
    match decode_entry(b)? {
        (
            Entry::Message {
                offset,
                expiry,
                body,
                body_crc,
                ..
            },
            _,
        ) => {
            if crc32c::crc32c(body) != body_crc {
                return Err(FormatError::Checksum {
                    what: "message body",
                });
            }
            Ok((offset, expiry, body))
        }
        _ => Err(FormatError::Invalid {
            what: "expected a message entry",
        }),
    }
}

/// One record of the `EPOCHS` file (see DESIGN.md "Fencing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EpochRecord {
    /// Generation `generation` was opened with `epoch`; every older writer is fenced from here on.
    Claim { generation: Generation, epoch: u64 },
    /// Generation `generation` finished recovery: its first offset, and how far the newest
    /// segment that existed at that moment was valid (nothing beyond it counts, ever).
    Start {
        generation: Generation,
        start: Offset,
        tail: Option<SegmentTail>,
    },
}

/// The newest segment a generation saw at open, and its valid length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentTail {
    pub(crate) generation: Generation,
    pub(crate) seq: u64,
    pub(crate) len: u64,
}

const KIND_CLAIM: u32 = 1;
const KIND_START: u32 = 2;

impl EpochRecord {
    pub(crate) fn encode(&self) -> [u8; EPOCH_RECORD_LEN] {
        let mut b = [0u8; EPOCH_RECORD_LEN];
        let (kind, flags, gen, a, t) = match *self {
            EpochRecord::Claim { generation, epoch } => (KIND_CLAIM, 0u32, generation, epoch, None),
            EpochRecord::Start {
                generation,
                start,
                tail,
            } => (
                KIND_START,
                u32::from(tail.is_some()),
                generation,
                start.get(),
                tail,
            ),
        };
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&gen.0.to_le_bytes());
        b[16..24].copy_from_slice(&a.to_le_bytes());
        if let Some(t) = t {
            b[24..32].copy_from_slice(&t.generation.0.to_le_bytes());
            b[32..40].copy_from_slice(&t.seq.to_le_bytes());
            b[40..48].copy_from_slice(&t.len.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[0..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "epoch record";
        const TRUNC: FormatError = FormatError::Truncated { what: WHAT };
        if b.len() < EPOCH_RECORD_LEN {
            return Err(TRUNC);
        }
        if u32_at(b, 52) != Some(crc32c::crc32c(&b[0..52])) {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let generation = Generation(u64_at(b, 8).ok_or(TRUNC)?);
        let a = u64_at(b, 16).ok_or(TRUNC)?;
        match (u32_at(b, 0), u32_at(b, 4)) {
            (Some(KIND_CLAIM), _) => Ok(EpochRecord::Claim {
                generation,
                epoch: a,
            }),
            (Some(KIND_START), Some(flags)) => {
                let tail = if flags & 1 == 1 {
                    Some(SegmentTail {
                        generation: Generation(u64_at(b, 24).ok_or(TRUNC)?),
                        seq: u64_at(b, 32).ok_or(TRUNC)?,
                        len: u64_at(b, 40).ok_or(TRUNC)?,
                    })
                } else {
                    None
                };
                Ok(EpochRecord::Start {
                    generation,
                    start: Offset::new(a),
                    tail,
                })
            }
            _ => Err(FormatError::Invalid {
                what: "epoch record kind",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_and_checkpoint_entries_round_trip_and_are_told_apart() {
        let mut out = Vec::new();
        encode_tail(&mut out, 3, Offset::new(10));
        encode_checkpoint(&mut out, 3, Offset::new(4));
        assert_eq!(out.len(), 2 * CHECKPOINT_LEN);
        let (first, used) = decode_entry(&out).expect("decodes");
        assert_eq!(used, CHECKPOINT_LEN);
        assert!(matches!(first, Entry::Tail { queue: 3, last } if last == Offset::new(10)));
        let (second, _) = decode_entry(&out[used..]).expect("decodes");
        assert!(matches!(second, Entry::Checkpoint { queue: 3, upto } if upto == Offset::new(4)));
    }

    #[test]
    fn message_entry_round_trips_with_its_queues_and_expiry() {
        let mut out = Vec::new();
        encode_message(
            &mut out,
            Offset::new(7),
            Some(UnixMillis(99)),
            &[1, 5],
            b"hello",
        );
        assert_eq!(out.len(), message_len(2, 5));
        let (entry, used) = decode_entry(&out).expect("decodes");
        assert_eq!(used, out.len());
        match entry {
            Entry::Message {
                offset,
                expiry,
                queues,
                body,
                ..
            } => {
                assert_eq!(offset, Offset::new(7));
                assert_eq!(expiry, Some(UnixMillis(99)));
                assert_eq!(queues, vec![1, 5]);
                assert_eq!(body, b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_flipped_body_byte_fails_the_message_checksum() {
        let mut out = Vec::new();
        encode_message(&mut out, Offset::new(1), None, &[0], b"abc");
        let last = out.len() - 1;
        out[last] ^= 1;
        assert!(matches!(
            decode_message_checked(&out),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn a_batch_with_a_flipped_payload_byte_is_rejected() {
        let payload = b"payload bytes".to_vec();
        let nonce = Some(Nonce(0x1234_5678_9abc_def0));
        let mut frame = vec![0u8; BATCH_HEADER_LEN];
        BatchHeader::for_payload(Offset::new(3), nonce, &payload).encode_into(nonce, &mut frame);
        frame.extend_from_slice(&payload);
        assert!(decode_batch(nonce, &frame).is_ok());
        frame[BATCH_HEADER_LEN + 2] ^= 0x80;
        assert!(matches!(
            decode_batch(nonce, &frame),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn a_frame_only_decodes_with_the_nonce_of_its_segment() {
        let payload = b"payload bytes".to_vec();
        let frame = |nonce: Option<Nonce>| {
            let mut f = vec![0u8; BATCH_HEADER_LEN];
            BatchHeader::for_payload(Offset::new(3), nonce, &payload).encode_into(nonce, &mut f);
            f.extend_from_slice(&payload);
            f
        };
        let (ours, theirs) = (Some(Nonce(7)), Some(Nonce(8)));
        assert!(decode_batch(ours, &frame(ours)).is_ok());
        assert!(decode_batch(ours, &frame(theirs)).is_err());
        // A frame built from the public format with plain checksums (what a module can put in a
        // body) passes only in a version 1 segment.
        assert!(decode_batch(ours, &frame(None)).is_err());
        assert!(decode_batch(None, &frame(None)).is_ok());
    }

    #[test]
    fn segment_headers_of_both_versions_decode() {
        let v2 = SegmentHeader::new(Generation(3), 9);
        assert!(v2.nonce.is_some());
        assert_eq!(SegmentHeader::decode(&v2.encode()), Ok(v2));
        assert_eq!(v2.len(), SEGMENT_HEADER_LEN);
        let mut v1 = [0u8; SEGMENT_HEADER_LEN_V1];
        v1[0..8].copy_from_slice(&SEGMENT_MAGIC);
        v1[8..12].copy_from_slice(&FORMAT_VERSION_1.to_le_bytes());
        v1[12..20].copy_from_slice(&3u64.to_le_bytes());
        v1[20..28].copy_from_slice(&9u64.to_le_bytes());
        let crc = crc32c::crc32c(&v1[0..28]);
        v1[28..32].copy_from_slice(&crc.to_le_bytes());
        let decoded = SegmentHeader::decode(&v1).expect("a version 1 header decodes");
        assert_eq!(
            (decoded.generation, decoded.seq, decoded.nonce),
            (Generation(3), 9, None)
        );
        assert_eq!(decoded.len(), SEGMENT_HEADER_LEN_V1);
    }

    #[test]
    fn epoch_records_round_trip() {
        let claim = EpochRecord::Claim {
            generation: Generation(4),
            epoch: 9,
        };
        assert_eq!(EpochRecord::decode(&claim.encode()), Ok(claim));
        let start = EpochRecord::Start {
            generation: Generation(4),
            start: Offset::new(100),
            tail: Some(SegmentTail {
                generation: Generation(3),
                seq: 2,
                len: 4096,
            }),
        };
        assert_eq!(EpochRecord::decode(&start.encode()), Ok(start));
    }

    #[test]
    fn segment_header_rejects_another_version() {
        let mut h = SegmentHeader::new(Generation(1), 0).encode();
        h[8] = 3;
        assert!(SegmentHeader::decode(&h).is_err());
    }
}
