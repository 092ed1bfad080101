//! The AMQPS accept loop: TLS with the hub's certificate (the same rustls configuration as
//! MQTT), then one task per connection ([`crate::amqp::connection::serve`]).
//!
//! Guarantees: a failed TLS handshake or a bad client affects only its own connection; on
//! shutdown the loop stops accepting, every connection settles what is durable and closes, and
//! [`serve_tls`] returns only when all of them have ended (the MQTT listener's discipline,
//! sharing its accept loop).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::amqp::connection::{self, ConnectionEnd};
use crate::head::accept::serve_tls_with;
use crate::head::context::HeadContext;
use crate::limits::Budget;

/// Serves AMQP over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<HeadContext>,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls_with(
        listener,
        acceptor,
        budget,
        shutdown,
        "AMQP",
        move |tls, peer, slot| {
            let ctx = Arc::clone(&ctx);
            async move {
                if let end @ (ConnectionEnd::Io(_)
                | ConnectionEnd::Timeout
                | ConnectionEnd::Open(_)) = connection::serve(tls, ctx, peer.clone(), slot).await
                {
                    tracing::info!(%peer, reason = %end, "AMQP connection not opened");
                }
            }
        },
    )
    .await;
}
