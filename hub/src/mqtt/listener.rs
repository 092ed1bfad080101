//! Accept loops: MQTT over TLS (8883), and an optional loopback-only plain TCP listener for
//! benchmarks. Each connection runs in its own task; a failed TLS handshake or a bad client
//! affects only its own connection.
//!
//! Guarantees: on shutdown the loops stop accepting, every connection is told to close (it first
//! acknowledges what is already durable), and `serve` returns only when all of them have ended.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::mqtt::connection;
use crate::mqtt::context::HeadContext;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves MQTT over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<HeadContext>,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls_with(listener, acceptor, shutdown, "MQTT", move |tls, peer| {
        let ctx = Arc::clone(&ctx);
        async move {
            connection::serve(tls, ctx, peer).await;
        }
    })
    .await;
}

/// The TLS accept loop both heads use: each connection's handshake (within
/// [`HANDSHAKE_TIMEOUT`]) and then `serve` run in the connection's own task; a failed handshake
/// is logged with `protocol` and ends only that connection.
pub(crate) async fn serve_tls_with<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: watch::Receiver<bool>,
    protocol: &'static str,
    serve: F,
) where
    F: Fn(TlsStream<TcpStream>, String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop(listener, shutdown, move |tcp, peer| {
        let (acceptor, serve) = (acceptor.clone(), serve.clone());
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve(tls, peer).await,
                Ok(Err(e)) => tracing::info!(%peer, error = %e, protocol, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, protocol, "TLS handshake timed out"),
            }
        }
    })
    .await;
}

/// Serves MQTT over plain TCP (loopback only; the caller checks the address) until `shutdown`.
pub async fn serve_plain(
    listener: TcpListener,
    ctx: Arc<HeadContext>,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, shutdown, move |tcp, peer| {
        let ctx = Arc::clone(&ctx);
        async move {
            connection::serve(tcp, ctx, peer).await;
        }
    })
    .await;
}

/// Accepts connections (TCP_NODELAY) and runs `serve` for each in its own task until `shutdown`,
/// then waits for every connection task to end.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        connections.spawn(serve(tcp, peer.to_string()));
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while connections.join_next().await.is_some() {}
}
