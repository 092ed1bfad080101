//! The controller's HTTP endpoint: `GET /metrics` (Prometheus text), `GET /healthz` and
//! `GET /readyz` (the chart's probes). A follower replica is ready too: it serves and waits to
//! lead, and readiness gates no traffic to it.
//! HTTP/1.0-style: one request per connection, bounded request size.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::reconcile::Metrics;

/// The paths served (the chart's probes must ask for one of them).
pub const PATHS: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// The most a request head may take.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_REQUEST];
            let mut len = 0;
            while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => len += n,
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match (head.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", metrics.render()),
                (true, "/healthz" | "/readyz") => ("200 OK", "ok\n".to_owned()),
                (true, _) => ("404 Not Found", "not found\n".to_owned()),
                (false, _) => ("405 Method Not Allowed", "GET only\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn metrics_are_served_in_prometheus_text_with_edgehub_names() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::default());
        metrics
            .reconcile_errors
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(serve(listener, metrics));
        let out = get(addr, "/metrics").await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(
            out.contains("\nedgehub_controller_reconcile_errors_total 3\n"),
            "{out}"
        );
        assert!(out.contains("\nedgehub_controller_leader 0\n"), "{out}");
        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nok\n"));
        // The chart's readiness probe.
        assert!(get(addr, "/readyz").await.ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
