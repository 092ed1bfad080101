//! A guard in front of fe2o3-amqp's frame decoder: every frame a client sends is checked whole
//! before the library decodes it.
//!
//! Why (all found by the `amqp_frames` fuzz target, `tests/fuzz`): fe2o3-amqp 0.18 decodes a
//! frame's performative with serde_amqp's `IoReader`, which allocates a variable-width value
//! (string, binary, symbol) at the length the value *declares*, before reading it: one frame of
//! a few hundred bytes declaring a 4 GiB string makes the hub allocate 4 GiB, before any
//! authentication (SASL frames are decoded the same way). Where the allocation fails (a small
//! device, a memory limit) the whole process aborts. And a frame whose size field is 4 to 7
//! (less than its own 8-byte header) panics the decoding task (`FrameDecoder::decode` reads the
//! header without checking that the bytes are there).
//!
//! The same allocation happens when a transfer's message is decoded (serde_amqp's `SliceReader`
//! has the same default), on any link, `$cbs` included (before authentication).
//!
//! Guarantees of [`FrameChecker`] (pure) and [`Guarded`] (a stream that applies it):
//! - a frame reaches the decoder only whole and only if its size is at least
//!   [`MIN_FRAME_BYTES`] and at most [`MAX_FRAME_BYTES`], and every length and element count in
//!   its performative stays inside the frame, nested at most [`MAX_DEPTH`] deep (serde_amqp
//!   recurses per level), every list, map and array is exactly filled by its elements (the
//!   decoder reads by count, not by size), and every map has an even number of elements
//!   (serde_amqp's map reader underflows on an odd count);
//! - the message a transfer carries is checked the same way ([`check_message`]) before the
//!   frame that completes it is handed on: alone, or joined with the earlier frames of the
//!   delivery (`more`), as the link decodes it. The joined copies are bounded by
//!   [`MAX_HELD_BYTES`] per connection; an aborted delivery is dropped;
//! - a performative and every message section must be a described value (the decoders take a
//!   bare value for a descriptor and read on), every descriptor a ulong or symbol, every
//!   constructor one of the spec's, and arrays hold only primitive values, not described or
//!   compound ones (serde_amqp reads those off the spec's layout);
//! - anything else ends the connection with an `InvalidData` I/O error naming the problem, and
//!   a warning in the log;
//! - a protocol header (`AMQP` and four bytes) passes wherever a frame may start (the AMQP
//!   header follows the SASL layer on the same stream);
//! - memory per connection: one frame of [`MAX_FRAME_BYTES`], one read buffer and
//!   [`MAX_HELD_BYTES`];
//! - a valid stream passes unchanged, in order; writes pass unchanged.
//!
//! Messages inside a batch are checked by `convert::split_batch` with [`check_message`].
//! A delivery left unfinished when its link detaches stays held (within the bound) until that
//! handle transfers again, when the joined bytes fail the check and the connection ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// Size of an AMQP frame header: the smallest valid frame.
pub const MIN_FRAME_BYTES: u32 = 8;
/// Largest frame accepted: fe2o3's default `max-frame-size`, which the hub's Open announces
/// (the library refuses a larger frame anyway).
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;
/// Deepest nesting of compound values (lists, maps, arrays, described values) in a
/// performative. Real performatives nest a handful of levels.
pub const MAX_DEPTH: usize = 32;
/// Most bytes of messages still arriving over several transfers that one connection's guard
/// holds (a copy, to check each message whole): above the largest `max-message-size` the
/// head announces (600 KiB on an events link), for a few links at once.
pub const MAX_HELD_BYTES: usize = 4 << 20;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Why a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The size field is below the header's own size.
    #[error("AMQP frame of {0} bytes is shorter than its 8-byte header")]
    TooShort(u32),
    /// The size field is above [`MAX_FRAME_BYTES`].
    #[error("AMQP frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(u32),
    /// A value declares more bytes or elements than its frame (or message) holds.
    #[error("AMQP: a value at byte {0} runs past the end of its frame or message")]
    Overrun(usize),
    /// Compound values nested deeper than [`MAX_DEPTH`].
    #[error("AMQP frame: values nested more than {MAX_DEPTH} deep")]
    TooDeep,
    /// An encoding real peers do not send and the decoder reads off the spec's layout: a
    /// descriptor that is not a ulong or symbol, an unknown constructor, or an array of
    /// described or compound values.
    #[error("AMQP: unsupported encoding at byte {0}: {1}")]
    Unsupported(usize, &'static str),
    /// A performative or message section that is not a described value.
    #[error("AMQP: the value at byte {0} should be a performative or section (a described value)")]
    NotDescribed(usize),
    /// A list, map or array whose elements do not fill exactly the size it declares.
    #[error("AMQP: a compound value at byte {0} is not the size it declares")]
    SizeMismatch(usize),
    /// A map whose element count is odd (a key without a value).
    #[error("AMQP: a map at byte {0} has an odd number of elements")]
    OddMap(usize),
    /// Messages split over transfers hold more than [`MAX_HELD_BYTES`].
    #[error("AMQP: {0} bytes of unfinished transfers exceed the limit of {MAX_HELD_BYTES}")]
    TooMuchPending(usize),
}

/// Checks one whole frame on its own, size field included (see the module doc); a transfer
/// that continues in later frames is checked as far as this frame goes.
pub fn check_frame(frame: &[u8]) -> Result<(), FrameError> {
    FrameChecker::new().check(frame)
}

/// Checks the frames of one connection in order: each frame's performative, and each message
/// a transfer carries, once whole (joined over its transfer frames, as the link decodes it).
#[derive(Debug, Default)]
pub struct FrameChecker {
    /// Payloads of deliveries still arriving, by (channel, handle).
    partial: HashMap<(u16, u32), Vec<u8>>,
    /// Their total size.
    held: usize,
}

impl FrameChecker {
    /// A checker at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next frame, size field included.
    pub fn check(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        let size = u32::from_be_bytes(read_array(frame, 0).ok_or(FrameError::TooShort(0))?);
        if size < MIN_FRAME_BYTES {
            return Err(FrameError::TooShort(size));
        }
        if size > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(size));
        }
        if frame.len() != size as usize {
            return Err(FrameError::Overrun(frame.len().min(size as usize)));
        }
        let doff = usize::from(frame[4]) * 4;
        if doff < 8 || doff >= frame.len() {
            // An unusual data offset is refused by the library itself; an empty frame is a
            // heartbeat.
            return Ok(());
        }
        if frame[doff] != 0x00 {
            return Err(FrameError::NotDescribed(doff));
        }
        let walker = Walker { bytes: frame };
        let payload = walker.value(doff, frame.len(), 0)?;
        // Only AMQP frames (type 0) carry transfers; SASL frames are one performative.
        if frame[5] != 0 {
            return Ok(());
        }
        let Some(transfer) = walker.transfer(doff) else {
            return Ok(());
        };
        let channel = u16::from_be_bytes([frame[6], frame[7]]);
        let key = (channel, transfer.handle);
        let bytes = &frame[payload..];
        match (
            self.partial.remove(&key),
            transfer.more && !transfer.aborted,
        ) {
            (None, false) => {
                if !transfer.aborted {
                    check_message(bytes)?;
                }
            }
            (Some(mut joined), more) => {
                self.held -= joined.len();
                if transfer.aborted {
                    return Ok(());
                }
                joined.extend_from_slice(bytes);
                if more {
                    self.hold(key, joined)?;
                } else {
                    check_message(&joined)?;
                }
            }
            (None, true) => self.hold(key, bytes.to_vec())?,
        }
        Ok(())
    }

    fn hold(&mut self, key: (u16, u32), joined: Vec<u8>) -> Result<(), FrameError> {
        self.held += joined.len();
        if self.held > MAX_HELD_BYTES {
            return Err(FrameError::TooMuchPending(self.held));
        }
        self.partial.insert(key, joined);
        Ok(())
    }
}

/// Checks an encoded AMQP message (its sections, one after another to the end): every length,
/// count and nesting stays inside it. The head checks each message a transfer carries, and
/// each message inside a batch, before it is decoded.
pub fn check_message(payload: &[u8]) -> Result<(), FrameError> {
    let walker = Walker { bytes: payload };
    let mut at = 0;
    while at < payload.len() {
        if payload[at] != 0x00 {
            return Err(FrameError::NotDescribed(at));
        }
        at = walker.value(at, payload.len(), 0)?;
    }
    Ok(())
}

/// What the guard needs of a transfer performative.
struct TransferFields {
    handle: u32,
    more: bool,
    aborted: bool,
}

fn read_array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Walks AMQP-encoded values (AMQP 1.0 part 1, "Types"), checking every declared size.
struct Walker<'a> {
    bytes: &'a [u8],
}

/// How the elements of an array are laid out: one constructor, then bare values.
#[derive(Clone, Copy)]
enum Width {
    Fixed(usize),
    Variable(usize),
    Compound(usize),
    Array(usize),
    /// Not a constructor of the spec.
    Unknown,
}

fn width(code: u8) -> Width {
    match code {
        0x40..=0x45 => Width::Fixed(0),
        0x50..=0x56 => Width::Fixed(1),
        0x60 | 0x61 => Width::Fixed(2),
        0x70..=0x74 => Width::Fixed(4),
        0x80..=0x84 => Width::Fixed(8),
        0x94 | 0x98 => Width::Fixed(16),
        0xa0 | 0xa1 | 0xa3 => Width::Variable(1),
        0xb0 | 0xb1 | 0xb3 => Width::Variable(4),
        0xc0 | 0xc1 => Width::Compound(1),
        0xd0 | 0xd1 => Width::Compound(4),
        0xe0 => Width::Array(1),
        0xf0 => Width::Array(4),
        _ => Width::Unknown,
    }
}

impl Walker<'_> {
    /// The fields of the (already walked) performative at `at` if it is a transfer:
    /// descriptor 0x14 or `amqp:transfer:list`, then its list.
    fn transfer(&self, at: usize) -> Option<TransferFields> {
        let end = self.bytes.len();
        if self.bytes.get(at) != Some(&0x00) {
            return None;
        }
        let list = match self.bytes.get(at + 1..)? {
            [0x53, 0x14, ..] => at + 3,
            [0x80, rest @ ..] if rest.get(..8) == Some(&20u64.to_be_bytes()) => at + 10,
            [0xa3, 18, rest @ ..] if rest.starts_with(b"amqp:transfer:list") => at + 21,
            _ => return None,
        };
        let (first, count, stop) = match *self.bytes.get(list)? {
            0x45 => (list + 1, 0, list + 1),
            0xc0 => {
                let size = usize::from(*self.bytes.get(list + 1)?);
                (
                    list + 3,
                    usize::from(*self.bytes.get(list + 2)?),
                    list + 2 + size,
                )
            }
            0xd0 => {
                let size = u32::from_be_bytes(read_array(self.bytes, list + 1)?) as usize;
                let count = u32::from_be_bytes(read_array(self.bytes, list + 5)?) as usize;
                (list + 9, count, list + 5 + size)
            }
            _ => return None,
        };
        let mut fields = Vec::with_capacity(count.min(11));
        let mut pos = first;
        for _ in 0..count.min(11) {
            fields.push(pos);
            pos = self.value(pos, stop.min(end), 0).ok()?;
        }
        let uint = |i: usize| -> Option<u32> {
            let at = *fields.get(i)?;
            match *self.bytes.get(at)? {
                0x43 => Some(0),
                0x52 => self.bytes.get(at + 1).map(|b| u32::from(*b)),
                0x70 => read_array(self.bytes, at + 1).map(u32::from_be_bytes),
                _ => None,
            }
        };
        let flag = |i: usize| -> bool {
            fields.get(i).and_then(|&at| match *self.bytes.get(at)? {
                0x41 => Some(true),
                0x56 => self.bytes.get(at + 1).map(|b| *b != 0),
                _ => None,
            }) == Some(true)
        };
        Some(TransferFields {
            handle: uint(0)?,
            more: flag(5),
            aborted: flag(9),
        })
    }

    fn byte(&self, at: usize, end: usize) -> Result<u8, FrameError> {
        if at >= end {
            return Err(FrameError::Overrun(at));
        }
        self.bytes.get(at).copied().ok_or(FrameError::Overrun(at))
    }

    /// A length field of 1 or 4 bytes at `at`.
    fn length(&self, at: usize, n: usize, end: usize) -> Result<usize, FrameError> {
        if n == 1 {
            return Ok(usize::from(self.byte(at, end)?));
        }
        if at.checked_add(4).is_none_or(|e| e > end) {
            return Err(FrameError::Overrun(at));
        }
        let word = read_array::<4>(self.bytes, at).ok_or(FrameError::Overrun(at))?;
        Ok(u32::from_be_bytes(word) as usize)
    }

    /// The value at `at` (constructor included); returns where it ends.
    fn value(&self, at: usize, end: usize, depth: usize) -> Result<usize, FrameError> {
        if depth > MAX_DEPTH {
            return Err(FrameError::TooDeep);
        }
        let code = self.byte(at, end)?;
        if code == 0x00 {
            // The spec's descriptors: a ulong (0x53, 0x80, 0x44) or a symbol (0xa3, 0xb3).
            if !matches!(self.byte(at + 1, end)?, 0x53 | 0x80 | 0x44 | 0xa3 | 0xb3) {
                return Err(FrameError::Unsupported(
                    at + 1,
                    "a descriptor that is not a ulong or symbol",
                ));
            }
            let after_descriptor = self.value(at + 1, end, depth + 1)?;
            return self.value(after_descriptor, end, depth + 1);
        }
        self.body(code, at + 1, end, depth)
    }

    /// The bytes of a value of constructor `code` starting at `at`; returns where they end.
    fn body(&self, code: u8, at: usize, end: usize, depth: usize) -> Result<usize, FrameError> {
        let within = |to: usize| {
            if to <= end {
                Ok(to)
            } else {
                Err(FrameError::Overrun(at))
            }
        };
        match width(code) {
            Width::Fixed(n) => within(at + n),
            Width::Variable(n) => {
                let len = self.length(at, n, end)?;
                within(at.saturating_add(n).saturating_add(len))
            }
            Width::Compound(n) => {
                let size = self.length(at, n, end)?;
                let stop = within(at.saturating_add(n).saturating_add(size))?;
                let count = self.length(at + n, n, stop)?;
                let mut pos = at + 2 * n;
                if count > stop.saturating_sub(pos) {
                    return Err(FrameError::Overrun(at));
                }
                if matches!(code, 0xc1 | 0xd1) && count % 2 != 0 {
                    return Err(FrameError::OddMap(at));
                }
                for _ in 0..count {
                    pos = self.value(pos, stop, depth + 1)?;
                }
                // Decoders read by count: bytes the size covers beyond the elements would be
                // read as the next value.
                if pos != stop {
                    return Err(FrameError::SizeMismatch(at - 1));
                }
                Ok(stop)
            }
            Width::Array(n) => {
                let size = self.length(at, n, end)?;
                let stop = within(at.saturating_add(n).saturating_add(size))?;
                let count = self.length(at + n, n, stop)?;
                let mut pos = at + 2 * n;
                if count > stop.saturating_sub(pos) {
                    return Err(FrameError::Overrun(at));
                }
                // The element constructor, possibly described.
                let element = self.byte(pos, stop)?;
                pos += 1;
                if element == 0x00 {
                    return Err(FrameError::Unsupported(
                        at - 1,
                        "an array of described values",
                    ));
                }
                if !matches!(width(element), Width::Fixed(_) | Width::Variable(_)) {
                    return Err(FrameError::Unsupported(
                        at - 1,
                        "an array of compound values",
                    ));
                }
                for _ in 0..count {
                    pos = self.body(element, pos, stop, depth + 1)?;
                }
                if pos != stop {
                    return Err(FrameError::SizeMismatch(at - 1));
                }
                Ok(stop)
            }
            // Not a constructor of the spec: the decoders' reading of what follows is not
            // predictable, so nothing after it is handed on.
            Width::Unknown => Err(FrameError::Unsupported(at - 1, "an unknown constructor")),
        }
    }
}

/// A stream whose reads reach the caller one whole, checked frame (or protocol header) at a
/// time; see the module doc.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    /// Bytes read and not yet handed on; the first `ready` are checked. Handing bytes on
    /// advances the front in O(1) (no shift of what follows).
    pending: BytesMut,
    ready: usize,
    eof: bool,
    checker: FrameChecker,
}

impl<S> Guarded<S> {
    /// Guards what is read from `inner`, which must start at a protocol header.
    pub fn new(inner: S) -> Self {
        Guarded {
            inner,
            pending: BytesMut::new(),
            ready: 0,
            eof: false,
            checker: FrameChecker::new(),
        }
    }

    /// Marks the next whole unit at the front of `pending` ready, if it is all there.
    fn check_next(&mut self) -> Result<(), FrameError> {
        let Some(first) = read_array::<4>(&self.pending, 0) else {
            return Ok(());
        };
        if &first == b"AMQP" {
            if self.pending.len() >= 8 {
                self.ready = 8;
            }
            return Ok(());
        }
        let size = u32::from_be_bytes(first);
        if size < MIN_FRAME_BYTES {
            return Err(FrameError::TooShort(size));
        }
        if size > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(size));
        }
        let size = size as usize;
        if let Some(frame) = self.pending.get(..size) {
            self.checker.check(frame)?;
            self.ready = size;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A partial unit at the end: the library sees it cut short and fails.
                this.ready = this.pending.len();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if let Err(e) = this.check_next() {
                tracing::warn!(error = %e, "AMQP client sent a malformed frame; closing");
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)));
            }
            if this.ready > 0 {
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.pending.extend_from_slice(read.filled());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

write_through_inner!(Guarded);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::amqp::connection::guarded_stream;
    use fe2o3_amqp::acceptor::ConnectionAcceptor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The plain AMQP protocol header (no SASL), as the Node SDK sends it.
    const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 0]);
        f.extend_from_slice(body);
        f
    }

    /// An Open whose container id (a str32) declares `declared` bytes but holds 4.
    fn open_declaring(declared: u32) -> Vec<u8> {
        let mut body = vec![0x00, 0x53, 0x10, 0xc0, 10, 1, 0xb1];
        body.extend_from_slice(&declared.to_be_bytes());
        body.extend_from_slice(b"abcd");
        body[4] = (body.len() - 5) as u8;
        frame(&body)
    }

    /// Feeds `client` bytes (after the header) to fe2o3's acceptor the way the head does, and
    /// says how accepting ended; a panic in the task fails the test.
    async fn accept(client: Vec<u8>) -> String {
        let (mut peer, mut server) = tokio::io::duplex(1 << 16);
        peer.write_all(&AMQP_HEADER).await.unwrap();
        peer.write_all(&client).await.unwrap();
        let task = tokio::spawn(async move {
            let mut header = [0u8; 8];
            server.read_exact(&mut header).await.unwrap();
            let acceptor = ConnectionAcceptor::builder().container_id("test").build();
            match acceptor.accept(guarded_stream(header, server)).await {
                Ok(_) => "accepted".to_owned(),
                Err(e) => format!("{e:?}"),
            }
        });
        let ended = tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("accept ends (bound only)");
        drop(peer);
        match ended {
            Ok(end) => end,
            Err(e) => panic!("the connection task panicked: {e}"),
        }
    }

    #[tokio::test]
    async fn a_frame_shorter_than_its_header_ends_the_connection_without_a_panic() {
        for size in 4u32..8 {
            let mut bytes = size.to_be_bytes().to_vec();
            bytes.resize(size as usize, 2);
            // Before the guard, fe2o3's decoder panicked here ("advance out of bounds").
            let end = accept(bytes).await;
            assert_ne!(end, "accepted", "size {size}");
        }
    }

    #[tokio::test]
    async fn a_value_declaring_more_than_its_frame_holds_never_reaches_the_decoder() {
        // Before the guard, serde_amqp allocated the declared 4 GiB, and the connection did
        // not end within the bound. Now the read fails and accepting ends with an error.
        assert_eq!(
            check_frame(&open_declaring(0xffff_fff0)),
            Err(FrameError::Overrun(15))
        );
        let end = accept(open_declaring(0xffff_fff0)).await;
        assert_ne!(end, "accepted");
    }

    #[test]
    fn an_honest_open_passes_and_one_byte_too_many_does_not() {
        assert_eq!(check_frame(&open_declaring(4)), Ok(()));
        assert!(matches!(
            check_frame(&open_declaring(5)),
            Err(FrameError::Overrun(_))
        ));
    }

    #[test]
    fn sizes_and_nesting_are_checked() {
        assert_eq!(
            check_frame(&frame(&[])),
            Ok(()),
            "an empty frame is a heartbeat"
        );
        assert_eq!(
            check_frame(&[0, 0, 0, 7, 2, 0, 0]),
            Err(FrameError::TooShort(7))
        );
        let big = (MAX_FRAME_BYTES + 1).to_be_bytes();
        assert_eq!(
            check_frame(&big),
            Err(FrameError::TooLarge(MAX_FRAME_BYTES + 1))
        );
        // A list declaring more elements than it has bytes.
        assert!(check_frame(&frame(&[0x00, 0x53, 0x10, 0xc0, 1, 200])).is_err());
        // Lists nested deeper than MAX_DEPTH.
        let mut deep = Vec::new();
        for _ in 0..=MAX_DEPTH + 1 {
            deep.extend_from_slice(&[0xd0, 0, 0, 0, 0, 0, 0, 0, 1]);
        }
        deep.push(0x40);
        // Fix each list's size: everything after its size field.
        let n = deep.len();
        for level in 0..=MAX_DEPTH + 1 {
            let at = level * 9 + 1;
            let size = (n - at - 4) as u32;
            deep[at..at + 4].copy_from_slice(&size.to_be_bytes());
        }
        let mut open = vec![0x00, 0x53, 0x10];
        open.extend(deep);
        assert_eq!(check_frame(&frame(&open)), Err(FrameError::TooDeep));
    }

    #[tokio::test]
    async fn the_guard_hands_on_a_valid_stream_unchanged_whatever_the_chunks() {
        let mut stream = AMQP_HEADER.to_vec();
        stream.extend(open_declaring(4));
        stream.extend(frame(&[]));
        stream.extend(b"AMQP\x03\x01\x00\x00");
        stream.extend(frame(&[0x00, 0x53, 0x41, 0x45]));
        for chunk in [1usize, 3, 7, 64] {
            let (mut tx, rx) = tokio::io::duplex(chunk);
            let sent = stream.clone();
            let writer = tokio::spawn(async move {
                for part in sent.chunks(chunk) {
                    tx.write_all(part).await.unwrap();
                }
            });
            let mut out = Vec::new();
            Guarded::new(rx).read_to_end(&mut out).await.unwrap();
            writer.await.unwrap();
            assert_eq!(out, stream, "chunks of {chunk}");
        }
    }

    /// A Transfer performative on handle `handle` (delivery 0, tag "t", format 0) with `more`.
    fn transfer(handle: u8, more: bool) -> Vec<u8> {
        let more = if more { 0x41 } else { 0x42 };
        let mut body = vec![
            0x00, 0x53, 0x14, 0xc0, 0, 6, 0x52, handle, 0x43, 0xa0, 1, b't', 0x43, 0x42, more,
        ];
        body[4] = (body.len() - 5) as u8;
        body
    }

    /// A message whose application properties hold one key that declares `declared` bytes.
    fn message_declaring(declared: u32) -> Vec<u8> {
        let mut m = vec![0x00, 0x53, 0x74, 0xc1, 0, 2, 0xb1];
        m.extend_from_slice(&declared.to_be_bytes());
        m.extend_from_slice(b"key!");
        m.push(0x40);
        m[4] = (m.len() - 5) as u8;
        m.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 2, b'h', b'i']);
        m
    }

    #[test]
    fn a_transfer_whose_message_declares_more_than_it_holds_is_refused() {
        let mut one = transfer(0, false);
        one.extend(message_declaring(0xffff_fff0));
        assert!(matches!(
            check_frame(&frame(&one)),
            Err(FrameError::Overrun(_))
        ));
        let mut honest = transfer(0, false);
        honest.extend(message_declaring(4));
        assert_eq!(check_frame(&frame(&honest)), Ok(()));
    }

    #[test]
    fn a_message_split_over_transfers_is_checked_whole() {
        for declared in [4u32, 0xffff_fff0] {
            let message = message_declaring(declared);
            let (head, tail) = message.split_at(9); // inside the key's length field
            let mut checker = FrameChecker::new();
            let mut first = transfer(3, true);
            first.extend_from_slice(head);
            assert_eq!(
                checker.check(&frame(&first)),
                Ok(()),
                "a partial message passes"
            );
            let mut last = transfer(3, false);
            last.extend_from_slice(tail);
            let end = checker.check(&frame(&last));
            if declared == 4 {
                assert_eq!(end, Ok(()));
            } else {
                assert!(matches!(end, Err(FrameError::Overrun(_))), "{end:?}");
            }
        }
    }

    #[test]
    fn a_map_with_an_odd_number_of_elements_is_refused() {
        // Application properties as a map8 of one element: serde_amqp's map reader subtracts 2
        // from the count per entry (overflow: a panic with overflow checks, else a wrapped
        // count). Found by the amqp_frames fuzz target.
        let odd = [0x00, 0x53, 0x74, 0xc1, 3, 1, 0xa1, 0];
        assert!(matches!(check_message(&odd), Err(FrameError::OddMap(_))));
        let even = [0x00, 0x53, 0x74, 0xc1, 4, 2, 0xa1, 0, 0x40];
        assert_eq!(check_message(&even), Ok(()));
    }

    #[test]
    fn a_list_whose_size_disagrees_with_its_elements_is_refused() {
        // A properties list8 declaring 46 bytes for one 3-byte element: serde_amqp reads by
        // count, so the bytes the size covers (here a 76 MB str32 header) are decoded as the
        // next value. Found by the amqp_frames fuzz target.
        let mut m = vec![0x00, 0x53, 0x73, 0xc0, 0, 1, 0xa0, 2, 0xff, 0xfe];
        m.extend_from_slice(&[0x00, 0x53, 0x77, 0xb1, 0x04, 0x8c, 0xff, 0xff]);
        m[4] = 46.min(m.len() as u8 - 5);
        assert!(matches!(
            check_message(&m),
            Err(FrameError::SizeMismatch(3))
        ));
    }

    #[test]
    fn a_performative_or_section_that_is_not_described_is_refused() {
        // A bare smallulong 0x12 (attach's code) as the performative: fe2o3 takes it as the
        // descriptor and decodes the bytes after it (a sym32 declaring 1.9 GB) as the attach.
        // Found by the amqp_frames fuzz target.
        let bare = frame(&[0x53, 0x12, 0x00, 0xb3, 0x70, 0x2d, 0x77, 0xa3]);
        assert_eq!(check_frame(&bare), Err(FrameError::NotDescribed(8)));
        assert_eq!(
            check_message(&[0xa1, 1, b'x']),
            Err(FrameError::NotDescribed(0))
        );
    }

    #[test]
    fn descriptors_are_codes_or_symbols_and_arrays_are_not_described() {
        // A section described by a described value, and an array whose element constructor is
        // described: serde_amqp reads these differently from the spec's layout and underflowed
        // on a list8 of size 0 (found by the amqp_frames fuzz target).
        let found = [
            0x00, 0x53, 0x76, 0xe0, 0x05, 0x00, 0x00, 0x53, 0x76, 0xc0, 0x00, 0x00, 0x53, 0x76,
            0xe0, 0x05, 0x00, 0x00, 0x53, 0x76, 0xe0, 0x00, 0x56, 0x00, 0x02, 0x56, 0x00, 0x02,
        ];
        assert!(matches!(
            check_message(&found),
            Err(FrameError::Unsupported(3, _))
        ));
        let nested = [0x00, 0x00, 0x53, 0x76, 0x40, 0x40];
        assert!(matches!(
            check_message(&nested),
            Err(FrameError::Unsupported(1, _))
        ));
        // An array of symbols (as in capabilities) passes.
        let symbols = [
            0x00, 0x53, 0x77, 0xe0, 0x06, 0x02, 0xa3, 0x01, b'a', 0x01, b'b',
        ];
        assert_eq!(check_message(&symbols), Ok(()));
    }

    #[test]
    fn unknown_constructors_and_arrays_of_compounds_are_refused() {
        // An array of list32 (count 0) inside an amqp-value, then bytes no constructor starts:
        // serde_amqp reached a list8 of size 0 and subtracted past zero (found by the
        // amqp_frames fuzz target).
        let found = [
            0x00, 0x53, 0x77, 0xc0, 0x32, 0x02, 0x00, 0x53, 0x02, 0x00, 0x53, 0x77, 0xe0, 0x02,
            0x00, 0xd0, 0x33, 0x02, 0x00, 0x00, 0x00, 0x00, 0x53, 0x10, 0xc0, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x33, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x09, b'd',
            b'e', b'v', b'1', b'/', b'm', b'o', 0x43, b'o', b't', b'h', b'u', b'm', 0x00, 0x53,
        ];
        assert!(matches!(
            check_message(&found),
            Err(FrameError::Unsupported(..))
        ));
        let unknown = [0x00, 0x53, 0x77, 0x33];
        assert_eq!(
            check_message(&unknown),
            Err(FrameError::Unsupported(3, "an unknown constructor"))
        );
        let lists = [0x00, 0x53, 0x77, 0xe0, 0x02, 0x00, 0xd0];
        assert!(matches!(
            check_message(&lists),
            Err(FrameError::Unsupported(3, _))
        ));
    }
}
