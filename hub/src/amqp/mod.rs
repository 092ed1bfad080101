//! The AMQP 1.0 head (AMQPS on 5671): what the Node, C# and Java SDKs speak by default
//! (reference §2). It adapts fe2o3-amqp's listener (the acceptor) to the same core as the MQTT
//! head: [`HeadContext`](crate::head::context::HeadContext) (router, dispatcher, identities,
//! registry of live connections, metrics, shutdown) and the SAS tokens of [`crate::auth::sas`].
//!
//! Layout: [`listener`] (TLS, one task per connection) → [`connection`] (protocol header, SASL,
//! sessions, attach decisions) → [`cbs`] (the `$cbs` node), [`links`] (events and inputs),
//! [`twin`] (the twin link pair) and [`methods`] (the direct-method link pair).
//! The protocol decisions are I/O-free in [`auth_state`] and [`events_state`] (an events link's
//! machine); message mapping is in [`convert`].
//!
//! Guarantees the head keeps (as the MQTT head): an events transfer is `accepted` only after it
//! is durable, in arrival order; the sender of a message is the authenticated identity of its
//! link, never a property; a link of a module is attached only on a connection where that module
//! authenticated; a bad connection affects only itself.
//!
//! # The connection (one tokio task per connection, per session, per link)
//!
//! The AMQP head serves AMQPS on 5671 (`--amqp-addr`) beside MQTT, on the same `HeadContext`
//! (router, dispatcher, identities, registry of live connections, metrics, shutdown) and SAS code.
//! fe2o3-amqp's acceptor does the framing, sessions and link state; TLS is ours (the MQTT rustls/ring
//! config), and the attach decisions are ours and I/O-free (`amqp/auth_state.rs`).
//!
//! ```text
//!  TLS ─▶ read 8-byte header ─ AMQP 3.1.0.0 ─▶ SASL: PLAIN (user {d}/modules/{m}@sas.{hub},
//!    │                                         password = SAS token) authenticates; ANONYMOUS /
//!    │                                         MSSBCBS authenticate nothing
//!    └─ AMQP 0.1.0.0 (Node SDK) ─────────────▶ Open ─▶ Running
//!  Running: each Begin ─▶ session task; each Attach ─▶ decide (auth_state) ─▶
//!    $cbs (either role)                 ─▶ put-token: 200 (identity authenticated until se+300 s,
//!                                          joins the live-connection registry; a replicated
//!                                          module's: its replica machines) / 400 / 401 / 503
//!                                          (a replicated module with its count of replicas)
//!    /devices/{d}/modules/{m}/messages/events, {d}/{m} authenticated here:
//!        client sender   ─▶ events link (outputs)     client receiver ─▶ inputs link (sink)
//!    /devices/{d}/modules/{m}/twin, {d}/{m} authenticated here:
//!        client sender   ─▶ twin requests (GET, PATCH reported, PUT/DELETE desired notifications)
//!        client receiver ─▶ answers (correlation-id, status) and desired patches   ([`twin`])
//!    /devices/{d}/modules/{m}/methods/deviceBound (any case), {d}/{m} authenticated here:
//!        client receiver ─▶ the connection is the module's method target: requests out
//!        client sender   ─▶ responses (IoThub-status) complete this connection's requests ([`methods`])
//!    anything else       ─▶ attach, then detach at once with amqp:unauthorized-access /
//!                           amqp:not-implemented
//!  Running ─ shutdown / replaced by a newer connection of the module / closed by its module's
//!            replicas (displaced, scaled down, a delivery lost) / earliest token expired
//!            unrenewed (counted, `protocol="amqp"`) / nothing authenticated 20 s after Open / nothing received for 240 s
//!            (our Open's idle-time-out; rhea sends empty frames every 120 s) / client Close /
//!            malformed frame ─▶ every link settles what is durable, closes (≤ 5 s each) ─▶
//!            sessions end ─▶ Close
//! ```
//!
//! - **Events link**: each transfer is converted (`amqp/convert.rs`: properties, application
//!   properties, `iothub-outputname` → the output; the sender is the link's authenticated identity,
//!   never a property) and routed; a batched transfer (`0x80013700`) is split into its messages.
//!   A second task awaits the route acknowledgements in arrival order; `accepted` goes out only
//!   when every message of the transfer is durable. A store failure rejects that transfer and every
//!   later one (`amqp:internal-error`) and closes the link, so a resending client cannot reorder;
//!   a refusal known when `route` returns (`RouteAck::refusal`: store full, too large) stops
//!   routing at once, so nothing after it (in the batch or later) is stored (the MQTT head closes
//!   the connection likewise). A failure known only at commit is covered by the link's append
//!   chain: whatever was routed after the failed message is refused by the store unwritten.
//!   A body the hub cannot carry, or a message over 320 KiB counted as stored (body plus
//!   properties as text), is rejected in turn, and the link goes on. These rules are a pure
//!   machine ([`events_state`], unit-tested); `links::serve_events` is its driver.
//! - **Size limits on the wire**: every link announces a `max-message-size` that fe2o3 enforces
//!   frame by frame while a delivery arrives (detach with `amqp:link:message-size-exceeded`):
//!   600 KiB on an events link (edgeHub's batched-transfer cap), 8 KiB on `$cbs`, which needs no
//!   authentication; no delivery is ever buffered beyond it.
//! - **Before authentication** a client can make the hub hold only bounded state: a connection
//!   with no authenticated identity 20 s after Open is closed; a session holds at most 64 links
//!   (`handle-max` 63 in our Begin, and enforced by us: fe2o3 only announces it; an attach beyond
//!   it is refused with `amqp:resource-limit-exceeded`); at most 16 `$cbs` replies wait for the
//!   reply link, then requests are not read (the client's credit runs out); at most 16 replies
//!   wait for their settlement (no task per reply).
//! - **`$cbs` replies** go out in request order on the client's reply link, which may be detached
//!   and attached again any number of times: a link that ends frees the reply queue, and the next
//!   one gets every reply not yet sent (a renewal put-token is answered as the first one was).
//! - **Inputs link**: registers itself as the sink of every input endpoint of its module (as an MQTT
//!   subscription does) and sends unsettled transfers only while the client gives credit (a client
//!   asking for `snd-settle-mode = settled` is answered `unsettled`: nothing is sent pre-settled, so
//!   nothing counts as delivered without the module's `accepted`), with the
//!   `x-opt-input-name`, `iothub-connection-device-id`, `iothub-connection-module-id`,
//!   `x-opt-lock-token`, `iothub-enqueuedtime`, `x-opt-sequence-number` (the store offset) and
//!   `iothub-deliverycount` annotations (the delivery tag is fe2o3's own: its sender cannot set
//!   the lock token as the tag, as edgeHub does). Settlement as edgeHub: `accepted` →
//!   delivered; `rejected` and `released` (the SDKs' reject and abandon) → not retryable, set aside
//!   and counted as `rejected`; `modified` → retried; no disposition within 30 s of its own send
//!   (every delivery's deadline counts from its send, so a window a module never settles is
//!   retried 30 s after the last send), or the link gone → retried, in order, from the first
//!   unsettled message; a closing link waits 5 s for dispositions still coming, then gives every
//!   unsettled delivery back at once. Bounded: at most 128 deliveries handed over by the sinks
//!   (which wait while that queue is full) and 1,024 sent and unsettled (then the link sends
//!   nothing more until one settles or times out).
//!   A replicated module's member connection gets what it owns from the replica machines
//!   instead (`head::replica::Membership`; [`connection`] holds the rules).
//!   Its sinks are registered only while the connection is the module's live one (checked under
//!   the dispatcher's lock, so an attach on a connection already replaced registers nothing); the
//!   link ends as soon as the client detaches it and then removes only its own sinks still
//!   registered (`Dispatcher::unregister_sink_if`, by pointer), never those of a newer link.
//! - **Isolation**: a malformed frame makes fe2o3's engine stop that connection (it drops the
//!   socket without a Close frame); nothing but the router is shared with other connections.
//! - **Frame guard** (`amqp/frame_guard.rs`, found by fuzzing): fe2o3 0.18 panics on a frame whose
//!   size is below its 8-byte header, serde_amqp allocates whatever length a string or binary in a
//!   frame or message declares (4 GiB from a 300-byte frame, before authentication, also on `$cbs`)
//!   and underflows on a map with an odd count. So the head reads
//!   through `Guarded`, which hands fe2o3 one whole frame at a time (at most 256 KiB) only after
//!   checking its size and that every length, count and nesting (≤ 32) in its performative stays
//!   inside it, every list, map and array is exactly filled by its elements (decoders read by
//!   count, not size), every map is even, performatives and message sections are described values
//!   with ulong or symbol descriptors, every constructor is the spec's, and arrays hold only
//!   primitive values; each message a transfer carries is checked the same way
//!   (joined over its frames; at most 4 MiB of unfinished transfers held per connection), and
//!   `split_batch` checks each batched message. Anything else ends that connection with an I/O
//!   error and a warning.
//! - fe2o3-amqp 0.18.4 notes: its connection and session engines log a client's ordinary Close /
//!   End at ERROR level (`RemoteClosed`, `RemoteEnded`); the AMQP head's own log line for the same
//!   event is INFO. Throughput: one Node SDK sender (one `sendOutputEvent` at a time) reaches
//!   0.85× its MQTT rate (README); each message crosses fe2o3's connection and session tasks both
//!   ways, where the MQTT head reads and writes the socket itself.

/// `AsyncWrite` for a read-side wrapper `$ty<S>` over a stream in its field `inner`: every write
/// goes straight to `inner` (the wrappers only watch or shape what is read).
macro_rules! write_through_inner {
    ($ty:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<S> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod auth_state;
pub mod cbs;
pub mod connection;
pub mod convert;
pub mod events_state;
pub mod frame_guard;
pub mod links;
pub mod listener;
pub mod methods;
pub mod sasl;
pub mod twin;
