//! Per-connection MQTT state, kept apart from I/O (in the manner of rumqttc's `state.rs`): these
//! types only modify state and say what to send; they never touch a socket, a clock or a task.
//!
//! Three pieces:
//!
//! **Inbound acknowledgements** ([`InboundAcks`]). Guarantees:
//! - PUBACKs leave in the order the QoS 1 PUBLISHes arrived, even when durability completes out
//!   of order: [`InboundAcks::on_durable`] returns the packet ids that may be acknowledged now,
//!   which is always the longest durable prefix of the arrival order.
//! - No PUBACK is ever released for a message that is not durable.
//! - **Failure rule**: after [`InboundAcks::on_failed`] nothing more is released, not even for
//!   earlier messages that later become durable, and no new publish is accepted; the caller must
//!   close the connection. The client then re-sends every unacknowledged publish (DUP=1) on its
//!   next connection, in its original order, so nothing is lost or reordered; messages that had
//!   become durable are duplicated (at-least-once, as with edgeHub). Acknowledging a *later*
//!   message while an earlier one failed would let the retried earlier one overtake it.
//! - At most `max_pending` publishes await durability ([`InboundAcks::is_full`]): the caller
//!   stops reading the socket meanwhile (edgeHub's `MaxPendingInboundAcknowledgements`, 16).
//! - A PUBLISH reusing a packet id that is still pending is refused with
//!   [`StateError::PacketIdInUse`]: if its DUP flag is set it is a retransmission, and the caller
//!   drops it (the original's PUBACK answers both); otherwise the client broke MQTT-2.3.1-2 and
//!   the caller closes. Queuing it would send two PUBACKs for one id, and the second could
//!   acknowledge a newer message that reused the id.
//! - QoS ([`inbound_qos`]): QoS 0 needs no acknowledgement (it is still routed in order); QoS 2
//!   is not supported and, as in edgeHub, the connection is closed without PUBREC.
//!
//! **Outbound deliveries** ([`Outbound`]). Guarantees:
//! - Packet ids are 1..=65535, allocated in increasing order with wrap-around, never one that is
//!   in flight; at most `window` deliveries are in flight (`window` is 1..=65535, so a free id
//!   always exists when [`Outbound::can_send`]).
//! - A PUBACK for an id not in flight is [`StateError::Unsolicited`] and changes nothing.
//! - [`Outbound::in_flight`] lists unacknowledged deliveries in send order: after a reconnect
//!   that keeps the session they are re-sent first, with DUP=1 and the same ids (MQTT 3.1.1
//!   §4.4); with a clean session, [`Outbound::clear`] hands them back for redelivery.
//!
//! **Keep-alive** ([`keep_alive_timeout`], [`deadline`]). edgeHub (ProtocolGateway
//! `DeriveKeepAliveTimeout`) closes a connection after 1.5 × the client's keep-alive without
//! any packet, capped at `MaxKeepAliveTimeout` = 10 min; the cap is also the timeout for
//! keep-alive 0. Consequence kept on purpose: a client keep-alive above 400 s (Python allows up
//! to 1740 s) is cut at 600 s, exactly as edgeHub does. CONNECT must arrive within
//! [`CONNECT_ARRIVAL_TIMEOUT`].

use std::collections::VecDeque;
use std::ops::Add;
use std::time::Duration;

use rumqttc::QoS;

/// edgeHub's `MaxKeepAliveTimeout`: the longest a silent connection is kept.
pub const MAX_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(600);
/// edgeHub's `ConnectArrivalTimeout`: how long after accept the CONNECT may take.
pub const CONNECT_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// edgeHub's `MaxPendingInboundAcknowledgements`.
pub const DEFAULT_MAX_PENDING_ACKS: usize = 16;

/// A protocol violation or a misuse of the state; the variant says which.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A PUBACK for a packet id that has no delivery in flight.
    #[error("unsolicited PUBACK for packet id {0}")]
    Unsolicited(u16),
    /// [`Outbound::on_send`] with the window already full.
    #[error("delivery window full")]
    WindowFull,
    /// A PUBLISH reusing a packet id whose acknowledgement is still pending.
    #[error("packet id {0} is already awaiting acknowledgement")]
    PacketIdInUse(u16),
    /// A PUBLISH while `max_pending` acknowledgements are outstanding.
    #[error("too many publishes awaiting acknowledgement")]
    InboundFull,
    /// A PUBLISH after a durability failure: the connection must close.
    #[error("a publish failed; the connection must close")]
    Failed,
    /// A token that is not pending (already resolved, or from another connection).
    #[error("unknown acknowledgement token")]
    UnknownToken,
}

/// What to do with an incoming PUBLISH of a given QoS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundQos {
    /// QoS 0: route it; send nothing back.
    NoAck,
    /// QoS 1: route it; PUBACK once durable, in arrival order ([`InboundAcks`]).
    AckWhenDurable,
    /// QoS 2: unsupported; close the connection without PUBREC (edgeHub does the same).
    CloseConnection,
}

/// Classifies an incoming PUBLISH by QoS.
pub fn inbound_qos(qos: QoS) -> InboundQos {
    match qos {
        QoS::AtMostOnce => InboundQos::NoAck,
        QoS::AtLeastOnce => InboundQos::AckWhenDurable,
        QoS::ExactlyOnce => InboundQos::CloseConnection,
    }
}

/// Identifies one pending acknowledgement; handed back to [`InboundAcks::on_durable`] or
/// [`InboundAcks::on_failed`] when the router answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AckToken(u64);

/// One QoS 1 publish awaiting its PUBACK.
#[derive(Debug)]
struct PendingAck {
    token: AckToken,
    pkid: u16,
    durable: bool,
}

/// Inbound QoS 1 acknowledgements in arrival order; see the module doc.
#[derive(Debug)]
pub struct InboundAcks {
    /// Arrival order; tokens strictly increase along it.
    pending: VecDeque<PendingAck>,
    next_token: u64,
    max_pending: usize,
    failed: bool,
}

impl InboundAcks {
    /// Empty state allowing `max_pending` (at least 1) outstanding acknowledgements.
    pub fn new(max_pending: usize) -> Self {
        InboundAcks {
            pending: VecDeque::new(),
            next_token: 0,
            max_pending: max_pending.max(1),
            failed: false,
        }
    }

    /// A QoS 1 PUBLISH arrived with `pkid`; route it and report the outcome with the token.
    pub fn on_publish(&mut self, pkid: u16) -> Result<AckToken, StateError> {
        if self.failed {
            return Err(StateError::Failed);
        }
        if self.pending.iter().any(|p| p.pkid == pkid) {
            return Err(StateError::PacketIdInUse(pkid));
        }
        if self.is_full() {
            return Err(StateError::InboundFull);
        }
        let token = AckToken(self.next_token);
        self.next_token += 1;
        self.pending.push_back(PendingAck {
            token,
            pkid,
            durable: false,
        });
        Ok(token)
    }

    /// The message of `token` is durable. Returns the packet ids to PUBACK now, in order:
    /// the durable prefix of the arrival order (empty if an earlier one is still pending, or
    /// after a failure).
    pub fn on_durable(&mut self, token: AckToken) -> Result<Vec<u16>, StateError> {
        let i = self.position(token)?;
        if let Some(p) = self.pending.get_mut(i) {
            p.durable = true;
        }
        if self.failed {
            return Ok(Vec::new());
        }
        let mut ready = Vec::new();
        while let Some(p) = self.pending.front() {
            if !p.durable {
                break;
            }
            ready.push(p.pkid);
            self.pending.pop_front();
        }
        Ok(ready)
    }

    /// The message of `token` could not be made durable: from now on nothing is acknowledged
    /// and the connection must close (see the failure rule in the module doc).
    pub fn on_failed(&mut self, token: AckToken) -> Result<(), StateError> {
        self.position(token)?;
        self.failed = true;
        Ok(())
    }

    /// Whether a failure was reported; the connection must close.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Publishes awaiting their PUBACK.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether the caller must stop reading PUBLISHes until an acknowledgement is released.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.max_pending
    }

    fn position(&self, token: AckToken) -> Result<usize, StateError> {
        self.pending
            .binary_search_by_key(&token, |p| p.token)
            .map_err(|_| StateError::UnknownToken)
    }
}

/// Deliveries to a module in flight, each carrying the caller's `T` (a store offset, a
/// completion handle, …); see the module doc. Keep it per MQTT session, not per connection.
#[derive(Debug)]
pub struct Outbound<T> {
    /// Send order.
    in_flight: VecDeque<(u16, T)>,
    window: usize,
    /// The next packet id to try; never 0.
    next_pkid: u16,
    /// Bit `pkid` set while `pkid` is in flight (8 KiB), so allocation is O(1) per id tried.
    in_use: Vec<u64>,
}

impl<T> Outbound<T> {
    /// Empty state with at most `window` deliveries in flight (0 is taken as 1; edgeHub uses 1).
    pub fn new(window: u16) -> Self {
        Outbound {
            in_flight: VecDeque::new(),
            window: usize::from(window.max(1)),
            next_pkid: 1,
            in_use: vec![0; 1 << 10],
        }
    }

    /// Whether another delivery may be sent now.
    pub fn can_send(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// Records a delivery about to be sent; returns the packet id to send it with.
    pub fn on_send(&mut self, item: T) -> Result<u16, StateError> {
        if !self.can_send() {
            return Err(StateError::WindowFull);
        }
        let mut pkid = self.next_pkid;
        // Terminates: fewer than 65535 ids are in flight (window <= 65535 and not full).
        while self.is_in_use(pkid) {
            pkid = following(pkid);
        }
        self.next_pkid = following(pkid);
        self.set_in_use(pkid, true);
        self.in_flight.push_back((pkid, item));
        Ok(pkid)
    }

    /// The module acknowledged `pkid`; returns what was sent with it.
    pub fn on_puback(&mut self, pkid: u16) -> Result<T, StateError> {
        if !self.is_in_use(pkid) {
            return Err(StateError::Unsolicited(pkid));
        }
        // Module PUBACKs normally come in send order, so this finds the front at once.
        let i = self
            .in_flight
            .iter()
            .position(|(p, _)| *p == pkid)
            .ok_or(StateError::Unsolicited(pkid))?;
        self.set_in_use(pkid, false);
        self.in_flight
            .remove(i)
            .map(|(_, item)| item)
            .ok_or(StateError::Unsolicited(pkid))
    }

    /// Unacknowledged deliveries in send order: what to re-send (DUP=1, same id) after a
    /// reconnect that keeps the session.
    pub fn in_flight(&self) -> impl Iterator<Item = (u16, &T)> + '_ {
        self.in_flight.iter().map(|(p, item)| (*p, item))
    }

    /// How many deliveries are in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Forgets every delivery (clean session, or giving up on the session); returns them in
    /// send order so they can be redelivered later.
    pub fn clear(&mut self) -> Vec<T> {
        self.in_use.fill(0);
        self.in_flight.drain(..).map(|(_, item)| item).collect()
    }

    fn is_in_use(&self, pkid: u16) -> bool {
        let (word, bit) = (usize::from(pkid >> 6), pkid & 63);
        self.in_use.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn set_in_use(&mut self, pkid: u16, in_use: bool) {
        let (word, bit) = (usize::from(pkid >> 6), pkid & 63);
        if let Some(w) = self.in_use.get_mut(word) {
            if in_use {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }
}

/// The packet id after `pkid`, wrapping 65535 → 1.
fn following(pkid: u16) -> u16 {
    if pkid == u16::MAX {
        1
    } else {
        pkid + 1
    }
}

/// How long a connection may stay silent: 1.5 × `keep_alive_secs`, at most
/// [`MAX_KEEP_ALIVE_TIMEOUT`], which is also the answer for keep-alive 0.
pub fn keep_alive_timeout(keep_alive_secs: u16) -> Duration {
    if keep_alive_secs == 0 {
        return MAX_KEEP_ALIVE_TIMEOUT;
    }
    Duration::from_millis(u64::from(keep_alive_secs) * 1500).min(MAX_KEEP_ALIVE_TIMEOUT)
}

/// When to close a connection whose last packet arrived at `last_activity` (any instant type:
/// `std` or `tokio`).
pub fn deadline<I: Add<Duration, Output = I>>(last_activity: I, keep_alive_secs: u16) -> I {
    last_activity + keep_alive_timeout(keep_alive_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- inbound acknowledgements ----

    #[test]
    fn qos0_needs_no_ack_qos1_waits_qos2_closes() {
        assert_eq!(inbound_qos(QoS::AtMostOnce), InboundQos::NoAck);
        assert_eq!(inbound_qos(QoS::AtLeastOnce), InboundQos::AckWhenDurable);
        assert_eq!(inbound_qos(QoS::ExactlyOnce), InboundQos::CloseConnection);
    }

    #[test]
    fn durable_publish_in_order_is_acked_at_once() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(10).unwrap();
        assert_eq!(s.on_durable(a).unwrap(), vec![10]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn later_durable_publish_waits_for_earlier_one() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(1).unwrap();
        let b = s.on_publish(2).unwrap();
        let c = s.on_publish(3).unwrap();
        assert_eq!(s.on_durable(c).unwrap(), Vec::<u16>::new());
        assert_eq!(s.on_durable(b).unwrap(), Vec::<u16>::new());
        assert_eq!(s.on_durable(a).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn durable_prefix_is_released_up_to_the_first_pending() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(1).unwrap();
        let b = s.on_publish(2).unwrap();
        let c = s.on_publish(3).unwrap();
        assert_eq!(s.on_durable(b).unwrap(), Vec::<u16>::new());
        assert_eq!(s.on_durable(a).unwrap(), vec![1, 2]);
        assert_eq!(s.on_durable(c).unwrap(), vec![3]);
    }

    #[test]
    fn failure_stops_every_later_ack_and_earlier_pending_ones() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(1).unwrap();
        let b = s.on_publish(2).unwrap();
        let c = s.on_publish(3).unwrap();
        s.on_failed(b).unwrap();
        assert!(s.is_failed());
        assert_eq!(s.on_durable(c).unwrap(), Vec::<u16>::new());
        assert_eq!(s.on_durable(a).unwrap(), Vec::<u16>::new());
        assert_eq!(s.on_publish(4), Err(StateError::Failed));
    }

    #[test]
    fn acks_released_before_a_failure_stay_released() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(1).unwrap();
        let b = s.on_publish(2).unwrap();
        assert_eq!(s.on_durable(a).unwrap(), vec![1]);
        s.on_failed(b).unwrap();
        assert_eq!(s.pending(), 1);
    }

    #[test]
    fn resolved_or_foreign_tokens_are_unknown() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(1).unwrap();
        s.on_durable(a).unwrap();
        assert_eq!(s.on_durable(a), Err(StateError::UnknownToken));
        assert_eq!(s.on_failed(a), Err(StateError::UnknownToken));
        assert!(!s.is_failed());
    }

    #[test]
    fn pending_packet_id_cannot_be_reused_until_acked() {
        let mut s = InboundAcks::new(16);
        let a = s.on_publish(7).unwrap();
        assert_eq!(s.on_publish(7), Err(StateError::PacketIdInUse(7)));
        assert_eq!(s.pending(), 1);
        s.on_durable(a).unwrap();
        assert!(s.on_publish(7).is_ok());
    }

    #[test]
    fn full_inbound_refuses_until_an_ack_is_released() {
        let mut s = InboundAcks::new(2);
        let a = s.on_publish(1).unwrap();
        s.on_publish(2).unwrap();
        assert!(s.is_full());
        assert_eq!(s.on_publish(3), Err(StateError::InboundFull));
        s.on_durable(a).unwrap();
        assert!(!s.is_full());
        assert!(s.on_publish(3).is_ok());
    }

    #[test]
    fn zero_max_pending_still_allows_one() {
        let mut s = InboundAcks::new(0);
        assert!(s.on_publish(1).is_ok());
        assert!(s.is_full());
    }

    // ---- outbound deliveries ----

    #[test]
    fn packet_ids_start_at_one_and_increase() {
        let mut o = Outbound::new(3);
        assert_eq!(o.on_send('a'), Ok(1));
        assert_eq!(o.on_send('b'), Ok(2));
        assert_eq!(o.on_send('c'), Ok(3));
    }

    #[test]
    fn full_window_refuses_sends_until_a_puback() {
        let mut o = Outbound::new(2);
        o.on_send(10u64).unwrap();
        o.on_send(11).unwrap();
        assert!(!o.can_send());
        assert_eq!(o.on_send(12), Err(StateError::WindowFull));
        assert_eq!(o.len(), 2);
        assert_eq!(o.on_puback(1), Ok(10));
        assert!(o.can_send());
        assert_eq!(o.on_send(12), Ok(3));
    }

    #[test]
    fn puback_returns_what_was_sent_even_out_of_order() {
        let mut o = Outbound::new(3);
        o.on_send("x").unwrap();
        o.on_send("y").unwrap();
        o.on_send("z").unwrap();
        assert_eq!(o.on_puback(2), Ok("y"));
        assert_eq!(o.on_puback(3), Ok("z"));
        assert_eq!(o.on_puback(1), Ok("x"));
        assert!(o.is_empty());
    }

    #[test]
    fn unsolicited_puback_is_an_error_and_changes_nothing() {
        let mut o = Outbound::new(2);
        o.on_send(1u8).unwrap();
        assert_eq!(o.on_puback(9), Err(StateError::Unsolicited(9)));
        assert_eq!(o.on_puback(0), Err(StateError::Unsolicited(0)));
        assert_eq!(o.len(), 1);
        assert_eq!(o.on_puback(1), Ok(1));
        assert_eq!(o.on_puback(1), Err(StateError::Unsolicited(1)));
    }

    #[test]
    fn packet_ids_wrap_from_65535_to_1() {
        let mut o = Outbound::new(1);
        for expected in 1..=u16::MAX {
            assert_eq!(o.on_send(()), Ok(expected));
            o.on_puback(expected).unwrap();
        }
        assert_eq!(o.on_send(()), Ok(1), "0 is never used");
    }

    #[test]
    fn allocation_skips_ids_still_in_flight_after_wrap() {
        let mut o = Outbound::new(u16::MAX);
        o.on_send("old1").unwrap(); // id 1 stays in flight
        o.on_send("old2").unwrap(); // id 2 stays in flight
        for expected in 3..=u16::MAX {
            assert_eq!(o.on_send("n"), Ok(expected));
            o.on_puback(expected).unwrap();
        }
        o.on_puback(1).unwrap();
        assert_eq!(o.on_send("a"), Ok(1));
        assert_eq!(o.on_send("b"), Ok(3), "2 is still in flight");
    }

    #[test]
    fn full_id_space_window_allocates_every_id_once() {
        let mut o = Outbound::new(u16::MAX);
        for expected in 1..=u16::MAX {
            assert_eq!(o.on_send(()), Ok(expected));
        }
        assert_eq!(o.on_send(()), Err(StateError::WindowFull));
        o.on_puback(40000).unwrap();
        assert_eq!(o.on_send(()), Ok(40000));
    }

    #[test]
    fn in_flight_lists_unacked_deliveries_in_send_order_for_resend() {
        let mut o = Outbound::new(4);
        for offset in [100u64, 101, 102, 103] {
            o.on_send(offset).unwrap();
        }
        o.on_puback(2).unwrap();
        let resend: Vec<(u16, u64)> = o.in_flight().map(|(p, off)| (p, *off)).collect();
        assert_eq!(resend, vec![(1, 100), (3, 102), (4, 103)]);
    }

    #[test]
    fn clear_hands_back_deliveries_in_send_order() {
        let mut o = Outbound::new(3);
        o.on_send(5u64).unwrap();
        o.on_send(6).unwrap();
        assert_eq!(o.clear(), vec![5, 6]);
        assert!(o.is_empty());
        assert_eq!(o.on_send(7), Ok(3), "ids keep increasing after a clear");
    }

    #[test]
    fn zero_window_is_one() {
        let mut o = Outbound::new(0);
        assert!(o.can_send());
        o.on_send(()).unwrap();
        assert!(!o.can_send());
    }

    // ---- keep-alive ----

    #[test]
    fn keep_alive_timeout_is_one_and_a_half_times_the_client_value() {
        assert_eq!(keep_alive_timeout(60), Duration::from_secs(90));
        assert_eq!(keep_alive_timeout(180), Duration::from_secs(270));
        assert_eq!(keep_alive_timeout(1), Duration::from_millis(1500));
    }

    #[test]
    fn keep_alive_timeout_is_capped_at_ten_minutes() {
        assert_eq!(keep_alive_timeout(400), Duration::from_secs(600));
        assert_eq!(keep_alive_timeout(401), MAX_KEEP_ALIVE_TIMEOUT);
        assert_eq!(keep_alive_timeout(1740), MAX_KEEP_ALIVE_TIMEOUT);
        assert_eq!(keep_alive_timeout(u16::MAX), MAX_KEEP_ALIVE_TIMEOUT);
    }

    #[test]
    fn keep_alive_zero_uses_the_cap() {
        assert_eq!(keep_alive_timeout(0), MAX_KEEP_ALIVE_TIMEOUT);
    }

    #[test]
    fn deadline_counts_from_the_last_activity() {
        let t0 = std::time::Instant::now();
        assert_eq!(deadline(t0, 60), t0 + Duration::from_secs(90));
        assert_eq!(deadline(Duration::ZERO, 0), Duration::from_secs(600));
    }

    // ---- models ----

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #[test]
        fn acks_leave_in_arrival_order_whatever_the_durability_order(
            order in proptest::sample::subsequence((0..40usize).collect::<Vec<_>>(), 40)
                .prop_shuffle()
        ) {
            let mut s = InboundAcks::new(64);
            let tokens: Vec<AckToken> =
                (0..40u16).map(|i| s.on_publish(i + 1).unwrap()).collect();
            let mut acked = Vec::new();
            for i in order {
                acked.extend(s.on_durable(tokens[i]).unwrap());
            }
            proptest::prop_assert_eq!(acked, (1..=40u16).collect::<Vec<_>>());
            proptest::prop_assert_eq!(s.pending(), 0);
        }

        #[test]
        fn in_flight_ids_are_unique_and_never_zero(
            ops in proptest::collection::vec(proptest::option::of(0usize..8), 1..300),
            window in 1u16..8,
        ) {
            let mut o = Outbound::new(window);
            let mut sent = 0u64;
            for op in ops {
                match op {
                    None if o.can_send() => {
                        let pkid = o.on_send(sent).unwrap();
                        proptest::prop_assert_ne!(pkid, 0);
                        sent += 1;
                    }
                    None => proptest::prop_assert_eq!(o.on_send(sent), Err(StateError::WindowFull)),
                    Some(i) => {
                        let target = o.in_flight().nth(i).map(|(p, v)| (p, *v));
                        if let Some((pkid, v)) = target {
                            proptest::prop_assert_eq!(o.on_puback(pkid), Ok(v));
                        }
                    }
                }
                let ids: Vec<u16> = o.in_flight().map(|(p, _)| p).collect();
                let mut dedup = ids.clone();
                dedup.sort_unstable();
                dedup.dedup();
                proptest::prop_assert_eq!(dedup.len(), ids.len());
                proptest::prop_assert!(ids.len() <= usize::from(window));
                let values: Vec<u64> = o.in_flight().map(|(_, v)| *v).collect();
                proptest::prop_assert!(values.windows(2).all(|w| w[0] < w[1]), "send order kept");
            }
        }
    }
}
