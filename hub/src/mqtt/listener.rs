//! The MQTT head's listeners: MQTT over TLS (8883), and an optional loopback-only plain TCP
//! listener for benchmarks, each on the shared accept loop ([`crate::head::accept`]), which
//! admits every connection into the head's budget and ends each connection on its own.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::head::accept::{accept_loop, serve_tls_with};
use crate::head::context::HeadContext;
use crate::limits::Budget;
use crate::mqtt::connection;
use crate::mqtt::sessions::Sessions;

/// Serves MQTT over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<HeadContext>,
    sessions: Arc<Sessions>,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls_with(
        listener,
        acceptor,
        budget,
        shutdown,
        "MQTT",
        move |tls, peer, slot| {
            let (ctx, sessions) = (Arc::clone(&ctx), Arc::clone(&sessions));
            async move {
                connection::serve(tls, ctx, sessions, peer, slot).await;
            }
        },
    )
    .await;
}

/// Serves MQTT over plain TCP (loopback only; the caller checks the address) until `shutdown`.
pub async fn serve_plain(
    listener: TcpListener,
    ctx: Arc<HeadContext>,
    sessions: Arc<Sessions>,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, budget, shutdown, move |tcp, peer, slot| {
        let (ctx, sessions) = (Arc::clone(&ctx), Arc::clone(&sessions));
        async move {
            connection::serve(tcp, ctx, sessions, peer, slot).await;
        }
    })
    .await;
}
