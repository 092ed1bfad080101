//! [`Methods`]: the modules that can take direct-method requests now (one connection each), and
//! the requests waiting for their answer. Shared by the heads, which attach targets and relay
//! responses, and the HTTPS endpoint, which invokes.
//!
//! A request is handed to the target connection's bounded queue ([`METHOD_QUEUE`]) under the
//! table's lock, together with its entry in the [`PendingTable`], so a response can never
//! arrive for a request not yet pending. The invoker then waits for the answer up to the
//! response timeout; whatever ends the wait (answer, timeout, target gone, caller gone) removes
//! the entry, so nothing is left behind.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::identity::Identity;
use crate::methods::pending::{Busy, Completion, MethodLimits, PendingTable, Rid};
use crate::methods::request::{MethodName, MethodRequest};

/// Requests one target connection may have queued and not yet written; the per-target limit
/// keeps it from filling.
pub const METHOD_QUEUE: usize = 64;

/// A request on its way to a target connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodCall {
    /// Its `$rid`.
    pub rid: Rid,
    /// The method.
    pub name: MethodName,
    /// The JSON payload.
    pub payload: Bytes,
}

/// Where a connection takes method requests from.
pub type MethodTx = mpsc::Sender<MethodCall>;
/// The connection's end of a [`MethodTx`].
pub type MethodRx = mpsc::Receiver<MethodCall>;

/// The queue between [`Methods`] and one connection.
pub fn method_channel() -> (MethodTx, MethodRx) {
    mpsc::channel(METHOD_QUEUE)
}

/// The target's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodResponse {
    /// The status the module chose (`$iothub/methods/res/{status}/…`).
    pub status: i32,
    /// Its payload, as the module sent it.
    pub payload: Bytes,
}

/// Why an invocation got no answer from the target.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// The target is not connected or not subscribed to its methods (within the connect
    /// timeout): 404, IoT Hub's 404103 DeviceNotOnline.
    #[error("module {0} is not connected or not subscribed to $iothub/methods/POST/#")]
    NotConnected(Identity),
    /// The target's connection closed before it answered: 404, IoT Hub's 404104
    /// DeviceConnectionClosedRemotely.
    #[error("module {0} disconnected before it answered")]
    Disconnected(Identity),
    /// Too many requests in flight: 429.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// No answer within the response timeout: 504.
    #[error("module {0} did not answer within the response timeout")]
    Timeout(Identity),
}

impl InvokeError {
    /// The HTTP status to answer.
    pub fn status(&self) -> u16 {
        match self {
            InvokeError::NotConnected(_) | InvokeError::Disconnected(_) => 404,
            InvokeError::Busy(_) => 429,
            InvokeError::Timeout(_) => 504,
        }
    }
}

/// What became of a response a connection relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relayed {
    /// It answered its pending request.
    Completed,
    /// No request with that id is pending (late, never made, or not a number).
    Unknown,
    /// The request is pending on another module or connection: ignored.
    NotYours,
}

type Reply = oneshot::Sender<Result<MethodResponse, InvokeError>>;

struct Inner {
    /// The connection of each module that takes method requests, by connection id.
    targets: HashMap<Identity, (u64, MethodTx)>,
    pending: PendingTable<Reply>,
}

/// The method targets and the requests in flight.
pub struct Methods {
    inner: Mutex<Inner>,
    /// Bumped when a target attaches (an invoker with a connect timeout waits for it).
    attached: watch::Sender<u64>,
}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Methods").finish_non_exhaustive()
    }
}

impl Default for Methods {
    fn default() -> Self {
        Methods::new(crate::methods::pending::DEFAULT_LIMITS)
    }
}

impl Methods {
    /// No targets, nothing in flight, at most `limits` in flight.
    pub fn new(limits: MethodLimits) -> Self {
        Methods {
            inner: Mutex::new(Inner {
                targets: HashMap::new(),
                pending: PendingTable::new(limits),
            }),
            attached: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `conn` of `identity` takes method requests on `tx` (it subscribed to
    /// `$iothub/methods/POST/#`), unless a newer connection of the module (a higher id) already
    /// does; true if attached.
    pub fn attach(&self, identity: &Identity, conn: u64, tx: MethodTx) -> bool {
        {
            let mut inner = self.lock();
            if inner
                .targets
                .get(identity)
                .is_some_and(|(cur, _)| *cur > conn)
            {
                return false;
            }
            inner.targets.insert(identity.clone(), (conn, tx));
        }
        self.attached.send_modify(|n| *n += 1);
        true
    }

    /// Connection `conn` of `identity` takes no more requests (unsubscribed, or closed): it is
    /// no longer the module's target, and every request handed to it and not answered ends at
    /// once ([`InvokeError::Disconnected`]).
    pub fn detach(&self, identity: &Identity, conn: u64) {
        let replies = {
            let mut inner = self.lock();
            if inner
                .targets
                .get(identity)
                .is_some_and(|(cur, _)| *cur == conn)
            {
                inner.targets.remove(identity);
            }
            inner.pending.drop_connection(identity, conn)
        };
        for reply in replies {
            let _ = reply.send(Err(InvokeError::Disconnected(identity.clone())));
        }
    }

    /// The modules that take method requests now.
    pub fn targets(&self) -> Vec<Identity> {
        self.lock().targets.keys().cloned().collect()
    }

    /// Changes every time a target attaches (the cloud connection opens its module's
    /// connection then).
    pub fn watch_attached(&self) -> watch::Receiver<u64> {
        self.attached.subscribe()
    }

    /// Whether `identity` takes method requests now.
    pub fn is_attached(&self, identity: &Identity) -> bool {
        self.lock().targets.contains_key(identity)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// A response from connection `conn` of `from` for request `rid` (the text of `$rid`).
    pub fn relay(
        &self,
        from: &Identity,
        conn: u64,
        rid: &str,
        response: MethodResponse,
    ) -> Relayed {
        let Ok(rid) = rid.parse::<Rid>() else {
            return Relayed::Unknown;
        };
        let completion = self.lock().pending.complete(rid, from, conn);
        match completion {
            Completion::Completed(reply) => {
                let _ = reply.send(Ok(response));
                Relayed::Completed
            }
            Completion::Unknown => Relayed::Unknown,
            Completion::NotYours => Relayed::NotYours,
        }
    }

    /// Invokes `request` on `target` and waits for its answer: the target must take method
    /// requests now or within the request's connect timeout, and answer within its response
    /// timeout.
    pub async fn invoke(
        &self,
        target: &Identity,
        request: &MethodRequest,
    ) -> Result<MethodResponse, InvokeError> {
        let connect_deadline = Instant::now() + request.connect_timeout;
        let mut attached = self.attached.subscribe();
        let (rid, answer) = loop {
            attached.borrow_and_update();
            match self.hand_over(target, request)? {
                Some(handed) => break handed,
                None => {
                    let changed =
                        tokio::time::timeout_at(connect_deadline, attached.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return Err(InvokeError::NotConnected(target.clone()));
                    }
                }
            }
        };
        // Whatever ends the wait (this future dropped included), the entry goes.
        let _forget = Forget { methods: self, rid };
        match tokio::time::timeout(request.response_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InvokeError::Disconnected(target.clone())),
            Err(_) => Err(InvokeError::Timeout(target.clone())),
        }
    }

    /// Hands `request` to `target`'s connection with a fresh pending entry; `None` if the
    /// target takes no requests now.
    #[allow(clippy::type_complexity)]
    fn hand_over(
        &self,
        target: &Identity,
        request: &MethodRequest,
    ) -> Result<Option<(Rid, oneshot::Receiver<Result<MethodResponse, InvokeError>>)>, InvokeError>
    {
        let mut inner = self.lock();
        let Some((conn, tx)) = inner.targets.get(target).cloned() else {
            return Ok(None);
        };
        let (reply, answer) = oneshot::channel();
        let rid = inner.pending.begin(target, conn, reply)?;
        let call = MethodCall {
            rid,
            name: request.name.clone(),
            payload: request.payload.clone(),
        };
        match tx.try_send(call) {
            Ok(()) => Ok(Some((rid, answer))),
            Err(mpsc::error::TrySendError::Full(_)) => {
                inner.pending.cancel(rid);
                Err(InvokeError::Busy(Busy::Target(METHOD_QUEUE)))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The connection is gone and has not detached yet: as if not connected.
                inner.pending.cancel(rid);
                if inner.targets.get(target).is_some_and(|(c, _)| *c == conn) {
                    inner.targets.remove(target);
                }
                Ok(None)
            }
        }
    }
}

/// Removes a request's entry when its invoker stops waiting.
struct Forget<'a> {
    methods: &'a Methods,
    rid: Rid,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.methods.lock().pending.cancel(self.rid);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use router::{DeviceId, ModuleId};

    use super::*;

    fn who(m: &str) -> Identity {
        Identity::new(DeviceId::new("d"), ModuleId::new(m))
    }

    fn request(response_secs: u64, connect_secs: u64) -> MethodRequest {
        MethodRequest {
            name: MethodName::new("ping").unwrap(),
            payload: Bytes::from_static(b"{\"n\":1}"),
            response_timeout: Duration::from_secs(response_secs),
            connect_timeout: Duration::from_secs(connect_secs),
        }
    }

    fn ok(status: i32) -> MethodResponse {
        MethodResponse {
            status,
            payload: Bytes::from_static(b"\"pong\""),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_is_not_attached_is_404_at_once_with_connect_timeout_0() {
        let m = Methods::default();
        let start = Instant::now();
        let e = m.invoke(&who("b"), &request(30, 0)).await.unwrap_err();
        assert_eq!(e, InvokeError::NotConnected(who("b")));
        assert_eq!(e.status(), 404);
        assert_eq!(start.elapsed(), Duration::ZERO, "no wait at all");
    }

    #[tokio::test(start_paused = true)]
    async fn the_targets_answer_completes_the_request() {
        let m = Arc::new(Methods::default());
        let (tx, mut rx) = method_channel();
        assert!(m.attach(&who("b"), 1, tx));
        let invoking = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.invoke(&who("b"), &request(30, 0)).await })
        };
        let call = rx.recv().await.unwrap();
        assert_eq!(call.name.as_str(), "ping");
        assert_eq!(&call.payload[..], b"{\"n\":1}");
        // Another module, and another connection of the target, answer nothing.
        assert_eq!(
            m.relay(&who("c"), 1, &call.rid.to_string(), ok(500)),
            Relayed::NotYours
        );
        assert_eq!(
            m.relay(&who("b"), 2, &call.rid.to_string(), ok(500)),
            Relayed::NotYours
        );
        assert_eq!(m.relay(&who("b"), 1, "nope", ok(500)), Relayed::Unknown);
        assert_eq!(
            m.relay(&who("b"), 1, &call.rid.to_string(), ok(200)),
            Relayed::Completed
        );
        assert_eq!(invoking.await.unwrap(), Ok(ok(200)));
        assert_eq!(
            m.relay(&who("b"), 1, &call.rid.to_string(), ok(200)),
            Relayed::Unknown,
            "answered once only"
        );
        assert_eq!(m.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_within_the_response_timeout_is_504_and_leaves_nothing() {
        let m = Arc::new(Methods::default());
        let (tx, mut rx) = method_channel();
        m.attach(&who("b"), 1, tx);
        let start = Instant::now();
        let invoking = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.invoke(&who("b"), &request(5, 0)).await })
        };
        let call = rx.recv().await.unwrap();
        let e = invoking.await.unwrap().unwrap_err();
        assert_eq!(e, InvokeError::Timeout(who("b")));
        assert_eq!(e.status(), 504);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(m.in_flight(), 0);
        assert_eq!(
            m.relay(&who("b"), 1, &call.rid.to_string(), ok(200)),
            Relayed::Unknown,
            "a late answer completes nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_timeout_waits_for_the_target_to_attach() {
        let m = Arc::new(Methods::default());
        let start = Instant::now();
        let invoking = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.invoke(&who("b"), &request(30, 10)).await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (tx, mut rx) = method_channel();
        m.attach(&who("b"), 1, tx);
        let call = rx.recv().await.unwrap();
        m.relay(&who("b"), 1, &call.rid.to_string(), ok(201));
        assert_eq!(invoking.await.unwrap(), Ok(ok(201)));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // And a target that never comes: 404 once the connect timeout has passed.
        let start = Instant::now();
        let e = m.invoke(&who("c"), &request(30, 10)).await.unwrap_err();
        assert_eq!(e, InvokeError::NotConnected(who("c")));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_closes_ends_its_requests_with_404_and_only_its_own() {
        let m = Arc::new(Methods::default());
        let (old_tx, mut old_rx) = method_channel();
        m.attach(&who("b"), 1, old_tx);
        let invoking = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.invoke(&who("b"), &request(300, 0)).await })
        };
        old_rx.recv().await.unwrap();
        // A newer connection of b attaches; the old one can no longer take b's place.
        let (new_tx, _new_rx) = method_channel();
        assert!(m.attach(&who("b"), 2, new_tx));
        let (stale_tx, _stale_rx) = method_channel();
        assert!(!m.attach(&who("b"), 1, stale_tx));
        m.detach(&who("b"), 1);
        assert_eq!(
            invoking.await.unwrap(),
            Err(InvokeError::Disconnected(who("b")))
        );
        assert!(m.is_attached(&who("b")), "the newer connection stays");
        m.detach(&who("b"), 2);
        assert!(!m.is_attached(&who("b")));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_per_target_limit_requests_are_429_and_a_dropped_caller_frees_its_slot() {
        let m = Arc::new(Methods::new(MethodLimits {
            per_target: 1,
            total: 10,
        }));
        let (tx, mut rx) = method_channel();
        m.attach(&who("b"), 1, tx);
        let first = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.invoke(&who("b"), &request(300, 0)).await })
        };
        rx.recv().await.unwrap();
        let e = m.invoke(&who("b"), &request(30, 0)).await.unwrap_err();
        assert_eq!(e, InvokeError::Busy(Busy::Target(1)));
        assert_eq!(e.status(), 429);
        first.abort();
        let _ = first.await;
        assert_eq!(m.in_flight(), 0, "the aborted caller's entry is gone");
        let again = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.invoke(&who("b"), &request(30, 0)).await })
        };
        let call = rx.recv().await.unwrap();
        m.relay(&who("b"), 1, &call.rid.to_string(), ok(200));
        assert_eq!(again.await.unwrap(), Ok(ok(200)));
    }
}
