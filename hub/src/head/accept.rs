//! The accept loops both heads use (MQTT on 8883, AMQP on 5671, and MQTT's optional loopback-only
//! plain TCP listener for benchmarks): [`serve_tls_with`] and [`accept_loop`]. Each connection
//! runs in its own task; a failed TLS handshake or a bad client affects only its own connection.
//!
//! Guarantees: on shutdown the loops stop accepting, every connection is told to close (it first
//! acknowledges what is already durable), and `serve` returns only when all of them have ended.
//! Every connection is admitted into its head's [`Budget`] (`crate::limits`): over
//! `--max-connections` it is closed at once, an unauthenticated one is closed when evicted or at
//! its deadline, and accept errors pause the loop instead of spinning.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::limits::{self, AcceptBackoff, Admission, Budget, LogLimiter, Phase, Slot};

/// How long a TLS handshake may take (the connection's whole authentication deadline, from
/// its [`Budget`], usually ends it first).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS accept loop both heads use: each connection's handshake (within
/// [`HANDSHAKE_TIMEOUT`]) and then `serve` run in the connection's own task; a failed handshake
/// is logged with `protocol` and ends only that connection.
pub async fn serve_tls_with<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
    protocol: &'static str,
    serve: F,
) where
    F: Fn(TlsStream<TcpStream>, String, Slot) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop(listener, budget, shutdown, move |tcp, peer, slot| {
        let (acceptor, serve) = (acceptor.clone(), serve.clone());
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve(tls, peer, slot).await,
                Ok(Err(e)) => tracing::info!(%peer, error = %e, protocol, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, protocol, "TLS handshake timed out"),
            }
        }
    })
    .await;
}

/// Accepts connections (TCP_NODELAY) and runs `serve` for each in its own task until `shutdown`,
/// then waits for every connection task to end.
///
/// Each connection is admitted into `budget` first (refused and closed at once when the head is
/// full); its task ends it when the budget closes it (evicted, or not authenticated in time),
/// and the loop accepts again only once such a connection is gone.
/// An accept error that is not one connection's own (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses
/// accepting ([`AcceptBackoff`]) and is logged at most once per [`limits::LOG_INTERVAL`] with
/// the count.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    budget: Arc<Budget>,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, String, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let mut failures = LogLimiter::default();
    let mut paused_until: Option<Instant> = None;
    let protocol = budget.protocol();
    loop {
        // While connections the budget closed are still open, accept nothing more: a flood
        // then holds at most max_unauthenticated + 1 sockets.
        let settled = budget.is_settled();
        tokio::select! {
            accepted = listener.accept(), if paused_until.is_none() && settled => {
                match accepted {
                    Ok((tcp, peer)) => {
                        backoff.on_success();
                        let peer = peer.to_string();
                        // Refused: the socket closes here.
                        if let Ok(admission) = budget.admit(&peer) {
                            let _ = tcp.set_nodelay(true);
                            let serving = serve(tcp, peer.clone(), admission.slot());
                            let stop = shutdown.clone();
                            connections.spawn(until_closed(admission, peer, stop, serving));
                        }
                    }
                    Err(e) if limits::is_connection_error(&e) => {
                        tracing::debug!(protocol, error = %e, "a connection went away before it was accepted");
                    }
                    Err(e) => {
                        budget.metrics().accept_failed(protocol);
                        let pause = backoff.on_error();
                        let now = Instant::now();
                        paused_until = Some(now + pause);
                        if let Some(not_logged) = failures.hit(now) {
                            tracing::warn!(
                                protocol,
                                error = %e,
                                failures_not_logged = not_logged,
                                pause = ?pause,
                                "accept failed; pausing accepts (file descriptors or memory exhausted?)"
                            );
                        }
                    }
                }
            }
            () = sleep_until_some(paused_until) => paused_until = None,
            () = budget.settled(), if !settled => {}
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while connections.join_next().await.is_some() {}
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs a connection until it ends, or until its budget closes it before it authenticated, or
/// the hub shuts down before it authenticated (dropping it closes the socket; nothing of it was
/// acknowledged; an authenticated connection closes itself on shutdown, after acknowledging
/// what is durable). The slot is given back when this returns.
async fn until_closed(
    admission: Admission,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
    serving: impl Future<Output = ()>,
) {
    let unauthenticated_at_shutdown = async {
        let _ = shutdown.wait_for(|stop| *stop).await;
        if admission.slot().phase() != Phase::Unauthenticated {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = serving => {}
        () = unauthenticated_at_shutdown => {
            tracing::debug!(%peer, "unauthenticated connection closed: shutting down");
        }
        phase = admission.closed() => {
            let reason = match phase {
                Phase::Evicted => "evicted for a newer unauthenticated connection",
                _ => "not authenticated in time",
            };
            tracing::debug!(%peer, reason, "unauthenticated connection closed");
        }
    }
}
