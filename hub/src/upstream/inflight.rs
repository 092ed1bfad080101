//! Which upstream publish an IoT Hub PUBACK answers: the I/O-free bookkeeping of one upstream
//! connection.
//!
//! The MQTT client numbers QoS 1 publishes itself (packet ids) and reports, in the order it
//! writes them, `Outgoing::Publish(pkid)`; the broker later answers `PubAck(pkid)`. The client
//! takes requests strictly in order, so the n-th request handed to it is the n-th publish it
//! reports. [`Inflight`] keeps the waiters of requests not yet written (in order) and of
//! publishes written but not yet acknowledged (by packet id).
//!
//! Requests at QoS 0 (direct-method responses and twin requests, whose answer is a publish of
//! the cloud's, not a PUBACK) go through the same client, in the same request order, and are
//! written as publish 0 ([`Inflight::queued_unacknowledged`]): they hold a place in the order
//! and are never acknowledged.
//!
//! Guarantees:
//! - A waiter is answered "acknowledged" only by a PUBACK carrying the packet id its own publish
//!   was written with; anything that does not fit (a packet id reported twice, a PUBACK nobody
//!   waits for, a written publish with no request behind it) is an [`Anomaly`], and the caller
//!   then gives up the connection ([`Inflight::lost`]) rather than guess.
//! - [`Inflight::lost`] hands back every waiter still held, in the order the requests were made,
//!   so none is forgotten: each is answered "not acknowledged" and its message is sent again.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Something the client reported that does not fit what was asked of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Anomaly {
    /// The client wrote a publish but no request is waiting to be written.
    #[error("the client wrote publish {0} that no request stands for")]
    NothingQueued(u16),
    /// The client wrote a publish with a packet id that is still awaiting its PUBACK.
    #[error("packet id {0} reused while still awaiting its PUBACK")]
    PacketIdInUse(u16),
    /// A PUBACK for a packet id nobody waits for.
    #[error("PUBACK for packet id {0}, which no publish awaits")]
    UnknownPacketId(u16),
    /// The client wrote publish `pkid` where the oldest request was of the other QoS (0 is the
    /// id of a QoS 0 publish, and only of one).
    #[error("the client wrote publish {0} where a request of the other QoS was next")]
    QosMismatch(u16),
}

/// A request handed to the client and not yet written.
#[derive(Debug)]
enum Queued<W> {
    /// QoS 1: answered by the PUBACK of the packet id it is written with.
    Acknowledged(W),
    /// QoS 0: written as publish 0, never acknowledged.
    Unacknowledged,
}

/// The waiters of one connection. `W` is whatever the caller answers a request with.
#[derive(Debug)]
pub struct Inflight<W> {
    next_seq: u64,
    queued: VecDeque<(u64, Queued<W>)>,
    sent: HashMap<u16, (u64, W)>,
}

impl<W> Default for Inflight<W> {
    fn default() -> Self {
        Inflight {
            next_seq: 0,
            queued: VecDeque::new(),
            sent: HashMap::new(),
        }
    }
}

impl<W> Inflight<W> {
    /// A request was handed to the client (it is not on the wire yet).
    pub fn queued(&mut self, waiter: W) {
        self.queued
            .push_back((self.next_seq, Queued::Acknowledged(waiter)));
        self.next_seq += 1;
    }

    /// A QoS 0 request was handed to the client: it keeps its place in the order of writes
    /// and awaits no PUBACK.
    pub fn queued_unacknowledged(&mut self) {
        self.queued
            .push_back((self.next_seq, Queued::Unacknowledged));
        self.next_seq += 1;
    }

    /// The client wrote the oldest queued request as publish `pkid` (0 for a QoS 0 one).
    pub fn sent(&mut self, pkid: u16) -> Result<(), Anomaly> {
        if self.sent.contains_key(&pkid) {
            return Err(Anomaly::PacketIdInUse(pkid));
        }
        let (seq, entry) = self
            .queued
            .pop_front()
            .ok_or(Anomaly::NothingQueued(pkid))?;
        match (entry, pkid) {
            (Queued::Unacknowledged, 0) => Ok(()),
            (Queued::Acknowledged(w), 1..) => {
                self.sent.insert(pkid, (seq, w));
                Ok(())
            }
            (entry, _) => {
                self.queued.push_front((seq, entry));
                Err(Anomaly::QosMismatch(pkid))
            }
        }
    }

    /// The broker acknowledged publish `pkid`: its waiter.
    pub fn acked(&mut self, pkid: u16) -> Result<W, Anomaly> {
        self.sent
            .remove(&pkid)
            .map(|(_, w)| w)
            .ok_or(Anomaly::UnknownPacketId(pkid))
    }

    /// The connection is gone: every waiter, in request order.
    pub fn lost(&mut self) -> Vec<W> {
        let mut all: BTreeMap<u64, W> = self.sent.drain().map(|(_, entry)| entry).collect();
        all.extend(self.queued.drain(..).filter_map(|(seq, q)| match q {
            Queued::Acknowledged(w) => Some((seq, w)),
            Queued::Unacknowledged => None,
        }));
        all.into_values().collect()
    }

    /// The oldest request that awaits a PUBACK (QoS 0 ones never do).
    pub fn oldest(&self) -> Option<&W> {
        let sent = self.sent.values().min_by_key(|(seq, _)| *seq);
        let queued = self.queued.iter().find_map(|(seq, q)| match q {
            Queued::Acknowledged(w) => Some((*seq, w)),
            Queued::Unacknowledged => None,
        });
        match (queued, sent) {
            (Some(q), Some(s)) => Some(if q.0 < s.0 { q.1 } else { &s.1 }),
            (Some((_, w)), None) | (None, Some((_, w))) => Some(w),
            (None, None) => None,
        }
    }

    /// Requests not yet acknowledged (queued, of either QoS, or written at QoS 1).
    pub fn len(&self) -> usize {
        self.queued.len() + self.sent.len()
    }

    /// Whether nothing awaits an answer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_answer_the_request_written_with_that_packet_id() {
        let mut f = Inflight::default();
        for w in ["a", "b", "c"] {
            f.queued(w);
        }
        f.sent(7).unwrap();
        f.sent(8).unwrap();
        assert_eq!(f.acked(8), Ok("b"));
        f.sent(1).unwrap();
        assert_eq!(f.acked(7), Ok("a"));
        assert_eq!(f.acked(1), Ok("c"));
        assert!(f.is_empty());
    }

    #[test]
    fn anomalies_are_reported_not_guessed() {
        let mut f = Inflight::default();
        assert_eq!(f.sent(1), Err(Anomaly::NothingQueued(1)));
        f.queued("a");
        f.queued("b");
        f.sent(1).unwrap();
        assert_eq!(f.sent(1), Err(Anomaly::PacketIdInUse(1)));
        assert_eq!(f.acked(2), Err(Anomaly::UnknownPacketId(2)));
        assert_eq!(f.acked(1), Ok("a"));
        assert_eq!(f.acked(1), Err(Anomaly::UnknownPacketId(1)));
    }

    #[test]
    fn lost_hands_back_every_waiter_in_request_order() {
        let mut f = Inflight::default();
        for w in 0..6 {
            f.queued(w);
        }
        // Written with packet ids that do not follow request order (the id ring wrapped).
        for pkid in [99, 100, 1, 2] {
            f.sent(pkid).unwrap();
        }
        assert_eq!(f.acked(100), Ok(1));
        assert_eq!(f.oldest(), Some(&0));
        assert_eq!(f.acked(99), Ok(0));
        assert_eq!(f.oldest(), Some(&2));
        f.queued(0);
        assert_eq!(f.lost(), vec![2, 3, 4, 5, 0]);
        assert!(f.is_empty());
        assert_eq!(f.oldest(), None);
        // Usable again afterwards, with the same packet ids.
        f.queued(6);
        f.sent(99).unwrap();
        assert_eq!(f.acked(99), Ok(6));
    }

    #[test]
    fn qos_0_requests_keep_their_place_and_are_never_acknowledged() {
        let mut f = Inflight::default();
        f.queued("a");
        f.queued_unacknowledged();
        f.queued("b");
        f.sent(1).unwrap();
        // The QoS 0 request is next: a packet id other than 0 does not fit, and changes nothing.
        assert_eq!(f.sent(2), Err(Anomaly::QosMismatch(2)));
        f.sent(0).unwrap();
        // And a QoS 1 request written as publish 0 does not fit either.
        assert_eq!(f.sent(0), Err(Anomaly::QosMismatch(0)));
        f.sent(2).unwrap();
        assert_eq!(f.acked(0), Err(Anomaly::UnknownPacketId(0)));
        assert_eq!(f.acked(2), Ok("b"));
        f.queued_unacknowledged();
        assert_eq!(f.oldest(), Some(&"a"), "QoS 0 requests await no PUBACK");
        assert_eq!(f.len(), 2);
        assert_eq!(f.lost(), vec!["a"], "only waiters are handed back");
        assert!(f.is_empty());
    }
}
