//! Accept loops: MQTT over TLS (8883), and an optional loopback-only plain TCP listener for
//! benchmarks. Each connection runs in its own task; a failed TLS handshake or a bad client
//! affects only its own connection.
//!
//! Guarantees: on shutdown the loops stop accepting, every connection is told to close (it first
//! acknowledges what is already durable), and `serve` returns only when all of them have ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
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
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, ctx) = (acceptor.clone(), Arc::clone(&ctx));
                connections.spawn(async move {
                    let peer = peer.to_string();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            connection::serve(tls, ctx, peer).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Serves MQTT over plain TCP (loopback only; the caller checks the address) until `shutdown`.
pub async fn serve_plain(
    listener: TcpListener,
    ctx: Arc<HeadContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let ctx = Arc::clone(&ctx);
                connections.spawn(async move {
                    connection::serve(tcp, ctx, peer.to_string()).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while connections.join_next().await.is_some() {}
}
