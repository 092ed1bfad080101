//! The AMQPS accept loop: TLS with the hub's certificate (the same rustls configuration as
//! MQTT), then one task per connection ([`crate::amqp::connection::serve`]).
//!
//! Guarantees: a failed TLS handshake or a bad client affects only its own connection; on
//! shutdown the loop stops accepting, every connection settles what is durable and closes, and
//! [`serve_tls`] returns only when all of them have ended (the MQTT listener's discipline,
//! sharing its accept loop).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::amqp::connection;
use crate::mqtt::context::HeadContext;
use crate::mqtt::listener::accept_loop;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves AMQP over TLS on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<HeadContext>,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, shutdown, move |tcp, peer| {
        let (acceptor, ctx) = (acceptor.clone(), Arc::clone(&ctx));
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    if let end @ (connection::ConnectionEnd::Io(_)
                    | connection::ConnectionEnd::Timeout
                    | connection::ConnectionEnd::Open(_)) =
                        connection::serve(tls, ctx, peer.clone()).await
                    {
                        tracing::info!(%peer, reason = %end, "AMQP connection not opened");
                    }
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "AMQP TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "AMQP TLS handshake timed out"),
            }
        }
    })
    .await;
}
